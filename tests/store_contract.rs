//! The store contract (see `highwater::store`'s module docs), one suite run against every
//! store: identity, LWW upserts, the live-version index, conditional watermark advances,
//! peer knowledge, the persisted clock, scans, scopes, snapshots, blob references per scope
//! and atomicity. A property test then checks that the redb store behaves exactly like the
//! in-memory model under random batches, and that both count blob references as their
//! stored versions say.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use highwater::error::StoreError;
use highwater::store::{
    item_hash, Advance, AuditPoint, AuditRange, Batch, BatchReport, Durability, Fingerprint,
    KeyRange, MemStore, PeerKnowledge, RedbStore, Store, StoreRead,
};
use highwater::{
    BlobRef, Hash, Hlc, Key, NodeId, Op, Scope, ScopeFilter, ScopedWatermarks, Version,
};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn Error>>;

/// A store and whatever must outlive it (field order: the store is dropped first).
struct Fixture {
    store: Box<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    #[cfg(feature = "postgres")]
    _schema: Option<common::pg::Schema>,
}

fn mem() -> Result<Fixture, Box<dyn Error>> {
    Ok(Fixture {
        store: Box::new(MemStore::new()),
        _dir: None,
        #[cfg(feature = "postgres")]
        _schema: None,
    })
}

fn redb() -> Result<Fixture, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = RedbStore::open(dir.path().join("store.redb"))?;
    Ok(Fixture {
        store: Box::new(store),
        _dir: Some(dir),
        #[cfg(feature = "postgres")]
        _schema: None,
    })
}

/// A PostgreSQL store in a fresh schema, or `None` (with a note) without
/// `HIGHWATER_PG_URL`.
#[cfg(feature = "postgres")]
fn pg(test: &str) -> Result<Option<Fixture>, Box<dyn Error>> {
    let Some(schema) = common::pg::Schema::fresh(test)? else {
        return Ok(None);
    };
    Ok(Some(Fixture {
        store: Box::new(schema.open()?),
        _dir: None,
        _schema: Some(schema),
    }))
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
        #[cfg(feature = "postgres")]
        mod pg_store {
            $(
                #[test]
                fn $case() -> super::TestResult {
                    match super::pg(stringify!($case))? {
                        Some(fixture) => super::$case(&*fixture.store),
                        None => Ok(()),
                    }
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
    issued_batches_commit_only_above_the_stored_clock_under_its_identity,
    scan_honours_prefix_after_limit_and_key_order,
    scopes_list_records_and_own_marks_only,
    snapshot_ignores_later_commits,
    live_range_is_empty_when_after_is_not_below_upto,
    empty_peer_scope_reads_back_as_absent,
    a_version_at_another_keys_hlc_is_refused,
    audit_items_and_fingerprints_follow_the_live_versions,
    audit_split_cuts_into_non_empty_parts,
    version_at_finds_a_live_version_by_its_hlc,
    blob_references_are_counted_per_scope,
    blob_sizes_are_kept_per_scope,
    referenced_blobs_page_in_hash_order,
    removals_take_out_exactly_the_named_version,
    the_floor_refuses_old_versions_of_keys_not_held,
    retired_marks_and_forgotten_peers_are_gone,
    notes_are_kept_replaced_and_removed,
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

fn blob(name: &str, size: u64) -> BlobRef {
    BlobRef {
        hash: Hash::of(name.as_bytes()),
        size,
    }
}

fn put_blob(time: u64, origin: u8, blob: BlobRef) -> Version {
    Version {
        hlc: hlc(time, origin),
        op: Op::Put {
            value: b"file".to_vec(),
            blob: Some(blob),
        },
    }
}

/// What a reader says of the references to `hash`: the total count and the scopes.
fn refs_of(store: &dyn Store, hash: &Hash) -> Result<(u64, Vec<Scope>), Box<dyn Error>> {
    let read = store.read()?;
    Ok((read.blob_refs(hash)?, read.blob_scopes(hash)?))
}

/// Every referenced blob, in one page.
fn referenced(store: &dyn Store) -> Result<Vec<BlobRef>, Box<dyn Error>> {
    Ok(store.read()?.referenced_blobs(None, usize::MAX)?)
}

fn by_hash(mut blobs: Vec<BlobRef>) -> Vec<BlobRef> {
    blobs.sort_by_key(|b| b.hash);
    blobs
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
        ..BatchReport::default()
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

/// A note reads back as last set, an empty value included, until it is removed; notes are
/// independent of each other.
fn notes_are_kept_replaced_and_removed(store: &dyn Store) -> TestResult {
    assert_eq!(store.note("peer/a")?, None);
    store.set_note("peer/a", Some(b"one"))?;
    store.set_note("peer/a", Some(b"two"))?;
    store.set_note("b", Some(b""))?;
    assert_eq!(store.note("peer/a")?, Some(b"two".to_vec()));
    assert_eq!(store.note("b")?, Some(Vec::new()));
    store.set_note("peer/a", None)?;
    store.set_note("never set", None)?;
    assert_eq!(store.note("peer/a")?, None);
    assert_eq!(store.note("b")?, Some(Vec::new()));
    Ok(())
}

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

    // live_count counts what live_range returns, up to the cap.
    let count = |origin: u8, after: Option<u64>, upto: u64, cap: u64| {
        store.read()?.live_count(
            &s,
            id(origin),
            after.map(|t| hlc(t, origin)),
            hlc(upto, origin),
            cap,
        )
    };
    assert_eq!(count(1, None, all, u64::MAX)?, 3);
    assert_eq!(count(2, None, all, u64::MAX)?, 2);
    assert_eq!(
        count(3, None, all, u64::MAX)?,
        0,
        "an origin with nothing live"
    );
    assert_eq!(count(1, Some(4), 7, u64::MAX)?, 2);
    assert_eq!(count(1, Some(3), 5, u64::MAX)?, 2);
    assert_eq!(count(1, None, 4, u64::MAX)?, 1);
    assert_eq!(count(1, Some(5), 5, u64::MAX)?, 0, "empty range");
    assert_eq!(count(1, Some(7), all, u64::MAX)?, 0);
    assert_eq!(count(1, Some(7), 3, u64::MAX)?, 0, "after above upto");
    assert_eq!(count(1, None, all, 2)?, 2, "the cap");
    assert_eq!(count(1, None, all, 0)?, 0);
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

/// Two writers sharing a store (hub processes over one database) must never both commit a
/// timestamp, nor one below the other's: a batch that issued timestamps commits only above
/// the stored clock and under the store's identity, and otherwise changes nothing.
fn issued_batches_commit_only_above_the_stored_clock_under_its_identity(
    store: &dyn Store,
) -> TestResult {
    let me = store.identity(id(1))?;
    let s = scope("app/issued/items");
    let local = |time: u64, origin: NodeId, value: &str| {
        let hlc = Hlc::new(time, origin);
        let mut b = upserts(&s, &[(value, put(time, 1, value))]);
        b.upserts[0].2.hlc = hlc;
        b.advances.push(Advance {
            scope: s.clone(),
            base: None,
            top: hlc,
        });
        b.issued = Some(hlc);
        b.clock = time;
        // As the engine commits local writes (a failed commit takes back the redb store's
        // open group of deferred ones, as a crash would).
        b.durability = Durability::Immediate;
        b
    };
    store.commit(&local(100, me, "a"))?;
    assert_eq!(store.read()?.clock()?, 100);
    // Another writer's batch issued at or below the time issuing commits reached: refused,
    // nothing written.
    for time in [100, 99] {
        match store.commit(&local(time, me, "b")) {
            Err(StoreError::IssuedBehind {
                before, identity, ..
            }) => {
                assert_eq!(before, 100);
                assert_eq!(identity, Some(me));
            }
            other => panic!("a batch issued at {time} after one at 100: {other:?}"),
        }
    }
    // A batch that only observes (issues nothing) raises the clock, not the issued time: a
    // writer alone on its store is never refused because a round committed a later clock
    // between its issuing and its commit.
    store.commit(&Batch::new(150, Durability::Immediate))?;
    store.commit(&local(120, me, "c"))?;
    // Under another identity than the store's: refused though its time is later.
    assert!(matches!(
        store.commit(&local(200, id(9), "d")),
        Err(StoreError::IssuedBehind { identity: Some(i), .. }) if i == me
    ));
    let read = store.read()?;
    assert_eq!(
        read.get(&s, &key("a"))?.map(|v| v.hlc),
        Some(Hlc::new(100, me))
    );
    for refused in ["b", "d"] {
        assert_eq!(read.get(&s, &key(refused))?, None, "{refused} was written");
    }
    assert_eq!(
        read.get(&s, &key("c"))?.map(|v| v.hlc),
        Some(Hlc::new(120, me))
    );
    assert_eq!(read.watermarks()?.get(&s, me), Some(Hlc::new(120, me)));
    drop(read);
    assert!(matches!(
        store.commit(&local(120, me, "e")),
        Err(StoreError::IssuedBehind { before: 120, .. })
    ));
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
    {
        let read = store.read()?;
        assert_eq!(read.get(&other, &key("b"))?, Some(put(5, 1, "b")));
        assert_eq!(read.get(&s, &key("b"))?, Some(put(5, 1, "b")));
        assert_eq!(read.get(&s, &key("a"))?, Some(put(7, 1, "a2")));
    }
    // Within one batch, above everything stored of the origin, in a fresh scope too: the
    // first of two versions with one Hlc is taken, the second refused.
    let fresh = scope("app/x/z");
    for scope in [&s, &fresh] {
        assert_eq!(
            store.commit(&upserts(
                scope,
                &[("x", put(9, 1, "x")), ("y", put(9, 1, "forged"))]
            ))?,
            report(&[0], &[])
        );
        let read = store.read()?;
        assert_eq!(read.get(scope, &key("x"))?, Some(put(9, 1, "x")));
        assert_eq!(read.get(scope, &key("y"))?, None);
    }
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

/// The audit set of a scope is its live versions in (origin, time) order, tombstones
/// included; a range's fingerprint is the fold of `item_hash` over the items in it.
fn audit_items_and_fingerprints_follow_the_live_versions(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let other = scope("app/x/y");
    store.commit(&upserts(
        &s,
        &[
            ("a", put(5, 1, "a")),
            ("b", put(6, 1, "b")),
            ("c", put(3, 2, "c")),
            ("d", del(4, 2)),
        ],
    ))?;
    store.commit(&upserts(&other, &[("a", put(5, 1, "elsewhere"))]))?;
    // a moves from origin 1 to origin 2; b is deleted by origin 1.
    store.commit(&upserts(&s, &[("a", put(9, 2, "a2")), ("b", del(7, 1))]))?;

    let read = store.read()?;
    let all = read.audit_items(&s, &AuditRange::ALL, 100)?;
    assert_eq!(
        all,
        vec![
            (hlc(7, 1), key("b")),
            (hlc(3, 2), key("c")),
            (hlc(4, 2), key("d")),
            (hlc(9, 2), key("a")),
        ],
        "(origin, time) order, superseded versions gone, tombstones in"
    );
    assert_eq!(read.fingerprint(&s, &AuditRange::ALL)?, fold(&all));
    assert_eq!(read.fingerprint(&s, &AuditRange::all())?.count, 4);
    let p = |time, origin| Some(AuditPoint::from(hlc(time, origin)));
    for (lo, hi, expected) in [
        (p(7, 1), p(4, 2), &all[0..2]),
        (p(6, 1), p(9, 2), &all[0..3]),
        (p(8, 1), None, &all[1..4]),
        (None, p(0, 2), &all[0..1]),
        (p(4, 2), p(4, 2), &all[0..0]),
        (p(9, 2), p(3, 2), &all[0..0]),
        (p(10, 2), None, &all[0..0]),
    ] {
        let range = AuditRange { lo, hi };
        assert_eq!(read.audit_items(&s, &range, 100)?, expected, "{range:?}");
        assert_eq!(read.fingerprint(&s, &range)?, fold(expected), "{range:?}");
        assert!(expected
            .iter()
            .all(|(h, _)| range.contains(AuditPoint::from(*h))));
    }
    assert_eq!(
        read.audit_items(&s, &AuditRange::ALL, 2)?,
        all[..2].to_vec()
    );
    assert_eq!(read.audit_items(&s, &AuditRange::ALL, 0)?, vec![]);
    assert_eq!(
        read.audit_items(&other, &AuditRange::ALL, 100)?,
        vec![(hlc(5, 1), key("a"))],
        "per scope"
    );
    assert_eq!(
        read.fingerprint(&scope("app/x/none"), &AuditRange::ALL)?,
        Fingerprint::EMPTY
    );
    Ok(())
}

/// A removal takes out the key's stored version with its index entry, its blob reference
/// and its share of the fingerprints, only if the stored version is the one named.
fn removals_take_out_exactly_the_named_version(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let b = blob("purged", 10);
    store.commit(&upserts(
        &s,
        &[
            ("a", put(5, 1, "a")),
            ("b", put_blob(6, 1, b)),
            ("c", del(7, 2)),
            ("d", del(8, 2)),
        ],
    ))?;
    let mut batch = Batch::new(0, Durability::Immediate);
    batch.removals = vec![
        (s.clone(), key("b"), hlc(6, 1)),
        (s.clone(), key("c"), hlc(7, 2)),
        (s.clone(), key("d"), hlc(9, 2)),
        (s.clone(), key("zz"), hlc(1, 1)),
    ];
    let report = store.commit(&batch)?;
    assert_eq!(report.removed, 2, "{report:?}");
    assert_eq!(
        report.unreferenced,
        vec![b.hash],
        "the blob lost its last reference"
    );
    let read = store.read()?;
    assert_eq!(read.get(&s, &key("b"))?, None);
    assert_eq!(read.get(&s, &key("c"))?, None);
    assert_eq!(
        read.get(&s, &key("d"))?,
        Some(del(8, 2)),
        "another Hlc: kept"
    );
    assert_eq!(read.get(&s, &key("a"))?, Some(put(5, 1, "a")));
    assert_eq!(
        live(store, &s, 1, None, u64::MAX, 10)?,
        vec![(key("a"), put(5, 1, "a"))]
    );
    assert_eq!(
        live(store, &s, 2, None, u64::MAX, 10)?,
        vec![(key("d"), del(8, 2))]
    );
    assert_eq!(refs_of(store, &b.hash)?, (0, vec![]));
    let items = read.audit_items(&s, &AuditRange::ALL, 100)?;
    assert_eq!(items, vec![(hlc(5, 1), key("a")), (hlc(8, 2), key("d"))]);
    assert_eq!(read.fingerprint(&s, &AuditRange::ALL)?, fold(&items));
    Ok(())
}

/// A version at or below its scope's floor that the store's mark covers (or of an origin
/// without a mark) is refused for a key the store does not hold (its delete was purged),
/// merged as ever for a key it holds or when the mark does not cover it (never had); floors
/// only rise and are per scope.
fn the_floor_refuses_old_versions_of_keys_not_held(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let other = scope("app/x/y");
    store.commit(&upserts(&s, &[("held", put(3, 1, "old"))]))?;
    store.commit(&advances(&[
        (&s, None, hlc(10, 2)),
        (&s, None, hlc(5, 3)),
        (&other, None, hlc(10, 2)),
    ]))?;
    let mut batch = Batch::new(0, Durability::Deferred);
    batch.floors = vec![(s.clone(), 10), (other.clone(), 3)];
    batch.upserts = vec![
        (s.clone(), key("new"), put(9, 2, "below")),
        (s.clone(), key("held"), put(8, 2, "newer")),
        (s.clone(), key("edge"), put(10, 2, "at")),
        (s.clone(), key("later"), put(11, 2, "above")),
        (other.clone(), key("new"), put(9, 2, "above its floor")),
        // Our mark for origin 3 does not cover it: we never had it, and cannot tell it from
        // the older write of a key whose delete we purged. Refused as well.
        (s.clone(), key("unseen"), put(7, 3, "never had")),
        (
            s.clone(),
            key("stranger"),
            put(7, 4, "an origin without a mark"),
        ),
    ];
    batch.advances = vec![Advance {
        scope: s.clone(),
        base: Some(hlc(10, 2)),
        top: hlc(11, 2),
    }];
    let report = store.commit(&batch)?;
    assert_eq!(report.refused, vec![0, 2, 5, 6], "{report:?}");
    assert_eq!(report.applied, vec![1, 3, 4]);
    assert_eq!(
        report.advanced,
        vec![true],
        "the mark moves past what was refused"
    );
    let read = store.read()?;
    assert_eq!(read.get(&s, &key("new"))?, None);
    assert_eq!(read.get(&s, &key("edge"))?, None);
    assert_eq!(read.get(&s, &key("held"))?, Some(put(8, 2, "newer")));
    assert_eq!(
        read.get(&other, &key("new"))?,
        Some(put(9, 2, "above its floor"))
    );
    assert_eq!(read.get(&s, &key("unseen"))?, None);
    assert_eq!(read.get(&s, &key("stranger"))?, None);
    assert_eq!(
        read.floors()?,
        BTreeMap::from([(s.clone(), 10), (other.clone(), 3)])
    );
    drop(read);
    let mut lower = Batch::new(0, Durability::Deferred);
    lower.floors = vec![(s.clone(), 4), (scope("app/x/z"), 0)];
    store.commit(&lower)?;
    assert_eq!(
        store.read()?.floors()?,
        BTreeMap::from([(s.clone(), 10), (other.clone(), 3)]),
        "never lowered, no zero entry"
    );
    Ok(())
}

/// Retired marks and forgotten peers read back as never there; last-seen times only rise.
fn retired_marks_and_forgotten_peers_are_gone(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let other = scope("app/x/y");
    store.commit(&advances(&[
        (&s, None, hlc(5, 1)),
        (&s, None, hlc(6, 2)),
        (&other, None, hlc(7, 1)),
    ]))?;
    store.commit(&knowledge(7, ScopeFilter::All, marks(&[(&s, hlc(5, 1))])))?;
    store.commit(&knowledge(8, ScopeFilter::All, marks(&[(&s, hlc(6, 2))])))?;
    let mut seen = Batch::new(0, Durability::Deferred);
    seen.seen = vec![(id(7), 100), (id(8), 50)];
    store.commit(&seen)?;
    seen.seen = vec![(id(7), 90)];
    store.commit(&seen)?;
    assert_eq!(store.read()?.peer_seen(id(7))?, Some(100), "never lowered");
    // Knowledge recorded again keeps the time.
    store.commit(&knowledge(7, ScopeFilter::All, marks(&[(&s, hlc(6, 1))])))?;
    assert_eq!(store.read()?.peer_seen(id(7))?, Some(100));

    let mut batch = Batch::new(0, Durability::Deferred);
    batch.retire = vec![(s.clone(), id(1)), (other.clone(), id(1))];
    batch.forget = vec![id(8)];
    store.commit(&batch)?;
    let read = store.read()?;
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(6, 2))]));
    assert_eq!(read.peers()?, vec![id(7)]);
    assert_eq!(read.peer_watermarks(id(8))?, None);
    assert_eq!(read.peer_seen(id(8))?, None);
    assert_eq!(
        read.peer_watermarks(id(7))?,
        Some(marks(&[(&s, hlc(6, 1))]))
    );
    assert_eq!(
        read.scopes()?,
        vec![s.clone()],
        "a scope left with nothing is gone"
    );
    Ok(())
}

/// `audit_split` cuts a range's items into non-empty parts of nearly equal counts, at items
/// strictly inside the range, and every store cuts at the same places.
fn audit_split_cuts_into_non_empty_parts(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    let mut rows: Vec<(String, Version)> = (1..=10u64)
        .map(|t| (format!("k{t}"), put(t, 1, "v")))
        .collect();
    rows.extend((1..=3u64).map(|t| (format!("o{t}"), del(t, 2))));
    let rows: Vec<(&str, Version)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    store.commit(&upserts(&s, &rows))?;
    let read = store.read()?;
    let p = |time, origin| AuditPoint::from(hlc(time, origin));
    let all = AuditRange::ALL;
    assert_eq!(read.audit_split(&s, &all, 0)?, vec![]);
    assert_eq!(read.audit_split(&s, &all, 1)?, vec![]);
    assert_eq!(read.audit_split(&s, &all, 2)?, vec![p(7, 1)]);
    assert_eq!(
        read.audit_split(&s, &all, 4)?,
        vec![p(4, 1), p(7, 1), p(10, 1)],
        "13 items in 4: 3, 3, 3, 4"
    );
    let every = read.audit_split(&s, &all, 100)?;
    assert_eq!(
        every.len(),
        12,
        "one part per item: every item but the first starts one"
    );
    assert_eq!(every.first(), Some(&p(2, 1)));
    assert_eq!(every.last(), Some(&p(3, 2)));
    let middle = AuditRange {
        lo: Some(p(5, 1)),
        hi: Some(p(2, 2)),
    };
    assert_eq!(read.audit_split(&s, &middle, 3)?, vec![p(7, 1), p(9, 1)]);
    let single = AuditRange {
        lo: Some(p(10, 1)),
        hi: Some(p(0, 2)),
    };
    assert_eq!(
        read.audit_split(&s, &single, 4)?,
        vec![],
        "one item: one part"
    );
    let empty = AuditRange {
        lo: Some(p(3, 2)),
        hi: Some(p(1, 1)),
    };
    assert_eq!(read.audit_split(&s, &empty, 4)?, vec![]);
    assert_eq!(read.audit_split(&scope("app/x/none"), &all, 4)?, vec![]);
    for parts in [2, 3, 5, 13, 14] {
        let items = read.audit_items(&s, &all, 100)?;
        check_split(&items, parts, &read.audit_split(&s, &all, parts)?)?;
    }
    Ok(())
}

/// `version_at` finds the live version with an Hlc, and nothing for a superseded one.
fn version_at_finds_a_live_version_by_its_hlc(store: &dyn Store) -> TestResult {
    let s = Scope::shared();
    store.commit(&upserts(&s, &[("k", put(5, 1, "five")), ("j", del(6, 1))]))?;
    store.commit(&upserts(&s, &[("k", put(7, 2, "seven"))]))?;
    let read = store.read()?;
    assert_eq!(read.version_at(&s, hlc(5, 1))?, None, "superseded");
    assert_eq!(
        read.version_at(&s, hlc(7, 2))?,
        Some((key("k"), put(7, 2, "seven")))
    );
    assert_eq!(read.version_at(&s, hlc(6, 1))?, Some((key("j"), del(6, 1))));
    assert_eq!(read.version_at(&s, hlc(7, 1))?, None);
    assert_eq!(read.version_at(&scope("app/x/y"), hlc(7, 2))?, None);
    Ok(())
}

/// The fingerprint of `items`, folded one by one.
/// References are counted per scope and follow every stored version: upserts, a version
/// replaced by one pointing at another blob or at none, tombstones, losers (nothing), the
/// same blob in two scopes. A commit reports a hash as unreferenced exactly when its last
/// reference in any scope goes.
fn blob_references_are_counted_per_scope(store: &dyn Store) -> TestResult {
    // "shared" comes first in the redb file (shorter), "app/x/y" first in scope order.
    let (s, app) = (Scope::shared(), scope("app/x/y"));
    let (x, y, z) = (blob("x", 10), blob("y", 20), blob("z", 30));
    let mut batch = upserts(
        &s,
        &[
            ("a", put_blob(1, 1, x)),
            ("c", put_blob(3, 1, y)),
            ("d", put_blob(4, 1, x)),
        ],
    );
    batch
        .upserts
        .push((app.clone(), key("b"), put_blob(2, 1, x)));
    assert_eq!(store.commit(&batch)?.unreferenced, vec![]);
    assert_eq!(refs_of(store, &x.hash)?, (3, vec![app.clone(), s.clone()]));
    assert_eq!(refs_of(store, &y.hash)?, (1, vec![s.clone()]));
    assert_eq!(refs_of(store, &z.hash)?, (0, vec![]));
    assert_eq!(referenced(store)?, by_hash(vec![x, y]));

    // A version replaced by one pointing at another blob moves its reference.
    let done = store.commit(&upserts(&s, &[("a", put_blob(5, 1, y))]))?;
    assert_eq!(done.unreferenced, vec![]);
    assert_eq!(refs_of(store, &x.hash)?, (2, vec![app.clone(), s.clone()]));
    assert_eq!(refs_of(store, &y.hash)?, (2, vec![s.clone()]));

    // Replaced by a version without a blob: the last reference from `shared` goes, but
    // `app/x/y` still refers to x, so it is not unreferenced.
    let done = store.commit(&upserts(&s, &[("d", put(6, 1, "no file"))]))?;
    assert_eq!(done.unreferenced, vec![]);
    assert_eq!(refs_of(store, &x.hash)?, (1, vec![app.clone()]));

    // An upsert that loses last-write-wins counts nothing.
    let done = store.commit(&upserts(&app, &[("b", put_blob(1, 2, z))]))?;
    assert_eq!(done.applied, Vec::<usize>::new());
    assert_eq!(refs_of(store, &z.hash)?, (0, vec![]));
    assert_eq!(refs_of(store, &x.hash)?, (1, vec![app.clone()]));

    // A tombstone takes the last reference in any scope: now x is unreferenced.
    let done = store.commit(&upserts(&app, &[("b", del(7, 1))]))?;
    assert_eq!(done.unreferenced, vec![x.hash]);
    assert_eq!(refs_of(store, &x.hash)?, (0, vec![]));
    assert_eq!(referenced(store)?, vec![y]);

    // A newer version with the same blob keeps the count.
    let done = store.commit(&upserts(&s, &[("c", put_blob(8, 1, y))]))?;
    assert_eq!(done.unreferenced, vec![]);
    assert_eq!(refs_of(store, &y.hash)?, (2, vec![s.clone()]));

    // The same blob in another scope, then both of `shared`'s references go in one batch:
    // y is still referenced. Then the last one goes, durably (the redb snapshot reader).
    store.commit(&upserts(&app, &[("e", put_blob(9, 1, y))]))?;
    let done = store.commit(&upserts(&s, &[("a", del(10, 1)), ("c", del(11, 1))]))?;
    assert_eq!(done.unreferenced, vec![]);
    assert_eq!(refs_of(store, &y.hash)?, (1, vec![app.clone()]));
    let mut last = upserts(&app, &[("e", del(12, 1))]);
    last.durability = Durability::Immediate;
    assert_eq!(store.commit(&last)?.unreferenced, vec![y.hash]);
    assert_eq!(refs_of(store, &y.hash)?, (0, vec![]));
    assert_eq!(referenced(store)?, vec![]);
    Ok(())
}

/// Each scope keeps the size its last counted reference gave; the listing reports the
/// largest over the scopes (honest references agree, so this only settles forged ones).
fn blob_sizes_are_kept_per_scope(store: &dyn Store) -> TestResult {
    let (s, app) = (Scope::shared(), scope("app/x/y"));
    store.commit(&upserts(&s, &[("a", put_blob(1, 1, blob("x", 10)))]))?;
    assert_eq!(referenced(store)?, vec![blob("x", 10)]);
    store.commit(&upserts(&app, &[("b", put_blob(2, 1, blob("x", 11)))]))?;
    assert_eq!(referenced(store)?, vec![blob("x", 11)]);
    store.commit(&upserts(&s, &[("a", put_blob(3, 1, blob("x", 12)))]))?;
    assert_eq!(referenced(store)?, vec![blob("x", 12)]);
    store.commit(&upserts(&s, &[("a", del(4, 1))]))?;
    assert_eq!(referenced(store)?, vec![blob("x", 11)]);
    Ok(())
}

/// `referenced_blobs` lists each referenced blob once, in hash order, strictly after
/// `after` (referenced or not), at most `limit`: pages that start after the last hash of
/// the page before list every blob once. Through the redb group reader and its snapshot.
fn referenced_blobs_page_in_hash_order(store: &dyn Store) -> TestResult {
    let (s, app) = (Scope::shared(), scope("app/x/y"));
    let blobs: Vec<BlobRef> = (0..9u64).map(|i| blob(&format!("f{i}"), 100 + i)).collect();
    let mut batch = Batch::new(0, Durability::Deferred);
    for (i, b) in (1u64..).zip(&blobs) {
        batch
            .upserts
            .push((s.clone(), key(format!("s{i}")), put_blob(i, 1, *b)));
        // Every third blob in both scopes, and the first twice in `shared`.
        if i % 3 == 1 {
            batch
                .upserts
                .push((app.clone(), key(format!("a{i}")), put_blob(i, 2, *b)));
        }
    }
    batch
        .upserts
        .push((s.clone(), key("again"), put_blob(100, 1, blobs[0])));
    // A blob no stored version references any more.
    batch
        .upserts
        .push((s.clone(), key("gone"), put_blob(101, 1, blob("gone", 1))));
    batch.upserts.push((s.clone(), key("gone"), del(102, 1)));
    store.commit(&batch)?;
    let all = by_hash(blobs);
    for pass in ["gathered", "flushed"] {
        let read = store.read()?;
        assert_eq!(read.referenced_blobs(None, 100)?, all, "{pass}");
        assert_eq!(read.referenced_blobs(None, 0)?, vec![], "{pass}");
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = read.referenced_blobs(after.as_ref(), 2)?;
            assert!(page.len() <= 2, "{pass}: {page:?}");
            let Some(last) = page.last() else { break };
            after = Some(last.hash);
            paged.extend(page);
        }
        assert_eq!(paged, all, "{pass}: pages of 2");
        assert_eq!(
            read.referenced_blobs(Some(&all[3].hash), 3)?,
            all[4..7].to_vec(),
            "{pass}"
        );
        let unreferenced = Hash::of(b"not referenced");
        let want: Vec<BlobRef> = all
            .iter()
            .filter(|b| b.hash > unreferenced)
            .take(3)
            .copied()
            .collect();
        assert_eq!(
            read.referenced_blobs(Some(&unreferenced), 3)?,
            want,
            "{pass}"
        );
        let first = Hash::from_bytes([0; 32]);
        assert_eq!(read.referenced_blobs(Some(&first), 1)?, all[..1], "{pass}");
        let end = Hash::from_bytes([0xff; 32]);
        assert_eq!(read.referenced_blobs(Some(&end), 10)?, vec![], "{pass}");
        assert_eq!(
            read.referenced_blobs(Some(&all[8].hash), 10)?,
            vec![],
            "{pass}"
        );
        drop(read);
        store.flush()?;
    }
    Ok(())
}

fn fold(items: &[(Hlc, Key)]) -> Fingerprint {
    let mut f = Fingerprint::EMPTY;
    for (h, k) in items {
        f.add(item_hash(k, *h));
    }
    f
}

/// Checks `points` as `audit_split(range, parts)` of a range holding `items`: as many points
/// as parts allow, each an item's and strictly increasing, never the first item (so no part
/// is empty), and the parts' sizes at most one apart.
fn check_split(
    items: &[(Hlc, Key)],
    parts: usize,
    points: &[AuditPoint],
) -> Result<(), Box<dyn Error>> {
    let n = items.len();
    let expected = if parts <= 1 {
        0
    } else {
        parts.min(n).saturating_sub(1)
    };
    if points.len() != expected {
        return Err(format!("{} points for {parts} parts of {n} items", points.len()).into());
    }
    let mut at = Vec::new();
    for point in points {
        let i = items
            .iter()
            .position(|(h, _)| AuditPoint::from(*h) == *point)
            .ok_or_else(|| format!("{point:?} is not an item of the range"))?;
        at.push(i);
    }
    if n == 0 {
        return Ok(());
    }
    let mut bounds = vec![0];
    bounds.extend(&at);
    bounds.push(n);
    let share = n / (expected + 1).max(1);
    for w in bounds.windows(2) {
        if w[1] <= w[0] {
            return Err(format!("an empty part or points out of order: {at:?} of {n}").into());
        }
        if !(share..=share + 1).contains(&(w[1] - w[0])) {
            return Err(format!("part {w:?} is far from {share} ({at:?} of {n})").into());
        }
    }
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

/// On PostgreSQL too, a batch whose last step (raising the clock) fails after its upserts,
/// advances and peer knowledge were written inside the transaction applies nothing: a CHECK
/// constraint refuses a clock past 40, and only the clock reaches it.
#[cfg(feature = "postgres")]
#[test]
fn pg_failed_commit_applies_nothing() -> TestResult {
    let Some(schema) = common::pg::Schema::fresh("pg_failed_commit_applies_nothing")? else {
        return Ok(());
    };
    let store = schema.open()?;
    let s = Scope::shared();
    let mut seed = upserts(&s, &[("k", put(1, 1, "old"))]);
    seed.advances.push(Advance {
        scope: s.clone(),
        base: None,
        top: hlc(1, 1),
    });
    store.commit(&seed)?;
    // The clock is stored with its sign bit flipped: 40 is i64::MIN + 40.
    let mut client = schema.client()?;
    client.batch_execute(
        "ALTER TABLE highwater_meta ADD CONSTRAINT clock_below_40
         CHECK (name <> 'clock' OR num < -9223372036854775808 + 40)",
    )?;
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
    batch.seen = vec![(id(9), 30)];
    batch.clock = 50;
    assert!(
        store.commit(&batch).is_err(),
        "the commit must fail on the clock's constraint"
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
    assert_eq!(read.clock()?, 0);
    drop(read);

    // The same batch commits once the constraint is gone: only the failure stopped it.
    client.batch_execute("ALTER TABLE highwater_meta DROP CONSTRAINT clock_below_40")?;
    assert_eq!(store.commit(&batch)?, report(&[0, 1, 2], &[true]));
    assert_eq!(store.read()?.clock()?, 50);
    Ok(())
}

/// A call that finds no pooled connection free within the timeout fails with
/// `StoreError::Pool` (what a hub answers as 503) and leaves nothing half done; the same
/// call succeeds once a connection is free.
#[cfg(feature = "postgres")]
#[test]
fn pg_exhausted_pool_fails_the_call() -> TestResult {
    let Some(schema) = common::pg::Schema::fresh("pg_exhausted_pool_fails_the_call")? else {
        return Ok(());
    };
    let url = std::env::var(common::pg::URL_VAR)?;
    let store = highwater::store::PgStore::open_with(
        &url,
        &highwater::store::PgOptions {
            schema: Some(schema.name().to_owned()),
            pool_size: 1,
            connect_timeout: Duration::from_millis(300),
            ..highwater::store::PgOptions::default()
        },
    )?;
    let s = Scope::shared();
    let batch = upserts(&s, &[("k", put(1, 1, "v"))]);
    let reader = store.read()?;
    match store.commit(&batch) {
        Err(highwater::error::StoreError::Pool(_)) => {}
        other => return Err(format!("expected a pool error, got {other:?}").into()),
    }
    assert_eq!(reader.get(&s, &key("k"))?, None);
    drop(reader);
    assert_eq!(store.commit(&batch)?, report(&[0], &[]));
    assert_eq!(store.read()?.get(&s, &key("k"))?, Some(put(1, 1, "v")));
    Ok(())
}

/// Two handles on one schema (as two hub processes would have) committing at once lose no
/// update: every commit reads the reference count and the mark it writes under the store's
/// commit lock, so 4 threads x 10 commits, each adding a version that references one blob
/// and advancing the mark from the one it read, end with all 40 references and the mark of
/// the newest version.
#[cfg(feature = "postgres")]
#[test]
fn pg_commits_from_two_handles_lose_no_update() -> TestResult {
    let Some(schema) = common::pg::Schema::fresh("pg_commits_from_two_handles_lose_no_update")?
    else {
        return Ok(());
    };
    let handles = [schema.open()?, schema.open()?];
    let s = Scope::shared();
    let shared_blob = blob("shared", 10);
    std::thread::scope(|threads| {
        let mut running = Vec::new();
        for t in 0..4u64 {
            let (store, s, shared_blob) = (&handles[(t % 2) as usize], &s, &shared_blob);
            running.push(threads.spawn(move || -> Result<(), String> {
                for i in 0..10u64 {
                    let time = 1 + t * 10 + i;
                    let mut batch =
                        upserts(s, &[(&format!("k{time}"), put_blob(time, 1, *shared_blob))]);
                    // Unconditional: the mark only rises, whichever order commits land in.
                    batch.advances.push(Advance {
                        scope: s.clone(),
                        base: None,
                        top: hlc(time, 1),
                    });
                    store.commit(&batch).map_err(|e| e.to_string())?;
                }
                Ok(())
            }));
        }
        running
            .into_iter()
            .try_for_each(|r| r.join().map_err(|_| "a thread panicked".to_owned())?)
    })?;
    let read = handles[0].read()?;
    assert_eq!(read.blob_refs(&shared_blob.hash)?, 40);
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(40, 1))]));
    assert_eq!(scan(&handles[1], &s, "", None, 100)?.len(), 40);
    Ok(())
}

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
    // The audit chunks the group had moved are taken back with it.
    assert_eq!(
        read.fingerprint(&s, &AuditRange::ALL)?,
        fold(&[(hlc(1, 1), key("k"))])
    );
    drop(read);
    store.check_audit_chunks()?;

    store.commit(&deferred_with_mark(&s, "c", 5))?;
    let read = store.read()?;
    assert_eq!(read.get(&s, &key("c"))?, Some(put(5, 1, "c")));
    assert_eq!(read.watermarks()?, marks(&[(&s, hlc(5, 1))]));
    assert_eq!(
        read.fingerprint(&s, &AuditRange::ALL)?,
        fold(&[(hlc(1, 1), key("k")), (hlc(5, 1), key("c"))])
    );
    drop(read);
    store.check_audit_chunks()?;
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
        (&app, "f", put_blob(4, 1, blob("file", 5))),
    ];
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(BLOB_REFS_V1)?
                .insert(blob("file", 5).hash.as_bytes().as_slice(), 1)?;
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
    // Format 3's blob references per scope were built from the versions.
    assert_eq!(read.blob_refs(&blob("file", 5).hash)?, 1);
    assert_eq!(read.blob_scopes(&blob("file", 5).hash)?, vec![app.clone()]);
    assert_eq!(read.referenced_blobs(None, 10)?, vec![blob("file", 5)]);
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
    // Format 3's audit chunks were built by the migration and kept by the commit.
    store.check_audit_chunks()?;
    assert_eq!(
        store.read()?.fingerprint(&s, &AuditRange::ALL)?,
        fold(&[(hlc(7, 2), key("j")), (hlc(8, 2), key("k"))])
    );
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
/// The blobs the random puts point at; the last is never used.
const BLOBS: [&str; 4] = ["blob0", "blob1", "blob2", "unused"];

/// Blob `i` of [`BLOBS`], with its size, or (`odd`) a size that disagrees with it.
fn spec_blob(i: usize, odd: bool) -> BlobRef {
    blob(BLOBS[i], 100 * (i as u64 + 1) + u64::from(odd))
}

#[derive(Clone, Debug)]
struct UpsertSpec {
    scope: usize,
    key: usize,
    origin: u8,
    time: u64,
    delete: bool,
    /// A put's blob: which of [`BLOBS`], and whether with a size that disagrees.
    blob: Option<(usize, bool)>,
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

/// What a batch forgets: floors, removals, retired marks, forgotten and seen peers.
#[derive(Clone, Debug, Default)]
struct ForgetSpec {
    floors: Vec<(usize, u64)>,
    removals: Vec<(usize, usize, u8, u64)>,
    retire: Vec<(usize, u8)>,
    forget: Vec<u8>,
    seen: Vec<(u8, u64)>,
}

#[derive(Clone, Debug)]
struct BatchSpec {
    forget: ForgetSpec,
    upserts: Vec<UpsertSpec>,
    advances: Vec<AdvanceSpec>,
    peer: Option<PeerSpec>,
    clock: u64,
    immediate: bool,
}

fn batch_spec() -> impl Strategy<Value = BatchSpec> {
    let upsert = (
        0..3usize,
        0..KEYS.len(),
        1..=3u8,
        1..40u64,
        any::<bool>(),
        prop::option::of((0..3usize, prop::bool::weighted(0.1))),
    )
        .prop_map(|(scope, key, origin, time, delete, blob)| UpsertSpec {
            scope,
            key,
            origin,
            time,
            delete,
            blob,
        });
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
    let forget = (
        prop::collection::vec((0..3usize, 0..30u64), 0..2),
        prop::collection::vec((0..3usize, 0..KEYS.len(), 1..=3u8, 1..40u64), 0..3),
        prop::collection::vec((0..3usize, 1..=3u8), 0..2),
        prop::collection::vec(7..=8u8, 0..2),
        prop::collection::vec((7..=8u8, 0..100u64), 0..2),
    )
        .prop_map(|(floors, removals, retire, forget, seen)| ForgetSpec {
            floors,
            removals,
            retire,
            forget,
            seen,
        });
    let forget = prop_oneof![3 => Just(ForgetSpec::default()), 1 => forget];
    (
        forget,
        prop::collection::vec(upsert, 0..6),
        prop::collection::vec(advance, 0..4),
        prop::option::of(peer),
        0..100u64,
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(forget, upserts, advances, peer, clock, immediate)| BatchSpec {
                forget,
                upserts,
                advances,
                peer,
                clock,
                immediate,
            },
        )
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
    let f = &spec.forget;
    b.floors = f.floors.iter().map(|(sc, t)| (s(*sc), *t)).collect();
    b.removals = f
        .removals
        .iter()
        .map(|(sc, k, o, t)| (s(*sc), key(KEYS[*k]), hlc(*t, *o)))
        .collect();
    b.retire = f.retire.iter().map(|(sc, o)| (s(*sc), id(*o))).collect();
    b.forget = f.forget.iter().map(|p| id(*p)).collect();
    b.seen = f.seen.iter().map(|(p, t)| (id(*p), *t)).collect();
    for u in &spec.upserts {
        if *used.entry((u.scope, u.origin, u.time)).or_insert(u.key) != u.key {
            continue;
        }
        let v = match (u.delete, u.blob) {
            (true, _) => del(u.time, u.origin),
            (false, None) => put(u.time, u.origin, &format!("{}@{}", u.key, u.time)),
            (false, Some((i, odd))) => put_blob(u.time, u.origin, spec_blob(i, odd)),
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
    seen: Vec<Option<u64>>,
    floors: BTreeMap<Scope, u64>,
    clock: u64,
    scans: Vec<Vec<(Key, Version)>>,
    live: Vec<Vec<(Key, Version)>>,
    /// Per blob of [`BLOBS`]: the total count and the scopes.
    blob_refs: Vec<BlobRefs>,
    /// Every referenced blob, then the same in pages of one.
    referenced: Vec<BlobRef>,
    referenced_paged: Vec<BlobRef>,
}

/// A blob's total reference count and the scopes that reference it.
type BlobRefs = (u64, Vec<Scope>);

/// Checks the blob references against the stored versions they count: per hash and scope,
/// the number of stored versions of that scope pointing at the hash.
fn check_blob_refs(read: &dyn StoreRead) -> Result<Vec<BlobRefs>, Box<dyn Error>> {
    let mut truth: BTreeMap<Hash, BTreeMap<Scope, u64>> = BTreeMap::new();
    for name in SCOPES {
        let all = KeyRange {
            limit: 100,
            ..KeyRange::default()
        };
        for (_, v) in read.scan(&scope(name), &all)? {
            if let Some(b) = v.blob() {
                *truth
                    .entry(b.hash)
                    .or_default()
                    .entry(scope(name))
                    .or_default() += 1;
            }
        }
    }
    let mut out = Vec::new();
    for name in BLOBS {
        let hash = Hash::of(name.as_bytes());
        let scopes = truth.get(&hash).cloned().unwrap_or_default();
        let want = (
            scopes.values().sum::<u64>(),
            scopes.keys().cloned().collect::<Vec<_>>(),
        );
        let got = (read.blob_refs(&hash)?, read.blob_scopes(&hash)?);
        if got != want {
            return Err(format!("references to {name}: {got:?}, stored versions: {want:?}").into());
        }
        out.push(got);
    }
    let listed: Vec<Hash> = read
        .referenced_blobs(None, usize::MAX)?
        .iter()
        .map(|b| b.hash)
        .collect();
    if listed != truth.keys().copied().collect::<Vec<_>>() {
        return Err(format!("referenced blobs {listed:?}, stored versions {truth:?}").into());
    }
    Ok(out)
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
    let mut referenced_paged = Vec::new();
    loop {
        let after = referenced_paged.last().map(|b: &BlobRef| b.hash);
        let page = read.referenced_blobs(after.as_ref(), 1)?;
        if page.is_empty() {
            break;
        }
        referenced_paged.extend(page);
    }
    Ok(Observed {
        watermarks: read.watermarks()?,
        scopes: read.scopes()?,
        peers: read.peers()?,
        knowledge: vec![read.peer_watermarks(id(7))?, read.peer_watermarks(id(8))?],
        seen: vec![read.peer_seen(id(7))?, read.peer_seen(id(8))?],
        floors: read.floors()?,
        clock: read.clock()?,
        scans,
        live,
        blob_refs: check_blob_refs(&*read)?,
        referenced: read.referenced_blobs(None, usize::MAX)?,
        referenced_paged,
    })
}

fn equivalent(specs: &[BatchSpec]) -> Result<(), TestCaseError> {
    let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
    let dir = tempfile::tempdir().map_err(|e| fail(e.into()))?;
    let real = RedbStore::open(dir.path().join("store.redb")).map_err(|e| fail(e.into()))?;
    equivalent_on(&real, specs)
}

/// Commits `specs` to `real` and to the model, comparing every report and every read.
fn equivalent_on(real: &dyn Store, specs: &[BatchSpec]) -> Result<(), TestCaseError> {
    let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
    let model = MemStore::new();
    let mut used = BTreeMap::new();
    for spec in specs {
        let batch = build(spec, &mut used);
        let expected = model.commit(&batch).map_err(|e| fail(e.into()))?;
        let got = real.commit(&batch).map_err(|e| fail(e.into()))?;
        prop_assert_eq!(&got, &expected, "reports differ for {:?}", batch);
        prop_assert_eq!(observe(real).map_err(fail)?, observe(&model).map_err(fail)?);
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

#[cfg(feature = "postgres")]
proptest! {
    // Few cases: each makes a schema and commits over the network.
    #![proptest_config(ProptestConfig {
        cases: (common::cases(96) / 12).max(1),
        ..ProptestConfig::default()
    })]

    #[test]
    fn pg_store_matches_the_in_memory_model(specs in prop::collection::vec(batch_spec(), 1..8)) {
        let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
        if let Some(schema) = common::pg::Schema::fresh("pg_store_matches_the_in_memory_model")
            .map_err(fail)?
        {
            equivalent_on(&schema.open().map_err(fail)?, &specs)?;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The redb store's audit chunks

/// A chunk bound small enough that a few hundred versions split and merge chunks.
const SMALL_CHUNKS: usize = 4;

/// A store with small audit chunks, in a fresh directory.
fn small_chunks() -> Result<(RedbStore, tempfile::TempDir), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = RedbStore::open_with_chunk_items(dir.path().join("store.redb"), SMALL_CHUNKS)?;
    Ok((store, dir))
}

/// Checks the chunk invariant row by row and that no chunk exceeds the bound.
fn chunks_hold(store: &RedbStore, bound: usize) -> Result<u64, Box<dyn Error>> {
    let (chunks, largest) = store.check_audit_chunks()?;
    if largest > bound as u64 {
        return Err(format!("a chunk of {largest} versions, bound {bound}").into());
    }
    Ok(chunks)
}

/// Appended pages fill chunks to the bound; overwrites and deletes that empty old chunks
/// remove or merge them; random overwrites cut full chunks; fingerprints, items and splits
/// agree with the model all along.
#[test]
fn redb_audit_chunks_follow_appends_overwrites_and_removals() -> TestResult {
    let (real, _dir) = small_chunks()?;
    let model = MemStore::new();
    let s = Scope::shared();
    let both = |batch: &Batch| -> TestResult {
        assert_eq!(real.commit(batch)?, model.commit(batch)?);
        Ok(())
    };
    // 1 000 versions of origin 1 in pages of 100, in time order, as a sync delivers them.
    for page in 0..10u64 {
        let rows: Vec<(String, Version)> = (0..100u64)
            .map(|i| {
                let t = page * 100 + i + 1;
                (format!("k{t:04}"), put(t, 1, "v"))
            })
            .collect();
        let rows: Vec<(&str, Version)> =
            rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        both(&upserts(&s, &rows))?;
    }
    assert_eq!(
        chunks_hold(&real, SMALL_CHUNKS)?,
        250,
        "full chunks when appended"
    );
    same_audit(&real, &model, &s)?;

    // Origin 2 overwrites three keys in four, and deletes a run of 200: origin 1's chunks
    // shrink to one version each, empty ones go, and the small ones merge.
    let rows: Vec<(String, Version)> = (1..=1000u64)
        .filter(|t| t % 4 != 1 || (400..600).contains(t))
        .map(|t| {
            let v = if (400..600).contains(&t) {
                del(2000 + t, 2)
            } else {
                put(2000 + t, 2, "w")
            };
            (format!("k{t:04}"), v)
        })
        .collect();
    let rows: Vec<(&str, Version)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    for page in rows.chunks(150) {
        both(&upserts(&s, page))?;
        chunks_hold(&real, SMALL_CHUNKS)?;
    }
    let origin_1 = real.read()?.fingerprint(
        &s,
        &AuditRange {
            lo: None,
            hi: Some(AuditPoint::from(hlc(0, 2))),
        },
    )?;
    assert_eq!(
        origin_1.count, 200,
        "origin 1 keeps one key in four outside the run"
    );
    // Origin 2's 800 versions were appended: 200 full chunks. Origin 1's 200 survivors would
    // be 200 chunks of one without merges.
    let chunks = chunks_hold(&real, SMALL_CHUNKS)?;
    assert!(
        chunks <= 200 + 200 / 2,
        "{chunks} chunks: small chunks were not merged"
    );
    same_audit(&real, &model, &s)?;

    // Random overwrites in the middle of origin 2's range (not appends): chunks are cut.
    let rows: Vec<(String, Version)> = (0..300u64)
        .map(|i| {
            let t = (i * 7919) % 1000 + 1;
            (format!("k{t:04}"), put(3000 + (i * 31) % 300, 3, "x"))
        })
        .collect();
    let mut seen = BTreeSet::new();
    let rows: Vec<(&str, Version)> = rows
        .iter()
        .filter(|(_, v)| seen.insert(v.hlc))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    for page in rows.chunks(64) {
        both(&upserts(&s, page))?;
    }
    chunks_hold(&real, SMALL_CHUNKS)?;
    same_audit(&real, &model, &s)?;
    Ok(())
}

/// The audit reads of `real` and `model` agree on `s`: fingerprints and items of many
/// ranges, fingerprints equal to the fold of their items, and splits.
fn same_audit(real: &RedbStore, model: &MemStore, s: &Scope) -> TestResult {
    let (r, m) = (real.read()?, model.read()?);
    let all = m.audit_items(s, &AuditRange::ALL, usize::MAX)?;
    assert_eq!(r.audit_items(s, &AuditRange::ALL, usize::MAX)?, all);
    let mut bounds: Vec<Option<AuditPoint>> = vec![None];
    for (i, (h, _)) in all.iter().enumerate().step_by(37) {
        bounds.push(Some(AuditPoint::from(*h)));
        // Between items, and on another origin's edge.
        bounds.push(Some(AuditPoint {
            origin: h.origin(),
            time: h.time() + (i as u64 % 2),
        }));
    }
    for lo in &bounds {
        for hi in bounds.iter().step_by(3) {
            let range = AuditRange { lo: *lo, hi: *hi };
            let items = m.audit_items(s, &range, usize::MAX)?;
            assert_eq!(r.audit_items(s, &range, usize::MAX)?, items, "{range:?}");
            assert_eq!(r.fingerprint(s, &range)?, fold(&items), "{range:?}");
            assert_eq!(m.fingerprint(s, &range)?, fold(&items), "{range:?}");
        }
    }
    // live_count over the chunks: every origin's (after, upto] with bounds on and between
    // items, under caps that stop the count inside a chunk and between chunks.
    for origin in [1u8, 2, 3] {
        let times: Vec<u64> = all
            .iter()
            .filter(|(h, _)| h.origin() == id(origin))
            .map(|(h, _)| h.time())
            .collect();
        let mut edges: Vec<Option<u64>> = vec![None, Some(0)];
        edges.extend(
            times
                .iter()
                .step_by(29)
                .flat_map(|t| [Some(*t), Some(t + 1)]),
        );
        for after in &edges {
            for upto in edges.iter().flatten().chain([&u64::MAX]).step_by(2) {
                let (after_h, upto_h) = (after.map(|t| hlc(t, origin)), hlc(*upto, origin));
                let n = m
                    .live_range(s, id(origin), after_h, upto_h, usize::MAX)?
                    .len() as u64;
                for cap in [u64::MAX, 0, 1, 5, 63, 130] {
                    let got = r.live_count(s, id(origin), after_h, upto_h, cap)?;
                    assert_eq!(got, n.min(cap), "{origin} ({after:?}, {upto}] cap {cap}");
                    assert_eq!(m.live_count(s, id(origin), after_h, upto_h, cap)?, got);
                }
            }
        }
    }
    for parts in [2, 3, 16] {
        for range in [
            AuditRange::ALL,
            AuditRange {
                lo: bounds.get(3).copied().flatten(),
                hi: bounds.get(bounds.len() - 2).copied().flatten(),
            },
        ] {
            let items = m.audit_items(s, &range, usize::MAX)?;
            let got = r.audit_split(s, &range, parts)?;
            assert_eq!(got, m.audit_split(s, &range, parts)?, "{range:?} / {parts}");
            check_split(&items, parts, &got)?;
        }
    }
    Ok(())
}

const VERSIONS_V2: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("versions-v2");
const CHUNKS_V1: redb::TableDefinition<&[u8], &[u8]> =
    redb::TableDefinition::new("audit-chunks-v1");
/// Formats 1 and 2: `hash -> count` of the stored versions referencing the blob.
const BLOB_REFS_V1: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("blob-refs-v1");
/// Format 3: `hash | len u8 | scope -> count u64 BE | size u64 BE`.
const BLOB_REFS_V2: redb::TableDefinition<&[u8], &[u8]> =
    redb::TableDefinition::new("blob-refs-v2");

/// Writes `rows` into a new file in format 2 (docs/storage.md before format 3: the tables of
/// format 3 but the audit chunks, and `blob-refs-v1` counting versions per blob instead of
/// `blob-refs-v2`), row by row; `bad` makes one version row undecodable.
fn format_2_file(path: &Path, rows: &[(Scope, Key, Version)], bad: bool) -> TestResult {
    use redb::ReadableTable;
    let db = redb::Database::create(path)?;
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert("format", 2u32.to_be_bytes().as_slice())?;
        let mut versions = txn.open_table(VERSIONS_V2)?;
        let mut keys = txn.open_table(KEY_INDEX)?;
        let mut marks = txn.open_table(MARKS_V1)?;
        let mut blob_refs = txn.open_table(BLOB_REFS_V1)?;
        for (i, (s, k, v)) in rows.iter().enumerate() {
            if let Some(b) = v.blob() {
                let hash = b.hash.as_bytes().as_slice();
                let count = blob_refs.get(hash)?.map_or(0, |g| g.value());
                blob_refs.insert(hash, count + 1)?;
            }
            let mut position = v.hlc.origin().to_bytes().to_vec();
            position.extend_from_slice(&v.hlc.time().to_be_bytes());
            let mut vk = scope_bytes(s);
            vk.extend_from_slice(&position);
            let mut row = u16::try_from(k.as_bytes().len())?.to_be_bytes().to_vec();
            row.extend_from_slice(k.as_bytes());
            row.extend_from_slice(&postcard::to_allocvec(v)?);
            if bad && i == rows.len() / 2 {
                row.truncate(1);
            }
            versions.insert(vk.as_slice(), row.as_slice())?;
            let mut kk = scope_bytes(s);
            kk.extend_from_slice(k.as_bytes());
            keys.insert(kk.as_slice(), position.as_slice())?;
            let mut mk = scope_bytes(s);
            mk.extend_from_slice(&v.hlc.origin().to_bytes());
            let mark = marks.get(mk.as_slice())?.map_or(0, |g| g.value());
            marks.insert(mk.as_slice(), mark.max(v.hlc.time()))?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Whether the file at `path` holds the redb table `name`.
fn has_table(path: &Path, name: &str) -> Result<bool, Box<dyn Error>> {
    use redb::{ReadableDatabase, TableHandle};
    let db = redb::Database::create(path)?;
    let txn = db.begin_read()?;
    let found = txn.list_tables()?.any(|t| t.name() == name);
    Ok(found)
}

/// The blob references of `real` and `model` agree for `hashes`, and in the listing.
fn same_blob_refs(real: &dyn Store, model: &MemStore, hashes: &[Hash]) -> TestResult {
    let (r, m) = (real.read()?, model.read()?);
    for hash in hashes {
        assert_eq!(r.blob_refs(hash)?, m.blob_refs(hash)?, "{hash}");
        assert_eq!(r.blob_scopes(hash)?, m.blob_scopes(hash)?, "{hash}");
    }
    assert_eq!(
        r.referenced_blobs(None, usize::MAX)?,
        m.referenced_blobs(None, usize::MAX)?
    );
    Ok(())
}

fn raw_format(path: &Path) -> Result<u32, Box<dyn Error>> {
    use redb::ReadableDatabase;
    let db = redb::Database::create(path)?;
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let bytes = meta.get("format")?.ok_or("no format row")?.value().to_vec();
    Ok(u32::from_be_bytes(bytes.as_slice().try_into()?))
}

/// A format 2 file opens as format 3 with its audit chunks built from `versions-v2` (in runs
/// of the bound per origin) and its blob references counted per scope from `versions-v2`
/// into `blob-refs-v2` (`blob-refs-v1` dropped), reading as the model of the same versions
/// does; a migration that fails leaves the file in format 2, without chunks and with its
/// `blob-refs-v1`, to be migrated again.
#[test]
fn redb_format_2_file_is_migrated_to_format_3_on_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (s, app) = (Scope::shared(), scope("app/x/y"));
    // Blob `m{i}` has size 50 + i; m0 is only in `shared`, m3 only in `app/x/y`.
    let file = |i: u64| blob(&format!("m{i}"), 50 + i);
    let hashes: Vec<Hash> = (0..5).map(|i| file(i).hash).collect();
    // 2 scopes x 2 origins x 150 versions, one in five a tombstone, one in seven (of the
    // others) with a file.
    let mut rows = Vec::new();
    for (sc, shift) in [(&s, 0), (&app, 1)] {
        for origin in [1u8, 2] {
            for t in 1..=150u64 {
                let v = if t % 5 == 0 {
                    del(t, origin)
                } else if t % 7 == 0 {
                    put_blob(t, origin, file(t % 3 + shift))
                } else {
                    put(t, origin, "v")
                };
                rows.push((sc.clone(), key(format!("{origin}-{t}")), v));
            }
        }
    }
    let model = MemStore::new();
    let mut batch = Batch::new(0, Durability::Immediate);
    batch.upserts = rows.clone();
    model.commit(&batch)?;

    let broken = dir.path().join("broken.redb");
    format_2_file(&broken, &rows, true)?;
    assert!(matches!(
        RedbStore::open_with_chunk_items(&broken, 16),
        Err(highwater::error::StoreError::Corrupt { .. })
    ));
    assert_eq!(
        raw_format(&broken)?,
        2,
        "a failed migration leaves format 2"
    );
    {
        use redb::ReadableDatabase;
        let db = redb::Database::create(&broken)?;
        let txn = db.begin_read()?;
        assert!(txn.open_table(CHUNKS_V1).is_err(), "and no chunk table");
    }
    assert!(has_table(&broken, "blob-refs-v1")?, "and its blob-refs-v1");
    assert!(!has_table(&broken, "blob-refs-v2")?, "and no blob-refs-v2");

    let path = dir.path().join("store.redb");
    format_2_file(&path, &rows, false)?;
    let store = RedbStore::open_with_chunk_items(&path, 16)?;
    assert_eq!(
        chunks_hold(&store, 16)?,
        4 * 150u64.div_ceil(16),
        "runs of 16 per (scope, origin)"
    );
    for sc in [&s, &app] {
        let read = store.read()?;
        let items = model.read()?.audit_items(sc, &AuditRange::ALL, 1000)?;
        assert_eq!(read.audit_items(sc, &AuditRange::ALL, 1000)?, items);
        assert_eq!(read.fingerprint(sc, &AuditRange::ALL)?, fold(&items));
        assert_eq!(items.len(), 300);
    }
    same_blob_refs(&store, &model, &hashes)?;
    let read = store.read()?;
    assert_eq!(read.blob_scopes(&file(0).hash)?, vec![s.clone()]);
    assert_eq!(
        read.blob_scopes(&file(1).hash)?,
        vec![app.clone(), s.clone()]
    );
    assert_eq!(read.blob_scopes(&file(3).hash)?, vec![app.clone()]);
    assert_eq!(
        read.referenced_blobs(None, 10)?,
        by_hash((0..4).map(file).collect())
    );
    drop(read);
    // Writes after the migration keep the chunks.
    let overwrite = upserts(&s, &[("1-7", put(200, 2, "new")), ("2-8", del(201, 1))]);
    store.commit(&overwrite)?;
    model.commit(&overwrite)?;
    chunks_hold(&store, 16)?;
    same_audit(&store, &model, &s)?;
    same_blob_refs(&store, &model, &hashes)?;
    drop(store);
    assert_eq!(raw_format(&path)?, 3);
    assert!(
        !has_table(&path, "blob-refs-v1")?,
        "blob-refs-v1 is dropped"
    );
    {
        // The layout of docs/storage.md: `hash | 06 "shared" -> count BE | size BE`, where
        // the count is that of `shared`'s stored versions pointing at m0.
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let db = redb::Database::create(&path)?;
        let txn = db.begin_read()?;
        let table = txn.open_table(BLOB_REFS_V2)?;
        let mut row_key = file(0).hash.as_bytes().to_vec();
        row_key.extend_from_slice(b"\x06shared");
        let count = rows
            .iter()
            .filter(|(sc, _, v)| *sc == s && v.blob() == Some(&file(0)))
            .count() as u64;
        let mut value = count.to_be_bytes().to_vec();
        value.extend_from_slice(&50u64.to_be_bytes());
        assert_eq!(
            table.get(row_key.as_slice())?.map(|g| g.value().to_vec()),
            Some(value)
        );
        assert_eq!(table.len()?, 6, "m0 and m3 in one scope, m1 and m2 in two");
    }
    let store = RedbStore::open_with_chunk_items(&path, 16)?;
    same_audit(&store, &model, &s)?;
    same_blob_refs(&store, &model, &hashes)?;
    Ok(())
}

/// A chunk row that does not decode fails the commit that must update it, which then
/// applies nothing.
#[test]
fn redb_undecodable_audit_chunk_fails_the_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let s = Scope::shared();
    {
        let store = RedbStore::open(&path)?;
        store.commit(&upserts(&s, &[("k", put(1, 1, "k"))]))?;
    }
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        {
            let mut chunks = txn.open_table(CHUNKS_V1)?;
            let mut k = scope_bytes(&s);
            k.extend_from_slice(&id(1).to_bytes());
            k.extend_from_slice(&1u64.to_be_bytes());
            chunks.insert(k.as_slice(), [1u8; 5].as_slice())?;
        }
        txn.commit()?;
    }
    let store = RedbStore::open(&path)?;
    let failed = store.commit(&upserts(&s, &[("j", put(2, 1, "j"))]));
    assert!(
        matches!(failed, Err(highwater::error::StoreError::Corrupt { .. })),
        "{failed:?}"
    );
    assert_eq!(store.read()?.get(&s, &key("j"))?, None);
    Ok(())
}

// The redb store's audit reads against the model, under random histories.

const AUDIT_SCOPES: [&str; 2] = ["shared", "app/a/b"];
const AUDIT_KEYS: u64 = 300;

#[derive(Clone, Debug)]
enum AuditStep {
    /// Upserts at random: (scope, key, origin, time, tombstone).
    Random(Vec<(usize, u64, u8, u64, bool)>, bool),
    /// A page of one origin's new versions in time order, as a sync delivers them: keys
    /// `start, start + step, ...`, every `tombstones`-th a tombstone.
    Page {
        scope: usize,
        origin: u8,
        count: u64,
        start: u64,
        step: u64,
        tombstones: u64,
    },
    Flush,
}

fn audit_step() -> impl Strategy<Value = AuditStep> {
    let random = (
        prop::collection::vec(
            (
                0..2usize,
                0..AUDIT_KEYS,
                1..=3u8,
                1..1000u64,
                prop::bool::weighted(0.2),
            ),
            0..80,
        ),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(u, immediate)| AuditStep::Random(u, immediate));
    let page = (
        0..2usize,
        1..=3u8,
        1..200u64,
        0..AUDIT_KEYS,
        1..20u64,
        2..10u64,
    )
        .prop_map(
            |(scope, origin, count, start, step, tombstones)| AuditStep::Page {
                scope,
                origin,
                count,
                start,
                step,
                tombstones,
            },
        );
    prop_oneof![3 => random, 3 => page, 1 => Just(AuditStep::Flush)]
}

fn audit_range() -> impl Strategy<Value = AuditRange> {
    let point = prop::option::of((1..=3u8, 0..1400u64)).prop_map(|p| {
        p.map(|(origin, time)| AuditPoint {
            origin: id(origin),
            time,
        })
    });
    (point.clone(), point).prop_map(|(lo, hi)| AuditRange { lo, hi })
}

/// Builds a step's batch; `used` keeps each (scope, origin, time) to one key (Hlcs are
/// unique), `next` is each origin's next page time (above every random time).
fn audit_batch(
    step: &AuditStep,
    used: &mut BTreeMap<(usize, u8, u64), u64>,
    next: &mut BTreeMap<u8, u64>,
) -> Option<Batch> {
    let mut rows = Vec::new();
    let mut push = |sc: usize, k: u64, origin: u8, time: u64, tomb: bool| {
        if *used.entry((sc, origin, time)).or_insert(k) == k {
            let v = if tomb {
                del(time, origin)
            } else {
                put(time, origin, "v")
            };
            rows.push((scope(AUDIT_SCOPES[sc]), key(format!("key{k}")), v));
        }
    };
    let durability = match step {
        AuditStep::Random(upserts, immediate) => {
            for &(sc, k, origin, time, tomb) in upserts {
                push(sc, k, origin, time, tomb);
            }
            if *immediate {
                Durability::Immediate
            } else {
                Durability::Deferred
            }
        }
        AuditStep::Page {
            scope: sc,
            origin,
            count,
            start,
            step,
            tombstones,
        } => {
            let time = next.entry(*origin).or_insert(1000);
            for i in 0..*count {
                *time += 1;
                push(
                    *sc,
                    (start + i * step) % AUDIT_KEYS,
                    *origin,
                    *time,
                    i % tombstones == 0,
                );
            }
            Durability::Deferred
        }
        AuditStep::Flush => return None,
    };
    let mut batch = Batch::new(0, durability);
    batch.upserts = rows;
    Some(batch)
}

fn audit_equivalent(steps: &[AuditStep], ranges: &[AuditRange]) -> Result<(), TestCaseError> {
    let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
    let (real, _dir) = small_chunks().map_err(fail)?;
    audit_equivalent_on(&real, steps, ranges, &|| {
        chunks_hold(&real, SMALL_CHUNKS).map(|_| ())
    })
}

/// Runs `steps` on `real` and on the model, checking `real` with `check` and comparing the
/// audit reads of every range after each step.
fn audit_equivalent_on(
    real: &dyn Store,
    steps: &[AuditStep],
    ranges: &[AuditRange],
    check: &dyn Fn() -> TestResult,
) -> Result<(), TestCaseError> {
    let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
    let model = MemStore::new();
    let (mut used, mut next) = (BTreeMap::new(), BTreeMap::new());
    for step in steps {
        match audit_batch(step, &mut used, &mut next) {
            Some(batch) => {
                let expected = model.commit(&batch).map_err(|e| fail(e.into()))?;
                let got = real.commit(&batch).map_err(|e| fail(e.into()))?;
                prop_assert_eq!(got, expected);
            }
            None => real.flush().map_err(|e| fail(e.into()))?,
        }
        check().map_err(fail)?;
        let (r, m) = (
            real.read().map_err(|e| fail(e.into()))?,
            model.read().map_err(|e| fail(e.into()))?,
        );
        for name in AUDIT_SCOPES {
            let s = scope(name);
            for range in ranges.iter().chain([&AuditRange::ALL]) {
                let items = m
                    .audit_items(&s, range, usize::MAX)
                    .map_err(|e| fail(e.into()))?;
                prop_assert_eq!(
                    &r.audit_items(&s, range, usize::MAX)
                        .map_err(|e| fail(e.into()))?,
                    &items
                );
                prop_assert_eq!(
                    r.audit_items(&s, range, 3).map_err(|e| fail(e.into()))?,
                    items.iter().take(3).cloned().collect::<Vec<_>>()
                );
                let fp = r.fingerprint(&s, range).map_err(|e| fail(e.into()))?;
                prop_assert_eq!(fp, fold(&items), "{:?}", range);
                prop_assert_eq!(fp, m.fingerprint(&s, range).map_err(|e| fail(e.into()))?);
                for parts in [2, 5, 16, 1000] {
                    let got = r
                        .audit_split(&s, range, parts)
                        .map_err(|e| fail(e.into()))?;
                    check_split(&items, parts, &got).map_err(fail)?;
                    prop_assert_eq!(
                        got,
                        m.audit_split(&s, range, parts)
                            .map_err(|e| fail(e.into()))?
                    );
                }
            }
            for (h, k) in m
                .audit_items(&s, &AuditRange::ALL, usize::MAX)
                .map_err(|e| fail(e.into()))?
                .iter()
                .step_by(17)
            {
                let want = m.version_at(&s, *h).map_err(|e| fail(e.into()))?;
                prop_assert_eq!(want.as_ref().map(|(key, _)| key), Some(k));
                prop_assert_eq!(r.version_at(&s, *h).map_err(|e| fail(e.into()))?, want);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), ..ProptestConfig::default() })]

    /// Under random histories (appended pages, random upserts with overwrites and
    /// tombstones, several origins and scopes, deferred groups and flushes), the redb
    /// store's chunks stay exact and its audit reads are the model's.
    #[test]
    fn redb_audit_reads_match_the_in_memory_model(
        steps in prop::collection::vec(audit_step(), 1..12),
        ranges in prop::collection::vec(audit_range(), 6),
    ) {
        audit_equivalent(&steps, &ranges)?;
    }
}

#[cfg(feature = "postgres")]
proptest! {
    // Few cases: each makes a schema and commits row by row over the network.
    #![proptest_config(ProptestConfig {
        cases: (common::cases(48) / 12).max(1),
        ..ProptestConfig::default()
    })]

    /// The PostgreSQL store's audit reads (folds and cuts over its rows) are the model's
    /// under the same random histories.
    #[test]
    fn pg_audit_reads_match_the_in_memory_model(
        steps in prop::collection::vec(audit_step(), 1..12),
        ranges in prop::collection::vec(audit_range(), 6),
    ) {
        let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
        if let Some(schema) = common::pg::Schema::fresh("pg_audit_reads_match_the_in_memory_model")
            .map_err(fail)?
        {
            let real = schema.open().map_err(fail)?;
            audit_equivalent_on(&real, &steps, &ranges, &|| Ok(()))?;
        }
    }
}
