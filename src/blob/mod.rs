//! Content-addressed blob storage: files named by their blake3 hash.
//!
//! A blob is written through a [`BlobWriter`] that hashes the bytes as they arrive into a
//! temporary file; [`BlobWriter::finish`] checks the hash (and size) against what the caller
//! expected, fsyncs, and renames the file into place. A mismatch deletes the temporary file
//! and is an error: nothing unverified is ever visible under a hash. Dropping an unfinished
//! writer deletes its temporary file too. Paths are derived only from a validated
//! [`Hash`](struct@Hash),
//! never from text a peer sent.

mod fs;
mod mem;
pub(crate) mod pipe;

pub use self::fs::FsBlobStore;
pub use self::mem::MemBlobStore;

use std::io::{Read, Write};
use std::path::PathBuf;

use crate::hash::Hash;
use crate::record::BlobRef;

/// Errors of a blob store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Filesystem error.
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes written do not hash to the expected hash; nothing was stored.
    #[error("content hashes to {actual}, expected {expected}")]
    HashMismatch {
        /// The hash the caller expected.
        expected: Hash,
        /// The hash of the bytes received.
        actual: Hash,
    },
    /// The bytes written are not the expected size; nothing was stored.
    #[error("content of blob {hash} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The blob.
        hash: Hash,
        /// The size expected.
        expected: u64,
        /// The size received.
        actual: u64,
    },
    /// Reading the source of the blob's bytes failed.
    #[error("reading blob content failed: {0}")]
    Source(#[source] std::io::Error),
}

/// A blob's size and a chunked reader over its bytes.
pub type BlobReader = (u64, Box<dyn Read + Send>);

/// A blob being written: bytes go in through [`Write`], [`BlobWriter::finish`] verifies and
/// publishes them. Dropping it unfinished discards everything.
pub trait BlobWriter: Write + Send {
    /// Verifies the bytes against `expected` (if given), makes them durable and visible
    /// under their hash, and returns their reference.
    ///
    /// # Errors
    /// [`BlobError::HashMismatch`] / [`BlobError::SizeMismatch`] (nothing is stored), or an
    /// I/O failure.
    fn finish(self: Box<Self>, expected: Option<&BlobRef>) -> Result<BlobRef, BlobError>;

    /// [`BlobWriter::finish`], except that the blob's name (the directory entry that makes
    /// it visible) may become durable only at the store's next [`BlobStore::sync_names`]:
    /// the content itself is durable when this returns, and the blob is visible at once.
    /// Many blobs finished this way cost one synchronisation of each directory they went
    /// into, instead of one each. A caller must call `sync_names` before it commits
    /// anything that relies on the blob surviving a crash. The default finishes durably.
    ///
    /// # Errors
    /// As [`BlobWriter::finish`].
    fn finish_unsynced(self: Box<Self>, expected: Option<&BlobRef>) -> Result<BlobRef, BlobError> {
        self.finish(expected)
    }
}

/// A store of immutable blobs named by their blake3 hash.
///
/// Contract: a blob is visible (`contains`, `open`) only after a successful `finish`, with
/// exactly the bytes that hash to its name, and then survives a crash; `remove` deletes it.
/// Concurrent writers of the same content are fine: the last rename wins with equal bytes.
pub trait BlobStore: Send + Sync {
    /// Whether the blob is stored.
    ///
    /// # Errors
    /// An I/O failure.
    fn contains(&self, hash: &Hash) -> Result<bool, BlobError>;

    /// The blob's size and a reader over its bytes (read in chunks, never loaded whole), or
    /// `None` if it is not stored.
    ///
    /// # Errors
    /// An I/O failure.
    fn open(&self, hash: &Hash) -> Result<Option<BlobReader>, BlobError>;

    /// A writer for a new blob.
    ///
    /// # Errors
    /// The temporary file cannot be created.
    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError>;

    /// Deletes the blob; `false` if it was not stored.
    ///
    /// # Errors
    /// An I/O failure.
    fn remove(&self, hash: &Hash) -> Result<bool, BlobError>;

    /// Every stored blob with its size.
    ///
    /// # Errors
    /// An I/O failure.
    fn list(&self) -> Result<Vec<(Hash, u64)>, BlobError>;

    /// Makes durable the names of every blob finished with
    /// [`BlobWriter::finish_unsynced`] before this call: when it returns `Ok`, they survive
    /// a crash. Calls may come from several threads; none returns before the names that
    /// were pending when it began are durable. The default has nothing to do.
    ///
    /// # Errors
    /// An I/O failure; the names not made durable stay pending for the next call.
    fn sync_names(&self) -> Result<(), BlobError> {
        Ok(())
    }
}

/// Copies `source` into a new blob of `store` in chunks and verifies it against `expected`.
///
/// # Errors
/// Reading `source` failed ([`BlobError::Source`]), the content does not match `expected`,
/// or the store failed. Nothing is stored on error.
pub fn write_blob(
    store: &dyn BlobStore,
    source: &mut dyn Read,
    expected: Option<&BlobRef>,
) -> Result<BlobRef, BlobError> {
    copied(store, source)?.finish(expected)
}

/// [`write_blob`], finished with [`BlobWriter::finish_unsynced`]: the blob's name becomes
/// durable at the store's next [`BlobStore::sync_names`], which the caller must call before
/// it commits anything that relies on the blob surviving a crash.
///
/// # Errors
/// As [`write_blob`].
pub fn write_blob_unsynced(
    store: &dyn BlobStore,
    source: &mut dyn Read,
    expected: Option<&BlobRef>,
) -> Result<BlobRef, BlobError> {
    copied(store, source)?.finish_unsynced(expected)
}

/// A writer of `store` that `source` was copied into, not yet finished.
fn copied(store: &dyn BlobStore, source: &mut dyn Read) -> Result<Box<dyn BlobWriter>, BlobError> {
    let mut writer = store.writer()?;
    copy_chunks(source, &mut writer).map_err(|e| match e {
        CopyError::Read(e) => BlobError::Source(e),
        CopyError::Write(e) => BlobError::Io {
            path: PathBuf::from("<blob writer>"),
            source: e,
        },
    })?;
    Ok(writer)
}

/// Which side of a copy failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source.
    Read(std::io::Error),
    /// Writing the destination.
    Write(std::io::Error),
}

/// The chunk size of blob copies.
pub const CHUNK: usize = 256 << 10;

/// Copies `from` to `to` in [`CHUNK`]-sized pieces; returns the bytes copied.
///
/// # Errors
/// Which side failed.
pub fn copy_chunks(from: &mut dyn Read, to: &mut dyn Write) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

/// Checks hashed content against an expectation.
///
/// # Errors
/// The mismatch.
pub fn verify(actual: &BlobRef, expected: Option<&BlobRef>) -> Result<(), BlobError> {
    match expected {
        Some(e) if e.hash != actual.hash => Err(BlobError::HashMismatch {
            expected: e.hash,
            actual: actual.hash,
        }),
        Some(e) if e.size != actual.size => Err(BlobError::SizeMismatch {
            hash: e.hash,
            expected: e.size,
            actual: actual.size,
        }),
        _ => Ok(()),
    }
}
