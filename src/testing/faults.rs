//! Fault injection on a transport: [`FaultyTransport`] refuses or corrupts chosen blobs'
//! transfers and runs hooks at chosen points of a round.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use crate::error::TransportError;
use crate::hash::Hash;
use crate::poison::lock;
use crate::record::BlobRef;
use crate::transport::{Call, Frames, Layer, Layered};
use crate::wire::PageFrame;

/// Something to run at a chosen point of a round (e.g. a garbage collection).
pub type Hook = Box<dyn Fn() + Send + Sync>;

/// Wraps a transport: blobs marked with [`FaultyTransport::fail`] are refused
/// ([`TransportError::BlobTransfer`]) both ways; blobs marked with
/// [`FaultyTransport::corrupt`] move with one byte flipped both ways. Everything else
/// (`watch` too) is delegated unchanged. Optional hooks run before each blob transfer and
/// before each exchange request. [`Layered::new`] wraps a transport with no faults yet.
pub type FaultyTransport<T> = Layered<T, Faults>;

/// The [`Layer`] of a [`FaultyTransport`]: the faults to inject and the hooks to run. Set
/// them through the transport's methods.
#[derive(Default)]
pub struct Faults {
    fail: Mutex<BTreeSet<Hash>>,
    corrupt: Mutex<BTreeSet<Hash>>,
    injected: AtomicUsize,
    before_transfer: Mutex<Option<Hook>>,
    before_exchange: Mutex<Option<Hook>>,
    pulls: Mutex<Option<PullFault>>,
    pull_faults: Arc<AtomicUsize>,
    pushes: Mutex<Option<PullFault>>,
    push_faults: Arc<AtomicUsize>,
}

/// What happens to the frames of the streamed pulls (or pushes) through a
/// [`FaultyTransport`] (see [`FaultyTransport::fault_pulls`] and
/// [`FaultyTransport::fault_pushes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullFault {
    /// The transfer breaks off after this many frames: an error instead of the next one.
    CutAfter(usize),
    /// Frame number `n` (1-based) arrives twice.
    Repeat(u32),
    /// Frames `n` and `n + 1` arrive swapped.
    Swap(u32),
}

impl<T> FaultyTransport<T> {
    /// Transfers of `hash` fail from now on.
    pub fn fail(&self, hash: Hash) {
        lock(&self.layer().fail).insert(hash);
    }

    /// Transfers of `hash` arrive with one byte flipped from now on.
    pub fn corrupt(&self, hash: Hash) {
        lock(&self.layer().corrupt).insert(hash);
    }

    /// Every transfer works again.
    pub fn heal(&self) {
        lock(&self.layer().fail).clear();
        lock(&self.layer().corrupt).clear();
    }

    /// Transfers refused or corrupted so far.
    pub fn injected(&self) -> usize {
        self.layer().injected.load(Ordering::Relaxed)
    }

    /// Runs `hook` before every blob transfer.
    pub fn before_transfer(&self, hook: impl Fn() + Send + Sync + 'static) {
        *lock(&self.layer().before_transfer) = Some(Box::new(hook));
    }

    /// The frames of every streamed pull from now on meet `fault` (`None`: they travel
    /// unchanged).
    pub fn fault_pulls(&self, fault: Option<PullFault>) {
        *lock(&self.layer().pulls) = fault;
    }

    /// How many streamed pulls met their fault (a transfer too short to meet it does not
    /// count).
    pub fn pull_faults(&self) -> usize {
        self.layer().pull_faults.load(Ordering::Relaxed)
    }

    /// The frames of every streamed push from now on meet `fault` on their way to the
    /// responder (`None`: they travel unchanged).
    pub fn fault_pushes(&self, fault: Option<PullFault>) {
        *lock(&self.layer().pushes) = fault;
    }

    /// How many streamed pushes met their fault (a transfer too short to meet it does not
    /// count).
    pub fn push_faults(&self) -> usize {
        self.layer().push_faults.load(Ordering::Relaxed)
    }

    /// Runs `hook` before every exchange request.
    pub fn before_exchange(&self, hook: impl Fn() + Send + Sync + 'static) {
        *lock(&self.layer().before_exchange) = Some(Box::new(hook));
    }
}

/// A transfer runs the hook, then is refused if marked to fail; only a transfer let through
/// is checked for corruption, so each transfer counts as at most one injection.
impl Layer for Faults {
    fn before(&self, call: Call<'_>) -> Result<(), TransportError> {
        match call {
            Call::Exchange(_) | Call::Pull(_) | Call::Push(_) => run(&self.before_exchange),
            Call::FetchBlob(blob) | Call::PushBlob(blob) => {
                run(&self.before_transfer);
                if self.hit(&self.fail, &blob.hash) {
                    return Err(injected_failure(blob.hash));
                }
            }
            Call::BlobsPresent(_) | Call::Watch | Call::Audit(_) => {}
        }
        Ok(())
    }

    fn fetch_into<'a>(
        &'a self,
        blob: &BlobRef,
        into: &'a mut (dyn Write + Send),
    ) -> Box<dyn Write + Send + 'a> {
        if self.hit(&self.corrupt, &blob.hash) {
            Box::new(FlipMiddle::of(blob, into))
        } else {
            Box::new(into)
        }
    }

    fn frames(&self, frames: Frames) -> Frames {
        match *lock(&self.pulls) {
            Some(fault) => alter(frames, fault, self.pull_faults.clone()),
            None => frames,
        }
    }

    fn push_frames(&self, frames: Frames) -> Frames {
        match *lock(&self.pushes) {
            Some(fault) => alter(frames, fault, self.push_faults.clone()),
            None => frames,
        }
    }

    fn push_from(&self, blob: &BlobRef, content: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
        if self.hit(&self.corrupt, &blob.hash) {
            Box::new(FlipMiddle::of(blob, content))
        } else {
            content
        }
    }
}

impl Faults {
    /// Whether `hash` is in `set`, counting an injection if it is.
    fn hit(&self, set: &Mutex<BTreeSet<Hash>>, hash: &Hash) -> bool {
        let hit = lock(set).contains(hash);
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }
}

/// `frames` as they meet `fault`, counting in `met` the transfer that meets it.
fn alter(frames: Frames, fault: PullFault, met: Arc<AtomicUsize>) -> Frames {
    let mut held: Option<PageFrame> = None;
    let mut seen = 0usize;
    let altered = frames.flat_map(move |item| {
        let mut out: Vec<Result<PageFrame, TransportError>> = Vec::new();
        seen += 1;
        match (fault, item) {
            (PullFault::CutAfter(n), _) if seen == n + 1 => {
                met.fetch_add(1, Ordering::Relaxed);
                out.push(Err(TransportError::Unreachable {
                    reason: format!("injected cut after {n} frames"),
                }));
            }
            (PullFault::CutAfter(n), _) if seen > n + 1 => {}
            (PullFault::Repeat(n), Ok(frame)) if frame.seq == n => {
                met.fetch_add(1, Ordering::Relaxed);
                out.push(Ok(frame.clone()));
                out.push(Ok(frame));
            }
            (PullFault::Swap(n), Ok(frame)) if frame.seq == n && !frame.end => {
                held = Some(frame);
            }
            (PullFault::Swap(n), Ok(frame)) if frame.seq == n + 1 => {
                met.fetch_add(1, Ordering::Relaxed);
                out.push(Ok(frame));
                out.extend(held.take().map(Ok));
            }
            (_, item) => out.push(item),
        }
        futures_util::stream::iter(out)
    });
    Box::pin(altered)
}

fn run(hook: &Mutex<Option<Hook>>) {
    if let Some(hook) = &*lock(hook) {
        hook();
    }
}

fn injected_failure(hash: Hash) -> TransportError {
    TransportError::BlobTransfer {
        hash,
        reason: "injected failure".to_owned(),
    }
}

/// Streams a blob's bytes through (a reader or a writer) with the one at offset `size / 2`
/// flipped: content of the blob's size that no longer has its hash, so the receiver's check
/// must catch it.
struct FlipMiddle<S> {
    inner: S,
    /// The offset of the byte to flip.
    at: u64,
    /// Bytes passed through so far.
    pos: u64,
}

impl<S> FlipMiddle<S> {
    fn of(blob: &BlobRef, inner: S) -> Self {
        FlipMiddle {
            inner,
            at: blob.size / 2,
            pos: 0,
        }
    }

    /// Where the byte to flip lies in the next `len` bytes, if it does.
    fn offset_in(&self, len: usize) -> Option<usize> {
        let offset = usize::try_from(self.at.checked_sub(self.pos)?).ok()?;
        (offset < len).then_some(offset)
    }
}

impl<W: Write> Write for FlipMiddle<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self.offset_in(buf.len()) {
            Some(offset) => {
                let mut flipped = buf.to_vec();
                flip(&mut flipped, offset);
                self.inner.write(&flipped)?
            }
            None => self.inner.write(buf)?,
        };
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for FlipMiddle<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(offset) = self.offset_in(n) {
            flip(buf, offset);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn flip(bytes: &mut [u8], offset: usize) {
    if let Some(b) = bytes.get_mut(offset) {
        *b ^= 0x01;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::engine::SyncEngine;
    use crate::record::{Key, Scope};
    use crate::transport::{InProcess, Transport};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A faulty transport is still a whole transport: a watch goes through to the
    /// responder, answers a token at once, and then reports a write made after it.
    #[tokio::test]
    async fn watches_the_responder_through_the_faults() -> TestResult {
        let responder = Arc::new(SyncEngine::in_memory()?);
        let faulty = FaultyTransport::new(InProcess::new(responder.clone()));
        let first = faulty.watch(None, None, Duration::ZERO).await?;
        responder.put(&Scope::shared(), &Key::try_from("k")?, b"v".to_vec())?;
        let next = faulty
            .watch(Some(first.token.clone()), None, Duration::from_secs(10))
            .await?;
        assert!(next.news, "a write after {first:?} is news");
        assert_ne!(next.token, first.token);
        Ok(())
    }

    /// Takes at most three bytes a call, as a writer may.
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Exactly the middle byte differs, however the bytes are split on their way.
    #[test]
    fn flips_the_middle_byte_both_ways_in_any_chunks() -> TestResult {
        let content: Vec<u8> = (0..11).collect();
        let blob = BlobRef {
            hash: Hash::of(&content),
            size: 11,
        };
        let mut expected = content.clone();
        expected[5] ^= 0x01;

        let mut written = FlipMiddle::of(&blob, Trickle(Vec::new()));
        written.write_all(&content)?;
        assert_eq!(written.inner.0, expected);

        let mut reader = FlipMiddle::of(&blob, io::Cursor::new(content));
        let (mut read, mut chunk) = (Vec::new(), [0u8; 2]);
        loop {
            let n = reader.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            read.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(read, expected);
        Ok(())
    }
}
