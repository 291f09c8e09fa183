//! The in-process transport: calls a responder directly, through the real wire codec.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use super::{Refusal, RefusalCode, Responder, Transport, WatchReply};
use crate::blob::{copy_chunks, CopyError};
use crate::blocking::{run_blocking, Interrupted};
use crate::error::TransportError;
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::notify::WatchToken;
use crate::record::BlobRef;
use crate::wire::{self, AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse, Message};

/// Bytes and requests that went over a transport.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireStats {
    /// Requests sent.
    pub requests: u64,
    /// Encoded request bytes.
    pub bytes_sent: u64,
    /// Encoded response bytes.
    pub bytes_received: u64,
    /// Encoded size of the last request.
    pub last_request: u64,
    /// Encoded size of the last response.
    pub last_response: u64,
    /// `blobs_present` questions asked.
    pub blob_queries: u64,
    /// Blobs fetched from the responder.
    pub blob_fetches: u64,
    /// Blobs pushed to the responder.
    pub blob_pushes: u64,
    /// Blob bytes moved either way.
    pub blob_bytes: u64,
}

/// Reaches a responder in the same process. Requests and responses are encoded and decoded
/// exactly as over HTTP, so the codec is exercised and byte counts are real.
pub struct InProcess<R> {
    peer: R,
    requests: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    last_request: AtomicU64,
    last_response: AtomicU64,
    blob_queries: AtomicU64,
    blob_fetches: AtomicU64,
    blob_pushes: AtomicU64,
    blob_bytes: AtomicU64,
}

impl<R: Responder> InProcess<R> {
    /// A transport to `peer`.
    pub fn new(peer: R) -> Self {
        InProcess {
            peer,
            requests: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_request: AtomicU64::new(0),
            last_response: AtomicU64::new(0),
            blob_queries: AtomicU64::new(0),
            blob_fetches: AtomicU64::new(0),
            blob_pushes: AtomicU64::new(0),
            blob_bytes: AtomicU64::new(0),
        }
    }

    /// The responder.
    pub fn peer(&self) -> &R {
        &self.peer
    }

    /// What went over this transport so far.
    pub fn stats(&self) -> WireStats {
        WireStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
            last_request: self.last_request.load(Ordering::Relaxed),
            last_response: self.last_response.load(Ordering::Relaxed),
            blob_queries: self.blob_queries.load(Ordering::Relaxed),
            blob_fetches: self.blob_fetches.load(Ordering::Relaxed),
            blob_pushes: self.blob_pushes.load(Ordering::Relaxed),
            blob_bytes: self.blob_bytes.load(Ordering::Relaxed),
        }
    }

    /// Runs one request's `answer` on a blocking thread and counts its bytes.
    async fn round_trip<A: Send + 'static>(
        &self,
        answer: impl FnOnce() -> (usize, usize, Result<A, TransportError>) + Send + 'static,
    ) -> Result<A, TransportError> {
        let (sent, received, response) = run_blocking(answer).await.map_err(interrupted)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.count(&self.sent, &self.last_request, sent);
        if received > 0 {
            self.count(&self.received, &self.last_response, received);
        }
        response
    }

    fn count(&self, total: &AtomicU64, last: &AtomicU64, n: usize) {
        let n = n as u64;
        total.fetch_add(n, Ordering::Relaxed);
        last.store(n, Ordering::Relaxed);
    }
}

/// The responder's side of one request, as the HTTP server does it: decode, answer, encode.
/// Returns the encoded sizes of the request and the response.
fn answer<Q: Message, A: Message>(
    request: &Q,
    respond: impl FnOnce(Q) -> Result<A, Refusal>,
) -> (usize, usize, Result<A, TransportError>) {
    let bytes = wire::encode(request);
    let sent = bytes.len();
    let (decoded, version) = match wire::decode_versioned::<Q>(&bytes) {
        Ok(decoded) => decoded,
        Err(e) => {
            let refused = TransportError::Refused {
                code: RefusalCode::BadRequest,
                reason: e.to_string(),
            };
            return (sent, 0, Err(refused));
        }
    };
    let response = match respond(decoded) {
        Ok(response) => response,
        Err(refusal) => return (sent, 0, Err(refusal.into())),
    };
    // Answered in the request's version at most, as a server does.
    let bytes = wire::encode_as(&response, version.min(response.version()));
    let decoded = wire::decode::<A>(&bytes).map_err(TransportError::BadResponse);
    (sent, bytes.len(), decoded)
}

fn interrupted(e: Interrupted) -> TransportError {
    TransportError::Unreachable {
        reason: e.to_string(),
    }
}

/// The responder's work (its store reads and commits, the codec) runs off the async
/// runtime's threads ([`run_blocking`]), as it would in another process.
impl<R: Responder + Clone + 'static> Transport for InProcess<R> {
    fn peer_id(&self) -> Option<NodeId> {
        Some(self.peer.node_id())
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        let peer = self.peer.clone();
        self.round_trip(move || answer(&request, |r| peer.respond(r)))
            .await
    }

    async fn audit(&self, request: AuditRequest) -> Result<AuditResponse, TransportError> {
        let peer = self.peer.clone();
        self.round_trip(move || answer(&request, |r| peer.audit(r)))
            .await
    }

    fn records(&self) -> Option<std::sync::Arc<dyn crate::api::NodeApi>> {
        self.peer.records()
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        self.blob_queries.fetch_add(1, Ordering::Relaxed);
        let peer = self.peer.clone();
        let present = run_blocking(move || peer.blobs_present(&hashes))
            .await
            .map_err(interrupted)?;
        Ok(present?)
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn Write + Send),
    ) -> Result<(), TransportError> {
        self.blob_fetches.fetch_add(1, Ordering::Relaxed);
        let (_, mut reader) = self
            .peer
            .open_blob(&blob.hash)?
            .ok_or(TransportError::BlobNotFound { hash: blob.hash })?;
        let n = copy_chunks(&mut reader, into).map_err(|e| TransportError::BlobTransfer {
            hash: blob.hash,
            reason: match e {
                CopyError::Read(e) => format!("reading at the peer: {e}"),
                CopyError::Write(e) => format!("writing locally: {e}"),
            },
        })?;
        self.blob_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn Read + Send>,
    ) -> Result<(), TransportError> {
        self.blob_pushes.fetch_add(1, Ordering::Relaxed);
        let peer = self.peer.clone();
        let (n, result) = run_blocking(move || {
            let mut counted = Counted {
                inner: content,
                n: 0,
            };
            let result = peer.accept_blob(&blob, &mut counted);
            (counted.n, result)
        })
        .await
        .map_err(interrupted)?;
        self.blob_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(result?)
    }

    async fn watch(
        &self,
        since: Option<String>,
        watcher: Option<NodeId>,
        timeout: Duration,
    ) -> Result<WatchReply, TransportError> {
        let notifier = self
            .peer
            .notifier()
            .ok_or(TransportError::Unsupported { what: "watch" })?;
        let since = match since {
            Some(s) => Some(
                s.parse::<WatchToken>()
                    .map_err(|e| TransportError::Refused {
                        code: RefusalCode::BadRequest,
                        reason: e.to_string(),
                    })?,
            ),
            None => None,
        };
        let (news, token) = notifier
            .wait_for_news(since, watcher, |_| true, timeout)
            .await;
        Ok(WatchReply {
            news,
            token: token.to_string(),
        })
    }
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}
