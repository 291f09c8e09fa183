//! Upkeep of the audit chunks (`audit-chunks-v1`): the fingerprints of runs of each origin's
//! stored versions, kept exact in the same write transaction as `versions-v2`.
//!
//! The invariant, after every commit: for every `(scope, origin)`, the chunk rows of that
//! origin are disjoint runs `[first, last]` of its stored versions (`first` and `last` are
//! times of stored versions), every stored version lies in one of them, and each row's
//! count and sum are the fold of [`item_hash`](crate::store::item_hash) over its versions.
//! A chunk is never empty, and one that grows past the store's bound `B` is cut.
//!
//! A batch does not touch the table per version: [`Changes`] gathers the items the batch
//! added and removed, and [`Changes::apply`] settles each touched chunk once at the end of
//! the batch, before the transaction commits. A chunk that ends up above `B` items is cut:
//! when the new items all follow the chunk's old ones (a sync delivers each origin's versions
//! in time order) the pieces are summed from the hashes in hand, the old part filled up to
//! `B` and the new items in runs of `B`; otherwise its versions are read back and cut into
//! pieces of `B/2` to `B`. A chunk that falls below `B/2` is merged into a neighbour when the
//! two fit in `B`, so removals do not leave a trail of tiny chunks.
//!
//! One file over 600 lines because the upkeep is one algorithm (gather a commit's changes per
//! chunk, then split, refill or merge chunks in the same transaction) whose halves share the
//! chunk row format.

use std::ops::{Bound, Range};

use redb::{ReadableDatabase, ReadableTable, Table};

use super::tables::{decode_chunk, encode_chunk, origin_key, split_row, Chunk, CHUNKS, VERSIONS};
use super::RedbStore;
use crate::error::StoreError;
use crate::hlc::NodeId;
use crate::record::Scope;
use crate::store::audit::{item_hash_parts, Fingerprint};

type Bytes = &'static [u8];

fn corrupt() -> StoreError {
    StoreError::Corrupt {
        what: "audit chunk",
    }
}

/// One item added (`count` 1) or removed (`count` -1) at `time`; after [`Group::settle`],
/// the net change at that time (a count of 0 with a non-zero sum: another key's version
/// took the time).
#[derive(Clone, Copy, Debug)]
struct Change {
    time: u64,
    count: i64,
    sum: u128,
}

/// The changes to one origin's items in one scope.
struct Group {
    scope: Scope,
    origin: NodeId,
    changes: Vec<Change>,
}

/// The items a batch added to and removed from the live-version index, not yet in the chunk
/// table.
#[derive(Default)]
pub(super) struct Changes {
    groups: Vec<Group>,
    /// The group changed last: a batch is mostly runs of one origin.
    recent: usize,
}

impl Changes {
    /// Records that the item `hash` at `(origin, time)` joined the live set of `scope`.
    pub(super) fn insert(&mut self, scope: &Scope, origin: NodeId, time: u64, hash: u128) {
        self.push(
            scope,
            origin,
            Change {
                time,
                count: 1,
                sum: hash,
            },
        );
    }

    /// Records that the item `hash` at `(origin, time)` left the live set of `scope`.
    pub(super) fn remove(&mut self, scope: &Scope, origin: NodeId, time: u64, hash: u128) {
        self.push(
            scope,
            origin,
            Change {
                time,
                count: -1,
                sum: hash.wrapping_neg(),
            },
        );
    }

    fn push(&mut self, scope: &Scope, origin: NodeId, change: Change) {
        let hit = |g: &Group| g.origin == origin && g.scope == *scope;
        if !self.groups.get(self.recent).is_some_and(hit) {
            self.recent = match self.groups.iter().position(hit) {
                Some(i) => i,
                None => {
                    self.groups.push(Group {
                        scope: scope.clone(),
                        origin,
                        changes: Vec::new(),
                    });
                    self.groups.len() - 1
                }
            };
        }
        self.groups[self.recent].changes.push(change);
    }

    /// Settles every recorded change into `chunks` (whose bound is `bound` items), reading
    /// `versions` as it stands after the batch; leaves `self` empty.
    ///
    /// IMPORTANT: runs inside the batch's transaction, after its last change to `versions`.
    pub(super) fn apply(
        &mut self,
        chunks: &mut Table<'_, Bytes, Bytes>,
        versions: &impl ReadableTable<Bytes, Bytes>,
        bound: u64,
    ) -> Result<(), StoreError> {
        self.recent = 0;
        for mut group in std::mem::take(&mut self.groups) {
            group.settle()?;
            let mut upkeep = Upkeep {
                chunks: &mut *chunks,
                versions,
                prefix: origin_key(&group.scope, group.origin),
                bound: bound.max(1),
            };
            upkeep.apply(&group.changes)?;
        }
        Ok(())
    }
}

impl Group {
    /// Sorts the changes by time and nets those at the same time (an item added and removed
    /// in one batch leaves nothing).
    fn settle(&mut self) -> Result<(), StoreError> {
        // Stable and run-aware: a page in time order sorts in one pass.
        self.changes.sort_by_key(|c| c.time);
        let mut out: Vec<Change> = Vec::with_capacity(self.changes.len());
        for c in self.changes.drain(..) {
            match out.last_mut() {
                Some(prev) if prev.time == c.time => {
                    prev.count += c.count;
                    prev.sum = prev.sum.wrapping_add(c.sum);
                }
                _ => out.push(c),
            }
        }
        out.retain(|c| c.count != 0 || c.sum != 0);
        // One version per Hlc: at most one item comes or goes at a time.
        if out.iter().any(|c| c.count.abs() > 1) {
            return Err(corrupt());
        }
        self.changes = out;
        Ok(())
    }
}

/// The chunk a change belongs to, and the times its chunk answers for.
#[derive(Clone, Copy, Debug)]
struct Owner {
    /// The chunk as stored before the batch; `None` when the origin has no chunk yet.
    old: Option<Chunk>,
    /// The chunk answers for the times `lo..=hi`: from its `first` (from 0 for the origin's
    /// first chunk) to just before the next chunk's `first`.
    lo: u64,
    hi: u64,
}

/// One origin's chunk rows, being brought up to date.
struct Upkeep<'a, 't, V> {
    chunks: &'a mut Table<'t, Bytes, Bytes>,
    versions: &'a V,
    /// `scope | origin`: every key of this origin's chunks and versions starts with it.
    prefix: Vec<u8>,
    bound: u64,
}

impl<V: ReadableTable<Bytes, Bytes>> Upkeep<'_, '_, V> {
    fn key(&self, time: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + 8);
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&time.to_be_bytes());
        out
    }

    /// The chunk whose `first` is the greatest below `time` (strictly), in this origin.
    fn chunk_before(&self, time: u64) -> Result<Option<Chunk>, StoreError> {
        let (lo, hi) = (self.key(0), self.key(time));
        let row = self
            .chunks
            .range::<&[u8]>((
                Bound::Included(lo.as_slice()),
                Bound::Excluded(hi.as_slice()),
            ))?
            .next_back();
        chunk_of(row)
    }

    /// The chunk whose `first` is the least above `time` (strictly), in this origin.
    fn chunk_after(&self, time: u64) -> Result<Option<Chunk>, StoreError> {
        let (lo, hi) = (self.key(time), self.key(u64::MAX));
        let row = self
            .chunks
            .range::<&[u8]>((
                Bound::Excluded(lo.as_slice()),
                Bound::Included(hi.as_slice()),
            ))?
            .next();
        chunk_of(row)
    }

    /// The chunk whose `first` is `time`.
    fn chunk_at(&self, time: u64) -> Result<Option<Chunk>, StoreError> {
        match self.chunks.get(self.key(time).as_slice())? {
            Some(v) => Ok(Some(decode_chunk(&self.key(time), v.value())?)),
            None => Ok(None),
        }
    }

    /// The chunk that answers for `time`.
    fn owner(&self, time: u64) -> Result<Owner, StoreError> {
        let at_or_below = match self.chunk_at(time)? {
            Some(c) => Some(c),
            None => self.chunk_before(time)?,
        };
        let (old, lo) = match at_or_below {
            Some(c) => (Some(c), c.first),
            // Below the origin's first chunk: that chunk answers for it.
            None => (self.chunk_after(time)?, 0),
        };
        let hi = match old {
            Some(c) => match self.chunk_after(c.first)? {
                Some(next) => next.first.checked_sub(1).ok_or_else(corrupt)?,
                None => u64::MAX,
            },
            None => u64::MAX,
        };
        Ok(Owner { old, lo, hi })
    }

    fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        // Which chunk each change belongs to, read before any row is rewritten.
        let mut plan: Vec<(Owner, Range<usize>)> = Vec::new();
        let mut i = 0;
        while let Some(c) = changes.get(i) {
            let owner = self.owner(c.time)?;
            let end = i + changes[i..].partition_point(|c| c.time <= owner.hi);
            plan.push((owner, i..end));
            i = end;
        }
        let touched: Vec<u64> = plan
            .iter()
            .filter_map(|(o, _)| o.old.map(|c| c.first))
            .collect();
        // In time order, so a chunk's predecessor is final when it is looked at.
        for (owner, range) in plan {
            self.settle(owner, &changes[range], &touched)?;
        }
        Ok(())
    }

    fn put(&mut self, chunk: &Chunk) -> Result<(), StoreError> {
        self.chunks.insert(
            self.key(chunk.first).as_slice(),
            encode_chunk(chunk).as_slice(),
        )?;
        Ok(())
    }

    fn delete(&mut self, first: u64) -> Result<(), StoreError> {
        self.chunks.remove(self.key(first).as_slice())?;
        Ok(())
    }

    /// Brings one chunk up to date with its changes (sorted by time, netted).
    fn settle(
        &mut self,
        owner: Owner,
        changes: &[Change],
        touched: &[u64],
    ) -> Result<(), StoreError> {
        let added: Vec<(u64, u128)> = changes
            .iter()
            .filter(|c| c.count == 1)
            .map(|c| (c.time, c.sum))
            .collect();
        let Some(old) = owner.old else {
            // The origin's first items: nothing can have left.
            if added.len() != changes.len() {
                return Err(corrupt());
            }
            return self.put_runs(None, &added);
        };
        self.delete(old.first)?;
        // What is left of the old items, then with the added ones.
        let mut kept = old.fp;
        for c in changes.iter().filter(|c| c.count != 1) {
            kept.count = kept.count.checked_add_signed(c.count).ok_or_else(corrupt)?;
            kept.sum = kept.sum.wrapping_add(c.sum);
        }
        let mut fp = kept;
        for &(_, hash) in &added {
            fp.add(hash);
        }
        if fp.count == 0 {
            return Ok(());
        }
        let gone = |t: u64| {
            changes
                .binary_search_by_key(&t, |c| c.time)
                .is_ok_and(|i| changes[i].count == -1)
        };
        // The versions in `owner.lo..=owner.hi` are this chunk's, as `versions` now holds
        // them: a seek finds a new end when an old one left.
        let first = match (gone(old.first), added.first()) {
            (false, Some(&(t, _))) => old.first.min(t),
            (false, None) => old.first,
            (true, _) => self.first_stored(owner.lo, owner.hi)?,
        };
        let appended = added.first().is_some_and(|&(t, _)| t > old.last);
        if fp.count > self.bound && appended && kept.count <= self.bound {
            // Every added item follows every old one: sum the pieces from the hashes in hand.
            let head = match kept.count {
                0 => None,
                _ => Some(Chunk {
                    first,
                    last: match gone(old.last) {
                        false => old.last,
                        true => self.last_stored(owner.lo, old.last)?,
                    },
                    fp: kept,
                }),
            };
            return self.put_runs(head, &added);
        }
        let last = match (gone(old.last), added.last()) {
            (false, Some(&(t, _))) => old.last.max(t),
            (false, None) => old.last,
            (true, _) => self.last_stored(owner.lo, owner.hi)?,
        };
        let chunk = Chunk { first, last, fp };
        if fp.count > self.bound {
            return self.cut(&chunk);
        }
        self.put(&chunk)?;
        if fp.count < self.bound / 2 {
            self.merge(chunk, touched)?;
        }
        Ok(())
    }

    /// Writes `head` filled up to the bound with the first of `added` (sorted, all after
    /// `head`'s items), then the rest of `added` in runs of the bound.
    fn put_runs(&mut self, head: Option<Chunk>, added: &[(u64, u128)]) -> Result<(), StoreError> {
        let run = usize::try_from(self.bound).unwrap_or(usize::MAX);
        let mut rest = added;
        if let Some(mut head) = head {
            let room = usize::try_from(self.bound.saturating_sub(head.fp.count)).unwrap_or(run);
            let (fill, after) = rest.split_at(room.min(rest.len()));
            for &(time, hash) in fill {
                head.fp.add(hash);
                head.last = time;
            }
            self.put(&head)?;
            rest = after;
        }
        for items in rest.chunks(run) {
            self.put(&summed(items))?;
        }
        Ok(())
    }

    /// Cuts an oversized chunk into pieces of `bound / 2` to `bound` items, reading its
    /// versions back; they must add up to the chunk's fingerprint.
    fn cut(&mut self, chunk: &Chunk) -> Result<(), StoreError> {
        let (lo, hi) = (self.key(chunk.first), self.key(chunk.last));
        let origin = self.origin_bytes()?;
        let mut items = Vec::new();
        for row in self.versions.range(lo.as_slice()..=hi.as_slice())? {
            let (k, v) = row?;
            let time = key_time(k.value())?;
            let (key, _) = split_row(v.value())?;
            items.push((time, item_hash_parts(key, time, &origin)));
        }
        if items.is_empty() || summed(&items) != *chunk {
            return Err(corrupt());
        }
        let count = items.len();
        let pieces =
            (2 * count / usize::try_from(self.bound).unwrap_or(usize::MAX)).clamp(2, count.max(2));
        for i in 0..pieces {
            let piece = &items[i * count / pieces..(i + 1) * count / pieces];
            if !piece.is_empty() {
                self.put(&summed(piece))?;
            }
        }
        Ok(())
    }

    /// Merges a small chunk into its predecessor, or its successor if this batch did not
    /// touch it (a touched one is settled later from rows read before), when they fit.
    fn merge(&mut self, chunk: Chunk, touched: &[u64]) -> Result<(), StoreError> {
        let fits = |other: &Chunk| other.fp.count.saturating_add(chunk.fp.count) <= self.bound;
        if let Some(prev) = self.chunk_before(chunk.first)?.filter(fits) {
            self.delete(chunk.first)?;
            return self.put(&Chunk {
                first: prev.first,
                last: chunk.last,
                fp: prev.fp.combine(chunk.fp),
            });
        }
        let next = self.chunk_after(chunk.first)?;
        if let Some(next) = next.filter(|n| fits(n) && touched.binary_search(&n.first).is_err()) {
            self.delete(next.first)?;
            return self.put(&Chunk {
                first: chunk.first,
                last: next.last,
                fp: chunk.fp.combine(next.fp),
            });
        }
        Ok(())
    }

    /// The time of the first stored version of this origin in `lo..=hi`.
    fn first_stored(&self, lo: u64, hi: u64) -> Result<u64, StoreError> {
        let (lo, hi) = (self.key(lo), self.key(hi));
        match self.versions.range(lo.as_slice()..=hi.as_slice())?.next() {
            Some(row) => key_time(row?.0.value()),
            None => Err(corrupt()),
        }
    }

    /// The time of the last stored version of this origin in `lo..=hi`.
    fn last_stored(&self, lo: u64, hi: u64) -> Result<u64, StoreError> {
        let (lo, hi) = (self.key(lo), self.key(hi));
        match self
            .versions
            .range(lo.as_slice()..=hi.as_slice())?
            .next_back()
        {
            Some(row) => key_time(row?.0.value()),
            None => Err(corrupt()),
        }
    }

    fn origin_bytes(&self) -> Result<[u8; 16], StoreError> {
        let at = self.prefix.len().checked_sub(16).ok_or_else(corrupt)?;
        self.prefix[at..].try_into().map_err(|_| corrupt())
    }
}

type Row<'a> =
    Result<(redb::AccessGuard<'a, Bytes>, redb::AccessGuard<'a, Bytes>), redb::StorageError>;

/// The chunk in a row of the chunk table, if there is one.
fn chunk_of(row: Option<Row<'_>>) -> Result<Option<Chunk>, StoreError> {
    match row {
        Some(row) => {
            let (k, v) = row?;
            Ok(Some(decode_chunk(k.value(), v.value())?))
        }
        None => Ok(None),
    }
}

/// Builds the chunk table, empty, from `versions` (at migration): each origin's versions
/// in runs of `bound`, as an initial sync in time order leaves them.
pub(super) fn build(
    chunks: &mut Table<'_, Bytes, Bytes>,
    versions: &impl ReadableTable<Bytes, Bytes>,
    bound: u64,
) -> Result<(), StoreError> {
    let bound = bound.max(1);
    // The chunk being summed, and the `scope | origin` prefix of its keys.
    let mut open: Option<(Vec<u8>, Chunk)> = None;
    for row in versions.iter()? {
        let (k, v) = row?;
        let k = k.value();
        let time = key_time(k)?;
        let prefix = &k[..k.len() - 8];
        let origin: [u8; 16] = prefix
            .len()
            .checked_sub(16)
            .and_then(|at| prefix[at..].try_into().ok())
            .ok_or_else(corrupt)?;
        let (key, _) = split_row(v.value())?;
        let hash = item_hash_parts(key, time, &origin);
        match &mut open {
            Some((p, chunk)) if p.as_slice() == prefix && chunk.fp.count < bound => {
                chunk.fp.add(hash);
                chunk.last = time;
            }
            _ => {
                if let Some((p, chunk)) = open.take() {
                    put_row(chunks, &p, &chunk)?;
                }
                let mut fp = Fingerprint::EMPTY;
                fp.add(hash);
                open = Some((
                    prefix.to_vec(),
                    Chunk {
                        first: time,
                        last: time,
                        fp,
                    },
                ));
            }
        }
    }
    if let Some((p, chunk)) = open {
        put_row(chunks, &p, &chunk)?;
    }
    Ok(())
}

fn put_row(
    chunks: &mut Table<'_, Bytes, Bytes>,
    prefix: &[u8],
    chunk: &Chunk,
) -> Result<(), StoreError> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&chunk.first.to_be_bytes());
    chunks.insert(key.as_slice(), encode_chunk(chunk).as_slice())?;
    Ok(())
}

/// The chunk of `items` (sorted, non-empty).
fn summed(items: &[(u64, u128)]) -> Chunk {
    let mut chunk = Chunk {
        first: items.first().map_or(0, |i| i.0),
        last: 0,
        fp: Fingerprint::EMPTY,
    };
    for &(time, hash) in items {
        chunk.fp.add(hash);
        chunk.last = time;
    }
    chunk
}

/// The time at the end of a `scope | origin | time BE` key.
fn key_time(key: &[u8]) -> Result<u64, StoreError> {
    let at = key.len().checked_sub(8).ok_or_else(corrupt)?;
    let bytes: [u8; 8] = key[at..].try_into().map_err(|_| corrupt())?;
    Ok(u64::from_be_bytes(bytes))
}

impl RedbStore {
    /// Checks the audit chunk invariant (see the module docs) against `versions-v2`, row by
    /// row, through the open group if there is one. Returns the number of chunks and the
    /// most versions one chunk holds. For tests: it reads the whole store.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] where the invariant does not hold; a backend failure.
    #[doc(hidden)]
    pub fn check_audit_chunks(&self) -> Result<(u64, u64), StoreError> {
        let writes = self.lock_writes()?;
        if let Some(txn) = &writes.group {
            return check(&txn.open_table(CHUNKS)?, &txn.open_table(VERSIONS)?);
        }
        let txn = writes.db()?.begin_read()?;
        drop(writes);
        check(&txn.open_table(CHUNKS)?, &txn.open_table(VERSIONS)?)
    }
}

fn check(
    chunks: &impl ReadableTable<Bytes, Bytes>,
    versions: &impl ReadableTable<Bytes, Bytes>,
) -> Result<(u64, u64), StoreError> {
    let (mut count, mut largest, mut covered) = (0u64, 0u64, 0u64);
    let mut prev: Option<(Vec<u8>, u64)> = None;
    for row in chunks.iter()? {
        let (k, v) = row?;
        let k = k.value();
        let chunk = decode_chunk(k, v.value())?;
        let prefix = &k[..k.len() - 8];
        if prev
            .as_ref()
            .is_some_and(|(p, last)| p.as_slice() == prefix && chunk.first <= *last)
        {
            return Err(corrupt());
        }
        let origin: [u8; 16] = prefix
            .len()
            .checked_sub(16)
            .and_then(|at| prefix[at..].try_into().ok())
            .ok_or_else(corrupt)?;
        let mut lo = prefix.to_vec();
        lo.extend_from_slice(&chunk.first.to_be_bytes());
        let mut hi = prefix.to_vec();
        hi.extend_from_slice(&chunk.last.to_be_bytes());
        let mut items = Vec::new();
        for row in versions.range(lo.as_slice()..=hi.as_slice())? {
            let (k, v) = row?;
            let time = key_time(k.value())?;
            items.push((
                time,
                item_hash_parts(split_row(v.value())?.0, time, &origin),
            ));
        }
        let found = summed(&items);
        if items.is_empty() || found != chunk {
            return Err(corrupt());
        }
        count += 1;
        largest = largest.max(chunk.fp.count);
        covered += chunk.fp.count;
        prev = Some((prefix.to_vec(), chunk.last));
    }
    let mut stored = 0u64;
    for row in versions.iter()? {
        row?;
        stored += 1;
    }
    if stored != covered {
        return Err(corrupt());
    }
    Ok((count, largest))
}
