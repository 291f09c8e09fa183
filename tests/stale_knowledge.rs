//! A peer restored from a backup: what its partner remembers of it is stale-high.
//!
//! Nodes A and B on real redb files. B's file is copied aside, B then learns more from A,
//! and the old file is put back, so A believes B holds versions it lost. The pages A plans
//! from that belief start above B's watermarks: B must merge them without moving any
//! watermark over the gap, and the next round (planned from B's real marks) must fill it.
//! After every round: no watermark covers a write its node lacks, and B's marks never pass
//! A's. A second scenario has B write after the copy, so its lost writes live only on A:
//! under its old id B refuses them ([`HaltReason::OwnOrigin`]); reopened with
//! [`SyncEngine::open_restored`] it takes them back and converges.
//!
//! The other way round, B's knowledge of A can be stale too (restored from the backup, or
//! recorded from a response A never got), while A still believes B recorded its current
//! marks and sends only their digest: B must see that its record does not match, ask for
//! the marks in full, and plan from them, so that nothing is skipped.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::rounds::{config, link, sync, Link, Node, TestResult};
use futures_executor::block_on;
use highwater::engine::DB_FILE;
use highwater::error::TransportError;
use highwater::exchange::Page;
use highwater::transport::WireStats;
use highwater::wire::{encode, ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks};
use highwater::{
    BlobRef, ExchangeOutcome, Halt, HaltReason, Hash, Hlc, Key, ManualTime, NodeId, Op, Scope,
    ScopeFilter, ScopedWatermarks, SyncEngine, Transport,
};

/// Rounds after which a resync from the stale state is taken to be stuck.
const ROUND_BOUND: usize = 20;

/// One write, as its node issued it.
struct Write {
    scope: Scope,
    key: Key,
    hlc: Hlc,
}

/// Nodes A and B in their own directories, every write either made, and the clock.
struct Pair {
    time: Arc<ManualTime>,
    a: Node,
    b: Node,
    writes: Vec<Write>,
    /// Last, so the engines close before their directories go.
    root: tempfile::TempDir,
}

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid app scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

impl Pair {
    /// A and B on fresh files, each with a few writes, synced.
    fn synced() -> TestResult<Pair> {
        let time = ManualTime::at_secs(1_700_000_000);
        let root = tempfile::tempdir()?;
        let a = Arc::new(SyncEngine::open_with(root.path().join("a"), config(&time))?);
        let b = Arc::new(SyncEngine::open_with(root.path().join("b"), config(&time))?);
        let mut pair = Pair {
            time,
            root,
            a,
            b,
            writes: Vec::new(),
        };
        for i in 0..10 {
            pair.put_a(&notes(), &format!("a{i}"))?;
        }
        for i in 0..4 {
            pair.put_a(&Scope::shared(), &format!("s{i}"))?;
        }
        for i in 0..3 {
            let b = pair.b.clone();
            pair.write(&b, &notes(), &format!("b{i}"), Some("from b"))?;
        }
        sync(&pair.a, &link(&pair.b))?;
        pair.assert_converged()?;
        Ok(pair)
    }

    fn b_dir(&self) -> PathBuf {
        self.root.path().join("b")
    }

    fn backup(&self) -> PathBuf {
        self.root.path().join("b-backup.redb")
    }

    /// Writes `key` on `node` (a put of `value`, or a delete) and remembers the write.
    fn write(
        &mut self,
        node: &SyncEngine,
        scope: &Scope,
        k: &str,
        value: Option<&str>,
    ) -> TestResult {
        let op = match value {
            Some(v) => Op::Put {
                value: v.as_bytes().to_vec(),
                blob: None,
            },
            None => Op::Delete,
        };
        let hlc = node.write(scope, &key(k), op)?;
        self.writes.push(Write {
            scope: scope.clone(),
            key: key(k),
            hlc,
        });
        Ok(())
    }

    fn put_a(&mut self, scope: &Scope, k: &str) -> TestResult {
        let a = self.a.clone();
        let value = format!("{k}, write {}", self.writes.len());
        self.write(&a, scope, k, Some(&value))
    }

    /// Closes B, releasing its file (an in-memory stand-in holds its place until reopened).
    fn close_b(&mut self) -> TestResult {
        let stand_in = Arc::new(SyncEngine::in_memory()?);
        close(std::mem::replace(&mut self.b, stand_in))
    }

    /// Opens B (closed) on its directory with `open`.
    fn open_b(&mut self, open: impl FnOnce(&Path) -> highwater::Result<SyncEngine>) -> TestResult {
        self.b = Arc::new(open(&self.b_dir())?);
        Ok(())
    }

    fn open_b_plain(&mut self) -> TestResult {
        let cfg = config(&self.time);
        self.open_b(|dir| SyncEngine::open_with(dir, cfg))
    }

    /// Closes B and copies its redb file aside.
    fn back_up_b(&mut self) -> TestResult {
        self.close_b()?;
        std::fs::copy(self.b_dir().join(DB_FILE), self.backup())?;
        self.open_b_plain()
    }

    /// Closes B, puts the backed-up file back in place and reopens B on it under its old id.
    fn restore_b(&mut self) -> TestResult {
        let id = self.b.node_id();
        self.close_b()?;
        std::fs::copy(self.backup(), self.b_dir().join(DB_FILE))?;
        self.open_b_plain()?;
        assert_eq!(self.b.node_id(), id, "a plain reopen keeps the id");
        Ok(())
    }

    /// The watermark invariant on both nodes, and B's marks within A's.
    fn check_invariants(&self) -> TestResult {
        self.check_no_gaps()?;
        assert_marks_within(&self.b.watermarks()?, &self.a.watermarks()?);
        Ok(())
    }

    /// The watermark invariant on both nodes.
    fn check_no_gaps(&self) -> TestResult {
        assert_no_gap("A", &self.a, &self.writes)?;
        assert_no_gap("B", &self.b, &self.writes)
    }

    fn assert_converged(&self) -> TestResult {
        assert_eq!(self.b.digest()?, self.a.digest()?, "B's state equals A's");
        assert_eq!(
            self.b.watermarks()?,
            self.a.watermarks()?,
            "B's watermarks equal A's"
        );
        Ok(())
    }
}

/// Drops the last handle on `node`, so its redb file is closed.
fn close(node: Node) -> TestResult {
    let engine = Arc::try_unwrap(node).map_err(|_| "the engine is still shared")?;
    drop(engine);
    Ok(())
}

/// For every write from origin `o` with Hlc <= `node`'s W[o] in its scope, `node` holds that
/// version or a newer one of the same key: no watermark on `node` was advanced over a gap.
fn assert_no_gap(name: &str, node: &SyncEngine, writes: &[Write]) -> TestResult {
    let marks = node.watermarks()?;
    for w in writes {
        if marks
            .get(&w.scope, w.hlc.origin())
            .is_some_and(|mark| w.hlc <= mark)
        {
            let held = node.get_version(&w.scope, &w.key)?.map(|v| v.hlc);
            assert!(
                held >= Some(w.hlc),
                "{name}'s W[{}] in {} covers {:?}@{} but {name} holds {held:?}",
                w.hlc.origin().short(),
                w.scope,
                w.key,
                w.hlc,
            );
        }
    }
    Ok(())
}

/// Every mark of `lower` is at or below the same mark of `upper`.
fn assert_marks_within(lower: &ScopedWatermarks, upper: &ScopedWatermarks) {
    for (scope, marks) in lower.iter() {
        for mark in marks.iter() {
            let theirs = upper.get(scope, mark.origin());
            assert!(
                theirs >= Some(mark),
                "B's W[{}] in {scope} is {mark}, above A's {theirs:?}",
                mark.origin().short()
            );
        }
    }
}

/// Runs rounds from `from` to `to` one at a time while `has_more`, checking the invariants
/// after each. Returns every round's outcome.
fn rounds_checked(pair: &Pair, from: &Node, to: &Node) -> TestResult<Vec<ExchangeOutcome>> {
    let wire = link(to);
    let mut outcomes = Vec::new();
    loop {
        let out = block_on(from.exchange(&wire))?;
        pair.check_invariants()?;
        let more = out.has_more;
        outcomes.push(out);
        if !more {
            return Ok(outcomes);
        }
        if outcomes.len() >= ROUND_BOUND {
            return Err(format!(
                "has_more still set after {ROUND_BOUND} rounds; the last: {:?}",
                outcomes.last()
            )
            .into());
        }
    }
}

/// A and B synced; B backed up; A writes more (new keys, overwrites of A's and B's keys, a
/// delete) and B learns it; B's old file is restored. Then A writes two more versions, so
/// that what A plans from its stale knowledge of B is a non-empty page above B's marks.
fn restored_with_stale_knowledge() -> TestResult<Pair> {
    let mut pair = Pair::synced()?;
    pair.back_up_b()?;

    pair.time.advance(std::time::Duration::from_secs(1));
    for i in 0..5 {
        pair.put_a(&notes(), &format!("n{i}"))?;
    }
    pair.put_a(&notes(), "a3")?;
    pair.put_a(&notes(), "b1")?;
    pair.put_a(&Scope::shared(), "s1")?;
    let a = pair.a.clone();
    pair.write(&a, &notes(), "a5", None)?;
    sync(&pair.a, &link(&pair.b))?;
    pair.assert_converged()?;
    assert_eq!(
        pair.a.peer_watermarks(pair.b.node_id())?,
        Some(pair.b.watermarks()?)
    );

    pair.restore_b()?;
    let known = pair
        .a
        .peer_watermarks(pair.b.node_id())?
        .ok_or("A knows B")?;
    assert!(
        !pair.b.watermarks()?.covers(&known),
        "A's knowledge of B is stale-high"
    );
    assert_ne!(pair.b.digest()?, pair.a.digest()?);

    pair.time.advance(std::time::Duration::from_secs(1));
    pair.put_a(&notes(), "z0")?;
    pair.put_a(&notes(), "a1")?;
    pair.check_invariants()?;
    Ok(pair)
}

#[test]
fn a_initiating_from_stale_knowledge_fills_the_gap_in_two_rounds() -> TestResult {
    let pair = restored_with_stale_knowledge()?;
    let outcomes = rounds_checked(&pair, &pair.a, &pair.b)?;
    println!("stale knowledge, A initiating: {} rounds", outcomes.len());

    // Round 1 is planned from the stale marks: the two newest versions, above B's real mark.
    // B merges them, but its watermarks do not move over the gap below them.
    assert_eq!(outcomes[0].shipped, 2);
    assert!(
        outcomes[0].has_more,
        "A learned B's real marks and sees it lacks more"
    );
    // Round 2 is planned from B's real marks and fills the gap.
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes[1].shipped > 2);
    assert!(outcomes
        .iter()
        .all(|o| o.halts.is_empty() && o.peer_halts.is_empty()));

    pair.assert_converged()?;
    assert_eq!(
        pair.a.peer_watermarks(pair.b.node_id())?,
        Some(pair.b.watermarks()?)
    );
    Ok(())
}

#[test]
fn a_round_one_leaves_b_marks_where_they_were() -> TestResult {
    let pair = restored_with_stale_knowledge()?;
    let before = pair.b.watermarks()?;
    let out = block_on(pair.a.exchange(&link(&pair.b)))?;
    pair.check_invariants()?;
    assert_eq!(out.shipped, 2);
    assert_eq!(
        pair.b.watermarks()?,
        before,
        "a run above B's mark moved a watermark"
    );
    for k in ["z0", "a1"] {
        assert_eq!(
            pair.b.get_version(&notes(), &key(k))?,
            pair.a.get_version(&notes(), &key(k))?,
            "B merged {k}"
        );
    }
    Ok(())
}

#[test]
fn b_initiating_after_restore_converges_in_one_round() -> TestResult {
    let pair = restored_with_stale_knowledge()?;
    let outcomes = rounds_checked(&pair, &pair.b, &pair.a)?;
    println!("stale knowledge, B initiating: {} rounds", outcomes.len());

    // B's request carries its real marks: A answers with exactly what B lacks.
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].shipped, 0);
    assert!(outcomes[0].received > 2);
    assert!(outcomes[0].halts.is_empty() && outcomes[0].peer_halts.is_empty());
    pair.assert_converged()?;
    // A learned B's real marks from the request: its knowledge is no longer above them, and
    // a round A initiates now keeps every invariant and ends converged.
    let known = pair
        .a
        .peer_watermarks(pair.b.node_id())?
        .ok_or("A knows B")?;
    assert!(
        pair.b.watermarks()?.covers(&known),
        "A's knowledge of B is still above B's marks"
    );
    let again = rounds_checked(&pair, &pair.a, &pair.b)?;
    assert_eq!((again.len(), again[0].received), (1, 0));
    pair.assert_converged()?;
    Ok(())
}

/// Whether `halts` holds an [`HaltReason::OwnOrigin`] halt for `origin` in `scope`.
fn own_origin_halt(halts: &[Halt], scope: &Scope, origin: NodeId) -> bool {
    halts
        .iter()
        .any(|h| h.scope == *scope && h.origin == origin && h.reason == HaltReason::OwnOrigin)
}

/// B is restored from a backup older than some of its writes, which live only on A. As a
/// responder B does not act on A's claim (an initiator's evidence is not trusted by default):
/// it refuses the run of its own id and reports it. As soon as B initiates, A's marks show
/// B's id above B's own mark: B takes a fresh id and its lost writes come back under the old
/// one, as another origin's.
#[test]
fn restored_node_refuses_its_lost_writes_as_a_responder_and_takes_a_fresh_id_as_an_initiator(
) -> TestResult {
    let mut pair = Pair::synced()?;
    pair.back_up_b()?;

    // B writes after the copy; A takes those writes. They will live only on A.
    pair.time.advance(std::time::Duration::from_secs(1));
    let b = pair.b.clone();
    for k in ["lost0", "lost1", "a2"] {
        pair.write(&b, &notes(), k, Some("written by b after the backup"))?;
    }
    drop(b);
    sync(&pair.b, &link(&pair.a))?;
    pair.assert_converged()?;

    pair.restore_b()?;
    let b_id = pair.b.node_id();
    let b_marks_restored = pair.b.watermarks()?;
    pair.put_a(&notes(), "after0")?;

    // A initiating: B refuses the run of its own id and reports it; A does not loop.
    let outcomes = rounds_checked(&pair, &pair.a, &pair.b)?;
    let refused: Vec<_> = outcomes
        .iter()
        .filter(|o| own_origin_halt(&o.peer_halts, &notes(), b_id))
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "one round reports B's refusal: {outcomes:?}"
    );
    assert!(outcomes.iter().all(|o| o.halts.is_empty()));

    // Nothing of B's run was applied; A's write after the restore was.
    for k in ["lost0", "lost1"] {
        assert_eq!(
            pair.b.get_version(&notes(), &key(k))?,
            None,
            "B took its lost {k}"
        );
    }
    let a2 = pair
        .b
        .get_version(&notes(), &key("a2"))?
        .ok_or("B holds a2")?;
    assert_eq!(a2.hlc.origin(), pair.a.node_id(), "B kept A's a2");
    assert_eq!(pair.b.node_id(), b_id);
    assert_eq!(
        pair.b.watermarks()?.get(&notes(), b_id),
        b_marks_restored.get(&notes(), b_id)
    );
    assert_eq!(
        pair.b.get_version(&notes(), &key("after0"))?,
        pair.a.get_version(&notes(), &key("after0"))?
    );

    // B initiating: A's marks show B's id above B's own mark. B takes a fresh id and takes
    // its lost writes back as another origin's, without halting.
    let outcomes = rounds_checked(&pair, &pair.b, &pair.a)?;
    assert!(outcomes
        .iter()
        .all(|o| o.halts.is_empty() && o.peer_halts.is_empty()));
    assert_ne!(pair.b.node_id(), b_id);
    pair.assert_converged()?;
    let lost0 = pair
        .b
        .get_version(&notes(), &key("lost0"))?
        .ok_or("B holds lost0")?;
    assert_eq!(lost0.hlc.origin(), b_id);
    Ok(())
}

/// A link on which every answer is lost: the responder answers, and records what it
/// recorded, but the initiator only sees an error. (A request to resend the marks in full
/// gets through, so that the lost answer is a real one.)
struct LosesResponses(Link);

impl Transport for LosesResponses {
    fn peer_id(&self) -> Option<NodeId> {
        self.0.peer_id()
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        let response = self.0.exchange(request).await?;
        if response.marks == ResponseMarks::Resend {
            return Ok(response);
        }
        Err(TransportError::Unreachable {
            reason: "the response was lost".to_owned(),
        })
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        self.0.blobs_present(hashes).await
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn io::Write + Send),
    ) -> Result<(), TransportError> {
        self.0.fetch_blob(blob, into).await
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn io::Read + Send>,
    ) -> Result<(), TransportError> {
        self.0.push_blob(blob, content).await
    }
}

/// The encoded size of a request from `from` that carries no version and its marks as a
/// digest (whatever its marks, scopes and origins).
fn digest_request_len(from: &SyncEngine) -> TestResult<u64> {
    let request = ExchangeRequest {
        from: from.node_id(),
        scopes: ScopeFilter::All,
        marks: RequestMarks::Digest(from.watermarks()?.digest()),
        known: Some(ScopedWatermarks::new().digest()),
        page: Page::default(),
        limit: u32::try_from(from.config().page_limit)?,
        deferred: Vec::new(),
        ext: Default::default(),
    };
    Ok(encode(&request).len() as u64)
}

/// One round from `from` to `to`, and what went over the wire.
fn round(from: &Node, to: &Node) -> TestResult<(ExchangeOutcome, WireStats)> {
    let wire = link(to);
    let out = block_on(from.exchange(&wire))?;
    Ok((out, wire.stats()))
}

/// Checks that the round `stats` describes was one in which the responder could not resolve
/// the initiator's marks digest: two requests, the first the digest, the second the marks in
/// full.
fn assert_resent(from: &Node, stats: WireStats) -> TestResult {
    assert_eq!(stats.requests, 2, "the responder resolved the digest");
    let first = stats.bytes_sent - stats.last_request;
    assert_eq!(
        first,
        digest_request_len(from)?,
        "the first request carried the marks as a digest"
    );
    assert!(
        stats.last_request > first,
        "the second request carried the marks in full"
    );
    Ok(())
}

#[test]
fn a_digest_against_a_restored_responder_is_resent_in_full_and_nothing_is_skipped() -> TestResult {
    let mut pair = Pair::synced()?;
    pair.back_up_b()?;
    // A writes more and B learns it: B's record of A's marks moves past the backup's.
    pair.time.advance(std::time::Duration::from_secs(1));
    for i in 0..5 {
        pair.put_a(&notes(), &format!("n{i}"))?;
    }
    pair.put_a(&notes(), "a3")?;
    pair.put_a(&Scope::shared(), "s1")?;
    sync(&pair.a, &link(&pair.b))?;
    pair.assert_converged()?;
    // A quiet round: A's marks travel as a digest, and B resolves it.
    let stats = {
        let wire = link(&pair.b);
        block_on(pair.a.exchange(&wire))?;
        wire.stats()
    };
    assert_eq!(
        (stats.requests, stats.last_request),
        (1, digest_request_len(&pair.a)?)
    );

    // B's old file comes back: its record of A's marks is the backup's. A's marks did not
    // change, so A sends their digest again.
    pair.restore_b()?;
    assert_ne!(pair.b.digest()?, pair.a.digest()?);
    let (out, stats) = round(&pair.a, &pair.b)?;
    pair.check_invariants()?;
    assert_resent(&pair.a, stats)?;
    assert!(
        out.has_more,
        "A learned B's real marks and sees it lacks more"
    );
    let rest = rounds_checked(&pair, &pair.a, &pair.b)?;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(rest[0].shipped >= 7, "A re-shipped what B lost: {rest:?}");
    pair.assert_converged()?;
    // Nothing is skipped: B holds every write (or a newer version of its key).
    for w in &pair.writes {
        let held = pair.b.get_version(&w.scope, &w.key)?.map(|v| v.hlc);
        assert!(held >= Some(w.hlc), "B lacks {:?}@{}", w.key, w.hlc);
    }
    Ok(())
}

#[test]
fn a_record_from_lost_responses_is_not_taken_for_the_initiators_marks() -> TestResult {
    let mut pair = Pair::synced()?;
    let a_id = pair.a.node_id();
    pair.time.advance(std::time::Duration::from_secs(1));
    let b = pair.b.clone();
    pair.write(&b, &notes(), "late", Some("from b, after the sync"))?;

    // A -> B, response lost: B recorded A's marks raised to the top of its page, which
    // holds B's new write, so B believes A holds it.
    assert!(block_on(pair.a.exchange(&LosesResponses(link(&pair.b)))).is_err());
    // B -> A, response lost: A answered with its real marks and believes B recorded them;
    // B recorded nothing. (B planned from its stale record: it did not send its write.)
    assert!(block_on(pair.b.exchange(&LosesResponses(link(&pair.a)))).is_err());
    pair.check_no_gaps()?;
    let recorded = pair.b.peer_watermarks(a_id)?.ok_or("B knows A")?;
    assert!(
        !pair.a.watermarks()?.covers(&recorded),
        "B's record of A's marks is stale-high"
    );
    assert_eq!(pair.a.get_version(&notes(), &key("late"))?, None);

    // A -> B: A's marks are the ones it believes B recorded, so A sends their digest. B's
    // record does not hash to it: B asks for the marks in full, plans from them, and sends
    // its write. Trusting its record would have skipped it for good.
    let (out, stats) = round(&pair.a, &pair.b)?;
    pair.check_no_gaps()?;
    assert_eq!(
        pair.a.get_version(&notes(), &key("late"))?,
        pair.b.get_version(&notes(), &key("late"))?,
        "A did not get B's write"
    );
    assert_eq!(out.received, 1);
    assert!(!out.has_more);
    pair.assert_converged()?;
    assert_resent(&pair.a, stats)?;
    Ok(())
}
