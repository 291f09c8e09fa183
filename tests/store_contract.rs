//! The store contract (see `highwater::store`'s module docs), one suite run against every
//! store: identity, LWW upserts, the live-version index, conditional watermark advances,
//! peer knowledge, the persisted clock, scans, scopes, snapshots and atomicity. A property
//! test then checks that the redb store behaves exactly like the in-memory model under
//! random batches.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use highwater::store::{
    Advance, Batch, BatchReport, Durability, KeyRange, MemStore, PeerKnowledge, RedbStore, Store,
};
use highwater::{Hlc, Key, NodeId, Op, Scope, ScopeFilter, ScopedWatermarks, Version};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn Error>>;

/// A store and whatever must outlive it (field order: the store is dropped first).
struct Fixture {
    store: Box<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

fn mem() -> Result<Fixture, Box<dyn Error>> {
    Ok(Fixture {
        store: Box::new(MemStore::new()),
        _dir: None,
    })
}

fn redb() -> Result<Fixture, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = RedbStore::open(dir.path().join("store.redb"))?;
    Ok(Fixture {
        store: Box::new(store),
        _dir: Some(dir),
    })
}

/// Instantiates every contract case once per store.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod mem_store {
            $(
                #[test]
                fn $case() -> super::TestResult {
                    super::$case(&*super::mem()?.store)
                }
            )*
        }
        mod redb_store {
            $(
                #[test]
                fn $case() -> super::TestResult {
                    super::$case(&*super::redb()?.store)
                }
            )*
        }
    };
}

contract!(
    identity_is_assigned_once_and_can_be_replaced,
    upserts_merge_by_last_write_wins,
    live_range_holds_exactly_the_live_versions,
    advance_moves_the_mark_only_without_a_gap_and_never_lowers_it,
    peer_knowledge_is_replaced_per_scope_filter,
    clock_only_rises,
    scan_honours_prefix_after_limit_and_key_order,
    scopes_list_records_and_own_marks_only,
    snapshot_ignores_later_commits,
    live_range_is_empty_when_after_is_not_below_upto,
    empty_peer_scope_reads_back_as_absent,
    a_version_at_another_keys_hlc_is_refused,
);

// ---------------------------------------------------------------------------------------
// Helpers

fn id(b: u8) -> NodeId {
    NodeId::from_bytes([b; 16]).expect("a non-zero id")
}

fn hlc(time: u64, origin: u8) -> Hlc {
    Hlc::new(time, id(origin))
}

fn scope(s: &str) -> Scope {
    s.parse().expect("a valid scope")
}

fn key(k: impl AsRef<[u8]>) -> Key {
    Key::new(k.as_ref()).expect("a valid key")
}

fn put(time: u64, origin: u8, value: &str) -> Version {
    Version {
        hlc: hlc(time, origin),
        op: Op::Put {
            value: value.as_bytes().to_vec(),
            blob: None,
        },
    }
}

fn del(time: u64, origin: u8) -> Version {
    Version {
        hlc: hlc(time, origin),
        op: Op::Delete,
    }
}

fn upserts(s: &Scope, rows: &[(&str, Version)]) -> Batch {
    let mut b = Batch::new(0, Durability::Deferred);
    b.upserts = rows
        .iter()
        .map(|(k, v)| (s.clone(), key(k), v.clone()))
        .collect();
    b
}

fn advances(list: &[(&Scope, Option<Hlc>, Hlc)]) -> Batch {
    let mut b = Batch::new(0, Durability::Deferred);
    b.advances = list
        .iter()
        .map(|(s, base, top)| Advance {
            scope: (*s).clone(),
            base: *base,
            top: *top,
        })
        .collect();
    b
}

fn knowledge(peer: u8, scopes: ScopeFilter, marks: ScopedWatermarks) -> Batch {
    let mut b = Batch::new(0, Durability::Deferred);
    b.peer = Some(PeerKnowledge {
        peer: id(peer),
        scopes,
        marks,
    });
    b
}

fn marks(list: &[(&Scope, Hlc)]) -> ScopedWatermarks {
    let mut w = ScopedWatermarks::new();
    for (s, h) in list {
        w.observe(s, *h);
    }
    w
}

fn only(scopes: &[&Scope]) -> ScopeFilter {
    ScopeFilter::Only(scopes.iter().map(|s| (*s).clone()).collect())
}

fn report(applied: &[usize], advanced: &[bool]) -> BatchReport {
    BatchReport {
        applied: applied.to_vec(),
        advanced: advanced.to_vec(),
        unreferenced: Vec::new(),
    }
}

fn live(
    store: &dyn Store,
    s: &Scope,
    origin: u8,
    after: Option<u64>,
    upto: u64,
    limit: usize,
) -> Result<Vec<(Key, Version)>, Box<dyn Error>> {
    let after = after.map(|t| hlc(t, origin));
    Ok(store
        .read()?
        .live_range(s, id(origin), after, hlc(upto, origin), limit)?)
}

fn scan(
    store: &dyn Store,
    s: &Scope,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Key>, Box<dyn Error>> {
    let range = KeyRange {
        prefix: prefix.as_bytes().to_vec(),
        after: after.map(key),
        limit,
    };
    Ok(store
        .read()?
        .scan(s, &range)?
        .into_iter()
        .map(|(k, _)| k)
        .collect())
}

fn keys(list: &[&str]) -> Vec<Key> {
    list.iter().map(key).collect()
}

// ---------------------------------------------------------------------------------------
// Contract cases

fn identity_is_assigned_once_and_can_be_replaced(store: &dyn Store) -> TestResult {
    assert_eq!(
        store.identity(id(1))?,
        id(1),
        "first call stores the fresh id"
    );
    assert_eq!(
        store.identity(id(2))?,
        id(1),
        "later calls return the stored id"
    );
    store.replace_identity(id(3))?;
    assert_eq!(
        store.identity(id(4))?,
        id(3),
        "a replaced id is the stored id from then on"
    );
    Ok(())
}

fn upserts_merge_by_last_write_wins(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    assert_eq!(
        store.commit(&upserts(&s, &[("k", put(5, 1, "five"))]))?,
        report(&[0], &[])
    );

    // Older, equal (same Hlc, other bytes) and newer versions of k, then a fresh key.
    let b = upserts(
        &s,
        &[
            ("k", put(3, 1, "three")),
            ("k", put(5, 1, "other five")),
            ("k", put(7, 1, "seven")),
            ("j", put(1, 2, "j")),
        ],
    );
    assert_eq!(store.commit(&b)?, report(&[2, 3], &[]));
    assert_eq!(store.read()?.get(&s, &key("k"))?, Some(put(7, 1, "seven")));

    // Within one batch, a later smaller version loses to an earlier greater one.
    assert_eq!(
        store.commit(&upserts(
            &s,
            &[("k", put(9, 1, "nine")), ("k", put(8, 1, "eight"))]
        ))?,
        report(&[0], &[])
    );
    // Same time, greater node id: the id breaks the tie, so it wins.
    assert_eq!(
        store.commit(&upserts(&s, &[("k", put(9, 2, "nine by 2"))]))?,
        report(&[0], &[])
    );
    assert_eq!(
        store.commit(&upserts(&s, &[("k", put(9, 1, "nine again"))]))?,
        report(&[], &[])
    );
    // A tombstone is a version like any other.
    assert_eq!(
        store.commit(&upserts(&s, &[("k", del(10, 1))]))?,
        report(&[0], &[])
    );

    let read = store.read()?;
    assert_eq!(read.get(&s, &key("k"))?, Some(del(10, 1)));
    assert_eq!(read.get(&s, &key("j"))?, Some(put(1, 2, "j")));
    assert_eq!(read.get(&s, &key("absent"))?, None);
    assert_eq!(
        read.get(&scope("app/x/y"), &key("k"))?,
        None,
        "records are per scope"
    );
    Ok(())
}

fn live_range_holds_exactly_the_live_versions(store: &dyn Store) -> TestResult {
    let s = scope("app/notes/items");
    let other = scope("app/notes/other");
    store.commit(&upserts(
        &s,
        &[
            ("k1", put(1, 1, "a")),
            ("k2", put(2, 1, "b")),
            ("k3", put(3, 1, "c")),
            ("k4", put(4, 1, "d")),
        ],
    ))?;
    store.commit(&upserts(&s, &[("k5", put(2, 2, "from 2"))]))?;
    store.commit(&upserts(&other, &[("k1", put(2, 1, "elsewhere"))]))?;
    // k2 is superseded by origin 1 itself, k3 by origin 2, k1 by a tombstone of origin 1.
    store.commit(&upserts(
        &s,
        &[
            ("k2", put(5, 1, "b2")),
            ("k3", put(6, 2, "c2")),
            ("k1", del(7, 1)),
        ],
    ))?;

    let all = u64::MAX;
    let expect_1 = vec![
        (key("k4"), put(4, 1, "d")),
        (key("k2"), put(5, 1, "b2")),
        (key("k1"), del(7, 1)),
    ];
    assert_eq!(
        live(store, &s, 1, None, all, 100)?,
        expect_1,
        "ascending, superseded versions gone, tombstones live"
    );
    assert_eq!(
        live(store, &s, 2, None, all, 100)?,
        vec![
            (key("k5"), put(2, 2, "from 2")),
            (key("k3"), put(6, 2, "c2"))
        ]
    );
    assert_eq!(
        live(store, &other, 1, None, all, 100)?,
        vec![(key("k1"), put(2, 1, "elsewhere"))]
    );
    assert_eq!(
        live(store, &s, 3, None, all, 100)?,
        vec![],
        "an origin with nothing live"
    );
    assert_eq!(
        live(store, &scope("app/notes/none"), 1, None, all, 100)?,
        vec![]
    );

    // (after, upto]: after excluded, upto included.
    assert_eq!(live(store, &s, 1, Some(4), 7, 100)?, expect_1[1..].to_vec());
    assert_eq!(live(store, &s, 1, Some(3), 5, 100)?, expect_1[..2].to_vec());
    assert_eq!(live(store, &s, 1, None, 4, 100)?, expect_1[..1].to_vec());
    assert_eq!(live(store, &s, 1, Some(5), 5, 100)?, vec![], "empty range");
    assert_eq!(live(store, &s, 1, Some(7), all, 100)?, vec![]);
    // The limit keeps the lowest ones.
    assert_eq!(live(store, &s, 1, None, all, 2)?, expect_1[..2].to_vec());
    assert_eq!(
        live(store, &s, 1, Some(4), all, 1)?,
        expect_1[1..2].to_vec()
    );
    assert_eq!(live(store, &s, 1, None, all, 0)?, vec![]);
    Ok(())
}

fn advance_moves_the_mark_only_without_a_gap_and_never_lowers_it(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let t = scope("app/a/b");
    let w = |store: &dyn Store, origin: u8| -> Result<Option<Hlc>, Box<dyn Error>> {
        Ok(store.read()?.watermarks()?.get(&s, id(origin)))
    };

    assert_eq!(
        store.commit(&advances(&[(&s, None, hlc(5, 1))]))?,
        report(&[], &[true]),
        "base None is unconditional"
    );
    assert_eq!(w(store, 1)?, Some(hlc(5, 1)));
    assert_eq!(
        store.commit(&advances(&[(&s, Some(hlc(7, 1)), hlc(9, 1))]))?,
        report(&[], &[false]),
        "base above W: a gap"
    );
    assert_eq!(w(store, 1)?, Some(hlc(5, 1)));
    assert_eq!(
        store.commit(&advances(&[(&s, Some(hlc(5, 1)), hlc(8, 1))]))?,
        report(&[], &[true]),
        "base == W continues"
    );
    assert_eq!(w(store, 1)?, Some(hlc(8, 1)));
    assert_eq!(
        store.commit(&advances(&[(&s, Some(hlc(3, 1)), hlc(6, 1))]))?,
        report(&[], &[true]),
        "base < W continues"
    );
    assert_eq!(
        w(store, 1)?,
        Some(hlc(8, 1)),
        "but a lower top never lowers W"
    );
    assert_eq!(
        store.commit(&advances(&[(&s, None, hlc(2, 1))]))?,
        report(&[], &[true])
    );
    assert_eq!(w(store, 1)?, Some(hlc(8, 1)));

    // No mark yet: only an unconditional advance starts one. Advances apply in order.
    assert_eq!(
        store.commit(&advances(&[(&s, Some(hlc(1, 2)), hlc(4, 2))]))?,
        report(&[], &[false])
    );
    assert_eq!(w(store, 2)?, None);
    let chain = [
        (&s, None, hlc(3, 2)),
        (&s, Some(hlc(3, 2)), hlc(6, 2)),
        (&s, Some(hlc(7, 2)), hlc(9, 2)),
        (&t, None, hlc(1, 2)),
    ];
    assert_eq!(
        store.commit(&advances(&chain))?,
        report(&[], &[true, true, false, true])
    );

    let expected = marks(&[(&s, hlc(8, 1)), (&s, hlc(6, 2)), (&t, hlc(1, 2))]);
    assert_eq!(store.read()?.watermarks()?, expected);
    Ok(())
}

fn peer_knowledge_is_replaced_per_scope_filter(store: &dyn Store) -> TestResult {
    let (s1, s2, s3) = (Scope::shared(), scope("app/a/b"), scope("app/a/bc"));
    let known = |store: &dyn Store, p: u8| -> Result<Option<ScopedWatermarks>, Box<dyn Error>> {
        Ok(store.read()?.peer_watermarks(id(p))?)
    };
    assert_eq!(known(store, 9)?, None, "never met");
    assert_eq!(store.read()?.peers()?, vec![]);

    store.commit(&knowledge(9, ScopeFilter::All, ScopedWatermarks::new()))?;
    assert_eq!(
        known(store, 9)?,
        Some(ScopedWatermarks::new()),
        "met, even with no marks"
    );
    assert_eq!(store.read()?.peers()?, vec![id(9)]);

    let full = marks(&[(&s1, hlc(5, 1)), (&s1, hlc(3, 2)), (&s2, hlc(1, 1))]);
    store.commit(&knowledge(9, ScopeFilter::All, full.clone()))?;
    assert_eq!(known(store, 9)?, Some(full));

    // Only {s1}: s1's marks are replaced (origin 2's is dropped, not kept); s2 stays; marks
    // outside the filter are ignored.
    store.commit(&knowledge(
        9,
        only(&[&s1]),
        marks(&[(&s1, hlc(7, 1)), (&s3, hlc(9, 1))]),
    ))?;
    assert_eq!(
        known(store, 9)?,
        Some(marks(&[(&s1, hlc(7, 1)), (&s2, hlc(1, 1))]))
    );
    // Replaced, not merged: a lower mark replaces a higher one.
    store.commit(&knowledge(9, only(&[&s1]), marks(&[(&s1, hlc(2, 1))])))?;
    assert_eq!(
        known(store, 9)?,
        Some(marks(&[(&s1, hlc(2, 1)), (&s2, hlc(1, 1))]))
    );
    // Only {s2} with nothing: s2's knowledge is cleared.
    store.commit(&knowledge(9, only(&[&s2]), ScopedWatermarks::new()))?;
    assert_eq!(known(store, 9)?, Some(marks(&[(&s1, hlc(2, 1))])));

    // Another peer is independent.
    store.commit(&knowledge(4, only(&[&s3]), marks(&[(&s3, hlc(1, 3))])))?;
    assert_eq!(known(store, 4)?, Some(marks(&[(&s3, hlc(1, 3))])));
    // All replaces everything of peer 9 only.
    store.commit(&knowledge(9, ScopeFilter::All, marks(&[(&s3, hlc(4, 4))])))?;
    assert_eq!(known(store, 9)?, Some(marks(&[(&s3, hlc(4, 4))])));
    assert_eq!(known(store, 4)?, Some(marks(&[(&s3, hlc(1, 3))])));
    assert_eq!(store.read()?.peers()?, vec![id(4), id(9)], "in id order");
    assert_eq!(
        store.read()?.watermarks()?,
        ScopedWatermarks::new(),
        "peer knowledge is not our own marks"
    );
    Ok(())
}

fn clock_only_rises(store: &dyn Store) -> TestResult {
    assert_eq!(store.read()?.clock()?, 0);
    for (time, expected) in [
        (100, 100),
        (50, 100),
        (100, 100),
        (u64::MAX - 1, u64::MAX - 1),
        (7, u64::MAX - 1),
    ] {
        store.commit(&Batch::new(time, Durability::Immediate))?;
        assert_eq!(store.read()?.clock()?, expected, "after raising to {time}");
    }
    Ok(())
}

fn scan_honours_prefix_after_limit_and_key_order(store: &dyn Store) -> TestResult {
    // Two scopes whose names share a prefix, and a key of one that would continue the other's
    // name if the two were concatenated naively.
    let (a, b) = (scope("app/a/b"), scope("app/a/bc"));
    let in_a = ["a", "ab", "abc", "b", "ba", "ca", "\u{7f}"];
    // Every version its own Hlc, as the engine issues them.
    let mut batch = Batch::new(0, Durability::Deferred);
    batch.upserts = (10u64..)
        .zip(in_a)
        .map(|(t, k)| (a.clone(), key(k), put(t, 1, "A")))
        .collect();
    batch
        .upserts
        .push((a.clone(), key([0x00u8]), put(30, 1, "zero")));
    batch
        .upserts
        .push((a.clone(), key([0xffu8, 0x00]), put(31, 1, "high")));
    batch.upserts.push((b.clone(), key("a"), put(2, 1, "B")));
    batch.upserts.push((b.clone(), key("cab"), put(3, 1, "B")));
    store.commit(&batch)?;
    store.commit(&upserts(&a, &[("ba", del(40, 1))]))?;

    let read = store.read()?;
    let all = read.scan(
        &a,
        &KeyRange {
            limit: 100,
            ..KeyRange::default()
        },
    )?;
    let mut expected: Vec<Key> = vec![key([0x00u8])];
    expected.extend(keys(&in_a));
    expected.push(key([0xffu8, 0x00]));
    assert_eq!(
        all.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        expected,
        "byte order, scope A only"
    );
    assert_eq!(
        all.iter()
            .find(|(k, _)| *k == key("ba"))
            .map(|(_, v)| v.clone()),
        Some(del(40, 1)),
        "tombstones included"
    );
    assert!(
        all.iter()
            .all(|(_, v)| v.hlc != hlc(2, 1) && v.hlc != hlc(3, 1)),
        "nothing of scope B"
    );
    drop(read);

    assert_eq!(scan(store, &b, "", None, 100)?, keys(&["a", "cab"]));
    assert_eq!(scan(store, &b, "c", None, 100)?, keys(&["cab"]));
    assert_eq!(scan(store, &scope("app/a/bcd"), "", None, 100)?, vec![]);
    assert_eq!(scan(store, &scope("app/a/bb"), "", None, 100)?, vec![]);
    assert_eq!(scan(store, &a, "a", None, 100)?, keys(&["a", "ab", "abc"]));
    assert_eq!(scan(store, &a, "a", None, 2)?, keys(&["a", "ab"]));
    assert_eq!(
        scan(store, &a, "a", Some("a"), 100)?,
        keys(&["a", "ab", "abc"])[1..].to_vec()
    );
    assert_eq!(scan(store, &a, "a", Some("ab"), 1)?, keys(&["abc"]));
    assert_eq!(
        scan(store, &a, "ab", Some("a"), 100)?,
        keys(&["ab", "abc"]),
        "after below the prefix"
    );
    assert_eq!(
        scan(store, &a, "a", Some("b"), 100)?,
        vec![],
        "after beyond the prefix"
    );
    assert_eq!(
        scan(store, &a, "", Some("abc"), 3)?,
        keys(&["b", "ba", "ca"])
    );
    assert_eq!(
        scan(store, &a, "", Some("abd"), 100)?[..2],
        keys(&["b", "ba"])[..],
        "after need not be stored"
    );
    assert_eq!(scan(store, &a, "c", None, 100)?, keys(&["ca"]));
    assert_eq!(scan(store, &a, "zz", None, 100)?, vec![]);
    assert_eq!(scan(store, &a, "", None, 0)?, vec![]);

    // Paging with `after` visits every key once.
    let mut paged = Vec::new();
    let mut after: Option<Key> = None;
    loop {
        let page = store.read()?.scan(
            &a,
            &KeyRange {
                prefix: Vec::new(),
                after: after.clone(),
                limit: 3,
            },
        )?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        paged.extend(page.into_iter().map(|(k, _)| k));
    }
    assert_eq!(paged, expected);
    Ok(())
}

fn scopes_list_records_and_own_marks_only(store: &dyn Store) -> TestResult {
    let (a, b) = (scope("app/a/b"), scope("app/a/bc"));
    assert_eq!(store.read()?.scopes()?, vec![]);
    store.commit(&upserts(&b, &[("k", put(1, 1, "x"))]))?;
    assert_eq!(
        store.read()?.scopes()?,
        vec![b.clone()],
        "records without marks"
    );
    store.commit(&advances(&[(&Scope::shared(), None, hlc(1, 1))]))?;
    assert_eq!(
        store.read()?.scopes()?,
        vec![b.clone(), Scope::shared()],
        "marks without records"
    );
    store.commit(&knowledge(
        9,
        ScopeFilter::All,
        marks(&[(&scope("app/z/z"), hlc(1, 1))]),
    ))?;
    assert_eq!(
        store.read()?.scopes()?,
        vec![b.clone(), Scope::shared()],
        "peer knowledge is not a scope of ours"
    );
    let mut batch = upserts(&a, &[("k", put(2, 1, "y")), ("l", put(3, 1, "y"))]);
    batch.advances.push(Advance {
        scope: a.clone(),
        base: None,
        top: hlc(3, 1),
    });
    store.commit(&batch)?;
    store.commit(&upserts(&b, &[("k", del(4, 1))]))?;
    assert_eq!(
        store.read()?.scopes()?,
        vec![a, b, Scope::shared()],
        "in order, each once, tombstones count"
    );
    Ok(())
}

/// A snapshot taken before a commit sees none of it, while later reads see all of it.
/// (The first commit is durable: a redb reader taken while deferred commits are gathered
/// holds commits back instead; see `redb_reader_while_deferred_commits_gather`.)
fn snapshot_ignores_later_commits(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let mut first = upserts(&s, &[("k", put(1, 1, "old"))]);
    first.advances.push(Advance {
        scope: s.clone(),
        base: None,
        top: hlc(1, 1),
    });
    first.clock = 10;
    first.durability = Durability::Immediate;
    store.commit(&first)?;

    let mut later = upserts(&s, &[("k", put(2, 1, "new")), ("j", put(3, 1, "j"))]);
    later.advances.push(Advance {
        scope: s.clone(),
        base: Some(hlc(1, 1)),
        top: hlc(3, 1),
    });
    later.peer = Some(PeerKnowledge {
        peer: id(9),
        scopes: ScopeFilter::All,
        marks: marks(&[(&s, hlc(3, 1))]),
    });
    later.clock = 20;

    let snapshot = store.read()?;
    let (tx, rx) = mpsc::channel();
    let committed = std::thread::scope(|threads| {
        threads.spawn(|| tx.send(store.commit(&later).map_err(|e| e.to_string())));
        // Only a deadlock detector: a store whose commits proceed beside a live snapshot
        // answers at once.
        let done = rx.recv_timeout(Duration::from_secs(10));
        let seen = (
            snapshot.get(&s, &key("k")).ok().flatten(),
            snapshot.get(&s, &key("j")).ok().flatten(),
            snapshot.watermarks().ok(),
            snapshot.peer_watermarks(id(9)).ok(),
            snapshot.clock().ok(),
            snapshot
                .live_range(&s, id(1), None, hlc(u64::MAX, 1), 10)
                .ok()
                .map(|v| v.len()),
        );
        drop(snapshot);
        (done, seen)
    });
    let (done, seen) = committed;
    assert_eq!(
        seen,
        (
            Some(put(1, 1, "old")),
            None,
            Some(marks(&[(&s, hlc(1, 1))])),
            Some(None),
            Some(10),
            Some(1)
        ),
        "the snapshot saw a later commit"
    );
    match done {
        Ok(result) => assert_eq!(result?, report(&[0, 1], &[true])),
        Err(_) => return Err("the commit waited for the snapshot to be dropped".into()),
    }
    let read = store.read()?;
    assert_eq!(read.get(&s, &key("k"))?, Some(put(2, 1, "new")));
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(3, 1))]));
    assert_eq!(read.clock()?, 20);
    Ok(())
}

/// `(after, upto]` with `after >= upto` is an empty range, not an error or a panic.
fn live_range_is_empty_when_after_is_not_below_upto(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    store.commit(&upserts(
        &s,
        &[
            ("a", put(2, 1, "a")),
            ("b", put(4, 1, "b")),
            ("c", put(6, 1, "c")),
        ],
    ))?;
    assert_eq!(live(store, &s, 1, Some(5), 3, 10)?, vec![]);
    assert_eq!(live(store, &s, 1, Some(4), 4, 10)?, vec![]);
    assert_eq!(live(store, &s, 1, Some(u64::MAX), u64::MAX, 10)?, vec![]);
    Ok(())
}

/// Hlcs are unique: a version arriving under another key with the Hlc of a stored version
/// (forged, or corrupt) is refused and displaces nothing; the same Hlc in another scope, or
/// once the holder was superseded, is an ordinary version.
fn a_version_at_another_keys_hlc_is_refused(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let other = scope("app/x/y");
    store.commit(&upserts(&s, &[("a", put(5, 1, "a"))]))?;
    assert_eq!(
        store.commit(&upserts(
            &s,
            &[("b", put(5, 1, "forged")), ("c", put(6, 1, "c"))]
        ))?,
        report(&[1], &[])
    );
    {
        let read = store.read()?;
        assert_eq!(read.get(&s, &key("a"))?, Some(put(5, 1, "a")));
        assert_eq!(read.get(&s, &key("b"))?, None);
        assert_eq!(
            read.live_range(&s, id(1), None, hlc(u64::MAX, 1), 10)?,
            vec![(key("a"), put(5, 1, "a")), (key("c"), put(6, 1, "c"))]
        );
    }
    assert_eq!(
        store.commit(&upserts(&other, &[("b", put(5, 1, "b"))]))?,
        report(&[0], &[])
    );
    store.commit(&upserts(&s, &[("a", put(7, 1, "a2"))]))?;
    assert_eq!(
        store.commit(&upserts(&s, &[("b", put(5, 1, "b"))]))?,
        report(&[0], &[])
    );
    let read = store.read()?;
    assert_eq!(read.get(&other, &key("b"))?, Some(put(5, 1, "b")));
    assert_eq!(read.get(&s, &key("b"))?, Some(put(5, 1, "b")));
    assert_eq!(read.get(&s, &key("a"))?, Some(put(7, 1, "a2")));
    Ok(())
}

/// Knowledge of a scope with no marks reads back as no knowledge of that scope.
fn empty_peer_scope_reads_back_as_absent(store: &dyn Store) -> TestResult {
    let mut with_empty = marks(&[(&Scope::shared(), hlc(3, 1))]);
    with_empty.scope_mut(&scope("app/a/b"));
    store.commit(&knowledge(9, ScopeFilter::All, with_empty))?;
    assert_eq!(
        store.read()?.peer_watermarks(id(9))?,
        Some(marks(&[(&Scope::shared(), hlc(3, 1))]))
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Atomicity of a failing redb commit

/// The redb layout's meta table ("meta-v1": name -> bytes; "clock" is a u64 BE).
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta-v1");

fn set_raw_clock(path: &Path, bytes: &[u8]) -> TestResult {
    let db = redb::Database::create(path)?;
    let txn = db.begin_write()?;
    txn.open_table(META)?.insert("clock", bytes)?;
    txn.commit()?;
    Ok(())
}

/// A batch whose last step (raising the clock) fails after its upserts, advances and peer
/// knowledge were written inside the transaction: the commit fails and none of it is visible.
#[test]
fn redb_failed_commit_applies_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let s = Scope::shared();
    {
        let store = RedbStore::open(&path)?;
        let mut seed = upserts(&s, &[("k", put(1, 1, "old"))]);
        seed.advances.push(Advance {
            scope: s.clone(),
            base: None,
            top: hlc(1, 1),
        });
        store.commit(&seed)?;
    }
    // A clock row of the wrong length: `raise_clock` cannot decode it.
    set_raw_clock(&path, &[1, 2, 3])?;

    let store = RedbStore::open(&path)?;
    let before = (
        store.read()?.watermarks()?,
        store.read()?.scopes()?,
        scan(&store, &s, "", None, 100)?,
    );
    let mut batch = upserts(&s, &[("k", put(2, 1, "new")), ("j", put(3, 1, "j"))]);
    batch
        .upserts
        .push((scope("app/x/y"), key("k"), put(4, 1, "x")));
    batch.advances.push(Advance {
        scope: s.clone(),
        base: Some(hlc(1, 1)),
        top: hlc(3, 1),
    });
    batch.peer = Some(PeerKnowledge {
        peer: id(9),
        scopes: ScopeFilter::All,
        marks: marks(&[(&s, hlc(3, 1))]),
    });
    batch.clock = 50;
    batch.durability = Durability::Immediate;
    assert!(
        store.commit(&batch).is_err(),
        "the commit must fail on the undecodable clock row"
    );

    let read = store.read()?;
    assert_eq!(read.get(&s, &key("k"))?, Some(put(1, 1, "old")));
    assert_eq!(read.get(&s, &key("j"))?, None);
    assert_eq!(
        (
            read.watermarks()?,
            read.scopes()?,
            scan(&store, &s, "", None, 100)?
        ),
        before
    );
    assert_eq!(
        read.live_range(&s, id(1), None, hlc(u64::MAX, 1), 10)?,
        vec![(key("k"), put(1, 1, "old"))]
    );
    assert_eq!(read.peer_watermarks(id(9))?, None);
    assert_eq!(read.peers()?, vec![]);
    drop(read);
    drop(store);

    // The same batch commits once the clock row is sound again: only the failure stopped it.
    set_raw_clock(&path, &7u64.to_be_bytes())?;
    let store = RedbStore::open(&path)?;
    assert_eq!(store.commit(&batch)?, report(&[0, 1, 2], &[true]));
    assert_eq!(store.read()?.clock()?, 50);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Deferred commits gathered in one redb write transaction

fn deferred_with_mark(s: &Scope, k: &str, time: u64) -> Batch {
    let mut b = upserts(s, &[(k, put(time, 1, k))]);
    b.advances.push(Advance {
        scope: s.clone(),
        base: None,
        top: hlc(time, 1),
    });
    b
}

/// While deferred commits are gathered, a reader sees them, and holds every other commit
/// back until it is dropped: a commit from another thread waits (and then lands), and one
/// from the reader's own thread is refused with `ReaderHeld` instead of waiting forever.
#[test]
fn redb_reader_while_deferred_commits_gather() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = RedbStore::open(dir.path().join("store.redb"))?;
    let s = Scope::shared();
    store.commit(&deferred_with_mark(&s, "a", 1))?;

    let read = store.read()?;
    assert_eq!(read.get(&s, &key("a"))?, Some(put(1, 1, "a")));
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(1, 1))]));

    let same_thread = store.commit(&deferred_with_mark(&s, "b", 2));
    assert!(
        matches!(same_thread, Err(highwater::error::StoreError::ReaderHeld)),
        "{same_thread:?}"
    );
    assert!(matches!(
        store.read().map(|_| ()),
        Err(highwater::error::StoreError::ReaderHeld)
    ));
    assert!(matches!(
        store.flush(),
        Err(highwater::error::StoreError::ReaderHeld)
    ));

    let (tx, rx) = mpsc::channel();
    std::thread::scope(|threads| -> TestResult {
        threads.spawn(|| tx.send(store.commit(&deferred_with_mark(&s, "c", 3)).is_ok()));
        // The other thread's commit cannot land while the reader lives, so the reader keeps
        // seeing one state.
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "a commit landed beside a reader of the open group"
        );
        assert_eq!(read.get(&s, &key("c"))?, None);
        assert_eq!(read.watermarks()?, marks(&[(&s, hlc(1, 1))]));
        drop(read);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        Ok(())
    })?;
    let read = store.read()?;
    assert_eq!(
        read.get(&s, &key("b"))?,
        None,
        "the refused commit changed the store"
    );
    assert_eq!(read.get(&s, &key("c"))?, Some(put(3, 1, "c")));
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(3, 1))]));
    Ok(())
}

/// The redb layout's key index ("keys-v2": `len u8 | scope | key` -> origin | time BE).
const KEY_INDEX: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("keys-v2");

/// A deferred commit that fails takes back the deferred commits gathered before it, data
/// and watermarks together, as a crash would; the next commit starts afresh.
#[test]
fn redb_failed_deferred_commit_takes_back_its_group() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let s = Scope::shared();
    {
        let store = RedbStore::open(&path)?;
        let mut seed = deferred_with_mark(&s, "k", 1);
        seed.durability = Durability::Immediate;
        store.commit(&seed)?;
    }
    {
        // A record row that does not decode: merging into key "bad" fails.
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        let mut row = vec![6u8];
        row.extend_from_slice(b"sharedbad");
        txn.open_table(KEY_INDEX)?
            .insert(row.as_slice(), [0xffu8; 3].as_slice())?;
        txn.commit()?;
    }
    let store = RedbStore::open(&path)?;
    store.commit(&deferred_with_mark(&s, "a", 2))?;
    store.commit(&deferred_with_mark(&s, "b", 3))?;
    assert_eq!(store.read()?.watermarks()?, marks(&[(&s, hlc(3, 1))]));

    let failed = store.commit(&deferred_with_mark(&s, "bad", 4));
    assert!(
        matches!(failed, Err(highwater::error::StoreError::Corrupt { .. })),
        "{failed:?}"
    );
    let read = store.read()?;
    assert_eq!(read.get(&s, &key("a"))?, None);
    assert_eq!(read.get(&s, &key("b"))?, None);
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(1, 1))]));
    assert_eq!(
        read.live_range(&s, id(1), None, hlc(u64::MAX, 1), 10)?,
        vec![(key("k"), put(1, 1, "k"))]
    );
    drop(read);

    store.commit(&deferred_with_mark(&s, "c", 5))?;
    let read = store.read()?;
    assert_eq!(read.get(&s, &key("c"))?, Some(put(5, 1, "c")));
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(5, 1))]));
    Ok(())
}

/// On a disk that loses what was not synced: gathered deferred commits are lost in a power
/// cut together with their watermarks; a durable commit, a flush, or closing the store makes
/// them durable.
#[test]
fn redb_gathered_commits_are_durable_after_a_durable_commit_flush_or_close() -> TestResult {
    use highwater::testing::{DiskHandle, PowerLossDisk};
    let s = Scope::shared();
    let state = |store: &RedbStore| -> Result<_, Box<dyn Error>> {
        let keys = scan(store, &s, "", None, 100)?;
        Ok((keys, store.read()?.watermarks()?))
    };

    let disk = PowerLossDisk::new();
    let store = RedbStore::with_backend(DiskHandle(disk.clone()))?;
    store.commit(&deferred_with_mark(&s, "a", 1))?;
    store.commit(&deferred_with_mark(&s, "b", 2))?;
    let cut = RedbStore::with_backend(DiskHandle(disk.after_power_loss()))?;
    assert_eq!(state(&cut)?, (vec![], ScopedWatermarks::new()));
    drop(cut);

    // A durable local write makes the gathered commits durable with it.
    let mut local = deferred_with_mark(&s, "c", 3);
    local.durability = Durability::Immediate;
    store.commit(&local)?;
    let cut = RedbStore::with_backend(DiskHandle(disk.after_power_loss()))?;
    assert_eq!(
        state(&cut)?,
        (
            vec![key("a"), key("b"), key("c")],
            marks(&[(&s, hlc(3, 1))])
        )
    );
    drop(cut);

    store.commit(&deferred_with_mark(&s, "d", 4))?;
    store.flush()?;
    let cut = RedbStore::with_backend(DiskHandle(disk.after_power_loss()))?;
    assert_eq!(state(&cut)?.1, marks(&[(&s, hlc(4, 1))]));
    drop(cut);

    store.commit(&deferred_with_mark(&s, "e", 5))?;
    drop(store);
    let cut = RedbStore::with_backend(DiskHandle(disk.after_power_loss()))?;
    assert_eq!(state(&cut)?.1, marks(&[(&s, hlc(5, 1))]));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Format 1 files are migrated when opened

const RECORDS_V1: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("records-v1");
const LIVE_V1: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("live-v1");
const MARKS_V1: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("watermarks-v1");

fn scope_bytes(s: &Scope) -> Vec<u8> {
    let mut out = vec![u8::try_from(s.as_str().len()).expect("short scope")];
    out.extend_from_slice(s.as_str().as_bytes());
    out
}

/// A file written in format 1 (the layout of docs/storage.md before format 2: records by
/// key, a live index naming keys) opens as format 3 (through format 2) with the same state,
/// and a store at an unknown format is still refused.
#[test]
fn redb_format_1_file_is_migrated_on_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let s = Scope::shared();
    let app = scope("app/x/y");
    let rows = [
        (&s, "k", put(5, 1, "five")),
        (
            &s,
            "j",
            Version {
                hlc: hlc(7, 2),
                op: Op::Delete,
            },
        ),
        (&app, "k", put(6, 1, "app")),
    ];
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("format", 1u32.to_be_bytes().as_slice())?;
            meta.insert("clock", 9u64.to_be_bytes().as_slice())?;
            let mut records = txn.open_table(RECORDS_V1)?;
            let mut live = txn.open_table(LIVE_V1)?;
            let mut marks = txn.open_table(MARKS_V1)?;
            for (scope, k, v) in &rows {
                let mut rk = scope_bytes(scope);
                rk.extend_from_slice(k.as_bytes());
                records.insert(rk.as_slice(), postcard::to_allocvec(v)?.as_slice())?;
                let mut lk = scope_bytes(scope);
                lk.extend_from_slice(&v.hlc.origin().to_bytes());
                lk.extend_from_slice(&v.hlc.time().to_be_bytes());
                live.insert(lk.as_slice(), k.as_bytes())?;
                let mut mk = scope_bytes(scope);
                mk.extend_from_slice(&v.hlc.origin().to_bytes());
                marks.insert(mk.as_slice(), 7)?;
            }
        }
        txn.commit()?;
    }
    let store = RedbStore::open(&path)?;
    let read = store.read()?;
    assert_eq!(read.get(&s, &key("k"))?, Some(put(5, 1, "five")));
    assert_eq!(
        read.get(&s, &key("j"))?,
        Some(Version {
            hlc: hlc(7, 2),
            op: Op::Delete,
        })
    );
    assert_eq!(read.get(&app, &key("k"))?, Some(put(6, 1, "app")));
    assert_eq!(read.scopes()?, vec![app.clone(), s.clone()]);
    assert_eq!(
        read.live_range(&s, id(1), None, hlc(u64::MAX, 1), 10)?,
        vec![(key("k"), put(5, 1, "five"))]
    );
    assert_eq!(read.clock()?, 9);
    assert_eq!(
        read.watermarks()?,
        marks(&[(&s, hlc(7, 1)), (&s, hlc(7, 2)), (&app, hlc(7, 1))])
    );
    drop(read);
    // It merges as any store does, and reopens without migrating again.
    store.commit(&upserts(&s, &[("k", put(8, 2, "eight"))]))?;
    drop(store);
    let store = RedbStore::open(&path)?;
    assert_eq!(store.read()?.get(&s, &key("k"))?, Some(put(8, 2, "eight")));
    assert_eq!(
        store
            .read()?
            .live_range(&s, id(1), None, hlc(u64::MAX, 1), 10)?,
        vec![]
    );
    drop(store);

    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?
            .insert("format", 4u32.to_be_bytes().as_slice())?;
        txn.commit()?;
    }
    match RedbStore::open(&path) {
        Err(highwater::error::StoreError::UnsupportedFormat {
            found: 4,
            supported: 3,
        }) => Ok(()),
        Err(e) => Err(format!("format 4 refused with {e}").into()),
        Ok(_) => Err("a format 4 file opened".into()),
    }
}

// ---------------------------------------------------------------------------------------
// The redb store against the in-memory model

const SCOPES: [&str; 3] = ["app/a/b", "app/a/bc", "shared"];
const KEYS: [&[u8]; 6] = [b"a", b"ab", b"b", b"ba", &[0xff], &[0x00, 0x01]];

#[derive(Clone, Debug)]
struct UpsertSpec {
    scope: usize,
    key: usize,
    origin: u8,
    time: u64,
    delete: bool,
}

#[derive(Clone, Debug)]
struct AdvanceSpec {
    scope: usize,
    origin: u8,
    base: Option<u64>,
    top: u64,
}

#[derive(Clone, Debug)]
struct PeerSpec {
    peer: u8,
    only: Option<Vec<usize>>,
    marks: Vec<(usize, u8, u64)>,
}

#[derive(Clone, Debug)]
struct BatchSpec {
    upserts: Vec<UpsertSpec>,
    advances: Vec<AdvanceSpec>,
    peer: Option<PeerSpec>,
    clock: u64,
    immediate: bool,
}

fn batch_spec() -> impl Strategy<Value = BatchSpec> {
    let upsert = (0..3usize, 0..KEYS.len(), 1..=3u8, 1..40u64, any::<bool>()).prop_map(
        |(scope, key, origin, time, delete)| UpsertSpec {
            scope,
            key,
            origin,
            time,
            delete,
        },
    );
    let advance = (0..3usize, 1..=3u8, prop::option::of(0..40u64), 1..40u64).prop_map(
        |(scope, origin, base, top)| AdvanceSpec {
            scope,
            origin,
            base,
            top,
        },
    );
    let peer = (
        7..=8u8,
        prop::option::of(prop::collection::vec(0..3usize, 0..3)),
        prop::collection::vec((0..3usize, 1..=3u8, 1..40u64), 0..4),
    )
        .prop_map(|(peer, only, marks)| PeerSpec { peer, only, marks });
    (
        prop::collection::vec(upsert, 0..6),
        prop::collection::vec(advance, 0..4),
        prop::option::of(peer),
        0..100u64,
        prop::bool::weighted(0.1),
    )
        .prop_map(|(upserts, advances, peer, clock, immediate)| BatchSpec {
            upserts,
            advances,
            peer,
            clock,
            immediate,
        })
}

/// Builds the batch, dropping upserts that would give two keys of a scope the same Hlc
/// (timestamps are unique per origin, so the index has one entry per version).
fn build(spec: &BatchSpec, used: &mut BTreeMap<(usize, u8, u64), usize>) -> Batch {
    let s = |i: usize| scope(SCOPES[i]);
    let mut b = Batch::new(
        spec.clock,
        if spec.immediate {
            Durability::Immediate
        } else {
            Durability::Deferred
        },
    );
    for u in &spec.upserts {
        if *used.entry((u.scope, u.origin, u.time)).or_insert(u.key) != u.key {
            continue;
        }
        let v = if u.delete {
            del(u.time, u.origin)
        } else {
            put(u.time, u.origin, &format!("{}@{}", u.key, u.time))
        };
        b.upserts.push((s(u.scope), key(KEYS[u.key]), v));
    }
    for a in &spec.advances {
        b.advances.push(Advance {
            scope: s(a.scope),
            base: a.base.map(|t| hlc(t, a.origin)),
            top: hlc(a.top, a.origin),
        });
    }
    b.peer = spec.peer.as_ref().map(|p| PeerKnowledge {
        peer: id(p.peer),
        scopes: match &p.only {
            None => ScopeFilter::All,
            Some(list) => ScopeFilter::Only(list.iter().map(|i| s(*i)).collect::<BTreeSet<_>>()),
        },
        marks: p
            .marks
            .iter()
            .fold(ScopedWatermarks::new(), |mut w, (sc, o, t)| {
                w.observe(&s(*sc), hlc(*t, *o));
                w
            }),
    });
    b
}

/// Everything a reader can observe, through a few fixed scan and live-range windows.
#[derive(Debug, PartialEq)]
struct Observed {
    watermarks: ScopedWatermarks,
    scopes: Vec<Scope>,
    peers: Vec<NodeId>,
    knowledge: Vec<Option<ScopedWatermarks>>,
    clock: u64,
    scans: Vec<Vec<(Key, Version)>>,
    live: Vec<Vec<(Key, Version)>>,
}

fn observe(store: &dyn Store) -> Result<Observed, Box<dyn Error>> {
    let read = store.read()?;
    let mut scans = Vec::new();
    let mut live = Vec::new();
    for name in SCOPES {
        let s = scope(name);
        for (prefix, after, limit) in [
            (&b""[..], None, 100),
            (b"a", None, 100),
            (b"", Some("ab"), 2),
            (b"b", Some("a"), 100),
            (b"", None, 1),
        ] {
            scans.push(read.scan(
                &s,
                &KeyRange {
                    prefix: prefix.to_vec(),
                    after: after.map(key),
                    limit,
                },
            )?);
        }
        for origin in 1..=3u8 {
            for (after, upto, limit) in [
                (None, u64::MAX, 100),
                (Some(5), 20, 100),
                (None, 10, 2),
                (Some(20), 20, 100),
            ] {
                live.push(read.live_range(
                    &s,
                    id(origin),
                    after.map(|t| hlc(t, origin)),
                    hlc(upto, origin),
                    limit,
                )?);
            }
            // The index holds exactly the stored versions, one entry each, ascending.
            let mut stored: Vec<_> = read
                .scan(
                    &s,
                    &KeyRange {
                        limit: 100,
                        ..KeyRange::default()
                    },
                )?
                .into_iter()
                .filter(|(_, v)| v.hlc.origin() == id(origin))
                .collect();
            stored.sort_by_key(|(_, v)| v.hlc);
            let indexed = read.live_range(&s, id(origin), None, hlc(u64::MAX, origin), 100)?;
            if indexed != stored {
                return Err(format!(
                    "live index of {name}/{origin} is {indexed:?}, stored versions are {stored:?}"
                )
                .into());
            }
        }
    }
    Ok(Observed {
        watermarks: read.watermarks()?,
        scopes: read.scopes()?,
        peers: read.peers()?,
        knowledge: vec![read.peer_watermarks(id(7))?, read.peer_watermarks(id(8))?],
        clock: read.clock()?,
        scans,
        live,
    })
}

fn equivalent(specs: &[BatchSpec]) -> Result<(), TestCaseError> {
    let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
    let model = MemStore::new();
    let dir = tempfile::tempdir().map_err(|e| fail(e.into()))?;
    let real = RedbStore::open(dir.path().join("store.redb")).map_err(|e| fail(e.into()))?;
    let mut used = BTreeMap::new();
    for spec in specs {
        let batch = build(spec, &mut used);
        let expected = model.commit(&batch).map_err(|e| fail(e.into()))?;
        let got = real.commit(&batch).map_err(|e| fail(e.into()))?;
        prop_assert_eq!(&got, &expected, "reports differ for {:?}", batch);
        prop_assert_eq!(
            observe(&real).map_err(fail)?,
            observe(&model).map_err(fail)?
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(96), ..ProptestConfig::default() })]

    #[test]
    fn redb_store_matches_the_in_memory_model(specs in prop::collection::vec(batch_spec(), 1..8)) {
        equivalent(&specs)?;
    }
}
