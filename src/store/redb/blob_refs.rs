//! The blob references (`blob-refs-v2`): for each blob hash and scope, how many stored
//! versions of that scope reference the blob, and the blob's size.
//!
//! The invariant, after every commit: the count of `(hash, scope)` equals the number of rows
//! of `versions-v2` in that scope whose version is a `Put` carrying the blob `hash` (there is
//! no row with count 0), and the size is the blob's size. It is kept in the transaction of
//! the versions (`store::apply_batch`), so the question "who may see this blob" and the
//! question "may it be removed" are answered from the same state as the records.
//!
//! A row's key is `hash | scope prefix`: all rows of a hash form one short key range (one
//! row in the usual case of a blob referenced from one scope), so the total count that
//! decides removal is a prefix scan, and walking the table in key order lists the
//! referenced blobs in hash order.

use redb::{ReadableTable, Table, WriteTransaction};

use super::tables::{decode_version, scope_prefix, split_row, BLOB_REFS, BLOB_REFS_V1, VERSIONS};
use crate::error::StoreError;
use crate::hash::Hash;
use crate::record::{BlobRef, Scope};
use crate::store::ScopeRefs;

type Bytes = &'static [u8];

fn corrupt() -> StoreError {
    StoreError::Corrupt {
        what: "blob reference",
    }
}

/// A row's key: `hash (32) | scope prefix`.
fn row_key(hash: &Hash, prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + prefix.len());
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(prefix);
    out
}

/// The key just after every row of `hash`: a scope prefix starts with its length, at most
/// 133, so `hash | 0xff` sorts after all of them (and before the next hash).
fn end_of(hash: &Hash) -> [u8; 33] {
    let mut out = [0xff; 33];
    out[..32].copy_from_slice(hash.as_bytes());
    out
}

/// A row's value: `count u64 BE | size u64 BE`.
fn encode(refs: &ScopeRefs) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&refs.count.to_be_bytes());
    out[8..].copy_from_slice(&refs.size.to_be_bytes());
    out
}

fn decode(value: &[u8]) -> Result<ScopeRefs, StoreError> {
    let value: &[u8; 16] = value.try_into().map_err(|_| corrupt())?;
    let (count, size) = value.split_at(8);
    let refs = ScopeRefs {
        count: u64::from_be_bytes(count.try_into().map_err(|_| corrupt())?),
        size: u64::from_be_bytes(size.try_into().map_err(|_| corrupt())?),
    };
    // A scope's last reference removes its row.
    if refs.count == 0 {
        return Err(corrupt());
    }
    Ok(refs)
}

/// The hash and the scope of a row's key.
fn decode_key(key: &[u8]) -> Result<(Hash, Scope), StoreError> {
    let (hash, prefix) = key.split_at_checked(32).ok_or_else(corrupt)?;
    let hash = Hash::from_bytes(hash.try_into().map_err(|_| corrupt())?);
    let (&len, text) = prefix.split_first().ok_or_else(corrupt)?;
    if text.len() != usize::from(len) {
        return Err(corrupt());
    }
    let scope = std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(StoreError::Corrupt { what: "scope" })?;
    Ok((hash, scope))
}

/// The rows of `hash`, one per scope that references it, in key order (scopes by length,
/// then text).
fn rows_of(
    refs: &impl ReadableTable<Bytes, Bytes>,
    hash: &Hash,
) -> Result<Vec<(Scope, ScopeRefs)>, StoreError> {
    let end = end_of(hash);
    let mut out = Vec::new();
    for row in refs.range(hash.as_bytes().as_slice()..end.as_slice())? {
        let (k, v) = row?;
        let (_, scope) = decode_key(k.value())?;
        out.push((scope, decode(v.value())?));
    }
    Ok(out)
}

/// How many stored versions reference `hash`, over all scopes.
pub(super) fn total(
    refs: &impl ReadableTable<Bytes, Bytes>,
    hash: &Hash,
) -> Result<u64, StoreError> {
    let end = end_of(hash);
    let mut sum = 0u64;
    for row in refs.range(hash.as_bytes().as_slice()..end.as_slice())? {
        let (_, v) = row?;
        sum = sum.saturating_add(decode(v.value())?.count);
    }
    Ok(sum)
}

/// The scopes that reference `hash`, in scope order.
pub(super) fn scopes(
    refs: &impl ReadableTable<Bytes, Bytes>,
    hash: &Hash,
) -> Result<Vec<Scope>, StoreError> {
    let mut out: Vec<Scope> = rows_of(refs, hash)?.into_iter().map(|(s, _)| s).collect();
    // Key order is by scope length first.
    out.sort();
    Ok(out)
}

/// Up to `limit` distinct referenced blobs after `after`, in hash order, each with the
/// largest size its scopes' rows hold.
pub(super) fn referenced(
    refs: &impl ReadableTable<Bytes, Bytes>,
    after: Option<&Hash>,
    limit: usize,
) -> Result<Vec<BlobRef>, StoreError> {
    let mut out: Vec<BlobRef> = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let start = after.map_or_else(Vec::new, |h| end_of(h).to_vec());
    for row in refs.range(start.as_slice()..)? {
        let (k, v) = row?;
        let (hash, _) = decode_key(k.value())?;
        let size = decode(v.value())?.size;
        if let Some(last) = out.last_mut().filter(|last| last.hash == hash) {
            last.size = last.size.max(size);
            continue;
        }
        // Every row of the page's last blob is read.
        if out.len() == limit {
            break;
        }
        out.push(BlobRef { hash, size });
    }
    Ok(out)
}

/// Adds `delta` to the references of the scope whose prefix is `prefix` to `blob`.
fn adjust_prefix(
    refs: &mut Table<'_, Bytes, Bytes>,
    prefix: &[u8],
    blob: &BlobRef,
    delta: i64,
) -> Result<(), StoreError> {
    let key = row_key(&blob.hash, prefix);
    let current = match refs.get(key.as_slice())? {
        Some(g) => Some(decode(g.value())?),
        None => None,
    };
    match ScopeRefs::adjusted(current, blob, delta) {
        Some(next) => {
            refs.insert(key.as_slice(), encode(&next).as_slice())?;
        }
        None => {
            refs.remove(key.as_slice())?;
        }
    }
    Ok(())
}

/// Adds `delta` to the references of `scope` to `blob`; returns the blob's total count over
/// all scopes after the change.
pub(super) fn adjust(
    refs: &mut Table<'_, Bytes, Bytes>,
    scope: &Scope,
    blob: &BlobRef,
    delta: i64,
) -> Result<u64, StoreError> {
    adjust_prefix(refs, &scope_prefix(scope), blob, delta)?;
    total(&*refs, &blob.hash)
}

/// The most references the migration gathers in memory (48 bytes each, 12 MiB) before it
/// sorts and writes them: memory stays bounded, and each pass writes the table in key
/// order, where counting them in the order of `versions-v2` inserts at random hashes (a
/// million versions with distinct blobs: about 2 s against 5 s, docs/storage.md).
pub(super) const BUILD_BATCH: usize = 1 << 18;

/// A reference found by the migration: the blob, its size, and its scope (an index into
/// the scope prefixes met so far).
struct Found {
    hash: [u8; 32],
    scope: usize,
    size: u64,
}

/// Builds `blob-refs-v2` from `versions-v2`, counting every stored version's blob in its
/// scope, and drops `blob-refs-v1` (formats 1 and 2: counts without scopes, which cannot
/// be split by scope). At migration, inside the opening transaction; `batch` is
/// [`BUILD_BATCH`] but in tests.
pub(super) fn build(txn: &WriteTransaction, batch: usize) -> Result<(), StoreError> {
    let batch = batch.max(1);
    // Start from none, whatever the file holds.
    txn.delete_table(BLOB_REFS_V1)?;
    txn.delete_table(BLOB_REFS)?;
    let versions = txn.open_table(VERSIONS)?;
    let mut refs = txn.open_table(BLOB_REFS)?;
    let bad_key = || StoreError::Corrupt { what: "version" };
    // The scope prefixes in the order `versions-v2` holds them: each scope is one run of
    // its keys, and no prefix is a prefix of another, so the index order is the byte order
    // of the prefixes and of the `hash | prefix` keys.
    let mut prefixes: Vec<Vec<u8>> = Vec::new();
    let mut found: Vec<Found> = Vec::new();
    for row in versions.iter()? {
        let (k, v) = row?;
        let version = decode_version(split_row(v.value())?.1)?;
        let Some(blob) = version.blob() else {
            continue;
        };
        // The key is `scope prefix | origin (16) | time (8)`.
        let k = k.value();
        let prefix = k
            .len()
            .checked_sub(24)
            .and_then(|end| k.get(..end))
            .ok_or_else(bad_key)?;
        if prefix.first().map(|&len| usize::from(len) + 1) != Some(prefix.len()) {
            return Err(bad_key());
        }
        if prefixes.last().map(Vec::as_slice) != Some(prefix) {
            prefixes.push(prefix.to_vec());
        }
        found.push(Found {
            hash: *blob.hash.as_bytes(),
            scope: prefixes.len() - 1,
            size: blob.size,
        });
        if found.len() >= batch {
            write_found(&mut refs, &prefixes, &mut found)?;
        }
    }
    write_found(&mut refs, &prefixes, &mut found)
}

/// Adds the references in `found` to the table, in key order, and empties it. The rows come
/// out as counting the references one by one in table order would leave them: the sort is
/// stable, so the last of a `(hash, scope)` run is the one counted last, whose size the row
/// keeps ([`ScopeRefs::adjusted`]).
fn write_found(
    refs: &mut Table<'_, Bytes, Bytes>,
    prefixes: &[Vec<u8>],
    found: &mut Vec<Found>,
) -> Result<(), StoreError> {
    found.sort_by_key(|f| (f.hash, f.scope));
    for run in found.chunk_by(|a, b| (a.hash, a.scope) == (b.hash, b.scope)) {
        let Some(last) = run.last() else { continue };
        let blob = BlobRef {
            hash: Hash::from_bytes(last.hash),
            size: last.size,
        };
        let delta = i64::try_from(run.len()).expect("a run is at most a batch, held in memory");
        adjust_prefix(refs, &prefixes[last.scope], &blob, delta)?;
    }
    found.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase};

    use super::*;
    use crate::hlc::{Hlc, NodeId};
    use crate::record::{Key, Op, Version};
    use crate::store::redb::tables::{encode_row, live_key};

    type TestError = Box<dyn std::error::Error>;
    /// A row's key and value bytes.
    type Row = (Vec<u8>, Vec<u8>);

    fn blob(name: &str, size: u64) -> BlobRef {
        BlobRef {
            hash: Hash::of(name.as_bytes()),
            size,
        }
    }

    /// Every row of `blob-refs-v2`, as built from `versions` in batches of `batch`.
    fn built(
        versions: &[(Scope, u64, Option<BlobRef>)],
        batch: usize,
    ) -> Result<Vec<Row>, TestError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        let origin = NodeId::from_bytes([3; 16]).ok_or("a non-zero id")?;
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(VERSIONS)?;
            for (scope, time, blob) in versions {
                let version = Version {
                    hlc: Hlc::new(*time, origin),
                    op: Op::Put {
                        value: Vec::new(),
                        blob: *blob,
                    },
                };
                let key = Key::new(format!("k{time}").into_bytes())?;
                table.insert(
                    live_key(scope, origin, *time).as_slice(),
                    encode_row(&key, &version).as_slice(),
                )?;
            }
        }
        build(&txn, batch)?;
        txn.commit()?;
        let read = db.begin_read()?;
        let mut rows = Vec::new();
        for row in read.open_table(BLOB_REFS)?.iter()? {
            let (k, v) = row?;
            rows.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(rows)
    }

    /// Batches of any size build the table that counting the versions one by one in table
    /// order leaves: a `(hash, scope)` cut across batches is summed, and its size is the one
    /// of its last version in table order.
    #[test]
    fn the_build_is_the_same_in_batches_of_any_size() -> Result<(), TestError> {
        let (shared, app) = (Scope::shared(), Scope::app("a", "b")?);
        let mut versions = Vec::new();
        for time in 1..=40u64 {
            let scope = if time % 3 == 0 { &app } else { &shared };
            let file = match time % 4 {
                0 => None,
                // A size that disagrees now and then.
                n => Some(blob(&format!("f{n}"), 10 * n + u64::from(time % 12 == 1))),
            };
            versions.push((scope.clone(), time, file));
        }
        let whole = built(&versions, BUILD_BATCH)?;
        for batch in [1, 2, 3, 7] {
            assert_eq!(built(&versions, batch)?, whole, "batches of {batch}");
        }
        // One row per (file, scope): f1, f2, f3 in both scopes.
        assert_eq!(whole.len(), 6);
        // f1 in `shared`: times 1, 5, ..., 37 but 9, 21 and 33 (in `app/a/b`); the last,
        // 37, gave the size 11 that disagrees with the others'.
        let mut key = blob("f1", 10).hash.as_bytes().to_vec();
        key.extend_from_slice(&scope_prefix(&shared));
        let want = encode(&ScopeRefs { count: 7, size: 11 });
        assert!(whole.contains(&(key, want.to_vec())), "{whole:?}");
        Ok(())
    }
}
