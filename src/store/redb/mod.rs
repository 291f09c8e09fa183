//! The redb store. Layout (format 3; see `docs/storage.md`):
//!
//! Composite keys start with the scope as `len u8 | scope bytes`, so every scope is one
//! contiguous key range; origins are their 16 id bytes and times are big-endian, so byte
//! order is Hlc order.
//!
//! Versions are stored by `(scope, origin, time)`, the order in which a sync delivers them,
//! and a small index maps each key to its version's position. A bulk sync then appends to
//! the large table and inserts random keys only into the small one, and the sender reads
//! what a peer lacks with one range scan.
//!
//! The audit chunks sum runs of each origin's versions, in the same transaction as the
//! versions, so that the fingerprint of a large range is a sum of a few stored rows.
//!
//! The blob references count, per blob and scope, the versions that point at the blob, in
//! the same transaction as the versions, so that a blob's readers (its scopes), whether it
//! may be removed, and the list of every referenced blob are each a range read.

use std::path::Path;
use std::sync::Mutex;

use redb::{Database, WriteTransaction};

use crate::error::StoreError;

// For the links in the docs of `RedbStore`, which moved away from the `Store` impl.
#[cfg(doc)]
use super::Store;

mod audit;
mod blob_refs;
mod chunks;
mod migrate;
mod read;
mod tables;
mod write;

pub use self::tables::FORMAT;

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
    writes: Mutex<Writes>,
    /// How to open the file again when an I/O failure (a full disk, an unplugged volume)
    /// left redb refusing every call until the database is reopened; `None` for a custom
    /// backend, which cannot be reopened.
    reopen: Option<Reopen>,
    /// The bound of the audit chunks ([`RedbStore::AUDIT_CHUNK_ITEMS`] but in tests).
    chunk_items: u64,
}

/// Where a file store's database comes from, to open it again.
struct Reopen {
    path: std::path::PathBuf,
    cache_bytes: usize,
}

/// The write side's state, under one lock: redb has one writer at a time, and a read
/// through an open group holds the same lock.
pub(super) struct Writes {
    /// The database; `None` after an I/O failure until it opens again.
    db: Option<Database>,
    /// The write transaction deferred commits are gathered in, if one is open.
    group: Option<WriteTransaction>,
    /// Upserts in `group`.
    grouped: usize,
    /// Whether a transaction committed to redb non-durably is not yet durable.
    dirty: bool,
}

impl Reopen {
    fn open(&self) -> Result<Database, StoreError> {
        Ok(Database::builder()
            .set_cache_size(self.cache_bytes)
            .create(&self.path)?)
    }
}

/// Whether redb refuses calls until the database is reopened (after an I/O failure).
fn needs_reopen(e: &StoreError) -> bool {
    matches!(e, StoreError::Redb(e) if matches!(**e, redb::Error::PreviousIo))
}

impl Writes {
    /// The database, unless an I/O failure closed it.
    pub(super) fn db(&self) -> Result<&Database, StoreError> {
        self.db.as_ref().ok_or(StoreError::Closed)
    }

    /// Whether deferred work is not durable yet (open in the group, or committed to redb
    /// non-durably).
    fn pending(&self) -> bool {
        self.dirty || self.group.is_some()
    }
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

    /// The most versions an audit chunk sums (`B` in docs/storage.md). A fingerprint reads one
    /// row per chunk inside its range and hashes the versions of the at most two chunks its
    /// ends cut, so `B` trades the first cost against the second: at 64, a million versions
    /// make some 15 600 rows (the whole-scope fingerprint reads them in about a millisecond)
    /// and a fingerprint whose ends cut chunks hashes 64 versions on average. The bound is
    /// not part of the format: a file's chunks are valid under any bound.
    pub const AUDIT_CHUNK_ITEMS: usize = 64;

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
        let reopen = Reopen {
            path: path.as_ref().to_owned(),
            cache_bytes,
        };
        let db = reopen.open()?;
        Self::with_chunk_items(db, Some(reopen), Self::AUDIT_CHUNK_ITEMS)
    }

    /// Opens (or creates) the store on a custom redb storage backend (fault injection in
    /// tests, or storage that is not a file).
    ///
    /// # Errors
    /// The backend cannot be opened, or holds an unsupported format.
    pub fn with_backend(backend: impl redb::StorageBackend) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(Self::CACHE_BYTES)
            .create_with_backend(backend)?;
        Self::with_chunk_items(db, None, Self::AUDIT_CHUNK_ITEMS)
    }

    /// Opens (or creates) the store at `path` with audit chunks of at most `chunk_items`
    /// versions, so that tests reach chunk splits and merges with few records.
    ///
    /// # Errors
    /// As [`RedbStore::open`].
    #[doc(hidden)]
    pub fn open_with_chunk_items(
        path: impl AsRef<Path>,
        chunk_items: usize,
    ) -> Result<Self, StoreError> {
        let reopen = Reopen {
            path: path.as_ref().to_owned(),
            cache_bytes: Self::CACHE_BYTES,
        };
        let db = reopen.open()?;
        Self::with_chunk_items(db, Some(reopen), chunk_items)
    }

    fn with_chunk_items(
        db: Database,
        reopen: Option<Reopen>,
        chunk_items: usize,
    ) -> Result<Self, StoreError> {
        let chunk_items = u64::try_from(chunk_items).unwrap_or(u64::MAX).max(1);
        Self::init_tables(&db, chunk_items)?;
        Ok(RedbStore {
            writes: Mutex::new(Writes {
                db: Some(db),
                group: None,
                grouped: 0,
                dirty: false,
            }),
            reopen,
            chunk_items,
        })
    }

    /// Runs `op` on the write side; if it fails because an earlier I/O failure left redb
    /// refusing calls until the database is reopened, reopens it (for a file store) and
    /// runs `op` once more. Deferred commits gathered before the failure are gone with the
    /// old database, as a crash would take them, with their watermark advances.
    fn recovering<T>(
        &self,
        mut op: impl FnMut(&Self, &mut Writes) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut writes = self.lock_writes()?;
        if writes.db.is_none() {
            self.reopen(&mut writes)?;
        }
        match op(self, &mut writes) {
            Err(e) if needs_reopen(&e) && self.reopen.is_some() => {
                self.reopen(&mut writes)?;
                op(self, &mut writes)
            }
            done => done,
        }
    }

    fn reopen(&self, writes: &mut Writes) -> Result<(), StoreError> {
        let Some(reopen) = &self.reopen else {
            return Err(StoreError::Closed);
        };
        writes.group = None;
        writes.grouped = 0;
        writes.dirty = false;
        // The file is locked while the old database lives: close it first.
        writes.db = None;
        let db = reopen.open()?;
        Self::init_tables(&db, self.chunk_items)?;
        tracing::warn!(path = %reopen.path.display(), "reopened the store after an I/O failure");
        writes.db = Some(db);
        Ok(())
    }

    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}
