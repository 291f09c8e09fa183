//! Transports: how an initiator reaches a responder.
//!
//! [`Transport`] is the initiator's side (send a request, get a response). [`Responder`] is
//! the other side's small trait (answer a request), implemented by the engine; transports
//! and servers wrap any `Responder`, so they never reach into the engine. A [`Layered`]
//! transport wraps another to watch or alter its calls (cut a link, count bytes, inject
//! faults) through a [`Layer`], forwarding everything else.

mod in_process;
mod layer;

pub use self::in_process::{InProcess, WireStats};
pub use self::layer::{Call, Layer, Layered};

use std::future::Future;
use std::io::{Read, Write};
use std::time::Duration;

pub use crate::error::RefusalCode;
use std::sync::Arc;

use crate::api::NodeApi;
use crate::error::{Error, TransportError};
use crate::exchange::{PullCursor, PushStart, PushTransfer};
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::record::{BlobRef, Scope};
use crate::wire::{AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse, PageFrame};

/// The initiator's side of a round. Implementations retry nothing: the scheduler owns
/// retries. All blob traffic is started by the initiator, so a node behind NAT can sync.
pub trait Transport: Send + Sync {
    /// The responder's id, once known (the engine ships nothing before it is).
    fn peer_id(&self) -> Option<NodeId>;

    /// The node at this address is another one now (restored with a fresh id, or
    /// replaced): forget the id learnt, so the next round learns the new one. Transports
    /// that do not learn an id have nothing to forget.
    fn forget_peer(&self) {}

    /// Sends one request and returns the response.
    fn exchange(
        &self,
        request: ExchangeRequest,
    ) -> impl Future<Output = Result<ExchangeResponse, TransportError>> + Send;

    /// Sends a request that opens a streamed pull: the response, and the frames that follow
    /// it when its page was cut (docs/protocol.md, "Streamed pulls"). The frames arrive
    /// through a bounded channel while the engine applies the ones before, so a slow
    /// receiver slows the sender. Transports and peers that cannot stream answer
    /// [`TransportError::Unsupported`] and the engine pulls in rounds.
    fn pull(
        &self,
        request: ExchangeRequest,
    ) -> impl Future<Output = Result<Pull, TransportError>> + Send {
        let _ = request;
        async { Err(TransportError::Unsupported { what: "pull" }) }
    }

    /// Sends a request that opens a streamed push, then `frames`, the initiator's pages
    /// after it, as they come (docs/protocol.md, "Streamed pushes"), and returns the
    /// response the responder sends after the last frame (the one with `end`). The
    /// transport reads `frames` only as fast as it can send them, so the initiator's planning
    /// waits on a slow responder. An error among `frames`, or their end before the last,
    /// cuts the transfer: the responder keeps the pages it applied and answers nothing.
    /// Transports and peers that cannot take a streamed push answer
    /// [`TransportError::Unsupported`] (before reading any frame) and the engine pushes in
    /// rounds.
    fn push(
        &self,
        request: ExchangeRequest,
        frames: Frames,
    ) -> impl Future<Output = Result<ExchangeResponse, TransportError>> + Send {
        let _ = (request, frames);
        async { Err(TransportError::Unsupported { what: "push" }) }
    }

    /// Which of `hashes` the responder holds, in order.
    fn blobs_present(
        &self,
        hashes: Vec<Hash>,
    ) -> impl Future<Output = Result<Vec<bool>, TransportError>> + Send;

    /// Streams the responder's blob into `into`, in chunks. The caller verifies the bytes.
    fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn Write + Send),
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Streams `content` to the responder as blob `blob`; the responder verifies it and
    /// stores it only if it matches.
    fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn Read + Send>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Waits until the responder's data changed after `since` (a token from an earlier
    /// reply; `None` asks for the current token at once) or `timeout` passed, so the caller
    /// can exchange at once instead of on its interval. `watcher` is the caller's node id, if
    /// it syncs as one: changes made by the pages it sent itself are then not news to it.
    /// Transports without it answer [`TransportError::Unsupported`].
    fn watch(
        &self,
        since: Option<String>,
        watcher: Option<NodeId>,
        timeout: Duration,
    ) -> impl Future<Output = Result<WatchReply, TransportError>> + Send {
        let _ = (since, watcher, timeout);
        async { Err(TransportError::Unsupported { what: "watch" }) }
    }

    /// Sends one audit request and returns the response (see [`crate::exchange::audit`]).
    /// Transports without it answer [`TransportError::Unsupported`].
    fn audit(
        &self,
        request: AuditRequest,
    ) -> impl Future<Output = Result<AuditResponse, TransportError>> + Send {
        let _ = request;
        async { Err(TransportError::Unsupported { what: "audit" }) }
    }

    /// The peer's records API, reached as this transport reaches the peer (over HTTP with
    /// the same token), for reads routed to it while a scope hydrates
    /// ([`crate::api::NodeApi::get_routed`]); `None` (the default) if this transport cannot
    /// read records.
    fn records(&self) -> Option<Arc<dyn NodeApi>> {
        None
    }
}

/// The answer to [`Transport::pull`].
pub struct Pull {
    /// The response, as [`Transport::exchange`] returns it.
    pub response: ExchangeResponse,
    /// The frames after it, in the order sent (`None`: none follow). The last one has
    /// `end`; an error, or the channel closing before `end`, means the transfer was cut.
    pub frames: Option<Frames>,
}

impl std::fmt::Debug for Pull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pull")
            .field("response", &self.response)
            .field("frames", &self.frames.as_ref().map(|_| "..."))
            .finish()
    }
}

/// The frames of a streamed transfer, as they arrive (a [`Layer`] may watch or alter them):
/// a pull's from the responder, a push's from the initiator's engine.
pub type Frames = futures_util::stream::BoxStream<'static, Result<PageFrame, TransportError>>;

/// The frames that arrive through `rx` (bounded: the sender waits while it is full).
pub fn frames_from(rx: tokio::sync::mpsc::Receiver<Result<PageFrame, TransportError>>) -> Frames {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// How many frames of a streamed transfer a transport holds in flight between the sender
/// and the receiver (beyond the one each is working on): the window that bounds their
/// memory.
pub const PULL_WINDOW: usize = 4;

/// The answer to [`Transport::watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchReply {
    /// Whether the responder's data changed after the token sent (always true for none).
    pub news: bool,
    /// The token to wait from next (opaque).
    pub token: String,
}

/// The responder's side of a round.
pub trait Responder: Send + Sync {
    /// The responder's id.
    fn node_id(&self) -> NodeId;

    /// Answers one request.
    ///
    /// # Errors
    /// A [`Refusal`] to send back instead of a response.
    fn respond(&self, request: ExchangeRequest) -> Result<ExchangeResponse, Refusal>;

    /// Answers a request that opens a streamed pull: the response, and the cursor of the
    /// frames to send after it (`None`: nothing follows). The default, for responders that
    /// do not stream, answers as [`Responder::respond`].
    ///
    /// # Errors
    /// As for [`Responder::respond`].
    fn respond_pull(
        &self,
        request: ExchangeRequest,
    ) -> Result<(ExchangeResponse, Option<PullCursor>), Refusal> {
        Ok((self.respond(request)?, None))
    }

    /// Plans the next frame of a streamed pull from a fresh snapshot, moving `cursor` past
    /// it; the transport sends frames until one has `end`.
    ///
    /// # Errors
    /// A [`Refusal`]: the transfer stops there (the initiator keeps what it applied).
    fn next_frame(&self, cursor: &mut PullCursor) -> Result<PageFrame, Refusal> {
        let _ = cursor;
        Err(Refusal {
            code: RefusalCode::Internal,
            reason: "this node does not stream pulls".to_owned(),
        })
    }

    /// Whether this responder takes streamed pushes ([`Responder::open_push`] and the calls
    /// after it). The default is no: transports answer [`TransportError::Unsupported`],
    /// servers 404 (and say so on every sync answer, [`crate::http::HEADER_PUSH`]), and
    /// initiators push in rounds. Asked on a runtime thread: it must answer without blocking.
    fn takes_pushes(&self) -> bool {
        false
    }

    /// Takes the request that opens a streamed push: its page applied as a round's, and the
    /// transfer that takes the frames after it, or the response to send at once (nothing
    /// of the frames is then taken).
    ///
    /// # Errors
    /// As for [`Responder::respond`]; the default refuses.
    fn open_push(&self, request: ExchangeRequest) -> Result<PushStart, Refusal> {
        let _ = request;
        Err(no_pushes())
    }

    /// Applies the next frame of a streamed push, in its own transaction.
    ///
    /// # Errors
    /// A [`Refusal`]: the frame is out of order or its page is refused; nothing of it is
    /// applied and the transfer stops (the pages applied before stay). The default refuses.
    fn push_frame(&self, transfer: &mut PushTransfer, frame: PageFrame) -> Result<(), Refusal> {
        let _ = (transfer, frame);
        Err(no_pushes())
    }

    /// The response to a streamed push, once its last frame was applied.
    ///
    /// # Errors
    /// A [`Refusal`]: the last frame was not taken, or the store failed. The default
    /// refuses.
    fn close_push(&self, transfer: PushTransfer) -> Result<ExchangeResponse, Refusal> {
        let _ = transfer;
        Err(no_pushes())
    }

    /// Which of `hashes` are stored here, in order.
    ///
    /// # Errors
    /// A [`Refusal`].
    fn blobs_present(&self, hashes: &[Hash]) -> Result<Vec<bool>, Refusal>;

    /// The blob's size and a chunked reader over it, or `None` if it is not stored.
    ///
    /// # Errors
    /// A [`Refusal`].
    fn open_blob(&self, hash: &Hash) -> Result<Option<crate::blob::BlobReader>, Refusal>;

    /// Stores `content` as blob `blob` if its bytes hash to it (and have its size).
    ///
    /// # Errors
    /// A [`Refusal`]: `BadRequest` for content that does not match (nothing is stored).
    fn accept_blob(&self, blob: &BlobRef, content: &mut dyn Read) -> Result<(), Refusal>;

    /// The scopes the responder holds records or watermarks in (a server narrows a request
    /// for all scopes to the ones among them, and the request's, that a token may read).
    ///
    /// # Errors
    /// A [`Refusal`].
    fn scopes(&self) -> Result<Vec<Scope>, Refusal>;

    /// The scopes in which a stored version refers to blob `hash` (a server serves a blob
    /// to a token only if it may read one of them). The default, for responders that do
    /// not track references, is none.
    ///
    /// # Errors
    /// A [`Refusal`].
    fn blob_scopes(&self, hash: &Hash) -> Result<Vec<Scope>, Refusal> {
        let _ = hash;
        Ok(Vec::new())
    }

    /// The responder's change notifier, if it has one (watch needs it).
    fn notifier(&self) -> Option<&crate::notify::Notifier> {
        None
    }

    /// Answers one audit request.
    ///
    /// # Errors
    /// A [`Refusal`]; responders without audits refuse with `Unavailable`.
    fn audit(&self, request: AuditRequest) -> Result<AuditResponse, Refusal> {
        let _ = request;
        Err(Refusal {
            code: RefusalCode::Unavailable,
            reason: "this node does not answer audits".to_owned(),
        })
    }

    /// The responder's records API, for reads routed to it (see [`Transport::records`]);
    /// `None` (the default) for a responder that has none.
    fn records(&self) -> Option<Arc<dyn NodeApi>> {
        None
    }
}

impl<R: Responder + ?Sized> Responder for std::sync::Arc<R> {
    fn node_id(&self) -> NodeId {
        (**self).node_id()
    }

    fn respond(&self, request: ExchangeRequest) -> Result<ExchangeResponse, Refusal> {
        (**self).respond(request)
    }

    fn respond_pull(
        &self,
        request: ExchangeRequest,
    ) -> Result<(ExchangeResponse, Option<PullCursor>), Refusal> {
        (**self).respond_pull(request)
    }

    fn next_frame(&self, cursor: &mut PullCursor) -> Result<PageFrame, Refusal> {
        (**self).next_frame(cursor)
    }

    fn takes_pushes(&self) -> bool {
        (**self).takes_pushes()
    }

    fn open_push(&self, request: ExchangeRequest) -> Result<PushStart, Refusal> {
        (**self).open_push(request)
    }

    fn push_frame(&self, transfer: &mut PushTransfer, frame: PageFrame) -> Result<(), Refusal> {
        (**self).push_frame(transfer, frame)
    }

    fn close_push(&self, transfer: PushTransfer) -> Result<ExchangeResponse, Refusal> {
        (**self).close_push(transfer)
    }

    fn blobs_present(&self, hashes: &[Hash]) -> Result<Vec<bool>, Refusal> {
        (**self).blobs_present(hashes)
    }

    fn open_blob(&self, hash: &Hash) -> Result<Option<crate::blob::BlobReader>, Refusal> {
        (**self).open_blob(hash)
    }

    fn accept_blob(&self, blob: &BlobRef, content: &mut dyn Read) -> Result<(), Refusal> {
        (**self).accept_blob(blob, content)
    }

    fn scopes(&self) -> Result<Vec<Scope>, Refusal> {
        (**self).scopes()
    }

    fn blob_scopes(&self, hash: &Hash) -> Result<Vec<Scope>, Refusal> {
        (**self).blob_scopes(hash)
    }

    fn notifier(&self) -> Option<&crate::notify::Notifier> {
        (**self).notifier()
    }

    fn audit(&self, request: AuditRequest) -> Result<AuditResponse, Refusal> {
        (**self).audit(request)
    }

    fn records(&self) -> Option<Arc<dyn NodeApi>> {
        (**self).records()
    }
}

/// The refusal of a responder that takes no streamed pushes.
fn no_pushes() -> Refusal {
    Refusal {
        code: RefusalCode::Internal,
        reason: "this node does not take streamed pushes".to_owned(),
    }
}

/// What a responder tells a peer when it refuses a request: separate from the local error
/// type, and free of internal detail for server-side failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The class.
    pub code: RefusalCode,
    /// A human-readable reason.
    pub reason: String,
}

impl From<&Error> for Refusal {
    fn from(e: &Error) -> Self {
        let (code, reason) = match e {
            Error::Wire(w) => (RefusalCode::BadRequest, w.to_string()),
            Error::Protocol(p) => (RefusalCode::BadRequest, p.to_string()),
            Error::Input(i) => (RefusalCode::BadRequest, i.to_string()),
            Error::Clock(c) => (RefusalCode::Unavailable, c.to_string()),
            Error::Blob(
                b @ (crate::blob::BlobError::HashMismatch { .. }
                | crate::blob::BlobError::SizeMismatch { .. }),
            ) => (RefusalCode::BadRequest, b.to_string()),
            // The content's reader failed (an upload that broke off), not the storage.
            Error::Blob(b @ crate::blob::BlobError::Source(_)) => {
                (RefusalCode::BadRequest, crate::error::error_chain(b))
            }
            Error::Store(_) | Error::Blob(_) => storage_refusal(e),
            _ => (RefusalCode::Internal, "internal error".to_owned()),
        };
        Refusal { code, reason }
    }
}

/// A storage failure as a peer is told it: a full disk is `StorageFull` (it clears once
/// space is freed), another I/O failure or a store closed by one is `Unavailable` (the store
/// reopens by itself), each naming the OS error; anything else (a damaged store) is internal.
fn storage_refusal(e: &Error) -> (RefusalCode, String) {
    if let Some(io) = crate::error::io_cause(e) {
        // The OS error alone: paths on the server are none of the peer's business.
        return if crate::error::is_storage_full(io) {
            (RefusalCode::StorageFull, format!("storage is full: {io}"))
        } else {
            (RefusalCode::Unavailable, format!("storage failed: {io}"))
        };
    }
    match e {
        Error::Store(s @ crate::error::StoreError::Closed) => {
            (RefusalCode::Unavailable, s.to_string())
        }
        // The database failed (restarting, a lost connection) or no pooled connection came
        // free in time: the peer's retry may find it back. Damaged rows are `Corrupt`.
        #[cfg(feature = "postgres")]
        Error::Store(
            s @ (crate::error::StoreError::Postgres(_) | crate::error::StoreError::Pool(_)),
        ) => (RefusalCode::Unavailable, s.to_string()),
        _ => (RefusalCode::Internal, "internal error".to_owned()),
    }
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{PgOptions, PgStore};

    #[test]
    fn a_database_out_of_reach_is_unavailable_not_internal() {
        // Nothing listens on port 1: the pool gives up after its timeout.
        let options = PgOptions {
            connect_timeout: Duration::from_millis(200),
            ..PgOptions::default()
        };
        let Err(e) = PgStore::open_with("postgres://root@127.0.0.1:1/test", &options) else {
            panic!("a store opened with no database");
        };
        let refusal = Refusal::from(&Error::Store(e));
        assert_eq!(refusal.code, RefusalCode::Unavailable, "{refusal:?}");
    }
}

impl From<Refusal> for TransportError {
    fn from(r: Refusal) -> Self {
        TransportError::Refused {
            code: r.code,
            reason: r.reason,
        }
    }
}
