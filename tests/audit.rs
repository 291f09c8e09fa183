//! The audit round compares live contents, not watermarks, and repairs every difference both
//! ways without moving a mark: two replicas whose marks agree but whose data differs (each
//! lost versions the other holds) end equal, and a second audit finds nothing.

mod common;

use std::sync::Arc;

use common::rounds::{config, link, sync, TestResult};
use futures_executor::block_on;
use highwater::blob::{BlobStore, MemBlobStore};
use highwater::store::{Advance, Batch, Durability, MemStore, Store};
use highwater::{
    Hlc, Key, ManualTime, Op, Residency, Scope, ScopedWatermarks, SyncEngine, Version,
};

const T0: u32 = 1_700_000_000;

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

/// A replica on a store the test can write to behind the engine's back.
fn replica(time: &Arc<ManualTime>) -> TestResult<(Arc<SyncEngine>, Arc<MemStore>)> {
    let store = Arc::new(MemStore::new());
    let engine = SyncEngine::with_store(Box::new(store.clone()), config(time))?;
    Ok((Arc::new(engine), store))
}

/// Copies every version of `from` into `into` except `skip`, and sets `into`'s marks to
/// `marks`: a replica whose marks claim what it does not hold (as after a lossy restore).
fn copy_except(
    from: &SyncEngine,
    into: &MemStore,
    skip: &[&str],
    marks: &ScopedWatermarks,
) -> TestResult {
    let mut batch = Batch::new(from.clock_time(), Durability::Immediate);
    for scope in from.scopes()? {
        for (k, v) in from.versions(&scope)? {
            if !skip.iter().any(|s| key(s) == k) {
                batch.upserts.push((scope.clone(), k, v));
            }
        }
    }
    for (scope, w) in marks.iter() {
        for top in w.iter() {
            batch.advances.push(Advance {
                scope: scope.clone(),
                base: None,
                top,
            });
        }
    }
    into.commit(&batch)?;
    Ok(())
}

/// A and B agree on their marks; B lacks `n3` and `n7`, A lacks `extra` (a version of A's
/// own id under its mark, which B holds).
fn diverged() -> TestResult<(Arc<SyncEngine>, Arc<SyncEngine>, Arc<MemStore>)> {
    let time = ManualTime::at_secs(T0);
    let (a, a_store) = replica(&time)?;
    let (b, b_store) = replica(&time)?;
    for i in 0..10 {
        a.put(
            &notes(),
            &key(&format!("n{i}")),
            format!("v{i}").into_bytes(),
        )?;
    }
    sync(&b, &link(&a))?;
    let marks = a.watermarks()?;
    // B is rebuilt without two of A's versions; a version of A's id that only B holds goes
    // in under the marks both agree on.
    let (rebuilt, rebuilt_store) = replica(&time)?;
    copy_except(&b, &rebuilt_store, &["n3", "n7"], &marks)?;
    // Under A's mark, at a time A never wrote at (A's writes are at consecutive times
    // from T0 on).
    let first = a
        .get_version(&notes(), &key("n0"))?
        .ok_or("A wrote n0")?
        .hlc;
    let extra = Version {
        hlc: Hlc::new(first.time() - 5, a.node_id()),
        op: Op::Put {
            value: b"only on b".to_vec(),
            blob: None,
        },
    };
    let mut batch = Batch::new(0, Durability::Immediate);
    batch.upserts.push((notes(), key("extra"), extra));
    rebuilt_store.commit(&batch)?;
    drop((b, b_store, a_store));
    Ok((a, rebuilt, rebuilt_store))
}

#[test]
fn an_audit_repairs_what_equal_marks_hide_and_moves_no_mark() -> TestResult {
    let (a, b, _) = diverged()?;
    let marks = (a.watermarks()?, b.watermarks()?);
    assert_eq!(marks.0, marks.1, "the marks agree");
    // Rounds see nothing to do.
    let out = block_on(a.exchange(&link(&b)))?;
    assert_eq!((out.shipped, out.received, out.has_more), (0, 0, false));
    assert_ne!(a.digest()?, b.digest()?);

    let out = block_on(a.audit(&link(&b)))?;
    assert_eq!(out.peer, Some(b.node_id()));
    assert_eq!(out.received, 1, "A gets the version only B held: {out:?}");
    assert_eq!(out.repaired, vec![(notes(), key("extra"))]);
    assert_eq!(out.shipped, 2, "B gets the two versions it lacked: {out:?}");
    assert!(out.halts.is_empty() && out.peer_halts.is_empty(), "{out:?}");
    assert_eq!(a.digest()?, b.digest()?);
    assert_eq!(
        b.get(&notes(), &key("n3"))?.map(|r| r.value),
        Some(b"v3".to_vec())
    );
    assert_eq!(a.watermarks()?, marks.0, "no mark moved on A");
    assert_eq!(b.watermarks()?, marks.1, "no mark moved on B");

    // A second audit, from either side, finds nothing.
    let again = block_on(a.audit(&link(&b)))?;
    assert!(again.clean(), "{again:?}");
    assert_eq!(again.rounds, 1);
    let back = block_on(b.audit(&link(&a)))?;
    assert!(back.clean(), "{back:?}");
    Ok(())
}

#[test]
fn an_audit_of_equal_replicas_is_one_small_round_trip() -> TestResult {
    let time = ManualTime::at_secs(T0);
    let (a, _) = replica(&time)?;
    let (b, _) = replica(&time)?;
    for i in 0..500 {
        a.put(&notes(), &key(&format!("n{i}")), vec![7; 40])?;
        b.put(&Scope::shared(), &key(&format!("s{i}")), vec![9; 40])?;
    }
    sync(&a, &link(&b))?;
    let to_b = link(&b);
    let out = block_on(a.audit(&to_b))?;
    assert!(out.clean(), "{out:?}");
    let stats = to_b.stats();
    assert_eq!((out.rounds, stats.requests), (1, 1));
    assert!(
        stats.bytes_sent + stats.bytes_received < 200,
        "{} bytes sent, {} received",
        stats.bytes_sent,
        stats.bytes_received
    );
    Ok(())
}

#[test]
fn an_audit_brings_a_scope_the_initiator_does_not_hold() -> TestResult {
    let time = ManualTime::at_secs(T0);
    let (a, _) = replica(&time)?;
    let (b, b_store) = replica(&time)?;
    for i in 0..50 {
        a.put(&notes(), &key(&format!("n{i}")), vec![1; 10])?;
    }
    copy_except(&a, &b_store, &[], &a.watermarks()?)?;
    // C holds nothing and asks about no scope: B opens the ones C does not name.
    let (c, _) = replica(&time)?;
    let out = block_on(c.audit(&link(&b)))?;
    assert_eq!(out.received, 50, "{out:?}");
    assert_eq!(c.digest()?, b.digest()?);
    assert_eq!(
        c.watermarks()?,
        ScopedWatermarks::new(),
        "marks stay for rounds to move"
    );
    Ok(())
}

/// The scheduler audits each peer on its interval (jittered), when the peer is idle (the
/// audit wakes it on its own: no round runs for it), and shows the last audit in its status.
#[tokio::test(start_paused = true)]
async fn the_scheduler_audits_each_peer_on_its_interval() -> TestResult {
    use highwater::notify::{Event, Notice, SyncEvent};
    use highwater::{Scheduler, SchedulerConfig};
    use std::time::Duration;

    async fn next_audit(
        events: &mut highwater::notify::Subscription,
        started: tokio::time::Instant,
    ) -> TestResult<(Duration, SyncEvent, usize)> {
        let mut rounds = 0;
        loop {
            let notice = tokio::time::timeout(Duration::from_secs(3600), events.recv())
                .await?
                .ok_or("the notifier is gone")?;
            match notice {
                Notice::Event(Event::Sync(e @ SyncEvent::AuditCompleted { .. })) => {
                    return Ok((started.elapsed(), e, rounds));
                }
                Notice::Event(Event::Sync(SyncEvent::Applied { .. })) => rounds += 1,
                _ => {}
            }
        }
    }

    let (a, b, _) = diverged()?;
    let mut events = a.notifier().subscribe();
    let config = SchedulerConfig {
        audit_interval: Some(Duration::from_secs(600)),
        interval: Duration::from_secs(3600),
        ..SchedulerConfig::default()
    };
    let started = tokio::time::Instant::now();
    let scheduler = Scheduler::start(a.clone(), config);
    scheduler.add_peer("b", Arc::new(link(&b)))?;
    let (first_at, first, rounds) = next_audit(&mut events, started).await?;
    assert!(
        (Duration::from_secs(540)..=Duration::from_secs(661)).contains(&first_at),
        "the audit came after {first_at:?}"
    );
    assert_eq!(rounds, 1, "the first round, then the audit on its own");
    assert!(
        matches!(&first, SyncEvent::AuditCompleted { peer, received: 1, repaired: 1, shipped: 2, .. } if peer == "b"),
        "{first:?}"
    );
    assert_eq!(a.digest()?, b.digest()?);
    let status = scheduler.peers().remove(0);
    let (_, result) = status.last_audit.ok_or("no audit in the status")?;
    assert_eq!(result?.repaired, vec![(notes(), key("extra"))]);

    let (second_at, second, rounds) = next_audit(&mut events, started).await?;
    let gap = second_at - first_at;
    assert!(
        (Duration::from_secs(540)..=Duration::from_secs(661)).contains(&gap),
        "the second audit came {gap:?} after the first"
    );
    assert_eq!(rounds, 0, "no round between the audits");
    assert!(
        matches!(
            &second,
            SyncEvent::AuditCompleted {
                received: 0,
                shipped: 0,
                ..
            }
        ),
        "{second:?}"
    );
    scheduler.shutdown().await?;
    Ok(())
}

/// The bytes of the file of the record under `key`, if it is local.
fn file_bytes(node: &SyncEngine, scope: &Scope, key: &Key) -> TestResult<Option<Vec<u8>>> {
    let Some((_, mut reader)) = node.open_file(scope, key)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut out)?;
    Ok(Some(out))
}

/// A node whose blob store lost a file (a blob directory not restored with its database)
/// holds the record Staged, and no round brings the file again: the marks already passed
/// it. An audit lists the blobs its records reference, finds the missing one and fetches it
/// by hash from the peer, which holds it.
#[test]
fn an_audit_fetches_the_files_a_node_lost_from_a_peer_that_holds_them() -> TestResult {
    let time = ManualTime::at_secs(T0);
    let (a, _) = replica(&time)?;
    let blobs = Arc::new(MemBlobStore::new());
    let b = Arc::new(SyncEngine::with_stores(
        Box::new(MemStore::new()),
        blobs.clone(),
        config(&time),
    )?);
    let (photo, doc) = (key("photo"), key("doc"));
    a.put_file_bytes(&notes(), &photo, "a photo", b"the photo's bytes")?;
    a.put_file_bytes(
        &Scope::shared(),
        &doc,
        "a document",
        b"the document's bytes",
    )?;
    a.put(&notes(), &key("plain"), b"no file".to_vec())?;
    sync(&b, &link(&a))?;
    assert_eq!(b.residency(&notes(), &photo)?, Residency::Resident);

    let lost = b
        .get(&notes(), &photo)?
        .and_then(|r| r.blob)
        .ok_or("the photo has a file")?;
    assert!(blobs.remove(&lost.hash)?, "B held the photo's file");
    assert_eq!(b.residency(&notes(), &photo)?, Residency::Staged);
    assert_eq!(b.staged_files()?, 1, "the one lost file is counted");
    let out = block_on(b.exchange(&link(&a)))?;
    assert_eq!(
        (out.shipped, out.received),
        (0, 0),
        "a round brings nothing"
    );
    assert_eq!(b.residency(&notes(), &photo)?, Residency::Staged);

    let out = block_on(b.audit(&link(&a)))?;
    assert_eq!(out.files_repaired, 1, "{out:?}");
    assert_eq!((out.received, out.shipped), (0, 0), "{out:?}");
    assert_eq!(b.residency(&notes(), &photo)?, Residency::Resident);
    assert_eq!(
        file_bytes(&b, &notes(), &photo)?,
        Some(b"the photo's bytes".to_vec())
    );
    assert_eq!(b.residency(&Scope::shared(), &doc)?, Residency::Resident);
    assert_eq!(b.staged_files()?, 0);
    // Nothing is missing any more: a second audit finds nothing.
    let again = block_on(b.audit(&link(&a)))?;
    assert!(again.clean(), "{again:?}");
    Ok(())
}

#[test]
fn an_initiator_ships_none_of_the_versions_that_the_ones_it_receives_replace() -> TestResult {
    // Sizes at which the initiator compares the items of a range holding an old version
    // before, with or after the range holding the new ones.
    for n in [10, 300, 2_000, 6_000] {
        let time = ManualTime::at_secs(T0);
        let (a, _) = replica(&time)?;
        let (b, _) = replica(&time)?;
        let put = |i: u64, v: u8| {
            let op = Op::Put {
                value: vec![v; 8],
                blob: None,
            };
            (notes(), key(&format!("n{i}")), op)
        };
        a.write_batch((0..n).map(|i| put(i, 0)))?;
        sync(&b, &link(&a))?;
        a.write_batch((0..5).map(|j| put(j * n / 5, 1)))?;
        // B's five old versions are items A lacks, and A's five new ones items B lacks: B
        // receives A's, which replace its own, so it has nothing left to ship.
        let out = block_on(b.audit(&link(&a)))?;
        assert_eq!(
            (out.received, out.repaired.len(), out.shipped),
            (5, 5, 0),
            "{n} records: {out:?}"
        );
        assert_eq!(a.digest()?, b.digest()?);
        assert!(block_on(b.audit(&link(&a)))?.clean());
    }
    Ok(())
}

/// What an audit of `d` keys updated on one side among `n` records of one origin may move
/// each way, from the layout of its messages (docs/protocol.md, "Costs"), with the times of
/// a manual clock (consecutive versions one time unit apart):
///
/// - ranges: a differing range of more than `ITEMS_AT` items is split into `FANOUT` parts,
///   level by level, until a part holds at most `ITEMS_AT`. At level `k`, where a range
///   holds `s = n / FANOUT^k` items, at most `d + d / s + 1` ranges differ (rounded up): the
///   `d` replaced versions may each lie in a range of their own, the `d` new ones follow each
///   other at the end of the origin. A part costs its count (3 bytes up to 2^20 items), its
///   8-byte sum and its end as a time delta (3 bytes up to 2^19 units); a segment adds its
///   start and part count (4 bytes);
/// - item lists: as many ranges at the last level, each of at most `ITEMS_AT` items, one
///   byte per item (a delta of one unit), 2 bytes of head;
/// - versions: `d` (key, value, a 16-byte origin, a 10-byte time, 4 bytes of lengths and tags);
/// - wants: one point per version, 3 bytes;
/// - every message names the scope and the origin once, about 64 bytes.
fn audit_bytes_bound(n: u64, d: u64, key_len: u64, value_len: u64) -> u64 {
    use highwater::exchange::audit::{FANOUT, ITEMS_AT};
    let fanout = FANOUT as u64;
    let differing = |level: u32, size: u64| fanout.pow(level).min(d + d.div_ceil(size) + 1);
    let (mut level, mut size, mut split) = (0u32, n, 0u64);
    while size > ITEMS_AT {
        split += differing(level, size);
        level += 1;
        size = size.div_ceil(fanout);
    }
    let parts = split * (fanout * (3 + 8 + 3) + 4);
    let items = differing(level, size) * (ITEMS_AT + 2);
    let versions = d * (key_len + value_len + 16 + 10 + 4);
    let wants = 3 * d;
    let messages = 2 * (u64::from(level) + 3) * 64;
    parts + items + versions + wants + messages
}

#[test]
fn an_audit_of_100_updates_among_20_000_records_moves_what_its_layout_allows() -> TestResult {
    const N: u64 = 20_000;
    const D: u64 = 100;
    let time = ManualTime::at_secs(T0);
    let (a, _) = replica(&time)?;
    let (b, _) = replica(&time)?;
    let put = |i: u64, v: u8| {
        (
            notes(),
            key(&format!("r{i:05}")),
            Op::Put {
                value: vec![v; 8],
                blob: None,
            },
        )
    };
    for batch in (0..N).collect::<Vec<_>>().chunks(1000) {
        a.write_batch(batch.iter().map(|&i| put(i, 0)))?;
    }
    sync(&b, &link(&a))?;
    // D keys spread over the store, updated on A only: their old versions lie spread over
    // B's order, their new ones at the end of A's.
    let updated: Vec<u64> = (0..D).map(|j| j * (N / D) + 7).collect();
    a.write_batch(updated.iter().map(|&i| put(i, 1)))?;

    let to_a = link(&a);
    let out = block_on(b.audit(&to_a))?;
    let mut want: Vec<_> = updated
        .iter()
        .map(|i| (notes(), key(&format!("r{i:05}"))))
        .collect();
    want.sort();
    let mut repaired = out.repaired.clone();
    repaired.sort();
    assert_eq!(repaired, want);
    assert_eq!(a.digest()?, b.digest()?);
    let stats = to_a.stats();
    let bound = audit_bytes_bound(N, D, 6, 8);
    assert!(
        stats.bytes_sent <= bound && stats.bytes_received <= bound,
        "{} bytes sent, {} received: more than the {bound} the layout allows",
        stats.bytes_sent,
        stats.bytes_received
    );
    assert!(block_on(b.audit(&to_a))?.clean());
    Ok(())
}
