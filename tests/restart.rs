//! Closing and reopening a redb node: its records, tombstones, watermarks, knowledge of
//! peers, clock and node id survive, and a clock that went back does not make it issue an
//! older timestamp. A node restored from a backup takes a fresh id, and the writes it lost
//! come back from its peers.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use highwater::engine::DB_FILE;
use highwater::notify::{Event, Notice, SyncEvent};
use highwater::{
    EngineConfig, ExchangeOutcome, HaltReason, Hash, Hlc, InProcess, Key, ManualTime, NodeId,
    Scope, ScopedWatermarks, SyncEngine, Version,
};

type TestResult = Result<(), Box<dyn Error>>;

fn config(time: &Arc<ManualTime>) -> EngineConfig {
    EngineConfig {
        time: time.clone(),
        ..EngineConfig::default()
    }
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

/// Exchanges from `a` to `b` until neither has more for the other.
fn sync(a: &SyncEngine, b: &Arc<SyncEngine>) -> Result<Vec<ExchangeOutcome>, Box<dyn Error>> {
    let to_b = InProcess::new(b.clone());
    let mut outcomes = Vec::new();
    for _ in 0..16 {
        let outcome = futures_executor::block_on(a.exchange(&to_b))?;
        let more = outcome.has_more;
        outcomes.push(outcome);
        if !more {
            return Ok(outcomes);
        }
    }
    Err(format!("still has_more after 16 rounds: {outcomes:?}").into())
}

/// Everything of a node that a restart must keep.
#[derive(Debug, PartialEq)]
struct Durable {
    id: NodeId,
    digest: Hash,
    versions: Vec<(Scope, Vec<(Key, Version)>)>,
    watermarks: ScopedWatermarks,
    peers: Vec<NodeId>,
    knowledge: Option<ScopedWatermarks>,
    clock: u64,
}

fn durable(node: &SyncEngine, peer: NodeId) -> Result<Durable, Box<dyn Error>> {
    let mut versions = Vec::new();
    for scope in node.scopes()? {
        let rows = node.versions(&scope)?;
        versions.push((scope, rows));
    }
    Ok(Durable {
        id: node.node_id(),
        digest: node.digest()?,
        versions,
        watermarks: node.watermarks()?,
        peers: node.peers()?,
        knowledge: node.peer_watermarks(peer)?,
        clock: node.clock_time(),
    })
}

#[test]
fn a_reopened_node_keeps_its_state_and_never_issues_an_older_timestamp() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a_dir = dir.path().join("a");
    let a_time = ManualTime::at_secs(1_700_000_000);
    // B's clock runs 3 s ahead of A's (inside the 5 s drift bound), so A's clock moves past
    // its own physical time when it observes B's versions.
    let b_time = ManualTime::at_secs(1_700_000_003);
    let b = Arc::new(SyncEngine::in_memory_with(config(&b_time))?);
    let notes = Scope::app("notes", "items")?;
    let shared = Scope::shared();

    let a = SyncEngine::open_with(&a_dir, config(&a_time))?;
    // Every Hlc A issued or observed before the restart.
    let mut seen: Vec<Hlc> = vec![
        a.put(&notes, &key("n1"), b"one".to_vec())?,
        a.put(&shared, &key("s1"), b"shared one".to_vec())?,
        a.delete(&notes, &key("n1"))?,
        b.put(&notes, &key("n2"), b"from b".to_vec())?,
    ];
    b_time.advance(Duration::from_secs(1));
    seen.push(b.put(&shared, &key("s2"), b"later from b".to_vec())?);
    sync(&a, &b)?;
    assert_eq!(
        a.digest()?,
        b.digest()?,
        "the nodes converged before the restart"
    );
    let latest = seen.iter().map(Hlc::time).max().ok_or("no writes")?;
    assert!(a.clock_time() >= latest, "A observed B's timestamps");

    let before = durable(&a, b.node_id())?;
    assert_eq!(
        before.knowledge,
        Some(b.watermarks()?),
        "A knows B's watermarks"
    );
    assert_eq!(before.peers, vec![b.node_id()]);
    drop(a);

    let a = SyncEngine::open_with(&a_dir, config(&a_time))?;
    assert_eq!(durable(&a, b.node_id())?, before);
    assert_eq!(a.get(&notes, &key("n1"))?, None);
    assert!(
        a.get_version(&notes, &key("n1"))?
            .is_some_and(|v| v.is_tombstone()),
        "the tombstone survived"
    );
    assert_eq!(
        a.get(&notes, &key("n2"))?.map(|r| r.value),
        Some(b"from b".to_vec())
    );

    // The wall clock goes back an hour: the next write is still the newest timestamp.
    a_time.rewind(Duration::from_secs(3600));
    let next = a.put(&notes, &key("n3"), b"after the restart".to_vec())?;
    for h in &seen {
        assert!(next.time() > h.time(), "{next:?} is not after {h:?}");
    }
    assert!(next.time() > before.clock);
    // And it syncs like any other write.
    sync(&a, &b)?;
    assert_eq!(b.get(&notes, &key("n3"))?.map(|r| r.hlc), Some(next));
    assert_eq!(a.digest()?, b.digest()?);
    Ok(())
}

#[test]
fn the_node_id_survives_a_reopen_and_a_restore_picks_a_new_one() -> TestResult {
    let dir = tempfile::tempdir()?;
    let time = ManualTime::at_secs(1_700_000_000);
    let first = SyncEngine::open_with(dir.path(), config(&time))?.node_id();
    assert_eq!(
        SyncEngine::open_with(dir.path(), config(&time))?.node_id(),
        first
    );
    let restored = SyncEngine::open_restored(dir.path(), config(&time))?.node_id();
    assert_ne!(restored, first);
    assert_eq!(
        SyncEngine::open_with(dir.path(), config(&time))?.node_id(),
        restored,
        "the new id is the stored id from then on"
    );
    Ok(())
}

/// Node A writes `lost` after a backup, ships it to B, and is then put back to the backup.
struct Restore {
    _dir: tempfile::TempDir,
    a_dir: std::path::PathBuf,
    time: Arc<ManualTime>,
    b: Arc<SyncEngine>,
    old_id: NodeId,
    lost: Hlc,
}

fn lose_a_write() -> Result<Restore, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let a_dir = dir.path().join("a");
    let backup = dir.path().join("backup.redb");
    let time = ManualTime::at_secs(1_700_000_000);
    let b = Arc::new(SyncEngine::in_memory_with(config(&time))?);
    let notes = Scope::app("notes", "items")?;

    let a = SyncEngine::open_with(&a_dir, config(&time))?;
    let old_id = a.node_id();
    a.put(&notes, &key("kept"), b"before the backup".to_vec())?;
    b.put(&notes, &key("from b"), b"b".to_vec())?;
    sync(&a, &b)?;
    drop(a);
    std::fs::copy(a_dir.join(DB_FILE), &backup)?;

    time.advance(Duration::from_secs(1));
    let a = SyncEngine::open_with(&a_dir, config(&time))?;
    let lost = a.put(&notes, &key("lost"), b"after the backup".to_vec())?;
    sync(&a, &b)?;
    assert_eq!(
        b.get(&notes, &key("lost"))?.map(|r| r.hlc),
        Some(lost),
        "B holds the write"
    );
    drop(a);

    std::fs::copy(&backup, a_dir.join(DB_FILE))?;
    time.advance(Duration::from_secs(1));
    Ok(Restore {
        _dir: dir,
        a_dir,
        time,
        b,
        old_id,
        lost,
    })
}

#[test]
fn a_restored_node_takes_a_new_id_and_gets_its_lost_write_back() -> TestResult {
    let r = lose_a_write()?;
    let notes = Scope::app("notes", "items")?;
    let a = SyncEngine::open_restored(&r.a_dir, config(&r.time))?;
    assert_ne!(a.node_id(), r.old_id);
    assert_eq!(
        a.get(&notes, &key("lost"))?,
        None,
        "the backup predates the write"
    );
    assert!(a.get(&notes, &key("kept"))?.is_some());

    let outcomes = sync(&a, &r.b)?;
    assert!(
        outcomes
            .iter()
            .all(|o| o.halts.is_empty() && o.peer_halts.is_empty()),
        "{outcomes:?}"
    );
    let back = a
        .get_version(&notes, &key("lost"))?
        .ok_or("the lost write did not come back")?;
    assert_eq!(back.hlc, r.lost);
    assert_eq!(
        back.hlc.origin(),
        r.old_id,
        "under the old id, now an ordinary origin"
    );
    assert_eq!(a.digest()?, r.b.digest()?);
    assert_eq!(a.watermarks()?, r.b.watermarks()?);

    // New writes go out under the new id.
    let fresh = a.put(&notes, &key("fresh"), b"new id".to_vec())?;
    assert_eq!(fresh.origin(), a.node_id());
    assert!(fresh > r.lost);
    sync(&a, &r.b)?;
    assert_eq!(a.digest()?, r.b.digest()?);
    Ok(())
}

/// Reopened under its old id (no operator action), the restored node finds out on its first
/// round: the peer's marks show writes by its id above its own mark. It takes a fresh id,
/// durably, before it issues another timestamp, says so in an event, and its lost write comes
/// back under the old id as an ordinary origin.
#[test]
fn a_backup_reopened_under_its_old_id_detects_the_restore_and_takes_a_fresh_id() -> TestResult {
    let r = lose_a_write()?;
    let notes = Scope::app("notes", "items")?;
    let a = SyncEngine::open_with(&r.a_dir, config(&r.time))?;
    assert_eq!(a.node_id(), r.old_id);
    let mut events = a.notifier().subscribe();
    let outcomes = sync(&a, &r.b)?;
    assert!(
        outcomes
            .iter()
            .all(|o| o.halts.is_empty() && o.peer_halts.is_empty()),
        "{outcomes:?}"
    );
    let new_id = a.node_id();
    assert_ne!(new_id, r.old_id);
    let detected = std::iter::from_fn(|| events.try_recv())
        .find_map(|n| match n {
            Notice::Event(Event::Sync(e @ SyncEvent::RestoreDetected { .. })) => Some(e),
            _ => None,
        })
        .ok_or("no restore_detected event")?;
    match detected {
        SyncEvent::RestoreDetected {
            old, new, theirs, ..
        } => {
            assert_eq!((old, new), (r.old_id, new_id));
            assert!(theirs >= r.lost);
        }
        _ => unreachable!(),
    }
    let back = a
        .get_version(&notes, &key("lost"))?
        .ok_or("the lost write did not come back")?;
    assert_eq!(back.hlc, r.lost);
    assert_eq!(a.digest()?, r.b.digest()?);

    // The new id is durable, and new writes go out under it, after every lost timestamp.
    drop(a);
    let a = SyncEngine::open_with(&r.a_dir, config(&r.time))?;
    assert_eq!(a.node_id(), new_id);
    let fresh = a.put(&notes, &key("fresh"), b"new id".to_vec())?;
    assert_eq!(fresh.origin(), new_id);
    assert!(fresh > r.lost);
    sync(&a, &r.b)?;
    assert_eq!(a.digest()?, r.b.digest()?);
    Ok(())
}

/// As a responder, a node acts only on evidence it may trust: by default an initiator's claim
/// halts its run of our id and changes nothing; with `RestoreDetection::Any` the responder
/// takes a fresh id and applies the lost write.
#[test]
fn a_restored_responder_acts_on_an_initiators_evidence_only_when_told_to() -> TestResult {
    let r = lose_a_write()?;
    let notes = Scope::app("notes", "items")?;
    let rounds = |a: &Arc<SyncEngine>| -> Result<Vec<ExchangeOutcome>, Box<dyn Error>> {
        let link = InProcess::new(a.clone());
        let mut outcomes = Vec::new();
        for _ in 0..4 {
            outcomes.push(futures_executor::block_on(r.b.exchange(&link))?);
        }
        Ok(outcomes)
    };
    let a = Arc::new(SyncEngine::open_with(&r.a_dir, config(&r.time))?);
    let outcomes = rounds(&a)?;
    assert!(
        outcomes
            .iter()
            .flat_map(|o| &o.peer_halts)
            .any(|h| h.origin == r.old_id && h.reason == HaltReason::OwnOrigin),
        "{outcomes:?}"
    );
    assert_eq!(
        a.node_id(),
        r.old_id,
        "an initiator's claim alone changes nothing"
    );
    assert_eq!(a.get(&notes, &key("lost"))?, None);
    drop(a);

    let trusting = EngineConfig {
        restore_detection: highwater::RestoreDetection::Any,
        ..config(&r.time)
    };
    let a = Arc::new(SyncEngine::open_with(&r.a_dir, trusting)?);
    let outcomes = rounds(&a)?;
    assert!(
        outcomes.iter().all(|o| o.peer_halts.is_empty()),
        "{outcomes:?}"
    );
    assert_ne!(a.node_id(), r.old_id);
    assert_eq!(
        a.get_version(&notes, &key("lost"))?.map(|v| v.hlc),
        Some(r.lost)
    );
    Ok(())
}
