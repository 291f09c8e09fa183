//! A streamed push answered before its body ended. The client sends frames until it reads an
//! answer; a server that answers early and closes with the body unread resets the connection,
//! and the client, still writing, may see a broken pipe instead of the answer (a CI run saw
//! `Unreachable` where a 404 was due, and the round failed instead of going on in rounds).
//! So: a client opens a push only to a node whose answers offer pushes (`x-highwater-push`),
//! and our server, answering early, reads and discards the rest of the body while its answer
//! goes out, and keeps the connection.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::rounds::TestResult;
use common::streams::{push_node as node, push_scopes as scopes, serve_counted};
use highwater::error::{Error, TransportError};
use highwater::http::{Access, HighwaterService, HttpTransport, ServerConfig};
use highwater::transport::RefusalCode;
use highwater::{ExchangeOptions, Key, ManualTime, SyncEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Versions the device writes: half in each of two scopes.
const VERSIONS: usize = 1200;
/// The page limit of the rounds here: 30 pages.
const PAGE: usize = 40;
/// Each version's value: a page is 640 KiB and the transfer 19 MiB, far more than what is
/// in flight when the server answers, so the client is still sending then.
const VALUE: usize = 16 << 10;
/// Times the mid-stream refusal is tried: with the server closing on its early answer (the
/// drain turned off), about one try in ten saw a broken pipe instead, and 19 runs of this
/// test in 20 failed.
const ATTEMPTS: usize = 40;
/// How long a test waits for what it expects before calling it a hang.
const WAIT: Duration = Duration::from_secs(20);

fn options() -> ExchangeOptions {
    ExchangeOptions {
        page_limit: Some(PAGE),
        ..ExchangeOptions::default()
    }
}

/// A device with [`VERSIONS`] local writes of [`VALUE`] bytes, half in each scope.
fn device(time: &Arc<ManualTime>) -> TestResult<Arc<SyncEngine>> {
    let device = node(time, 256)?;
    for scope in scopes()? {
        for i in 0..VERSIONS / 2 {
            let key = Key::try_from(format!("k{i:05}").as_str())?;
            let mut value = vec![b'v'; VALUE];
            value[..8].copy_from_slice(&(i as u64).to_be_bytes());
            device.put(&scope, &key, value)?;
        }
    }
    Ok(device)
}

/// Rounds from `device` over `client` until nothing is left; how many.
async fn rounds(device: &SyncEngine, client: &HttpTransport) -> TestResult<usize> {
    let mut n = 1;
    while device.exchange_with(client, &options()).await?.has_more {
        n += 1;
    }
    Ok(n)
}

/// A build without `/v1/sync/push` (404, no offer on its answers) is never sent a push: the
/// first round's answer said nothing of pushes, so every later round is a plain one, and no
/// round can fail on a broken pipe where the 404 was due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_offered_pushes_is_sent_none() -> TestResult {
    sent_no_push(256, Some("/v1/sync/push")).await
}

/// A build that has the endpoint but whose engine takes no pushes does not offer them: the
/// client opens none (it would be answered 404 and go on in rounds, one request more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_takes_no_pushes_is_sent_none() -> TestResult {
    sent_no_push(0, None).await
}

/// A device syncs everything to a hub taking `push_frames` (whose server answers 404 on
/// `missing`) in one request a round: first contact, then a round a page.
async fn sent_no_push(push_frames: u32, missing: Option<&'static str>) -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let hub = node(&time, push_frames)?;
    let sync = HighwaterService::new(hub.clone(), ServerConfig::default());
    let (url, requests) = serve_counted(sync, missing).await?;
    let device = device(&time)?;
    let client = HttpTransport::new(&url, None)?;
    let n = rounds(&device, &client).await?;
    assert_eq!(n, 1 + VERSIONS / PAGE);
    assert_eq!(requests.load(Ordering::Relaxed), n);
    assert_eq!(hub.digest()?, device.digest()?);
    Ok(())
}

/// A token that may write the notes and not the shared scope: the frame that first carries
/// the shared scope is refused mid-stream with 403 while the client is still sending frames,
/// and the client must read that 403 every time, never a broken pipe. The connection is then
/// still good: the next round on the same transport is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_refused_mid_stream_is_seen_every_time() -> TestResult {
    let [notes, shared] = scopes()?;
    for attempt in 0..ATTEMPTS {
        let time = Arc::new(ManualTime::new(1_000_000));
        let hub = node(&time, 256)?;
        let server = tokens(
            r#"{"name":"notes","token":"nnnnnnnnnnnnnnnn","read":["*"],
                "write":["app/notes/*"],"sync":true}"#,
        )?;
        let (url, requests) =
            serve_counted(HighwaterService::new(hub.clone(), server), None).await?;
        let device = device(&time)?;
        let client = HttpTransport::new(&url, Some("nnnnnnnnnnnnnnnn".to_owned()))?;
        let first = device.exchange_with(&client, &options()).await?;
        assert_eq!((first.shipped, first.has_more), (0, true), "{first:?}");
        let Err(e) = device.exchange_with(&client, &options()).await else {
            panic!("attempt {attempt}: a page the token may not write was taken");
        };
        let Error::Transport(TransportError::Refused { code, reason }) = &e else {
            panic!("attempt {attempt}: {e:?}");
        };
        assert_eq!(*code, RefusalCode::Forbidden, "attempt {attempt}: {reason}");
        assert!(reason.contains(&shared.to_string()), "{reason}");
        assert_eq!(hub.versions(&notes)?.len(), VERSIONS / 2);
        assert!(hub.versions(&shared)?.is_empty());
        // The transport is still good: the next round (plain, as the push was cut) goes
        // in one request and is answered.
        let before = requests.load(Ordering::Relaxed);
        device.exchange_with(&client, &options()).await?;
        assert_eq!(requests.load(Ordering::Relaxed), before + 1);
    }
    Ok(())
}

/// Serves `hub` with `server` through [`highwater::http::serve`] on loopback until the test
/// ends; its address.
async fn serve_real(hub: Arc<SyncEngine>, server: ServerConfig) -> TestResult<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(highwater::http::serve(
        hub,
        listener,
        server,
        std::future::pending(),
    ));
    Ok(addr)
}

/// A server configuration whose access file holds the one token `token` (its JSON).
fn tokens(token: &str) -> TestResult<ServerConfig> {
    let access = Access::from_json(&format!(r#"{{"tokens":[{token}]}}"#))?;
    Ok(ServerConfig {
        access: Arc::new(access),
        ..Default::default()
    })
}

/// Reads one response (headers and a `Content-Length` body) from `stream`, `buffered`
/// holding what was read past the one before; its status line.
async fn read_response(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> TestResult<String> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await??;
        if n == 0 {
            return Err("the connection closed before a response".into());
        }
        buffered.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffered[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .ok_or("a response without content-length")?
        .trim()
        .parse()?;
    while buffered.len() < head_end + length {
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await??;
        if n == 0 {
            return Err("the connection closed inside a response".into());
        }
        buffered.extend_from_slice(&chunk[..n]);
    }
    let status = head.lines().next().unwrap_or_default().to_owned();
    buffered.drain(..head_end + length);
    Ok(status)
}

/// Opens a chunked push on a raw connection, reads the answer the server gives before the
/// body's end (`expected`, say `401`), then sends 8 MiB more of the body and its end: every
/// write must go through, and the connection then answers a second request.
async fn answered_early_then_drained(
    addr: &str,
    token: Option<&str>,
    expected: &str,
) -> TestResult {
    const PIECE: usize = 64 << 10;
    let mut stream = TcpStream::connect(addr).await?;
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST /v1/sync/push HTTP/1.1\r\nhost: test\r\n{auth}transfer-encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    // Some of the body before the answer: the server has bytes it did not read.
    let mut chunk = format!("{PIECE:x}\r\n").into_bytes();
    chunk.resize(chunk.len() + PIECE, 0);
    chunk.extend_from_slice(b"\r\n");
    stream.write_all(&chunk).await?;
    let mut buffered = Vec::new();
    let status = read_response(&mut stream, &mut buffered).await?;
    assert!(status.contains(expected), "{status}");
    // The answer is in: the rest of the body still goes through (the server reads it), with
    // time for a reset to come back if the server had closed.
    for _ in 0..128 {
        tokio::time::timeout(WAIT, stream.write_all(&chunk))
            .await?
            .map_err(|e| format!("writing the body after the {expected}: {e}"))?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    // Drained to its end, the connection is kept for the next request.
    let again = format!("GET /v1/status HTTP/1.1\r\nhost: test\r\n{auth}\r\n");
    stream.write_all(again.as_bytes()).await?;
    let status = read_response(&mut stream, &mut buffered).await?;
    assert!(status.starts_with("http/1.1 "), "{status}");
    Ok(())
}

/// The server's early answers to an authenticated push (a token that may not sync: 403; a
/// node that takes no pushes: 404) go out at once, and the body is read to its end behind
/// them, so the client sees the answer and the connection stays usable. (A push without a
/// valid token gets its 401 and the connection ends, as any request's: tests/http_inputs.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_is_read_and_the_body_drained_behind_it() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let with_tokens = tokens(
        r#"{"name":"app","token":"aaaaaaaaaaaaaaaa","read":["*"],"write":["*"],"sync":false}"#,
    )?;
    let addr = serve_real(node(&time, 256)?, with_tokens).await?;
    answered_early_then_drained(&addr, Some("aaaaaaaaaaaaaaaa"), "403").await?;
    let addr = serve_real(node(&time, 0)?, ServerConfig::default()).await?;
    answered_early_then_drained(&addr, None, "404").await?;
    Ok(())
}

/// A push addressed to another node is answered at once (`elsewhere`, a 200 that takes none
/// of the frames) while the client is still sending them: the client must read that answer
/// every time (and refuse the node that gave it), never a broken pipe; the node that
/// answered applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_answered_at_once_is_read_every_time() -> TestResult {
    let time = Arc::new(ManualTime::new(1_000_000));
    let (hub, other) = (node(&time, 256)?, node(&time, 256)?);
    let (to_hub, _) =
        serve_counted(HighwaterService::new(hub.clone(), Default::default()), None).await?;
    let (to_other, requests) = serve_counted(
        HighwaterService::new(other.clone(), Default::default()),
        None,
    )
    .await?;
    for attempt in 0..ATTEMPTS {
        // A device that knows the hub's marks (a round that failed after a push goes plain:
        // each try needs a device of its own), and a fresh transport, which has heard no
        // answer yet: it tries a push, addressed to the hub, at the other node's address.
        let device = device(&time)?;
        let first = device
            .exchange_with(&HttpTransport::new(&to_hub, None)?, &options())
            .await?;
        assert_eq!((first.shipped, first.has_more), (0, true), "{first:?}");
        let client = HttpTransport::new(&to_other, None)?.expecting(hub.node_id());
        let Err(e) = device.exchange_with(&client, &options()).await else {
            panic!("attempt {attempt}: a push to the wrong node went through");
        };
        assert!(matches!(e, Error::Protocol(_)), "attempt {attempt}: {e:?}");
    }
    // One push a try, each answered at once.
    assert_eq!(requests.load(Ordering::Relaxed), ATTEMPTS);
    for scope in scopes()? {
        assert!(other.versions(&scope)?.is_empty());
    }
    Ok(())
}
