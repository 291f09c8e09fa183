//! The redb store. Layout (format 2; see `docs/storage.md`):
//!
//! Composite keys start with the scope as `len u8 | scope bytes`, so every scope is one
//! contiguous key range; origins are their 16 id bytes and times are big-endian, so byte
//! order is Hlc order.
//!
//! Versions are stored by `(scope, origin, time)`, the order in which a sync delivers them,
//! and a small index maps each key to its version's position. A bulk sync then appends to
//! the large table and inserts random keys only into the small one, and the sender reads
//! what a peer lacks with one range scan.

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

/// The on-disk format this build reads and writes. Format 1 files are migrated to it when
/// opened.
pub const FORMAT: u32 = 2;

/// "format" -> u32 BE; "node_id" -> 16 bytes; "clock" -> u64 BE (last issued or observed time).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta-v1");
/// scope | origin | time BE -> key length u16 BE | key | postcard(Version): every stored
/// version (the latest of its key, tombstones included), in Hlc order per origin.
const VERSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("versions-v2");
/// scope | key -> origin | time BE: where each key's stored version is.
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys-v2");
/// Format 1: scope | key -> postcard(Version). Read only to migrate.
const RECORDS_V1: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records-v1");
/// Format 1: scope | origin | time BE -> key. Read only to migrate.
const LIVE_V1: TableDefinition<&[u8], &[u8]> = TableDefinition::new("live-v1");
/// scope | origin -> time: this node's watermarks.
const MARKS: TableDefinition<&[u8], u64> = TableDefinition::new("watermarks-v1");
/// peer -> 0 (the peer was met), and peer | scope | origin -> time: what we learned of each
/// peer's watermarks.
const PEER_MARKS: TableDefinition<&[u8], u64> = TableDefinition::new("peer-watermarks-v1");

/// blake3 hash (32 bytes) -> number of stored versions referencing the blob (absent = 0).
const BLOB_REFS: TableDefinition<&[u8], u64> = TableDefinition::new("blob-refs-v1");

/// A store in one redb file.
///
/// Deferred commits are gathered into one open redb write transaction (a *group*) instead of
/// each committing its own: every redb commit rewrites the B-tree pages it touched, and with
/// random keys a thousand-version page touches about a thousand leaves of the key index, so
/// one commit per page wrote some 25 times the bytes it stored (docs/performance.md). While
/// a group is open, [`Store::read`] reads through it (deferred
/// commits are visible at once, as the contract says), and the group is committed to redb
/// by the next durable commit, by [`Store::flush`], once it holds
/// [`RedbStore::GROUP_VERSIONS`] upserts (non-durably), or when the store is dropped.
pub struct RedbStore {
    db: Database,
    writes: Mutex<Writes>,
}

/// The write side's state, under one lock: redb has one writer at a time, and a read
/// through an open group holds the same lock.
struct Writes {
    /// The write transaction deferred commits are gathered in, if one is open.
    group: Option<WriteTransaction>,
    /// Upserts in `group`.
    grouped: usize,
    /// Whether a transaction committed to redb non-durably is not yet durable.
    dirty: bool,
}

impl Writes {
    /// Whether deferred work is not durable yet (open in the group, or committed to redb
    /// non-durably).
    fn pending(&self) -> bool {
        self.dirty || self.group.is_some()
    }
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

/// A key's index entry: the position of its stored version.
fn position(hlc: Hlc) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(&hlc.origin().to_bytes());
    out[16..].copy_from_slice(&hlc.time().to_be_bytes());
    out
}

fn decode_position(bytes: &[u8]) -> Result<(NodeId, u64), StoreError> {
    let corrupt = || StoreError::Corrupt { what: "key index" };
    let (id, time) = bytes.split_at_checked(16).ok_or_else(corrupt)?;
    let id: [u8; 16] = id.try_into().map_err(|_| corrupt())?;
    let time: [u8; 8] = time.try_into().map_err(|_| corrupt())?;
    let origin = NodeId::from_bytes(id).ok_or_else(corrupt)?;
    Ok((origin, u64::from_be_bytes(time)))
}

/// A versions row: `key length u16 BE | key | postcard(Version)`.
fn encode_row(key: &Key, v: &Version) -> Vec<u8> {
    let k = key.as_bytes();
    let mut out = Vec::with_capacity(2 + k.len() + k.len() / 2 + 64);
    out.extend_from_slice(
        &u16::try_from(k.len())
            .expect("keys are at most MAX_KEY_LEN bytes")
            .to_be_bytes(),
    );
    out.extend_from_slice(k);
    postcard::to_io(v, &mut out).expect("postcard encoding into a Vec does not fail");
    out
}

/// A versions row's key bytes and encoded version, not yet decoded.
fn split_row(bytes: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    let corrupt = || StoreError::Corrupt { what: "version" };
    let (len, rest) = bytes.split_at_checked(2).ok_or_else(corrupt)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    rest.split_at_checked(len).ok_or_else(corrupt)
}

fn decode_row_key(key: &[u8]) -> Result<Key, StoreError> {
    Key::new(key).map_err(|_| StoreError::Corrupt { what: "version" })
}

fn decode_row(bytes: &[u8]) -> Result<(Key, Version), StoreError> {
    let (key, version) = split_row(bytes)?;
    Ok((decode_row_key(key)?, decode_version(version)?))
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

impl RedbStore {
    /// redb's page cache per store, in bytes: its read cache and the write buffer that holds
    /// the pages of non-durable commits. redb's own default (1 GiB per database) lets a node that
    /// syncs a large store grow to that size: 1 000 000 records took two in-process nodes to
    /// 930 MiB of peak RSS. At 64 MiB the pair peaks near 147 MiB; with store format 2 a larger
    /// cache barely speeds a bulk sync up (docs/performance.md). `EngineConfig::cache_bytes`
    /// sets it per node.
    pub const CACHE_BYTES: usize = 64 << 20;

    /// Upserts gathered in one open write transaction before it is committed to redb (non
    /// durably) and a new group begins. It bounds the work a failed commit takes back (see
    /// [`Store::commit`]); the engine's checkpoints (`engine::Checkpoint`, 100 000 versions
    /// by default) usually end a group first.
    pub const GROUP_VERSIONS: usize = 250_000;

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
            writes: Mutex::new(Writes {
                group: None,
                grouped: 0,
                dirty: false,
            }),
        };
        store.init_tables()?;
        Ok(store)
    }

    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// The write lock, unless this thread holds a group reader of this store (which holds
    /// the lock already).
    fn lock_writes(&self) -> Result<MutexGuard<'_, Writes>, StoreError> {
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
            None => Ok(self.db.begin_write()?),
        }
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
                    match u32::from_be_bytes(arr) {
                        FORMAT => {}
                        1 => {
                            migrate_v1(&txn)?;
                            meta.insert("format", FORMAT.to_be_bytes().as_slice())?;
                        }
                        found => {
                            return Err(StoreError::UnsupportedFormat {
                                found,
                                supported: FORMAT,
                            })
                        }
                    }
                }
            }
            txn.open_table(VERSIONS)?;
            txn.open_table(KEYS)?;
            txn.open_table(MARKS)?;
            txn.open_table(PEER_MARKS)?;
            txn.open_table(BLOB_REFS)?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// A reader on a committed snapshot (redb's MVCC): used while no group is open.
/// Rewrites a format 1 store in format 2, inside the opening transaction (so a crash
/// leaves the file in format 1, to be migrated again): every live-index row names a key
/// whose stored version goes to `versions-v2` at the same position.
fn migrate_v1(txn: &WriteTransaction) -> Result<(), StoreError> {
    {
        let live = txn.open_table(LIVE_V1)?;
        let records = txn.open_table(RECORDS_V1)?;
        let mut versions = txn.open_table(VERSIONS)?;
        let mut keys = txn.open_table(KEYS)?;
        for row in live.iter()? {
            let (position_key, key) = row?;
            let position_key = position_key.value();
            let (&len, _) = position_key
                .split_first()
                .ok_or(StoreError::Corrupt { what: "live index" })?;
            let scope_len = 1 + usize::from(len);
            let mut record_key = position_key
                .get(..scope_len)
                .ok_or(StoreError::Corrupt { what: "live index" })?
                .to_vec();
            record_key.extend_from_slice(key.value());
            let version = records
                .get(record_key.as_slice())?
                .ok_or(StoreError::Corrupt { what: "live index" })?;
            let version = decode_version(version.value())?;
            let key =
                Key::new(key.value()).map_err(|_| StoreError::Corrupt { what: "live index" })?;
            versions.insert(position_key, encode_row(&key, &version).as_slice())?;
            keys.insert(record_key.as_slice(), position(version.hlc).as_slice())?;
        }
    }
    txn.delete_table(LIVE_V1)?;
    txn.delete_table(RECORDS_V1)?;
    Ok(())
}

struct Reader {
    _txn: ReadTransaction,
    meta: ReadOnlyTable<&'static str, &'static [u8]>,
    versions: ReadOnlyTable<&'static [u8], &'static [u8]>,
    keys: ReadOnlyTable<&'static [u8], &'static [u8]>,
    marks: ReadOnlyTable<&'static [u8], u64>,
    peers: ReadOnlyTable<&'static [u8], u64>,
    blob_refs: ReadOnlyTable<&'static [u8], u64>,
}

/// A reader through the open group: it holds the write lock, so no commit interleaves with
/// it, and opens the tables it needs per call (a write transaction lends each table to one
/// user at a time).
struct GroupReader<'a> {
    writes: MutexGuard<'a, Writes>,
    store: usize,
}

impl Drop for GroupReader<'_> {
    fn drop(&mut self) {
        HELD.with_borrow_mut(|held| {
            if let Some(i) = held.iter().rposition(|&a| a == self.store) {
                held.swap_remove(i);
            }
        });
    }
}

thread_local! {
    /// The stores (by address) whose group reader this thread holds: taking their lock again
    /// on this thread would never return, so [`RedbStore`] answers
    /// [`StoreError::ReaderHeld`] instead.
    static HELD: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<'a> GroupReader<'a> {
    fn new(store: &RedbStore, writes: MutexGuard<'a, Writes>) -> Self {
        HELD.with_borrow_mut(|held| held.push(store.address()));
        GroupReader {
            writes,
            store: store.address(),
        }
    }

    fn txn(&self) -> &WriteTransaction {
        self.writes
            .group
            .as_ref()
            .expect("a group reader is made only while a group is open, and holds its lock")
    }
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

// The reads, written once over redb's `ReadableTable`, so that snapshot readers, group
// readers and the write transaction's own lookups share them.

type Bytes = &'static [u8];

/// The stored version of `key` at its index entry `position`.
fn version_at(
    versions: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    key: &[u8],
    position: &[u8],
) -> Result<Version, StoreError> {
    let (origin, time) = decode_position(position)?;
    let row = versions
        .get(live_key(scope, origin, time).as_slice())?
        .ok_or(StoreError::Corrupt { what: "key index" })?;
    let (stored_key, version) = split_row(row.value())?;
    if stored_key != key {
        return Err(StoreError::Corrupt { what: "key index" });
    }
    decode_version(version)
}

fn get_version(
    keys: &impl ReadableTable<Bytes, Bytes>,
    versions: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    key: &Key,
) -> Result<Option<Version>, StoreError> {
    match keys.get(record_key(scope, key).as_slice())? {
        Some(g) => version_at(versions, scope, key.as_bytes(), g.value()).map(Some),
        None => Ok(None),
    }
}

fn scan_records(
    keys: &impl ReadableTable<Bytes, Bytes>,
    versions: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    range: &KeyRange,
) -> Result<Vec<(Key, Version)>, StoreError> {
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
    for row in keys.range(start.as_slice()..)? {
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
        let key =
            Key::new(&kb[sp.len()..]).map_err(|_| StoreError::Corrupt { what: "record key" })?;
        let version = version_at(versions, scope, key.as_bytes(), v.value())?;
        out.push((key, version));
    }
    Ok(out)
}

fn all_marks(
    marks: &impl ReadableTable<&'static [u8], u64>,
) -> Result<ScopedWatermarks, StoreError> {
    read_marks(marks.iter()?, 0)
}

fn peer_marks(
    peers: &impl ReadableTable<&'static [u8], u64>,
    peer: NodeId,
) -> Result<Option<ScopedWatermarks>, StoreError> {
    let id = peer.to_bytes();
    if peers.get(id.as_slice())?.is_none() {
        return Ok(None);
    }
    let rows = peers
        .range(id.as_slice()..)?
        .skip(1)
        .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.value().starts_with(&id)));
    read_marks(rows, 16).map(Some)
}

fn known_peers(peers: &impl ReadableTable<&'static [u8], u64>) -> Result<Vec<NodeId>, StoreError> {
    let mut out = Vec::new();
    for row in peers.iter()? {
        let (k, _) = row?;
        if let Ok(id) = <[u8; 16]>::try_from(k.value()) {
            out.push(NodeId::from_bytes(id).ok_or(StoreError::Corrupt { what: "peer id" })?);
        }
    }
    Ok(out)
}

fn live_versions(
    versions: &impl ReadableTable<Bytes, Bytes>,
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
    for row in versions.range(lo.as_slice()..=hi.as_slice())?.take(limit) {
        let (_, row) = row?;
        out.push(decode_row(row.value())?);
    }
    Ok(out)
}

fn blob_ref_count(
    blob_refs: &impl ReadableTable<&'static [u8], u64>,
    hash: &Hash,
) -> Result<u64, StoreError> {
    Ok(blob_refs
        .get(hash.as_bytes().as_slice())?
        .map_or(0, |g| g.value()))
}

fn stored_scopes(
    marks: &impl ReadableTable<&'static [u8], u64>,
    keys: &impl ReadableTable<Bytes, Bytes>,
) -> Result<Vec<Scope>, StoreError> {
    let mut out: Vec<Scope> = all_marks(marks)?.iter().map(|(s, _)| s.clone()).collect();
    // Skip from one scope's key range to the next: O(scopes), not O(records).
    let mut from: Vec<u8> = Vec::new();
    loop {
        let Some(row) = keys.range(from.as_slice()..)?.next() else {
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

fn stored_clock(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64, StoreError> {
    read_clock(meta.get("clock")?.map(|g| g.value().to_vec()))
}

impl StoreRead for Reader {
    fn get(&self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        get_version(&self.keys, &self.versions, scope, key)
    }

    fn scan(&self, scope: &Scope, range: &KeyRange) -> Result<Vec<(Key, Version)>, StoreError> {
        scan_records(&self.keys, &self.versions, scope, range)
    }

    fn watermarks(&self) -> Result<ScopedWatermarks, StoreError> {
        all_marks(&self.marks)
    }

    fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>, StoreError> {
        peer_marks(&self.peers, peer)
    }

    fn peers(&self) -> Result<Vec<NodeId>, StoreError> {
        known_peers(&self.peers)
    }

    fn live_range(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        limit: usize,
    ) -> Result<Vec<(Key, Version)>, StoreError> {
        live_versions(&self.versions, scope, origin, after, upto, limit)
    }

    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError> {
        blob_ref_count(&self.blob_refs, hash)
    }

    fn scopes(&self) -> Result<Vec<Scope>, StoreError> {
        stored_scopes(&self.marks, &self.keys)
    }

    fn clock(&self) -> Result<u64, StoreError> {
        stored_clock(&self.meta)
    }
}

impl StoreRead for GroupReader<'_> {
    fn get(&self, scope: &Scope, key: &Key) -> Result<Option<Version>, StoreError> {
        let txn = self.txn();
        get_version(
            &txn.open_table(KEYS)?,
            &txn.open_table(VERSIONS)?,
            scope,
            key,
        )
    }

    fn scan(&self, scope: &Scope, range: &KeyRange) -> Result<Vec<(Key, Version)>, StoreError> {
        let txn = self.txn();
        scan_records(
            &txn.open_table(KEYS)?,
            &txn.open_table(VERSIONS)?,
            scope,
            range,
        )
    }

    fn watermarks(&self) -> Result<ScopedWatermarks, StoreError> {
        all_marks(&self.txn().open_table(MARKS)?)
    }

    fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>, StoreError> {
        peer_marks(&self.txn().open_table(PEER_MARKS)?, peer)
    }

    fn peers(&self) -> Result<Vec<NodeId>, StoreError> {
        known_peers(&self.txn().open_table(PEER_MARKS)?)
    }

    fn live_range(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        limit: usize,
    ) -> Result<Vec<(Key, Version)>, StoreError> {
        live_versions(
            &self.txn().open_table(VERSIONS)?,
            scope,
            origin,
            after,
            upto,
            limit,
        )
    }

    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError> {
        blob_ref_count(&self.txn().open_table(BLOB_REFS)?, hash)
    }

    fn scopes(&self) -> Result<Vec<Scope>, StoreError> {
        let txn = self.txn();
        stored_scopes(&txn.open_table(MARKS)?, &txn.open_table(KEYS)?)
    }

    fn clock(&self) -> Result<u64, StoreError> {
        stored_clock(&self.txn().open_table(META)?)
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
    versions: Table<'t, &'static [u8], &'static [u8]>,
    keys: Table<'t, &'static [u8], &'static [u8]>,
    marks: Table<'t, &'static [u8], u64>,
    peers: Table<'t, &'static [u8], u64>,
    blob_refs: Table<'t, &'static [u8], u64>,
}

impl<'t> Writer<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Writer {
            meta: txn.open_table(META)?,
            versions: txn.open_table(VERSIONS)?,
            keys: txn.open_table(KEYS)?,
            marks: txn.open_table(MARKS)?,
            peers: txn.open_table(PEER_MARKS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
        })
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
        match self
            .versions
            .get(live_key(scope, hlc.origin(), hlc.time()).as_slice())?
        {
            Some(row) => decode_row_key(split_row(row.value())?.0).map(Some),
            None => Ok(None),
        }
    }

    fn remove_live(&mut self, scope: &Scope, hlc: Hlc) -> Result<(), StoreError> {
        self.versions
            .remove(live_key(scope, hlc.origin(), hlc.time()).as_slice())?;
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
        let cur = stored_clock(&self.meta)?;
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
        let writes = self.lock_writes()?;
        if writes.group.is_some() {
            return Ok(Box::new(GroupReader::new(self, writes)));
        }
        // Begun under the lock, so a deferred commit that returned before this call is in
        // the snapshot (it cannot be sitting in a group this reader does not see).
        let txn = self.db.begin_read()?;
        drop(writes);
        Ok(Box::new(Reader {
            meta: txn.open_table(META)?,
            versions: txn.open_table(VERSIONS)?,
            keys: txn.open_table(KEYS)?,
            marks: txn.open_table(MARKS)?,
            peers: txn.open_table(PEER_MARKS)?,
            blob_refs: txn.open_table(BLOB_REFS)?,
            _txn: txn,
        }))
    }

    fn identity(&self, fresh: NodeId) -> Result<NodeId, StoreError> {
        let mut writes = self.lock_writes()?;
        let txn = self.write_txn(&mut writes)?;
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
        self.commit_durably(&mut writes, txn)?;
        Ok(id)
    }

    fn replace_identity(&self, id: NodeId) -> Result<(), StoreError> {
        let mut writes = self.lock_writes()?;
        let txn = self.write_txn(&mut writes)?;
        txn.open_table(META)?
            .insert("node_id", id.to_bytes().as_slice())?;
        self.commit_durably(&mut writes, txn)
    }

    fn commit(&self, batch: &Batch) -> Result<BatchReport, StoreError> {
        let mut writes = self.lock_writes()?;
        let gathering = writes.group.is_some();
        let gathered = std::mem::take(&mut writes.grouped);
        // A failure from here on drops `txn`, which aborts it, and with it the deferred
        // commits gathered in the group: they are taken back as a crash would take them,
        // with their watermark advances, so the store stays consistent.
        let txn = self.write_txn(&mut writes)?;
        // IMPORTANT: the data and the watermark advances that cover it share this transaction.
        let report = match Writer::open(&txn).and_then(|mut w| apply_batch(&mut w, batch)) {
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
            Durability::Immediate => self.commit_durably(&mut writes, txn)?,
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

    fn flush(&self) -> Result<(), StoreError> {
        let mut writes = self.lock_writes()?;
        if !writes.pending() {
            return Ok(());
        }
        let txn = self.write_txn(&mut writes)?;
        self.commit_durably(&mut writes, txn)
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
