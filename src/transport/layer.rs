//! One forwarding decorator for transports: [`Layered`] passes every [`Transport`] call to
//! an inner transport and lets a [`Layer`] watch or alter it on the way (fail it, count its
//! bytes, corrupt them), so a wrapper states only what it changes and cannot forget a
//! method (a hand-written wrapper that leaves out `watch` silently answers `Unsupported`).
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//!
//! use highwater::error::TransportError;
//! use highwater::transport::{Call, InProcess, Layer, Layered};
//! use highwater::SyncEngine;
//!
//! /// Counts the exchange requests that go through (streamed pulls and pushes too).
//! #[derive(Default)]
//! struct CountExchanges(AtomicUsize);
//!
//! impl Layer for CountExchanges {
//!     fn before(&self, call: Call<'_>) -> Result<(), TransportError> {
//!         if let Call::Exchange(_) | Call::Pull(_) | Call::Push(_) = call {
//!             self.0.fetch_add(1, Ordering::Relaxed);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let local = SyncEngine::in_memory()?;
//! let peer = Arc::new(SyncEngine::in_memory()?);
//! let transport: Layered<_, CountExchanges> = Layered::new(InProcess::new(peer));
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! runtime.block_on(local.exchange(&transport))?;
//! let counted = transport.layer().0.load(Ordering::Relaxed);
//! assert!(counted > 0);
//! assert_eq!(counted as u64, transport.inner().stats().requests);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::future::Future;
use std::io::{Read, Write};
use std::time::Duration;

use super::{Frames, Pull, Transport, WatchReply};
use crate::error::TransportError;
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::record::BlobRef;
use crate::wire::{AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse};

/// A call on its way to the inner transport, with its argument, as a [`Layer`] sees it.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Call<'a> {
    /// [`Transport::exchange`].
    Exchange(&'a ExchangeRequest),
    /// [`Transport::blobs_present`].
    BlobsPresent(&'a [Hash]),
    /// [`Transport::fetch_blob`].
    FetchBlob(&'a BlobRef),
    /// [`Transport::push_blob`].
    PushBlob(&'a BlobRef),
    /// [`Transport::watch`].
    Watch,
    /// [`Transport::audit`].
    Audit(&'a AuditRequest),
    /// [`Transport::pull`].
    Pull(&'a ExchangeRequest),
    /// [`Transport::push`].
    Push(&'a ExchangeRequest),
}

/// What a [`Layered`] transport does around its inner transport's calls. Every method has
/// a default that changes nothing, so a layer implements only what it watches or alters.
pub trait Layer: Send + Sync {
    /// Runs before each call (all but [`Transport::peer_id`], which asks the network
    /// nothing).
    ///
    /// # Errors
    /// The error to fail the call with; the inner transport then never sees the call.
    fn before(&self, call: Call<'_>) -> Result<(), TransportError> {
        let _ = call;
        Ok(())
    }

    /// The writer a fetch of `blob` streams into, once [`Layer::before`] let it through:
    /// `into` itself, or a writer over it that sees or alters the bytes as the inner
    /// transport writes them.
    fn fetch_into<'a>(
        &'a self,
        blob: &BlobRef,
        into: &'a mut (dyn Write + Send),
    ) -> Box<dyn Write + Send + 'a> {
        let _ = blob;
        Box::new(into)
    }

    /// The content a push of `blob` streams from, once [`Layer::before`] let it through:
    /// `content` itself, or a reader over it that sees or alters the bytes.
    fn push_from(&self, blob: &BlobRef, content: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
        let _ = blob;
        content
    }

    /// The frames of a streamed pull, once [`Layer::before`] let it through: `frames`
    /// itself, or a stream over it that sees or alters them (cuts, repeats, reorders).
    fn frames(&self, frames: Frames) -> Frames {
        frames
    }

    /// The frames of a streamed push, once [`Layer::before`] let it through: `frames`
    /// itself, or a stream over it that sees or alters them on their way to the inner
    /// transport.
    fn push_frames(&self, frames: Frames) -> Frames {
        frames
    }

    /// Runs when a push of `blob` that reached the inner transport has ended. A push is the
    /// one call whose outcome a layer cannot see otherwise: its bytes are all read before
    /// the responder decides whether to keep them.
    fn after_push(&self, blob: &BlobRef, result: &Result<(), TransportError>) {
        let _ = (blob, result);
    }
}

/// A transport that forwards every call to `inner`, through `layer`.
pub struct Layered<T, L> {
    inner: T,
    layer: L,
}

impl<T, L> Layered<T, L> {
    /// Wraps `inner` in `layer`.
    pub fn with_layer(inner: T, layer: L) -> Self {
        Layered { inner, layer }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The layer.
    pub fn layer(&self) -> &L {
        &self.layer
    }
}

impl<T, L: Default> Layered<T, L> {
    /// Wraps `inner` in a default layer.
    pub fn new(inner: T) -> Self {
        Self::with_layer(inner, L::default())
    }
}

impl<T: Transport, L: Layer> Transport for Layered<T, L> {
    fn peer_id(&self) -> Option<NodeId> {
        self.inner.peer_id()
    }

    fn forget_peer(&self) {
        self.inner.forget_peer();
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        self.layer.before(Call::Exchange(&request))?;
        self.inner.exchange(request).await
    }

    async fn pull(&self, request: ExchangeRequest) -> Result<Pull, TransportError> {
        self.layer.before(Call::Pull(&request))?;
        let mut pulled = self.inner.pull(request).await?;
        pulled.frames = pulled.frames.map(|f| self.layer.frames(f));
        Ok(pulled)
    }

    async fn push(
        &self,
        request: ExchangeRequest,
        frames: Frames,
    ) -> Result<ExchangeResponse, TransportError> {
        self.layer.before(Call::Push(&request))?;
        let frames = self.layer.push_frames(frames);
        self.inner.push(request, frames).await
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        self.layer.before(Call::BlobsPresent(&hashes))?;
        self.inner.blobs_present(hashes).await
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn Write + Send),
    ) -> Result<(), TransportError> {
        self.layer.before(Call::FetchBlob(&blob))?;
        let mut into = self.layer.fetch_into(&blob, into);
        self.inner.fetch_blob(blob, &mut *into).await
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn Read + Send>,
    ) -> Result<(), TransportError> {
        self.layer.before(Call::PushBlob(&blob))?;
        let content = self.layer.push_from(&blob, content);
        let result = self.inner.push_blob(blob, content).await;
        self.layer.after_push(&blob, &result);
        result
    }

    async fn watch(
        &self,
        since: Option<String>,
        watcher: Option<NodeId>,
        timeout: Duration,
    ) -> Result<WatchReply, TransportError> {
        self.layer.before(Call::Watch)?;
        self.inner.watch(since, watcher, timeout).await
    }

    async fn audit(&self, request: AuditRequest) -> Result<AuditResponse, TransportError> {
        self.layer.before(Call::Audit(&request))?;
        self.inner.audit(request).await
    }

    fn records(&self) -> Option<std::sync::Arc<dyn crate::api::NodeApi>> {
        self.inner.records()
    }
}

/// A borrowed transport is a transport, so a layer can wrap one its caller keeps (the CLI
/// meters a transport for the length of one sync). It forwards every method, `watch` too:
/// the trait's default would answer `Unsupported`.
impl<T: Transport + ?Sized> Transport for &T {
    fn peer_id(&self) -> Option<NodeId> {
        (**self).peer_id()
    }

    fn forget_peer(&self) {
        (**self).forget_peer();
    }

    fn exchange(
        &self,
        request: ExchangeRequest,
    ) -> impl Future<Output = Result<ExchangeResponse, TransportError>> + Send {
        (**self).exchange(request)
    }

    fn pull(
        &self,
        request: ExchangeRequest,
    ) -> impl Future<Output = Result<Pull, TransportError>> + Send {
        (**self).pull(request)
    }

    fn push(
        &self,
        request: ExchangeRequest,
        frames: Frames,
    ) -> impl Future<Output = Result<ExchangeResponse, TransportError>> + Send {
        (**self).push(request, frames)
    }

    fn blobs_present(
        &self,
        hashes: Vec<Hash>,
    ) -> impl Future<Output = Result<Vec<bool>, TransportError>> + Send {
        (**self).blobs_present(hashes)
    }

    fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn Write + Send),
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        (**self).fetch_blob(blob, into)
    }

    fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn Read + Send>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        (**self).push_blob(blob, content)
    }

    fn watch(
        &self,
        since: Option<String>,
        watcher: Option<NodeId>,
        timeout: Duration,
    ) -> impl Future<Output = Result<WatchReply, TransportError>> + Send {
        (**self).watch(since, watcher, timeout)
    }

    fn audit(
        &self,
        request: AuditRequest,
    ) -> impl Future<Output = Result<AuditResponse, TransportError>> + Send {
        (**self).audit(request)
    }

    fn records(&self) -> Option<std::sync::Arc<dyn crate::api::NodeApi>> {
        (**self).records()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::SyncEngine;
    use crate::transport::InProcess;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Refuses every call.
    struct Closed;

    impl Layer for Closed {
        fn before(&self, _: Call<'_>) -> Result<(), TransportError> {
            Err(TransportError::Unreachable {
                reason: "closed".to_owned(),
            })
        }
    }

    fn unreachable<T: std::fmt::Debug>(result: Result<T, TransportError>) -> bool {
        matches!(result, Err(TransportError::Unreachable { .. }))
    }

    /// A refusal in `before` fails each call without it reaching the inner transport.
    #[tokio::test]
    async fn a_refusal_before_a_call_keeps_it_from_the_inner_transport() -> TestResult {
        let local = SyncEngine::in_memory()?;
        let peer = Arc::new(SyncEngine::in_memory()?);
        let closed = Layered::with_layer(InProcess::new(peer), Closed);
        let blob = BlobRef {
            hash: Hash::of(b"x"),
            size: 1,
        };
        assert!(local.exchange(&closed).await.is_err());
        assert!(unreachable(closed.blobs_present(vec![blob.hash]).await));
        assert!(unreachable(closed.fetch_blob(blob, &mut Vec::new()).await));
        let content = Box::new(std::io::Cursor::new(b"x".to_vec()));
        assert!(unreachable(closed.push_blob(blob, content).await));
        let watch = closed.watch(None, None, Duration::ZERO).await;
        assert!(unreachable(watch));
        let stats = closed.inner().stats();
        assert_eq!(stats.requests + stats.blob_queries, 0);
        assert_eq!(stats.blob_fetches + stats.blob_pushes, 0);
        Ok(())
    }
}
