//! Storage: one trait, three implementations ([`MemStore`], [`RedbStore`], and `PgStore` on
//! PostgreSQL with the feature `postgres`).
//!
//! # Contract
//!
//! - [`Store::commit`] applies a whole [`Batch`] atomically: after it returns `Ok`, every
//!   upsert, watermark advance, peer-knowledge update and clock raise of the batch is
//!   visible; after it returns `Err` (or after a crash during it), none is. Data and
//!   watermarks never come apart.
//! - `Durability::Immediate` commits are on stable storage when `commit` returns, and so is
//!   every commit made before them. `Durability::Deferred` commits are atomic and visible at
//!   once but may be lost in a crash, always together with every later commit, never alone.
//!   [`Store::flush`] makes every earlier commit durable.
//! - [`Store::read`] returns a consistent snapshot: watermarks and versions read through the
//!   same reader belong to one committed state.
//! - Upserts merge by last-write-wins inside the transaction: the stored version changes iff
//!   the incoming Hlc is greater. The live-version index always holds exactly one entry
//!   `(scope, origin, hlc) -> key` per stored version.
//! - Blob references are counted per scope: for every blob hash and scope, the count equals
//!   the number of stored versions of that scope pointing at the hash, kept with the blob's
//!   size ([`StoreRead::blob_scopes`], [`StoreRead::referenced_blobs`]); the total over all
//!   scopes is [`StoreRead::blob_refs`]. A commit reports the hashes whose total fell to
//!   zero ([`BatchReport::unreferenced`]).
//! - An [`Advance`] moves `W[scope][origin]` to `top` only if `base <= W` at commit time (no
//!   gap), and never lowers it.
//! - After every commit the [`StoreRead::fingerprint`] of any [`AuditRange`] equals the fold
//!   of [`item_hash`] over the live versions in it ([`StoreRead::audit_items`]), and every
//!   store answers `fingerprint`, `audit_items`, `audit_split` and `version_at` alike for
//!   the same contents.
//!
//! The in-memory store is both the test double and the model the other stores are checked
//! against: the same contract suite (`tests/store_contract.rs`) runs on all three.
//!
//! One file over 600 lines because it is one concept: the two traits, the contract in prose, and
//! the batch types every store shares; each implementation lives in a module of its own.

mod audit;
mod mem;
#[cfg(feature = "postgres")]
mod pg;
mod redb;

pub use self::audit::{item_hash, AuditPoint, AuditRange, Fingerprint};
pub use self::mem::MemStore;
#[cfg(feature = "postgres")]
pub use self::pg::{
    Change, ChangeFeed, FeedOptions, PgOptions, PgStore, SCHEMA_VERSION as PG_SCHEMA_VERSION,
};
pub use self::redb::RedbStore;

use std::collections::BTreeMap;

use crate::error::StoreError;
use crate::hash::Hash;
use crate::hlc::{Hlc, NodeId};
use crate::merge;
use crate::record::ScopeFilter;
use crate::record::{BlobRef, Key, Scope, Version};
use crate::watermark::ScopedWatermarks;

/// How durable a commit must be when it returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Durability {
    /// On stable storage when `commit` returns (local writes).
    Immediate,
    /// Atomic and visible, but may be lost in a crash until the next durable commit or
    /// [`Store::flush`] (applied pages during a bulk sync; lost pages are simply re-fetched,
    /// because their watermark advances are lost with them).
    Deferred,
}

/// A conditional watermark advance: `W[scope][top.origin()] := max(W, top)` if `base <= W`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Advance {
    /// The scope.
    pub scope: Scope,
    /// The claim's lower bound; `None` makes the advance unconditional (own writes).
    pub base: Option<Hlc>,
    /// The new mark.
    pub top: Hlc,
}

/// What the engine learned of a peer's watermarks, replacing the older knowledge for the
/// scopes in play.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PeerKnowledge {
    /// The peer.
    pub peer: NodeId,
    /// The scopes the knowledge covers.
    pub scopes: ScopeFilter,
    /// The peer's watermarks in those scopes.
    pub marks: ScopedWatermarks,
}

/// Everything one transaction does, in this order: floors raised, removals, upserts (each
/// checked against the floor), watermark advances, retired marks, peer knowledge, forgotten
/// peers, peers seen, the clock.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Batch {
    /// Purge floors to raise: `F[scope] := max(F[scope], time)` (see [`StoreRead::floors`]).
    pub floors: Vec<(Scope, u64)>,
    /// Stored versions to remove (a purge): the key's stored version goes, with its index
    /// entry and blob reference, iff its Hlc is this one; otherwise nothing happens.
    pub removals: Vec<(Scope, Key, Hlc)>,
    /// Versions to merge, in order. A version at or below its scope's floor, of a key this
    /// store does not hold (as the batch found it), is refused ([`BatchReport::refused`]):
    /// the store may have purged a newer delete of that key, and taking the version could
    /// bring the record back (see docs/protocol.md, "Tombstone purge and the floor").
    pub upserts: Vec<(Scope, Key, Version)>,
    /// Watermark advances, evaluated after the upserts.
    pub advances: Vec<Advance>,
    /// Peer knowledge to record.
    pub peer: Option<PeerKnowledge>,
    /// Marks to drop, `(scope, origin)`: origins retired from a scope (applied after the
    /// advances, so a batch never advances a mark it retires).
    pub retire: Vec<(Scope, NodeId)>,
    /// Peers whose recorded knowledge, and last-seen time, is dropped (after `peer`).
    pub forget: Vec<NodeId>,
    /// Peers met at a time (NTP64): each peer's last-seen time is raised to it.
    pub seen: Vec<(NodeId, u64)>,
    /// The clock's last time; the stored clock is raised to it, never lowered.
    pub clock: u64,
    /// The least timestamp this batch's writer issued for it (local writes): the commit fails
    /// with [`StoreError::IssuedBehind`], changing nothing, unless the store's identity is this
    /// timestamp's origin and every timestamp committed by an issuing batch before is below
    /// its time; it then records [`Batch::clock`] as the time the next must exceed. Several
    /// processes may write through one store (PostgreSQL, see docs/scale.md); this keeps them
    /// from committing a timestamp one of them committed before, or one below the store's
    /// mark of its own origin. Batches that issue nothing (received versions, purges) leave
    /// that time alone, so a writer alone on its store never sees the error.
    pub issued: Option<Hlc>,
    /// How durable the commit must be.
    pub durability: Durability,
}

impl Batch {
    /// An empty batch that only raises the clock.
    pub fn new(clock: u64, durability: Durability) -> Self {
        Batch {
            floors: Vec::new(),
            removals: Vec::new(),
            upserts: Vec::new(),
            advances: Vec::new(),
            peer: None,
            retire: Vec::new(),
            forget: Vec::new(),
            seen: Vec::new(),
            clock,
            issued: None,
            durability,
        }
    }
}

/// What a committed batch did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct BatchReport {
    /// The upserts that won LWW and replaced the stored state, as indexes into `upserts`.
    pub applied: Vec<usize>,
    /// For each advance, whether its condition held (`base <= W`).
    pub advanced: Vec<bool>,
    /// Blobs that no stored version references any more after this batch.
    pub unreferenced: Vec<Hash>,
    /// The upserts refused by their scope's purge floor, as indexes into `upserts`.
    pub refused: Vec<usize>,
    /// How many removals found their version and removed it.
    pub removed: usize,
}

/// Which keys a scan returns.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct KeyRange {
    /// Only keys starting with these bytes.
    pub prefix: Vec<u8>,
    /// Only keys strictly after this one (for paging).
    pub after: Option<Key>,
    /// At most this many rows.
    pub limit: usize,
}

/// A consistent read-only view of a store.
pub trait StoreRead {
    /// The stored version of a key (tombstones included).
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn get(&self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError>;

    /// Stored versions of `scope` in key order, restricted by `range` (tombstones included).
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn scan(&self, scope: &Scope, range: &KeyRange) -> Result<Vec<(Key, Version)>, StoreError>;

    /// This node's watermarks in every scope.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn watermarks(&self) -> Result<ScopedWatermarks, StoreError>;

    /// What this node last learned of `peer`'s watermarks; `None` if never met.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>, StoreError>;

    /// The peers this node has knowledge of.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn peers(&self) -> Result<Vec<NodeId>, StoreError>;

    /// Live versions from `origin` in `scope` with `after < hlc <= upto`, ascending, at most
    /// `limit`: a range scan of the live-version index.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn live_range(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        limit: usize,
    ) -> Result<Vec<(Key, Version)>, StoreError>;

    /// How many live versions from `origin` in `scope` have `after < hlc <= upto` (the ones
    /// [`StoreRead::live_range`] returns without a limit), counted up to `cap`: the answer is
    /// `min(count, cap)`. A responder counts what an initiator still lacks with it.
    ///
    /// Cost: redb adds up its audit chunks' counts, about `min(count, cap) / 64 + 128`
    /// rows; the in-memory store and PostgreSQL step through the index, `min(count, cap)`
    /// entries.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn live_count(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        cap: u64,
    ) -> Result<u64, StoreError>;

    /// How many stored versions reference the blob `hash`, over all scopes (0: none, and the
    /// blob may be removed).
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError>;

    /// The scopes with at least one stored version referencing the blob `hash`, in scope
    /// order (none if no stored version references it).
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn blob_scopes(&self, hash: &Hash) -> Result<Vec<Scope>, StoreError>;

    /// The distinct blobs that stored versions reference, with hash strictly after `after`
    /// (from the first if `None`), in hash order, at most `limit`: one page of a listing of
    /// every referenced blob, each with its size.
    ///
    /// The versions referencing one hash agree on its size when they are honest (a blob's
    /// size follows from its content, and a fetch checks both); where they do not, each
    /// scope keeps the size of the reference it counted last and this reports the largest
    /// of its scopes'.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn referenced_blobs(
        &self,
        after: Option<&Hash>,
        limit: usize,
    ) -> Result<Vec<BlobRef>, StoreError>;

    /// Every scope that holds records or watermarks, in order.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn scopes(&self) -> Result<Vec<Scope>, StoreError>;

    /// The persisted clock time.
    ///
    /// # Errors
    /// A backend failure.
    fn clock(&self) -> Result<u64, StoreError>;

    /// The purge floor of every scope that has one (NTP64 times, never 0): the newest
    /// purged tombstone's time (see [`Batch::upserts`] for what it refuses). A scope without
    /// an entry has floor 0.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn floors(&self) -> Result<BTreeMap<Scope, u64>, StoreError>;

    /// When `peer` was last seen (NTP64), if this store recorded it: the time a round with
    /// it last raised it ([`Batch::seen`]).
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn peer_seen(&self, peer: NodeId) -> Result<Option<u64>, StoreError>;

    /// The [`Fingerprint`] of the live versions of `scope` whose `(origin, time)` lies in
    /// `range`: their count and the wrapping sum of their [`item_hash`]es.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn fingerprint(&self, scope: &Scope, range: &AuditRange) -> Result<Fingerprint, StoreError>;

    /// Points that cut the live versions of `scope` in `range` into `parts` parts of nearly
    /// equal counts: at most `parts - 1` strictly increasing points strictly inside `range`,
    /// each the `(origin, time)` of a live version, which starts the next part. With `n`
    /// versions in the range and `k = min(parts, n)`, the `i`-th point (from 1) is that of
    /// the version at position `floor(i * n / k)` (from 0): every part is non-empty, there
    /// are fewer points when the range holds fewer versions than `parts` (none for 0 or 1
    /// versions, or `parts <= 1`), and every store cuts at the same places.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn audit_split(
        &self,
        scope: &Scope,
        range: &AuditRange,
        parts: usize,
    ) -> Result<Vec<AuditPoint>, StoreError>;

    /// The live versions of `scope` in `range` as `(hlc, key)`, in `(origin, time)` order, at
    /// most `limit`.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn audit_items(
        &self,
        scope: &Scope,
        range: &AuditRange,
        limit: usize,
    ) -> Result<Vec<(Hlc, Key)>, StoreError>;

    /// The live version of `scope` with Hlc `hlc`, and its key, if any.
    ///
    /// # Errors
    /// A backend failure or undecodable row.
    fn version_at(&self, scope: &Scope, hlc: Hlc) -> Result<Option<(Key, Version)>, StoreError>;
}

/// A node's storage. See the module docs for the contract.
pub trait Store: Send + Sync {
    /// A consistent snapshot to read from.
    ///
    /// # Errors
    /// A backend failure.
    fn read(&self) -> Result<Box<dyn StoreRead + '_>, StoreError>;

    /// The node id stored at first start, storing `fresh` (durably) if there is none.
    ///
    /// # Errors
    /// A backend failure, or a stored id that does not decode.
    fn identity(&self, fresh: NodeId) -> Result<NodeId, StoreError>;

    /// Replaces the stored node id (durably): used when a node restored from a backup must
    /// write under a new identity. The old id becomes an ordinary origin.
    ///
    /// # Errors
    /// A backend failure.
    fn replace_identity(&self, id: NodeId) -> Result<(), StoreError>;

    /// The small value the engine keeps under `name` beside the data (the id a named peer
    /// is expected to answer with, the id this node had before it took a fresh one), if any.
    ///
    /// # Errors
    /// A backend failure.
    fn note(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores `value` under `name` (`None`: removes it), durably.
    ///
    /// # Errors
    /// A backend failure; the old value then stands.
    fn set_note(&self, name: &str, value: Option<&[u8]>) -> Result<(), StoreError>;

    /// Applies `batch` atomically. See the module docs.
    ///
    /// # Errors
    /// A backend failure; nothing of the batch is then applied.
    fn commit(&self, batch: &Batch) -> Result<BatchReport, StoreError>;

    /// Makes every earlier commit durable.
    ///
    /// # Errors
    /// A backend failure.
    fn flush(&self) -> Result<(), StoreError>;
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn read(&self) -> Result<Box<dyn StoreRead + '_>, StoreError> {
        (**self).read()
    }

    fn identity(&self, fresh: NodeId) -> Result<NodeId, StoreError> {
        (**self).identity(fresh)
    }

    fn replace_identity(&self, id: NodeId) -> Result<(), StoreError> {
        (**self).replace_identity(id)
    }

    fn note(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).note(name)
    }

    fn set_note(&self, name: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        (**self).set_note(name, value)
    }

    fn commit(&self, batch: &Batch) -> Result<BatchReport, StoreError> {
        (**self).commit(batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        (**self).flush()
    }
}

/// What a store keeps for one blob hash and one scope: the row of `blob-refs-v2` in redb.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ScopeRefs {
    /// The number of stored versions of the scope that reference the hash; never 0 (no
    /// reference, no entry).
    count: u64,
    /// The blob's size, as the reference counted last gave it.
    size: u64,
}

impl ScopeRefs {
    /// The references after adding `delta` to `current` for `blob`; `None` when none is
    /// left (the entry goes). Both stores keep their entries with this one rule, so they
    /// agree on sizes too: counting up takes the size of the reference counted (honest
    /// references to one hash agree on it), counting down keeps the entry's.
    fn adjusted(current: Option<ScopeRefs>, blob: &BlobRef, delta: i64) -> Option<ScopeRefs> {
        let count = current.map_or(0, |r| r.count).saturating_add_signed(delta);
        let size = match current {
            Some(r) if delta <= 0 => r.size,
            _ => blob.size,
        };
        (count > 0).then_some(ScopeRefs { count, size })
    }
}

/// The row-level operations a write transaction offers; [`apply_batch`] is written once
/// against them so both stores share the merge, index and watermark logic.
trait TxnOps {
    /// Makes `version` the key's stored version and returns the one it replaced: one lookup
    /// for the merge and the write, where a read then a write would walk the tree twice.
    /// The version's row itself is written by `insert_live`.
    fn swap_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<Option<Version>, StoreError>;
    /// Removes the key's stored version from the key index and returns it (its row in the
    /// live-version index stays until `remove_live`).
    fn take_record(&mut self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError>;
    /// Whether the key has a stored version.
    fn has_record(&mut self, scope: &Scope, key: &Key) -> Result<bool, StoreError>;
    /// The scope's purge floor (0: none).
    fn get_floor(&mut self, scope: &Scope) -> Result<u64, StoreError>;
    /// Sets the scope's purge floor (never lowered: the caller passes a higher one).
    fn set_floor(&mut self, scope: &Scope, time: u64) -> Result<(), StoreError>;
    /// Drops `scope`'s mark of `origin`.
    fn remove_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<(), StoreError>;
    /// Drops everything recorded of `peer`.
    fn forget_peer(&mut self, peer: NodeId) -> Result<(), StoreError>;
    /// Raises `peer`'s last-seen time to `time`.
    fn raise_seen(&mut self, peer: NodeId, time: u64) -> Result<(), StoreError>;
    /// Makes `version`, still stored, the key's version again (undoes a `swap_record`).
    fn put_record(&mut self, scope: &Scope, key: &Key, version: &Version)
        -> Result<(), StoreError>;
    /// The key whose stored version has this Hlc, if any.
    fn live_key_at(&mut self, scope: &Scope, hlc: Hlc) -> Result<Option<Key>, StoreError>;
    /// Removes `key`'s version with this Hlc from the live-version index.
    fn remove_live(&mut self, scope: &Scope, key: &Key, hlc: Hlc) -> Result<(), StoreError>;
    /// Stores `version` of `key` at its place in the live-version index.
    fn insert_live(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError>;
    fn get_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<Option<Hlc>, StoreError>;
    fn set_mark(&mut self, scope: &Scope, mark: Hlc) -> Result<(), StoreError>;
    fn replace_peer_marks(&mut self, knowledge: &PeerKnowledge) -> Result<(), StoreError>;
    fn raise_clock(&mut self, time: u64) -> Result<(), StoreError>;
    /// The time every issued timestamp must exceed, and the store's identity, as this
    /// transaction sees them (see [`Batch::issued`]).
    fn issued(&mut self) -> Result<(u64, Option<NodeId>), StoreError>;
    /// Sets the time issued timestamps must exceed (the caller passes one above the stored
    /// time, which it read with [`TxnOps::issued`] in this transaction).
    fn set_issued(&mut self, time: u64) -> Result<(), StoreError>;
    /// Adds `delta` to the number of `scope`'s stored versions that reference `blob` (see
    /// [`ScopeRefs::adjusted`]) and returns the blob's total count over all scopes after the
    /// change: 0 means no stored version references it any more.
    fn adjust_blob_refs(
        &mut self,
        scope: &Scope,
        blob: &BlobRef,
        delta: i64,
    ) -> Result<u64, StoreError>;
    /// Brings whatever a store keeps about the live-version index in summary (the redb
    /// store's audit chunks) up to date with the upserts applied so far.
    fn finish_upserts(&mut self) -> Result<(), StoreError>;
}

/// IMPORTANT: callers run this inside one transaction; upserts and the watermark advances
/// that cover them commit together or not at all.
fn apply_batch(ops: &mut impl TxnOps, batch: &Batch) -> Result<BatchReport, StoreError> {
    if let Some(issued) = batch.issued {
        // IMPORTANT: checked under the commit's lock, before anything is written: another
        // writer sharing the store (a hub process) may have committed this time, or a later
        // one of this origin, since this writer read its clock.
        let (before, identity) = ops.issued()?;
        if identity != Some(issued.origin()) || before >= issued.time() {
            return Err(StoreError::IssuedBehind {
                issued,
                before,
                identity,
            });
        }
        // Above `before`, which is below `issued`.
        ops.set_issued(batch.clock.max(issued.time()))?;
    }
    let mut report = BatchReport::default();
    let mut floors: BTreeMap<&Scope, u64> = BTreeMap::new();
    for (scope, time) in &batch.floors {
        let floor = ops.get_floor(scope)?;
        if *time > floor {
            ops.set_floor(scope, *time)?;
        }
    }
    for (scope, key, hlc) in &batch.removals {
        let Some(stored) = ops.take_record(scope, key)? else {
            continue;
        };
        if stored.hlc != *hlc {
            ops.put_record(scope, key, &stored)?;
            continue;
        }
        ops.remove_live(scope, key, stored.hlc)?;
        if let Some(b) = stored.blob() {
            if ops.adjust_blob_refs(scope, b, -1)? == 0 {
                report.unreferenced.push(b.hash);
            }
        }
        report.removed += 1;
    }
    for (i, (scope, key, version)) in batch.upserts.iter().enumerate() {
        let floor = match floors.get(scope) {
            Some(f) => *f,
            None => {
                let f = ops.get_floor(scope)?;
                floors.insert(scope, f);
                f
            }
        };
        // IMPORTANT: a version at or below the floor of a key we hold no version of is
        // refused, in the same transaction as the floor it is checked against. If our mark
        // for its origin covers it, by the watermark invariant we held it or a newer version
        // of the key, and only a purge removes a stored version (a tombstone, at or below the
        // floor): taking it would resurrect a deleted record. If our mark does not cover it
        // (or we keep none for its origin), we never had it: it was written before the floor,
        // hence before the retention, by a node whose stream we have not heard past it, and
        // we cannot tell whether it is the older write of a key whose delete we purged (the
        // purge waited for the peers we knew, not for one retired or never met). It is
        // refused too, and reported: a resurrection cannot be undone, a reported refusal can.
        if version.hlc.time() <= floor && !ops.has_record(scope, key)? {
            report.refused.push(i);
            continue;
        }
        // Hlcs are unique, so a stored version at this Hlc is this very version (delivered
        // again) or, under another key, proof that one of the two is forged or corrupt: the
        // incoming one is refused rather than let it displace a stored version.
        if let Some(holder) = ops.live_key_at(scope, version.hlc)? {
            if holder != *key {
                tracing::warn!(
                    %scope,
                    hlc = %version.hlc,
                    "refused a version whose Hlc another key's stored version holds"
                );
            }
            continue;
        }
        // Most incoming versions win (new keys, newer writes), so write first and put the
        // stored version back in the rare case it wins.
        let stored = ops.swap_record(scope, key, version)?;
        if !merge::supersedes(version, stored.as_ref()) {
            if let Some(old) = &stored {
                ops.put_record(scope, key, old)?;
            }
            continue;
        }
        // Counted up before the replaced version is counted down: a version replaced by one
        // with the same blob never takes its count through zero, so it is not reported.
        if let Some(b) = version.blob() {
            ops.adjust_blob_refs(scope, b, 1)?;
        }
        if let Some(old) = stored {
            ops.remove_live(scope, key, old.hlc)?;
            if let Some(b) = old.blob() {
                if ops.adjust_blob_refs(scope, b, -1)? == 0 {
                    report.unreferenced.push(b.hash);
                }
            }
        }
        ops.insert_live(scope, key, version)?;
        report.applied.push(i);
    }
    // IMPORTANT: the fingerprint summaries move in the same transaction as the versions they
    // sum, so no commit leaves a range whose fingerprint differs from its items'.
    ops.finish_upserts()?;
    for adv in &batch.advances {
        let mark = ops.get_mark(&adv.scope, adv.top.origin())?;
        let continues = adv.base <= mark;
        if continues && mark < Some(adv.top) {
            ops.set_mark(&adv.scope, adv.top)?;
        }
        report.advanced.push(continues);
    }
    for (scope, origin) in &batch.retire {
        ops.remove_mark(scope, *origin)?;
    }
    if let Some(knowledge) = &batch.peer {
        ops.replace_peer_marks(knowledge)?;
    }
    for peer in &batch.forget {
        ops.forget_peer(*peer)?;
    }
    for (peer, time) in &batch.seen {
        ops.raise_seen(*peer, *time)?;
    }
    ops.raise_clock(batch.clock)?;
    Ok(report)
}
