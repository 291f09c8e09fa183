//! What an application sees of its peers (issue 18, items 4 and 7), on tokio's paused clock:
//!
//! - every peer the scheduler was given is in the status document by its name from the
//!   start, before any round ended, then with its failures, last error, connectivity and the
//!   local writes it has not acknowledged;
//! - `connectivity_changed` is published when a round succeeds after a failure (or first),
//!   and when one fails after a success, in that order among the sync events;
//! - a clock-skew halt is reported on both sides: `clock_skew` where the versions were
//!   refused, `clock_skew_at_peer` on the node whose versions they were, and the status
//!   document shows the halted stream with the skew.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::rounds::{mem_node, Node, TestResult};
use highwater::api::{all_scopes, HaltSide, NodeApi, PeerLink, Status};
use highwater::error::TransportError;
use highwater::notify::{Event, Notice, Subscription, SyncEvent};
use highwater::transport::{Call, Layer, Layered};
use highwater::{InProcess, Key, ManualTime, Scheduler, SchedulerConfig, Scope, SyncEngine};

const PATIENCE: Duration = Duration::from_secs(24 * 3600);

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

/// A link that can be cut: while down, every call fails as unreachable.
#[derive(Default)]
struct Cable {
    down: AtomicBool,
}

impl Layer for Cable {
    fn before(&self, _call: Call<'_>) -> Result<(), TransportError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransportError::Unreachable {
                reason: "the cable is cut".into(),
            });
        }
        Ok(())
    }
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        watch: false,
        audit_interval: None,
        jitter_seed: Some(7),
        ..SchedulerConfig::default()
    }
}

async fn status(node: &Node) -> TestResult<Status> {
    Ok(NodeApi::status(&**node, all_scopes()).await?)
}

async fn link_of(node: &Node, name: &str) -> TestResult<PeerLink> {
    status(node)
        .await?
        .configured_peers
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| format!("{name} is not in the status document").into())
}

/// Waits for the next sync event whose name is `name`, returning the sync events' names
/// seen on the way (and it).
async fn until(events: &mut Subscription, name: &str) -> TestResult<Vec<String>> {
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(notice) = events.recv().await {
            if let Notice::Event(Event::Sync(e)) = notice {
                seen.push(e.name().to_owned());
                if e.name() == name {
                    return Ok(());
                }
            }
        }
        Err("the notifier closed")
    })
    .await??;
    Ok(seen)
}

#[tokio::test(start_paused = true)]
async fn a_configured_peer_is_listed_from_the_start_with_its_failures_and_what_it_lacks(
) -> TestResult {
    let device: Node = Arc::new(SyncEngine::in_memory()?);
    let hub: Node = Arc::new(SyncEngine::in_memory()?);
    let transport = Arc::new(Layered::with_layer(
        InProcess::new(hub.clone()),
        Cable::default(),
    ));
    let cable = transport.layer();
    cable.down.store(true, Ordering::SeqCst);
    let mut events = device.notifier().subscribe();
    let scheduler = Scheduler::start(device.clone(), config());
    scheduler.add_peer("http://hub.example:7447", transport.clone())?;

    // Listed before any round ended.
    let link = link_of(&device, "http://hub.example:7447").await?;
    assert!(!link.connected);
    assert_eq!(link.last_success_unix_ms, None);
    assert_eq!(link.consecutive_failures, 0);

    let seen = until(&mut events, "sync_retry").await?;
    assert_eq!(
        seen,
        ["sync_failed", "sync_retry"],
        "never connected: no change"
    );
    let link = link_of(&device, "http://hub.example:7447").await?;
    assert_eq!(link.consecutive_failures, 1);
    let error = link.last_error.unwrap_or_default();
    assert!(error.contains("the cable is cut"), "{error}");
    assert!(!link.connected);

    // Back up: the retry connects and learns the hub.
    cable.down.store(false, Ordering::SeqCst);
    let seen = until(&mut events, "sync_applied").await?;
    assert_eq!(seen, ["connectivity_changed", "sync_applied"]);
    let link = link_of(&device, "http://hub.example:7447").await?;
    assert!(link.connected);
    assert_eq!(link.id, Some(hub.node_id()));
    assert_eq!(link.consecutive_failures, 0);
    assert!(link.last_success_unix_ms.is_some());
    assert_eq!(link.unacknowledged, 0);
    // The node found there is noted, even though this transport knew its id all along.
    assert_eq!(
        device.expected_peer("http://hub.example:7447")?,
        Some(hub.node_id())
    );

    // Down again; two local writes the hub has not acknowledged.
    cable.down.store(true, Ordering::SeqCst);
    device.put(&notes(), &key("a"), b"1".to_vec())?;
    device.put(&notes(), &key("b"), b"2".to_vec())?;
    let seen = until(&mut events, "sync_retry").await?;
    assert_eq!(seen, ["connectivity_changed", "sync_failed", "sync_retry"]);
    let link = link_of(&device, "http://hub.example:7447").await?;
    assert!(!link.connected);
    assert_eq!(link.unacknowledged, 2);
    let doc = status(&device).await?.to_json();
    assert_eq!(
        doc["configured_peers"][0]["name"],
        "http://hub.example:7447"
    );
    assert_eq!(doc["configured_peers"][0]["unacknowledged"], 2);

    // And the event itself says which way it went.
    cable.down.store(false, Ordering::SeqCst);
    let mut connected = None;
    tokio::time::timeout(PATIENCE, async {
        while let Some(Notice::Event(e)) = events.recv().await {
            if let Event::Sync(SyncEvent::ConnectivityChanged { peer, connected: c }) = e {
                connected = Some((peer, c));
                break;
            }
        }
    })
    .await?;
    assert_eq!(
        connected,
        Some(("http://hub.example:7447".to_owned(), true))
    );
    until(&mut events, "sync_applied").await?;
    assert_eq!(
        link_of(&device, "http://hub.example:7447")
            .await?
            .unacknowledged,
        0
    );
    scheduler.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_skew_halt_is_reported_on_both_sides_and_in_the_status_document() -> TestResult {
    const T0: u32 = 1_700_000_000;
    // The device's clock is two hours ahead of the hub's; the hub allows 5 s.
    let device = mem_node(&ManualTime::at_secs(T0 + 7200))?;
    let hub = mem_node(&ManualTime::at_secs(T0))?;
    device.put(&notes(), &key("ahead"), b"written 2 h ahead".to_vec())?;
    let mut device_events = device.notifier().subscribe();
    let mut hub_events = hub.notifier().subscribe();
    let scheduler = Scheduler::start(device.clone(), config());
    scheduler.add_peer("hub", Arc::new(InProcess::new(hub.clone())))?;
    // First contact ships nothing; the second round pushes the write.
    let mut at_peer = None;
    tokio::time::timeout(PATIENCE, async {
        while let Some(Notice::Event(e)) = device_events.recv().await {
            if let Event::Sync(SyncEvent::SkewAtPeer {
                peer,
                origin,
                ahead_by_ms,
                ..
            }) = e
            {
                at_peer = Some((peer, origin, ahead_by_ms));
                break;
            }
        }
    })
    .await?;
    let (peer, origin, ahead_by_ms) = at_peer.ok_or("no clock_skew_at_peer")?;
    assert_eq!((peer.as_str(), origin), ("hub", device.node_id()));
    assert!(ahead_by_ms >= 7_195_000, "{ahead_by_ms}");
    let mut here = None;
    while let Some(Notice::Event(e)) = hub_events.try_recv() {
        if let Event::Sync(SyncEvent::ClockSkew { origin, .. }) = e {
            here = Some(origin);
        }
    }
    assert_eq!(here, Some(device.node_id()), "the hub published clock_skew");
    until(&mut device_events, "sync_applied").await?;
    let link = link_of(&device, "hub").await?;
    let halted = link
        .halted
        .iter()
        .find(|h| h.by == HaltSide::Peer && h.reason == "clock_skew")
        .ok_or("the halted stream is not shown")?;
    assert_eq!(halted.origin, device.node_id());
    assert!(halted.ahead_by_ms.unwrap_or(0) >= 7_195_000);
    assert_eq!(link.unacknowledged, 1);
    scheduler.shutdown().await?;
    Ok(())
}
