//! Opening a store file: creating its tables, checking its format, and migrating a
//! format 1 or 2 file to format 3 (audit chunks, and blob references per scope).

use redb::{ReadableTable, WriteTransaction};

use super::blob_refs;
use super::chunks;
use super::tables::{
    decode_version, encode_row, position, BLOB_REFS, CHUNKS, KEYS, LIVE_V1, MARKS, META,
    PEER_MARKS, RECORDS_V1, VERSIONS,
};
use super::{RedbStore, FORMAT};
use crate::error::StoreError;
use crate::record::Key;

impl RedbStore {
    pub(super) fn init_tables(db: &redb::Database, chunk_items: u64) -> Result<(), StoreError> {
        let txn = db.begin_write()?;
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
                        // Each step in the opening transaction: a crash leaves the file as
                        // it was, to be migrated again at the next open.
                        1 => {
                            migrate_v1(&txn)?;
                            migrate_v2(&txn, chunk_items)?;
                            meta.insert("format", FORMAT.to_be_bytes().as_slice())?;
                        }
                        2 => {
                            migrate_v2(&txn, chunk_items)?;
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
            txn.open_table(CHUNKS)?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// Format 2 to 3: builds the two tables format 3 adds or replaces from `versions-v2`, the
/// audit chunks and the blob references per scope (which replace `blob-refs-v1`).
fn migrate_v2(txn: &WriteTransaction, bound: u64) -> Result<(), StoreError> {
    build_chunks(txn, bound)?;
    blob_refs::build(txn, blob_refs::BUILD_BATCH)
}

/// Sums every origin's versions into audit chunks (runs of `bound`), from scratch.
fn build_chunks(txn: &WriteTransaction, bound: u64) -> Result<(), StoreError> {
    // A format 2 file has no chunk table; start from none whatever it holds.
    txn.delete_table(CHUNKS)?;
    let versions = txn.open_table(VERSIONS)?;
    let mut table = txn.open_table(CHUNKS)?;
    chunks::build(&mut table, &versions, bound)
}

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
