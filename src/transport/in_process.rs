//! The in-process transport: calls a responder directly, through the real wire codec.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;
use std::time::Duration;

use super::{
    frames_from, Frames, Pull, Refusal, RefusalCode, Responder, Transport, WatchReply, PULL_WINDOW,
};
use crate::blob::{copy_chunks, CopyError};
use crate::blocking::{run_blocking, Interrupted};
use crate::error::TransportError;
use crate::exchange::{PullCursor, PushStart, PushTransfer};
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::http::body::stream_reader;
use crate::notify::WatchToken;
use crate::record::BlobRef;
use crate::wire::{
    self, AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse, Message, PageFrame,
    PROTOCOL_VERSION,
};
use futures_util::StreamExt;

/// Bytes and requests that went over a transport.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireStats {
    /// Requests sent.
    pub requests: u64,
    /// Encoded request bytes.
    pub bytes_sent: u64,
    /// Encoded response bytes, a streamed pull's frames included.
    pub bytes_received: u64,
    /// Encoded size of the last request.
    pub last_request: u64,
    /// Encoded size of the last response (or of a streamed pull's last frame).
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
    counts: Arc<Counts>,
}

/// The counters of [`WireStats`], shared with the producer of a streamed pull's frames.
#[derive(Default)]
struct Counts {
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

impl Counts {
    fn count(total: &AtomicU64, last: &AtomicU64, n: usize) {
        let n = n as u64;
        total.fetch_add(n, Ordering::Relaxed);
        last.store(n, Ordering::Relaxed);
    }
}

impl<R: Responder> InProcess<R> {
    /// A transport to `peer`.
    pub fn new(peer: R) -> Self {
        InProcess {
            peer,
            counts: Arc::default(),
        }
    }

    /// The responder.
    pub fn peer(&self) -> &R {
        &self.peer
    }

    /// What went over this transport so far.
    pub fn stats(&self) -> WireStats {
        let c = &*self.counts;
        WireStats {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_sent: c.sent.load(Ordering::Relaxed),
            bytes_received: c.received.load(Ordering::Relaxed),
            last_request: c.last_request.load(Ordering::Relaxed),
            last_response: c.last_response.load(Ordering::Relaxed),
            blob_queries: c.blob_queries.load(Ordering::Relaxed),
            blob_fetches: c.blob_fetches.load(Ordering::Relaxed),
            blob_pushes: c.blob_pushes.load(Ordering::Relaxed),
            blob_bytes: c.blob_bytes.load(Ordering::Relaxed),
        }
    }

    /// Runs one request's `answer` on a blocking thread and counts its bytes.
    async fn round_trip<A: Send + 'static>(
        &self,
        answer: impl FnOnce() -> (usize, usize, Result<A, TransportError>) + Send + 'static,
    ) -> Result<A, TransportError> {
        let (sent, received, response) = run_blocking(answer).await.map_err(interrupted)?;
        let c = &*self.counts;
        c.requests.fetch_add(1, Ordering::Relaxed);
        Counts::count(&c.sent, &c.last_request, sent);
        if received > 0 {
            Counts::count(&c.received, &c.last_response, received);
        }
        response
    }
}

/// The responder's side of one request, as the HTTP server does it: decode, answer, encode.
/// Returns the encoded sizes of the request and the response.
fn answer<Q: Message, A: Message>(
    request: &Q,
    respond: impl FnOnce(Q) -> Result<A, Refusal>,
) -> (usize, usize, Result<A, TransportError>) {
    let (sent, decoded) = through_codec(request);
    let (decoded, version) = match decoded {
        Ok(decoded) => decoded,
        Err(refused) => return (sent, 0, Err(refused)),
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

/// `request` as a server receives it: encoded (its size returned), then decoded with the
/// version it came in; a request that does not decode is refused as a bad request.
fn through_codec<Q: Message>(request: &Q) -> (usize, Result<(Q, u16), TransportError>) {
    let bytes = wire::encode(request);
    let decoded = wire::decode_versioned::<Q>(&bytes).map_err(|e| TransportError::Refused {
        code: RefusalCode::BadRequest,
        reason: e.to_string(),
    });
    (bytes.len(), decoded)
}

/// Plans and sends a streamed pull's frames until the last, through the codec as a server
/// does: `tx` holds at most [`PULL_WINDOW`] of them, so a receiver that stops reading stops
/// the planning, and one that goes away ends it.
fn produce_frames<R: Responder>(
    peer: &R,
    mut cursor: PullCursor,
    tx: &tokio::sync::mpsc::Sender<Result<PageFrame, TransportError>>,
    counts: &Counts,
) {
    loop {
        let item = match peer.next_frame(&mut cursor) {
            Ok(frame) => {
                let bytes = wire::encode_as(&frame, PROTOCOL_VERSION);
                Counts::count(&counts.received, &counts.last_response, bytes.len());
                wire::decode::<PageFrame>(&bytes).map_err(TransportError::BadResponse)
            }
            Err(refusal) => Err(refusal.into()),
        };
        let last = item.as_ref().map_or(true, |f| f.end);
        if tx.blocking_send(item).is_err() || last {
            return;
        }
    }
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

    async fn pull(&self, request: ExchangeRequest) -> Result<Pull, TransportError> {
        let peer = self.peer.clone();
        let (response, cursor) = self
            .round_trip(move || {
                let mut cursor = None;
                let answered = answer(&request, |r| {
                    let (response, c) = peer.respond_pull(r)?;
                    cursor = c;
                    Ok(response)
                });
                let (sent, received, response) = answered;
                (sent, received, response.map(|r| (r, cursor)))
            })
            .await?;
        let frames = cursor.map(|cursor| {
            let (tx, rx) = tokio::sync::mpsc::channel(PULL_WINDOW);
            let (peer, counts) = (self.peer.clone(), self.counts.clone());
            let produce = move || produce_frames(&peer, cursor, &tx, &counts);
            // On a blocking thread of the runtime if there is one (a paused test clock
            // then waits for it), else on a thread of its own.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(produce)),
                Err(_) => drop(std::thread::spawn(produce)),
            }
            frames_from(rx)
        });
        Ok(Pull { response, frames })
    }

    /// One request for the whole transfer: the request, then each frame through the codec
    /// as a server reads them, each applied on a blocking thread before the next is read
    /// from `frames` (a bounded channel: the planning waits on the applying), then the
    /// response.
    async fn push(
        &self,
        request: ExchangeRequest,
        mut frames: Frames,
    ) -> Result<ExchangeResponse, TransportError> {
        if !self.peer.takes_pushes() {
            return Err(TransportError::Unsupported { what: "push" });
        }
        let peer = self.peer.clone();
        let opened = self
            .round_trip(move || {
                let (sent, decoded) = through_codec(&request);
                let (decoded, version) = match decoded {
                    Ok(decoded) => decoded,
                    Err(refused) => return (sent, 0, Err(refused)),
                };
                match peer.open_push(decoded) {
                    Err(refusal) => (sent, 0, Err(refusal.into())),
                    Ok(PushStart::Answered(response)) => {
                        let bytes = wire::encode_as(&response, version.min(response.version()));
                        let decoded = wire::decode::<ExchangeResponse>(&bytes)
                            .map_err(TransportError::BadResponse);
                        (sent, bytes.len(), decoded.map(Opened::Answered))
                    }
                    Ok(PushStart::Receiving(transfer)) => {
                        (sent, 0, Ok(Opened::Receiving(transfer, version)))
                    }
                }
            })
            .await?;
        let (mut transfer, version) = match opened {
            Opened::Answered(response) => return Ok(response),
            Opened::Receiving(transfer, version) => (transfer, version),
        };
        while !transfer.ended() {
            let frame = match frames.next().await {
                Some(frame) => frame?,
                None => {
                    return Err(TransportError::Unreachable {
                        reason: "the streamed push ended before its last frame".to_owned(),
                    })
                }
            };
            let bytes = wire::encode_as(&frame, PROTOCOL_VERSION);
            let c = &*self.counts;
            Counts::count(&c.sent, &c.last_request, bytes.len());
            let frame = wire::decode::<PageFrame>(&bytes).map_err(|e| TransportError::Refused {
                code: RefusalCode::BadRequest,
                reason: e.to_string(),
            })?;
            let peer = self.peer.clone();
            let (moved, taken) = run_blocking(move || {
                let taken = peer.push_frame(&mut transfer, frame);
                (transfer, taken)
            })
            .await
            .map_err(interrupted)?;
            transfer = moved;
            taken?;
        }
        let peer = self.peer.clone();
        let response = run_blocking(move || peer.close_push(transfer))
            .await
            .map_err(interrupted)??;
        // Answered in the request's version at most, as a server does.
        let bytes = wire::encode_as(&response, version.min(response.version()));
        let c = &*self.counts;
        Counts::count(&c.received, &c.last_response, bytes.len());
        wire::decode::<ExchangeResponse>(&bytes).map_err(TransportError::BadResponse)
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
        self.counts.blob_queries.fetch_add(1, Ordering::Relaxed);
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
        self.counts.blob_fetches.fetch_add(1, Ordering::Relaxed);
        let (_, mut reader) = self
            .peer
            .open_blob(&blob.hash)?
            .ok_or(TransportError::BlobNotFound { hash: blob.hash })?;
        // A small file is read in a few calls: a thread of its own would cost more.
        let in_runtime = tokio::runtime::Handle::try_current().is_ok();
        let copied = match in_runtime && blob.size >= crate::blob::pipe::PIPE_FROM {
            true => copy_read_aside(reader, blob.size, into).await,
            false => copy_chunks(&mut reader, into),
        };
        let n = copied.map_err(|e| TransportError::BlobTransfer {
            hash: blob.hash,
            reason: match e {
                CopyError::Read(e) => format!("reading at the peer: {e}"),
                CopyError::Write(e) => format!("writing locally: {e}"),
            },
        })?;
        self.counts.blob_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn Read + Send>,
    ) -> Result<(), TransportError> {
        self.counts.blob_pushes.fetch_add(1, Ordering::Relaxed);
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
        self.counts.blob_bytes.fetch_add(n, Ordering::Relaxed);
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

/// How the responder took a streamed push's request: answered at once, or a transfer that
/// waits for its frames (with the request's version, which the response keeps to).
#[allow(clippy::large_enum_variant)] // one per transfer, moved once
enum Opened {
    Answered(ExchangeResponse),
    Receiving(PushTransfer, u16),
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

/// Copies `reader` (`len` bytes) into `into` with the reads on a blocking thread, a chunk
/// or two ahead of the writes ([`stream_reader`], as the HTTP server serves a blob), as a
/// network transfer's bytes arrive while the last ones are written: the peer's disk and
/// ours work at the same time, and neither holds a runtime thread. Must run in a tokio
/// runtime.
async fn copy_read_aside(
    reader: Box<dyn Read + Send>,
    len: u64,
    into: &mut (dyn Write + Send),
) -> Result<u64, CopyError> {
    use http_body_util::BodyExt;
    let mut chunks = stream_reader(reader, Some(len), crate::blob::CHUNK);
    let mut total = 0u64;
    while let Some(frame) = chunks.frame().await {
        if let Ok(data) = frame.map_err(CopyError::Read)?.into_data() {
            into.write_all(&data).map_err(CopyError::Write)?;
            total += data.len() as u64;
        }
    }
    Ok(total)
}
