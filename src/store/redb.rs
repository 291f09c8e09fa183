//! The redb store. Layout (format 1; see `docs/storage.md`):
//!
//! Composite keys start with the scope as `len u8 | scope bytes`, so every scope is one
//! contiguous key range; origins are their 16 id bytes and times are big-endian, so byte
//! order is Hlc order.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, Table,
    TableDefinition, WriteTransaction,
};

use super::{
    apply_batch, Batch, BatchReport, Durability, KeyRange, PeerKnowledge, Store, StoreRead, TxnOps,
};
use crate::error::StoreError;
use crate::hash::Hash;
use crate::hlc::{Hlc, NodeId};
use crate::record::{Key, Scope, Version};
use crate::watermark::ScopedWatermarks;
use crate::wire::ScopeFilter;

/// The on-disk format this build reads and writes.
pub const FORMAT: u32 = 1;

/// "format" -> u32 BE; "node_id" -> 16 bytes; "clock" -> u64 BE (last issued or observed time).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta-v1");
/// scope | key -> postcard(Version): the latest version of every key, tombstones included.
const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records-v1");
/// scope | origin | time BE -> key: the live-version index, one entry per stored version.
const LIVE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("live-v1");
/// scope | origin -> time: this node's watermarks.
const MARKS: TableDefinition<&[u8], u64> = TableDefinition::new("watermarks-v1");
/// peer -> 0 (the peer was met), and peer | scope | origin -> time: what we learned of each
/// peer's watermarks.
const PEER_MARKS: TableDefinition<&[u8], u64> = TableDefinition::new("peer-watermarks-v1");

/// blake3 hash (32 bytes) -> number of stored versions referencing the blob (absent = 0).
const BLOB_REFS: TableDefinition<&[u8], u64> = TableDefinition::new("blob-refs-v1");

/// A store in one redb file.
pub struct RedbStore {
    db: Database,
    /// Whether a deferred commit is not yet durable. Guarded by the mutex so that the flag
    /// and the commit order agree (redb serializes writers, but not our flag updates).
    dirty: Mutex<bool>,
}

fn scope_prefix(scope: &Scope) -> Vec<u8> {
    let s = scope.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + s.len() + 40);
    // Scopes are at most 4 + 64 + 1 + 64 bytes by construction.
    out.push(u8::try_from(s.len()).expect("scope text is at most 133 bytes"));
    out.extend_from_slice(s);
    out
}

fn record_key(scope: &Scope, key: &Key) -> Vec<u8> {
    let mut out = scope_prefix(scope);
    out.extend_from_slice(key.as_bytes());
    out
}

fn origin_key(scope: &Scope, origin: NodeId) -> Vec<u8> {
    let mut out = scope_prefix(scope);
    out.extend_from_slice(&origin.to_bytes());
    out
}

fn live_key(scope: &Scope, origin: NodeId, time: u64) -> Vec<u8> {
    let mut out = origin_key(scope, origin);
    out.extend_from_slice(&time.to_be_bytes());
    out
}

fn decode_scope_origin(bytes: &[u8]) -> Result<(Scope, NodeId), StoreError> {
    let corrupt = StoreError::Corrupt {
        what: "watermark key",
    };
    let (&len, rest) = bytes.split_first().ok_or(StoreError::Corrupt {
        what: "watermark key",
    })?;
    let len = usize::from(len);
    if rest.len() != len + 16 {
        return Err(corrupt);
    }
    let scope = std::str::from_utf8(&rest[..len])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(StoreError::Corrupt { what: "scope" })?;
    let id: [u8; 16] = rest[len..]
        .try_into()
        .map_err(|_| StoreError::Corrupt { what: "origin" })?;
    let origin = NodeId::from_bytes(id).ok_or(StoreError::Corrupt { what: "origin" })?;
    Ok((scope, origin))
}

fn decode_version(bytes: &[u8]) -> Result<Version, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt { what: "record" })
}

fn encode_version(v: &Version) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding into a Vec does not fail")
}

impl RedbStore {
    /// redb's page cache per store, in bytes: its read cache and the write buffer that holds
    /// the pages of non-durable commits. redb's own default (1 GiB per database) lets a node that
    /// syncs a large store grow to that size: 1 000 000 records took two in-process nodes to
    /// 930 MiB of peak RSS. At 64 MiB the pair peaked near 140 MiB, at the cost of about a fifth
    /// of the bulk rate (more page reads and earlier write-back); see docs/performance.md.
    pub const CACHE_BYTES: usize = 64 << 20;

    /// Opens (or creates) the store in the redb file at `path`, with a page cache of
    /// [`RedbStore::CACHE_BYTES`].
    ///
    /// # Errors
    /// The file cannot be opened or created, or holds an unsupported format.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_cache(path, Self::CACHE_BYTES)
    }

    /// Opens (or creates) the store in the redb file at `path`, with a page cache of
    /// `cache_bytes` (more memory, fewer page reads and writes during large syncs).
    ///
    /// # Errors
    /// The file cannot be opened or created, or holds an unsupported format.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::from_db(
            Database::builder()
                .set_cache_size(cache_bytes)
                .create(path.as_ref())?,
        )
    }

    /// Opens (or creates) the store on a custom redb storage backend (fault injection in
    /// tests, or storage that is not a file).
    ///
    /// # Errors
    /// The backend cannot be opened, or holds an unsupported format.
    pub fn with_backend(backend: impl redb::StorageBackend) -> Result<Self, StoreError> {
        Self::from_db(
            Database::builder()
                .set_cache_size(Self::CACHE_BYTES)
                .create_with_backend(backend)?,
        )
    }

    fn from_db(db: Database) -> Result<Self, StoreError> {
        let store = RedbStore {
            db,
            dirty: Mutex::new(false),
        };
        store.init_tables()?;
        Ok(store)
    }

    fn lock_dirty(&self) -> MutexGuard<'_, bool> {
        // A bool is valid whatever a panicking holder did.
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("format")?.map(|g| g.value().to_vec());
            match found {
                None => {
                    meta.insert("format", FORMAT.to_be_bytes().as_slice())?;
                }
                Some(bytes) => {
                    let arr: [u8; 4] = bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt { what: "format" })?;
                    let found = u32::from_be_bytes(arr);
                    if found != FORMAT {
                        return Err(StoreError::UnsupportedFormat {
                            found,
                            supported: FORMAT,
                        });
                    }
                }
            }
            txn.open_table(RECORDS)?;
            txn.open_table(LIVE)?;
            txn.open_table(MARKS)?;
            txn.open_table(PEER_MARKS)?;
            txn.open_table(BLOB_REFS)?;
        }
        txn.commit()?;
        Ok(())
    }
}

struct Reader {
    _txn: ReadTransaction,
    meta: ReadOnlyTable<&'static str, &'static [u8]>,
    records: ReadOnlyTable<&'static [u8], &'static [u8]>,
    live: ReadOnlyTable<&'static [u8], &'static [u8]>,
    marks: ReadOnlyTable<&'static [u8], u64>,
    peers: ReadOnlyTable<&'static [u8], u64>,
    blob_refs: ReadOnlyTable<&'static [u8], u64>,
}

fn read_marks<'a>(
    rows: impl Iterator<
        Item = Result<
            (
                redb::AccessGuard<'a, &'static [u8]>,
                redb::AccessGuard<'a, u64>,
            ),
            redb::StorageError,
        >,
    >,
    skip: usize,
) -> Result<ScopedWatermarks, StoreError> {
    let mut out = ScopedWatermarks::new();
    for row in rows {
        let (k, t) = row?;
        let (scope, origin) = decode_scope_origin(&k.value()[skip..])?;
        out.observe(&scope, Hlc::new(t.value(), origin));
    }
    Ok(out)
}

impl StoreRead for Reader {
    fn get(&self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        match self.records.get(record_key(scope, key).as_slice())? {
            Some(g) => decode_version(g.value()).map(Some),
            None => Ok(None),
        }
    }

    fn scan(&self, scope: &Scope, range: &KeyRange) -> Result<Vec<(Key, Version)>, StoreError> {
        let sp = scope_prefix(scope);
        let mut start = sp.clone();
        start.extend_from_slice(&range.prefix);
        let mut skip_first = None;
        if let Some(after) = &range.after {
            if after.as_bytes() >= range.prefix.as_slice() {
                start = record_key(scope, after);
                skip_first = Some(start.clone());
            }
        }
        let mut out = Vec::new();
        let full_prefix_len = sp.len() + range.prefix.len();
        let mut want_prefix = sp.clone();
        want_prefix.extend_from_slice(&range.prefix);
        for row in self.records.range(start.as_slice()..)? {
            if out.len() >= range.limit {
                break;
            }
            let (k, v) = row?;
            let kb = k.value();
            if kb.len() < full_prefix_len || !kb.starts_with(&want_prefix) {
                break;
            }
            if skip_first.as_deref() == Some(kb) {
                continue;
            }
            let key = Key::new(&kb[sp.len()..])
                .map_err(|_| StoreError::Corrupt { what: "record key" })?;
            out.push((key, decode_version(v.value())?));
        }
        Ok(out)
    }

    fn watermarks(&self) -> Result<ScopedWatermarks, StoreError> {
        read_marks(self.marks.iter()?, 0)
    }

    fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>, StoreError> {
        let id = peer.to_bytes();
        if self.peers.get(id.as_slice())?.is_none() {
            return Ok(None);
        }
        let rows = self
            .peers
            .range(id.as_slice()..)?
            .skip(1)
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.value().starts_with(&id)));
        read_marks(rows, 16).map(Some)
    }

    fn peers(&self) -> Result<Vec<NodeId>, StoreError> {
        let mut out = Vec::new();
        for row in self.peers.iter()? {
            let (k, _) = row?;
            if let Ok(id) = <[u8; 16]>::try_from(k.value()) {
                out.push(NodeId::from_bytes(id).ok_or(StoreError::Corrupt { what: "peer id" })?);
            }
        }
        Ok(out)
    }

    fn live_range(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        limit: usize,
    ) -> Result<Vec<(Key, Version)>, StoreError> {
        let lo = match after {
            Some(a) => match a.time().checked_add(1) {
                Some(t) => live_key(scope, origin, t),
                None => return Ok(Vec::new()),
            },
            None => live_key(scope, origin, 0),
        };
        let hi = live_key(scope, origin, upto.time());
        let mut out = Vec::new();
        for row in self.live.range(lo.as_slice()..=hi.as_slice())?.take(limit) {
            let (_, key) = row?;
            let key =
                Key::new(key.value()).map_err(|_| StoreError::Corrupt { what: "live index" })?;
            let version = self
                .get(scope, &key)?
                .ok_or(StoreError::Corrupt { what: "live index" })?;
            out.push((key, version));
        }
        Ok(out)
    }

    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError> {
        Ok(self
            .blob_refs
            .get(hash.as_bytes().as_slice())?
            .map_or(0, |g| g.value()))
    }

    fn scopes(&self) -> Result<Vec<Scope>, StoreError> {
        let mut out: Vec<Scope> = self.watermarks()?.iter().map(|(s, _)| s.clone()).collect();
        // Skip from one scope's key range to the next: O(scopes), not O(records).
        let mut from: Vec<u8> = Vec::new();
        loop {
            let Some(row) = self.records.range(from.as_slice()..)?.next() else {
                break;
            };
            let (k, _) = row?;
            let kb = k.value();
            let len = usize::from(
                *kb.first()
                    .ok_or(StoreError::Corrupt { what: "record key" })?,
            );
            let text = kb
                .get(1..=len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or(StoreError::Corrupt { what: "scope" })?;
            out.push(
                text.parse()
                    .map_err(|_| StoreError::Corrupt { what: "scope" })?,
            );
            from = kb[..=len].to_vec();
            from.push(0xff);
            from.extend_from_slice(&[0xff; crate::record::MAX_KEY_LEN]);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn clock(&self) -> Result<u64, StoreError> {
        read_clock(self.meta.get("clock")?.map(|g| g.value().to_vec()))
    }
}

fn read_clock(bytes: Option<Vec<u8>>) -> Result<u64, StoreError> {
    match bytes {
        None => Ok(0),
        Some(b) => Ok(u64::from_be_bytes(
            b.as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "clock" })?,
        )),
    }
}

struct Writer<'t> {
    meta: Table<'t, &'static str, &'static [u8]>,
    records: Table<'t, &'static [u8], &'static [u8]>,
    live: Table<'t, &'static [u8], &'static [u8]>,
    marks: Table<'t, &'static [u8], u64>,
    peers: Table<'t, &'static [u8], u64>,
    blob_refs: Table<'t, &'static [u8], u64>,
}

impl<'t> Writer<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Writer {
            meta: txn.open_table(META)?,
            records: txn.open_table(RECORDS)?,
            live: txn.open_table(LIVE)?,
            marks: txn.open_table(MARKS)?,
            peers: txn.open_table(PEER_MARKS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
        })
    }
}

impl TxnOps for Writer<'_> {
    fn get_record(&mut self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        match self.records.get(record_key(scope, key).as_slice())? {
            Some(g) => decode_version(g.value()).map(Some),
            None => Ok(None),
        }
    }

    fn put_record(
        &mut self,
        scope: &Scope,
        key: &Key,
        version: &Version,
    ) -> Result<(), StoreError> {
        self.records.insert(
            record_key(scope, key).as_slice(),
            encode_version(version).as_slice(),
        )?;
        Ok(())
    }

    fn remove_live(&mut self, scope: &Scope, hlc: Hlc) -> Result<(), StoreError> {
        self.live
            .remove(live_key(scope, hlc.origin(), hlc.time()).as_slice())?;
        Ok(())
    }

    fn insert_live(&mut self, scope: &Scope, hlc: Hlc, key: &Key) -> Result<(), StoreError> {
        self.live.insert(
            live_key(scope, hlc.origin(), hlc.time()).as_slice(),
            key.as_bytes(),
        )?;
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
        self.peers.insert(id.as_slice(), 0)?;
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
        let cur = read_clock(self.meta.get("clock")?.map(|g| g.value().to_vec()))?;
        if time > cur {
            self.meta.insert("clock", time.to_be_bytes().as_slice())?;
        }
        Ok(())
    }
    fn adjust_blob_refs(&mut self, hash: &Hash, delta: i64) -> Result<u64, StoreError> {
        let key = hash.as_bytes().as_slice();
        let count = self.blob_refs.get(key)?.map_or(0, |g| g.value());
        let next = count.saturating_add_signed(delta);
        if next == 0 {
            self.blob_refs.remove(key)?;
        } else {
            self.blob_refs.insert(key, next)?;
        }
        Ok(next)
    }
}

impl Store for RedbStore {
    fn read(&self) -> Result<Box<dyn StoreRead + '_>, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(Box::new(Reader {
            meta: txn.open_table(META)?,
            records: txn.open_table(RECORDS)?,
            live: txn.open_table(LIVE)?,
            marks: txn.open_table(MARKS)?,
            peers: txn.open_table(PEER_MARKS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
            _txn: txn,
        }))
    }

    fn identity(&self, fresh: NodeId) -> Result<NodeId, StoreError> {
        let txn = self.db.begin_write()?;
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
        txn.commit()?;
        Ok(id)
    }

    fn replace_identity(&self, id: NodeId) -> Result<(), StoreError> {
        let mut dirty = self.lock_dirty();
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .insert("node_id", id.to_bytes().as_slice())?;
        txn.commit()?;
        // A durable commit also made every earlier deferred one durable.
        *dirty = false;
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> Result<BatchReport, StoreError> {
        let mut dirty = self.lock_dirty();
        let mut txn = self.db.begin_write()?;
        let deferred = batch.durability == Durability::Deferred;
        txn.set_durability(if deferred {
            redb::Durability::None
        } else {
            redb::Durability::Immediate
        })?;
        // IMPORTANT: the data and the watermark advances that cover it share this transaction.
        let report = {
            let mut w = Writer::open(&txn)?;
            apply_batch(&mut w, batch)?
        };
        txn.commit()?;
        *dirty = deferred;
        Ok(report)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut dirty = self.lock_dirty();
        if !*dirty {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        txn.commit()?;
        *dirty = false;
        Ok(())
    }
}
