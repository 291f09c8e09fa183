//! What the HTTP server does with requests it must refuse, and what the client makes of
//! refusals. Every refusal is checked for its status code and for leaving the node's storage
//! as it was (records digest, watermarks, blob store listing, files under the blob
//! directory). Requests the server must answer without reading their body are written by
//! hand on a raw socket that never sends that body.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::http::{call, error_of, head, raw, tmp_is_empty, tokens, Raw, Server, APP_A, HUB};
use common::rounds::TestResult;
use highwater::error::{ProtocolError, TransportError};
use highwater::exchange::{Page, Run};
use highwater::http::{serve, ClientConfig, HttpTransport, ServeError, ServerConfig};
use highwater::transport::RefusalCode;
use highwater::wire::{
    self, ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks, MAGIC, SUPPORTED_VERSIONS,
};
use highwater::{
    BlobRef, EngineConfig, Error as HwError, Halt, HaltReason, Hash, Hlc, Key, ManualTime, NodeId,
    Op, Scope, ScopeFilter, ScopedWatermarks, SyncEngine, Transport, Version,
};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};

/// The server's clock in the exchange tests (seconds since the NTP epoch, as `ManualTime`).
const T0: u32 = 1_700_000_000;

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn app(a: &str) -> Scope {
    Scope::app(a, "t").expect("a valid scope")
}

/// NTP64 time `secs` seconds after [`T0`] (negative: before).
fn at(secs: i64) -> u64 {
    let t = i64::from(T0) + secs;
    u64::try_from(t).expect("after the epoch") << 32
}

/// A server on a manual clock at [`T0`], with tokens, and `config` otherwise.
async fn protected(config: ServerConfig) -> TestResult<Server> {
    let engine = EngineConfig {
        time: ManualTime::at_secs(T0),
        ..EngineConfig::default()
    };
    Server::start_with(
        engine,
        ServerConfig {
            access: tokens(),
            ..config
        },
    )
    .await
}

/// A run of puts from `origin` in `scope`, one per time, keys `k0`, `k1`...
fn run(scope: &Scope, origin: NodeId, times: &[u64]) -> Run {
    let versions: Vec<(Key, Version)> = times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let version = Version {
                hlc: Hlc::new(*t, origin),
                op: Op::Put {
                    value: format!("v{i}").into_bytes(),
                    blob: None,
                },
            };
            (key(&format!("k{i}")), version)
        })
        .collect();
    Run {
        scope: scope.clone(),
        origin,
        base: None,
        top: versions.last().map_or(Hlc::new(1, origin), |(_, v)| v.hlc),
        versions,
    }
}

/// A request from `from` over `scopes` carrying `runs` (and watermarks that match them).
fn request(from: NodeId, scopes: ScopeFilter, runs: Vec<Run>) -> ExchangeRequest {
    let mut watermarks = ScopedWatermarks::new();
    for r in &runs {
        watermarks.observe(&r.scope, r.top);
    }
    ExchangeRequest {
        from,
        scopes,
        marks: RequestMarks::Full(watermarks),
        known: None,
        page: Page { runs, more: false },
        limit: 1000,
        deferred: Vec::new(),
        ext: Default::default(),
    }
}

/// POSTs `bytes` to the exchange endpoint with `token`.
async fn post_exchange(
    server: &Server,
    token: Option<&str>,
    bytes: Vec<u8>,
) -> TestResult<(StatusCode, Bytes)> {
    let client = server.client(token)?;
    let (status, _, body) = call(&client, Method::POST, "/v1/sync/exchange", bytes).await?;
    Ok((status, body))
}

/// Chunked transfer coding of `chunks`, without the last (zero) chunk.
fn chunked(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------
// Authentication and authorization
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_or_unknown_tokens_get_401_before_the_body_is_read() -> TestResult {
    // A server that read the body first would wait for it for an hour.
    let server = protected(ServerConfig {
        body_read_timeout: Duration::from_secs(3600),
        ..ServerConfig::default()
    })
    .await?;
    server
        .engine
        .put(&Scope::shared(), &key("k"), b"v".to_vec())?;
    let before = server.snapshot()?;
    let blob = format!("/v1/blobs/{}", Hash::of(b"x"));
    let endpoints = [
        ("POST", "/v1/sync/exchange"),
        ("POST", "/v1/sync/push"),
        ("PUT", blob.as_str()),
        ("PUT", "/v1/records/shared/k"),
        ("PUT", "/v1/files/shared/f"),
    ];
    let credentials = [
        None,
        Some("Authorization: Bearer not-a-token-of-this-node"),
        Some("Authorization: Bearer"),
        Some("Authorization: Basic aHViOmh1Yg=="),
    ];
    for (method, path) in endpoints {
        for credential in credentials {
            let mut extra = vec!["Content-Length: 1000000".to_owned()];
            extra.extend(credential.map(str::to_owned));
            let mut conn = Raw::connect(server.addr).await?;
            // The head only: the million bytes announced never come.
            conn.send(format!("{}\r\n\r\n", head(method, path, None, &extra)).as_bytes())
                .await?;
            let resp = conn.response().await?;
            let case = format!("{method} {path} with {credential:?}");
            assert_eq!(resp.status, 401, "{case}: {}", resp.error());
            assert_eq!(resp.header("www-authenticate"), Some("Bearer"), "{case}");
            assert_eq!(resp.json()?["code"], "unauthorized", "{case}");
            // It does not wait for the body either: the connection ends.
            conn.closed().await?;
        }
    }
    // The scheme is case-insensitive, the token is not.
    for (credential, status) in [
        (format!("bearer {HUB}"), 200),
        (format!("BEARER {HUB}"), 200),
        (format!("Bearer {}", HUB.to_uppercase()), 401),
    ] {
        let extra = [format!("Authorization: {credential}")];
        let resp = raw(
            server.addr,
            &head("GET", "/v1/records/shared/k", None, &extra),
            b"",
        )
        .await?;
        assert_eq!(resp.status, status, "{credential}");
    }
    // Reads need a token too.
    let resp = raw(
        server.addr,
        &head("GET", "/v1/records/shared/k", None, &[]),
        b"",
    )
    .await?;
    assert_eq!(resp.status, 401);
    assert_eq!(server.snapshot()?, before);
    assert!(server.engine.peers()?.is_empty());
    server.stop().await
}

#[tokio::test]
async fn two_authorization_headers_get_400() -> TestResult {
    for server in [
        protected(ServerConfig::default()).await?,
        Server::start(ServerConfig::default()).await?,
    ] {
        let before = server.snapshot()?;
        for (first, second) in [
            (HUB, HUB),
            (HUB, "not-a-token-of-this-node"),
            ("not-a-token-of-this-node", HUB),
        ] {
            let extra = [
                format!("Authorization: Bearer {first}"),
                format!("Authorization: Bearer {second}"),
                "Content-Length: 1".to_owned(),
            ];
            let resp = raw(
                server.addr,
                &head("PUT", "/v1/records/shared/k", None, &extra),
                b"v",
            )
            .await?;
            assert_eq!(resp.status, 400, "{first} then {second}: {}", resp.error());
            assert_eq!(resp.json()?["code"], "bad_request");
            assert!(resp.error().contains("Authorization given more than once"));
        }
        assert_eq!(server.snapshot()?, before);
        server.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_token_for_app_a_is_forbidden_on_app_b() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let e = &server.engine;
    e.put(&app("a"), &key("a1"), b"a".to_vec())?;
    e.put(&app("b"), &key("b1"), b"b".to_vec())?;
    let before = server.snapshot()?;
    let client = server.client(Some(APP_A))?;

    // The records API.
    for (method, path) in [
        (Method::GET, "/v1/records/app/b/t/b1"),
        (Method::PUT, "/v1/records/app/b/t/b1"),
        (Method::DELETE, "/v1/records/app/b/t/b1"),
        (Method::GET, "/v1/records/app/b/t"),
        (Method::PUT, "/v1/files/app/b/t/f"),
        (Method::GET, "/v1/files/app/b/t/f"),
    ] {
        let (status, _, body) = call(&client, method.clone(), path, "new value").await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(error_of(&body)?.0, "forbidden");
    }

    // Exchanges whose scope filter or page names app B.
    let peer = NodeId::random();
    let both = BTreeSet::from([app("a"), app("b")]);
    for (what, req) in [
        (
            "filter of app B",
            request(peer, ScopeFilter::Only(BTreeSet::from([app("b")])), vec![]),
        ),
        (
            "filter of apps A and B",
            request(peer, ScopeFilter::Only(both), vec![]),
        ),
        (
            "all scopes, page for app B",
            request(
                peer,
                ScopeFilter::All,
                vec![run(&app("b"), peer, &[at(-10)])],
            ),
        ),
        (
            "filter of app A, page for app B",
            request(
                peer,
                ScopeFilter::Only(BTreeSet::from([app("a")])),
                vec![run(&app("b"), peer, &[at(-10)])],
            ),
        ),
    ] {
        let (status, body) = post_exchange(&server, Some(APP_A), wire::encode(&req)).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        let (code, message) = error_of(&body)?;
        assert_eq!(code, "forbidden");
        assert!(message.contains("app/b/t"), "{what}: {message}");
    }
    assert_eq!(server.snapshot()?, before);
    assert!(e.peers()?.is_empty(), "no round was answered");

    // The control: the same token may write and sync its own app.
    let req = request(
        peer,
        ScopeFilter::Only(BTreeSet::from([app("a")])),
        vec![run(&app("a"), peer, &[at(-10)])],
    );
    let (status, _) = post_exchange(&server, Some(APP_A), wire::encode(&req)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(server.snapshot()?, before);
    server.stop().await
}

#[tokio::test]
async fn all_scopes_narrow_to_what_the_token_reads() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let e = &server.engine;
    e.put(&app("a"), &key("a1"), b"a".to_vec())?;
    e.put(&app("b"), &key("b1"), b"b".to_vec())?;
    e.put(&Scope::shared(), &key("s1"), b"s".to_vec())?;
    let req = request(NodeId::random(), ScopeFilter::All, vec![]);
    let (status, body) = post_exchange(&server, Some(APP_A), wire::encode(&req)).await?;
    assert_eq!(status, StatusCode::OK);
    let resp: ExchangeResponse = wire::decode(&body)?;
    let shipped: BTreeSet<&Scope> = resp.page.runs.iter().map(|r| &r.scope).collect();
    assert_eq!(shipped, BTreeSet::from([&app("a")]));
    let ResponseMarks::Full(marks) = &resp.marks else {
        panic!("a request with full marks and no `known` gets full marks back");
    };
    let marked: BTreeSet<&Scope> = marks.iter().map(|(s, _)| s).collect();
    assert_eq!(marked, BTreeSet::from([&app("a")]));
    // The hub token sees everything.
    let (status, body) = post_exchange(&server, Some(HUB), wire::encode(&req)).await?;
    assert_eq!(status, StatusCode::OK);
    let resp: ExchangeResponse = wire::decode(&body)?;
    assert_eq!(resp.page.runs.len(), 3);
    server.stop().await
}

// ---------------------------------------------------------------------------------------
// Limits and timeouts
// ---------------------------------------------------------------------------------------

/// Small limits, so tests send little: 1 KiB exchanges and records, 4 KiB blobs and files.
fn small_limits() -> ServerConfig {
    ServerConfig {
        max_exchange_body: 1024,
        max_record_body: 1024,
        max_blob_body: 4096,
        body_read_timeout: Duration::from_secs(3600),
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_before_the_body() -> TestResult {
    let server = protected(small_limits()).await?;
    let before = server.snapshot()?;
    let blob = format!("/v1/blobs/{}", Hash::of(b"x"));
    for (method, path, limit) in [
        ("POST", "/v1/sync/exchange", 1024u64),
        ("PUT", "/v1/records/shared/k", 1024),
        ("PUT", "/v1/files/shared/f", 4096),
        ("PUT", blob.as_str(), 4096),
    ] {
        for declared in [limit + 1, 1 << 40] {
            let mut conn = Raw::connect(server.addr).await?;
            let extra = [format!("Content-Length: {declared}")];
            // The head only: the response must come without the body.
            conn.send(format!("{}\r\n\r\n", head(method, path, Some(HUB), &extra)).as_bytes())
                .await?;
            let resp = conn.response().await?;
            assert_eq!(resp.status, 413, "{method} {path} declaring {declared}");
            assert_eq!(resp.json()?["code"], "too_large");
            assert!(
                resp.error().contains(&limit.to_string()),
                "{}",
                resp.error()
            );
            assert_eq!(resp.header("connection"), Some("close"));
            conn.closed().await?;
        }
    }
    assert_eq!(server.snapshot()?, before);
    server.stop().await
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413_and_the_connection_closes() -> TestResult {
    let server = protected(small_limits()).await?;
    let before = server.snapshot()?;
    let piece = [7u8; 512];
    for (method, path, pieces) in [
        ("POST", "/v1/sync/exchange", 3),
        ("PUT", "/v1/records/shared/k", 3),
        ("PUT", "/v1/files/shared/f", 16),
    ] {
        let mut conn = Raw::connect(server.addr).await?;
        let extra = ["Transfer-Encoding: chunked".to_owned()];
        let mut bytes = format!("{}\r\n\r\n", head(method, path, Some(HUB), &extra)).into_bytes();
        // Over the limit by one piece; the body never ends.
        bytes.extend(chunked(&vec![&piece[..]; pieces]));
        conn.send(&bytes).await?;
        let resp = conn.response().await?;
        assert_eq!(resp.status, 413, "{method} {path}: {}", resp.error());
        assert_eq!(resp.header("connection"), Some("close"));
        conn.closed().await?;
        assert_eq!(server.snapshot()?, before, "{method} {path}");
        assert!(tmp_is_empty(&server.blob_dir())?);
    }
    // A blob upload must declare its length.
    let path = format!("/v1/blobs/{}", Hash::of(&piece));
    let extra = ["Transfer-Encoding: chunked".to_owned()];
    let mut bytes = format!("{}\r\n\r\n", head("PUT", &path, Some(HUB), &extra)).into_bytes();
    bytes.extend(chunked(&[&piece[..]]));
    bytes.extend_from_slice(b"0\r\n\r\n");
    let mut conn = Raw::connect(server.addr).await?;
    conn.send(&bytes).await?;
    let resp = conn.response().await?;
    assert_eq!(resp.status, 411, "{}", resp.error());
    assert_eq!(server.snapshot()?, before);
    server.stop().await
}

#[tokio::test]
async fn uploads_cut_off_midway_store_nothing() -> TestResult {
    let mut server = protected(small_limits()).await?;
    // The control: a complete file upload is stored.
    let extra = ["Content-Length: 4000".to_owned()];
    let path = "/v1/files/shared/whole";
    let resp = raw(
        server.addr,
        &head("PUT", path, Some(HUB), &extra),
        &[2u8; 4000],
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.error());
    let before = server.snapshot()?;
    assert_eq!(before.blobs.len(), 1);

    // Half of a declared body, then the client goes away: for a file and for a blob.
    let blob_path = format!("/v1/blobs/{}", Hash::of(&[1u8; 4000]));
    for path in ["/v1/files/shared/cut", blob_path.as_str()] {
        let mut conn = Raw::connect(server.addr).await?;
        let mut bytes = format!("{}\r\n\r\n", head("PUT", path, Some(HUB), &extra)).into_bytes();
        bytes.extend_from_slice(&[1u8; 2000]);
        conn.send(&bytes).await?;
        drop(conn);
    }
    // Shutting down waits for the requests in progress: then their outcome is final.
    server.shut_down().await?;
    assert_eq!(server.engine.get(&Scope::shared(), &key("cut"))?, None);
    assert_eq!(server.snapshot()?, before);
    assert!(tmp_is_empty(&server.blob_dir())?);
    Ok(())
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_the_connection_closes() -> TestResult {
    let server = protected(ServerConfig {
        body_read_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await?;
    let before = server.snapshot()?;
    let blob = format!("/v1/blobs/{}", Hash::of(&[0u8; 100]));
    for (method, path) in [
        ("POST", "/v1/sync/exchange"),
        ("PUT", "/v1/records/shared/k"),
        ("PUT", "/v1/files/shared/f"),
        ("PUT", blob.as_str()),
    ] {
        let mut conn = Raw::connect(server.addr).await?;
        let extra = ["Content-Length: 100".to_owned()];
        let mut bytes = format!("{}\r\n\r\n", head(method, path, Some(HUB), &extra)).into_bytes();
        bytes.extend_from_slice(&[0u8; 10]);
        conn.send(&bytes).await?;
        let resp = conn.response().await?;
        assert_eq!(resp.status, 408, "{method} {path}: {}", resp.error());
        assert_eq!(resp.json()?["code"], "timeout");
        conn.closed().await?;
        assert_eq!(server.snapshot()?, before, "{method} {path}");
    }
    server.stop().await
}

/// Starts an exchange on a raw connection and waits until the server reads its body (it
/// answers `Expect: 100-continue` only then, after taking the token's exchange slot), having
/// sent half of `body`.
async fn hold_exchange(server: &Server, token: &str, body: &[u8]) -> TestResult<Raw> {
    let mut conn = Raw::connect(server.addr).await?;
    let extra = [
        format!("Content-Length: {}", body.len()),
        "Expect: 100-continue".to_owned(),
    ];
    conn.send(
        format!(
            "{}\r\n\r\n",
            head("POST", "/v1/sync/exchange", Some(token), &extra)
        )
        .as_bytes(),
    )
    .await?;
    let resp = conn.response().await?;
    assert_eq!(resp.status, 100, "the server reads the body");
    conn.send(&body[..body.len() / 2]).await?;
    Ok(conn)
}

#[tokio::test]
async fn exchanges_past_the_per_token_limit_get_429() -> TestResult {
    let server = protected(ServerConfig {
        max_exchanges_per_token: 2,
        body_read_timeout: Duration::from_secs(3600),
        ..ServerConfig::default()
    })
    .await?;
    let peer = NodeId::random();
    let body = wire::encode(&request(peer, ScopeFilter::All, vec![]));
    let mut first = hold_exchange(&server, HUB, &body).await?;
    let second = hold_exchange(&server, HUB, &body).await?;

    // A third and a fourth exchange of the same token are refused at once, unread.
    let before = server.snapshot()?;
    for _ in 0..2 {
        let mut conn = Raw::connect(server.addr).await?;
        let extra = [format!("Content-Length: {}", body.len())];
        conn.send(
            format!(
                "{}\r\n\r\n",
                head("POST", "/v1/sync/exchange", Some(HUB), &extra)
            )
            .as_bytes(),
        )
        .await?;
        let resp = conn.response().await?;
        assert_eq!(resp.status, 429, "{}", resp.error());
        assert_eq!(resp.json()?["code"], "busy");
    }
    let (status, body_429) = post_exchange(&server, Some(HUB), body.clone()).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(error_of(&body_429)?.1.contains("hub"));
    assert_eq!(server.snapshot()?, before);

    // Another token has its own slots.
    let (status, _) = post_exchange(&server, Some(APP_A), body.clone()).await?;
    assert_eq!(status, StatusCode::OK);

    // Once one held exchange completes, its slot is free again.
    first.send(&body[body.len() / 2..]).await?;
    assert_eq!(first.response().await?.status, 200);
    let (status, _) = post_exchange(&server, Some(HUB), body).await?;
    assert_eq!(status, StatusCode::OK);
    // The server ends the still-held exchange when its client goes away.
    drop(second);
    server.stop().await
}

// ---------------------------------------------------------------------------------------
// Bodies that do not decode
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_exchange_bodies_get_400() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    server
        .engine
        .put(&Scope::shared(), &key("mine"), b"x".to_vec())?;
    let before = server.snapshot()?;
    let peer = NodeId::random();
    let good = wire::encode(&request(
        peer,
        ScopeFilter::All,
        vec![run(&Scope::shared(), peer, &[at(-10)])],
    ));

    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0, 0xff]);
    let mut response_kind = good.clone();
    response_kind[6] = 2;
    let mut garbage_body = good[..7].to_vec();
    garbage_body.extend_from_slice(&[0xff; 40]);
    let mut cases: Vec<(String, Vec<u8>, &str)> = vec![
        ("empty".into(), Vec::new(), "truncated"),
        (
            "truncated".into(),
            good[..good.len() - 1].to_vec(),
            "truncated",
        ),
        ("trailing bytes".into(), trailing, "2 trailing bytes"),
        ("not postcard".into(), garbage_body, "malformed"),
        ("bad magic".into(), b"GET / HTTP/1.1\r\n".to_vec(), "magic"),
        ("a response".into(), response_kind, "kind"),
    ];
    for version in [0u16, 3, 0xffff] {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.push(1);
        bytes.extend_from_slice(&good[7..]);
        cases.push((
            format!("version {version}"),
            bytes,
            "unsupported protocol version",
        ));
    }
    for (what, bytes, expected) in cases {
        let (status, body) = post_exchange(&server, Some(HUB), bytes).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        let (code, message) = error_of(&body)?;
        assert_eq!(code, "bad_request");
        assert!(message.contains(expected), "{what}: {message}");
        if what.starts_with("version") {
            assert!(
                message.contains(&format!("supported: {SUPPORTED_VERSIONS:?}")),
                "{what}: {message}"
            );
        }
    }
    assert_eq!(server.snapshot()?, before);
    assert!(server.engine.peers()?.is_empty());

    // The control: the good bytes are applied.
    let (status, _) = post_exchange(&server, Some(HUB), good).await?;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(server.snapshot()?, before);
    server.stop().await
}

// ---------------------------------------------------------------------------------------
// Blob paths and uploads
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn blob_paths_other_than_64_lowercase_hex_get_400_and_touch_no_file() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    server
        .engine
        .put_file_bytes(&Scope::shared(), &key("f"), Vec::new(), b"stored")?;
    // A file beside the blob directory, where "../sentinel" from it would lead.
    let sentinel = server.dir.path().join("sentinel");
    std::fs::write(&sentinel, b"untouched")?;
    let sentinel_modified = std::fs::metadata(&sentinel)?.modified()?;
    let before = server.snapshot()?;
    let upper = "AB".repeat(32);
    let short = "ab".repeat(31);
    let long = "ab".repeat(33);
    let hex = Hash::of(b"stored").to_string();
    let paths = [
        "/v1/blobs/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "/v1/blobs/..%2Fsentinel".to_owned(),
        "/v1/blobs/../sentinel".to_owned(),
        "/v1/blobs//etc/passwd".to_owned(),
        "/v1/blobs/%00".to_owned(),
        format!("/v1/blobs/{}%00", &hex[..62]),
        format!("/v1/blobs/{upper}"),
        format!("/v1/blobs/{short}"),
        format!("/v1/blobs/{long}"),
        format!("/v1/blobs/{hex}/x"),
        format!("/v1/blobs/{hex}%2Fx"),
        "/v1/blobs/".to_owned(),
    ];
    for path in &paths {
        for method in ["GET", "HEAD", "PUT"] {
            let extra = ["Content-Length: 6".to_owned()];
            let mut conn = Raw::connect(server.addr).await?;
            let mut bytes =
                format!("{}\r\n\r\n", head(method, path, Some(HUB), &extra)).into_bytes();
            bytes.extend_from_slice(b"stored");
            conn.send(&bytes).await?;
            let resp = if method == "HEAD" {
                conn.head_response().await?
            } else {
                conn.response().await?
            };
            assert_eq!(resp.status, 400, "{method} {path}");
            if method != "HEAD" {
                assert!(
                    resp.error().contains("64 lowercase hex"),
                    "{}",
                    resp.error()
                );
            }
        }
    }
    assert_eq!(std::fs::read(&sentinel)?, b"untouched");
    assert_eq!(std::fs::metadata(&sentinel)?.modified()?, sentinel_modified);
    assert_eq!(server.snapshot()?, before);
    // The control: the well-formed path serves the stored blob.
    let resp = raw(
        server.addr,
        &head("GET", &format!("/v1/blobs/{hex}"), Some(HUB), &[]),
        b"",
    )
    .await?;
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"stored"[..]));
    server.stop().await
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_match_its_hash_is_not_stored() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let before = server.snapshot()?;
    let client = server.client(Some(HUB))?;
    let claimed = Hash::of(b"the bytes the hash names");
    for sent in [
        &b"other bytes of the same length!!"[..24],
        &b"shorter"[..],
        &b"the bytes the hash names, and more"[..],
    ] {
        let path = format!("/v1/blobs/{claimed}");
        let (status, _, body) = call(&client, Method::PUT, &path, sent.to_vec()).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{sent:?}");
        let (_, message) = error_of(&body)?;
        assert!(message.contains("hashes to"), "{message}");
        let (status, _, _) = call(&client, Method::HEAD, &path, Bytes::new()).await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(server.snapshot()?, before);
        assert!(
            tmp_is_empty(&server.blob_dir())?,
            "a temporary file was left"
        );
    }
    // The control: the right bytes are stored.
    let path = format!("/v1/blobs/{claimed}");
    let content = b"the bytes the hash names".to_vec();
    let (status, _, _) = call(&client, Method::PUT, &path, content).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.engine.blob_store().list()?, vec![(claimed, 24)]);
    assert!(tmp_is_empty(&server.blob_dir())?);
    server.stop().await
}

// ---------------------------------------------------------------------------------------
// Versions the core refuses
// ---------------------------------------------------------------------------------------

/// Answers `req` over HTTP with the hub token and checks that the node's data is unchanged.
async fn answered_without_change(
    server: &Server,
    req: &ExchangeRequest,
) -> TestResult<ExchangeResponse> {
    let before = server.snapshot()?;
    let (status, body) = post_exchange(server, Some(HUB), wire::encode(req)).await?;
    assert_eq!(status, StatusCode::OK, "{:?}", error_of(&body));
    assert_eq!(server.snapshot()?, before);
    Ok(wire::decode(&body)?)
}

fn one_halt(resp: &ExchangeResponse) -> &Halt {
    assert_eq!(resp.halts.len(), 1, "{:?}", resp.halts);
    &resp.halts[0]
}

#[tokio::test]
async fn versions_from_a_skewed_clock_halt_as_in_the_core() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    server
        .engine
        .put(&Scope::shared(), &key("mine"), b"x".to_vec())?;
    let shared = Scope::shared();
    for (ahead, at_least_ms) in [(at(3600), 3_000_000u64), (u64::MAX, 1_000_000_000_000)] {
        let peer = NodeId::random();
        let req = request(peer, ScopeFilter::All, vec![run(&shared, peer, &[ahead])]);
        let resp = answered_without_change(&server, &req).await?;
        let halt = one_halt(&resp);
        assert_eq!((&halt.scope, halt.origin), (&shared, peer));
        match halt.reason {
            HaltReason::ClockSkew { ahead_by_ms } => assert!(ahead_by_ms >= at_least_ms),
            ref other => panic!("expected clock skew, got {other:?}"),
        }
        assert_eq!(server.engine.get(&shared, &key("k0"))?, None);
    }
    // The clock was not dragged ahead: the node still writes at its own time.
    let next = server.engine.put(&shared, &key("mine"), b"y".to_vec())?;
    assert!(next.time() < at(10), "the next write is at {next}");
    server.stop().await
}

#[tokio::test]
async fn a_run_whose_times_overflow_is_refused_with_400() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let before = server.snapshot()?;
    let peer = NodeId::random();
    // Times go down: encoded as a wrapping delta, which overflows when decoded.
    let mut r = run(&Scope::shared(), peer, &[u64::MAX - 1, at(-10)]);
    r.top = Hlc::new(u64::MAX - 1, peer);
    let req = request(peer, ScopeFilter::All, vec![r]);
    let (status, body) = post_exchange(&server, Some(HUB), wire::encode(&req)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // (postcard drops the decoder's reason: the message says "malformed".)
    let (_, message) = error_of(&body)?;
    assert!(message.contains("malformed"), "{message}");
    assert_eq!(server.snapshot()?, before);
    server.stop().await
}

#[tokio::test]
async fn versions_of_the_servers_own_id_halt_and_a_request_from_it_is_refused() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let me = server.engine.node_id();
    server
        .engine
        .put(&Scope::shared(), &key("mine"), b"x".to_vec())?;

    // A peer relays versions of ours above our own mark, which we never wrote: the stream
    // halts, nothing applies.
    let peer = NodeId::random();
    let req = request(
        peer,
        ScopeFilter::All,
        vec![run(&Scope::shared(), me, &[at(2)])],
    );
    let resp = answered_without_change(&server, &req).await?;
    let halt = one_halt(&resp);
    assert_eq!(halt.origin, me);
    assert_eq!(halt.reason, HaltReason::OwnOrigin);

    // A request that claims to come from us is refused whole.
    let before = server.snapshot()?;
    let req = request(
        me,
        ScopeFilter::All,
        vec![run(&Scope::shared(), peer, &[at(-5)])],
    );
    let (status, body) = post_exchange(&server, Some(HUB), wire::encode(&req)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let expected = ProtocolError::PeerIsSelf { node: me }.to_string();
    assert_eq!(error_of(&body)?.1, expected);
    assert_eq!(server.snapshot()?, before);
    server.stop().await
}

#[tokio::test]
async fn the_zero_node_id_is_refused_with_400() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let before = server.snapshot()?;
    let peer = NodeId::from_bytes([0x5a; 16]).expect("a non-zero id");
    let good = wire::encode(&request(
        peer,
        ScopeFilter::All,
        vec![run(&Scope::shared(), peer, &[at(-5)])],
    ));
    let zeroed = |from: usize| {
        let mut bytes = good.clone();
        let at = from
            + bytes[from..]
                .windows(16)
                .position(|w| w == [0x5a; 16])
                .expect("the id");
        bytes[at..at + 16].fill(0);
        bytes
    };
    // The request's `from` (right after the 7-byte header), then the run's origin.
    for (what, bytes) in [("from", zeroed(0)), ("run origin", zeroed(7 + 16))] {
        let (status, body) = post_exchange(&server, Some(HUB), bytes).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        let (_, message) = error_of(&body)?;
        assert!(message.contains("malformed"), "{what}: {message}");
    }
    assert_eq!(server.snapshot()?, before);
    // The control: the same bytes with the id intact apply.
    let (status, _) = post_exchange(&server, Some(HUB), good).await?;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(server.snapshot()?, before);
    server.stop().await
}

// ---------------------------------------------------------------------------------------
// Serving rules, methods and paths
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn serve_refuses_an_open_node_on_a_non_loopback_address() -> TestResult {
    let engine = Arc::new(SyncEngine::in_memory()?);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let addr = listener.local_addr()?;
    let served = serve(engine.clone(), listener, ServerConfig::default(), async {}).await;
    match served {
        Err(ServeError::OpenOnPublicAddress { addr: refused }) => assert_eq!(refused, addr),
        other => panic!("expected OpenOnPublicAddress, got {other:?}"),
    }
    // With tokens the same address is served (here: until the at-once shutdown); without
    // TLS only when clear-text tokens are accepted explicitly (tests/tls.rs checks the rule).
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let config = ServerConfig {
        access: tokens(),
        insecure_http: true,
        ..ServerConfig::default()
    };
    serve(engine, listener, config, async {}).await?;
    Ok(())
}

#[tokio::test]
async fn malformed_percent_escapes_in_keys_and_queries_get_400() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let before = server.snapshot()?;
    let auth = [format!("Authorization: Bearer {HUB}")];
    let with_body = [auth[0].clone(), "Content-Length: 1".to_owned()];
    for (method, path) in [
        ("PUT", "/v1/records/shared/%G1"),
        ("PUT", "/v1/records/shared/a%"),
        ("PUT", "/v1/records/shared/%4"),
        ("PUT", "/v1/records/shared/%%41"),
        ("PUT", "/v1/files/shared/x%zz"),
        ("GET", "/v1/records/shared/%G1"),
        ("GET", "/v1/records/shared?prefix=%G1"),
        ("GET", "/v1/records/shared?after=a%"),
        ("GET", "/v1/records/shared?li%mit=1"),
        ("GET", "/v1/sync/watch?since=%"),
    ] {
        let extra = if method == "PUT" {
            &with_body[..]
        } else {
            &auth[..]
        };
        let resp = raw(server.addr, &head(method, path, None, extra), b"v").await?;
        assert_eq!(resp.status, 400, "{method} {path}: {}", resp.error());
        assert!(
            resp.error().contains("malformed percent-escape"),
            "{method} {path}: {}",
            resp.error()
        );
    }
    assert_eq!(server.snapshot()?, before);
    // A well-formed escape of a literal % is a key like any other.
    let resp = raw(
        server.addr,
        &head("PUT", "/v1/records/shared/100%25", None, &with_body),
        b"v",
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.error());
    let stored = server.engine.get(&Scope::shared(), &key("100%"))?;
    assert_eq!(stored.map(|r| r.value), Some(b"v".to_vec()));
    server.stop().await
}

#[tokio::test]
async fn wrong_methods_get_405_with_allow_and_unknown_paths_404() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    let before = server.snapshot()?;
    let blob = format!("/v1/blobs/{}", Hash::of(b"x"));
    for (method, path, allow) in [
        ("GET", "/v1/sync/exchange", "POST"),
        ("PUT", "/v1/sync/exchange", "POST"),
        ("POST", "/v1/sync/watch", "GET"),
        ("DELETE", blob.as_str(), "HEAD, GET, PUT"),
        ("POST", "/v1/records/shared/k", "GET, PUT, DELETE"),
        ("PUT", "/v1/records/shared", "GET"),
        ("DELETE", "/v1/files/shared/k", "GET, PUT"),
        ("POST", "/v1/status", "GET"),
    ] {
        let resp = raw(server.addr, &head(method, path, Some(HUB), &[]), b"").await?;
        assert_eq!(resp.status, 405, "{method} {path}");
        assert_eq!(resp.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(resp.json()?["code"], "method_not_allowed");
    }
    for path in [
        "/",
        "/v1",
        "/v1/",
        "/v2/status",
        "/v1/nope",
        "/v1/sync",
        "/v1/status/x",
    ] {
        let resp = raw(server.addr, &head("GET", path, Some(HUB), &[]), b"").await?;
        assert_eq!(resp.status, 404, "{path}");
        assert_eq!(resp.json()?["code"], "not_found");
    }
    assert_eq!(server.snapshot()?, before);
    server.stop().await
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

fn refused_code(result: Result<impl std::fmt::Debug, TransportError>) -> RefusalCode {
    match result {
        Err(TransportError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_client_maps_connection_refused_to_unreachable() -> TestResult {
    // A port that was just free: nothing listens there.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    drop(listener);
    let client = HttpTransport::new(&format!("http://{addr}"), None)?;
    let req = request(NodeId::random(), ScopeFilter::All, vec![]);
    assert!(matches!(
        client.exchange(req).await,
        Err(TransportError::Unreachable { .. })
    ));
    assert!(matches!(
        client.blobs_present(vec![Hash::of(b"x")]).await,
        Err(TransportError::Unreachable { .. })
    ));
    assert!(matches!(
        client.watch(None, None, Duration::from_secs(1)).await,
        Err(TransportError::Unreachable { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn the_client_maps_refusals_to_their_codes() -> TestResult {
    let server = protected(ServerConfig {
        max_exchange_body: 256,
        ..ServerConfig::default()
    })
    .await?;
    let peer = NodeId::random();
    let small = request(peer, ScopeFilter::All, vec![]);

    let anonymous = server.client(None)?;
    assert_eq!(
        refused_code(anonymous.exchange(small.clone()).await),
        RefusalCode::Unauthorized
    );
    let wrong = server.client(Some("not-a-token-of-this-node"))?;
    assert_eq!(
        refused_code(wrong.watch(None, None, Duration::from_secs(1)).await),
        RefusalCode::Unauthorized
    );

    let app_a = server.client(Some(APP_A))?;
    let other_app = request(peer, ScopeFilter::Only(BTreeSet::from([app("b")])), vec![]);
    match app_a.exchange(other_app).await {
        Err(TransportError::Refused { code, reason }) => {
            assert_eq!(code, RefusalCode::Forbidden);
            assert!(
                reason.contains("403") && reason.contains("app/b/t"),
                "{reason}"
            );
        }
        other => panic!("expected Forbidden, got {other:?}"),
    }

    let hub = server.client(Some(HUB))?;
    let times: Vec<u64> = (0..40).map(|i| at(-100 + i)).collect();
    let big = request(
        peer,
        ScopeFilter::All,
        vec![run(&Scope::shared(), peer, &times)],
    );
    assert!(wire::encode(&big).len() > 256);
    assert_eq!(refused_code(hub.exchange(big).await), RefusalCode::TooLarge);

    // A blob upload whose bytes do not match is BadRequest; nothing was learned of the peer.
    let blob = BlobRef {
        hash: Hash::of(b"right"),
        size: 5,
    };
    let wrong_bytes = Box::new(std::io::Cursor::new(b"wrong".to_vec()));
    assert_eq!(
        refused_code(hub.push_blob(blob, wrong_bytes).await),
        RefusalCode::BadRequest
    );
    assert_eq!(hub.peer_id(), None);
    server.stop().await
}

/// A hand-written hyper server that answers every request with `status` and `body`, and
/// counts the requests.
struct Fake {
    url: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    async fn start(status: StatusCode, body: Vec<Bytes>) -> TestResult<Fake> {
        Fake::start_reading(status, body, Duration::ZERO).await
    }

    /// A fake that reads request bodies one frame per `pause`, like a slow link.
    async fn start_reading(
        status: StatusCode,
        body: Vec<Bytes>,
        pause: Duration,
    ) -> TestResult<Fake> {
        use hyper::body::Incoming;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = count.clone();
                let body = body.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    // Answers in turn, the last one from then on.
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let answer = body[n.min(body.len() - 1)].clone();
                    async move {
                        let mut incoming = req.into_body();
                        while let Some(Ok(_)) = incoming.frame().await {
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                        }
                        let mut resp = hyper::Response::new(Full::new(answer));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Fake {
            url,
            requests,
            task,
        })
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn the_client_reports_garbage_as_a_bad_response() -> TestResult {
    let fake = Fake::start(
        StatusCode::OK,
        vec![Bytes::from_static(b"<html>hello</html>")],
    )
    .await?;
    let client = HttpTransport::new(&fake.url, None)?;
    let req = request(NodeId::random(), ScopeFilter::All, vec![]);
    assert!(matches!(
        client.exchange(req.clone()).await,
        Err(TransportError::BadResponse(_))
    ));
    assert!(matches!(
        client.watch(None, None, Duration::from_secs(1)).await,
        Err(TransportError::BadResponse(_))
    ));
    // A well-formed envelope of the wrong kind (a request) is no response either.
    let fake = Fake::start(StatusCode::OK, vec![Bytes::from(wire::encode(&req))]).await?;
    let client = HttpTransport::new(&fake.url, None)?;
    assert!(matches!(
        client.exchange(req).await,
        Err(TransportError::BadResponse(_))
    ));
    assert_eq!(
        client.peer_id(),
        None,
        "nothing learned from a bad response"
    );
    Ok(())
}

#[tokio::test]
async fn the_client_retries_nothing() -> TestResult {
    for status in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::REQUEST_TIMEOUT,
    ] {
        let body = Bytes::from_static(br#"{"error":"try later","code":"unavailable"}"#);
        let fake = Fake::start(status, vec![body]).await?;
        let client = HttpTransport::new(&fake.url, None)?;
        let hash = Hash::of(b"x");
        let blob = BlobRef { hash, size: 1 };
        let req = request(NodeId::random(), ScopeFilter::All, vec![]);

        let mut sink = Vec::new();
        let calls: Vec<(&str, RefusalCode)> = vec![
            ("exchange", refused_code(client.exchange(req).await)),
            (
                "present",
                refused_code(client.blobs_present(vec![hash]).await),
            ),
            (
                "fetch",
                refused_code(client.fetch_blob(blob, &mut sink).await),
            ),
            (
                "push",
                refused_code(
                    client
                        .push_blob(blob, Box::new(std::io::Cursor::new(b"x".to_vec())))
                        .await,
                ),
            ),
            (
                "watch",
                refused_code(client.watch(None, None, Duration::from_secs(1)).await),
            ),
        ];
        let expected = match status {
            StatusCode::TOO_MANY_REQUESTS => RefusalCode::Busy,
            StatusCode::INTERNAL_SERVER_ERROR => RefusalCode::Internal,
            _ => RefusalCode::Unavailable,
        };
        for (what, code) in &calls {
            assert_eq!(*code, expected, "{status} on {what}");
        }
        assert_eq!(
            fake.requests(),
            calls.len(),
            "one request per call on {status}"
        );
        assert!(sink.is_empty());
    }
    Ok(())
}

#[tokio::test]
async fn the_client_learns_its_peer_and_then_expects_it() -> TestResult {
    let (x, y) = (NodeId::random(), NodeId::random());
    let answer = |from| {
        Bytes::from(wire::encode(&ExchangeResponse {
            from,
            marks: ResponseMarks::Full(ScopedWatermarks::new()),
            page: Page::default(),
            halts: Vec::new(),
            ext: Default::default(),
        }))
    };
    // The node at the address answers as x, then (replaced behind our back) as y.
    let fake = Fake::start(StatusCode::OK, vec![answer(x), answer(y)]).await?;
    let client = HttpTransport::new(&fake.url, None)?;
    // The fake answers every path with an exchange's body: the engine must not ask it for a
    // streamed pull, whose body is framed.
    let engine = SyncEngine::in_memory_with(highwater::EngineConfig {
        pull_frames: 0,
        ..highwater::EngineConfig::default()
    })?;
    engine.exchange(&client).await?;
    assert_eq!(client.peer_id(), Some(x));
    match engine.exchange(&client).await {
        Err(HwError::Protocol(ProtocolError::UnexpectedPeer { expected, found })) => {
            assert_eq!((expected, found), (x, y))
        }
        other => panic!("expected UnexpectedPeer, got {other:?}"),
    }
    assert_eq!(client.peer_id(), Some(x));
    assert_eq!(fake.requests(), 2);
    Ok(())
}

#[tokio::test]
async fn a_blob_upload_may_outlast_the_request_timeout_while_it_moves() -> TestResult {
    // 2 MiB read by the peer at one 256 KiB chunk per 100 ms: about 0.8 s in all, longer
    // than the request timeout, but never idle for long.
    let fake = Fake::start_reading(
        StatusCode::OK,
        vec![Bytes::from_static(b"{}")],
        Duration::from_millis(100),
    )
    .await?;
    let config = ClientConfig {
        timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let client = HttpTransport::with_config(&fake.url, config)?;
    let size = 2u64 << 20;
    let blob = BlobRef {
        hash: Hash::of(b"not checked by the fake"),
        size,
    };
    let content = Box::new(std::io::Read::take(std::io::repeat(7), size));
    client.push_blob(blob, content).await?;
    assert_eq!(fake.requests(), 1);
    Ok(())
}

#[tokio::test]
async fn a_blob_upload_that_stops_moving_is_unreachable() -> TestResult {
    // The peer takes one frame, then nothing for an hour: the upload stalls once the
    // socket buffers are full, and the client gives up after its idle timeout.
    let fake = Fake::start_reading(
        StatusCode::OK,
        vec![Bytes::from_static(b"{}")],
        Duration::from_secs(3600),
    )
    .await?;
    let config = ClientConfig {
        timeout: Duration::from_secs(3600),
        idle_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    };
    let client = HttpTransport::with_config(&fake.url, config)?;
    let size = 64u64 << 20;
    let blob = BlobRef {
        hash: Hash::of(b"not checked by the fake"),
        size,
    };
    let content = Box::new(std::io::Read::take(std::io::repeat(7), size));
    let pushed = tokio::time::timeout(common::http::PROMPTLY, client.push_blob(blob, content))
        .await
        .map_err(|_| "the stalled upload was not given up")?;
    match pushed {
        Err(TransportError::Unreachable { reason }) => {
            assert!(reason.contains("stalled"), "{reason}")
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_page_over_max_page_versions_gets_413() -> TestResult {
    let server = protected(ServerConfig {
        max_page_versions: 3,
        ..ServerConfig::default()
    })
    .await?;
    let before = server.snapshot()?;
    let peer = NodeId::random();
    let times: Vec<u64> = (0..4).map(|i| at(-10 + i)).collect();
    let req = request(
        peer,
        ScopeFilter::All,
        vec![run(&Scope::shared(), peer, &times)],
    );
    let (status, body) = post_exchange(&server, Some(HUB), wire::encode(&req)).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        error_of(&body)?.1.contains("4 versions"),
        "{:?}",
        error_of(&body)
    );
    assert_eq!(server.snapshot()?, before);
    // Three are fine.
    let req = request(
        peer,
        ScopeFilter::All,
        vec![run(&Scope::shared(), peer, &times[..3])],
    );
    let (status, _) = post_exchange(&server, Some(HUB), wire::encode(&req)).await?;
    assert_eq!(status, StatusCode::OK);
    server.stop().await
}

/// Watches with `token` from `since` (none if empty), waiting at most `ms`; returns (news,
/// next token).
async fn watch(server: &Server, token: &str, since: &str, ms: u64) -> TestResult<(bool, String)> {
    let client = server.client(Some(token))?;
    let mut path = format!("/v1/sync/watch?timeout_ms={ms}");
    if !since.is_empty() {
        path.push_str(&format!("&since={since}"));
    }
    let (status, _, body) = call(&client, Method::GET, &path, Bytes::new()).await?;
    assert_eq!(status, StatusCode::OK, "{:?}", error_of(&body));
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let news = v["news"].as_bool().ok_or("no news")?;
    let next = v["token"].as_str().ok_or("no token")?.to_owned();
    Ok((news, next))
}

#[tokio::test]
async fn a_watch_has_news_only_for_scopes_its_token_reads() -> TestResult {
    let server = protected(ServerConfig::default()).await?;
    // No token yet: news at once, and the token to wait from.
    let (news, start) = watch(&server, APP_A, "", 60_000).await?;
    assert!(news);
    // A write to app B is no news to a token for app A: its watch runs to its timeout.
    server.engine.put(&app("b"), &key("b"), b"b".to_vec())?;
    let (news, _) = watch(&server, APP_A, &start, 200).await?;
    assert!(!news, "app B's write woke a watcher of app A");
    let (news, _) = watch(&server, HUB, &start, 60_000).await?;
    assert!(news, "the hub reads app B");
    // A write to app A is.
    server.engine.put(&app("a"), &key("a"), b"a".to_vec())?;
    let (news, next) = watch(&server, APP_A, &start, 60_000).await?;
    assert!(news);
    let (news, _) = watch(&server, APP_A, &next, 200).await?;
    assert!(!news, "nothing since the last token");

    // A token from another incarnation (the node restarted) is news at once.
    let other = SyncEngine::in_memory()?.notifier().token().to_string();
    let (news, _) = watch(&server, APP_A, &other, 60_000).await?;
    assert!(news);

    let client = server.client(Some(APP_A))?;
    for bad in [
        "since=",
        "since=nope",
        "timeout_ms=soon",
        "timeout_ms=-1",
        "other=1",
        "timeout_ms=1&timeout_ms=2",
        "watcher=",
        "watcher=not-hex",
    ] {
        let path = format!("/v1/sync/watch?{bad}");
        let (status, _, _) = call(&client, Method::GET, &path, Bytes::new()).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    server.stop().await
}
