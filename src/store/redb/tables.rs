//! The redb tables of format 3 (and the tables of formats 1 and 2 read or dropped to
//! migrate), and the encoding of their keys and rows.

use redb::TableDefinition;

use crate::error::StoreError;
use crate::hlc::{Hlc, NodeId};
use crate::record::{Key, Scope, Version};
use crate::store::audit::{AuditPoint, Fingerprint};

/// The on-disk format this build reads and writes. Format 1 and 2 files are migrated to it
/// when opened.
pub const FORMAT: u32 = 3;

/// "format" -> u32 BE; "node_id" -> 16 bytes; "clock" -> u64 BE (last issued or observed time);
/// "floor/<scope>" -> u64 BE (the scope's purge floor, absent = 0).
/// "note/<name>" -> bytes: the engine's notes (`Store::note`), present only once written.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta-v1");
/// scope | origin | time BE -> key length u16 BE | key | postcard(Version): every stored
/// version (the latest of its key, tombstones included), in Hlc order per origin.
pub(super) const VERSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("versions-v2");
/// scope | key -> origin | time BE: where each key's stored version is.
pub(super) const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys-v2");
/// Format 1: scope | key -> postcard(Version). Read only to migrate.
pub(super) const RECORDS_V1: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records-v1");
/// Format 1: scope | origin | time BE -> key. Read only to migrate.
pub(super) const LIVE_V1: TableDefinition<&[u8], &[u8]> = TableDefinition::new("live-v1");
/// scope | origin -> time: this node's watermarks.
pub(super) const MARKS: TableDefinition<&[u8], u64> = TableDefinition::new("watermarks-v1");
/// peer -> last seen (NTP64; 0: met, time unknown), and peer | scope | origin -> time: what we
/// learned of each
/// peer's watermarks.
pub(super) const PEER_MARKS: TableDefinition<&[u8], u64> =
    TableDefinition::new("peer-watermarks-v1");

/// hash (32 bytes) | scope -> count u64 BE | size u64 BE: the number of stored versions of
/// the scope that reference the blob (never 0: absent = 0) and the blob's size. All rows of
/// a hash are one short key range, usually of one row.
pub(super) const BLOB_REFS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blob-refs-v2");
/// Formats 1 and 2: hash -> number of stored versions referencing the blob. Only deleted,
/// by the migration that builds `blob-refs-v2`.
pub(super) const BLOB_REFS_V1: TableDefinition<&[u8], u64> = TableDefinition::new("blob-refs-v1");

/// scope | origin | first time BE -> count u64 BE | sum u128 BE | last time BE: the audit
/// chunks. Each is a run of one origin's stored versions in a scope, from the version at
/// `first` to the one at `last` (both stored), with the fingerprint of the versions between;
/// the chunks of an origin do not overlap and cover all its stored versions.
pub(super) const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("audit-chunks-v1");

/// An audit chunk: the stored versions of one `(scope, origin)` with `first <= time <= last`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Chunk {
    /// The time of its first version (the last 8 bytes of its key).
    pub(super) first: u64,
    /// The time of its last version.
    pub(super) last: u64,
    /// Its versions' fingerprint; the count is never 0 (an empty chunk is removed).
    pub(super) fp: Fingerprint,
}

/// A chunk row's value: `count u64 BE | sum u128 BE | last time u64 BE`.
pub(super) fn encode_chunk(chunk: &Chunk) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&chunk.fp.count.to_be_bytes());
    out[8..24].copy_from_slice(&chunk.fp.sum.to_be_bytes());
    out[24..].copy_from_slice(&chunk.last.to_be_bytes());
    out
}

/// A chunk from its row: the key (for `first`) and the value.
pub(super) fn decode_chunk(key: &[u8], value: &[u8]) -> Result<Chunk, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "audit chunk",
    };
    let first = key
        .len()
        .checked_sub(8)
        .and_then(|at| key.get(at..))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(corrupt)?;
    let value: &[u8; 32] = value.try_into().map_err(|_| corrupt())?;
    let mut count = [0u8; 8];
    let mut sum = [0u8; 16];
    let mut last = [0u8; 8];
    count.copy_from_slice(&value[..8]);
    sum.copy_from_slice(&value[8..24]);
    last.copy_from_slice(&value[24..]);
    let chunk = Chunk {
        first: u64::from_be_bytes(first),
        last: u64::from_be_bytes(last),
        fp: Fingerprint {
            count: u64::from_be_bytes(count),
            sum: u128::from_be_bytes(sum),
        },
    };
    if chunk.fp.count == 0 || chunk.last < chunk.first {
        return Err(corrupt());
    }
    Ok(chunk)
}

/// The `(origin, time)` at the end of a `scope | origin | time BE` key (of `versions-v2` or
/// `audit-chunks-v1`) whose scope prefix is `prefix_len` bytes long.
pub(super) fn decode_point(
    key: &[u8],
    prefix_len: usize,
    what: &'static str,
) -> Result<AuditPoint, StoreError> {
    let tail: &[u8; 24] = key
        .get(prefix_len..)
        .and_then(|b| b.try_into().ok())
        .ok_or(StoreError::Corrupt { what })?;
    let mut id = [0u8; 16];
    let mut time = [0u8; 8];
    id.copy_from_slice(&tail[..16]);
    time.copy_from_slice(&tail[16..]);
    Ok(AuditPoint {
        origin: NodeId::from_bytes(id).ok_or(StoreError::Corrupt { what })?,
        time: u64::from_be_bytes(time),
    })
}

pub(super) fn scope_prefix(scope: &Scope) -> Vec<u8> {
    let s = scope.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + s.len() + 40);
    // Scopes are at most 4 + 64 + 1 + 64 bytes by construction.
    out.push(u8::try_from(s.len()).expect("scope text is at most 133 bytes"));
    out.extend_from_slice(s);
    out
}

pub(super) fn record_key(scope: &Scope, key: &Key) -> Vec<u8> {
    let mut out = scope_prefix(scope);
    out.extend_from_slice(key.as_bytes());
    out
}

pub(super) fn origin_key(scope: &Scope, origin: NodeId) -> Vec<u8> {
    let mut out = scope_prefix(scope);
    out.extend_from_slice(&origin.to_bytes());
    out
}

pub(super) fn live_key(scope: &Scope, origin: NodeId, time: u64) -> Vec<u8> {
    let mut out = origin_key(scope, origin);
    out.extend_from_slice(&time.to_be_bytes());
    out
}

/// A key's index entry: the position of its stored version.
pub(super) fn position(hlc: Hlc) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(&hlc.origin().to_bytes());
    out[16..].copy_from_slice(&hlc.time().to_be_bytes());
    out
}

pub(super) fn decode_position(bytes: &[u8]) -> Result<(NodeId, u64), StoreError> {
    let corrupt = || StoreError::Corrupt { what: "key index" };
    let (id, time) = bytes.split_at_checked(16).ok_or_else(corrupt)?;
    let id: [u8; 16] = id.try_into().map_err(|_| corrupt())?;
    let time: [u8; 8] = time.try_into().map_err(|_| corrupt())?;
    let origin = NodeId::from_bytes(id).ok_or_else(corrupt)?;
    Ok((origin, u64::from_be_bytes(time)))
}

/// A versions row: `key length u16 BE | key | postcard(Version)`.
pub(super) fn encode_row(key: &Key, v: &Version) -> Vec<u8> {
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
pub(super) fn split_row(bytes: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    let corrupt = || StoreError::Corrupt { what: "version" };
    let (len, rest) = bytes.split_at_checked(2).ok_or_else(corrupt)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    rest.split_at_checked(len).ok_or_else(corrupt)
}

pub(super) fn decode_row_key(key: &[u8]) -> Result<Key, StoreError> {
    Key::new(key).map_err(|_| StoreError::Corrupt { what: "version" })
}

pub(super) fn decode_row(bytes: &[u8]) -> Result<(Key, Version), StoreError> {
    let (key, version) = split_row(bytes)?;
    Ok((decode_row_key(key)?, decode_version(version)?))
}

pub(super) fn decode_scope_origin(bytes: &[u8]) -> Result<(Scope, NodeId), StoreError> {
    let (scope, origin) = split_scope_origin(bytes)?;
    Ok((decode_scope(scope)?, decode_origin(origin)?))
}

/// A watermark key's scope and origin, both still encoded: a reader of many marks decodes
/// each scope once ([`decode_scope`]), not once per origin.
pub(super) fn split_scope_origin(bytes: &[u8]) -> Result<(&[u8], [u8; 16]), StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "watermark key",
    };
    let (&len, rest) = bytes.split_first().ok_or_else(corrupt)?;
    let len = usize::from(len);
    if rest.len() != len + 16 {
        return Err(corrupt());
    }
    let (scope, id) = rest.split_at(len);
    let id = id
        .try_into()
        .map_err(|_| StoreError::Corrupt { what: "origin" })?;
    Ok((scope, id))
}

/// The scope of a watermark key, from its bytes as [`split_scope_origin`] gives them.
pub(super) fn decode_scope(bytes: &[u8]) -> Result<Scope, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt { what: "scope" })
}

/// The origin of a watermark key, from its bytes as [`split_scope_origin`] gives them.
pub(super) fn decode_origin(id: [u8; 16]) -> Result<NodeId, StoreError> {
    // Built only on failure: an error built and dropped per mark showed in the profile.
    NodeId::from_bytes(id).ok_or_else(|| StoreError::Corrupt { what: "origin" })
}

pub(super) fn decode_version(bytes: &[u8]) -> Result<Version, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt { what: "record" })
}
