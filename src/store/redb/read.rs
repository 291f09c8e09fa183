//! Reads: the snapshot [`Reader`], the [`GroupReader`] through an open group, and the
//! read functions both share.
//!
//! One file over 600 lines because the snapshot reader and the group reader are two faces of the
//! same read functions, written once here for both.

use std::sync::MutexGuard;

use redb::{ReadOnlyTable, ReadTransaction, ReadableTable, WriteTransaction};

use super::audit;
use super::blob_refs;
use super::tables::{
    decode_origin, decode_position, decode_row, decode_scope, decode_version, live_key, record_key,
    scope_prefix, split_row, split_scope_origin, BLOB_REFS, CHUNKS, KEYS, MARKS, META, PEER_MARKS,
    VERSIONS,
};
use super::{RedbStore, Writes};
use crate::error::StoreError;
use crate::hash::Hash;
use crate::hlc::{Hlc, NodeId};
use crate::record::{BlobRef, Key, Scope, Version};
use crate::store::{AuditPoint, AuditRange, Fingerprint, KeyRange, StoreRead};
use crate::watermark::ScopedWatermarks;

/// A reader on a committed snapshot (redb's MVCC): used while no group is open.
pub(super) struct Reader {
    pub(super) _txn: ReadTransaction,
    pub(super) meta: ReadOnlyTable<&'static str, &'static [u8]>,
    pub(super) versions: ReadOnlyTable<&'static [u8], &'static [u8]>,
    pub(super) keys: ReadOnlyTable<&'static [u8], &'static [u8]>,
    pub(super) marks: ReadOnlyTable<&'static [u8], u64>,
    pub(super) peers: ReadOnlyTable<&'static [u8], u64>,
    pub(super) blob_refs: ReadOnlyTable<&'static [u8], &'static [u8]>,
    pub(super) chunks: ReadOnlyTable<&'static [u8], &'static [u8]>,
}

/// A reader through the open group: it holds the write lock, so no commit interleaves with
/// it, and opens the tables it needs per call (a write transaction lends each table to one
/// user at a time).
pub(super) struct GroupReader<'a> {
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
    pub(super) static HELD: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<'a> GroupReader<'a> {
    pub(super) fn new(store: &RedbStore, writes: MutexGuard<'a, Writes>) -> Self {
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
    // Rows come in key order and a key starts with its scope, so the marks of a scope come
    // together: each scope is decoded once, and its marks join `out` in one build.
    let mut scope: Option<Scope> = None;
    let mut marks = Vec::new();
    for row in rows {
        let (k, t) = row?;
        let (name, id) = split_scope_origin(&k.value()[skip..])?;
        if scope.as_ref().is_none_or(|s| s.as_str().as_bytes() != name) {
            if let Some(done) = scope.replace(decode_scope(name)?) {
                out.scope_mut(&done).extend(marks.drain(..));
            }
        }
        marks.push(Hlc::new(t.value(), decode_origin(id)?));
    }
    if let Some(done) = scope {
        out.scope_mut(&done).extend(marks);
    }
    Ok(out)
}

// The reads, written once over redb's `ReadableTable`, so that snapshot readers, group
// readers and the write transaction's own lookups share them.

type Bytes = &'static [u8];

/// The stored version of `key` at its index entry `position`.
pub(super) fn version_at(
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

/// [`StoreRead::live_count`] from the audit chunks: the live versions of one origin in
/// `(after, upto]` are the audit range `[(origin, after + 1), (origin, upto + 1))`.
fn live_count(
    versions: &impl ReadableTable<Bytes, Bytes>,
    chunks: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    origin: NodeId,
    after: Option<Hlc>,
    upto: Hlc,
    cap: u64,
) -> Result<u64, StoreError> {
    let from = match after {
        Some(a) => match a.time().checked_add(1) {
            Some(t) => t,
            None => return Ok(0),
        },
        None => 0,
    };
    let Some(past) = upto.time().checked_add(1) else {
        // No range end past the last time there is: count the versions themselves.
        let limit = usize::try_from(cap).unwrap_or(usize::MAX);
        return Ok(live_versions(versions, scope, origin, after, upto, limit)?.len() as u64);
    };
    let range = AuditRange {
        lo: Some(AuditPoint { origin, time: from }),
        hi: Some(AuditPoint { origin, time: past }),
    };
    audit::count(versions, chunks, scope, &range, cap)
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

/// The META key holding `scope`'s purge floor.
pub(super) fn floor_key(scope: &Scope) -> String {
    format!("{FLOOR_PREFIX}{scope}")
}

/// The prefix of the META keys holding purge floors: `floor/<scope>` -> u64 BE.
pub(super) const FLOOR_PREFIX: &str = "floor/";

pub(super) fn stored_floors(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<std::collections::BTreeMap<Scope, u64>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "purge floor",
    };
    let mut out = std::collections::BTreeMap::new();
    // '0' follows '/' in ASCII: the range holds exactly the keys with the prefix.
    for row in meta.range(FLOOR_PREFIX.."floor0")? {
        let (k, v) = row?;
        let scope: Scope = k.value()[FLOOR_PREFIX.len()..]
            .parse()
            .map_err(|_| corrupt())?;
        let time = u64::from_be_bytes(v.value().try_into().map_err(|_| corrupt())?);
        out.insert(scope, time);
    }
    Ok(out)
}

pub(super) fn stored_floor(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    scope: &Scope,
) -> Result<u64, StoreError> {
    match meta.get(floor_key(scope).as_str())? {
        Some(v) => Ok(u64::from_be_bytes(v.value().try_into().map_err(|_| {
            StoreError::Corrupt {
                what: "purge floor",
            }
        })?)),
        None => Ok(0),
    }
}

/// A peer's last-seen time from its `peer -> seen` row (0: met, time unknown).
fn seen_of(
    peers: &impl ReadableTable<&'static [u8], u64>,
    peer: NodeId,
) -> Result<Option<u64>, StoreError> {
    Ok(peers
        .get(peer.to_bytes().as_slice())?
        .map(|g| g.value())
        .filter(|t| *t > 0))
}

pub(super) fn stored_clock(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
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

    fn live_count(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        cap: u64,
    ) -> Result<u64, StoreError> {
        live_count(
            &self.versions,
            &self.chunks,
            scope,
            origin,
            after,
            upto,
            cap,
        )
    }

    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError> {
        blob_refs::total(&self.blob_refs, hash)
    }

    fn blob_scopes(&self, hash: &Hash) -> Result<Vec<Scope>, StoreError> {
        blob_refs::scopes(&self.blob_refs, hash)
    }

    fn referenced_blobs(
        &self,
        after: Option<&Hash>,
        limit: usize,
    ) -> Result<Vec<BlobRef>, StoreError> {
        blob_refs::referenced(&self.blob_refs, after, limit)
    }

    fn scopes(&self) -> Result<Vec<Scope>, StoreError> {
        stored_scopes(&self.marks, &self.keys)
    }

    fn floors(&self) -> Result<std::collections::BTreeMap<Scope, u64>, StoreError> {
        stored_floors(&self.meta)
    }

    fn peer_seen(&self, peer: NodeId) -> Result<Option<u64>, StoreError> {
        seen_of(&self.peers, peer)
    }

    fn clock(&self) -> Result<u64, StoreError> {
        stored_clock(&self.meta)
    }

    fn fingerprint(&self, scope: &Scope, range: &AuditRange) -> Result<Fingerprint, StoreError> {
        audit::fingerprint(&self.versions, &self.chunks, scope, range)
    }

    fn audit_split(
        &self,
        scope: &Scope,
        range: &AuditRange,
        parts: usize,
    ) -> Result<Vec<AuditPoint>, StoreError> {
        audit::split(&self.versions, &self.chunks, scope, range, parts)
    }

    fn audit_items(
        &self,
        scope: &Scope,
        range: &AuditRange,
        limit: usize,
    ) -> Result<Vec<(Hlc, Key)>, StoreError> {
        audit::items(&self.versions, scope, range, limit)
    }

    fn version_at(&self, scope: &Scope, hlc: Hlc) -> Result<Option<(Key, Version)>, StoreError> {
        audit::version_by_hlc(&self.versions, scope, hlc)
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

    fn live_count(
        &self,
        scope: &Scope,
        origin: NodeId,
        after: Option<Hlc>,
        upto: Hlc,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let txn = self.txn();
        live_count(
            &txn.open_table(VERSIONS)?,
            &txn.open_table(CHUNKS)?,
            scope,
            origin,
            after,
            upto,
            cap,
        )
    }

    fn blob_refs(&self, hash: &Hash) -> Result<u64, StoreError> {
        blob_refs::total(&self.txn().open_table(BLOB_REFS)?, hash)
    }

    fn blob_scopes(&self, hash: &Hash) -> Result<Vec<Scope>, StoreError> {
        blob_refs::scopes(&self.txn().open_table(BLOB_REFS)?, hash)
    }

    fn referenced_blobs(
        &self,
        after: Option<&Hash>,
        limit: usize,
    ) -> Result<Vec<BlobRef>, StoreError> {
        blob_refs::referenced(&self.txn().open_table(BLOB_REFS)?, after, limit)
    }

    fn scopes(&self) -> Result<Vec<Scope>, StoreError> {
        let txn = self.txn();
        stored_scopes(&txn.open_table(MARKS)?, &txn.open_table(KEYS)?)
    }

    fn floors(&self) -> Result<std::collections::BTreeMap<Scope, u64>, StoreError> {
        stored_floors(&self.txn().open_table(META)?)
    }

    fn peer_seen(&self, peer: NodeId) -> Result<Option<u64>, StoreError> {
        seen_of(&self.txn().open_table(PEER_MARKS)?, peer)
    }

    fn clock(&self) -> Result<u64, StoreError> {
        stored_clock(&self.txn().open_table(META)?)
    }

    fn fingerprint(&self, scope: &Scope, range: &AuditRange) -> Result<Fingerprint, StoreError> {
        let txn = self.txn();
        audit::fingerprint(
            &txn.open_table(VERSIONS)?,
            &txn.open_table(CHUNKS)?,
            scope,
            range,
        )
    }

    fn audit_split(
        &self,
        scope: &Scope,
        range: &AuditRange,
        parts: usize,
    ) -> Result<Vec<AuditPoint>, StoreError> {
        let txn = self.txn();
        audit::split(
            &txn.open_table(VERSIONS)?,
            &txn.open_table(CHUNKS)?,
            scope,
            range,
            parts,
        )
    }

    fn audit_items(
        &self,
        scope: &Scope,
        range: &AuditRange,
        limit: usize,
    ) -> Result<Vec<(Hlc, Key)>, StoreError> {
        audit::items(&self.txn().open_table(VERSIONS)?, scope, range, limit)
    }

    fn version_at(&self, scope: &Scope, hlc: Hlc) -> Result<Option<(Key, Version)>, StoreError> {
        audit::version_by_hlc(&self.txn().open_table(VERSIONS)?, scope, hlc)
    }
}

pub(super) fn read_clock(bytes: Option<Vec<u8>>) -> Result<u64, StoreError> {
    match bytes {
        None => Ok(0),
        Some(b) => Ok(u64::from_be_bytes(
            b.as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "clock" })?,
        )),
    }
}
