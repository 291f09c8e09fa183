//! The initiator's half of a round, as steps: plan the request, read the response, finish.

use std::collections::BTreeSet;

use super::{ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks};
use crate::error::{ProtocolError, Result};
use crate::hlc::NodeId;
use crate::record::{BlobRef, Key, Scope, ScopeFilter};
use crate::store::{PeerKnowledge, StoreRead};
use crate::watermark::ScopedWatermarks;

use super::plan::{plan_page, PageLimits};
use super::pull::PullCursor;
use super::{
    held_after, marks_in_play, Halt, HeldMarks, Page, PageFrame, RequestExt, ResponseExt, Run,
    Session, Streams,
};

/// A version refused below a purge floor: its scope, key and Hlc.
type Refused = (Scope, Key, crate::hlc::Hlc);

/// Options of one exchange round.
#[derive(Clone, Debug, Default)]
pub struct ExchangeOptions {
    /// The scopes in play (default: all).
    pub scopes: ScopeFilter,
    /// Overrides the configured page limit for this round.
    pub page_limit: Option<usize>,
}

/// What one round did, seen from the initiator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeOutcome {
    /// The responder.
    pub peer: NodeId,
    /// Versions this node sent.
    pub shipped: usize,
    /// Versions the peer sent.
    pub received: usize,
    /// Received versions that won last-write-wins and changed this node's state.
    pub applied: usize,
    /// Whether another round would move more (call again at once).
    pub has_more: bool,
    /// Origins whose streams this node halted (clock skew, own id, blob unavailable), and
    /// those whose versions it refused below its purge floor (a halt that holds nothing:
    /// [`Halt::holds_stream`]).
    pub halts: Vec<Halt>,
    /// Origins whose streams the peer halted, or whose versions it refused below its floor.
    pub peer_halts: Vec<Halt>,
    /// Blobs uploaded to the peer.
    pub blobs_pushed: usize,
    /// Blobs fetched from the peer.
    pub blobs_fetched: usize,
    /// Versions the peer sent that this node refused below its purge floor (their keys'
    /// deletes were purged here); the next request tells the peer.
    pub refused: usize,
    /// Versions of ours the peer refused below its floor, which this node dropped.
    pub dropped: usize,
    /// The peer's purge floor rose in a scope in play: it may have purged deletes this node
    /// never received, so an audit with it should follow (the scheduler and `highwater
    /// sync` run one).
    pub audit_wanted: bool,
    /// How many versions the peer holds that this node lacks beyond this round's page, in
    /// the scopes in play, as the peer counted them (`ResponseExt::remaining`; a count at
    /// the peer's cap is a lower bound). `None` when the peer did not count: a version 1
    /// peer, or a quiet request that went out in version 1 (no round of the session had
    /// more to pull before it).
    pub remaining: Option<u64>,
}

/// A round this node initiated, between its steps (see [`crate::exchange`]).
#[derive(Debug)]
pub struct Initiation {
    me: NodeId,
    scopes: ScopeFilter,
    /// The peer the transport reaches, if it knew before the round.
    expected: Option<NodeId>,
    /// Streams we halted last time (the request defers them).
    ours: Streams,
    /// Streams the peer halted last time (planned last).
    theirs: Streams,
    /// Streams our planning blocked on a blob we lack.
    blocked: Streams,
    /// Our marks in play, which the request carries in full or as their digest.
    mine: ScopedWatermarks,
    /// Our knowledge of the peer's marks in play, whose digest the request carries.
    known: Option<ScopedWatermarks>,
    request: ExchangeRequest,
    /// Frames of a streamed pull received after the response: how many, the streams their
    /// pages carried, and the last page (its last run, without versions, and `more`) with
    /// its count of what remains.
    frames: u32,
    ended: bool,
    streamed: Streams,
    last: Option<(Page, Option<u64>)>,
    /// The page limits our pages are planned with (a streamed push plans its frames with
    /// them too).
    limits: PageLimits,
    /// What a streamed push sent after the request, once the responder answered it.
    pushed: Option<Pushed>,
}

/// What the frames of a streamed push carried, which the responder took in full (it answered
/// after the last): how many versions, the streams, and the last page without its
/// versions.
#[derive(Debug, Default)]
pub struct Pushed {
    versions: usize,
    streams: Streams,
    last: Option<Page>,
}

impl Pushed {
    /// Notes a frame sent.
    pub fn note(&mut self, page: &Page) {
        self.versions += page.version_count();
        for (scope, origin) in page.streams() {
            self.streams.insert((scope.clone(), origin));
        }
        self.last = Some(without_versions(page));
    }

    /// Versions sent in the frames.
    pub fn versions(&self) -> usize {
        self.versions
    }
}

/// `page`'s last run without its versions, and whether it was cut: what tells whether more
/// follows it.
fn without_versions(page: &Page) -> Page {
    Page {
        runs: (page.runs.last())
            .map(|r| Run {
                versions: Vec::new(),
                ..r.clone()
            })
            .into_iter()
            .collect(),
        more: page.more,
    }
}

/// What to do with a response.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per round, moved once
pub enum Reply {
    /// The peer could not resolve our marks' digest: send this request (marks in full) and
    /// read its response instead.
    Resend(ExchangeRequest),
    /// Apply this page, recording the knowledge in the same transaction, then
    /// [`Initiation::finish`].
    Apply(Received),
}

/// The responder's page, to apply, and what to record of it.
#[derive(Debug)]
pub struct Received {
    /// The responder.
    pub peer: NodeId,
    /// Versions we lack.
    pub page: Page,
    /// The streams of our page the responder halted.
    pub peer_halts: Vec<Halt>,
    /// The responder's marks in play, recorded as our knowledge of it in the page's
    /// transaction.
    pub knowledge: PeerKnowledge,
    /// What the response carries beyond version 1 (floors, refusals).
    pub ext: ResponseExt,
}

/// What applying the received page did (the driver's answer to [`Reply::Apply`]).
#[derive(Debug, Default)]
pub struct AppliedPage {
    /// Versions received.
    pub received: usize,
    /// Versions that won last-write-wins.
    pub applied: usize,
    /// The streams this node halted.
    pub halts: Vec<Halt>,
}

impl Initiation {
    /// Plans a round with the peer of `session` (which `expected` names, if the transport
    /// knows it) from one snapshot of our store: our marks in play, what we last learned of
    /// the peer's, and the page it lacks by that knowledge (nothing on first contact).
    /// `has_blob` tells whether a blob is local (a version whose blob is not is never
    /// shipped).
    ///
    /// IMPORTANT: the session's held marks are taken, not read: they are put back only by
    /// [`Initiation::finish`], so a round that fails or is dropped half-way leaves the next
    /// request in full.
    ///
    /// # Errors
    /// A store read failed; or `expected` is our own id, or not the session's peer.
    pub fn plan(
        me: NodeId,
        read: &dyn StoreRead,
        session: &mut Session,
        expected: Option<NodeId>,
        options: &ExchangeOptions,
        limits: PageLimits,
        has_blob: &dyn Fn(&BlobRef) -> bool,
    ) -> Result<Initiation> {
        if expected == Some(me) {
            return Err(ProtocolError::PeerIsSelf { node: me }.into());
        }
        let expected = match (expected, session.peer) {
            (Some(e), Some(p)) if e != p => {
                return Err(ProtocolError::UnexpectedPeer {
                    expected: p,
                    found: e,
                }
                .into())
            }
            (e, p) => e.or(p),
        };
        let scopes = options.scopes.clone();
        let mine = marks_in_play(read, &scopes)?;
        let known = match expected {
            Some(p) => read.peer_watermarks(p)?,
            None => None,
        };
        let (ours, theirs) = (session.our_streams(), session.their_streams());
        let mut blocked = BTreeSet::new();
        // First contact: we do not know what the peer holds, so we ship nothing yet.
        let page = match &known {
            Some(known) => plan_page(read, &mine, known, limits, &theirs, has_blob, &mut blocked)?,
            None => Page::default(),
        };
        let known = known.map(|mut k| {
            k.retain(|s| scopes.contains(s));
            k
        });
        let marks = match session.held.take() {
            Some(h) if h.scopes == scopes && h.digest == mine.digest() => {
                RequestMarks::Digest(h.digest)
            }
            _ => RequestMarks::Full(mine.clone()),
        };
        // A request that carries versions or our marks in full names the node it is for,
        // which refuses it unless it is that node: nothing reaches a node that replaced the
        // expected one at its address. A quiet request (a digest, no versions) changes
        // nothing on a node that did not record our marks, and stays version 1.
        let to =
            expected.filter(|_| !page.runs.is_empty() || matches!(marks, RequestMarks::Full(_)));
        let request = ExchangeRequest {
            from: me,
            scopes: scopes.clone(),
            marks,
            known: known.as_ref().map(ScopedWatermarks::digest),
            page,
            limit: u32::try_from(limits.versions).unwrap_or(u32::MAX),
            deferred: ours.iter().cloned().collect(),
            ext: RequestExt {
                to,
                ..RequestExt::default()
            },
        };
        Ok(Initiation {
            me,
            scopes,
            expected,
            ours,
            theirs,
            blocked,
            mine,
            known,
            request,
            frames: 0,
            ended: false,
            streamed: Streams::new(),
            last: None,
            limits,
            pushed: None,
        })
    }

    /// Turns the request into one that opens a streamed push, if our page was cut (we have
    /// more to send) and `frames` > 0, and the request tells our floors (against which the
    /// frames are planned, as a pull's are against the responder's): returns the cursor of
    /// at most `frames` pages to send after the request, planned from the peer's marks as we
    /// know them raised to the request page's tops (docs/protocol.md, "Streamed pushes").
    /// The request then carries our marks in full and names the peer: the responder never
    /// asks for them again, so the frames are never sent for nothing.
    pub fn push(&mut self, frames: u32) -> Option<PullCursor> {
        let peer = self.expected?;
        let floors = self.request.ext.floors.clone()?;
        let known = self.known.clone()?;
        if !self.request.page.more || frames == 0 {
            return None;
        }
        self.request.marks = RequestMarks::Full(self.mine.clone());
        self.request.ext.to = Some(peer);
        Some(PullCursor {
            from: peer,
            scopes: self.scopes.clone(),
            held: held_after(known, &self.request.page),
            deferred: self.theirs.clone(),
            limits: self.limits,
            floors,
            seq: 0,
            left: frames,
            remaining_cap: 0,
        })
    }

    /// Records what the frames of a streamed push carried, once the responder answered it.
    pub fn pushed(&mut self, pushed: Pushed) {
        self.pushed = Some(pushed);
    }

    /// The request to send.
    pub fn request(&self) -> &ExchangeRequest {
        &self.request
    }

    /// Adds what the driver's purge work puts in the request beyond version 1: our floors
    /// (which also ask for the responder's) and the refusals we report.
    pub fn set_floors(&mut self, floors: Vec<(Scope, u64)>, refused: Vec<Refused>) {
        self.request.ext.floors = Some(floors);
        self.request.ext.refused = refused;
    }

    /// The scopes in play.
    pub fn scopes(&self) -> &ScopeFilter {
        &self.scopes
    }

    /// Reads the response: either a request to send instead (the peer asked for our marks in
    /// full, once), or the page to apply.
    ///
    /// # Errors
    /// The response breaks the protocol: it comes from ourselves or from another node than
    /// the one expected, or its marks do not answer the request. Nothing of it may be
    /// applied.
    pub fn receive(&mut self, response: ExchangeResponse) -> Result<Reply> {
        let peer = response.from;
        if peer == self.me {
            return Err(ProtocolError::PeerIsSelf { node: self.me }.into());
        }
        if let Some(expected) = self.expected.filter(|e| *e != peer) {
            if response.ext.previous == Some(expected) {
                return Err(ProtocolError::PeerRestored {
                    old: expected,
                    new: peer,
                }
                .into());
            }
            return Err(ProtocolError::UnexpectedPeer {
                expected,
                found: peer,
            }
            .into());
        }
        let theirs = match response.marks {
            ResponseMarks::Full(mut marks) => {
                marks.retain(|s| self.scopes.contains(s));
                marks
            }
            ResponseMarks::Same => self.known.clone().ok_or(ProtocolError::UnexpectedMarks {
                peer,
                reason: "same marks, but the request named none",
            })?,
            ResponseMarks::Resend => {
                if matches!(self.request.marks, RequestMarks::Full(_)) {
                    return Err(ProtocolError::UnexpectedMarks {
                        peer,
                        reason: "resend asked for marks sent in full",
                    }
                    .into());
                }
                self.request.marks = RequestMarks::Full(self.mine.clone());
                self.request.ext.to = self.expected;
                return Ok(Reply::Resend(self.request.clone()));
            }
        };
        // A reason that holds nothing is never sent as a halt (see `HaltReason::BelowFloor`):
        // one that comes anyway is not taken for a halted stream.
        let mut peer_halts = response.halts;
        peer_halts.retain(Halt::holds_stream);
        Ok(Reply::Apply(Received {
            peer,
            page: response.page,
            peer_halts,
            knowledge: PeerKnowledge {
                peer,
                scopes: self.scopes.clone(),
                marks: theirs,
            },
            ext: response.ext,
        }))
    }

    /// Reads the next frame of a streamed pull that followed the response read as
    /// `received`: the frame's page to apply as that response's was (with the same knowledge
    /// of the peer). Frames must come in order, 1, 2, ..., and none after the one that ends
    /// the transfer.
    ///
    /// # Errors
    /// [`ProtocolError::FrameOutOfOrder`]: nothing of the frame may be applied, and the
    /// transfer stops (the pages applied before it stay).
    pub fn frame(&mut self, received: &Received, frame: PageFrame) -> Result<Received> {
        let due = self.frames + 1;
        if self.ended || frame.seq != due {
            return Err(ProtocolError::FrameOutOfOrder {
                peer: received.peer,
                expected: if self.ended { 0 } else { due },
                found: frame.seq,
            }
            .into());
        }
        self.frames = due;
        self.ended = frame.end;
        for (scope, origin) in frame.page.streams() {
            self.streamed.insert((scope.clone(), origin));
        }
        self.last = Some((without_versions(&frame.page), frame.remaining));
        Ok(Received {
            peer: received.peer,
            page: frame.page,
            peer_halts: Vec::new(),
            knowledge: received.knowledge.clone(),
            ext: ResponseExt {
                remaining: frame.remaining,
                ..ResponseExt::default()
            },
        })
    }

    /// Whether a streamed pull's last frame was read.
    pub fn stream_ended(&self) -> bool {
        self.ended
    }

    /// Finishes the round once the received page was applied (`applied`), with our marks in
    /// play as they stand after it (`mine`): updates the session (halts in both directions,
    /// the marks the peer now holds of ours) and says whether another round would move more.
    pub fn finish(
        self,
        session: &mut Session,
        received: &Received,
        applied: AppliedPage,
        mine: &ScopedWatermarks,
    ) -> ExchangeOutcome {
        let peer = received.peer;
        let shipped = &self.request.page;
        // After a streamed pull, what is left to pull is what its last page left.
        let (last, remaining) = match &self.last {
            Some((page, remaining)) => (page, *remaining),
            None => (&received.page, received.ext.remaining),
        };
        session.peer = Some(peer);
        session.pulling = last.more;
        session.remember_halts(
            shipped,
            &received.page,
            &received.peer_halts,
            &applied.halts,
        );
        // A stream pushed in a frame and not halted by the peer applied there.
        let pushed = self.pushed.as_ref();
        for stream in pushed.iter().flat_map(|p| p.streams.iter()) {
            let halted =
                (received.peer_halts.iter()).any(|h| h.scope == stream.0 && h.origin == stream.1);
            if !halted {
                session.theirs.remove(stream);
            }
        }
        // After a streamed push, what is left to send is what its last page left.
        let shipped_last = pushed.and_then(|p| p.last.as_ref()).unwrap_or(shipped);
        // A stream sent again in a frame and not halted this time applied: it is no longer
        // halted here (`applied.halts` holds the halts of every page of the round).
        for stream in &self.streamed {
            let halted =
                (applied.halts.iter()).any(|h| h.scope == stream.0 && h.origin == stream.1);
            if !halted {
                session.ours.remove(stream);
            }
        }
        // After a halt our marks stay below what the peer recorded: no digest next time.
        if applied.halts.is_empty() {
            let held = held_after(self.mine.clone(), &received.page);
            session.held = Some(HeldMarks {
                scopes: self.scopes.clone(),
                digest: held.digest(),
            });
        }
        let theirs = &received.knowledge.marks;
        let halted = |scope: &Scope, origin: NodeId| {
            received
                .peer_halts
                .iter()
                .any(|h| h.scope == *scope && h.origin == origin)
        };
        let peer_lacks = mine.iter().any(|(scope, marks)| {
            marks.iter().any(|mark| {
                theirs.get(scope, mark.origin()) < Some(mark)
                    && !halted(scope, mark.origin())
                    && !self.blocked.contains(&(scope.clone(), mark.origin()))
            })
        });
        ExchangeOutcome {
            peer,
            shipped: shipped.version_count() + pushed.map_or(0, Pushed::versions),
            received: applied.received,
            applied: applied.applied,
            has_more: last.more_beyond(&applied.halts, &self.ours)
                || shipped_last.more_beyond(&received.peer_halts, &self.theirs)
                || peer_lacks,
            halts: applied.halts,
            peer_halts: received.peer_halts.clone(),
            blobs_pushed: 0,
            blobs_fetched: 0,
            refused: 0,
            dropped: 0,
            audit_wanted: false,
            remaining,
        }
    }

    /// The versions of our page that the peer took: those of every run it did not halt.
    pub fn delivered<'a>(
        &'a self,
        received: &'a Received,
    ) -> impl Iterator<Item = (&'a Scope, &'a crate::record::Key, crate::hlc::Hlc)> + 'a {
        self.request
            .page
            .runs
            .iter()
            .filter(move |r| {
                !received
                    .peer_halts
                    .iter()
                    .any(|h| h.scope == r.scope && h.origin == r.origin)
            })
            .flat_map(|r| r.versions.iter().map(move |(k, v)| (&r.scope, k, v.hlc)))
    }
}
