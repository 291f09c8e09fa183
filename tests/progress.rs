//! Progress with a total (issue 18, item 2): a responder answering a version 2 request says
//! how many versions the initiator still lacks beyond the page (`ResponseExt::remaining`),
//! the initiator's round outcome carries it, `highwater sync`'s totals turn it into a bar's
//! length, and the scheduler shows it per peer. A version 1 peer says nothing: `None`, and
//! the bar stays a spinner.

mod common;

use std::io::Read;
use std::sync::Arc;

use highwater::blob::BlobReader;
use highwater::hash::Hash;
use highwater::http::ServerConfig;
use highwater::node::{sync_until_done, SyncTotals};
use highwater::notify::{Event, Notice, SyncEvent};
use highwater::store::MemStore;
use highwater::wire::{ExchangeRequest, ExchangeResponse, RequestExt};
use highwater::{
    BlobRef, EngineConfig, ExchangeOptions, InProcess, Key, Op, Refusal, Responder, Scheduler,
    SchedulerConfig, Scope, SyncEngine, Transport,
};

use common::http::Server;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Live versions the hub holds (see [`fill_hub`]).
const LIVE: u64 = 1000;
const PAGE: usize = 100;

fn key(prefix: &str, i: usize) -> Key {
    Key::try_from(format!("{prefix}{i:04}").as_str()).expect("a valid key")
}

fn put(scope: &Scope, key: Key, value: &str) -> (Scope, Key, Op) {
    (
        scope.clone(),
        key,
        Op::Put {
            value: value.as_bytes().to_vec(),
            blob: None,
        },
    )
}

/// Fills `hub` with 1000 live versions of two origins in two scopes, some of whose stored
/// versions were superseded (they are not live and must not be counted): a writer's 300
/// keys of `a`, 50 of them deleted on the hub (the tombstones are live), and the hub's own
/// 700 keys of `b`, 100 of them written twice.
async fn fill_hub(hub: &Arc<SyncEngine>) -> TestResult {
    let (a, b) = scopes();
    let writer = SyncEngine::in_memory()?;
    writer.write_batch((0..300).map(|i| put(&a, key("w", i), "from the writer")))?;
    let to_hub = InProcess::new(hub.clone());
    while writer.exchange(&to_hub).await?.has_more {}
    hub.write_batch((0..700).map(|i| put(&b, key("h", i), "first")))?;
    hub.write_batch((0..100).map(|i| put(&b, key("h", i * 7), "second")))?;
    for i in 0..50 {
        hub.delete(&a, &key("w", i * 3))?;
    }
    Ok(())
}

fn scopes() -> (Scope, Scope) {
    (
        Scope::app("notes", "a").expect("a valid scope"),
        Scope::app("notes", "b").expect("a valid scope"),
    )
}

/// A device that pulls in rounds, a page each (`pull_frames` 0): the counts here are per
/// round. A streamed pull's frames carry the same count, page by page
/// (tests/streamed_pull.rs sees it reach 0).
fn rounds_device() -> highwater::Result<SyncEngine> {
    SyncEngine::in_memory_with(EngineConfig {
        pull_frames: 0,
        ..EngineConfig::default()
    })
}

fn pages() -> ExchangeOptions {
    ExchangeOptions {
        page_limit: Some(PAGE),
        ..ExchangeOptions::default()
    }
}

/// Pulls everything from the peer behind `transport` in pages of [`PAGE`]; returns each
/// round's (versions received so far, remaining as the peer counted).
async fn pull<T: Transport>(
    device: &SyncEngine,
    transport: &T,
) -> TestResult<Vec<(u64, Option<u64>)>> {
    let mut seen = Vec::new();
    let mut received = 0u64;
    loop {
        let outcome = device.exchange_with(transport, &pages()).await?;
        received += outcome.received as u64;
        seen.push((received, outcome.remaining));
        if !outcome.has_more {
            return Ok(seen);
        }
        if seen.len() > 100 {
            return Err(format!("no end in sight: {seen:?}").into());
        }
    }
}

/// Each round's remaining is exactly what the device still lacks: 900, 800, ... 0.
fn assert_exact(seen: &[(u64, Option<u64>)]) {
    let expected: Vec<(u64, Option<u64>)> = (1..=LIVE / PAGE as u64)
        .map(|round| (round * PAGE as u64, Some(LIVE - round * PAGE as u64)))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn in_process_remaining_decreases_exactly_to_zero() -> TestResult {
    let hub = Arc::new(SyncEngine::in_memory()?);
    fill_hub(&hub).await?;
    let device = rounds_device()?;
    let seen = pull(&device, &InProcess::new(hub.clone())).await?;
    assert_exact(&seen);
    assert_eq!(device.digest()?, hub.digest()?);
    Ok(())
}

#[tokio::test]
async fn over_http_a_redb_hub_counts_exactly_from_its_audit_chunks() -> TestResult {
    let server = Server::start(ServerConfig::default()).await?;
    fill_hub(&server.engine).await?;
    let device = rounds_device()?;
    let seen = pull(&device, &server.client(None)?).await?;
    assert_exact(&seen);
    assert_eq!(device.digest()?, server.engine.digest()?);
    server.stop().await
}

#[tokio::test]
async fn a_count_at_the_cap_reports_the_cap() -> TestResult {
    let hub = Arc::new(SyncEngine::with_store(
        Box::new(MemStore::new()),
        EngineConfig {
            remaining_cap: 250,
            ..EngineConfig::default()
        },
    )?);
    fill_hub(&hub).await?;
    let device = rounds_device()?;
    let seen = pull(&device, &InProcess::new(hub.clone())).await?;
    let remaining: Vec<Option<u64>> = seen.iter().map(|(_, r)| *r).collect();
    let capped = [250, 250, 250, 250, 250, 250, 250, 200, 100, 0];
    assert_eq!(remaining, capped.map(Some));
    Ok(())
}

/// A responder that speaks version 1 only: it never sees a request's extension and never
/// sends one.
struct V1Peer(Arc<SyncEngine>);

impl Responder for V1Peer {
    fn node_id(&self) -> highwater::NodeId {
        Responder::node_id(&*self.0)
    }

    fn respond(&self, mut request: ExchangeRequest) -> Result<ExchangeResponse, Refusal> {
        request.ext = RequestExt::default();
        let mut response = Responder::respond(&*self.0, request)?;
        response.ext = Default::default();
        Ok(response)
    }

    fn blobs_present(&self, hashes: &[Hash]) -> Result<Vec<bool>, Refusal> {
        Responder::blobs_present(&*self.0, hashes)
    }

    fn open_blob(&self, hash: &Hash) -> Result<Option<BlobReader>, Refusal> {
        Responder::open_blob(&*self.0, hash)
    }

    fn accept_blob(&self, blob: &BlobRef, content: &mut dyn Read) -> Result<(), Refusal> {
        Responder::accept_blob(&*self.0, blob, content)
    }

    fn scopes(&self) -> Result<Vec<Scope>, Refusal> {
        Responder::scopes(&*self.0)
    }
}

#[tokio::test]
async fn a_version_1_peer_counts_nothing_and_the_bar_stays_a_spinner() -> TestResult {
    let hub = Arc::new(SyncEngine::in_memory()?);
    fill_hub(&hub).await?;
    let device = rounds_device()?;
    let transport = InProcess::new(Arc::new(V1Peer(hub.clone())));
    let mut totals: Vec<Option<u64>> = Vec::new();
    let done = sync_until_done(&device, &transport, &pages(), |t: &SyncTotals| {
        totals.push(t.total())
    })
    .await?;
    assert_eq!(done.received as u64, LIVE);
    assert_eq!(done.remaining, None);
    assert_eq!(totals, vec![None; 10], "no total: a spinner, never a bar");

    // The same pull from a version 2 peer: a bar of 1000 from the first round on.
    let device = rounds_device()?;
    let mut totals: Vec<Option<u64>> = Vec::new();
    sync_until_done(&device, &InProcess::new(hub.clone()), &pages(), |t| {
        totals.push(t.total())
    })
    .await?;
    assert_eq!(totals, vec![Some(LIVE); 10]);
    Ok(())
}

/// A scheduler on `device` that pulls in pages of [`PAGE`], without watching or auditing.
fn pulling_scheduler(device: &Arc<SyncEngine>) -> Scheduler {
    Scheduler::start(
        device.clone(),
        SchedulerConfig {
            watch: false,
            audit_interval: None,
            options: pages(),
            ..SchedulerConfig::default()
        },
    )
}

#[tokio::test]
async fn the_scheduler_shows_the_pull_and_publishes_remaining() -> TestResult {
    let hub = Arc::new(SyncEngine::in_memory()?);
    fill_hub(&hub).await?;
    let device = Arc::new(rounds_device()?);
    let mut events = SyncEngine::notifier(&device).subscribe();
    let scheduler = pulling_scheduler(&device);
    scheduler.add_peer("hub", Arc::new(InProcess::new(hub.clone())))?;
    let mut remaining = Vec::new();
    while let Some(notice) = events.recv().await {
        if let Notice::Event(Event::Sync(SyncEvent::Applied {
            remaining: r,
            has_more,
            ..
        })) = notice
        {
            remaining.push(r);
            if !has_more {
                break;
            }
        }
    }
    let expected: Vec<Option<u64>> = (1..=10).rev().map(|i| Some((i - 1) * 100)).collect();
    assert_eq!(remaining, expected);
    let pull = scheduler.peers()[0].pull.ok_or("no pull shown")?;
    assert_eq!((pull.received, pull.remaining), (LIVE, Some(0)));
    assert_eq!(pull.total(), Some(LIVE));
    let status = highwater::api::NodeApi::status(&*device, highwater::api::all_scopes()).await?;
    let json = status.to_json();
    assert_eq!(json["configured_peers"][0]["pull"]["received"], LIVE);
    assert_eq!(json["configured_peers"][0]["pull"]["remaining"], 0);
    scheduler.shutdown().await?;
    Ok(())
}

/// The `sync_page_applied` events a subscription holds: (seq, received, applied, remaining),
/// each checked to name `peer`.
fn page_events(
    events: &mut highwater::notify::Subscription,
    peer: &str,
) -> Vec<(u32, usize, usize, Option<u64>)> {
    let mut pages = Vec::new();
    while let Some(notice) = events.try_recv() {
        if let Notice::Event(Event::Sync(SyncEvent::PageApplied {
            peer: from,
            seq,
            received,
            applied,
            remaining,
        })) = notice
        {
            assert_eq!(from, peer);
            pages.push((seq, received, applied, remaining));
        }
    }
    pages
}

#[tokio::test]
async fn a_streamed_pull_tells_each_page_as_it_is_applied() -> TestResult {
    let hub = Arc::new(SyncEngine::in_memory()?);
    fill_hub(&hub).await?;
    // A device that streams (the default): its first round brings every page.
    let device = SyncEngine::in_memory()?;
    let mut events = SyncEngine::notifier(&device).subscribe();
    let outcome = device
        .exchange_with(&InProcess::new(hub.clone()), &pages())
        .await?;
    assert!(!outcome.has_more);
    assert_eq!(outcome.received as u64, LIVE);
    let pages = page_events(&mut events, &hub.node_id().to_string());
    // The response's page (0), then nine frames, each told with what the hub still held.
    let told: Vec<(u32, usize, Option<u64>)> = pages.iter().map(|p| (p.0, p.1, p.3)).collect();
    let expected: Vec<(u32, usize, Option<u64>)> = (0..10u32)
        .map(|seq| (seq, PAGE, Some(LIVE - (u64::from(seq) + 1) * PAGE as u64)))
        .collect();
    assert_eq!(told, expected);
    assert_eq!(pages.iter().map(|p| p.2).sum::<usize>(), outcome.applied);

    // A round in pages, without a stream, tells no page: its `sync_applied` is its progress.
    let device = rounds_device()?;
    let mut events = SyncEngine::notifier(&device).subscribe();
    pull(&device, &InProcess::new(hub.clone())).await?;
    assert_eq!(page_events(&mut events, "any"), Vec::new());
    Ok(())
}

#[tokio::test]
async fn highwater_sync_moves_its_bar_with_each_page_of_a_round() -> TestResult {
    let hub = Arc::new(SyncEngine::in_memory()?);
    fill_hub(&hub).await?;
    let device = SyncEngine::in_memory()?;
    let mut bars: Vec<(u64, Option<u64>)> = Vec::new();
    let done = sync_until_done(&device, &InProcess::new(hub.clone()), &pages(), |t| {
        bars.push((t.received as u64, t.total()))
    })
    .await?;
    assert_eq!((done.rounds, done.received as u64), (1, LIVE));
    // One round, ten pages: the bar moves page by page, then the round's end.
    let mut expected: Vec<(u64, Option<u64>)> = (1..=10u64)
        .map(|page| (page * PAGE as u64, Some(LIVE)))
        .collect();
    expected.push((LIVE, Some(LIVE)));
    assert_eq!(bars, expected);
    Ok(())
}

/// Lets the frames of a streamed pull through one permit at a time.
struct Gate(Arc<tokio::sync::Semaphore>);

impl highwater::transport::Layer for Gate {
    fn frames(&self, frames: highwater::transport::Frames) -> highwater::transport::Frames {
        use futures_util::StreamExt;
        let gate = self.0.clone();
        Box::pin(frames.then(move |frame| {
            let gate = gate.clone();
            async move {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                frame
            }
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_shows_a_pull_move_within_a_round() -> TestResult {
    let hub = Arc::new(SyncEngine::in_memory()?);
    fill_hub(&hub).await?;
    let device = Arc::new(SyncEngine::in_memory()?);
    let mut events = SyncEngine::notifier(&device).subscribe();
    let gate = Arc::new(tokio::sync::Semaphore::new(3));
    let transport =
        highwater::transport::Layered::with_layer(InProcess::new(hub.clone()), Gate(gate.clone()));
    let scheduler = pulling_scheduler(&device);
    scheduler.add_peer("hub", Arc::new(transport))?;
    // Three frames are let through; the third waits to be applied until the fourth comes
    // (each page is applied while the next one's files are fetched), so the round holds
    // with pages 0 to 2 applied: 300 versions, 700 left.
    loop {
        match events.recv().await.ok_or("the notifier closed")? {
            Notice::Event(Event::Sync(SyncEvent::PageApplied { seq: 2, .. })) => break,
            Notice::Event(Event::Sync(SyncEvent::Applied { .. })) => {
                return Err("the round ended with its frames held back".into())
            }
            _ => {}
        }
    }
    // The round's task reads the same event on its own subscription: wait for it to show,
    // with a deadline (the round itself is held, so nothing else can move the status).
    let held = (300, Some(700));
    let mut shown = None;
    for _ in 0..2000 {
        shown = scheduler.peers()[0].pull.map(|p| (p.received, p.remaining));
        if shown == Some(held) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        shown,
        Some(held),
        "the status did not move within the round"
    );
    // Let the rest through: the round ends with every version.
    gate.add_permits(1000);
    loop {
        if let Notice::Event(Event::Sync(SyncEvent::Applied { received, .. })) =
            events.recv().await.ok_or("the notifier closed")?
        {
            assert_eq!(received as u64, LIVE);
            break;
        }
    }
    let pull = scheduler.peers()[0].pull.ok_or("no pull shown")?;
    assert_eq!((pull.received, pull.remaining), (LIVE, Some(0)));
    scheduler.shutdown().await?;
    Ok(())
}
