//! A blob written from async code: the bytes a transfer receives go through a short queue
//! to a blocking thread that hashes and writes them, so the task receiving them goes back
//! to the network at once instead of waiting on the hash and the disk, and the two overlap.
//!
//! The [`Write`] side is what a transport's `fetch_blob` writes into. Writes are gathered
//! into buffers of [`CHUNK`] bytes (a network read is often a few KiB: one hand-over per
//! read would cost a thread wake-up each), and a full buffer goes into the queue; when
//! [`QUEUE_CHUNKS`] wait, the writer waits too (the disk holds the transfer back, and
//! memory stays bounded), on a multi-threaded runtime through `block_in_place` so the
//! runtime's other tasks move to another thread meanwhile. The writing thread sends each
//! buffer back once written, so a transfer reuses the same few instead of allocating on
//! one thread and freeing on another. Outside a tokio runtime, and for blobs under
//! [`PIPE_FROM`] bytes, the bytes are written inline: a small file is written in a few
//! calls, and handing it to a thread of its own cost more than it saved (the 1 MiB files
//! of the benchmark's blob case synced at 0.82 times the rate piped; docs/performance.md).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use super::{BlobError, BlobWriter, CHUNK};
use crate::blocking::run_blocking;
use crate::poison::lock;
use crate::record::BlobRef;

/// Chunks that may wait for the writing thread (a chunk is what the transport hands over
/// in one write: at most a read buffer, 256 KiB from a blob store).
pub const QUEUE_CHUNKS: usize = 4;

/// The least blob size written on a thread of its own.
pub const PIPE_FROM: u64 = 4 << 20;

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

/// A blob being written on a thread of its own, or inline (a small blob, or no runtime).
pub struct PipedWriter {
    mode: Mode,
}

enum Mode {
    Inline(Box<dyn BlobWriter>),
    Piped {
        tx: SyncSender<Piece>,
        /// The buffer being filled, and the written ones coming back.
        filling: Vec<u8>,
        spare: mpsc::Receiver<Vec<u8>>,
        failed: Arc<Failed>,
        /// The thread's outcome: `Some` blob once finished, `None` if abandoned.
        done: tokio::sync::oneshot::Receiver<Result<Option<BlobRef>, BlobError>>,
        /// Whether waiting may hand this thread's other tasks to the runtime's others.
        multi_thread: bool,
    },
}

impl PipedWriter {
    /// Starts writing a blob of `size` bytes into `writer`: on a blocking thread under a
    /// tokio runtime if it is at least [`PIPE_FROM`] bytes, inline otherwise. Dropped
    /// unfinished, the blob is discarded (the writer is dropped).
    pub fn start(writer: Box<dyn BlobWriter>, size: u64) -> Self {
        let runtime = tokio::runtime::Handle::try_current();
        let Some(runtime) = runtime.ok().filter(|_| size >= PIPE_FROM) else {
            return PipedWriter {
                mode: Mode::Inline(writer),
            };
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE_CHUNKS);
        let (spare_tx, spare) = mpsc::channel();
        let failed = Arc::new(Failed::default());
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let seen = failed.clone();
        runtime.spawn_blocking(move || {
            let _ = done_tx.send(write_from(writer, rx, &spare_tx, &seen));
        });
        let multi_thread = runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        PipedWriter {
            mode: Mode::Piped {
                tx,
                filling: Vec::with_capacity(CHUNK),
                spare,
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
                filling,
                done,
                multi_thread,
                ..
            } => {
                if !filling.is_empty() {
                    send(&tx, Piece::Bytes(filling), multi_thread).map_err(|()| gone())?;
                }
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
    spare: &mpsc::Sender<Vec<u8>>,
    failed: &Failed,
) -> Result<Option<BlobRef>, BlobError> {
    let mut error = None;
    for piece in rx {
        match piece {
            Piece::Bytes(mut bytes) => {
                if error.is_none() {
                    if let Err(e) = writer.write_all(&bytes) {
                        error = Some(io::Error::new(e.kind(), e.to_string()));
                        failed.set(e);
                    }
                }
                bytes.clear();
                // The sender may be gone (abandoned): the buffer is then freed here.
                let _ = spare.send(bytes);
            }
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
                filling,
                spare,
                failed,
                multi_thread,
                ..
            } => {
                failed.check()?;
                let n = buf.len().min(CHUNK - filling.len());
                filling.extend_from_slice(&buf[..n]);
                if filling.len() == CHUNK {
                    let next = spare
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
                    let full = std::mem::replace(filling, next);
                    send(tx, Piece::Bytes(full), *multi_thread).map_err(|()| {
                        failed.check().err().unwrap_or_else(|| {
                            io::Error::other("the blob's writing thread stopped")
                        })
                    })?;
                }
                Ok(n)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{BlobStore, MemBlobStore};
    use std::sync::atomic::AtomicUsize;

    /// A writer that fails once `room` bytes were written, and counts its drops.
    struct Failing {
        room: usize,
        dropped: Arc<AtomicUsize>,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if buf.len() > self.room {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left"));
            }
            self.room -= buf.len();
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl BlobWriter for Failing {
        fn finish(self: Box<Self>, _: Option<&BlobRef>) -> Result<BlobRef, BlobError> {
            panic!("a failed blob was finished");
        }
    }

    impl Drop for Failing {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_goes_in_in_any_pieces_is_the_blob_that_comes_out() {
        let store = MemBlobStore::new();
        let data = bytes(5 * CHUNK + 123);
        let expected = BlobRef {
            hash: blake3::hash(&data).into(),
            size: data.len() as u64,
        };
        let mut w = PipedWriter::start(store.writer().unwrap(), PIPE_FROM);
        assert!(matches!(w.mode, Mode::Piped { .. }));
        for piece in data.chunks(7_919) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.finish(expected).await.unwrap(), expected);
        let (_, mut reader) = store.open(&expected.hash).unwrap().unwrap();
        let mut back = Vec::new();
        reader.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mismatch_stores_nothing() {
        let store = MemBlobStore::new();
        let data = bytes(CHUNK + 1);
        let wrong = BlobRef {
            hash: blake3::hash(b"other").into(),
            size: data.len() as u64,
        };
        let mut w = PipedWriter::start(store.writer().unwrap(), PIPE_FROM);
        w.write_all(&data).unwrap();
        assert!(matches!(
            w.finish(wrong).await,
            Err(BlobError::HashMismatch { .. })
        ));
        assert!(store.list().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_fails_the_blob_with_its_cause() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let failing = Failing {
            room: 3 * CHUNK,
            dropped: dropped.clone(),
        };
        let mut w = PipedWriter::start(Box::new(failing), PIPE_FROM);
        let chunk = bytes(CHUNK);
        // The thread writes behind: the failure of the fourth chunk reaches a later write
        // or the finish, whichever comes first.
        let mut written = 0;
        for _ in 0..5 {
            if w.write_all(&chunk).is_err() {
                break;
            }
            written += 1;
        }
        assert!(written >= 3, "writes within the room failed");
        let blob = BlobRef {
            hash: blake3::hash(&chunk).into(),
            size: 5 * CHUNK as u64,
        };
        match w.finish(blob).await {
            Err(BlobError::Source(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
                assert!(e.to_string().contains("no space left"), "{e}");
            }
            other => panic!("expected the write's failure, got {other:?}"),
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_dropped_unfinished_discards_the_blob() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let w = Failing {
            room: usize::MAX,
            dropped: dropped.clone(),
        };
        let mut piped = PipedWriter::start(Box::new(w), PIPE_FROM);
        piped.write_all(&bytes(2 * CHUNK)).unwrap();
        let Mode::Piped { done, tx, .. } = piped.mode else {
            panic!("not piped under a runtime");
        };
        drop(tx);
        // The thread sees the sender gone and ends without finishing.
        assert!(matches!(done.await, Ok(Ok(None))));
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_blob_is_written_inline_even_under_a_runtime() {
        let store = MemBlobStore::new();
        let w = PipedWriter::start(store.writer().unwrap(), PIPE_FROM - 1);
        assert!(matches!(w.mode, Mode::Inline(_)));
    }

    #[test]
    fn outside_a_runtime_the_bytes_are_written_inline() {
        let store = MemBlobStore::new();
        let data = bytes(CHUNK + 5);
        let expected = BlobRef {
            hash: blake3::hash(&data).into(),
            size: data.len() as u64,
        };
        let mut w = PipedWriter::start(store.writer().unwrap(), PIPE_FROM);
        assert!(matches!(w.mode, Mode::Inline(_)));
        w.write_all(&data).unwrap();
        let got = futures_executor::block_on(w.finish(expected)).unwrap();
        assert_eq!(got, expected);
        assert!(store.contains(&expected.hash).unwrap());
    }
}
