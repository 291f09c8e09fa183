//! Writes: the group that gathers deferred commits, the [`Writer`] over a write
//! transaction's tables, and the [`Store`] impl that commits batches through them.

use std::sync::MutexGuard;

use redb::{ReadableDatabase, ReadableTable, Table, WriteTransaction};

use super::blob_refs;
use super::chunks::Changes;
use super::read::{
    floor_key, read_clock, stored_clock, stored_floor, version_at, GroupReader, Reader, HELD,
};
use super::tables::{
    decode_point, decode_row_key, decode_scope_origin, encode_row, live_key, origin_key, position,
    record_key, split_row, BLOB_REFS, CHUNKS, KEYS, MARKS, META, PEER_MARKS, VERSIONS,
};
use super::{needs_reopen, RedbStore, Writes};
use crate::error::StoreError;
use crate::hlc::{Hlc, NodeId};
use crate::record::ScopeFilter;
use crate::record::{BlobRef, Key, Scope, Version};
use crate::store::{
    apply_batch, item_hash, Batch, BatchReport, Durability, PeerKnowledge, Store, StoreRead, TxnOps,
};

impl RedbStore {
    /// The write lock, unless this thread holds a group reader of this store (which holds
    /// the lock already).
    pub(super) fn lock_writes(&self) -> Result<MutexGuard<'_, Writes>, StoreError> {
        if HELD.with_borrow(|held| held.contains(&self.address())) {
            return Err(StoreError::ReaderHeld);
        }
        // Every update of `Writes` leaves it valid, whatever a panicking holder did: a group
        // taken out and not put back is simply aborted.
        Ok(self.writes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The open group, taken out of `writes`, or a new write transaction. Writes that do not
    /// go through the group would wait forever on redb's writer lock while it is open.
    fn write_txn(&self, writes: &mut Writes) -> Result<WriteTransaction, StoreError> {
        match writes.group.take() {
            Some(txn) => Ok(txn),
            None => Ok(writes.db()?.begin_write()?),
        }
    }

    /// Applies `batch` in one write transaction (the open group's, if any). See
    /// [`Store::commit`].
    fn commit_batch(&self, writes: &mut Writes, batch: &Batch) -> Result<BatchReport, StoreError> {
        let gathering = writes.group.is_some();
        let gathered = std::mem::take(&mut writes.grouped);
        // A failure from here on drops `txn`, which aborts it, and with it the deferred
        // commits gathered in the group: they are taken back as a crash would take them,
        // with their watermark advances, so the store stays consistent.
        let txn = self.write_txn(writes)?;
        // IMPORTANT: the data and the watermark advances that cover it share this transaction.
        let report = match Writer::open(&txn, self.chunk_items)
            .and_then(|mut w| apply_batch(&mut w, batch))
        {
            Ok(report) => report,
            Err(e) => {
                if gathering {
                    tracing::warn!(
                        upserts = gathered,
                        error = %e,
                        "a failed commit took back the deferred commits gathered before it"
                    );
                }
                return Err(e);
            }
        };
        let grouped = gathered.saturating_add(batch.upserts.len());
        match batch.durability {
            Durability::Immediate => self.commit_durably(writes, txn)?,
            Durability::Deferred if grouped >= Self::GROUP_VERSIONS => {
                let mut txn = txn;
                txn.set_durability(redb::Durability::None)?;
                txn.commit()?;
                writes.dirty = true;
            }
            Durability::Deferred => {
                writes.group = Some(txn);
                writes.grouped = grouped;
            }
        }
        Ok(report)
    }

    /// Commits `txn` durably; every earlier commit is then durable too.
    fn commit_durably(
        &self,
        writes: &mut Writes,
        mut txn: WriteTransaction,
    ) -> Result<(), StoreError> {
        writes.grouped = 0;
        txn.set_durability(redb::Durability::Immediate)?;
        txn.commit()?;
        writes.dirty = false;
        Ok(())
    }
}

struct Writer<'t> {
    meta: Table<'t, &'static str, &'static [u8]>,
    versions: Table<'t, &'static [u8], &'static [u8]>,
    keys: Table<'t, &'static [u8], &'static [u8]>,
    marks: Table<'t, &'static [u8], u64>,
    peers: Table<'t, &'static [u8], u64>,
    blob_refs: Table<'t, &'static [u8], &'static [u8]>,
    chunks: Table<'t, &'static [u8], &'static [u8]>,
    /// The batch's changes to the live set, settled into `chunks` by `finish_upserts`.
    changes: Changes,
    chunk_items: u64,
    /// The tops of the `(scope, origin)`s this batch looked up, read once per batch.
    tops: Vec<Top>,
}

/// A time at or above the time of every version of `origin` stored in `scope` (`None`: none
/// is stored), as the transaction stands: a version above it holds no stored version's Hlc,
/// which a sync's versions mostly are, so `live_key_at` answers without a lookup.
struct Top {
    scope: Scope,
    origin: NodeId,
    time: Option<u64>,
}

impl<'t> Writer<'t> {
    fn open(txn: &'t WriteTransaction, chunk_items: u64) -> Result<Self, StoreError> {
        Ok(Writer {
            meta: txn.open_table(META)?,
            versions: txn.open_table(VERSIONS)?,
            keys: txn.open_table(KEYS)?,
            marks: txn.open_table(MARKS)?,
            peers: txn.open_table(PEER_MARKS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
            chunks: txn.open_table(CHUNKS)?,
            changes: Changes::default(),
            chunk_items,
            tops: Vec::new(),
        })
    }

    /// Where `(scope, origin)`'s top is in `tops`, if this batch read it.
    fn top_at(&self, scope: &Scope, origin: NodeId) -> Option<usize> {
        self.tops
            .iter()
            .rposition(|t| t.origin == origin && t.scope == *scope)
    }

    /// Whether `hlc` is above every version of its origin stored in `scope`: one range read
    /// per `(scope, origin)` per batch, then none.
    fn above_stored(&mut self, scope: &Scope, hlc: Hlc) -> Result<bool, StoreError> {
        let origin = hlc.origin();
        let at = match self.top_at(scope, origin) {
            Some(at) => at,
            None => {
                let lo = live_key(scope, origin, 0);
                let hi = live_key(scope, origin, u64::MAX);
                let time = match self
                    .versions
                    .range(lo.as_slice()..=hi.as_slice())?
                    .next_back()
                {
                    Some(row) => {
                        let prefix = lo.len().saturating_sub(24);
                        Some(decode_point(row?.0.value(), prefix, "version index")?.time)
                    }
                    None => None,
                };
                self.tops.push(Top {
                    scope: scope.clone(),
                    origin,
                    time,
                });
                self.tops.len() - 1
            }
        };
        Ok(self.tops[at].time.is_none_or(|top| hlc.time() > top))
    }
}

impl TxnOps for Writer<'_> {
    fn swap_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<Option<Version>, StoreError> {
        let old = self.keys.insert(
            record_key(scope, key).as_slice(),
            position(version.hlc).as_slice(),
        )?;
        match old {
            Some(g) => version_at(&self.versions, scope, key.as_bytes(), g.value()).map(Some),
            None => Ok(None),
        }
    }

    fn take_record(&mut self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        let old = self.keys.remove(record_key(scope, key).as_slice())?;
        match old {
            Some(g) => version_at(&self.versions, scope, key.as_bytes(), g.value()).map(Some),
            None => Ok(None),
        }
    }

    fn has_record(&mut self, scope: &Scope, key: &Key) -> Result<bool, StoreError> {
        Ok(self.keys.get(record_key(scope, key).as_slice())?.is_some())
    }

    fn get_floor(&mut self, scope: &Scope) -> Result<u64, StoreError> {
        stored_floor(&self.meta, scope)
    }

    fn set_floor(&mut self, scope: &Scope, time: u64) -> Result<(), StoreError> {
        if time > 0 {
            self.meta
                .insert(floor_key(scope).as_str(), time.to_be_bytes().as_slice())?;
        }
        Ok(())
    }

    fn remove_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<(), StoreError> {
        self.marks.remove(origin_key(scope, origin).as_slice())?;
        Ok(())
    }

    fn forget_peer(&mut self, peer: NodeId) -> Result<(), StoreError> {
        let id = peer.to_bytes();
        let rows: Vec<Vec<u8>> = {
            let mut out = Vec::new();
            for row in self.peers.range(id.as_slice()..)? {
                let (key, _) = row?;
                if !key.value().starts_with(&id) {
                    break;
                }
                out.push(key.value().to_vec());
            }
            out
        };
        for key in rows {
            self.peers.remove(key.as_slice())?;
        }
        Ok(())
    }

    fn raise_seen(&mut self, peer: NodeId, time: u64) -> Result<(), StoreError> {
        let id = peer.to_bytes();
        let current = self.peers.get(id.as_slice())?.map_or(0, |g| g.value());
        if time > current || self.peers.get(id.as_slice())?.is_none() {
            self.peers.insert(id.as_slice(), time.max(current))?;
        }
        Ok(())
    }

    fn put_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError> {
        self.keys.insert(
            record_key(scope, key).as_slice(),
            position(version.hlc).as_slice(),
        )?;
        Ok(())
    }

    fn live_key_at(&mut self, scope: &Scope, hlc: Hlc) -> Result<Option<Key>, StoreError> {
        if self.above_stored(scope, hlc)? {
            return Ok(None);
        }
        match self
            .versions
            .get(live_key(scope, hlc.origin(), hlc.time()).as_slice())?
        {
            Some(row) => decode_row_key(split_row(row.value())?.0).map(Some),
            None => Ok(None),
        }
    }

    fn remove_live(&mut self, scope: &Scope, key: &Key, hlc: Hlc) -> Result<(), StoreError> {
        self.versions
            .remove(live_key(scope, hlc.origin(), hlc.time()).as_slice())?;
        self.changes
            .remove(scope, hlc.origin(), hlc.time(), item_hash(key, hlc));
        Ok(())
    }

    fn insert_live(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError> {
        let hlc = version.hlc;
        self.versions.insert(
            live_key(scope, hlc.origin(), hlc.time()).as_slice(),
            encode_row(key, version).as_slice(),
        )?;
        // IMPORTANT: a top read before this insert must cover it (a top read after does).
        if let Some(at) = self.top_at(scope, hlc.origin()) {
            let top = &mut self.tops[at].time;
            *top = Some(top.map_or(hlc.time(), |t| t.max(hlc.time())));
        }
        self.changes
            .insert(scope, hlc.origin(), hlc.time(), item_hash(key, hlc));
        Ok(())
    }

    fn get_mark(&mut self, scope: &Scope, origin: NodeId) -> Result<Option<Hlc>, StoreError> {
        Ok(self
            .marks
            .get(origin_key(scope, origin).as_slice())?
            .map(|t| Hlc::new(t.value(), origin)))
    }

    fn set_mark(&mut self, scope: &Scope, mark: Hlc) -> Result<(), StoreError> {
        self.marks
            .insert(origin_key(scope, mark.origin()).as_slice(), mark.time())?;
        Ok(())
    }

    fn replace_peer_marks(&mut self, k: &PeerKnowledge) -> Result<(), StoreError> {
        let id = k.peer.to_bytes();
        let in_play = |row: &[u8]| match &k.scopes {
            ScopeFilter::All => true,
            ScopeFilter::Only(set) => decode_scope_origin(row)
                .map(|(s, _)| set.contains(&s))
                .unwrap_or(true),
        };
        let stale: Vec<Vec<u8>> = {
            let mut out = Vec::new();
            for row in self.peers.range(id.as_slice()..)?.skip(1) {
                let (key, _) = row?;
                let kb = key.value();
                if !kb.starts_with(&id) {
                    break;
                }
                if in_play(&kb[16..]) {
                    out.push(kb.to_vec());
                }
            }
            out
        };
        for key in stale {
            self.peers.remove(key.as_slice())?;
        }
        // The `peer -> seen` row says the peer was met; its time is kept.
        if self.peers.get(id.as_slice())?.is_none() {
            self.peers.insert(id.as_slice(), 0)?;
        }
        for (scope, marks) in k.marks.iter() {
            if !k.scopes.contains(scope) {
                continue;
            }
            for hlc in marks.iter() {
                let mut key = id.to_vec();
                key.extend_from_slice(&origin_key(scope, hlc.origin()));
                self.peers.insert(key.as_slice(), hlc.time())?;
            }
        }
        Ok(())
    }

    fn raise_clock(&mut self, time: u64) -> Result<(), StoreError> {
        let cur = stored_clock(&self.meta)?;
        if time > cur {
            self.meta.insert("clock", time.to_be_bytes().as_slice())?;
        }
        Ok(())
    }

    fn issued(&mut self) -> Result<(u64, Option<NodeId>), StoreError> {
        let issued = read_clock(self.meta.get("issued")?.map(|g| g.value().to_vec()))?;
        let identity = match self.meta.get("node_id")? {
            Some(g) => Some(
                <[u8; 16]>::try_from(g.value())
                    .ok()
                    .and_then(NodeId::from_bytes)
                    .ok_or(StoreError::Corrupt { what: "node id" })?,
            ),
            None => None,
        };
        Ok((issued, identity))
    }

    fn set_issued(&mut self, time: u64) -> Result<(), StoreError> {
        self.meta.insert("issued", time.to_be_bytes().as_slice())?;
        Ok(())
    }

    fn adjust_blob_refs(
        &mut self,
        scope: &Scope,
        blob: &BlobRef,
        delta: i64,
    ) -> Result<u64, StoreError> {
        blob_refs::adjust(&mut self.blob_refs, scope, blob, delta)
    }

    fn finish_upserts(&mut self) -> Result<(), StoreError> {
        self.changes
            .apply(&mut self.chunks, &self.versions, self.chunk_items)
    }
}

impl Store for RedbStore {
    fn read(&self) -> Result<Box<dyn StoreRead + '_>, StoreError> {
        let mut writes = self.lock_writes()?;
        if writes.group.is_some() {
            return Ok(Box::new(GroupReader::new(self, writes)));
        }
        // Begun under the lock, so a deferred commit that returned before this call is in
        // the snapshot (it cannot be sitting in a group this reader does not see).
        let txn = match writes.db().and_then(|db| Ok(db.begin_read()?)) {
            Err(e) if self.reopen.is_some() && (writes.db.is_none() || needs_reopen(&e)) => {
                self.reopen(&mut writes)?;
                writes.db()?.begin_read()?
            }
            other => other?,
        };
        drop(writes);
        Ok(Box::new(Reader {
            meta: txn.open_table(META)?,
            versions: txn.open_table(VERSIONS)?,
            keys: txn.open_table(KEYS)?,
            marks: txn.open_table(MARKS)?,
            peers: txn.open_table(PEER_MARKS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
            chunks: txn.open_table(CHUNKS)?,
            _txn: txn,
        }))
    }

    fn identity(&self, fresh: NodeId) -> Result<NodeId, StoreError> {
        self.recovering(|store, writes| {
            let txn = store.write_txn(writes)?;
            let id = {
                let mut meta = txn.open_table(META)?;
                let stored = meta.get("node_id")?.map(|g| g.value().to_vec());
                match stored {
                    Some(bytes) => {
                        let arr: [u8; 16] = bytes
                            .as_slice()
                            .try_into()
                            .map_err(|_| StoreError::Corrupt { what: "node id" })?;
                        NodeId::from_bytes(arr).ok_or(StoreError::Corrupt { what: "node id" })?
                    }
                    None => {
                        meta.insert("node_id", fresh.to_bytes().as_slice())?;
                        fresh
                    }
                }
            };
            store.commit_durably(writes, txn)?;
            Ok(id)
        })
    }

    fn replace_identity(&self, id: NodeId) -> Result<(), StoreError> {
        self.recovering(|store, writes| {
            let txn = store.write_txn(writes)?;
            txn.open_table(META)?
                .insert("node_id", id.to_bytes().as_slice())?;
            store.commit_durably(writes, txn)
        })
    }

    fn note(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = note_key(name);
        // Read only: through the open group if there is one (a snapshot would miss its
        // deferred commits), else a snapshot. A read commits nothing.
        self.recovering(|_, writes| {
            if let Some(group) = writes.group.as_ref() {
                let meta = group.open_table(META)?;
                let value = meta.get(key.as_str())?.map(|g| g.value().to_vec());
                return Ok(value);
            }
            let txn = writes.db()?.begin_read()?;
            let meta = txn.open_table(META)?;
            let value = meta.get(key.as_str())?.map(|g| g.value().to_vec());
            Ok(value)
        })
    }

    fn set_note(&self, name: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        self.recovering(|store, writes| {
            let txn = store.write_txn(writes)?;
            {
                let mut meta = txn.open_table(META)?;
                match value {
                    Some(v) => drop(meta.insert(note_key(name).as_str(), v)?),
                    None => drop(meta.remove(note_key(name).as_str())?),
                }
            }
            store.commit_durably(writes, txn)
        })
    }

    fn commit(&self, batch: &Batch) -> Result<BatchReport, StoreError> {
        self.recovering(|store, writes| store.commit_batch(writes, batch))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.recovering(|store, writes| {
            if !writes.pending() {
                return Ok(());
            }
            let txn = store.write_txn(writes)?;
            store.commit_durably(writes, txn)
        })
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Best effort, like the engine's own flush on drop: an open group would otherwise be
        // aborted, and the deferred commits in it lost as in a crash.
        let writes = self.writes.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(mut txn) = writes.group.take() {
            let committed = txn
                .set_durability(redb::Durability::Immediate)
                .map_err(StoreError::from)
                .and_then(|()| txn.commit().map_err(StoreError::from));
            if let Err(e) = committed {
                tracing::warn!(error = %e, "could not commit deferred work when closing the store");
            }
        }
    }
}

/// The `meta-v1` row of the note `name`: `note/<name>`, apart from the format's own rows.
fn note_key(name: &str) -> String {
    format!("note/{name}")
}
