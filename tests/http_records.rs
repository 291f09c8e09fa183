//! The records API end to end over real HTTP on loopback: records written and read with
//! their version headers, deletes, listing with pagination, keys of any bytes, files
//! streamed both ways, a Staged file, the status document, and what a read-only token may
//! do.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::http::{call, error_of, tokens, Server, APP_A, READER};
use common::rounds::TestResult;
use highwater::http::{encode_key, ServerConfig, HEADER_HLC, HEADER_ORIGIN, HEADER_RESIDENCY};
use highwater::testing::FaultyTransport;
use highwater::{Hash, Hlc, InProcess, Key, NodeId, Residency, Scope, SyncEngine};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use percent_encoding::percent_decode_str;

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

/// The path of a record (`records`) or file (`files`) of `scope`.
fn path(kind: &str, scope: &Scope, key: &Key) -> String {
    format!("/v1/{kind}/{scope}/{}", encode_key(key))
}

fn json(bytes: &[u8]) -> TestResult<serde_json::Value> {
    Ok(serde_json::from_slice(bytes)?)
}

/// `len` bytes that differ from one position to the next.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn header<'a>(headers: &'a hyper::HeaderMap, name: &str) -> TestResult<&'a str> {
    Ok(headers
        .get(name)
        .ok_or_else(|| format!("no {name} header"))?
        .to_str()?)
}

/// Parses the text form `<NTP64 decimal>/<origin hex>` field by field, and as an Hlc.
fn parse_hlc(text: &str) -> TestResult<Hlc> {
    let (time, origin) = text.split_once('/').ok_or("no '/' in the hlc")?;
    let time: u64 = time.parse()?;
    let origin: NodeId = origin.parse()?;
    let hlc: Hlc = text.parse()?;
    assert_eq!((hlc.time(), hlc.origin()), (time, origin));
    Ok(hlc)
}

#[tokio::test]
async fn a_record_written_over_http_reads_back_with_its_version() -> TestResult {
    let server = Server::start(ServerConfig::default()).await?;
    let client = server.client(None)?;
    let k = key("greeting");
    let (status, _, body) = call(
        &client,
        Method::PUT,
        &path("records", &notes(), &k),
        "hello",
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let written = json(&body)?;
    let hlc = parse_hlc(written["hlc"].as_str().ok_or("no hlc")?)?;
    assert_eq!(written["origin"], server.engine.node_id().to_string());

    let (status, headers, body) = call(
        &client,
        Method::GET,
        &path("records", &notes(), &k),
        Bytes::new(),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_ref(), b"hello");
    assert_eq!(parse_hlc(header(&headers, HEADER_HLC)?)?, hlc);
    assert_eq!(
        header(&headers, HEADER_ORIGIN)?,
        server.engine.node_id().to_string()
    );
    assert_eq!(header(&headers, HEADER_RESIDENCY)?, "resident");
    let stored = server
        .engine
        .get_version(&notes(), &k)?
        .ok_or("not stored")?;
    assert_eq!(stored.hlc, hlc);
    server.stop().await
}

#[tokio::test]
async fn absent_and_deleted_records_are_404() -> TestResult {
    let server = Server::start(ServerConfig::default()).await?;
    let client = server.client(None)?;
    let k = key("short-lived");
    let at = path("records", &Scope::shared(), &k);
    let (status, _, body) = call(&client, Method::GET, &at, Bytes::new()).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body)?.0, "not_found");

    call(&client, Method::PUT, &at, "v").await?;
    let (status, _, _) = call(&client, Method::GET, &at, Bytes::new()).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&client, Method::DELETE, &at, Bytes::new()).await?;
    assert_eq!(status, StatusCode::OK);
    let deleted = parse_hlc(json(&body)?["hlc"].as_str().ok_or("no hlc")?)?;

    let (status, _, _) = call(&client, Method::GET, &at, Bytes::new()).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        server.engine.residency(&Scope::shared(), &k)?,
        Residency::Tombstoned
    );
    let tombstone = server
        .engine
        .get_version(&Scope::shared(), &k)?
        .ok_or("no tombstone")?;
    assert_eq!(tombstone.hlc, deleted);
    let (_, _, list) = call(&client, Method::GET, "/v1/records/shared", Bytes::new()).await?;
    assert_eq!(json(&list)?["records"], serde_json::json!([]));
    server.stop().await
}

/// Lists `query` on `scope`: the keys (decoded) and `next_after`.
async fn list(
    client: &highwater::http::HttpTransport,
    scope: &Scope,
    query: &str,
) -> TestResult<(Vec<Vec<u8>>, Option<String>)> {
    let (status, _, body) = call(
        client,
        Method::GET,
        &format!("/v1/records/{scope}?{query}"),
        Bytes::new(),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{query}: {:?}", error_of(&body));
    let v = json(&body)?;
    let keys = v["records"]
        .as_array()
        .ok_or("no records")?
        .iter()
        .map(|r| {
            let encoded = r["key"].as_str().ok_or("no key")?;
            Ok(percent_decode_str(encoded).collect())
        })
        .collect::<TestResult<Vec<Vec<u8>>>>()?;
    let next = v["next_after"].as_str().map(str::to_owned);
    Ok((keys, next))
}

#[tokio::test]
async fn a_listing_pages_with_prefix_after_and_limit() -> TestResult {
    let server = Server::start(ServerConfig::default()).await?;
    let scope = notes();
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for i in 0..25 {
        let k = format!("item/{i:02}");
        server
            .engine
            .put(&scope, &key(&k), k.clone().into_bytes())?;
        expected.push(k.into_bytes());
    }
    server.engine.put(&scope, &key("other"), b"x".to_vec())?;
    server
        .engine
        .put(&scope, &key("item/gone"), b"x".to_vec())?;
    server.engine.delete(&scope, &key("item/gone"))?;
    let client = server.client(None)?;

    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut query = "prefix=item%2F&limit=10".to_owned();
    let mut pages = Vec::new();
    loop {
        let (keys, next) = list(&client, &scope, &query).await?;
        pages.push(keys.len());
        seen.extend(keys);
        match next {
            // The cursor goes back as it came: already percent-encoded.
            Some(after) => query = format!("prefix=item%2F&limit=10&after={after}"),
            None => break,
        }
    }
    assert_eq!(pages, vec![10, 10, 5]);
    assert_eq!(seen, expected);

    // The default lists everything live (26 keys, under the default limit of 100).
    let (all, next) = list(&client, &scope, "").await?;
    assert_eq!((all.len(), next), (26, None));
    let (after, _) = list(&client, &scope, "after=item%2F23").await?;
    assert_eq!(after, vec![b"item/24".to_vec(), b"other".to_vec()]);

    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "nope=1",
        "limit=1&limit=2",
    ] {
        let (status, _, _) = call(
            &client,
            Method::GET,
            &format!("/v1/records/{scope}?{bad}"),
            Bytes::new(),
        )
        .await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    server.stop().await
}

#[tokio::test]
async fn keys_with_slashes_spaces_and_non_utf8_bytes_round_trip() -> TestResult {
    let server = Server::start(ServerConfig::default()).await?;
    let client = server.client(None)?;
    let keys: Vec<Key> = vec![
        Key::new(b"a/b c".to_vec())?,
        Key::new(vec![0xff, 0x00, b'z'])?,
        Key::new("ünï/cödé?&=#%".as_bytes().to_vec())?,
        Key::new(b"..".to_vec())?,
    ];
    for (i, k) in keys.iter().enumerate() {
        let value = format!("value {i}");
        let at = path("records", &Scope::shared(), k);
        let (status, _, _) = call(&client, Method::PUT, &at, value.clone()).await?;
        assert_eq!(status, StatusCode::OK, "{at}");
        let stored = server
            .engine
            .get(&Scope::shared(), k)?
            .ok_or("not stored")?;
        assert_eq!(stored.value, value.as_bytes(), "{at}");
        let (_, _, body) = call(&client, Method::GET, &at, Bytes::new()).await?;
        assert_eq!(body.as_ref(), value.as_bytes());
    }
    // Written by hand: '/' as %2F and a space as %20 are one key.
    let (_, _, body) = call(
        &client,
        Method::GET,
        "/v1/records/shared/a%2Fb%20c",
        Bytes::new(),
    )
    .await?;
    assert_eq!(body.as_ref(), b"value 0");
    let (listed, _) = list(&client, &Scope::shared(), "").await?;
    let mut expected: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    expected.sort();
    assert_eq!(listed, expected);
    // A prefix of raw bytes.
    let (listed, _) = list(&client, &Scope::shared(), "prefix=%FF").await?;
    assert_eq!(listed, vec![vec![0xff, 0x00, b'z']]);
    server.stop().await
}

#[tokio::test]
async fn files_stream_in_and_out_byte_for_byte() -> TestResult {
    let server = Server::start(ServerConfig::default()).await?;
    let client = server.client(None)?;
    let bytes = content(3 << 20);
    let hash = Hash::of(&bytes);

    // With a declared length.
    let photo = key("photo");
    let (status, _, body) = call(
        &client,
        Method::PUT,
        &path("files", &notes(), &photo),
        bytes.clone(),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{:?}", error_of(&body));
    let answer = json(&body)?;
    assert_eq!(answer["hash"], hash.to_string());
    assert_eq!(answer["size"], bytes.len());
    // Chunked, of unknown length, in pieces of 64 KiB.
    let chunked = key("photo copy");
    let pieces: Vec<Result<Frame<Bytes>, std::io::Error>> = bytes
        .chunks(64 << 10)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let stream = StreamBody::new(futures_util::stream::iter(pieces)).boxed();
    let resp = client
        .call(
            Method::PUT,
            &path("files", &notes(), &chunked),
            stream,
            None,
        )
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let answer = json(&resp.into_body().collect().await?.to_bytes())?;
    assert_eq!(answer["hash"], hash.to_string());

    for k in [&photo, &chunked] {
        let (status, headers, body) = call(
            &client,
            Method::GET,
            &path("files", &notes(), k),
            Bytes::new(),
        )
        .await?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header(&headers, "content-length")?, bytes.len().to_string());
        assert_eq!(header(&headers, "etag")?, format!("\"{hash}\""));
        assert_eq!(header(&headers, HEADER_RESIDENCY)?, "resident");
        assert!(body.as_ref() == bytes.as_slice(), "the file's bytes differ");
        // The record itself: an empty value, Resident.
        let (status, headers, body) = call(
            &client,
            Method::GET,
            &path("records", &notes(), k),
            Bytes::new(),
        )
        .await?;
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        assert_eq!(header(&headers, HEADER_RESIDENCY)?, "resident");
    }
    // One blob for both records.
    assert_eq!(
        server.engine.blob_store().list()?,
        vec![(hash, bytes.len() as u64)]
    );
    // A record without a file has no file to get.
    server.engine.put(&notes(), &key("plain"), b"v".to_vec())?;
    let (status, _, body) = call(
        &client,
        Method::GET,
        &path("files", &notes(), &key("plain")),
        Bytes::new(),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body)?.1.contains("no file"));
    server.stop().await
}

/// A served node B that learned from C a record whose file failed to arrive (Staged), and
/// then wrote a record of its own that C lacks.
struct StagedWorld {
    b: Server,
    c: Arc<SyncEngine>,
    file: Key,
    started_ms: u64,
}

fn unix_ms() -> TestResult<u64> {
    Ok(u64::try_from(
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis(),
    )?)
}

async fn staged_world() -> TestResult<StagedWorld> {
    let b = Server::start(ServerConfig::default()).await?;
    let c = Arc::new(SyncEngine::in_memory()?);
    let file = key("report.pdf");
    let bytes = content(100_000);
    c.put_file_bytes(&notes(), &file, b"meta".to_vec(), &bytes)?;
    c.put(&notes(), &key("note"), b"from c".to_vec())?;
    let started_ms = unix_ms()?;
    let to_c = FaultyTransport::new(InProcess::new(c.clone()));
    to_c.fail(Hash::of(&bytes));
    let out = b.engine.exchange(&to_c).await?;
    assert!(out.halts.iter().any(|h| h.origin == c.node_id()));
    assert_eq!(b.engine.residency(&notes(), &file)?, Residency::Staged);
    b.engine
        .put(&Scope::shared(), &key("mine"), b"from b".to_vec())?;
    Ok(StagedWorld {
        b,
        c,
        file,
        started_ms,
    })
}

#[tokio::test]
async fn a_staged_file_is_503_with_its_residency() -> TestResult {
    let w = staged_world().await?;
    let client = w.b.client(None)?;
    let (status, headers, body) = call(
        &client,
        Method::GET,
        &path("files", &notes(), &w.file),
        Bytes::new(),
    )
    .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&headers, HEADER_RESIDENCY)?, "staged");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(header(&headers, HEADER_ORIGIN)?, w.c.node_id().to_string());
    assert_eq!(error_of(&body)?.0, "unavailable");
    // The record itself reads, Staged.
    let (status, headers, body) = call(
        &client,
        Method::GET,
        &path("records", &notes(), &w.file),
        Bytes::new(),
    )
    .await?;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"meta"[..]));
    assert_eq!(header(&headers, HEADER_RESIDENCY)?, "staged");
    let (_, _, body) = call(
        &client,
        Method::GET,
        "/v1/records/app/notes/items",
        Bytes::new(),
    )
    .await?;
    let listed = json(&body)?;
    let row = listed["records"]
        .as_array()
        .ok_or("no records")?
        .iter()
        .find(|r| r["key"] == "report.pdf")
        .ok_or("the staged record is not listed")?
        .clone();
    assert_eq!(row["residency"], "staged");
    assert_eq!(row["file"]["size"], 100_000);
    w.b.stop().await
}

#[tokio::test]
async fn the_status_document_reports_node_scopes_peers_and_blobs() -> TestResult {
    let w = staged_world().await?;
    let b = &w.b.engine;
    let client = w.b.client(None)?;
    let (status, _, body) = call(&client, Method::GET, "/v1/status", Bytes::new()).await?;
    assert_eq!(status, StatusCode::OK);
    let s = json(&body)?;
    assert_eq!(s["node"], b.node_id().to_string());

    // Per scope: every watermark, and residency counts.
    let marks = b.watermarks()?;
    let scopes = s["scopes"].as_object().ok_or("no scopes")?;
    assert_eq!(scopes.len(), 2);
    for (scope, w_scope) in marks.iter() {
        let entry = &scopes[scope.as_str()];
        let expected: BTreeMap<String, String> = w_scope
            .iter()
            .map(|h| (h.origin().to_string(), h.to_string()))
            .collect();
        let reported: BTreeMap<String, String> =
            serde_json::from_value(entry["watermarks"].clone())?;
        assert_eq!(reported, expected, "{scope}");
        let counts = b.residency_counts(scope)?;
        assert_eq!(entry["residency"]["resident"], counts.resident);
        assert_eq!(entry["residency"]["staged"], counts.staged);
        assert_eq!(entry["residency"]["tombstoned"], counts.tombstoned);
    }
    assert_eq!(scopes["app/notes/items"]["residency"]["staged"], 1);
    assert_eq!(scopes["app/notes/items"]["residency"]["resident"], 1);

    // The peer: when it last completed a round, and what it lacks (B's own write).
    let peers = s["peers"].as_array().ok_or("no peers")?;
    assert_eq!(peers.len(), 1);
    let peer = &peers[0];
    assert_eq!(peer["id"], w.c.node_id().to_string());
    let last = peer["last_exchange_unix_ms"]
        .as_u64()
        .ok_or("no last exchange")?;
    assert!((w.started_ms..=unix_ms()?).contains(&last), "{last}");
    let lacks = peer["lacks"].as_array().ok_or("no lacks")?;
    assert_eq!(lacks.len(), 1, "{lacks:?}");
    let lack = &lacks[0];
    assert_eq!(lack["scope"], "shared");
    assert_eq!(lack["origin"], b.node_id().to_string());
    let ours = marks
        .get(&Scope::shared(), b.node_id())
        .ok_or("no own mark")?;
    assert_eq!(lack["ours"], ours.to_string());
    assert_eq!(lack["theirs"], serde_json::Value::Null);

    // Blobs: none here (the only file is Staged).
    let blobs = b.blob_store().list()?;
    assert_eq!(s["blobs"]["count"], blobs.len());
    assert_eq!(
        s["blobs"]["bytes"],
        blobs.iter().map(|(_, n)| n).sum::<u64>()
    );
    // Once the file arrives, it counts.
    b.exchange(&InProcess::new(w.c.clone())).await?;
    let (_, _, body) = call(&client, Method::GET, "/v1/status", Bytes::new()).await?;
    let s = json(&body)?;
    assert_eq!(s["blobs"]["count"], 1);
    assert_eq!(s["blobs"]["bytes"], 100_000);
    assert_eq!(s["scopes"]["app/notes/items"]["residency"]["staged"], 0);
    assert_eq!(s["peers"][0]["lacks"], serde_json::json!([]));
    w.b.stop().await
}

#[tokio::test]
async fn a_read_only_token_reads_but_does_not_write() -> TestResult {
    let server = Server::start(ServerConfig {
        access: tokens(),
        ..ServerConfig::default()
    })
    .await?;
    let e = &server.engine;
    e.put(&notes(), &key("k"), b"v".to_vec())?;
    e.put(&Scope::app("a", "t")?, &key("a"), b"a".to_vec())?;
    let before = server.snapshot()?;
    let reader = server.client(Some(READER))?;
    let record = path("records", &notes(), &key("k"));

    let (status, _, body) = call(&reader, Method::GET, &record, Bytes::new()).await?;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"v"[..]));
    let (status, _, _) = call(
        &reader,
        Method::GET,
        "/v1/records/app/notes/items",
        Bytes::new(),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&reader, Method::GET, "/v1/status", Bytes::new()).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)?["scopes"].as_object().map(|o| o.len()), Some(2));

    for (method, at) in [
        (Method::PUT, record.clone()),
        (Method::DELETE, record.clone()),
        (Method::PUT, path("files", &notes(), &key("f"))),
        (Method::POST, "/v1/sync/exchange".to_owned()),
        (Method::GET, "/v1/sync/watch?timeout_ms=0".to_owned()),
        (Method::PUT, format!("/v1/blobs/{}", Hash::of(b"new value"))),
        (Method::GET, format!("/v1/blobs/{}", Hash::of(b"new value"))),
    ] {
        let (status, _, body) = call(&reader, method.clone(), &at, "new value").await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {at}");
        assert_eq!(error_of(&body)?.0, "forbidden");
    }
    assert_eq!(server.snapshot()?, before);

    // A token for one app sees only that app in the status document.
    let app_a = server.client(Some(APP_A))?;
    let (_, _, body) = call(&app_a, Method::GET, "/v1/status", Bytes::new()).await?;
    let scopes: Vec<String> = json(&body)?["scopes"]
        .as_object()
        .ok_or("no scopes")?
        .keys()
        .cloned()
        .collect();
    assert_eq!(scopes, vec!["app/a/t".to_owned()]);
    server.stop().await
}
