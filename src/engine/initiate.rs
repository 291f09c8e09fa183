//! The initiator's half of a round: plan the request, send it, apply the answer.

use std::collections::BTreeSet;

use crate::error::{ProtocolError, Result};
use crate::exchange::plan::{self, PageLimits};
use crate::exchange::{Halt, Page, Streams};
use crate::hlc::NodeId;
use crate::notify::ChangeKind;
use crate::record::{BlobRef, Scope};
use crate::store::PeerKnowledge;
use crate::transport::Transport;
use crate::watermark::{MarksDigest, ScopedWatermarks};
use crate::wire::{ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks, ScopeFilter};

use super::{lock, SyncEngine};

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
    /// Origins whose streams this node halted (clock skew, own id, blob unavailable).
    pub halts: Vec<Halt>,
    /// Origins whose streams the peer halted.
    pub peer_halts: Vec<Halt>,
    /// Blobs uploaded to the peer.
    pub blobs_pushed: usize,
    /// Blobs fetched from the peer.
    pub blobs_fetched: usize,
}

/// The (scope, origin) streams halted in the last round with one peer.
#[derive(Default, Clone)]
pub(super) struct StreamHalts {
    /// Streams we halted when the peer sent them.
    pub(super) ours: Streams,
    /// Streams the peer halted when we sent them.
    pub(super) theirs: Streams,
}

/// Our marks in play as a peer recorded them at the end of the last round between us, as a
/// digest: while our marks still hash to it, our requests to that peer carry the digest
/// alone. A belief only: the peer checks the digest against what it did record.
pub(super) struct HeldMarks {
    /// The scopes in play in that round.
    pub(super) scopes: ScopeFilter,
    /// The digest of our marks as the peer recorded them.
    pub(super) digest: MarksDigest,
}

/// What the initiator keeps from planning its request, to finish the round.
pub(super) struct Round {
    /// The halts remembered for the peer when the request was planned.
    pub(super) halts: StreamHalts,
    /// Streams our planning blocked on a blob we lack.
    pub(super) blocked: Streams,
    /// Our marks in play, which the request carries in full or as their digest.
    pub(super) mine: ScopedWatermarks,
    /// Our knowledge of the peer's marks in play, whose digest the request carries.
    pub(super) known: Option<ScopedWatermarks>,
}

/// The initiator's marks as the responder records them at the end of a round: the marks the
/// request stood for, raised to the `top` of every run of the response page. Both sides
/// compute it from the same messages, so the initiator knows what the responder recorded.
pub(super) fn held_after(mut marks: ScopedWatermarks, page: &Page) -> ScopedWatermarks {
    for run in &page.runs {
        marks.observe(&run.scope, run.top);
    }
    marks
}

pub(super) fn streams(halts: &[Halt]) -> Streams {
    halts.iter().map(|h| (h.scope.clone(), h.origin)).collect()
}

impl SyncEngine {
    /// Runs one exchange round as initiator over `transport`, for all scopes.
    ///
    /// # Errors
    /// The transport failed, the peer's answer broke the protocol (nothing of it is
    /// applied), or the store failed.
    pub async fn exchange<T: Transport + ?Sized>(&self, transport: &T) -> Result<ExchangeOutcome> {
        self.exchange_with(transport, &ExchangeOptions::default())
            .await
    }

    /// Runs one exchange round as initiator over `transport`.
    ///
    /// # Errors
    /// As for [`SyncEngine::exchange`].
    pub async fn exchange_with<T: Transport + ?Sized>(
        &self,
        transport: &T,
        options: &ExchangeOptions,
    ) -> Result<ExchangeOutcome> {
        let expected = transport.peer_id();
        if expected == Some(self.id) {
            return Err(ProtocolError::PeerIsSelf { node: self.id }.into());
        }
        let (request, round) = self.prepare_request(expected, options)?;
        let blobs_pushed = self.push_blobs(transport, &request.page).await?;
        let response = self.send_request(transport, &request, &round).await?;
        let needed = self.needed_blobs(&response.page)?;
        // Pins keep fetched blobs alive until the page that references them is committed.
        let fetched = self.fetch_blobs(transport, needed).await;
        let mut outcome = self.finish_round(expected, options, &request.page, &round, response)?;
        outcome.blobs_pushed = blobs_pushed;
        outcome.blobs_fetched = fetched.len();
        self.note_exchange(outcome.peer);
        Ok(outcome)
    }

    pub(super) fn page_limits(&self, versions: usize) -> PageLimits {
        PageLimits {
            versions,
            bytes: self.config.page_bytes,
        }
    }

    pub(super) fn marks_in_play(
        &self,
        read: &dyn crate::store::StoreRead,
        scopes: &ScopeFilter,
    ) -> Result<ScopedWatermarks> {
        let mut mine = read.watermarks()?;
        mine.retain(|s| scopes.contains(s));
        Ok(mine)
    }

    /// Sends `request`; if the peer cannot resolve its marks digest, sends it once more
    /// with the marks in full.
    pub(super) async fn send_request<T: Transport + ?Sized>(
        &self,
        transport: &T,
        request: &ExchangeRequest,
        round: &Round,
    ) -> Result<ExchangeResponse> {
        let response = transport.exchange(request.clone()).await?;
        if !matches!(response.marks, ResponseMarks::Resend) {
            return Ok(response);
        }
        let resend_refused = |peer| ProtocolError::UnexpectedMarks {
            peer,
            reason: "resend asked for marks sent in full",
        };
        if matches!(request.marks, RequestMarks::Full(_)) {
            return Err(resend_refused(response.from).into());
        }
        let mut full = request.clone();
        full.marks = RequestMarks::Full(round.mine.clone());
        let response = transport.exchange(full).await?;
        if matches!(response.marks, ResponseMarks::Resend) {
            return Err(resend_refused(response.from).into());
        }
        Ok(response)
    }

    /// The request of a round, and what finishing the round needs of its planning.
    pub(super) fn prepare_request(
        &self,
        peer: Option<NodeId>,
        options: &ExchangeOptions,
    ) -> Result<(ExchangeRequest, Round)> {
        let read = self.store.read()?;
        let mine = self.marks_in_play(&*read, &options.scopes)?;
        let limit = options.page_limit.unwrap_or(self.config.page_limit).max(1);
        let known = match peer {
            Some(p) => read.peer_watermarks(p)?,
            None => None,
        };
        let halts = peer
            .and_then(|p| lock(&self.halts).get(&p).cloned())
            .unwrap_or_default();
        let mut blocked = BTreeSet::new();
        // First contact: we do not know what the peer holds, so we ship nothing yet.
        let page = match &known {
            Some(theirs) => plan::plan_page(
                &*read,
                &mine,
                theirs,
                self.page_limits(limit),
                &halts.theirs,
                &|b: &BlobRef| self.has_blob(b),
                &mut blocked,
            )?,
            None => Page::default(),
        };
        drop(read);
        let known = known.map(|mut k| {
            k.retain(|s| options.scopes.contains(s));
            k
        });
        let request = ExchangeRequest {
            from: self.id,
            scopes: options.scopes.clone(),
            marks: self.request_marks(peer, &options.scopes, &mine),
            known: known.as_ref().map(ScopedWatermarks::digest),
            page,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            deferred: halts.ours.iter().cloned().collect(),
        };
        let round = Round {
            halts,
            blocked,
            mine,
            known,
        };
        Ok((request, round))
    }

    /// Our marks for a request to `peer`: their digest if the peer recorded exactly these in
    /// our last round with it over the same scopes, else in full.
    pub(super) fn request_marks(
        &self,
        peer: Option<NodeId>,
        scopes: &ScopeFilter,
        mine: &ScopedWatermarks,
    ) -> RequestMarks {
        // IMPORTANT: taken, not read. It is put back only when this round completes, so a
        // round that fails or is dropped half-way leaves the next request in full.
        let held = peer.and_then(|p| lock(&self.held).remove(&p));
        match held {
            Some(h) if h.scopes == *scopes && h.digest == mine.digest() => {
                RequestMarks::Digest(h.digest)
            }
            _ => RequestMarks::Full(mine.clone()),
        }
    }

    pub(super) fn finish_round(
        &self,
        expected: Option<NodeId>,
        options: &ExchangeOptions,
        shipped: &Page,
        round: &Round,
        response: ExchangeResponse,
    ) -> Result<ExchangeOutcome> {
        let peer = response.from;
        if peer == self.id {
            return Err(ProtocolError::PeerIsSelf { node: self.id }.into());
        }
        if let Some(expected) = expected.filter(|e| *e != peer) {
            return Err(ProtocolError::UnexpectedPeer {
                expected,
                found: peer,
            }
            .into());
        }
        let theirs = match response.marks {
            ResponseMarks::Full(mut marks) => {
                marks.retain(|s| options.scopes.contains(s));
                marks
            }
            ResponseMarks::Same => round.known.clone().ok_or(ProtocolError::UnexpectedMarks {
                peer,
                reason: "same marks, but the request named none",
            })?,
            ResponseMarks::Resend => {
                return Err(ProtocolError::UnexpectedMarks {
                    peer,
                    reason: "resend asked for marks sent in full",
                }
                .into())
            }
        };
        let knowledge = PeerKnowledge {
            peer,
            scopes: options.scopes.clone(),
            marks: theirs.clone(),
        };
        let applied = self.apply_page(&response.page, &options.scopes, knowledge)?;
        self.remember_halts(
            peer,
            shipped,
            &response.page,
            &response.halts,
            &applied.halts,
        );
        // After a halt our marks stay below what the peer recorded: no digest next time.
        if applied.halts.is_empty() {
            let held = held_after(round.mine.clone(), &response.page);
            lock(&self.held).insert(
                peer,
                HeldMarks {
                    scopes: options.scopes.clone(),
                    digest: held.digest(),
                },
            );
        }
        let mine = self.marks_in_play(&*self.store.read()?, &options.scopes)?;
        let halted = |scope: &Scope, origin: NodeId| {
            response
                .halts
                .iter()
                .any(|h| h.scope == *scope && h.origin == origin)
        };
        self.announce(
            ChangeKind::LocalDataSynced,
            Some(peer),
            shipped
                .runs
                .iter()
                .filter(|r| !halted(&r.scope, r.origin))
                .flat_map(|r| r.versions.iter().map(move |(k, _)| (&r.scope, k))),
        );
        let peer_lacks = mine.iter().any(|(scope, marks)| {
            marks.iter().any(|mark| {
                theirs.get(scope, mark.origin()) < Some(mark)
                    && !halted(scope, mark.origin())
                    && !round.blocked.contains(&(scope.clone(), mark.origin()))
            })
        });
        Ok(ExchangeOutcome {
            peer,
            shipped: shipped.version_count(),
            received: applied.received,
            applied: applied.applied,
            has_more: response.page.more_beyond(&applied.halts, &round.halts.ours)
                || shipped.more_beyond(&response.halts, &round.halts.theirs)
                || peer_lacks,
            halts: applied.halts,
            peer_halts: response.halts,
            blobs_pushed: 0,
            blobs_fetched: 0,
        })
    }

    /// A stream stays halted, in either direction, until it is sent again and applies.
    pub(super) fn remember_halts(
        &self,
        peer: NodeId,
        shipped: &Page,
        received: &Page,
        theirs: &[Halt],
        ours: &[Halt],
    ) {
        let mut all = lock(&self.halts);
        let known = all.entry(peer).or_default();
        let update = |set: &mut Streams, sent: &Page, halted: &[Halt]| {
            for (scope, origin) in sent.streams() {
                set.remove(&(scope.clone(), origin));
            }
            set.extend(streams(halted));
        };
        update(&mut known.ours, received, ours);
        update(&mut known.theirs, shipped, theirs);
    }
}
