//! The in-memory blob store: the test double, with the same contract as the filesystem one.

use std::collections::HashMap;
use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{verify, BlobError, BlobStore, BlobWriter};
use crate::hash::Hash;
use crate::record::BlobRef;

type Blobs = HashMap<Hash, Arc<[u8]>>;

/// Blobs held in memory. A blob becomes visible only through a verified
/// [`BlobWriter::finish`], like on disk; "durable" means for the life of the store.
#[derive(Default)]
pub struct MemBlobStore {
    /// Shared with the writers, which publish into it.
    blobs: Arc<RwLock<Blobs>>,
}

impl MemBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Blobs> {
        // Every update is a single map operation, so a poisoned lock (a panic elsewhere
        // while a guard was held) never leaves the map inconsistent.
        self.blobs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Blobs> {
        self.blobs.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlobStore for MemBlobStore {
    fn contains(&self, hash: &Hash) -> Result<bool, BlobError> {
        Ok(self.read_lock().contains_key(hash))
    }

    fn open(&self, hash: &Hash) -> Result<Option<crate::blob::BlobReader>, BlobError> {
        Ok(self.read_lock().get(hash).map(|bytes| {
            // The reader shares the stored bytes; nothing is copied.
            let reader: Box<dyn Read + Send> = Box::new(Cursor::new(Arc::clone(bytes)));
            (bytes.len() as u64, reader)
        }))
    }

    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        Ok(Box::new(MemBlobWriter {
            buf: Vec::new(),
            hasher: blake3::Hasher::new(),
            blobs: Arc::clone(&self.blobs),
        }))
    }

    fn remove(&self, hash: &Hash) -> Result<bool, BlobError> {
        Ok(self.write_lock().remove(hash).is_some())
    }

    fn list(&self) -> Result<Vec<(Hash, u64)>, BlobError> {
        let mut blobs: Vec<_> = self
            .read_lock()
            .iter()
            .map(|(hash, bytes)| (*hash, bytes.len() as u64))
            .collect();
        blobs.sort_unstable();
        Ok(blobs)
    }
}

/// A blob being buffered in memory; see [`BlobWriter`]. Dropping it discards the buffer.
struct MemBlobWriter {
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    blobs: Arc<RwLock<Blobs>>,
}

impl Write for MemBlobWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        self.hasher.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for MemBlobWriter {
    fn finish(self: Box<Self>, expected: Option<&BlobRef>) -> Result<BlobRef, BlobError> {
        let MemBlobWriter { buf, hasher, blobs } = *self;
        let blob = BlobRef {
            hash: hasher.finalize().into(),
            size: buf.len() as u64,
        };
        verify(&blob, expected)?;
        let mut blobs = blobs.write().unwrap_or_else(|p| p.into_inner());
        // Content-addressed: a blob already stored under this hash holds these very bytes.
        blobs.entry(blob.hash).or_insert_with(|| Arc::from(buf));
        Ok(blob)
    }
}
