//! How a simulation opens, backs up and restores its nodes: the [`Backend`] trait, its
//! in-memory and redb-file backends, and the deterministic node ids they share.

use std::path::PathBuf;
use std::sync::Arc;

use super::sim_config;
use crate::blob::{write_blob, BlobStore, FsBlobStore, MemBlobStore};
use crate::engine::{SyncEngine, BLOB_DIR, DB_FILE};
use crate::hlc::{ManualTime, NodeId};
use crate::record::BlobRef;
use crate::store::{MemStore, RedbStore, Store};

/// Copies every blob of `from` into `to`.
///
/// # Errors
/// A blob store failure.
pub fn copy_blobs(from: &dyn BlobStore, to: &dyn BlobStore) -> Result<(), String> {
    for (hash, _) in from.list().map_err(|e| format!("{e:?}"))? {
        if let Some((size, mut reader)) = from.open(&hash).map_err(|e| format!("{e:?}"))? {
            write_blob(to, &mut reader, Some(&BlobRef { hash, size }))
                .map_err(|e| format!("{e:?}"))?;
        }
    }
    Ok(())
}

/// How a simulation opens, backs up and restores its nodes.
pub trait Backend {
    /// Opens node `i` (any previous engine of it has been dropped), under a fresh node id
    /// if `fresh_identity`.
    ///
    /// # Errors
    /// The engine could not be opened.
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine>;

    /// Backs up node `i` (closed).
    ///
    /// # Errors
    /// A description of the failure.
    fn snapshot(&mut self, i: usize) -> Result<(), String>;

    /// Captures what node `i`'s storage would hold after a power loss *now* (only what was
    /// synced), so that the next `open(i)` sees exactly that. Called while the engine is
    /// still alive (dropping it flushes). `false` if this backend cannot crash a node: the
    /// action is then a plain restart.
    ///
    /// # Errors
    /// A description of the failure.
    fn crash(&mut self, i: usize) -> Result<bool, String> {
        let _ = i;
        Ok(false)
    }

    /// Puts node `i`'s last backup back (closed) and discards it; `false` if it has none.
    ///
    /// # Errors
    /// A description of the failure.
    fn restore(&mut self, i: usize) -> Result<bool, String>;
}

/// Nodes on in-memory stores.
pub struct MemBackend {
    time: Arc<ManualTime>,
    stores: Vec<Arc<MemStore>>,
    blobs: Vec<Arc<MemBlobStore>>,
    backups: Vec<Option<(MemStore, MemBlobStore)>>,
    ids: SimIds,
}

/// Deterministic node ids, so that a failing seed replays the same run: node `i` starts as
/// `[i + 1; 16]`, and restored nodes take `[0x80 + k; 16]` for the k-th restore.
#[derive(Default)]
pub(super) struct SimIds {
    restores: u8,
}

impl SimIds {
    fn initial(i: usize) -> NodeId {
        let b = u8::try_from(i + 1).expect("simulations have few nodes");
        NodeId::from_bytes([b; 16]).expect("non-zero id")
    }

    fn fresh(&mut self) -> NodeId {
        self.restores = self.restores.wrapping_add(1);
        NodeId::from_bytes([0x80 | (self.restores & 0x7f); 16]).expect("non-zero id")
    }

    /// Gives `store` its deterministic id, then opens an engine on it.
    pub(super) fn open(
        &mut self,
        store: Box<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        i: usize,
        fresh: bool,
        time: &Arc<ManualTime>,
    ) -> crate::Result<SyncEngine> {
        if fresh {
            store.replace_identity(self.fresh())?;
        } else {
            store.identity(Self::initial(i))?;
        }
        SyncEngine::with_stores(store, blobs, sim_config(time))
    }
}

impl MemBackend {
    /// `n` empty in-memory nodes reading `time`.
    pub fn new(n: usize, time: Arc<ManualTime>) -> Self {
        MemBackend {
            time,
            stores: (0..n).map(|_| Arc::new(MemStore::new())).collect(),
            blobs: (0..n).map(|_| Arc::new(MemBlobStore::new())).collect(),
            backups: (0..n).map(|_| None).collect(),
            ids: SimIds::default(),
        }
    }
}

impl Backend for MemBackend {
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine> {
        self.ids.open(
            Box::new(self.stores[i].clone()),
            self.blobs[i].clone(),
            i,
            fresh_identity,
            &self.time,
        )
    }

    fn snapshot(&mut self, i: usize) -> Result<(), String> {
        let blobs = MemBlobStore::new();
        copy_blobs(&*self.blobs[i], &blobs)?;
        self.backups[i] = Some((self.stores[i].duplicate(), blobs));
        Ok(())
    }

    fn restore(&mut self, i: usize) -> Result<bool, String> {
        let Some((store, blobs)) = self.backups[i].take() else {
            return Ok(false);
        };
        self.stores[i] = Arc::new(store);
        self.blobs[i] = Arc::new(blobs);
        Ok(true)
    }
}

/// Nodes on redb files under one directory: `n<i>/highwater.redb` and `n<i>/blobs/`;
/// backups `n<i>.backup` and `n<i>.blobs-backup/`.
pub struct RedbBackend {
    time: Arc<ManualTime>,
    root: PathBuf,
    ids: SimIds,
}

impl RedbBackend {
    /// Nodes under `root` reading `time`.
    pub fn new(root: impl Into<PathBuf>, time: Arc<ManualTime>) -> Self {
        RedbBackend {
            time,
            root: root.into(),
            ids: SimIds::default(),
        }
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}"))
    }

    fn backup(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}.backup"))
    }

    fn blob_backup(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}.blobs-backup"))
    }
}

impl Backend for RedbBackend {
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine> {
        let dir = self.dir(i);
        std::fs::create_dir_all(&dir).map_err(|source| crate::error::StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let store = Box::new(RedbStore::open(dir.join(DB_FILE))?);
        let blobs = Arc::new(FsBlobStore::open(dir.join(BLOB_DIR))?);
        self.ids.open(store, blobs, i, fresh_identity, &self.time)
    }

    fn snapshot(&mut self, i: usize) -> Result<(), String> {
        std::fs::copy(self.dir(i).join(DB_FILE), self.backup(i))
            .map_err(|e| format!("backup node {i}: {e}"))?;
        let err = |e| format!("backup blobs of node {i}: {e:?}");
        let _ = std::fs::remove_dir_all(self.blob_backup(i));
        let live = FsBlobStore::open(self.dir(i).join(BLOB_DIR)).map_err(err)?;
        let backup = FsBlobStore::open(self.blob_backup(i)).map_err(err)?;
        copy_blobs(&live, &backup)
    }

    fn restore(&mut self, i: usize) -> Result<bool, String> {
        if !self.backup(i).exists() {
            return Ok(false);
        }
        std::fs::rename(self.backup(i), self.dir(i).join(DB_FILE))
            .map_err(|e| format!("restore node {i}: {e}"))?;
        let blobs = self.dir(i).join(BLOB_DIR);
        std::fs::remove_dir_all(&blobs).map_err(|e| format!("restore node {i}: {e}"))?;
        std::fs::rename(self.blob_backup(i), blobs)
            .map_err(|e| format!("restore node {i}: {e}"))?;
        Ok(true)
    }
}
