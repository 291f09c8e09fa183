//! Reads routed while a scope hydrates (issue 18, item 3), over HTTP: a device node pulls a
//! background scope from its hub; its records API answers a read of that scope from the hub
//! (`x-highwater-source: remote <hub URL>`, asked with the device's own token for the hub)
//! until the scope is ready, then from the device (`local`). The caller still needs a grant
//! on the device; a hub that cannot be reached leaves the answer the device's own, marked
//! local and not ready.

mod common;

use std::sync::Arc;
use std::time::Duration;

use highwater::api::{ListQuery, Lookup, NodeApi, Source};
use highwater::http::{ClientConfig, HttpTransport, NodeClient, ServerConfig};
use highwater::notify::{Event, Notice, SyncEvent};
use highwater::{
    ExchangeOptions, Hydration, Key, Op, Scheduler, SchedulerConfig, Scope, ScopeFilter, SyncEngine,
};

use common::http::{head, raw, tokens, Server, APP_A, HUB, READER};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const PATIENCE: Duration = Duration::from_secs(120);
const BACKGROUND: usize = 3000;

fn boot() -> Scope {
    Scope::app("notes", "settings").expect("a valid scope")
}

fn items() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

fn key(i: usize) -> Key {
    Key::try_from(format!("k{i:06}").as_str()).expect("a valid key")
}

fn fill(node: &SyncEngine, scope: &Scope, n: usize) -> TestResult {
    node.write_batch((0..n).map(|i| {
        (
            scope.clone(),
            key(i),
            Op::Put {
                value: format!("value {i}").into_bytes(),
                blob: None,
            },
        )
    }))?;
    Ok(())
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        watch: false,
        audit_interval: None,
        boot_scopes: [boot()].into(),
        options: ExchangeOptions {
            page_limit: Some(100),
            ..ExchangeOptions::default()
        },
        ..SchedulerConfig::default()
    }
}

fn protected() -> ServerConfig {
    ServerConfig {
        access: tokens(),
        ..ServerConfig::default()
    }
}

fn client(server: &Server, token: &str) -> TestResult<NodeClient> {
    Ok(NodeClient::new(&server.url(), Some(token.to_owned()))?)
}

#[tokio::test]
async fn a_device_node_answers_from_its_hub_until_the_scope_is_ready() -> TestResult {
    let hub = Server::start(protected()).await?;
    fill(&hub.engine, &boot(), 10)?;
    fill(&hub.engine, &items(), BACKGROUND)?;
    let device = Server::start(protected()).await?;
    let mut events = device.engine.notifier().subscribe();
    let scheduler = Scheduler::start(device.engine.clone(), config());
    let to_hub = HttpTransport::with_config(
        &hub.url(),
        ClientConfig {
            token: Some(HUB.to_owned()),
            ..ClientConfig::default()
        },
    )?;
    scheduler.add_peer(hub.url(), Arc::new(to_hub))?;
    tokio::time::timeout(PATIENCE, scheduler.ready()).await?;
    // Hold the background where it is: at most the round in flight (100 versions) ends.
    scheduler.pause();

    let last = key(BACKGROUND - 1);
    assert_eq!(device.engine.get(&items(), &last)?, None, "not pulled yet");
    let reader = client(&device, READER)?;
    let remote = Source::Remote { peer: hub.url() };
    let read = reader.get_routed(items(), last.clone()).await?;
    assert_eq!(read.source, remote);
    assert_ne!(read.hydration, Hydration::Ready);
    assert_eq!(
        read.value.found().map(|r| r.value),
        Some(format!("value {}", BACKGROUND - 1).into_bytes())
    );
    // A key the hub does not hold either: the hub's answer, still marked.
    let read = reader.get_routed(items(), key(BACKGROUND)).await?;
    assert_eq!((read.value, read.source), (Lookup::Missing, remote.clone()));
    let page = reader
        .list_routed(
            items(),
            ListQuery {
                after: Some(key(BACKGROUND - 3)),
                ..ListQuery::default()
            },
        )
        .await?;
    assert_eq!(page.source, remote);
    assert_eq!(page.value.records.len(), 2);

    // The raw answer: the header and the listing's field.
    let addr = device.addr;
    let path = format!("/v1/records/{}/{}", items(), "k002999");
    let resp = raw(addr, &head("GET", &path, Some(READER), &[]), b"").await?;
    assert_eq!(resp.status, 200);
    let expected = format!("remote {}", hub.url());
    assert_eq!(resp.header("x-highwater-source"), Some(expected.as_str()));
    let hydration = resp.header("x-highwater-hydration");
    assert!(
        matches!(hydration, Some("not_started" | "hydrating")),
        "{hydration:?}"
    );
    let path = format!("/v1/records/{}?limit=1", items());
    let resp = raw(addr, &head("GET", &path, Some(READER), &[]), b"").await?;
    assert_eq!(resp.json()?["source"], expected.as_str());
    // A node routing a read here asks for this node's own answer: nothing is routed on.
    let resp = raw(
        addr,
        &head(
            "GET",
            &format!("/v1/records/{}/{}", items(), "k002999"),
            Some(READER),
            &["x-highwater-route: local".to_owned()],
        ),
        b"",
    )
    .await?;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("x-highwater-source"), Some("local"));

    // The caller needs a grant here, whatever the hub would answer.
    let outsider = client(&device, APP_A)?;
    let refused = outsider.get_routed(items(), last.clone()).await;
    assert!(refused.is_err(), "{refused:?}");

    // Once the scope is ready, its reads are the device's.
    scheduler.resume();
    let wait = async {
        while let Some(notice) = events.recv().await {
            if let Notice::Event(Event::Sync(SyncEvent::HydrationChanged { scope, state })) = notice
            {
                if scope == items() && state == Hydration::Ready {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait).await?;
    let read = reader.get_routed(items(), last.clone()).await?;
    assert_eq!(
        (read.source, read.hydration),
        (Source::Local, Hydration::Ready)
    );
    assert_eq!(
        read.value.found().map(|r| r.value),
        Some(format!("value {}", BACKGROUND - 1).into_bytes())
    );
    scheduler.shutdown().await?;
    device.stop().await?;
    hub.stop().await
}

#[tokio::test]
async fn a_hub_out_of_reach_leaves_the_answer_local_and_not_ready() -> TestResult {
    let device = Server::start(ServerConfig::default()).await?;
    device
        .engine
        .put(&items(), &key(1), b"written here".to_vec())?;
    // A port nothing listens on: bound, then released.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", gone.local_addr()?);
    drop(gone);
    let scheduler = Scheduler::start(
        device.engine.clone(),
        SchedulerConfig {
            options: ExchangeOptions {
                scopes: ScopeFilter::Only([items()].into()),
                ..ExchangeOptions::default()
            },
            ..config()
        },
    );
    scheduler.add_peer(url.clone(), Arc::new(HttpTransport::new(&url, None)?))?;
    let reader = NodeClient::new(&device.url(), None)?;
    let read = reader.get_routed(items(), key(1)).await?;
    assert_eq!(read.source, Source::Local);
    assert_ne!(read.hydration, Hydration::Ready);
    assert_eq!(
        read.value.found().map(|r| r.value),
        Some(b"written here".to_vec())
    );
    let page = reader.list_routed(items(), ListQuery::default()).await?;
    assert_eq!((page.source, page.value.records.len()), (Source::Local, 1));
    scheduler.shutdown().await?;
    device.stop().await
}

#[tokio::test]
async fn a_hub_that_does_not_answer_in_time_leaves_the_answer_local() -> TestResult {
    let device = Arc::new(SyncEngine::in_memory()?);
    device.put(&items(), &key(1), b"written here".to_vec())?;
    // Accepts connections (the kernel does) and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", silent.local_addr()?);
    let scheduler = Scheduler::start(device.clone(), config());
    scheduler.add_peer(url.clone(), Arc::new(HttpTransport::new(&url, None)?))?;
    let started = std::time::Instant::now();
    let read = scheduler.get_routed(items(), key(1)).await?;
    let waited = started.elapsed();
    assert_eq!(read.source, Source::Local);
    assert_eq!(
        read.value.found().map(|r| r.value),
        Some(b"written here".to_vec())
    );
    assert!(
        waited >= highwater::engine::ROUTED_READ_TIMEOUT && waited < Duration::from_secs(30),
        "{waited:?}"
    );
    drop(silent);
    drop(scheduler);
    Ok(())
}
