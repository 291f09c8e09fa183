//! Steering the scheduler (issue 18, item 5), on tokio's paused clock: removing a peer,
//! pausing and resuming (going offline on purpose), and per-peer scopes and intervals.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::rounds::{Node, TestResult};
use highwater::api::{all_scopes, NodeApi};
use highwater::notify::{Event, Notice, SyncEvent};
use highwater::{
    InProcess, Key, PeerOptions, Scheduler, SchedulerConfig, SchedulerError, Scope, ScopeFilter,
    SyncEngine,
};

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

fn tags() -> Scope {
    Scope::app("notes", "tags").expect("a valid scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn node() -> TestResult<Node> {
    Ok(Arc::new(SyncEngine::in_memory()?))
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        watch: false,
        audit_interval: None,
        jitter_seed: Some(11),
        ..SchedulerConfig::default()
    }
}

/// Lets the scheduler's tasks run for `d` of paused time.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn a_removed_peer_is_no_longer_synced_nor_shown() -> TestResult {
    let (device, a, b) = (node()?, node()?, node()?);
    let scheduler = Scheduler::start(device.clone(), config());
    let to_a = Arc::new(InProcess::new(a.clone()));
    scheduler.add_peer("a", to_a.clone())?;
    scheduler.add_peer("b", Arc::new(InProcess::new(b.clone())))?;
    run_for(Duration::from_secs(1)).await;
    scheduler.remove_peer("a")?;
    assert!(matches!(
        scheduler.remove_peer("a"),
        Err(SchedulerError::UnknownPeer { .. })
    ));
    run_for(Duration::from_secs(1)).await;
    assert_eq!(
        Arc::strong_count(&to_a),
        1,
        "a's task ended and let go of it"
    );
    device.put(&notes(), &key("after"), b"v".to_vec())?;
    run_for(Duration::from_secs(60)).await;
    assert!(b.get(&notes(), &key("after"))?.is_some());
    assert!(a.get(&notes(), &key("after"))?.is_none(), "a is not synced");
    let names: Vec<String> = scheduler.peers().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["b"]);
    let status = NodeApi::status(&*device, all_scopes()).await?;
    let shown: Vec<&str> = status
        .configured_peers
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(shown, ["b"]);
    scheduler.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_paused_scheduler_syncs_nothing_until_it_resumes() -> TestResult {
    let (device, hub) = (node()?, node()?);
    let scheduler = Scheduler::start(device.clone(), config());
    scheduler.add_peer("hub", Arc::new(InProcess::new(hub.clone())))?;
    run_for(Duration::from_secs(1)).await;
    scheduler.pause();
    device.put(&notes(), &key("offline"), b"v".to_vec())?;
    hub.put(&notes(), &key("from the hub"), b"v".to_vec())?;
    let mut events = device.notifier().subscribe();
    run_for(Duration::from_secs(3600)).await;
    assert!(hub.get(&notes(), &key("offline"))?.is_none());
    assert!(device.get(&notes(), &key("from the hub"))?.is_none());
    let rounds = std::iter::from_fn(|| events.try_recv())
        .filter(|n| matches!(n, Notice::Event(Event::Sync(SyncEvent::Applied { .. }))))
        .count();
    assert_eq!(rounds, 0, "no round while paused");
    assert!(scheduler.peers()[0].paused);
    let status = NodeApi::status(&*device, all_scopes()).await?;
    assert!(status.configured_peers[0].paused);

    scheduler.resume();
    run_for(Duration::from_millis(10)).await;
    assert!(
        hub.get(&notes(), &key("offline"))?.is_some(),
        "a round at once"
    );
    assert!(device.get(&notes(), &key("from the hub"))?.is_some());
    assert!(!scheduler.peers()[0].paused);
    scheduler.shutdown().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn each_peer_syncs_its_own_scopes_on_its_own_interval() -> TestResult {
    let (device, notes_hub, tags_hub) = (node()?, node()?, node()?);
    device.put(&notes(), &key("n"), b"note".to_vec())?;
    device.put(&tags(), &key("t"), b"tag".to_vec())?;
    let mut events = device.notifier().subscribe();
    let scheduler = Scheduler::start(device.clone(), config());
    scheduler.add_peer_with(
        "notes hub",
        Arc::new(InProcess::new(notes_hub.clone())),
        PeerOptions {
            scopes: Some(ScopeFilter::Only([notes()].into())),
            interval: Some(Duration::from_secs(5)),
        },
    )?;
    scheduler.add_peer_with(
        "tags hub",
        Arc::new(InProcess::new(tags_hub.clone())),
        PeerOptions {
            scopes: Some(ScopeFilter::Only([tags()].into())),
            interval: None,
        },
    )?;
    run_for(Duration::from_secs(61)).await;
    assert!(notes_hub.get(&notes(), &key("n"))?.is_some());
    assert!(
        notes_hub.get(&tags(), &key("t"))?.is_none(),
        "tags are not this peer's"
    );
    assert!(tags_hub.get(&tags(), &key("t"))?.is_some());
    assert!(
        tags_hub.get(&notes(), &key("n"))?.is_none(),
        "notes are not this peer's"
    );
    let mut rounds: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(notice) = events.try_recv() {
        if let Notice::Event(Event::Sync(SyncEvent::Applied { peer, .. })) = notice {
            *rounds.entry(peer).or_default() += 1;
        }
    }
    // Every 5 s for one, every 30 s (the default) for the other, over a minute.
    assert!(rounds["notes hub"] >= 12, "{rounds:?}");
    assert!(rounds["tags hub"] <= 4, "{rounds:?}");
    scheduler.shutdown().await?;
    Ok(())
}
