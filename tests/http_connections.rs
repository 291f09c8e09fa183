//! What `serve` does with connections: the cap (idle connections give way to new ones, busy
//! ones do not, and a connection with nowhere to go gets a 503), the header read timeout on
//! every request of a kept-alive connection and as its idle timeout, and the write timeout
//! that drops a client which stops reading a download.

mod common;

use std::time::{Duration, Instant};

use common::http::{head, Raw, Server, PROMPTLY};
use common::rounds::TestResult;
use highwater::http::ServerConfig;
use highwater::{Key, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

/// One `GET path` on `conn`, whose response must be `status`.
async fn get(conn: &mut Raw, path: &str, status: u16) -> TestResult<String> {
    conn.send(format!("{}\r\n\r\n", head("GET", path, None, &[])).as_bytes())
        .await?;
    let resp = conn.response().await?;
    assert_eq!(resp.status, status, "GET {path}: {}", resp.error());
    Ok(String::from_utf8_lossy(&resp.body).into_owned())
}

/// The `token` of a watch answer.
fn watch_token(body: &str) -> TestResult<String> {
    let v: serde_json::Value = serde_json::from_str(body)?;
    Ok(v["token"].as_str().ok_or("no token")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_idle_connections_give_way_and_busy_ones_do_not() -> TestResult {
    let server = Server::start(ServerConfig {
        max_connections: 3,
        ..ServerConfig::default()
    })
    .await?;
    // Three kept-alive connections, each active after the one before.
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut conn = Raw::connect(server.addr).await?;
        get(&mut conn, "/v1/status", 200).await?;
        conns.push(conn);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fourth is served; the least recently active (the first) gave way.
    let mut fourth = Raw::connect(server.addr).await?;
    get(&mut fourth, "/v1/status", 200).await?;
    conns[0].closed().await?;
    get(&mut conns[1], "/v1/status", 200).await?;
    get(&mut conns[2], "/v1/status", 200).await?;

    // Three long polls make every connection busy.
    let first = get(&mut conns[1], "/v1/sync/watch", 200).await?;
    let since = watch_token(&first)?;
    let path = format!("/v1/sync/watch?since={since}&timeout_ms=60000");
    let mut watchers = vec![conns.remove(1), conns.remove(1), fourth];
    for w in &mut watchers {
        w.send(format!("{}\r\n\r\n", head("GET", &path, None, &[])).as_bytes())
            .await?;
    }
    // Give the server the time to start all three (they are not answered before news): a
    // head is parsed in microseconds, this leaves a loaded machine ample margin.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut shed = Raw::connect(server.addr).await?;
    let resp = shed.response().await?;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(resp.json()?["code"], "unavailable");
    shed.closed().await?;

    // News ends the polls; the connections are idle again and give way.
    server
        .engine
        .put(&Scope::shared(), &key("news"), b"v".to_vec())?;
    for w in &mut watchers {
        let resp = w.response().await?;
        assert_eq!(resp.status, 200);
    }
    let mut late = Raw::connect(server.addr).await?;
    get(&mut late, "/v1/status", 200).await?;
    server.stop().await
}

/// How long `conn` stays open before the server closes it.
async fn time_to_close(conn: &mut Raw) -> TestResult<Duration> {
    let started = Instant::now();
    conn.closed().await?;
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_read_timeout_covers_every_request_of_a_kept_alive_connection() -> TestResult {
    let timeout = Duration::from_millis(400);
    let server = Server::start(ServerConfig {
        header_read_timeout: timeout,
        ..ServerConfig::default()
    })
    .await?;
    let within = |elapsed: Duration| {
        // Not closed before the timeout, and not long after it.
        elapsed >= timeout - Duration::from_millis(50) && elapsed < timeout * 5
    };

    // Idle after a first request: the keep-alive idle timeout.
    let mut idle = Raw::connect(server.addr).await?;
    get(&mut idle, "/v1/status", 200).await?;
    let elapsed = time_to_close(&mut idle).await?;
    assert!(
        within(elapsed),
        "idle kept-alive connection closed after {elapsed:?}"
    );

    // A second request whose headers trickle in (slowloris on a kept-alive connection).
    let mut slow = Raw::connect(server.addr).await?;
    get(&mut slow, "/v1/status", 200).await?;
    let started = Instant::now();
    slow.send(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    let trickle = async {
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.send(format!("x-{i}: y\r\n").as_bytes()).await.is_err() {
                break;
            }
        }
    };
    trickle.await;
    // Whether the write failed or not, the server must have closed it by now.
    let _ = slow.closed().await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(6),
        "trickled headers held the connection {elapsed:?}"
    );

    // The same for a first request that never completes its headers.
    let mut first = Raw::connect(server.addr).await?;
    first.send(b"GET /v1/sta").await?;
    let elapsed = time_to_close(&mut first).await?;
    assert!(within(elapsed), "partial first request held {elapsed:?}");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_download_is_dropped_after_the_write_timeout() -> TestResult {
    let server = Server::start(ServerConfig {
        write_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await?;
    // Far more than the socket buffers on both sides hold.
    let size: usize = 48 << 20;
    let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    server
        .engine
        .put_file_bytes(&Scope::shared(), &key("big"), Vec::new(), &content)?;

    let mut stream = TcpStream::connect(server.addr).await?;
    let request = format!("{}\r\n\r\n", head("GET", "/v1/files/shared/big", None, &[]));
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 64 << 10];
    let mut received = stream.read(&mut buf).await?;
    // Stop reading for well over the write timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ended = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    };
    tokio::time::timeout(PROMPTLY, ended)
        .await
        .map_err(|_| "the server kept the connection of a client that stopped reading")?;
    assert!(
        received < size,
        "the whole download arrived ({received} bytes): the server waited for the reader"
    );

    // A client that reads gets all of it.
    let mut whole = TcpStream::connect(server.addr).await?;
    whole.write_all(request.as_bytes()).await?;
    let mut all = Vec::new();
    let read_all = async {
        // The head, then exactly the body (the connection stays open after it).
        loop {
            let n = whole.read(&mut buf).await?;
            if n == 0 {
                return Err::<(), std::io::Error>(std::io::ErrorKind::UnexpectedEof.into());
            }
            all.extend_from_slice(&buf[..n]);
            let head_end = all.windows(4).position(|w| w == b"\r\n\r\n");
            if head_end.is_some_and(|h| all.len() >= h + 4 + size) {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(PROMPTLY, read_all)
        .await
        .map_err(|_| "the download did not end")??;
    assert!(all.ends_with(&content[size - 1000..]));
    server.stop().await
}
