//! Errors, one enum per area, all converging on [`Error`].
//!
//! Context lives in fields (`origin`, `peer`, `scope`), not in formatted strings. What a peer
//! is told when its request is refused is a separate, wire-level type
//! ([`crate::transport::Refusal`]).

use std::time::Duration;

use crate::hlc::NodeId;
use crate::record::Scope;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any error highwater returns.
///
/// Each variant's text is its area's name, then the error of that area (`storage error: the
/// redb database failed: Database already open`), so printing an error with `{}` says what
/// went wrong; [`error_chain`] adds the causes the text does not already end with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A clock error: skew beyond the bound, or the timestamp space is exhausted.
    #[error("clock error: {0}")]
    Clock(#[from] ClockError),
    /// A scope, key or value that does not satisfy the model's rules.
    #[error("invalid input: {0}")]
    Input(#[from] InputError),
    /// Bytes that do not decode as a version-1 message.
    #[error("wire format error: {0}")]
    Wire(#[from] WireError),
    /// The storage backend failed.
    #[error("storage error: {0}")]
    Store(#[from] StoreError),
    /// A peer sent a message that decodes but breaks the protocol's rules.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The transport could not complete a round.
    #[error("transport error: {0}")]
    Transport(#[from] TransportError),
    /// The blob store failed, or content did not match its hash.
    #[error("blob error: {0}")]
    Blob(#[from] crate::blob::BlobError),
    /// The async runtime shut down before blocking work could run.
    #[error("interrupted: {0}")]
    Interrupted(#[from] crate::blocking::Interrupted),
}

/// Errors of the hybrid logical clock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClockError {
    /// A timestamp from `origin` is ahead of the local clock by more than the allowed drift.
    #[error("timestamp from origin {origin} is {ahead_by:?} ahead of the local clock (max drift {max_drift:?})")]
    Skew {
        /// The node whose timestamp is ahead.
        origin: NodeId,
        /// How far ahead of the local physical clock it is.
        ahead_by: Duration,
        /// The configured bound.
        max_drift: Duration,
    },
    /// The clock cannot issue a timestamp greater than the last one (it sits at `u64::MAX`).
    #[error("the clock's timestamp space is exhausted")]
    Exhausted,
    /// The configured maximum drift does not fit the NTP64 format.
    #[error("max drift {max_drift:?} is out of range")]
    DriftOutOfRange {
        /// The configured value.
        max_drift: Duration,
    },
}

/// Input that breaks the model's rules (scope syntax, key and value sizes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// A scope that is neither `shared` nor `app/<app_id>/<table>`.
    #[error("invalid scope {scope:?}: expected `shared` or `app/<app_id>/<table>` with segments of 1-64 characters [A-Za-z0-9_.-], not starting with '.'")]
    InvalidScope {
        /// The text that was refused (truncated to 80 characters).
        scope: String,
    },
    /// An empty key, or one longer than the limit.
    #[error("key length {len} is outside 1..={max}")]
    KeyLength {
        /// The key's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A local write points at a blob this node does not hold (write it with
    /// `SyncEngine::put_file`, which stores the blob first).
    #[error("blob {hash} is not in the local blob store")]
    BlobNotLocal {
        /// The blob.
        hash: crate::hash::Hash,
    },
    /// A value longer than the limit.
    #[error("value length {len} exceeds {max} bytes; store large content as a file")]
    ValueTooLarge {
        /// The value's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Bytes that are not a valid version-1 envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input ends before the message does.
    #[error("message truncated")]
    Truncated,
    /// The message decoded, but bytes follow it.
    #[error("{count} trailing bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        count: usize,
    },
    /// The first four bytes are not highwater's magic.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {found}; supported: {supported:?}")]
    UnsupportedVersion {
        /// The version in the envelope.
        found: u16,
        /// The versions this build speaks.
        supported: &'static [u16],
    },
    /// A message kind that is unknown or not the one expected here.
    #[error("unexpected message kind {found} (expected {expected})")]
    UnexpectedKind {
        /// The kind byte found.
        found: u8,
        /// The kind expected.
        expected: u8,
    },
    /// The message is larger than the limit.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The message size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body does not decode (bad varint, bad enum tag, invalid field value...).
    #[error("malformed message body: {reason}")]
    Malformed {
        /// What the decoder reported.
        reason: String,
    },
}

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The redb database failed (the cause is the error's source).
    #[error("the redb database failed: {0}")]
    Redb(#[source] Box<redb::Error>),
    /// Filesystem error around the store (creating its directory...).
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Stored bytes that do not decode: the file is damaged or from an unknown format.
    #[error("corrupt {what} in the store")]
    Corrupt {
        /// Which table or field.
        what: &'static str,
    },
    /// This thread still holds a reader that holds back the store's commits (a
    /// [`RedbStore`](crate::store::RedbStore) reader while deferred commits are gathered):
    /// waiting for the store here would never end. Drop the reader first.
    #[error(
        "this thread still holds a reader of the store; drop it before writing or reading again"
    )]
    ReaderHeld,
    /// The store is closed: an I/O failure closed it and it could not be opened again yet
    /// (the cause was reported by the call that failed); the next call tries again.
    #[error("the store is closed after an I/O failure; it reopens once the cause is fixed")]
    Closed,
    /// The PostgreSQL database failed (the cause is the error's source): a lost
    /// connection, a statement it refused. Nothing of the call's transaction was applied.
    #[cfg(feature = "postgres")]
    #[error("the PostgreSQL database failed")]
    Postgres(#[source] Box<postgres::Error>),
    /// TLS to the PostgreSQL database cannot be set up (its CA file cannot be used).
    #[cfg(feature = "postgres")]
    #[error("TLS to the PostgreSQL database cannot be set up")]
    Tls(#[source] Box<crate::http::TlsError>),
    /// No PostgreSQL connection became free (or could be opened) in time: the pool is
    /// exhausted or the database is unreachable.
    #[cfg(feature = "postgres")]
    #[error("no PostgreSQL connection became available")]
    Pool(#[source] r2d2::Error),
    /// A batch's issued timestamp ([`crate::store::Batch::issued`]) is not above the time
    /// the store's issuing commits reached, or not under the store's identity: another
    /// writer sharing the store issued a later time, or took a fresh identity, since this
    /// writer read them. Nothing was written; the writer raises its clock to `before`, takes
    /// `identity`, and issues again.
    #[error(
        "another writer sharing the store issued up to {before} or changed its identity: \
         the timestamp {issued} cannot be committed"
    )]
    IssuedBehind {
        /// The batch's least issued timestamp.
        issued: crate::hlc::Hlc,
        /// The time issued timestamps must exceed.
        before: u64,
        /// The stored identity.
        identity: Option<crate::hlc::NodeId>,
    },
    /// The store is in another on-disk format than the one this build reads and writes.
    #[error("store format {found} is not supported (this build reads {supported})")]
    UnsupportedFormat {
        /// The format found.
        found: u32,
        /// The format this build reads and writes.
        supported: u32,
    },
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Redb(Box::new(e.into()))
    }
}

/// A peer's message decodes but breaks the protocol's rules. Nothing of it is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer claims our own node id: a loop to ourselves, or a cloned data directory.
    #[error("peer claims our own node id {node}")]
    PeerIsSelf {
        /// Our node id.
        node: NodeId,
    },
    /// The response came from another node than the one this transport talked to before.
    #[error("expected peer {expected}, but {found} answered")]
    UnexpectedPeer {
        /// The node we expected.
        expected: NodeId,
        /// The node that answered.
        found: NodeId,
    },
    /// The response came from another node than the one expected, which says it is that
    /// node under a fresh id (it was restored from a backup and vouches for its previous
    /// id). Nothing of the response was applied.
    #[error("expected peer {old}, but {new} answered, which says it was {old} before it took a fresh id")]
    PeerRestored {
        /// The node we expected.
        old: NodeId,
        /// The node that answered.
        new: NodeId,
    },
    /// A streamed transfer's frame (a pull's or a push's) out of order: a frame repeated,
    /// skipped or reordered, or one after the transfer's last. The pages applied before it
    /// stay applied; nothing of it or after it is.
    #[error("streamed transfer from {peer}: frame {found} where frame {expected} was due")]
    FrameOutOfOrder {
        /// The sender of the frames (the responder of a pull, the initiator of a push).
        peer: NodeId,
        /// The frame number that was due (0: none, the transfer had ended).
        expected: u32,
        /// The frame number received.
        found: u32,
    },
    /// A streamed push was to be answered before its last frame was taken (the pages taken
    /// stay applied).
    #[error("streamed push from {peer} ended before its last frame")]
    PushUnfinished {
        /// The initiator.
        peer: NodeId,
    },
    /// A run whose versions are not strictly ascending, or lie outside `(base, top]`.
    #[error("malformed run for scope {scope}, origin {origin}: {reason}")]
    MalformedRun {
        /// The run's scope.
        scope: Scope,
        /// The run's origin.
        origin: NodeId,
        /// What is wrong.
        reason: &'static str,
    },
    /// A version that does not validate (a value over the size limit).
    #[error("malformed version for scope {scope}, key {key:?}: {reason}")]
    MalformedVersion {
        /// The version's scope.
        scope: Scope,
        /// Its key.
        key: crate::record::Key,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two runs for the same scope and origin in one page.
    #[error("duplicate run for scope {scope}, origin {origin}")]
    DuplicateRun {
        /// The scope.
        scope: Scope,
        /// The origin.
        origin: NodeId,
    },
    /// A run for a scope the exchange did not put in play.
    #[error("run for scope {scope} which is not in play in this exchange")]
    ScopeNotInPlay {
        /// The scope.
        scope: Scope,
    },
    /// The response's marks do not answer the request: `Same` to a request that named no
    /// known marks, or `Resend` to a request that carried its marks in full.
    #[error("peer {peer} answered with marks that do not fit the request: {reason}")]
    UnexpectedMarks {
        /// The responder.
        peer: NodeId,
        /// What does not fit.
        reason: &'static str,
    },
}

/// The class of a refusal, as a peer is told it (HTTP maps these to status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The request is malformed or breaks the protocol (400).
    BadRequest,
    /// The requester lacks access (403).
    Forbidden,
    /// The responder cannot serve now; try later (503).
    Unavailable,
    /// The responder failed (500).
    Internal,
    /// The request carried no valid credentials (HTTP 401).
    Unauthorized,
    /// The request was larger than the responder accepts (HTTP 413).
    TooLarge,
    /// The responder is busy with this requester's other requests; try later (HTTP 429).
    Busy,
    /// The responder's storage is full; try later, once space is freed (HTTP 507).
    StorageFull,
}

/// The transport could not complete a round. The scheduler decides whether to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer could not be reached.
    #[error("peer unreachable: {reason}")]
    Unreachable {
        /// Why.
        reason: String,
    },
    /// The peer refused the request.
    #[error("peer refused the request ({code:?}): {reason}")]
    Refused {
        /// The refusal's class.
        code: RefusalCode,
        /// The peer's reason.
        reason: String,
    },
    /// The peer's answer is not a valid message.
    #[error("peer sent an invalid message: {0}")]
    BadResponse(#[source] WireError),
    /// The peer does not hold the blob asked for.
    #[error("peer does not have blob {hash}")]
    BlobNotFound {
        /// The blob.
        hash: crate::hash::Hash,
    },
    /// A blob transfer broke off (reading or writing the stream failed).
    #[error("blob {hash} transfer failed: {reason}")]
    BlobTransfer {
        /// The blob.
        hash: crate::hash::Hash,
        /// What failed.
        reason: String,
    },
    /// The transport cannot do what was asked (say, watch over a transport without it).
    #[error("the transport does not support {what}")]
    Unsupported {
        /// The operation.
        what: &'static str,
    },
    /// A node URL this transport cannot use: a local configuration error, found before
    /// anything is sent.
    #[error("bad node URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bearer token that cannot be sent (it is not a valid header value): a local
    /// configuration error.
    #[error("the token is not a valid header value")]
    InvalidToken,
    /// The node's TLS certificate was not accepted: it does not chain to a trusted root (give
    /// its CA with a CA file), has expired, or does not name the host asked for.
    #[error("TLS certificate problem with {url}: {reason}")]
    Certificate {
        /// The node's root URL.
        url: String,
        /// What rustls found wrong with the certificate.
        reason: String,
    },
    /// A CA file to trust that cannot be used: a local configuration error, found before
    /// anything is sent.
    #[error("cannot use CA file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// An error and its sources, as one line (`outer: inner: innermost`), for logs and for
/// messages that cross a boundary as text.
///
/// A cause whose text the line already ends with (an error that prints its source in its
/// own text, as [`Error`] does) is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// The operating system's error under `error`, if it failed on I/O (a store or blob write
/// that hit a full disk, a failed fsync...).
pub fn io_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        // redb's errors do not report their I/O error as a source.
        if let Some(redb::Error::Io(io)) = e.downcast_ref::<redb::Error>() {
            return Some(io);
        }
        if let Some(StoreError::Redb(r)) = e.downcast_ref::<StoreError>() {
            if let redb::Error::Io(io) = &**r {
                return Some(io);
            }
        }
        next = e.source();
    }
    None
}

/// Whether `io` says the disk (or the user's quota) is full.
pub fn is_storage_full(io: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    io.kind() == std::io::ErrorKind::StorageFull
        || matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_each_cause_once() {
        let inner = redb::Error::DatabaseAlreadyOpen.to_string();
        let error = Error::Store(StoreError::from(redb::Error::DatabaseAlreadyOpen));
        let chain = error_chain(&error);
        assert_eq!(chain.matches(&inner).count(), 1, "{chain}");
        assert!(
            chain.starts_with("storage error: the redb database failed: "),
            "{chain}"
        );
    }

    #[test]
    fn an_error_prints_its_cause() {
        let error = Error::Store(StoreError::from(redb::Error::DatabaseAlreadyOpen));
        let inner = redb::Error::DatabaseAlreadyOpen.to_string();
        assert_eq!(
            error.to_string(),
            format!("storage error: the redb database failed: {inner}")
        );
        let refused = Error::Transport(TransportError::Unreachable {
            reason: "connection refused".into(),
        });
        assert_eq!(
            refused.to_string(),
            "transport error: peer unreachable: connection refused"
        );
        let input = Error::Input(InputError::KeyLength { len: 0, max: 4 });
        assert_eq!(
            input.to_string(),
            "invalid input: key length 0 is outside 1..=4"
        );
    }
}
