//! File sync: records that carry blobs, moved by the initiator of a round (upload before its
//! page, download before applying the responder's page).
//!
//! - Round trips in both directions (the push path and the fetch path) give back exactly the
//!   bytes written, Resident on both sides.
//! - A hash moves once however many records share it, and not at all when the destination
//!   already holds it.
//! - A blob that cannot be had (a failed or corrupted transfer, either direction) leaves its
//!   record Staged, stops its origin's watermark just below it while other origins advance,
//!   stores nothing unverified, does not keep the caller looping, and is retried until it
//!   lands; a node that crashes in that state keeps it and completes it after a reopen.
//! - Blobs that no record references any more are removed (superseded locally or by a peer,
//!   deleted, strays found by `collect_garbage`); referenced ones are kept.
//! - `residency_counts` agrees with the per-record residency.
//!
//! Most tests also check the invariant "a Resident record's blob is local and verifies".

mod common;

use std::collections::BTreeSet;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_executor::block_on;
use highwater::blob::write_blob;
use highwater::engine::BLOB_DIR;
use highwater::testing::FaultyTransport;
use highwater::{
    BlobRef, ExchangeOptions, ExchangeOutcome, Halt, HaltReason, Hash, Hlc, Key, ManualTime,
    NodeId, Residency, ResidencyCounts, Scope, SyncEngine, Transport,
};

use common::rounds::{config, link, mem_node, sync, Link, Node, TestResult};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn files_scope() -> Scope {
    Scope::app("files", "docs").expect("a valid scope")
}

fn clock() -> Arc<ManualTime> {
    ManualTime::at_secs(1_700_000_000)
}

/// `len` deterministic pseudo-random bytes (xorshift seeded by `seed`).
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn blob_of(bytes: &[u8]) -> BlobRef {
    BlobRef {
        hash: Hash::of(bytes),
        size: bytes.len() as u64,
    }
}

/// A source that hands out at most `step` bytes per read, and is interrupted once.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    interrupted: bool,
}

impl<'a> Trickle<'a> {
    fn new(data: &'a [u8], step: usize) -> Self {
        Trickle {
            data,
            step,
            interrupted: false,
        }
    }
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.interrupted {
            self.interrupted = true;
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A redb node in `dir` on the manual clock `time` (blobs in `dir/blobs`).
fn redb_node(dir: &Path, time: &Arc<ManualTime>) -> highwater::Result<Node> {
    Ok(Arc::new(SyncEngine::open_with(dir, config(time))?))
}

/// The bytes of the file under `key`, if it is readable on `node`.
fn read_back(node: &SyncEngine, scope: &Scope, key: &Key) -> TestResult<Option<Vec<u8>>> {
    let Some((blob, mut reader)) = node.open_file(scope, key)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    assert_eq!(
        blob_of(&bytes),
        blob,
        "open_file's bytes must match its reference"
    );
    Ok(Some(bytes))
}

/// The Hlc of the stored version under `key`.
fn hlc_of(node: &SyncEngine, scope: &Scope, key: &Key) -> TestResult<Hlc> {
    Ok(node
        .get_version(scope, key)?
        .ok_or_else(|| format!("no version of {key:?}"))?
        .hlc)
}

/// `W[origin]` of `node` in `scope`.
fn mark(node: &SyncEngine, scope: &Scope, origin: NodeId) -> TestResult<Option<Hlc>> {
    Ok(node.watermarks()?.get(scope, origin))
}

/// The invariant: a Resident record's blob is local, and its bytes hash to the record's
/// reference; a Staged record's blob is not local.
fn check_residency_invariant(node: &SyncEngine) -> TestResult {
    for scope in node.scopes()? {
        for (key, version) in node.versions(&scope)? {
            let residency = node.residency(&scope, &key)?;
            let Some(blob) = version.blob().copied() else {
                continue;
            };
            match residency {
                Residency::Resident => {
                    let (size, mut reader) = node
                        .blob_store()
                        .open(&blob.hash)?
                        .ok_or_else(|| format!("{key:?} is Resident without its blob"))?;
                    let mut bytes = Vec::new();
                    reader.read_to_end(&mut bytes)?;
                    assert_eq!(size, blob.size, "{key:?}: stored size");
                    assert_eq!(blob_of(&bytes), blob, "{key:?}: stored bytes");
                }
                Residency::Staged => {
                    assert!(
                        !node.blob_store().contains(&blob.hash)?,
                        "{key:?}: Staged with its blob local"
                    );
                }
                other => {
                    return Err(format!("{key:?}: a Put with a blob reads as {other:?}").into())
                }
            }
        }
    }
    Ok(())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(files_under(&entry.path())?);
        } else {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Whether a file named by `hash` exists anywhere under the node directory's blob store.
fn blob_file_exists(node_dir: &Path, hash: &Hash) -> io::Result<bool> {
    let name = hash.to_string();
    Ok(files_under(&node_dir.join(BLOB_DIR))?
        .iter()
        .any(|p| p.file_name().is_some_and(|n| n == name.as_str())))
}

/// The files left in the blob store's temporary directory.
fn tmp_files(node_dir: &Path) -> io::Result<Vec<PathBuf>> {
    files_under(&node_dir.join(BLOB_DIR).join("tmp"))
}

fn blob_halt(scope: &Scope, origin: NodeId, hash: Hash) -> Halt {
    Halt {
        scope: scope.clone(),
        origin,
        reason: HaltReason::BlobUnavailable { hash },
    }
}

// ---------------------------------------------------------------------------------------
// A transport that fails or corrupts chosen blobs
// ---------------------------------------------------------------------------------------

/// The in-process link to `peer`, wrapped to fail or corrupt chosen blobs
/// ([`FaultyTransport`]).
type Faulty = FaultyTransport<Link>;

fn faulty(peer: &Node) -> Faulty {
    FaultyTransport::new(link(peer))
}

/// Runs rounds from `from` over `to` while `has_more` (at most 16).
fn sync_over(from: &SyncEngine, to: &impl Transport) -> TestResult<Vec<ExchangeOutcome>> {
    let mut outcomes = Vec::new();
    for _ in 0..16 {
        let outcome = block_on(from.exchange(to))?;
        let more = outcome.has_more;
        outcomes.push(outcome);
        if !more {
            return Ok(outcomes);
        }
    }
    Err(format!("still has_more after 16 rounds: {outcomes:?}").into())
}

// ---------------------------------------------------------------------------------------
// The hub scenario: origins A and B write into hub H, C pulls from H
// ---------------------------------------------------------------------------------------

/// Origins A and B, hub H holding everything of both (Resident), and the files written.
struct Hub {
    time: Arc<ManualTime>,
    a: Node,
    b: Node,
    h: Node,
    scope: Scope,
    /// A's records, in write order: a1 (file), a2 (file X), a3 (file), a4 (no file).
    a_keys: Vec<Key>,
    b_keys: Vec<Key>,
    /// Content per key.
    contents: Vec<(Key, Vec<u8>)>,
}

impl Hub {
    fn new() -> TestResult<Hub> {
        let time = clock();
        let (a, b, h) = (mem_node(&time)?, mem_node(&time)?, mem_node(&time)?);
        let scope = files_scope();
        let mut contents = Vec::new();
        for (i, name) in ["a1", "a2", "a3"].into_iter().enumerate() {
            let bytes = content(10 + i as u64, 3000 + i);
            a.put_file(&scope, &key(name), name, &mut Trickle::new(&bytes, 1000))?;
            contents.push((key(name), bytes));
        }
        a.put(&scope, &key("a4"), b"no file".to_vec())?;
        for (i, name) in ["b1", "b2"].into_iter().enumerate() {
            let bytes = content(20 + i as u64, 2000 + i);
            b.put_file_bytes(&scope, &key(name), name, &bytes)?;
            contents.push((key(name), bytes));
        }
        sync(&a, &link(&h))?;
        sync(&b, &link(&h))?;
        let hub = Hub {
            time,
            a,
            b,
            h,
            scope,
            a_keys: ["a1", "a2", "a3", "a4"].map(key).to_vec(),
            b_keys: ["b1", "b2"].map(key).to_vec(),
            contents,
        };
        for k in hub.a_keys.iter().chain(&hub.b_keys) {
            assert_eq!(
                hub.h.residency(&hub.scope, k)?,
                Residency::Resident,
                "{k:?} on the hub"
            );
        }
        for (k, bytes) in &hub.contents {
            assert_eq!(
                read_back(&hub.h, &hub.scope, k)?.as_ref(),
                Some(bytes),
                "{k:?} on the hub"
            );
        }
        Ok(hub)
    }

    /// The blob X (a2's file) whose transfer the tests break.
    fn x(&self) -> Hash {
        Hash::of(&self.contents[1].1)
    }

    fn residency(&self, node: &SyncEngine) -> TestResult<Vec<(Key, Residency)>> {
        self.a_keys
            .iter()
            .chain(&self.b_keys)
            .map(|k| Ok((k.clone(), node.residency(&self.scope, k)?)))
            .collect()
    }

    /// Residency expected on a node that holds everything but a2's blob.
    fn all_but_x(&self) -> Vec<(Key, Residency)> {
        self.a_keys
            .iter()
            .chain(&self.b_keys)
            .map(|k| {
                let r = if k.as_bytes() == b"a2" {
                    Residency::Staged
                } else {
                    Residency::Resident
                };
                (k.clone(), r)
            })
            .collect()
    }

    fn all_resident(&self) -> Vec<(Key, Residency)> {
        self.a_keys
            .iter()
            .chain(&self.b_keys)
            .map(|k| (k.clone(), Residency::Resident))
            .collect()
    }

    /// Checks C after a round in which a2's blob did not arrive: a2 Staged, the rest
    /// Resident; W[A] at a1 (just below a2), W[B] at the hub's; one halt naming X; no
    /// `has_more`.
    fn assert_halted_on_x(&self, c: &SyncEngine, out: &ExchangeOutcome) -> TestResult {
        let (a, b) = (self.a.node_id(), self.b.node_id());
        assert_eq!(self.residency(c)?, self.all_but_x());
        let x_hlc = hlc_of(&self.h, &self.scope, &key("a2"))?;
        let w_a = mark(c, &self.scope, a)?;
        assert!(
            w_a < Some(x_hlc),
            "W[A] {w_a:?} must stay below X's Hlc {x_hlc:?}"
        );
        assert_eq!(
            w_a,
            Some(hlc_of(&self.h, &self.scope, &key("a1"))?),
            "W[A] stops at the version before X"
        );
        assert_eq!(
            mark(c, &self.scope, b)?,
            mark(&self.h, &self.scope, b)?,
            "B advances in the same round"
        );
        assert!(mark(c, &self.scope, b)?.is_some());
        assert_eq!(out.halts, vec![blob_halt(&self.scope, a, self.x())]);
        assert!(out.peer_halts.is_empty(), "{out:?}");
        assert!(
            !out.has_more,
            "a halted blob must not keep the caller looping: {out:?}"
        );
        assert!(!c.blob_store().contains(&self.x())?);
        assert_eq!(
            read_back(c, &self.scope, &key("a2"))?,
            None,
            "a Staged file is not readable"
        );
        check_residency_invariant(c)
    }

    /// Checks that C converged with the hub: every record Resident with the right bytes,
    /// watermarks and digests equal.
    fn assert_converged(&self, c: &SyncEngine) -> TestResult {
        assert_eq!(self.residency(c)?, self.all_resident());
        for (k, bytes) in &self.contents {
            assert_eq!(read_back(c, &self.scope, k)?.as_ref(), Some(bytes), "{k:?}");
        }
        for origin in [self.a.node_id(), self.b.node_id()] {
            assert_eq!(
                mark(c, &self.scope, origin)?,
                mark(&self.h, &self.scope, origin)?
            );
        }
        assert_eq!(c.digest()?, self.h.digest()?);
        check_residency_invariant(c)
    }
}

// ---------------------------------------------------------------------------------------
// 1. Round trips
// ---------------------------------------------------------------------------------------

/// A file written in small pieces on a redb node, sized over two copy chunks.
fn write_big_file(a: &SyncEngine, scope: &Scope) -> TestResult<Vec<u8>> {
    let bytes = content(1, 2 * highwater::blob::CHUNK + 12_345);
    a.put_file(scope, &key("big"), "meta", &mut Trickle::new(&bytes, 4099))?;
    Ok(bytes)
}

fn assert_round_trip(a: &SyncEngine, b: &SyncEngine, scope: &Scope, bytes: &[u8]) -> TestResult {
    let k = key("big");
    assert_eq!(read_back(b, scope, &k)?.as_deref(), Some(bytes));
    assert_eq!(read_back(a, scope, &k)?.as_deref(), Some(bytes));
    assert_eq!(b.get(scope, &k)?.map(|r| r.value), Some(b"meta".to_vec()));
    assert_eq!(b.get(scope, &k)?.and_then(|r| r.blob), Some(blob_of(bytes)));
    assert_eq!(a.residency(scope, &k)?, Residency::Resident);
    assert_eq!(b.residency(scope, &k)?, Residency::Resident);
    assert_eq!(a.digest()?, b.digest()?);
    assert_eq!(a.watermarks()?, b.watermarks()?);
    check_residency_invariant(a)?;
    check_residency_invariant(b)
}

#[test]
fn round_trip_fetch_path_responder_holds_the_file() -> TestResult {
    let time = clock();
    let dir = tempfile::tempdir()?;
    let a = redb_node(dir.path(), &time)?;
    let b = mem_node(&time)?;
    let scope = files_scope();
    let bytes = write_big_file(&a, &scope)?;
    assert!(
        blob_file_exists(dir.path(), &Hash::of(&bytes))?,
        "put_file stores the blob on disk"
    );

    // B initiates: it fetches A's blob after receiving A's page.
    let to_a = link(&a);
    let outcomes = sync_over(&b, &to_a)?;
    assert_round_trip(&a, &b, &scope, &bytes)?;
    let stats = to_a.stats();
    assert_eq!((stats.blob_fetches, stats.blob_pushes), (1, 0));
    assert_eq!(stats.blob_bytes, bytes.len() as u64);
    assert_eq!(outcomes.iter().map(|o| o.blobs_fetched).sum::<usize>(), 1);
    assert!(outcomes
        .iter()
        .all(|o| o.halts.is_empty() && o.peer_halts.is_empty()));
    Ok(())
}

#[test]
fn round_trip_push_path_initiator_holds_the_file() -> TestResult {
    let time = clock();
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = redb_node(dir_a.path(), &time)?;
    let b = redb_node(dir_b.path(), &time)?;
    let scope = files_scope();
    let bytes = write_big_file(&a, &scope)?;

    // A initiates: it uploads its blob before shipping the page that references it.
    let to_b = link(&b);
    let outcomes = sync_over(&a, &to_b)?;
    assert_round_trip(&a, &b, &scope, &bytes)?;
    let stats = to_b.stats();
    assert_eq!((stats.blob_fetches, stats.blob_pushes), (0, 1));
    assert_eq!(stats.blob_bytes, bytes.len() as u64);
    assert_eq!(outcomes.iter().map(|o| o.blobs_pushed).sum::<usize>(), 1);
    assert!(
        blob_file_exists(dir_b.path(), &Hash::of(&bytes))?,
        "the upload is stored on B's disk"
    );
    assert!(tmp_files(dir_b.path())?.is_empty());
    Ok(())
}

#[test]
fn empty_file_round_trip() -> TestResult {
    let time = clock();
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = redb_node(dir_a.path(), &time)?;
    let b = redb_node(dir_b.path(), &time)?;
    let scope = files_scope();
    a.put_file(&scope, &key("empty"), "", &mut io::empty())?;
    let to_a = link(&a);
    sync(&b, &to_a)?;
    assert_eq!(b.residency(&scope, &key("empty"))?, Residency::Resident);
    assert_eq!(read_back(&b, &scope, &key("empty"))?, Some(Vec::new()));
    assert_eq!(to_a.stats().blob_fetches, 1);
    assert!(blob_file_exists(dir_b.path(), &Hash::of(b""))?);
    assert_eq!(a.digest()?, b.digest()?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. Dedupe and short-circuit
// ---------------------------------------------------------------------------------------

/// Syncs A and B with A initiating (A pushes to B) if `push`, else B initiating (B fetches
/// from A); returns the stats of the link used.
fn sync_one_way(a: &Node, b: &Node, push: bool) -> TestResult<highwater::transport::WireStats> {
    let (initiator, responder) = if push { (a, b) } else { (b, a) };
    let to_responder = link(responder);
    sync(initiator, &to_responder)?;
    Ok(to_responder.stats())
}

#[test]
fn shared_content_moves_once_each_way() -> TestResult {
    let time = clock();
    let scope = files_scope();
    let bytes = content(2, 5000);
    for push in [false, true] {
        let (a, b) = (mem_node(&time)?, mem_node(&time)?);
        a.put_file_bytes(&scope, &key("one"), "1", &bytes)?;
        a.put_file_bytes(&scope, &key("two"), "2", &bytes)?;
        let stats = sync_one_way(&a, &b, push)?;
        let moved = if push {
            stats.blob_pushes
        } else {
            stats.blob_fetches
        };
        assert_eq!(moved, 1, "push={push}: {stats:?}");
        assert_eq!(
            stats.blob_pushes + stats.blob_fetches,
            1,
            "push={push}: {stats:?}"
        );
        assert_eq!(stats.blob_bytes, bytes.len() as u64, "push={push}");
        for k in ["one", "two"] {
            assert_eq!(b.residency(&scope, &key(k))?, Residency::Resident);
            assert_eq!(read_back(&b, &scope, &key(k))?, Some(bytes.clone()));
        }
        assert_eq!(a.digest()?, b.digest()?);
        check_residency_invariant(&b)?;
    }
    Ok(())
}

#[test]
fn content_the_destination_holds_is_not_moved() -> TestResult {
    let time = clock();
    let scope = files_scope();
    let bytes = content(3, 5000);
    for push in [false, true] {
        let (a, b) = (mem_node(&time)?, mem_node(&time)?);
        a.put_file_bytes(&scope, &key("from-a"), "a", &bytes)?;
        // B wrote the same content itself, under another key.
        b.put_file_bytes(&scope, &key("from-b"), "b", &bytes)?;
        let stats = sync_one_way(&a, &b, push)?;
        assert_eq!(
            (stats.blob_pushes, stats.blob_fetches, stats.blob_bytes),
            (0, 0, 0),
            "push={push}"
        );
        if push {
            assert!(
                stats.blob_queries >= 1,
                "the initiator asks before it uploads"
            );
        }
        for node in [&a, &b] {
            for k in ["from-a", "from-b"] {
                assert_eq!(node.residency(&scope, &key(k))?, Residency::Resident);
                assert_eq!(read_back(node, &scope, &key(k))?, Some(bytes.clone()));
            }
            check_residency_invariant(node)?;
        }
        assert_eq!(a.digest()?, b.digest()?);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. A failed transfer
// ---------------------------------------------------------------------------------------

#[test]
fn failed_fetch_stages_the_record_and_holds_back_only_its_origin() -> TestResult {
    let hub = Hub::new()?;
    let c = mem_node(&hub.time)?;
    let to_h = faulty(&hub.h);
    to_h.fail(hub.x());

    let out = block_on(c.exchange(&to_h))?;
    hub.assert_halted_on_x(&c, &out)?;
    assert_eq!(out.blobs_fetched, 4, "every other blob arrived");
    assert_eq!(to_h.injected(), 1);

    // Still failing: the transfer is retried, nothing changes, and the caller is not kept
    // looping.
    let marks = c.watermarks()?;
    let out = block_on(c.exchange(&to_h))?;
    hub.assert_halted_on_x(&c, &out)?;
    assert_eq!(out.blobs_fetched, 0);
    assert_eq!(to_h.injected(), 2, "the next round retries the transfer");
    assert_eq!(c.watermarks()?, marks);

    // Healed: the next rounds converge.
    to_h.heal();
    let outcomes = sync_over(&c, &to_h)?;
    assert_eq!(outcomes.iter().map(|o| o.blobs_fetched).sum::<usize>(), 1);
    assert!(outcomes.iter().all(|o| o.halts.is_empty()), "{outcomes:?}");
    hub.assert_converged(&c)?;
    assert_eq!(
        to_h.inner().stats().blob_fetches,
        5,
        "each blob fetched once"
    );

    // Later writes by A: the first one's blob fails. W[A] stays where it was (X is the
    // run's first version), the later file lands, and healing completes it.
    let scope = &hub.scope;
    let (late1, late2) = (content(30, 1500), content(31, 1600));
    hub.a.put_file_bytes(scope, &key("a5"), "a5", &late1)?;
    hub.a.put_file_bytes(scope, &key("a6"), "a6", &late2)?;
    sync(&hub.a, &link(&hub.h))?;
    let before = mark(&c, scope, hub.a.node_id())?;
    to_h.fail(Hash::of(&late1));
    let out = block_on(c.exchange(&to_h))?;
    assert_eq!(c.residency(scope, &key("a5"))?, Residency::Staged);
    assert_eq!(c.residency(scope, &key("a6"))?, Residency::Resident);
    assert_eq!(
        mark(&c, scope, hub.a.node_id())?,
        before,
        "W[A] stays where it was"
    );
    assert_eq!(
        out.halts,
        vec![blob_halt(scope, hub.a.node_id(), Hash::of(&late1))]
    );
    assert!(!out.has_more);
    check_residency_invariant(&c)?;
    to_h.heal();
    sync_over(&c, &to_h)?;
    assert_eq!(c.residency(scope, &key("a5"))?, Residency::Resident);
    assert_eq!(read_back(&c, scope, &key("a5"))?, Some(late1));
    assert_eq!(
        mark(&c, scope, hub.a.node_id())?,
        mark(&hub.h, scope, hub.a.node_id())?
    );
    assert_eq!(c.digest()?, hub.h.digest()?);
    check_residency_invariant(&c)
}

#[test]
fn failing_blob_in_small_pages_neither_loops_nor_starves_other_origins() -> TestResult {
    let hub = Hub::new()?;
    let c = mem_node(&hub.time)?;
    let to_h = faulty(&hub.h);
    to_h.fail(hub.x());
    let small = ExchangeOptions {
        page_limit: Some(2),
        ..ExchangeOptions::default()
    };
    let mut rounds = 0;
    loop {
        let out = block_on(c.exchange_with(&to_h, &small))?;
        rounds += 1;
        check_residency_invariant(&c)?;
        let w_a = mark(&c, &hub.scope, hub.a.node_id())?;
        assert!(
            w_a < Some(hlc_of(&hub.h, &hub.scope, &key("a2"))?),
            "round {rounds}: W[A] {w_a:?}"
        );
        if !out.has_more {
            break;
        }
        assert!(rounds < 10, "has_more never cleared: {out:?}");
    }
    // Everything but X arrived, B fully, and A's mark waits just below X.
    assert_eq!(
        mark(&c, &hub.scope, hub.b.node_id())?,
        mark(&hub.h, &hub.scope, hub.b.node_id())?
    );
    assert_eq!(c.residency(&hub.scope, &key("a2"))?, Residency::Staged);
    assert_eq!(c.residency(&hub.scope, &key("b1"))?, Residency::Resident);
    assert_eq!(c.residency(&hub.scope, &key("b2"))?, Residency::Resident);
    assert_eq!(
        mark(&c, &hub.scope, hub.a.node_id())?,
        Some(hlc_of(&hub.h, &hub.scope, &key("a1"))?)
    );

    to_h.heal();
    let mut rounds = 0;
    while block_on(c.exchange_with(&to_h, &small))?.has_more {
        rounds += 1;
        assert!(rounds < 10, "has_more never cleared after healing");
    }
    hub.assert_converged(&c)
}

// ---------------------------------------------------------------------------------------
// 4. A corrupted transfer
// ---------------------------------------------------------------------------------------

#[test]
fn corrupted_fetch_is_rejected_and_never_stored() -> TestResult {
    corrupted_fetch_check()
}

/// The same inside a tokio runtime's context, where a fetched blob is finished (verified,
/// fsynced, renamed) on tokio's blocking threads instead of inline.
#[test]
fn corrupted_fetch_is_rejected_when_finished_on_blocking_threads() -> TestResult {
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let _context = runtime.enter();
    corrupted_fetch_check()
}

fn corrupted_fetch_check() -> TestResult {
    let hub = Hub::new()?;
    let dir = tempfile::tempdir()?;
    let c = redb_node(dir.path(), &hub.time)?;
    let to_h = faulty(&hub.h);
    to_h.corrupt(hub.x());

    for round in 0..2 {
        let out = block_on(c.exchange(&to_h))?;
        hub.assert_halted_on_x(&c, &out)?;
        assert_eq!(
            to_h.injected(),
            round + 1,
            "the corrupted transfer is retried each round"
        );
        assert!(!c.blob_store().contains(&hub.x())?, "round {round}");
        assert!(
            !blob_file_exists(dir.path(), &hub.x())?,
            "round {round}: no file for X"
        );
        assert!(
            tmp_files(dir.path())?.is_empty(),
            "round {round}: nothing left in tmp"
        );
        // Nothing else either: not the corrupted bytes under their own hash.
        let stored: BTreeSet<Hash> = c.blob_store().list()?.into_iter().map(|(h, _)| h).collect();
        let others: BTreeSet<Hash> = hub.contents.iter().map(|(_, b)| Hash::of(b)).collect();
        let others = &others - &BTreeSet::from([hub.x()]);
        assert_eq!(
            stored, others,
            "round {round}: only verified blobs are stored"
        );
        assert_eq!(files_under(&dir.path().join(BLOB_DIR))?.len(), others.len());
    }

    to_h.heal();
    sync_over(&c, &to_h)?;
    hub.assert_converged(&c)?;
    assert!(blob_file_exists(dir.path(), &hub.x())?);
    assert!(tmp_files(dir.path())?.is_empty());
    Ok(())
}

#[test]
fn corrupted_push_is_rejected_by_the_responder() -> TestResult {
    let time = clock();
    let dir = tempfile::tempdir()?;
    let h = redb_node(dir.path(), &time)?;
    let c = mem_node(&time)?;
    let scope = files_scope();
    let bytes = content(40, 4000);
    c.put(&scope, &key("c0"), b"plain".to_vec())?;
    c.put_file_bytes(&scope, &key("c1"), "c1", &bytes)?;
    let hash = Hash::of(&bytes);
    let to_h = faulty(&h);
    to_h.corrupt(hash);

    // First contact: C ships nothing until it knows H's marks.
    let out = block_on(c.exchange(&to_h))?;
    assert_eq!(out.shipped, 0);
    assert!(out.has_more, "H lacks C's records");

    let out = block_on(c.exchange(&to_h))?;
    assert_eq!(out.shipped, 2);
    assert_eq!(out.blobs_pushed, 0, "the corrupted upload was refused");
    assert_eq!(to_h.inner().stats().blob_pushes, 1);
    assert_eq!(to_h.injected(), 1);
    assert!(!h.blob_store().contains(&hash)?);
    assert_eq!(
        h.blob_store().list()?,
        vec![],
        "not the corrupted bytes either"
    );
    assert!(files_under(&dir.path().join(BLOB_DIR))?.is_empty());
    assert!(!blob_file_exists(dir.path(), &hash)?);
    assert!(tmp_files(dir.path())?.is_empty());
    assert_eq!(h.residency(&scope, &key("c0"))?, Residency::Resident);
    assert_eq!(h.residency(&scope, &key("c1"))?, Residency::Staged);
    let w_c = mark(&h, &scope, c.node_id())?;
    assert!(w_c < Some(hlc_of(&c, &scope, &key("c1"))?));
    assert_eq!(
        w_c,
        Some(hlc_of(&c, &scope, &key("c0"))?),
        "H's W[C] stops just below c1"
    );
    assert_eq!(out.peer_halts, vec![blob_halt(&scope, c.node_id(), hash)]);
    assert!(out.halts.is_empty());
    assert!(
        !out.has_more,
        "a halted upload must not keep the caller looping: {out:?}"
    );
    check_residency_invariant(&h)?;

    to_h.heal();
    let outcomes = sync_over(&c, &to_h)?;
    assert_eq!(outcomes.iter().map(|o| o.blobs_pushed).sum::<usize>(), 1);
    assert_eq!(h.residency(&scope, &key("c1"))?, Residency::Resident);
    assert_eq!(read_back(&h, &scope, &key("c1"))?, Some(bytes));
    assert_eq!(
        mark(&h, &scope, c.node_id())?,
        mark(&c, &scope, c.node_id())?
    );
    assert_eq!(h.digest()?, c.digest()?);
    assert!(blob_file_exists(dir.path(), &hash)?);
    check_residency_invariant(&h)
}

#[test]
fn failed_push_stages_the_record_on_the_responder() -> TestResult {
    let time = clock();
    let (h, c) = (mem_node(&time)?, mem_node(&time)?);
    let scope = files_scope();
    let bytes = content(41, 4000);
    let c1 = c.put_file_bytes(&scope, &key("c1"), "c1", &bytes)?;
    let to_h = faulty(&h);
    to_h.fail(Hash::of(&bytes));

    block_on(c.exchange(&to_h))?;
    let out = block_on(c.exchange(&to_h))?;
    assert_eq!(h.residency(&scope, &key("c1"))?, Residency::Staged);
    assert_eq!(
        mark(&h, &scope, c.node_id())?,
        None,
        "c1 is the run's first version"
    );
    assert!(mark(&c, &scope, c.node_id())? >= Some(c1));
    assert_eq!(
        out.peer_halts,
        vec![blob_halt(&scope, c.node_id(), Hash::of(&bytes))]
    );
    assert!(!out.has_more);

    to_h.heal();
    sync_over(&c, &to_h)?;
    assert_eq!(h.residency(&scope, &key("c1"))?, Residency::Resident);
    assert_eq!(h.digest()?, c.digest()?);
    assert_eq!(h.watermarks()?, c.watermarks()?);
    check_residency_invariant(&h)
}

// ---------------------------------------------------------------------------------------
// 5. A crash while a record is Staged
// ---------------------------------------------------------------------------------------

#[test]
fn staged_record_survives_a_crash_and_completes_after_reopen() -> TestResult {
    let hub = Hub::new()?;
    let dir = tempfile::tempdir()?;
    let c = redb_node(dir.path(), &hub.time)?;
    let to_h = faulty(&hub.h);
    to_h.fail(hub.x());
    let out = block_on(c.exchange(&to_h))?;
    hub.assert_halted_on_x(&c, &out)?;
    let marks = c.watermarks()?;
    let digest = c.digest()?;

    // Crash: close the node, leaving a half-written download of X behind.
    drop(c);
    let partial = dir
        .path()
        .join(BLOB_DIR)
        .join("tmp")
        .join("interrupted-download");
    std::fs::write(&partial, &hub.contents[1].1[..1000])?;
    assert!(partial.exists());

    let c = redb_node(dir.path(), &hub.time)?;
    assert!(
        tmp_files(dir.path())?.is_empty(),
        "the interrupted write is cleaned up on open"
    );
    assert_eq!(
        hub.residency(&c)?,
        hub.all_but_x(),
        "still Staged after the reopen"
    );
    assert!(!c.blob_store().contains(&hub.x())?);
    assert_eq!(c.watermarks()?, marks);
    assert_eq!(c.digest()?, digest);
    check_residency_invariant(&c)?;

    // The first round after the reopen, still failing, halts the same way.
    let out = block_on(c.exchange(&to_h))?;
    hub.assert_halted_on_x(&c, &out)?;

    to_h.heal();
    let outcomes = sync_over(&c, &to_h)?;
    assert!(outcomes.iter().all(|o| o.halts.is_empty()));
    hub.assert_converged(&c)?;

    // And it stays so across another reopen.
    drop(c);
    let c = redb_node(dir.path(), &hub.time)?;
    hub.assert_converged(&c)
}

/// Copies a live node's directory as a crash would leave it: the redb file at its last
/// durable commit, the blob files as they are.
fn snapshot_as_crashed(from: &Path, to: &Path) -> io::Result<()> {
    for file in files_under(from)? {
        let target = to.join(file.strip_prefix(from).expect("under from"));
        std::fs::create_dir_all(target.parent().expect("a parent"))?;
        std::fs::copy(&file, &target)?;
    }
    Ok(())
}

/// A node B that applied, without making it durable, a page in which A's new version of
/// `k` replaced the old one (dropping the old file's last reference), then crashed: `b` is
/// the node reopened from what the crash left.
struct DeferredCrash {
    a: Node,
    b: Node,
    scope: Scope,
    k: Key,
    old: Vec<u8>,
    new: Vec<u8>,
    _dirs: [tempfile::TempDir; 2],
}

fn crash_after_deferred_superseding_page() -> TestResult<DeferredCrash> {
    let time = clock();
    let a = mem_node(&time)?;
    let dir = tempfile::tempdir()?;
    let b = redb_node(dir.path(), &time)?;
    let scope = files_scope();
    let k = key("k");
    let (old, new) = (content(90, 2000), content(91, 2100));
    a.put_file_bytes(&scope, &k, "old", &old)?;
    let to_a = link(&a);
    sync(&b, &to_a)?;
    assert_eq!(b.residency(&scope, &k)?, Residency::Resident);

    a.put_file_bytes(&scope, &k, "new", &new)?;
    for i in 0..4 {
        a.put(&scope, &key(&format!("filler{i}")), vec![i])?;
    }
    let small = ExchangeOptions {
        page_limit: Some(2),
        ..ExchangeOptions::default()
    };
    // One page of two versions while the sender has more: applied without fsync.
    let out = block_on(b.exchange_with(&to_a, &small))?;
    assert!(out.has_more);
    assert_eq!(read_back(&b, &scope, &k)?, Some(new.clone()));

    let crashed = tempfile::tempdir()?;
    snapshot_as_crashed(dir.path(), crashed.path())?;
    let b = redb_node(crashed.path(), &time)?;
    // The crash took the page back: the old version is the stored one again.
    assert_eq!(b.get(&scope, &k)?.map(|r| r.value), Some(b"old".to_vec()));
    Ok(DeferredCrash {
        a,
        b,
        scope,
        k,
        old,
        new,
        _dirs: [dir, crashed],
    })
}

#[test]
fn crash_after_a_deferred_superseding_page_recovers_by_syncing() -> TestResult {
    // Bound whole: its temporary directories must outlive the checks.
    let crash = crash_after_deferred_superseding_page()?;
    let DeferredCrash {
        a,
        b,
        scope,
        k,
        new,
        ..
    } = &crash;
    let (a, b, scope, k) = (&**a, &**b, scope, k);
    check_residency_invariant(b)?;
    sync(b, &link(&crash.a))?;
    assert_eq!(b.residency(scope, k)?, Residency::Resident);
    assert_eq!(read_back(b, scope, k)?.as_ref(), Some(new));
    assert_eq!(b.digest()?, a.digest()?);
    assert_eq!(b.residency_counts(scope)?.staged, 0);
    check_residency_invariant(b)
}

/// The blob whose last reference a non-durable commit dropped must outlive that commit's
/// loss: after the crash the old version, covered by B's watermark for A, is Resident.
#[test]
fn crash_after_a_deferred_superseding_page_keeps_the_old_file() -> TestResult {
    // Bound whole: its temporary directories must outlive the checks.
    let crash = crash_after_deferred_superseding_page()?;
    let DeferredCrash {
        b, scope, k, old, ..
    } = &crash;
    let old_hlc = hlc_of(b, scope, k)?;
    assert!(
        mark(b, scope, old_hlc.origin())? >= Some(old_hlc),
        "the old version is covered"
    );
    assert_eq!(
        b.residency(scope, k)?,
        Residency::Resident,
        "a covered version lost its file"
    );
    assert_eq!(read_back(b, scope, k)?.as_ref(), Some(old));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6. Unreferenced blobs are removed
// ---------------------------------------------------------------------------------------

#[test]
fn superseded_and_deleted_files_lose_their_blobs() -> TestResult {
    let time = clock();
    let dir = tempfile::tempdir()?;
    let a = redb_node(dir.path(), &time)?;
    let scope = files_scope();
    let k = key("k");
    let (one, two) = (content(50, 3000), content(51, 3100));
    let (h1, h2) = (Hash::of(&one), Hash::of(&two));

    a.put_file_bytes(&scope, &k, "v1", &one)?;
    assert!(a.blob_store().contains(&h1)?);
    a.put_file_bytes(&scope, &k, "v2", &two)?;
    assert!(
        !a.blob_store().contains(&h1)?,
        "the superseded file's blob is removed"
    );
    assert!(!blob_file_exists(dir.path(), &h1)?);
    assert!(a.blob_store().contains(&h2)?);
    assert_eq!(read_back(&a, &scope, &k)?, Some(two.clone()));

    // Writing the same content again keeps the blob (the new version references it).
    a.put_file_bytes(&scope, &k, "v3", &two)?;
    assert!(a.blob_store().contains(&h2)?);
    assert_eq!(a.residency(&scope, &k)?, Residency::Resident);

    // A second record sharing the content keeps it alive when the first goes.
    a.put_file_bytes(&scope, &key("other"), "o", &two)?;
    a.delete(&scope, &k)?;
    assert!(a.blob_store().contains(&h2)?, "still referenced by `other`");
    assert_eq!(a.residency(&scope, &k)?, Residency::Tombstoned);
    a.delete(&scope, &key("other"))?;
    assert!(
        !a.blob_store().contains(&h2)?,
        "the deleted file's blob is removed"
    );
    assert!(!blob_file_exists(dir.path(), &h2)?);
    assert!(a.blob_store().list()?.is_empty());
    assert!(files_under(&dir.path().join(BLOB_DIR))?.is_empty());
    Ok(())
}

#[test]
fn a_file_superseded_by_a_peer_loses_its_blob() -> TestResult {
    let time = clock();
    let (a, b) = (mem_node(&time)?, mem_node(&time)?);
    let scope = files_scope();
    let k = key("k");
    let (one, two) = (content(60, 2000), content(61, 2100));
    let (h1, h2) = (Hash::of(&one), Hash::of(&two));
    a.put_file_bytes(&scope, &k, "v1", &one)?;
    let to_a = link(&a);
    sync(&b, &to_a)?;
    assert!(b.blob_store().contains(&h1)?);

    // B overwrites k; A pulls it.
    b.put_file_bytes(&scope, &k, "v2", &two)?;
    assert!(
        !b.blob_store().contains(&h1)?,
        "B removed its superseded blob"
    );
    let to_b = link(&b);
    sync(&a, &to_b)?;
    assert_eq!(read_back(&a, &scope, &k)?, Some(two));
    assert!(a.blob_store().contains(&h2)?);
    assert!(
        !a.blob_store().contains(&h1)?,
        "A's old blob is removed after the apply"
    );
    assert_eq!(a.blob_store().list()?.len(), 1);

    // B deletes k; A pulls the tombstone and drops the blob.
    b.delete(&scope, &k)?;
    assert!(b.blob_store().list()?.is_empty());
    sync(&a, &to_b)?;
    assert_eq!(a.residency(&scope, &k)?, Residency::Tombstoned);
    assert!(
        a.blob_store().list()?.is_empty(),
        "A's blob goes with the remote delete"
    );
    assert_eq!(a.digest()?, b.digest()?);
    Ok(())
}

#[test]
fn collect_garbage_removes_strays_and_keeps_referenced_blobs() -> TestResult {
    let time = clock();
    let dir = tempfile::tempdir()?;
    let a = redb_node(dir.path(), &time)?;
    let scope = files_scope();
    let kept = content(70, 2500);
    a.put_file_bytes(&scope, &key("kept"), "k", &kept)?;
    let stray = content(71, 2600);
    let stray_ref = write_blob(&**a.blob_store(), &mut Cursor::new(&stray), None)?;
    assert_eq!(stray_ref, blob_of(&stray));
    assert!(blob_file_exists(dir.path(), &stray_ref.hash)?);

    assert_eq!(a.collect_garbage()?, 1);
    assert!(!a.blob_store().contains(&stray_ref.hash)?);
    assert!(!blob_file_exists(dir.path(), &stray_ref.hash)?);
    assert!(a.blob_store().contains(&Hash::of(&kept))?);
    assert_eq!(read_back(&a, &scope, &key("kept"))?, Some(kept));
    assert_eq!(a.collect_garbage()?, 0, "nothing left to collect");
    check_residency_invariant(&a)
}

#[test]
fn put_file_that_fails_leaves_no_blob() -> TestResult {
    let time = clock();
    let a = mem_node(&time)?;
    let scope = files_scope();
    let too_big = vec![0u8; highwater::record::MAX_VALUE_LEN + 1];
    let result = a.put_file_bytes(&scope, &key("k"), too_big, &content(95, 1000));
    assert!(result.is_err(), "a value over the limit is refused");
    assert_eq!(a.get_version(&scope, &key("k"))?, None);
    assert_eq!(
        a.blob_store().list()?,
        vec![],
        "no record, so no blob either"
    );
    Ok(())
}

/// Blobs fetched in a round are pinned until the page that references them commits: a
/// garbage collection running in between (here: before each transfer) keeps them.
#[test]
fn garbage_collection_during_a_round_keeps_fetched_blobs() -> TestResult {
    let hub = Hub::new()?;
    let c = mem_node(&hub.time)?;
    let to_h = faulty(&hub.h);
    let removed = Arc::new(AtomicUsize::new(0));
    let (gc_node, gc_removed) = (c.clone(), removed.clone());
    to_h.before_transfer(move || {
        let n = gc_node.collect_garbage().expect("collect garbage");
        gc_removed.fetch_add(n, Ordering::Relaxed);
    });
    let out = block_on(c.exchange(&to_h))?;
    assert_eq!(out.blobs_fetched, 5);
    assert_eq!(
        removed.load(Ordering::Relaxed),
        0,
        "a pinned blob was collected"
    );
    assert!(out.halts.is_empty(), "{out:?}");
    hub.assert_converged(&c)
}

/// A blob uploaded to the responder before the request that references it must survive a
/// garbage collection on the responder in between (the pins contract in engine/blobs.rs).
#[test]
fn garbage_collection_on_the_responder_keeps_an_upload_until_its_record_lands() -> TestResult {
    let time = clock();
    let (h, c) = (mem_node(&time)?, mem_node(&time)?);
    let scope = files_scope();
    let bytes = content(96, 3000);
    c.put_file_bytes(&scope, &key("c1"), "c1", &bytes)?;
    let to_h = faulty(&h);
    block_on(c.exchange(&to_h))?;
    let gc_node = h.clone();
    to_h.before_exchange(move || {
        gc_node.collect_garbage().expect("collect garbage");
    });
    let out = block_on(c.exchange(&to_h))?;
    assert_eq!(out.blobs_pushed, 1);
    assert!(out.peer_halts.is_empty(), "{out:?}");
    assert_eq!(h.residency(&scope, &key("c1"))?, Residency::Resident);
    assert_eq!(h.watermarks()?, c.watermarks()?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 7. Residency counts
// ---------------------------------------------------------------------------------------

#[test]
fn residency_counts_per_scope() -> TestResult {
    let hub = Hub::new()?;
    let scope = hub.scope.clone();
    let other = Scope::app("files", "other")?;
    // More on A: a tombstone in the files scope, and a second scope with a file, a plain
    // record and a tombstone.
    hub.a.delete(&scope, &key("a4"))?;
    let y = content(80, 1200);
    hub.a.put_file_bytes(&other, &key("o1"), "o1", &y)?;
    hub.a.put(&other, &key("o2"), b"plain".to_vec())?;
    hub.a.put(&other, &key("o3"), b"doomed".to_vec())?;
    hub.a.delete(&other, &key("o3"))?;
    sync(&hub.a, &link(&hub.h))?;

    let c = mem_node(&hub.time)?;
    let to_h = faulty(&hub.h);
    to_h.fail(hub.x());
    to_h.fail(Hash::of(&y));
    sync_over(&c, &to_h)?;

    let counts = |staged, resident, tombstoned| ResidencyCounts {
        staged,
        resident,
        tombstoned,
    };
    // files: a1 a3 b1 b2 resident, a2 staged, a4 deleted.
    assert_eq!(c.residency_counts(&scope)?, counts(1, 4, 1));
    // other: o1 staged, o2 resident, o3 deleted.
    assert_eq!(c.residency_counts(&other)?, counts(1, 1, 1));
    assert_eq!(hub.h.residency_counts(&scope)?, counts(0, 5, 1));
    assert_eq!(hub.h.residency_counts(&other)?, counts(0, 2, 1));
    assert_eq!(c.residency_counts(&Scope::shared())?, counts(0, 0, 0));
    for s in [&scope, &other] {
        let mut tally = ResidencyCounts::default();
        for (k, _) in c.versions(s)? {
            match c.residency(s, &k)? {
                Residency::Staged => tally.staged += 1,
                Residency::Resident => tally.resident += 1,
                Residency::Tombstoned => tally.tombstoned += 1,
                Residency::Absent => return Err(format!("{k:?} listed but Absent").into()),
            }
        }
        assert_eq!(c.residency_counts(s)?, tally, "{s:?}");
    }
    check_residency_invariant(&c)?;

    to_h.heal();
    sync_over(&c, &to_h)?;
    assert_eq!(c.residency_counts(&scope)?, counts(0, 5, 1));
    assert_eq!(c.residency_counts(&other)?, counts(0, 2, 1));
    assert_eq!(c.digest()?, hub.h.digest()?);
    check_residency_invariant(&c)
}
