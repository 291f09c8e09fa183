//! The in-memory store: the test double, and the model the redb store is checked against.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::audit::{item_hash, split_positions, AuditPoint, AuditRange, Fingerprint};
use super::{
    apply_batch, Batch, BatchReport, KeyRange, PeerKnowledge, ScopeRefs, Store, StoreRead, TxnOps,
};
use crate::error::StoreError;
use crate::hash::Hash;
use crate::hlc::{Hlc, NodeId};
use crate::record::ScopeFilter;
use crate::record::{BlobRef, Key, Scope, Version};
use crate::watermark::ScopedWatermarks;

#[derive(Default, Clone)]
struct State {
    identity: Option<NodeId>,
    clock: u64,
    /// The time issued timestamps must exceed (see `Batch::issued`).
    issued: u64,
    records: BTreeMap<(Scope, Key), Version>,
    /// (scope, origin, time) -> key: the live-version index.
    live: BTreeMap<(Scope, NodeId, u64), Key>,
    marks: ScopedWatermarks,
    peers: BTreeMap<NodeId, ScopedWatermarks>,
    /// hash -> scope -> the scope's references to it: the model of `blob-refs-v2`. No
    /// empty inner map, no zero count.
    blob_refs: BTreeMap<Hash, BTreeMap<Scope, ScopeRefs>>,
    /// scope -> purge floor; no zero entry.
    floors: BTreeMap<Scope, u64>,
    /// peer -> last seen; only peers in `peers`.
    seen: BTreeMap<NodeId, u64>,
    /// The engine's notes (`Store::note`).
    notes: BTreeMap<String, Vec<u8>>,
}

/// A store held in memory. Commits are atomic (applied under one write lock by infallible
/// operations); durability levels are accepted and ignored.
#[derive(Default)]
pub struct MemStore {
    /// Readers clone the `Arc` (a snapshot); a commit copies the state only if a snapshot
    /// is still alive (`Arc::make_mut`), so snapshots never block commits.
    state: RwLock<Arc<State>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A deep copy of the store as it is now (a "backup" for restore tests).
    pub fn duplicate(&self) -> MemStore {
        MemStore {
            state: RwLock::new(Arc::new(State::clone(&self.read_lock()))),
        }
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Arc<State>> {
        // The state's operations do not panic on any input, so a poisoned lock only means a
        // caller panicked elsewhere while holding a guard; the state itself is consistent.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Arc<State>> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

struct Reader(Arc<State>);

/// A blob's reference count over all scopes.
fn total(scopes: &BTreeMap<Scope, ScopeRefs>) -> u64 {
    scopes
        .values()
        .fold(0u64, |sum, r| sum.saturating_add(r.count))
}

/// The least node id in byte order (the all-zero id is not an id).
fn least_id() -> NodeId {
    let mut bytes = [0u8; 16];
    bytes[15] = 1;
    NodeId::from_bytes(bytes).expect("a non-zero id")
}

impl State {
    /// The live-index entries of `scope` in `range`, in `(origin, time)` order: the audit
    /// set, read straight from the index (the model keeps no summaries).
    fn audit_set<'a>(
        &'a self,
        scope: &'a Scope,
        range: &AuditRange,
    ) -> impl Iterator<Item = (AuditPoint, &'a Key)> + 'a {
        let lo = range.lo.unwrap_or(AuditPoint {
            origin: least_id(),
            time: 0,
        });
        // A range whose end is not above its start is empty: end it at its start (a
        // BTreeMap range that ends before it starts panics).
        let upper = match range.hi {
            Some(hi) => Bound::Excluded((scope.clone(), hi.origin, hi.time).max((
                scope.clone(),
                lo.origin,
                lo.time,
            ))),
            None => Bound::Unbounded,
        };
        let lower = Bound::Included((scope.clone(), lo.origin, lo.time));
        self.live
            .range((lower, upper))
            .take_while(move |((s, _, _), _)| s == scope)
            .map(|((_, origin, time), key)| {
                (
                    AuditPoint {
                        origin: *origin,
                        time: *time,
                    },
                    key,
                )
            })
    }
}

impl StoreRead for Reader {
    fn get(&self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        Ok(self.0.records.get(&(scope.clone(), key.clone())).cloned())
    }

    fn scan(&self, scope: &Scope, range: &KeyRange) -> Result<Vec<(Key, Version)>, StoreError> {
        let lower = match &range.after {
            Some(k) => Bound::Excluded((scope.clone(), k.clone())),
            None => Bound::Included((
                scope.clone(),
                Key::new(vec![0u8]).expect("one byte is a valid key"),
            )),
        };
        Ok(self
            .0
            .records
            .range((lower, Bound::Unbounded))
            .take_while(|((s, _), _)| s == scope)
            .filter(|((_, k), _)| k.as_bytes().starts_with(&range.prefix))
            .take(range.limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn watermarks(&self) -> Result<ScopedWatermarks, StoreError> {
        Ok(self.0.marks.clone())
    }

    fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>, StoreError> {
        Ok(self.0.peers.get(&peer).cloned())
    }

    fn peers(&self) -> Result<Vec<NodeId>, StoreError> {
        Ok(self.0.peers.keys().copied().collect())
    }

    fn live_range(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        limit: usize,
    ) -> Result<Vec<(Key, Version)>, StoreError> {
        if after.is_some_and(|a| a >= upto) {
            return Ok(Vec::new());
        }
        let lower = match after {
            Some(a) => Bound::Excluded((scope.clone(), origin, a.time())),
            None => Bound::Included((scope.clone(), origin, 0)),
        };
        let upper = Bound::Included((scope.clone(), origin, upto.time()));
        let mut out = Vec::new();
        for (_, key) in self.0.live.range((lower, upper)).take(limit) {
            let v = self
                .0
                .records
                .get(&(scope.clone(), key.clone()))
                .ok_or(StoreError::Corrupt { what: "live index" })?;
            out.push((key.clone(), v.clone()));
        }
        Ok(out)
    }

    fn live_count(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        cap: u64,
    ) -> Result<u64, StoreError> {
        if after.is_some_and(|a| a >= upto) {
            return Ok(0);
        }
        let lower = match after {
            Some(a) => Bound::Excluded((scope.clone(), origin, a.time())),
            None => Bound::Included((scope.clone(), origin, 0)),
        };
        let upper = Bound::Included((scope.clone(), origin, upto.time()));
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        Ok(self.0.live.range((lower, upper)).take(cap).count() as u64)
    }

    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError> {
        Ok(self.0.blob_refs.get(hash).map_or(0, total))
    }

    fn blob_scopes(&self, hash: &Hash) -> Result<Vec<Scope>, StoreError> {
        Ok(self
            .0
            .blob_refs
            .get(hash)
            .map(|scopes| scopes.keys().cloned().collect())
            .unwrap_or_default())
    }

    fn referenced_blobs(
        &self,
        after: Option<&Hash>,
        limit: usize,
    ) -> Result<Vec<BlobRef>, StoreError> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(self
            .0
            .blob_refs
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(hash, scopes)| BlobRef {
                hash: *hash,
                size: scopes.values().map(|r| r.size).max().unwrap_or(0),
            })
            .collect())
    }

    fn scopes(&self) -> Result<Vec<Scope>, StoreError> {
        let mut out: Vec<Scope> = self.0.marks.iter().map(|(s, _)| s.clone()).collect();
        let mut next = self.0.records.keys().next().map(|(s, _)| s.clone());
        while let Some(scope) = next {
            next = self
                .0
                .records
                .range((
                    Bound::Excluded((
                        scope.clone(),
                        Key::new(vec![0xff; crate::record::MAX_KEY_LEN])
                            .expect("max-length key is valid"),
                    )),
                    Bound::Unbounded,
                ))
                .next()
                .map(|((s, _), _)| s.clone());
            out.push(scope);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn clock(&self) -> Result<u64, StoreError> {
        Ok(self.0.clock)
    }

    fn floors(&self) -> Result<BTreeMap<Scope, u64>, StoreError> {
        Ok(self.0.floors.clone())
    }

    fn peer_seen(&self, peer: NodeId) -> Result<Option<u64>, StoreError> {
        Ok(self.0.seen.get(&peer).copied())
    }

    fn fingerprint(&self, scope: &Scope, range: &AuditRange) -> Result<Fingerprint, StoreError> {
        let mut f = Fingerprint::EMPTY;
        for (point, key) in self.0.audit_set(scope, range) {
            f.add(item_hash(key, point.hlc()));
        }
        Ok(f)
    }

    fn audit_split(
        &self,
        scope: &Scope,
        range: &AuditRange,
        parts: usize,
    ) -> Result<Vec<AuditPoint>, StoreError> {
        let items = self.0.audit_set(scope, range).count() as u64;
        let mut cuts = split_positions(items, parts).peekable();
        let mut out = Vec::new();
        for (at, (point, _)) in (0u64..).zip(self.0.audit_set(scope, range)) {
            if cuts.peek() == Some(&at) {
                out.push(point);
                cuts.next();
            }
        }
        Ok(out)
    }

    fn audit_items(
        &self,
        scope: &Scope,
        range: &AuditRange,
        limit: usize,
    ) -> Result<Vec<(Hlc, Key)>, StoreError> {
        Ok(self
            .0
            .audit_set(scope, range)
            .take(limit)
            .map(|(point, key)| (point.hlc(), key.clone()))
            .collect())
    }

    fn version_at(&self, scope: &Scope, hlc: Hlc) -> Result<Option<(Key, Version)>, StoreError> {
        let Some(key) = self.0.live.get(&(scope.clone(), hlc.origin(), hlc.time())) else {
            return Ok(None);
        };
        let version = self
            .0
            .records
            .get(&(scope.clone(), key.clone()))
            .ok_or(StoreError::Corrupt { what: "live index" })?;
        Ok(Some((key.clone(), version.clone())))
    }
}

impl TxnOps for State {
    fn swap_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<Option<Version>, StoreError> {
        Ok(self
            .records
            .insert((scope.clone(), key.clone()), version.clone()))
    }

    fn take_record(&mut self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        Ok(self.records.remove(&(scope.clone(), key.clone())))
    }

    fn has_record(&mut self, scope: &Scope, key: &Key) -> Result<bool, StoreError> {
        Ok(self.records.contains_key(&(scope.clone(), key.clone())))
    }

    fn get_floor(&mut self, scope: &Scope) -> Result<u64, StoreError> {
        Ok(self.floors.get(scope).copied().unwrap_or(0))
    }

    fn set_floor(&mut self, scope: &Scope, time: u64) -> Result<(), StoreError> {
        if time > 0 {
            self.floors.insert(scope.clone(), time);
        }
        Ok(())
    }

    fn remove_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<(), StoreError> {
        self.marks.remove(scope, origin);
        Ok(())
    }

    fn forget_peer(&mut self, peer: NodeId) -> Result<(), StoreError> {
        self.peers.remove(&peer);
        self.seen.remove(&peer);
        Ok(())
    }

    fn raise_seen(&mut self, peer: NodeId, time: u64) -> Result<(), StoreError> {
        // As in redb, a peer seen is a peer met.
        self.peers.entry(peer).or_default();
        if time > 0 {
            let seen = self.seen.entry(peer).or_insert(time);
            *seen = (*seen).max(time);
        }
        Ok(())
    }

    fn put_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError> {
        self.records
            .insert((scope.clone(), key.clone()), version.clone());
        Ok(())
    }

    fn live_key_at(&mut self, scope: &Scope, hlc: Hlc) -> Result<Option<Key>, StoreError> {
        Ok(self
            .live
            .get(&(scope.clone(), hlc.origin(), hlc.time()))
            .cloned())
    }

    fn remove_live(&mut self, scope: &Scope, _key: &Key, hlc: Hlc) -> Result<(), StoreError> {
        self.live.remove(&(scope.clone(), hlc.origin(), hlc.time()));
        Ok(())
    }

    fn insert_live(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError> {
        let hlc = version.hlc;
        self.live
            .insert((scope.clone(), hlc.origin(), hlc.time()), key.clone());
        Ok(())
    }

    fn get_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<Option<Hlc>, StoreError> {
        Ok(self.marks.get(scope, origin))
    }

    fn set_mark(&mut self, scope: &Scope, mark: Hlc) -> Result<(), StoreError> {
        self.marks.observe(scope, mark);
        Ok(())
    }

    fn replace_peer_marks(&mut self, k: &PeerKnowledge) -> Result<(), StoreError> {
        let known = self.peers.entry(k.peer).or_default();
        match &k.scopes {
            ScopeFilter::All => *known = k.marks.clone(),
            ScopeFilter::Only(scopes) => {
                known.retain(|s| !scopes.contains(s));
                let mut incoming = k.marks.clone();
                incoming.retain(|s| scopes.contains(s));
                known.merge(&incoming);
            }
        }
        // As in redb, a scope without marks is not stored.
        known.retain_nonempty();
        Ok(())
    }

    fn raise_clock(&mut self, time: u64) -> Result<(), StoreError> {
        self.clock = self.clock.max(time);
        Ok(())
    }

    fn issued(&mut self) -> Result<(u64, Option<NodeId>), StoreError> {
        Ok((self.issued, self.identity))
    }

    fn set_issued(&mut self, time: u64) -> Result<(), StoreError> {
        self.issued = time;
        Ok(())
    }

    fn adjust_blob_refs(
        &mut self,
        scope: &Scope,
        blob: &BlobRef,
        delta: i64,
    ) -> Result<u64, StoreError> {
        let scopes = self.blob_refs.entry(blob.hash).or_default();
        match ScopeRefs::adjusted(scopes.get(scope).copied(), blob, delta) {
            Some(refs) => {
                scopes.insert(scope.clone(), refs);
            }
            None => {
                scopes.remove(scope);
            }
        }
        let count = total(scopes);
        if scopes.is_empty() {
            self.blob_refs.remove(&blob.hash);
        }
        Ok(count)
    }

    fn finish_upserts(&mut self) -> Result<(), StoreError> {
        // The model keeps no summaries: its fingerprints are folds over the live index.
        Ok(())
    }
}

impl Store for MemStore {
    fn read(&self) -> Result<Box<dyn StoreRead + '_>, StoreError> {
        Ok(Box::new(Reader(Arc::clone(&self.read_lock()))))
    }

    fn identity(&self, fresh: NodeId) -> Result<NodeId, StoreError> {
        Ok(*Arc::make_mut(&mut self.write_lock())
            .identity
            .get_or_insert(fresh))
    }

    fn replace_identity(&self, id: NodeId) -> Result<(), StoreError> {
        Arc::make_mut(&mut self.write_lock()).identity = Some(id);
        Ok(())
    }

    fn note(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read_lock().notes.get(name).cloned())
    }

    fn set_note(&self, name: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let mut state = self.write_lock();
        let notes = &mut Arc::make_mut(&mut state).notes;
        match value {
            Some(v) => notes.insert(name.to_owned(), v.to_vec()),
            None => notes.remove(name),
        };
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> Result<BatchReport, StoreError> {
        // Atomic because every `TxnOps` method of `State` is infallible: `apply_batch` runs to
        // completion under the write lock or not at all.
        apply_batch(Arc::make_mut(&mut self.write_lock()), batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
