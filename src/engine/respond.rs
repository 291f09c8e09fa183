//! The responder's half of a round, and the [`Responder`] the transports wrap.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::time::{Instant, SystemTime};

use crate::blob::write_blob;
use crate::error::{Error, ProtocolError, Result};
use crate::exchange::plan;
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::notify::Notifier;
use crate::record::BlobRef;
use crate::store::PeerKnowledge;
use crate::transport::{Refusal, Responder};
use crate::watermark::ScopedWatermarks;
use crate::wire::{ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks, ScopeFilter};

use super::initiate::{held_after, HeldMarks};
use super::{lock, SyncEngine, UPLOAD_GRACE};

/// The initiator's marks in play: those the request carries in full, or, for a digest, what
/// we recorded of the initiator if that hashes to the digest (`None` if it does not: the
/// initiator must resend them in full).
pub(super) fn initiator_marks(
    read: &dyn crate::store::StoreRead,
    from: NodeId,
    scopes: &ScopeFilter,
    marks: RequestMarks,
) -> Result<Option<ScopedWatermarks>> {
    let (mut marks, digest) = match marks {
        RequestMarks::Full(marks) => (marks, None),
        RequestMarks::Digest(d) => (read.peer_watermarks(from)?.unwrap_or_default(), Some(d)),
    };
    marks.retain(|s| scopes.contains(s));
    Ok(match digest {
        Some(d) if marks.digest() != d => None,
        _ => Some(marks),
    })
}

impl Responder for SyncEngine {
    fn node_id(&self) -> NodeId {
        self.id
    }

    fn respond(&self, request: ExchangeRequest) -> std::result::Result<ExchangeResponse, Refusal> {
        self.answer(request).map_err(|e: Error| Refusal::from(&e))
    }

    fn blobs_present(&self, hashes: &[Hash]) -> std::result::Result<Vec<bool>, Refusal> {
        hashes
            .iter()
            .map(|h| self.blobs.contains(h).map_err(Refusal::from))
            .collect()
    }

    fn open_blob(
        &self,
        hash: &Hash,
    ) -> std::result::Result<Option<crate::blob::BlobReader>, Refusal> {
        self.blobs.open(hash).map_err(Refusal::from)
    }

    fn accept_blob(
        &self,
        blob: &BlobRef,
        content: &mut dyn Read,
    ) -> std::result::Result<(), Refusal> {
        write_blob(&*self.blobs, content, Some(blob)).map_err(Refusal::from)?;
        let mut uploads = lock(&self.uploads);
        uploads.retain(|_, arrived| arrived.elapsed() < UPLOAD_GRACE);
        uploads.insert(blob.hash, Instant::now());
        Ok(())
    }

    fn notifier(&self) -> Option<&Notifier> {
        Some(&self.notifier)
    }
}

impl SyncEngine {
    /// Answers one exchange request (the responder's half of a round). A request whose marks
    /// digest does not match what this node recorded of the initiator is answered with
    /// [`ExchangeResponse::resend`] and changes nothing.
    ///
    /// # Errors
    /// The request breaks the protocol (nothing of it is applied), or the store failed.
    pub fn answer(&self, request: ExchangeRequest) -> Result<ExchangeResponse> {
        let ExchangeRequest {
            from,
            scopes,
            marks,
            known,
            page: incoming,
            limit,
            deferred,
        } = request;
        if from == self.id {
            return Err(ProtocolError::PeerIsSelf { node: self.id }.into());
        }
        // Plan from the state before the request's page is applied: the page's claims hold
        // for that state, and the versions the request brings are ones the initiator has.
        let read = self.store.read()?;
        // IMPORTANT: we plan from the initiator's true marks, never from a guess: a digest
        // stands for the marks we recorded of it only if those hash to it.
        let Some(theirs) = initiator_marks(&*read, from, &scopes, marks)? else {
            return Ok(ExchangeResponse::resend(self.id));
        };
        let mut watermarks = self.marks_in_play(&*read, &scopes)?;
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .clamp(1, self.config.max_page_limit);
        let deferred = deferred.into_iter().collect();
        let page = plan::plan_page(
            &*read,
            &watermarks,
            &theirs,
            self.page_limits(limit),
            &deferred,
            &|b: &BlobRef| self.has_blob(b),
            &mut BTreeSet::new(),
        )?;
        drop(read);
        // What the initiator will hold once it applies our page; if it does not (a halt, a
        // lost response), this knowledge is stale-high, which costs one round, never a gap.
        let knowledge = PeerKnowledge {
            peer: from,
            scopes: scopes.clone(),
            marks: held_after(theirs, &page),
        };
        let applied = self.apply_page(&incoming, &scopes, knowledge)?;
        if applied.changed_marks {
            watermarks = self.marks_in_play(&*self.store.read()?, &scopes)?;
        }
        self.note_exchange(from);
        let digest = watermarks.digest();
        // The initiator records these marks of ours as its knowledge of us, so a round we
        // initiate next may send their digest alone (if the initiator does not record them,
        // that round costs one resend).
        lock(&self.held).insert(
            from,
            HeldMarks {
                scopes: scopes.clone(),
                digest,
            },
        );
        let marks = if known == Some(digest) {
            ResponseMarks::Same
        } else {
            ResponseMarks::Full(watermarks)
        };
        Ok(ExchangeResponse {
            from: self.id,
            marks,
            page,
            halts: applied.halts,
        })
    }

    /// When each peer last completed a round with this node, in either role, since this
    /// engine was opened (memory only).
    pub fn last_exchanges(&self) -> HashMap<NodeId, SystemTime> {
        lock(&self.last_exchange).clone()
    }

    pub(super) fn note_exchange(&self, peer: NodeId) {
        lock(&self.last_exchange).insert(peer, SystemTime::now());
    }
}
