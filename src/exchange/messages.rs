//! The messages of a round: what an initiator asks and a responder answers. Their encoding
//! is [`crate::wire`]'s.

use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, NodeId};
use crate::record::{Key, Scope, ScopeFilter};
use crate::watermark::{MarksDigest, ScopedWatermarks};

use super::{Halt, Page};

/// The initiator's marks in a request.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum RequestMarks {
    /// The marks for the scopes in play, in full.
    Full(ScopedWatermarks),
    /// The digest of the marks for the scopes in play ([`ScopedWatermarks::digest`]), sent
    /// when the initiator believes the responder recorded exactly these marks of it. The
    /// responder uses what it recorded if that hashes to this digest, and otherwise answers
    /// [`ResponseMarks::Resend`].
    Digest(MarksDigest),
}

/// The initiator's half of a round.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ExchangeRequest {
    /// The initiator's node id.
    pub from: NodeId,
    /// The scopes in play.
    pub scopes: ScopeFilter,
    /// The initiator's watermarks for the scopes in play, in full or as a digest.
    pub marks: RequestMarks,
    /// The digest of the responder's marks for the scopes in play as the initiator last
    /// learned them (`None` if it never did): the responder answers [`ResponseMarks::Same`]
    /// instead of its marks when they still hash to it.
    pub known: Option<MarksDigest>,
    /// Versions the responder lacks, as far as the initiator knows.
    pub page: Page,
    /// The most versions the responder may send back.
    pub limit: u32,
    /// (scope, origin) streams the initiator halted when the responder last sent them
    /// (clock skew, own id): the responder plans them after every other stream, so one
    /// halted origin cannot fill every page and starve the rest.
    pub deferred: Vec<(Scope, NodeId)>,
    /// What version 2 adds (empty for a version 1 request).
    pub ext: RequestExt,
}

/// What a request carries beyond version 1 (see docs/protocol.md, "Versioning"). A request
/// whose extension is empty is sent as version 1, byte for byte.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RequestExt {
    /// The initiator's purge floors in play (NTP64 times; see docs/protocol.md,
    /// "Forgetting"), sent with the first request of a session, with every request that
    /// carries versions or refusals, and `None` otherwise: `Some` (even empty) asks the
    /// responder for its own floors and refusals, which it can only send in version 2.
    pub floors: Option<Vec<(Scope, u64)>>,
    /// Versions of the responder's last page that the initiator refused below its floor
    /// (it purged their keys' deletes): the responder drops them if they are still its
    /// stored versions and older than its own retention.
    pub refused: Vec<(Scope, Key, Hlc)>,
    /// The node the initiator means to reach, named in a request that carries versions or
    /// the initiator's marks in full (`None` in a quiet request, or before the initiator
    /// knows its peer). A responder with another id answers [`ExchangeResponse::elsewhere`]
    /// and applies and records nothing of the request, so nothing is pushed to a node that
    /// replaced the one expected at an address before its identity is checked.
    pub to: Option<NodeId>,
}

impl RequestExt {
    /// Whether nothing here needs version 2.
    pub fn is_empty(&self) -> bool {
        *self == RequestExt::default()
    }
}

/// What a response carries beyond version 1. A response whose extension is empty is sent as
/// version 1, byte for byte; a responder answering a version 1 request leaves it out.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ResponseExt {
    /// How many versions the responder holds that the initiator lacks, beyond this
    /// response's page, in the scopes in play (as far as the responder could count them:
    /// see `docs/protocol.md`); `None` when it did not count.
    pub remaining: Option<u64>,
    /// The responder's purge floors in play, when the request asked
    /// ([`RequestExt::floors`] is `Some`).
    pub floors: Vec<(Scope, u64)>,
    /// Versions of the request's page that the responder refused below its floor; the
    /// initiator drops them as [`RequestExt::refused`] says.
    pub refused: Vec<(Scope, Key, Hlc)>,
    /// The id the responder had before it took a fresh one (restored from a backup, see
    /// `SyncEngine::open_restored`), sent when a request was addressed to that id: the
    /// responder vouches that it is the node the initiator expected, under a new id.
    pub previous: Option<NodeId>,
}

impl ResponseExt {
    /// Whether nothing here needs version 2.
    pub fn is_empty(&self) -> bool {
        *self == ResponseExt::default()
    }
}

/// The responder's marks in a response.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ResponseMarks {
    /// The responder's marks for the scopes in play, after applying the request's page.
    Full(ScopedWatermarks),
    /// The responder's marks hash to the request's `known`: they are the ones the initiator
    /// already holds.
    Same,
    /// The request's [`RequestMarks::Digest`] does not match what the responder recorded of
    /// the initiator. Nothing of the request was applied or recorded; the page and halts are
    /// empty. The initiator sends the request again with its marks in full.
    Resend,
}

/// The responder's half of a round.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ExchangeResponse {
    /// The responder's node id.
    pub from: NodeId,
    /// The responder's watermarks for the scopes in play, after applying the request's page,
    /// in full or as "the ones you know"; or a request to resend the marks in full.
    pub marks: ResponseMarks,
    /// Versions the initiator lacks according to its watermarks.
    pub page: Page,
    /// Origins whose runs in the request's page the responder could not apply in full.
    pub halts: Vec<Halt>,
    /// What version 2 adds (empty for a version 1 response).
    pub ext: ResponseExt,
}

/// One page of a streamed pull after the response (kind 5, protocol version 2 only): the
/// responder's next page, planned from the initiator's marks raised to the tops of every page
/// before it (see docs/protocol.md, "Streamed pulls"). The initiator applies each as it
/// arrives, in order, each in its own transaction.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PageFrame {
    /// The frame's place in the transfer: 1 for the first frame after the response, then one
    /// more each. A frame out of this order is refused.
    pub seq: u32,
    /// Versions the initiator lacks, with each run's `(base, top]`.
    pub page: Page,
    /// As [`ResponseExt::remaining`]: what the initiator lacks beyond this page.
    pub remaining: Option<u64>,
    /// The last frame of the transfer: nothing follows. A transfer that ends without one
    /// was cut.
    pub end: bool,
}

impl ExchangeResponse {
    /// The answer to a request addressed to another node ([`RequestExt::to`]): it names
    /// the responder and carries nothing else (no marks, no page). The initiator finds the
    /// id is not the one it expected and applies nothing.
    pub fn elsewhere(from: NodeId) -> Self {
        ExchangeResponse {
            from,
            marks: ResponseMarks::Full(ScopedWatermarks::default()),
            page: Page::default(),
            halts: Vec::new(),
            ext: ResponseExt::default(),
        }
    }

    /// The answer to a request whose marks digest the responder cannot resolve.
    pub fn resend(from: NodeId) -> Self {
        ExchangeResponse {
            from,
            marks: ResponseMarks::Resend,
            page: Page::default(),
            halts: Vec::new(),
            ext: ResponseExt::default(),
        }
    }
}
