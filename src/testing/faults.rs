//! Fault injection on a transport: [`FaultyTransport`] refuses or corrupts chosen blobs'
//! transfers and runs hooks at chosen points of a round.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::locked;
use crate::error::TransportError;
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::record::BlobRef;
use crate::transport::Transport;
use crate::wire::{ExchangeRequest, ExchangeResponse};

/// Something to run at a chosen point of a round (e.g. a garbage collection).
pub type Hook = Box<dyn Fn() + Send + Sync>;

/// Wraps a transport: blobs marked with [`FaultyTransport::fail`] are refused
/// ([`TransportError::BlobTransfer`]) both ways; blobs marked with
/// [`FaultyTransport::corrupt`] move with one byte flipped both ways. Everything else is
/// delegated unchanged. Optional hooks run before each blob transfer and before the
/// exchange request.
pub struct FaultyTransport<T> {
    inner: T,
    fail: Mutex<BTreeSet<Hash>>,
    corrupt: Mutex<BTreeSet<Hash>>,
    injected: AtomicUsize,
    before_transfer: Mutex<Option<Hook>>,
    before_exchange: Mutex<Option<Hook>>,
}

impl<T> FaultyTransport<T> {
    /// Wraps `inner`, with no faults yet.
    pub fn new(inner: T) -> Self {
        FaultyTransport {
            inner,
            fail: Mutex::default(),
            corrupt: Mutex::default(),
            injected: AtomicUsize::new(0),
            before_transfer: Mutex::default(),
            before_exchange: Mutex::default(),
        }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Transfers of `hash` fail from now on.
    pub fn fail(&self, hash: Hash) {
        locked(&self.fail).insert(hash);
    }

    /// Transfers of `hash` arrive with one byte flipped from now on.
    pub fn corrupt(&self, hash: Hash) {
        locked(&self.corrupt).insert(hash);
    }

    /// Every transfer works again.
    pub fn heal(&self) {
        locked(&self.fail).clear();
        locked(&self.corrupt).clear();
    }

    /// Transfers refused or corrupted so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::Relaxed)
    }

    /// Runs `hook` before every blob transfer.
    pub fn before_transfer(&self, hook: impl Fn() + Send + Sync + 'static) {
        *locked(&self.before_transfer) = Some(Box::new(hook));
    }

    /// Runs `hook` before every exchange request.
    pub fn before_exchange(&self, hook: impl Fn() + Send + Sync + 'static) {
        *locked(&self.before_exchange) = Some(Box::new(hook));
    }

    fn run(hook: &Mutex<Option<Hook>>) {
        if let Some(hook) = &*locked(hook) {
            hook();
        }
    }

    /// Before a transfer of `hash`: runs the hook, fails if asked to, and says whether to
    /// corrupt it.
    fn gate(&self, hash: &Hash) -> Result<bool, TransportError> {
        Self::run(&self.before_transfer);
        if self.hit(&self.fail, hash) {
            return Err(injected_failure(*hash));
        }
        Ok(self.hit(&self.corrupt, hash))
    }

    fn hit(&self, set: &Mutex<BTreeSet<Hash>>, hash: &Hash) -> bool {
        let hit = locked(set).contains(hash);
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }
}

fn flip_one(bytes: &mut [u8]) {
    let middle = bytes.len() / 2;
    if let Some(b) = bytes.get_mut(middle) {
        *b ^= 0x01;
    }
}

fn injected_failure(hash: Hash) -> TransportError {
    TransportError::BlobTransfer {
        hash,
        reason: "injected failure".to_owned(),
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    fn peer_id(&self) -> Option<NodeId> {
        self.inner.peer_id()
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        Self::run(&self.before_exchange);
        self.inner.exchange(request).await
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        self.inner.blobs_present(hashes).await
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn std::io::Write + Send),
    ) -> Result<(), TransportError> {
        if !self.gate(&blob.hash)? {
            return self.inner.fetch_blob(blob, into).await;
        }
        let mut bytes = Vec::new();
        self.inner.fetch_blob(blob, &mut bytes).await?;
        flip_one(&mut bytes);
        into.write_all(&bytes)
            .map_err(|e| TransportError::BlobTransfer {
                hash: blob.hash,
                reason: e.to_string(),
            })
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        mut content: Box<dyn std::io::Read + Send>,
    ) -> Result<(), TransportError> {
        if !self.gate(&blob.hash)? {
            return self.inner.push_blob(blob, content).await;
        }
        let mut bytes = Vec::new();
        content
            .read_to_end(&mut bytes)
            .map_err(|e| TransportError::BlobTransfer {
                hash: blob.hash,
                reason: e.to_string(),
            })?;
        flip_one(&mut bytes);
        self.inner
            .push_blob(blob, Box::new(std::io::Cursor::new(bytes)))
            .await
    }
}
