//! The engine's change notifier: which events a write and a round publish, with what.
//!
//! - A local write publishes `local-change-recorded`, one event per scope with its keys in
//!   order.
//! - A round publishes `remote-update-available` on each side that applied versions (only
//!   the keys that changed its state), and `local-data-synced` on the initiator for what it
//!   sent.
//! - A version too far ahead of the receiver's clock publishes `clock_skew`; a version whose
//!   file could not be had publishes `blob_staged`.
//! - A subscriber that never reads does not hold up writes or rounds; when it reads again it
//!   is told how many events it missed and goes on from the oldest one kept.

mod common;

use futures_executor::block_on;
use highwater::notify::{Change, ChangeKind, Event, Notice, Subscription, SyncEvent, EVENT_BUFFER};
use highwater::testing::FaultyTransport;
use highwater::{Hash, Key, ManualTime, NodeId, Op, Residency, Scope};

use common::rounds::{link, mem_node, sync, Node, TestResult};

const T0: u32 = 1_700_000_000;

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn keys(ks: &[&str]) -> Vec<Key> {
    ks.iter().map(|k| key(k)).collect()
}

fn at(secs: u32) -> TestResult<Node> {
    Ok(mem_node(&ManualTime::at_secs(secs))?)
}

/// Every notice ready on `sub`, without waiting.
fn drain(sub: &mut Subscription) -> Vec<Notice> {
    std::iter::from_fn(|| sub.try_recv()).collect()
}

/// The change events among `notices`.
/// The change events among `notices`, without their versions (compared on their own in
/// `a_change_carries_the_origin_of_each_version`).
fn changes(notices: &[Notice]) -> Vec<Change> {
    notices
        .iter()
        .filter_map(|n| match n {
            Notice::Event(Event::Change(c)) => Some(Change {
                versions: Vec::new(),
                ..c.clone()
            }),
            _ => None,
        })
        .collect()
}

/// The sync events among `notices`.
fn sync_events(notices: &[Notice]) -> Vec<SyncEvent> {
    notices
        .iter()
        .filter_map(|n| match n {
            Notice::Event(Event::Sync(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn change(kind: ChangeKind, scope: &Scope, ks: &[&str], peer: Option<NodeId>) -> Change {
    Change {
        kind,
        scope: scope.clone(),
        keys: keys(ks),
        peer,
        versions: Vec::new(),
    }
}

#[test]
fn a_local_write_announces_its_scope_and_keys() -> TestResult {
    let a = at(T0)?;
    let other = Scope::app("notes", "tags")?;
    let mut sub = a.notifier().subscribe();
    a.put(&notes(), &key("k1"), b"v".to_vec())?;
    a.write_batch([
        (notes(), key("k2"), Op::Delete),
        (other.clone(), key("t1"), Op::Delete),
        (notes(), key("k3"), Op::Delete),
    ])?;
    let local = ChangeKind::LocalChangeRecorded;
    assert_eq!(
        changes(&drain(&mut sub)),
        [
            change(local, &notes(), &["k1"], None),
            change(local, &notes(), &["k2", "k3"], None),
            change(local, &other, &["t1"], None),
        ]
    );
    assert_eq!(
        ChangeKind::LocalChangeRecorded.name(),
        "local-change-recorded"
    );
    Ok(())
}

#[test]
fn a_round_announces_what_each_side_applied_and_what_was_delivered() -> TestResult {
    let (a, b) = (at(T0)?, at(T0)?);
    sync(&a, &link(&b))?; // a learns b's marks: on first contact nothing is shipped
    a.put(&notes(), &key("a1"), b"from a".to_vec())?;
    a.put(&notes(), &key("a2"), b"from a".to_vec())?;
    b.put(&notes(), &key("b1"), b"from b".to_vec())?;
    let (mut on_a, mut on_b) = (a.notifier().subscribe(), b.notifier().subscribe());

    let out = block_on(a.exchange(&link(&b)))?;
    assert_eq!((out.shipped, out.applied, out.has_more), (2, 1, false));
    assert_eq!(
        changes(&drain(&mut on_a)),
        [
            change(
                ChangeKind::RemoteUpdateAvailable,
                &notes(),
                &["b1"],
                Some(b.node_id())
            ),
            change(
                ChangeKind::LocalDataSynced,
                &notes(),
                &["a1", "a2"],
                Some(b.node_id())
            ),
        ]
    );
    assert_eq!(
        changes(&drain(&mut on_b)),
        [change(
            ChangeKind::RemoteUpdateAvailable,
            &notes(),
            &["a1", "a2"],
            Some(a.node_id())
        )],
        "the responder applied; it delivered nothing of its own"
    );

    // A quiet round announces nothing.
    block_on(a.exchange(&link(&b)))?;
    assert_eq!(changes(&drain(&mut on_a)), []);
    assert_eq!(changes(&drain(&mut on_b)), []);
    Ok(())
}

#[test]
fn only_versions_that_win_are_announced_as_updates() -> TestResult {
    // a's clock is ahead, so its write of "k" is the newer one.
    let (a, b) = (at(T0 + 2)?, at(T0)?);
    b.put(&notes(), &key("k"), b"older".to_vec())?;
    b.put(&notes(), &key("only-b"), b"v".to_vec())?;
    a.put(&notes(), &key("k"), b"newer".to_vec())?;
    let mut on_a = a.notifier().subscribe();
    let out = block_on(a.exchange(&link(&b)))?;
    assert_eq!((out.received, out.applied), (2, 1));
    assert_eq!(
        changes(&drain(&mut on_a)),
        [change(
            ChangeKind::RemoteUpdateAvailable,
            &notes(),
            &["only-b"],
            Some(b.node_id())
        )]
    );
    Ok(())
}

#[test]
fn a_version_from_a_clock_too_far_ahead_is_announced_as_skew() -> TestResult {
    let (r, ahead) = (at(T0)?, at(T0 + 60)?);
    ahead.put(&notes(), &key("k"), b"from the future".to_vec())?;
    let mut on_r = r.notifier().subscribe();
    let out = block_on(r.exchange(&link(&ahead)))?;
    assert_eq!((out.received, out.applied, out.halts.len()), (1, 0, 1));
    let notices = drain(&mut on_r);
    assert_eq!(changes(&notices), [], "nothing applied");
    match sync_events(&notices).as_slice() {
        [e @ SyncEvent::ClockSkew {
            peer,
            scope,
            origin,
            ahead_by_ms,
        }] => {
            assert_eq!(e.name(), "clock_skew");
            assert_eq!(
                (peer, scope, origin),
                (&ahead.node_id().to_string(), &notes(), &ahead.node_id())
            );
            assert!((59_000..=61_000).contains(ahead_by_ms), "{ahead_by_ms} ms");
        }
        other => panic!("expected one clock_skew event, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_file_that_could_not_be_fetched_is_announced_as_staged() -> TestResult {
    let (a, b) = (at(T0)?, at(T0)?);
    let bytes = b"the file's content".to_vec();
    a.put_file_bytes(&notes(), &key("f"), b"meta".to_vec(), &bytes)?;
    let to_a = FaultyTransport::new(link(&a));
    to_a.fail(Hash::of(&bytes));
    let mut on_b = b.notifier().subscribe();

    let out = block_on(b.exchange(&to_a))?;
    assert_eq!((out.received, out.blobs_fetched), (1, 0));
    assert!(to_a.injected() > 0, "the fetch was tried and failed");
    let notices = drain(&mut on_b);
    assert_eq!(
        changes(&notices),
        [change(
            ChangeKind::RemoteUpdateAvailable,
            &notes(),
            &["f"],
            Some(a.node_id())
        )],
        "the record is stored, Staged"
    );
    let staged = sync_events(&notices);
    assert_eq!(
        staged,
        [SyncEvent::BlobStaged {
            peer: a.node_id().to_string(),
            scope: notes(),
            origin: a.node_id(),
            hash: Hash::of(&bytes),
        }]
    );
    assert_eq!(staged[0].name(), "blob_staged");
    assert_eq!(b.residency(&notes(), &key("f"))?, Residency::Staged);

    // Once the file arrives, nothing is staged any more, and the record is announced as
    // readable.
    to_a.heal();
    block_on(b.exchange(&to_a))?;
    let ready = sync_events(&drain(&mut on_b));
    assert_eq!(
        ready,
        [SyncEvent::ContentReady {
            hash: Hash::of(&bytes),
            scopes: vec![notes()],
        }]
    );
    assert_eq!(ready[0].name(), "content_ready");
    assert_eq!(b.residency(&notes(), &key("f"))?, Residency::Resident);
    Ok(())
}

/// The upload side: a file whose upload failed leaves the responder's record Staged; the
/// responder announces it readable when a later round uploads it.
#[test]
fn a_file_that_could_not_be_uploaded_is_announced_ready_when_it_arrives() -> TestResult {
    let (a, b) = (at(T0)?, at(T0)?);
    let bytes = b"the uploaded file's content".to_vec();
    a.put_file_bytes(&notes(), &key("f"), b"meta".to_vec(), &bytes)?;
    let to_b = FaultyTransport::new(link(&b));
    to_b.fail(Hash::of(&bytes));
    let mut on_b = b.notifier().subscribe();
    for _ in 0..3 {
        if !block_on(a.exchange(&to_b))?.has_more {
            break;
        }
    }
    assert!(to_b.injected() > 0, "the upload was tried and failed");
    assert_eq!(b.residency(&notes(), &key("f"))?, Residency::Staged);
    drain(&mut on_b);

    to_b.heal();
    let out = block_on(a.exchange(&to_b))?;
    assert_eq!(out.blobs_pushed, 1, "{out:?}");
    let ready = sync_events(&drain(&mut on_b));
    assert!(
        ready.contains(&SyncEvent::ContentReady {
            hash: Hash::of(&bytes),
            scopes: vec![notes()],
        }),
        "{ready:?}"
    );
    assert_eq!(b.residency(&notes(), &key("f"))?, Residency::Resident);
    Ok(())
}

#[test]
fn a_change_carries_the_origin_of_each_version_not_only_the_relay() -> TestResult {
    let (a, b, c) = (at(T0)?, at(T0)?, at(T0)?);
    let written = a.put(&notes(), &key("k"), b"from a".to_vec())?;
    sync(&b, &link(&a))?;
    let mut on_c = c.notifier().subscribe();
    sync(&c, &link(&b))?;
    let updates: Vec<Change> = drain(&mut on_c)
        .into_iter()
        .filter_map(|n| match n {
            Notice::Event(Event::Change(c)) if c.kind == ChangeKind::RemoteUpdateAvailable => {
                Some(c)
            }
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(updates[0].peer, Some(b.node_id()), "relayed by b");
    assert_eq!(updates[0].versions, [written], "written by a");
    assert_eq!(updates[0].versions[0].origin(), a.node_id());
    Ok(())
}

#[test]
fn a_local_write_the_hub_had_not_seen_that_loses_is_announced_as_overwritten() -> TestResult {
    // e's clock is ahead, so its write of "k" wins over d's, made offline: the hub h
    // holds e's when d syncs.
    let (d, h, e) = (at(T0)?, at(T0)?, at(T0 + 2)?);
    let lost = d.put(&notes(), &key("k"), b"d's, offline".to_vec())?;
    let winner = e.put(&notes(), &key("k"), b"e's".to_vec())?;
    sync(&e, &link(&h))?;
    let mut on_d = d.notifier().subscribe();
    sync(&d, &link(&h))?;
    let events = sync_events(&drain(&mut on_d));
    assert_eq!(
        events,
        [SyncEvent::Overwritten {
            peer: h.node_id().to_string(),
            scope: notes(),
            key: key("k"),
            lost: highwater::Version {
                hlc: lost,
                op: Op::Put {
                    value: b"d's, offline".to_vec(),
                    blob: None
                },
            },
            winner,
        }]
    );
    assert_eq!(events[0].name(), "overwritten");
    assert_eq!(winner.origin(), e.node_id(), "the winner names its writer");

    // An edit made after the hub acknowledged d's write is no conflict.
    d.put(&notes(), &key("j"), b"d's".to_vec())?;
    sync(&d, &link(&h))?;
    sync(&e, &link(&h))?;
    e.put(&notes(), &key("j"), b"e's edit of it".to_vec())?;
    sync(&e, &link(&h))?;
    let mut on_d = d.notifier().subscribe();
    sync(&d, &link(&h))?;
    assert_eq!(
        d.get(&notes(), &key("j"))?.map(|r| r.hlc.origin()),
        Some(e.node_id())
    );
    assert_eq!(sync_events(&drain(&mut on_d)), []);
    Ok(())
}

#[test]
fn a_subscriber_that_never_reads_holds_nothing_up_and_learns_what_it_missed() -> TestResult {
    let (a, b) = (at(T0)?, at(T0)?);
    let mut idle = a.notifier().subscribe();
    let extra = 10;
    for i in 0..EVENT_BUFFER + extra {
        a.put(&notes(), &key(&format!("k{i:05}")), b"v".to_vec())?;
    }
    b.put(&notes(), &key("from-b"), b"v".to_vec())?;
    // First contact: a ships nothing and applies b's one version.
    let out = block_on(a.exchange(&link(&b)))?;
    assert_eq!((out.shipped, out.applied), (0, 1));
    assert!(
        a.get(&notes(), &key("from-b"))?.is_some(),
        "the round ran to the end"
    );

    // a published one event per write and one for b's version; the buffer kept the last
    // EVENT_BUFFER of them.
    let published = EVENT_BUFFER + extra + 1;
    let missed = (published - EVENT_BUFFER) as u64;
    assert_eq!(idle.try_recv(), Some(Notice::Missed(missed)));
    let rest = drain(&mut idle);
    assert_eq!(rest.len(), EVENT_BUFFER);
    let first = changes(&rest[..1]);
    assert_eq!(
        first,
        [change(
            ChangeKind::LocalChangeRecorded,
            &notes(),
            &[&format!("k{missed:05}")],
            None
        )],
        "goes on from the oldest event kept"
    );
    assert_eq!(
        changes(&rest[EVENT_BUFFER - 1..]),
        [change(
            ChangeKind::RemoteUpdateAvailable,
            &notes(),
            &["from-b"],
            Some(b.node_id())
        )],
        "and ends with the newest"
    );
    // Later events reach it as usual.
    let later = a.put(&notes(), &key("later"), b"v".to_vec())?;
    assert_eq!(
        block_on(idle.recv()),
        Some(Notice::Event(Event::Change(Change {
            versions: vec![later],
            ..change(ChangeKind::LocalChangeRecorded, &notes(), &["later"], None)
        })))
    );
    Ok(())
}
