//! `GET /metrics`: who may read it (401 without a token, 403 without the metrics right), and
//! what it counts: exchanges served by status class and token, request latency, message
//! bytes, versions, open connections and the store's size on the server; rounds a node
//! initiated by peer and outcome, their latency and what they moved, through the scheduler's
//! hooks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::http::{call, Server, PROMPTLY};
use common::rounds::TestResult;
use highwater::engine::DB_FILE;
use highwater::http::{Access, ClientConfig, HttpTransport, Metrics, ServerConfig};
use highwater::node::{Node, NodeOptions};
use highwater::{Key, Scope, SyncEngine};
use hyper::{Method, StatusCode};

const HUB: &str = "hub-secret-0123456789";
const READER: &str = "reader-secret-0123456789";
const SCRAPER: &str = "scraper-secret-0123456789";

fn access() -> TestResult<Arc<Access>> {
    let json = format!(
        r#"{{"tokens": [
            {{"name": "hub", "token": "{HUB}", "read": ["*"], "write": ["*"], "sync": true}},
            {{"name": "reader", "token": "{READER}", "read": ["*"]}},
            {{"name": "scraper", "token": "{SCRAPER}", "metrics": true}}
        ]}}"#
    );
    Ok(Arc::new(Access::from_json(&json)?))
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn client(url: &str, token: Option<&str>) -> TestResult<HttpTransport> {
    Ok(HttpTransport::with_config(
        url,
        ClientConfig {
            token: token.map(str::to_owned),
            ..ClientConfig::default()
        },
    )?)
}

/// The node's metrics, read with `token`: the status and the text.
async fn scrape(url: &str, token: Option<&str>) -> TestResult<(StatusCode, String)> {
    let (status, headers, body) = call(&client(url, token)?, Method::GET, "/metrics", "").await?;
    if status == StatusCode::OK {
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
    }
    Ok((status, String::from_utf8(body.to_vec())?))
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_counts_exchanges_by_outcome_and_token_and_guards_its_metrics() -> TestResult {
    let metrics = Arc::new(Metrics::new());
    let hub = Server::start(ServerConfig {
        access: access()?,
        metrics: metrics.clone(),
        ..ServerConfig::default()
    })
    .await?;
    metrics.watch_store_file(hub.dir.path().join(DB_FILE));
    let url = hub.url();
    for i in 0..3 {
        hub.engine
            .put(&Scope::shared(), &key(&format!("h{i}")), b"v".to_vec())?;
    }

    // Who may read it.
    let (status, _) = scrape(&url, None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = scrape(&url, Some(READER)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("may not read metrics"), "{body}");
    let (status, _) = scrape(&url, Some(HUB)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, before) = scrape(&url, Some(SCRAPER)).await?;
    assert_eq!(status, StatusCode::OK);
    let ok_exchanges = r#"highwater_sync_requests_total{kind="exchange",status="2xx",token="hub"}"#;
    assert_eq!(value(&before, ok_exchanges), None);

    // A sync: one exchange served per round, its versions and bytes counted.
    let device = SyncEngine::in_memory()?;
    device.put(&Scope::shared(), &key("d"), b"from the device".to_vec())?;
    let to_hub = client(&url, Some(HUB))?;
    let mut rounds = 1;
    while device.exchange(&to_hub).await?.has_more {
        rounds += 1;
    }
    assert_eq!(device.digest()?, hub.engine.digest()?);
    let (_, after) = scrape(&url, Some(SCRAPER)).await?;
    // The device's first round is a streamed pull (a session's first): it counts as one.
    let ok_pulls = r#"highwater_sync_requests_total{kind="pull",status="2xx",token="hub"}"#;
    assert_eq!(value(&after, ok_pulls), Some(1.0), "{after}");
    assert_eq!(
        value(&after, ok_exchanges),
        Some(f64::from(rounds - 1)),
        "{after}"
    );
    let responder = |direction: &str| {
        value(
            &after,
            &format!(r#"highwater_versions_total{{role="responder",direction="{direction}"}}"#),
        )
    };
    assert_eq!(responder("received"), Some(1.0));
    assert_eq!(responder("shipped"), Some(3.0));
    let bytes = |direction: &str| {
        ["exchange", "pull"]
            .iter()
            .map(|kind| {
                value(
                    &after,
                    &format!(
                        r#"highwater_sync_message_bytes_total{{kind="{kind}",direction="{direction}"}}"#
                    ),
                )
                .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    assert!(
        bytes("received") > 0.0 && bytes("sent") > bytes("received"),
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            r#"highwater_http_request_duration_seconds_count{endpoint="exchange"}"#
        ),
        Some(f64::from(rounds - 1))
    );
    // The store's size is the database file's length.
    let store = value(&after, "highwater_store_bytes").ok_or("no store size")?;
    let len = std::fs::metadata(hub.dir.path().join(DB_FILE))?.len() as f64;
    assert_eq!(store, len);
    assert!(value(&after, "highwater_http_connections_open").is_some_and(|n| n >= 1.0));

    // One more round adds exactly one; refusals are counted by class and token (the new
    // clients' rounds are their sessions' first: streamed pulls).
    device.exchange(&to_hub).await?;
    let _ = device.exchange(&client(&url, Some(READER))?).await;
    let _ = device.exchange(&client(&url, None)?).await;
    let (_, later) = scrape(&url, Some(SCRAPER)).await?;
    assert_eq!(
        value(&later, ok_exchanges),
        Some(f64::from(rounds)),
        "{later}"
    );
    let refused = |token: &str| {
        value(
            &later,
            &format!(
                r#"highwater_sync_requests_total{{kind="pull",status="4xx",token="{token}"}}"#
            ),
        )
    };
    assert_eq!(refused("reader"), Some(1.0), "{later}");
    assert_eq!(refused(""), Some(1.0), "{later}");
    hub.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_counts_the_rounds_it_initiates_by_peer_and_outcome() -> TestResult {
    let dir = tempfile::tempdir()?;
    // The hub: three records for the device to fetch.
    let hub = Server::start(ServerConfig::default()).await?;
    for i in 0..3 {
        hub.engine
            .put(&Scope::shared(), &key(&format!("h{i}")), b"v".to_vec())?;
    }
    // A peer that is not there: a port that was just free.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gone_url = format!("http://{}", gone.local_addr()?);
    drop(gone);

    let mut options = NodeOptions::new(dir.path().join("device"), "127.0.0.1:0".parse()?);
    options.peers = vec![hub.url(), gone_url.clone()];
    options.interval = Duration::from_secs(3600);
    let node = Node::start(options).await?;
    let url = node.url();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(node.run(async move {
        let _ = stopped.await;
    }));

    let ok = format!(
        r#"highwater_rounds_total{{peer="{}",outcome="ok"}}"#,
        hub.url()
    );
    let unreachable =
        format!(r#"highwater_rounds_total{{peer="{gone_url}",outcome="unreachable"}}"#);
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    let text = loop {
        // An open node on loopback: anyone on the machine may read its metrics.
        let (status, text) = scrape(&url, None).await?;
        assert_eq!(status, StatusCode::OK);
        if value(&text, &ok).is_some() && value(&text, &unreachable).is_some() {
            break text;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no rounds counted in time:\n{text}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Whatever number of rounds ran (the hub's watch may add one), three versions came in,
    // all applied, and every round that ended was timed.
    let initiator = |direction: &str| {
        value(
            &text,
            &format!(r#"highwater_versions_total{{role="initiator",direction="{direction}"}}"#),
        )
    };
    assert_eq!(initiator("received"), Some(3.0), "{text}");
    assert_eq!(initiator("applied"), Some(3.0), "{text}");
    let rounds = value(&text, &ok).unwrap_or(0.0);
    let timed = value(
        &text,
        &format!(
            r#"highwater_round_duration_seconds_count{{peer="{}"}}"#,
            hub.url()
        ),
    );
    // A round is timed before it is counted: a scrape may fall between the two.
    assert!(
        timed.is_some_and(|t| t >= rounds && rounds >= 1.0),
        "{text}"
    );
    assert!(value(&text, "highwater_store_bytes").is_some_and(|n| n > 0.0));

    let _ = stop.send(());
    running.await??;
    hub.stop().await
}
