//! A blob written from async code: the bytes a transfer receives go through a short queue
//! to a blocking thread that hashes and writes them, so the task receiving them goes back
//! to the network at once instead of waiting on the hash and the disk, and the two overlap.
//!
//! The [`Write`] side is what a transport's `fetch_blob` writes into. A chunk is copied
//! into the queue; when [`QUEUE_CHUNKS`] chunks wait, the writer waits too (the disk holds
//! the transfer back, and memory stays bounded), on a multi-threaded runtime through
//! `block_in_place` so the runtime's other tasks move to another thread meanwhile. Outside
//! a tokio runtime the bytes are written inline, as before.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use super::{BlobError, BlobWriter};
use crate::blocking::run_blocking;
use crate::poison::lock;
use crate::record::BlobRef;

/// Chunks that may wait for the writing thread (a chunk is what the transport hands over
/// in one write: at most a read buffer, 256 KiB from a blob store).
pub const QUEUE_CHUNKS: usize = 8;

/// What the receiving side sends the writing thread.
enum Piece {
    Bytes(Vec<u8>),
    /// Every byte was sent: verify against this and publish.
    Finish(BlobRef),
}

/// What the writing thread reports: its first write error, seen by the next `write`.
#[derive(Default)]
struct Failed {
    any: AtomicBool,
    error: Mutex<Option<io::Error>>,
}

impl Failed {
    fn set(&self, e: io::Error) {
        lock(&self.error).get_or_insert(e);
        self.any.store(true, Ordering::Release);
    }

    /// The error to report for a write after a failure (the first one, once; then a copy
    /// of its kind and message).
    fn check(&self) -> io::Result<()> {
        if !self.any.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(match &*lock(&self.error) {
            Some(e) => io::Error::new(e.kind(), e.to_string()),
            None => io::Error::other("writing the blob failed"),
        })
    }
}

/// A blob being written on a thread of its own (or inline outside a runtime).
pub struct PipedWriter {
    mode: Mode,
}

enum Mode {
    Inline(Box<dyn BlobWriter>),
    Piped {
        tx: SyncSender<Piece>,
        failed: Arc<Failed>,
        /// The thread's outcome: `Some` blob once finished, `None` if abandoned.
        done: tokio::sync::oneshot::Receiver<Result<Option<BlobRef>, BlobError>>,
        /// Whether waiting may hand this thread's other tasks to the runtime's others.
        multi_thread: bool,
    },
}

impl PipedWriter {
    /// Starts writing into `writer`: on a blocking thread under a tokio runtime, inline
    /// otherwise. Dropped unfinished, the blob is discarded (the writer is dropped).
    pub fn start(writer: Box<dyn BlobWriter>) -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return PipedWriter {
                mode: Mode::Inline(writer),
            };
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE_CHUNKS);
        let failed = Arc::new(Failed::default());
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let seen = failed.clone();
        runtime.spawn_blocking(move || {
            let _ = done_tx.send(write_from(writer, rx, &seen));
        });
        let multi_thread = runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        PipedWriter {
            mode: Mode::Piped {
                tx,
                failed,
                done,
                multi_thread,
            },
        }
    }

    /// Verifies what was written against `expected` and publishes it with
    /// [`BlobWriter::finish_unsynced`] (the caller syncs the names before relying on
    /// them), off the runtime's worker threads.
    ///
    /// # Errors
    /// A write failed, the content does not match, or the store failed: nothing is stored.
    pub async fn finish(self, expected: BlobRef) -> Result<BlobRef, BlobError> {
        let gone = || BlobError::Source(io::Error::other("the blob's writing thread stopped"));
        match self.mode {
            Mode::Inline(writer) => run_blocking(move || writer.finish_unsynced(Some(&expected)))
                .await
                .map_err(|e| BlobError::Source(io::Error::other(e)))?,
            Mode::Piped {
                tx,
                done,
                multi_thread,
                ..
            } => {
                send(&tx, Piece::Finish(expected), multi_thread).map_err(|()| gone())?;
                drop(tx);
                done.await
                    .map_err(|_| gone())?
                    .and_then(|b| b.ok_or_else(gone))
            }
        }
    }
}

/// The writing thread: writes the chunks as they come until `Finish`, then finishes the
/// blob. A write error is reported to the sender (its next write fails) and the rest
/// discarded; the sender going away without `Finish` abandons the blob.
fn write_from(
    mut writer: Box<dyn BlobWriter>,
    rx: mpsc::Receiver<Piece>,
    failed: &Failed,
) -> Result<Option<BlobRef>, BlobError> {
    let mut error = None;
    for piece in rx {
        match piece {
            Piece::Bytes(bytes) if error.is_none() => {
                if let Err(e) = writer.write_all(&bytes) {
                    error = Some(io::Error::new(e.kind(), e.to_string()));
                    failed.set(e);
                }
            }
            Piece::Bytes(_) => {}
            Piece::Finish(expected) => {
                return match error {
                    Some(e) => Err(BlobError::Source(e)),
                    None => writer.finish_unsynced(Some(&expected)).map(Some),
                };
            }
        }
    }
    Ok(None)
}

/// Queues `piece`, waiting for room if the queue is full (through `block_in_place` on a
/// multi-threaded runtime). Fails if the writing thread is gone.
fn send(tx: &SyncSender<Piece>, piece: Piece, multi_thread: bool) -> Result<(), ()> {
    match tx.try_send(piece) {
        Ok(()) => Ok(()),
        Err(TrySendError::Disconnected(_)) => Err(()),
        Err(TrySendError::Full(piece)) if multi_thread => {
            tokio::task::block_in_place(|| tx.send(piece)).map_err(|_| ())
        }
        // A current-thread runtime cannot hand its tasks over: the thread waits, as it
        // would have on the disk (the writing thread is a blocking one, so it gets there).
        Err(TrySendError::Full(piece)) => tx.send(piece).map_err(|_| ()),
    }
}

impl Write for PipedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.mode {
            Mode::Inline(writer) => writer.write(buf),
            Mode::Piped {
                tx,
                failed,
                multi_thread,
                ..
            } => {
                failed.check()?;
                send(tx, Piece::Bytes(buf.to_vec()), *multi_thread).map_err(|()| {
                    failed
                        .check()
                        .err()
                        .unwrap_or_else(|| io::Error::other("the blob's writing thread stopped"))
                })?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.mode {
            Mode::Inline(writer) => writer.flush(),
            Mode::Piped { failed, .. } => failed.check(),
        }
    }
}
