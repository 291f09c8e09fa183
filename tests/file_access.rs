//! Access per file on a node with tokens: a blob is served to a token only if a record in a
//! scope it may read refers to it, or it uploaded the blob itself a short while ago; a record
//! pushed by a token may refer only to such a blob. Knowing a file's hash gives nothing.

mod common;

use std::io::Read;

use common::http::{call, error_of, tokens, Server, APP_A, HUB};
use highwater::error::{RefusalCode, TransportError};
use highwater::exchange::{Page, Run};
use highwater::http::ServerConfig;
use highwater::wire::{AuditRequest, ExchangeRequest, RequestMarks, ScopeFilter};
use highwater::{
    BlobRef, Hash, Hlc, Key, NodeId, Op, Scope, ScopedWatermarks, SyncEngine, Transport, Version,
};
use hyper::{Method, StatusCode};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const SECRET: &[u8] = b"the shared plans, which app a may not read";
const MINE: &[u8] = b"app a's own attachment";

fn app_a() -> Scope {
    Scope::app("a", "t").expect("a valid scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

fn blob_of(content: &[u8]) -> BlobRef {
    BlobRef {
        hash: Hash::of(content),
        size: content.len() as u64,
    }
}

/// A node with tokens holding a `shared` file and an `app/a/t` file.
async fn hub() -> TestResult<Server> {
    let server = Server::start(ServerConfig {
        access: tokens(),
        ..ServerConfig::default()
    })
    .await?;
    let e = &server.engine;
    e.put_file_bytes(&Scope::shared(), &key("plans"), b"meta".to_vec(), SECRET)?;
    e.put_file_bytes(&app_a(), &key("mine"), b"meta".to_vec(), MINE)?;
    Ok(server)
}

/// An exchange request from `from` pushing one `app/a/t` record that points at `blob`.
fn push_pointing_at(from: NodeId, now: u64, blob: BlobRef) -> ExchangeRequest {
    let hlc = Hlc::new(now, from);
    let version = Version {
        hlc,
        op: Op::Put {
            value: b"look what I found".to_vec(),
            blob: Some(blob),
        },
    };
    let mut marks = ScopedWatermarks::new();
    marks.observe(&app_a(), hlc);
    ExchangeRequest {
        from,
        scopes: ScopeFilter::Only([app_a()].into_iter().collect()),
        marks: RequestMarks::Full(marks),
        known: None,
        page: Page {
            runs: vec![Run {
                scope: app_a(),
                origin: from,
                base: None,
                top: hlc,
                versions: vec![(key("stolen"), version)],
            }],
            more: false,
        },
        limit: 1000,
        deferred: Vec::new(),
        ext: Default::default(),
    }
}

/// The bytes of the file under `key`, if it is stored whole.
fn file(engine: &SyncEngine, scope: &Scope, key: &Key) -> TestResult<Option<Vec<u8>>> {
    let Some((_, mut reader)) = engine.open_file(scope, key)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

fn refused_code(e: &TransportError) -> Option<RefusalCode> {
    match e {
        TransportError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn a_token_reads_the_blobs_its_scopes_refer_to_and_no_others() -> TestResult {
    let server = hub().await?;
    let app = server.client(Some(APP_A))?;
    let secret = blob_of(SECRET).hash;
    let mine = blob_of(MINE).hash;
    let absent = Hash::of(b"stored nowhere");

    let (status, _, body) = call(&app, Method::GET, &format!("/v1/blobs/{mine}"), "").await?;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, MINE));

    // The shared file answers exactly as a hash stored nowhere does: 404, same words.
    let (status, _, hidden) = call(&app, Method::GET, &format!("/v1/blobs/{secret}"), "").await?;
    let (absent_status, _, missing) =
        call(&app, Method::GET, &format!("/v1/blobs/{absent}"), "").await?;
    assert_eq!(
        (status, absent_status),
        (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND)
    );
    let (hidden_code, hidden_text) = error_of(&hidden)?;
    let (missing_code, missing_text) = error_of(&missing)?;
    assert_eq!(hidden_code, missing_code);
    assert_eq!(
        hidden_text.replace(&secret.to_string(), "H"),
        missing_text.replace(&absent.to_string(), "H")
    );
    let (status, _, _) = call(&app, Method::HEAD, &format!("/v1/blobs/{secret}"), "").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(app.blobs_present(vec![mine, secret]).await?, [true, false]);

    // A token that reads every scope gets it.
    let all = server.client(Some(HUB))?;
    let (status, _, body) = call(&all, Method::GET, &format!("/v1/blobs/{secret}"), "").await?;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, SECRET));
    server.stop().await
}

#[tokio::test]
async fn a_pushed_record_cannot_claim_a_file_its_token_may_not_read() -> TestResult {
    let server = hub().await?;
    let app = server.client(Some(APP_A))?;
    let before = server.snapshot()?;
    let from = NodeId::random();
    let now = server.engine.clock_time();

    // In an exchange's page.
    let refused = app
        .exchange(push_pointing_at(from, now, blob_of(SECRET)))
        .await
        .expect_err("a record pointing at a blob the token may not read");
    assert_eq!(refused_code(&refused), Some(RefusalCode::Forbidden));
    let text = refused.to_string();
    assert!(text.contains(&blob_of(SECRET).hash.to_string()), "{text}");

    // And in an audit's versions.
    let pushed = push_pointing_at(from, now, blob_of(SECRET));
    let audit = AuditRequest {
        from,
        scopes: pushed.scopes.clone(),
        opening: true,
        segments: Vec::new(),
        versions: vec![(app_a(), pushed.page.runs[0].versions.clone())],
        wanted: Vec::new(),
        ext: Default::default(),
    };
    let refused = app
        .audit(audit)
        .await
        .expect_err("the same record in an audit");
    assert_eq!(refused_code(&refused), Some(RefusalCode::Forbidden));

    // Nothing was stored, so nothing can be read back through the records API.
    assert_eq!(server.snapshot()?, before);
    let all = server.client(Some(HUB))?;
    let (status, _, _) = call(&all, Method::GET, "/v1/files/app/a/t/stolen", "").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Pointing at a blob the token may read is fine: it is the token's own scope's file.
    let answered = app
        .exchange(push_pointing_at(from, now, blob_of(MINE)))
        .await?;
    assert!(answered.halts.is_empty(), "{:?}", answered.halts);
    let (status, _, body) = call(&all, Method::GET, "/v1/files/app/a/t/stolen", "").await?;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, MINE));
    server.stop().await
}

#[tokio::test]
async fn an_uploader_may_refer_to_and_read_back_what_it_uploaded() -> TestResult {
    let server = hub().await?;
    let app = server.client(Some(APP_A))?;
    let secret = blob_of(SECRET);

    // Uploading the bytes proves the token holds them: then it may read them back, and a
    // record of its own may point at them, although the same content is also `shared`.
    app.push_blob(secret, Box::new(std::io::Cursor::new(SECRET)))
        .await?;
    let (status, _, body) =
        call(&app, Method::GET, &format!("/v1/blobs/{}", secret.hash), "").await?;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, SECRET));
    let from = NodeId::random();
    let answered = app
        .exchange(push_pointing_at(from, server.engine.clock_time(), secret))
        .await?;
    assert!(answered.halts.is_empty(), "{:?}", answered.halts);
    let got = file(&server.engine, &app_a(), &key("stolen"))?;
    assert_eq!(got.as_deref(), Some(SECRET));

    // A wrong upload proves nothing and grants nothing.
    let other = blob_of(b"some other content the token does not hold");
    let forged = app
        .push_blob(other, Box::new(std::io::Cursor::new(&b"not it"[..])))
        .await;
    assert!(forged.is_err());
    let (status, _, _) = call(&app, Method::GET, &format!("/v1/blobs/{}", other.hash), "").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await
}

/// The honest case the rule must not break: a device of app a holds a file whose content
/// the hub also holds under a scope the device may not read. The device's round uploads it
/// (the hub says it lacks it) and its record arrives whole.
#[tokio::test]
async fn a_device_syncs_a_file_whose_content_the_hub_holds_elsewhere() -> TestResult {
    let server = hub().await?;
    let dir = tempfile::tempdir()?;
    let device = SyncEngine::open(dir.path())?;
    device.put_file_bytes(&app_a(), &key("copy"), b"meta".to_vec(), SECRET)?;
    let transport = server.client(Some(APP_A))?;
    loop {
        let out = device.exchange(&transport).await?;
        assert!(out.halts.is_empty() && out.peer_halts.is_empty(), "{out:?}");
        if !out.has_more {
            break;
        }
    }
    let got = file(&server.engine, &app_a(), &key("copy"))?;
    assert_eq!(got.as_deref(), Some(SECRET));
    // And the device got the hub's file of its scope, and not the shared one.
    let mine = file(&device, &app_a(), &key("mine"))?;
    assert_eq!(mine.as_deref(), Some(MINE));
    assert!(device.get(&Scope::shared(), &key("plans"))?.is_none());
    server.stop().await
}
