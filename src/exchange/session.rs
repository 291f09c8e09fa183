//! What a node keeps of its rounds with one peer between rounds: a value its caller owns.

use std::collections::BTreeMap;

use crate::hlc::NodeId;
use crate::record::{Scope, ScopeFilter};
use crate::watermark::MarksDigest;

use super::{Halt, HaltReason, Page, Streams};

/// One node's memory of its rounds with one peer: which streams each side halted, and what
/// the peer recorded of our marks. Memory only: after a restart a fresh session relearns
/// both in one round (halts by sending again, marks by sending them in full).
///
/// The caller owns it: [`crate::Scheduler`] keeps one per peer and shows it in
/// [`crate::PeerStatus`]; [`crate::SyncEngine::exchange`] keeps one per peer itself for
/// callers that do not. A session belongs to one peer: a round over a transport that reaches
/// another node is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// What the peer is called in events, if the caller named it.
    pub(crate) name: Option<String>,
    /// The peer, once a round with it completed.
    pub(crate) peer: Option<NodeId>,
    /// Streams we halted when the peer sent them, and why: our requests ask the peer to plan
    /// them after every other stream.
    pub(crate) ours: BTreeMap<(Scope, NodeId), HaltReason>,
    /// Streams the peer halted when we sent them, and why: we plan them last.
    pub(crate) theirs: BTreeMap<(Scope, NodeId), HaltReason>,
    /// Our marks as the peer recorded them at the end of the last round between us, if we
    /// can tell.
    pub(crate) held: Option<HeldMarks>,
    /// Versions of the peer's last page this node refused below its purge floor, to report
    /// in the next request (the peer drops them).
    pub(crate) refused: Vec<(Scope, crate::record::Key, crate::hlc::Hlc)>,
    /// When (the engine's time source, NTP64) a round of this session last heard the peer's
    /// purge floors.
    pub(crate) floors_heard: Option<u64>,
    /// Whether the peer's last page was cut by its limit (more to pull): the next request
    /// goes in version 2, so that the answer says how many versions remain.
    pub(crate) pulling: bool,
    /// The peer (or the transport to it) cannot stream a pull: this session pulls in
    /// rounds.
    pub(crate) no_stream: bool,
    /// The peer (or the transport to it) cannot take a streamed push: this session pushes
    /// in rounds.
    pub(crate) no_push: bool,
    /// A streamed push of this session was opened and its round did not complete: what we
    /// know of the peer's marks may be stale-low (it may hold pages it applied before a cut),
    /// so the next round goes plain, and learns them, before another push opens. Without
    /// it, a link that always breaks would have every push resend what the one before got
    /// through.
    pub(crate) push_unsure: bool,
}

/// Our marks in play as a peer recorded them at the end of the last round between us, as a
/// digest: while our marks still hash to it, our requests to that peer carry the digest
/// alone. A belief only: the peer checks the digest against what it did record, and a wrong
/// belief costs one round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldMarks {
    /// The scopes in play in that round.
    pub(crate) scopes: ScopeFilter,
    /// The digest of our marks as the peer recorded them.
    pub(crate) digest: MarksDigest,
}

impl Session {
    /// A session with a peer not met yet.
    pub fn new() -> Session {
        Session::default()
    }

    /// A session with a peer not met yet, which events name `name` (a URL, say).
    pub fn named(name: impl Into<String>) -> Session {
        Session {
            name: Some(name.into()),
            ..Session::default()
        }
    }

    /// A session with the peer `name`, which a round before this one (or a note that
    /// outlived a restart) found to be node `peer`: requests are addressed to it, and a
    /// response from any other node is refused.
    pub fn named_expecting(name: impl Into<String>, peer: Option<NodeId>) -> Session {
        Session {
            name: Some(name.into()),
            peer,
            ..Session::default()
        }
    }

    /// What events call the peer: the session's name, else the peer's node id in hex once
    /// known.
    pub fn label(&self) -> Option<String> {
        self.name
            .clone()
            .or_else(|| self.peer.map(|p| p.to_string()))
    }

    /// The peer, once a round with it completed.
    pub fn peer(&self) -> Option<NodeId> {
        self.peer
    }

    /// The streams this node halted when the peer sent them (clock skew, our own id, a file
    /// that could not be had), with why; each stays here until the peer sends it again and
    /// it applies.
    pub fn halted_here(&self) -> Vec<Halt> {
        halts(&self.ours)
    }

    /// The streams the peer halted when this node sent them, with why.
    pub fn halted_by_peer(&self) -> Vec<Halt> {
        halts(&self.theirs)
    }

    /// Whether our next request may name our marks by their digest alone.
    pub fn marks_held(&self) -> bool {
        self.held.is_some()
    }

    pub(crate) fn our_streams(&self) -> Streams {
        self.ours.keys().cloned().collect()
    }

    pub(crate) fn their_streams(&self) -> Streams {
        self.theirs.keys().cloned().collect()
    }

    /// A stream stays halted, in either direction, until it is sent again and applies.
    pub(crate) fn remember_halts(
        &mut self,
        shipped: &Page,
        received: &Page,
        theirs: &[Halt],
        ours: &[Halt],
    ) {
        let update =
            |set: &mut BTreeMap<(Scope, NodeId), HaltReason>, sent: &Page, halted: &[Halt]| {
                for (scope, origin) in sent.streams() {
                    set.remove(&(scope.clone(), origin));
                }
                for h in halted {
                    set.insert((h.scope.clone(), h.origin), h.reason.clone());
                }
            };
        update(&mut self.ours, received, ours);
        update(&mut self.theirs, shipped, theirs);
    }
}

fn halts(streams: &BTreeMap<(Scope, NodeId), HaltReason>) -> Vec<Halt> {
    streams
        .iter()
        .map(|((scope, origin), reason)| Halt {
            scope: scope.clone(),
            origin: *origin,
            reason: reason.clone(),
        })
        .collect()
}
