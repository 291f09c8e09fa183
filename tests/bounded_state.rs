//! A request grows a node's state by at most what its page carries: a token with the sync
//! right that names 100 000 made-up origins, in its marks and as empty runs, over and over,
//! leaves the node's marks, its knowledge of that peer, its status and its database bounded,
//! and an honest new node still joins in one sync.

mod common;

use std::time::{Duration, Instant};

use common::http::{tokens, Server, APP_A, HUB};
use highwater::exchange::{Page, Run};
use highwater::http::ServerConfig;
use highwater::wire::{ExchangeRequest, RequestMarks, ScopeFilter};
use highwater::{EngineConfig, Hlc, Key, NodeId, Scope, ScopedWatermarks, SyncEngine, Transport};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const ORIGINS: usize = 100_000;
const REPLAYS: usize = 5;

fn items() -> Scope {
    Scope::app("a", "items").expect("a valid scope")
}

/// One attack request: `ORIGINS` made-up origins, each in the marks and as an empty run.
fn attack(from: NodeId, now: u64) -> ExchangeRequest {
    let scope = items();
    let mut marks = ScopedWatermarks::new();
    let mut runs = Vec::with_capacity(ORIGINS);
    for _ in 0..ORIGINS {
        let top = Hlc::new(now, NodeId::random());
        marks.observe(&scope, top);
        runs.push(Run {
            scope: scope.clone(),
            origin: top.origin(),
            base: None,
            top,
            versions: Vec::new(),
        });
    }
    ExchangeRequest {
        from,
        scopes: ScopeFilter::Only([scope].into_iter().collect()),
        marks: RequestMarks::Full(marks),
        known: None,
        page: Page { runs, more: false },
        limit: 1000,
        deferred: Vec::new(),
        ext: Default::default(),
    }
}

fn db_size(server: &Server) -> TestResult<u64> {
    Ok(std::fs::metadata(server.dir.path().join(highwater::engine::DB_FILE))?.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_origins_by_the_hundred_thousand_leave_the_node_bounded() -> TestResult {
    let server = Server::start_with(
        EngineConfig::default(),
        ServerConfig {
            access: tokens(),
            ..ServerConfig::default()
        },
    )
    .await?;
    // Honest data first: a few records the new node must get.
    for i in 0..20 {
        server.engine.put(
            &items(),
            &Key::try_from(format!("k{i}").as_str())?,
            b"honest".to_vec(),
        )?;
    }
    let before = (server.engine.watermarks()?.mark_count(), db_size(&server)?);
    let attacker = server.client(Some(APP_A))?;
    let from = NodeId::random();
    let now = server.engine.clock_time();
    for _ in 0..REPLAYS {
        // The node answers (the page is well formed), and keeps almost none of it.
        attacker.exchange(attack(from, now)).await?;
    }
    let marks = server.engine.watermarks()?.mark_count();
    let budget = EngineConfig::default().max_new_origins_per_request * REPLAYS;
    assert!(
        marks <= before.0 + budget,
        "{marks} marks after the attack ({} before, budget {budget})",
        before.0
    );
    let known = server
        .engine
        .peer_watermarks(from)?
        .map_or(0, |k| k.mark_count());
    assert!(known <= marks, "knowledge of the attacker: {known} marks");
    let grown = db_size(&server)?.saturating_sub(before.1);
    assert!(grown < 8 << 20, "the database grew by {grown} bytes");

    // Status answers promptly and lists a bounded document.
    let started = Instant::now();
    let status =
        highwater::api::NodeApi::status(&*server.engine, highwater::api::all_scopes()).await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "status took {:?}",
        started.elapsed()
    );
    let listed: usize = status.scopes.values().map(|s| s.watermarks.len()).sum();
    assert!(listed <= marks, "status lists {listed} marks");

    // An honest new node joins in one sync.
    let device = SyncEngine::in_memory()?;
    let hub = server.client(Some(HUB))?;
    let mut rounds = 0;
    while device.exchange(&hub).await?.has_more {
        rounds += 1;
        assert!(rounds < 20, "the join did not finish");
    }
    assert_eq!(device.digest()?, server.engine.digest()?);
    assert_eq!(
        device.scan(&items(), b"", None, 100)?.len(),
        20,
        "the device holds every honest record"
    );
    server.stop().await
}

/// A page of more runs than the node takes versions per page is refused whole (413), even
/// when every run is empty: the runs themselves cost the node work and memory.
#[tokio::test]
async fn a_page_of_more_runs_than_the_page_limit_is_refused() -> TestResult {
    let server = Server::start_with(
        EngineConfig::default(),
        ServerConfig {
            access: tokens(),
            max_page_versions: 1_000,
            ..ServerConfig::default()
        },
    )
    .await?;
    let before = server.snapshot()?;
    let attacker = server.client(Some(APP_A))?;
    let mut request = attack(NodeId::random(), server.engine.clock_time());
    request.page.runs.truncate(1_001);
    let refused = attacker
        .exchange(request.clone())
        .await
        .expect_err("1001 runs over a limit of 1000");
    assert!(refused.to_string().contains("1001 runs"), "{refused}");
    assert_eq!(server.snapshot()?, before);
    // At the limit the page is taken.
    request.page.runs.truncate(1_000);
    attacker.exchange(request).await?;
    server.stop().await
}
