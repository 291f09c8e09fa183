//! Forgetting safely: tombstones purged past the retention once every peer holds them, with
//! a floor that refuses what would bring a purged delete back, peers not seen for months
//! retired, and a peer that comes back after too long re-cloning through an audit: it keeps
//! what nobody acknowledged and loses exactly the deleted records, with an event naming
//! them.

mod common;

use std::time::Duration;

use common::rounds::{link, mem_node, sync, Node, TestResult};
use futures_executor::block_on;
use highwater::notify::{Event, Notice, Subscription, SyncEvent};
use highwater::{Halt, HaltReason, Key, ManualTime, Scope};

const T0: u32 = 1_700_000_000;
const DAY: Duration = Duration::from_secs(24 * 3600);

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

/// The keys of every `floor_refused` event waiting in `events`, with whether they were
/// dropped here.
fn refusals(events: &mut Subscription) -> Vec<(Vec<Key>, bool)> {
    let mut out = Vec::new();
    while let Some(notice) = events.try_recv() {
        if let Notice::Event(Event::Sync(SyncEvent::FloorRefused { keys, dropped, .. })) = notice {
            out.push((keys, dropped));
        }
    }
    out
}

fn live_keys(node: &Node) -> TestResult<Vec<Key>> {
    Ok(node
        .versions(&notes())?
        .into_iter()
        .filter(|(_, v)| !matches!(v.op, highwater::Op::Delete))
        .map(|(k, _)| k)
        .collect())
}

#[test]
fn a_tombstone_is_purged_only_past_the_retention_and_once_every_peer_holds_it() -> TestResult {
    let time = ManualTime::at_secs(T0);
    let hub = mem_node(&time)?;
    let a = mem_node(&time)?;
    let b = mem_node(&time)?;
    a.put(&notes(), &key("k"), b"v".to_vec())?;
    sync(&a, &link(&hub))?;
    sync(&b, &link(&hub))?;
    a.delete(&notes(), &key("k"))?;
    sync(&a, &link(&hub))?;

    // Not past the retention yet.
    time.advance(29 * DAY);
    assert_eq!(hub.purge()?.purged, 0);
    // Past it, but b (which the hub knows) has not got the delete: not stable.
    time.advance(2 * DAY);
    let report = hub.purge()?;
    assert_eq!(report.purged, 0, "{report:?}");
    assert!(hub.get_version(&notes(), &key("k"))?.is_some());

    // b takes the delete; now every peer the hub knows holds it.
    sync(&b, &link(&hub))?;
    let report = hub.purge()?;
    assert_eq!(report.purged, 1, "{report:?}");
    assert_eq!(hub.get_version(&notes(), &key("k"))?, None);
    let floor = report.floors[&notes()];
    assert!(floor > 0);
    assert_eq!(hub.floors()?.get(&notes()), Some(&floor));
    // A second pass finds nothing, and the devices purge on their own schedule.
    assert_eq!(hub.purge()?.purged, 0);
    assert_eq!(a.purge()?.purged, 1);
    Ok(())
}

#[test]
fn a_peer_back_after_too_long_reclones_keeps_its_own_writes_and_loses_the_deleted_ones(
) -> TestResult {
    let time = ManualTime::at_secs(T0);
    let hub = mem_node(&time)?;
    let a = mem_node(&time)?;
    let b = mem_node(&time)?;
    a.put(&notes(), &key("deleted"), b"old".to_vec())?;
    a.put(&notes(), &key("kept"), b"kept".to_vec())?;
    sync(&a, &link(&hub))?;
    sync(&b, &link(&hub))?;

    // b goes offline and writes at once; a deletes, and the hub hears nothing of b again.
    b.put(&notes(), &key("early"), b"b's, before the delete".to_vec())?;
    a.delete(&notes(), &key("deleted"))?;
    sync(&a, &link(&hub))?;
    for month in 0..4 {
        time.advance(30 * DAY);
        sync(&a, &link(&hub))?;
        if month == 1 {
            // Two months in, b writes again: after every delete the hub will purge.
            b.put(&notes(), &key("later"), b"b's, after the delete".to_vec())?;
        }
    }
    // 120 days: b is retired at the hub (a was seen since), so the purge waits for it no
    // longer, and the tombstone goes.
    let report = hub.purge()?;
    assert_eq!(report.retired_peers, vec![b.node_id()], "{report:?}");
    assert_eq!(report.purged, 1, "{report:?}");
    assert_eq!(hub.get_version(&notes(), &key("deleted"))?, None);

    // b comes back. Its exchange hears the hub's floor rise and asks for an audit. b's own
    // writes go to the hub: the hub never heard of b as a writer, so the one at or below its
    // floor ("early", older than the purged delete) is refused, as an older write of a
    // purged key would be, and b is told; the later one is taken. The audit then ships b's
    // copy of the deleted record, the hub refuses it, and b drops it.
    let b_events = b.notifier().subscribe();
    let hub_events = hub.notifier().subscribe();
    let (mut audit_wanted, mut dropped, mut peer_halts) = (false, 0, Vec::new());
    loop {
        let out = block_on(b.exchange(&link(&hub)))?;
        audit_wanted |= out.audit_wanted;
        dropped += out.dropped;
        peer_halts.extend(out.peer_halts);
        assert!(out.halts.is_empty(), "b refused nothing: {:?}", out.halts);
        if !out.has_more {
            break;
        }
    }
    assert!(audit_wanted, "the hub's floor rose since b last heard");
    // b learns each refusal as a halt of its own reason, which held nothing: its later write
    // of the same stream went through.
    let below_floor = |origin, versions| Halt {
        scope: notes(),
        origin,
        reason: HaltReason::BelowFloor { versions },
    };
    assert_eq!(peer_halts, vec![below_floor(b.node_id(), 1)]);
    assert!(!peer_halts[0].holds_stream());
    assert!(hub.get_version(&notes(), &key("later"))?.is_some());
    let audit = block_on(b.audit(&link(&hub)))?;
    dropped += audit.dropped;
    assert_eq!(dropped, 2, "{audit:?}");
    assert_eq!(audit.peer_halts, vec![below_floor(a.node_id(), 1)]);
    assert_eq!(b.get_version(&notes(), &key("deleted"))?, None);
    let keys = |mut events| {
        let mut all: Vec<(Key, bool)> = refusals(&mut events)
            .into_iter()
            .flat_map(|(keys, dropped)| keys.into_iter().map(move |k| (k, dropped)))
            .collect();
        all.sort();
        all
    };
    assert_eq!(
        keys(b_events),
        vec![(key("deleted"), true), (key("early"), true)],
        "b is told of every version it lost, by key"
    );
    assert_eq!(
        keys(hub_events),
        vec![(key("deleted"), false), (key("early"), false)]
    );

    // Nothing deleted came back anywhere, b's later write is everywhere, and a second audit
    // finds nothing.
    for node in [&hub, &b] {
        assert_eq!(live_keys(node)?, vec![key("kept"), key("later")]);
    }
    assert!(block_on(b.audit(&link(&hub)))?.clean());
    sync(&a, &link(&hub))?;
    assert_eq!(live_keys(&a)?, vec![key("kept"), key("later")]);
    Ok(())
}

#[test]
fn a_peer_cannot_make_a_node_drop_recent_writes() -> TestResult {
    let time = ManualTime::at_secs(T0);
    let hub = mem_node(&time)?;
    let a = mem_node(&time)?;
    let written = a.put(&notes(), &key("fresh"), b"v".to_vec())?;
    sync(&a, &link(&hub))?;
    // A forged refusal of a recent version (as a token holder could send): kept.
    let forged = highwater::wire::AuditRequest {
        from: highwater::NodeId::random(),
        scopes: highwater::ScopeFilter::All,
        opening: false,
        segments: Vec::new(),
        versions: Vec::new(),
        wanted: Vec::new(),
        ext: highwater::wire::AuditExt {
            floors: Some(vec![(notes(), u64::MAX)]),
            refused: vec![(notes(), key("fresh"), written)],
        },
    };
    hub.answer_audit(forged)?;
    assert!(hub.get_version(&notes(), &key("fresh"))?.is_some());
    Ok(())
}

#[test]
fn retired_origins_lose_their_marks_once_every_peer_retired_them() -> TestResult {
    let time = ManualTime::at_secs(T0);
    let hub = mem_node(&time)?;
    let devices: Vec<Node> = (0..20).map(|_| mem_node(&time)).collect::<Result<_, _>>()?;
    for (i, d) in devices.iter().enumerate() {
        let k = key(&format!("k{i}"));
        d.put(&notes(), &k, b"v".to_vec())?;
        d.delete(&notes(), &k)?;
        sync(d, &link(&hub))?;
    }
    let keeper = mem_node(&time)?;
    keeper.put(&notes(), &key("live"), b"v".to_vec())?;
    sync(&keeper, &link(&hub))?;
    let marks_before = hub.watermarks()?.mark_count();
    assert_eq!(marks_before, 21);

    // Months later only the keeper still syncs: the devices are retired, their tombstones
    // purged, and their marks go, since nothing of theirs is left.
    for _ in 0..4 {
        time.advance(30 * DAY);
        sync(&keeper, &link(&hub))?;
    }
    let mut total = highwater::PurgeReport::default();
    loop {
        let r = hub.purge()?;
        total.purged += r.purged;
        total.retired_peers.extend(r.retired_peers);
        total.retired_origins.extend(r.retired_origins);
        if !r.more {
            break;
        }
    }
    assert_eq!(total.retired_peers.len(), 20, "{total:?}");
    assert_eq!(total.purged, 20);
    assert_eq!(total.retired_origins.len(), 20);
    assert_eq!(hub.watermarks()?.mark_count(), 1, "the keeper's mark only");

    // The keeper purges too (retiring the same origins), so its rounds with the hub bring
    // none of their marks back.
    keeper.purge()?;
    sync(&keeper, &link(&hub))?;
    assert_eq!(hub.watermarks()?.mark_count(), 1);
    assert_eq!(keeper.watermarks()?.mark_count(), 1);
    assert_eq!(live_keys(&hub)?, vec![key("live")]);
    Ok(())
}

/// The file size of a redb node whose data directory is `dir`.
fn db_size(dir: &std::path::Path) -> TestResult<u64> {
    Ok(std::fs::metadata(dir.join(highwater::engine::DB_FILE))?.len())
}

#[test]
fn a_redb_node_that_keeps_writing_and_deleting_stays_the_same_size_once_it_purges() -> TestResult {
    const KEYS: usize = 20_000;
    let time = ManualTime::at_secs(T0);
    let dir = tempfile::tempdir()?;
    let node = highwater::SyncEngine::open_with(dir.path(), common::rounds::config(&time))?;
    let mut sizes = Vec::new();
    for cycle in 0..4 {
        // New ids every cycle, as devices and documents come and go.
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(5000) {
            node.write_batch(chunk.iter().map(|i| {
                let k = key(&format!("c{cycle}-{i:06}"));
                (
                    notes(),
                    k,
                    highwater::Op::Put {
                        value: vec![7u8; 120],
                        blob: None,
                    },
                )
            }))?;
        }
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(5000) {
            node.write_batch(chunk.iter().map(|i| {
                (
                    notes(),
                    key(&format!("c{cycle}-{i:06}")),
                    highwater::Op::Delete,
                )
            }))?;
        }
        time.advance(31 * DAY);
        let mut purged = 0;
        loop {
            let r = node.purge()?;
            purged += r.purged;
            if !r.more {
                break;
            }
        }
        assert_eq!(purged, KEYS, "cycle {cycle}");
        assert!(node.versions(&notes())?.is_empty());
        node.flush()?;
        sizes.push(db_size(dir.path())?);
    }
    // redb reuses the pages the purge freed: the file stops growing after the first cycle
    // (without the purge, every cycle would add its tombstones).
    assert!(
        sizes[3] <= sizes[0] + sizes[0] / 4,
        "file sizes after each cycle: {sizes:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Random schedules with purges, long absences and retirements, against the oracle

use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Step {
    Put {
        node: usize,
        key: u8,
        value: u8,
    },
    Delete {
        node: usize,
        key: u8,
    },
    Exchange {
        from: usize,
        to: usize,
    },
    Audit {
        from: usize,
        to: usize,
    },
    /// Days pass (past the retention with 31, past the peer retirement after three).
    Days(u8),
    Purge {
        node: usize,
    },
}

fn step(nodes: usize) -> impl Strategy<Value = Step> {
    let node = 0..nodes;
    let pair = (0..nodes, 1..nodes).prop_map(move |(a, d)| (a, (a + d) % nodes));
    prop_oneof![
        4 => (node.clone(), 0..6u8, any::<u8>())
            .prop_map(|(node, key, value)| Step::Put { node, key, value }),
        3 => (node.clone(), 0..6u8).prop_map(|(node, key)| Step::Delete { node, key }),
        5 => pair.clone().prop_map(|(from, to)| Step::Exchange { from, to }),
        1 => pair.prop_map(|(from, to)| Step::Audit { from, to }),
        2 => prop_oneof![Just(1u8), Just(31u8), Just(45u8)].prop_map(Step::Days),
        2 => node.prop_map(|node| Step::Purge { node }),
    ]
}

/// What the schedule's nodes reported as refused and dropped below a floor, by key.
fn reported(events: &mut [Subscription]) -> std::collections::BTreeSet<Key> {
    let mut out = std::collections::BTreeSet::new();
    for e in events {
        for (keys, _) in refusals(e) {
            out.extend(keys);
        }
    }
    out
}

/// How many versions `halts` report refused below a floor.
fn below_floor(halts: &[Halt]) -> u64 {
    halts
        .iter()
        .map(|h| match h.reason {
            HaltReason::BelowFloor { versions } => versions,
            _ => 0,
        })
        .sum()
}

/// A write of the schedule: its key, its Hlc, and whether it was a delete.
type Write = (Key, highwater::Hlc, bool);

/// The watermark invariant (docs/protocol.md, "What a watermark claims, precisely", in its
/// newest-version reading), as purging leaves it: a node whose mark covers the newest write
/// of a key holds that write; or holds nothing of the key when that write is a delete at or
/// below a floor (purged: marks travel, a purged tombstone does not, and the purging node's
/// floor refuses every older version of the key), or an older tombstone of it; or a
/// refusal below a floor was reported for the key. A round that hears a peer's floor rose
/// is followed by its audit (the re-clone), as the scheduler and `highwater sync` do: until
/// then a node back after too long may still hold what a purged delete superseded.
fn marks_hold(
    nodes: &[Node],
    writes: &[Write],
    lost: &std::collections::BTreeSet<Key>,
) -> TestResult {
    let mut floor = 0;
    for node in nodes {
        floor = floor.max(node.floors()?.get(&notes()).copied().unwrap_or(0));
    }
    let mut newest: std::collections::BTreeMap<&Key, (highwater::Hlc, bool)> = Default::default();
    for (k, hlc, delete) in writes {
        if newest.get(k).is_none_or(|(h, _)| h < hlc) {
            newest.insert(k, (*hlc, *delete));
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let marks = node.watermarks()?;
        for (k, (hlc, delete)) in &newest {
            if marks.get(&notes(), hlc.origin()).is_none_or(|m| m < *hlc) || lost.contains(*k) {
                continue;
            }
            let held = node.get_version(&notes(), k)?;
            // A purged delete: the key reads as deleted, from an older tombstone or nothing.
            let purged = *delete && hlc.time() <= floor;
            let ok = match &held {
                Some(v) => v.hlc == *hlc || (purged && matches!(v.op, highwater::Op::Delete)),
                None => purged,
            };
            if !ok {
                return Err(format!(
                    "node {i}: its marks cover {k:?}@{hlc}, the newest write of the key, but \
                     it holds {held:?} (highest floor {floor})"
                )
                .into());
            }
        }
    }
    Ok(())
}

fn run_schedule(steps: &[Step]) -> TestResult {
    use std::collections::BTreeMap;
    const NODES: usize = 3;
    let time = ManualTime::at_secs(T0);
    let nodes: Vec<Node> = (0..NODES)
        .map(|_| mem_node(&time))
        .collect::<Result<_, _>>()?;
    let mut events: Vec<Subscription> = nodes.iter().map(|n| n.notifier().subscribe()).collect();
    // The last write of each key, by Hlc: what last-write-wins must end with.
    let mut oracle: BTreeMap<Key, (highwater::Hlc, Option<u8>)> = BTreeMap::new();
    let mut lost = std::collections::BTreeSet::new();
    let mut writes: Vec<Write> = Vec::new();
    for s in steps {
        let mut note = |k: Key, hlc, value: Option<u8>| {
            writes.push((k.clone(), hlc, value.is_none()));
            if oracle.get(&k).is_none_or(|(h, _)| *h < hlc) {
                oracle.insert(k, (hlc, value));
            }
        };
        match *s {
            Step::Put {
                node,
                key: k,
                value,
            } => {
                let k = key(&format!("k{k}"));
                note(
                    k.clone(),
                    nodes[node].put(&notes(), &k, vec![value])?,
                    Some(value),
                );
            }
            Step::Delete { node, key: k } => {
                let k = key(&format!("k{k}"));
                note(k.clone(), nodes[node].delete(&notes(), &k)?, None);
            }
            Step::Exchange { from, to } => {
                // Rounds until nothing more is due at once, then the audit any of them asked
                // for: what the scheduler and `highwater sync` do.
                let mut audit_wanted = false;
                for _ in 0..20 {
                    let out = block_on(nodes[from].exchange(&link(&nodes[to])))?;
                    // Every refusal here is a halt of its own reason in the outcome.
                    assert_eq!(below_floor(&out.halts), out.refused as u64, "{out:?}");
                    assert!(
                        below_floor(&out.peer_halts) >= out.dropped as u64,
                        "{out:?}"
                    );
                    audit_wanted |= out.audit_wanted;
                    if !out.has_more {
                        break;
                    }
                }
                if audit_wanted {
                    let out = block_on(nodes[from].audit(&link(&nodes[to])))?;
                    assert_eq!(below_floor(&out.halts), out.refused as u64, "{out:?}");
                }
            }
            Step::Audit { from, to } => {
                let out = block_on(nodes[from].audit(&link(&nodes[to])))?;
                assert_eq!(below_floor(&out.halts), out.refused as u64, "{out:?}");
                assert!(
                    below_floor(&out.peer_halts) >= out.dropped as u64,
                    "{out:?}"
                );
            }
            Step::Days(d) => time.advance(u32::from(d) * DAY),
            Step::Purge { node } => {
                nodes[node].purge()?;
            }
        }
        lost.extend(reported(&mut events));
        marks_hold(&nodes, &writes, &lost).map_err(|e| format!("after {s:?}: {e}"))?;
    }
    // Everyone back online: rounds and audits both ways until nothing moves.
    for _ in 0..3 {
        for from in 0..NODES {
            for to in (0..NODES).filter(|t| *t != from) {
                sync(&nodes[from], &link(&nodes[to]))?;
                block_on(nodes[from].audit(&link(&nodes[to])))?;
            }
        }
    }
    lost.extend(reported(&mut events));
    marks_hold(&nodes, &writes, &lost)?;
    for (i, node) in nodes.iter().enumerate() {
        for (k, (hlc, value)) in &oracle {
            let held = node.get_version(&notes(), k)?;
            let live = held.as_ref().and_then(|v| match &v.op {
                highwater::Op::Put { value, .. } => Some(value.clone()),
                highwater::Op::Delete => None,
            });
            match value {
                // No deleted key comes back.
                None => assert_eq!(live, None, "node {i}: deleted {k:?} is live: {held:?}"),
                // No write that is newest of its key is lost, unless a refusal said so.
                Some(v) if !lost.contains(k) => assert_eq!(
                    held.map(|h| h.hlc),
                    Some(*hlc),
                    "node {i}: {k:?} should hold {v} at {hlc}"
                ),
                Some(_) => {}
            }
        }
        // Nothing the oracle never saw.
        for (k, v) in node.versions(&notes())? {
            assert!(
                oracle.contains_key(&k),
                "node {i} holds unknown {k:?} {v:?}"
            );
        }
    }
    // And the replicas agree on their live contents.
    let first = live_keys(&nodes[0])?;
    for node in &nodes[1..] {
        assert_eq!(live_keys(node)?, first);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    #[test]
    fn purges_and_long_absences_never_resurrect_and_never_lose_unreported_writes(
        steps in prop::collection::vec(step(3), 1..60)
    ) {
        run_schedule(&steps).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

/// The re-clone over HTTP: the floor travels in a version 2 response, the refusal in a
/// version 2 audit response, and the device drops what the hub purged the delete of.
#[tokio::test]
async fn a_device_back_after_too_long_reclones_over_http() -> TestResult {
    let time = ManualTime::at_secs(T0);
    let hub = common::http::Server::start_with(
        common::rounds::config(&time),
        highwater::http::ServerConfig::default(),
    )
    .await?;
    let a = mem_node(&time)?;
    let device = mem_node(&time)?;
    let (to_hub_a, to_hub_d) = (hub.client(None)?, hub.client(None)?);
    a.put(&notes(), &key("k"), b"v".to_vec())?;
    while a.exchange(&to_hub_a).await?.has_more {}
    while device.exchange(&to_hub_d).await?.has_more {}
    assert!(device.get(&notes(), &key("k"))?.is_some());
    a.delete(&notes(), &key("k"))?;
    for _ in 0..5 {
        while a.exchange(&to_hub_a).await?.has_more {}
        time.advance(30 * DAY);
    }
    let engine = hub.engine.clone();
    let report = tokio::task::spawn_blocking(move || engine.purge()).await??;
    assert_eq!(
        (report.purged, report.retired_peers.len()),
        (1, 1),
        "{report:?}"
    );

    let (mut wanted, mut dropped) = (false, 0);
    let to_hub_d = hub.client(None)?;
    loop {
        let out = device.exchange(&to_hub_d).await?;
        wanted |= out.audit_wanted;
        dropped += out.dropped;
        if !out.has_more {
            break;
        }
    }
    assert!(wanted, "the hub's floor reached the device");
    // Here the hub had also retired the writer's origin (nothing of it left), so the device
    // shipped its old copy in the exchange and the refusal came back at once; otherwise the
    // audit finds it.
    dropped += device.audit(&to_hub_d).await?.dropped;
    assert_eq!(dropped, 1);
    assert_eq!(device.get_version(&notes(), &key("k"))?, None);
    assert_eq!(hub.engine.get_version(&notes(), &key("k"))?, None);
    hub.stop().await
}
