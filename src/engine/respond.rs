//! The responder's half of a round, and the [`Responder`] the transports wrap.

use std::collections::HashMap;
use std::io::Read;
use std::time::SystemTime;

use crate::blob::write_blob_unsynced;
use crate::error::{Error, Result};
use crate::exchange::{marks_in_play, Answer, Answering, PullCursor, PushStart, PushTransfer};
use crate::hash::Hash;
use crate::hlc::NodeId;
use crate::notify::Notifier;
use crate::record::{BlobRef, Scope};
use crate::transport::{Refusal, Responder};
use crate::wire::{
    AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse, PageFrame, RequestMarks,
};

use super::purge::{crosses, floor_in};
use super::receive::Sender;
use super::{lock, SyncEngine};

impl Responder for SyncEngine {
    fn node_id(&self) -> NodeId {
        self.node_id()
    }

    fn respond(&self, request: ExchangeRequest) -> std::result::Result<ExchangeResponse, Refusal> {
        self.answer(request).map_err(|e: Error| Refusal::from(&e))
    }

    fn respond_pull(
        &self,
        request: ExchangeRequest,
    ) -> std::result::Result<(ExchangeResponse, Option<PullCursor>), Refusal> {
        self.answer_pull(request, self.inner.config.pull_frames)
            .map_err(|e: Error| Refusal::from(&e))
    }

    fn next_frame(&self, cursor: &mut PullCursor) -> std::result::Result<PageFrame, Refusal> {
        let mut frame = || -> Result<PageFrame> {
            let read = self.inner.store.read()?;
            cursor.next_frame(&*read, &|b: &BlobRef| self.has_blob(b))
        };
        frame().map_err(|e| Refusal::from(&e))
    }

    fn takes_pushes(&self) -> bool {
        self.inner.config.push_frames > 0
    }

    fn open_push(&self, request: ExchangeRequest) -> std::result::Result<PushStart, Refusal> {
        self.open_push(request)
            .map_err(|e: Error| Refusal::from(&e))
    }

    fn push_frame(
        &self,
        transfer: &mut PushTransfer,
        frame: PageFrame,
    ) -> std::result::Result<(), Refusal> {
        self.take_frame(transfer, frame)
            .map_err(|e: Error| Refusal::from(&e))
    }

    fn close_push(&self, transfer: PushTransfer) -> std::result::Result<ExchangeResponse, Refusal> {
        self.answer_push(transfer)
            .map_err(|e: Error| Refusal::from(&e))
    }

    fn blobs_present(&self, hashes: &[Hash]) -> std::result::Result<Vec<bool>, Refusal> {
        hashes
            .iter()
            .map(|h| self.inner.blobs.contains(h).map_err(Refusal::from))
            .collect()
    }

    fn open_blob(
        &self,
        hash: &Hash,
    ) -> std::result::Result<Option<crate::blob::BlobReader>, Refusal> {
        self.inner.blobs.open(hash).map_err(Refusal::from)
    }

    fn accept_blob(
        &self,
        blob: &BlobRef,
        content: &mut dyn Read,
    ) -> std::result::Result<(), Refusal> {
        let had = self.inner.blobs.contains(&blob.hash).unwrap_or(true);
        // IMPORTANT: the name is left for the next `sync_names`, which the commit of any page
        // that references the blob makes first (the uploader's request or frame that
        // follows): many uploads share one sync of each directory instead of one each.
        write_blob_unsynced(&*self.inner.blobs, content, Some(blob)).map_err(Refusal::from)?;
        lock(&self.inner.guards).uploaded(blob.hash);
        if !had && self.inner.notifier.has_subscribers() {
            self.announce_upload(blob.hash);
        }
        Ok(())
    }

    fn scopes(&self) -> std::result::Result<Vec<Scope>, Refusal> {
        SyncEngine::scopes(self).map_err(|e| Refusal::from(&e))
    }

    fn blob_scopes(&self, hash: &Hash) -> std::result::Result<Vec<Scope>, Refusal> {
        let scopes = || -> Result<Vec<Scope>> { Ok(self.inner.store.read()?.blob_scopes(hash)?) };
        scopes().map_err(|e| Refusal::from(&e))
    }

    fn audit(&self, request: AuditRequest) -> std::result::Result<AuditResponse, Refusal> {
        self.answer_audit(request)
            .map_err(|e: Error| Refusal::from(&e))
    }

    fn notifier(&self) -> Option<&Notifier> {
        Some(&self.inner.notifier)
    }

    fn records(&self) -> Option<std::sync::Arc<dyn crate::api::NodeApi>> {
        Some(std::sync::Arc::new(self.handle()))
    }
}

impl SyncEngine {
    /// Publishes `content_ready` for a blob a peer uploaded if records stored here pointed
    /// at it (they were Staged, and are Resident now), once its name is durable: an
    /// application told so may rely on the file surviving a crash.
    fn announce_upload(&self, hash: Hash) {
        let scopes = match self.inner.store.read().and_then(|r| r.blob_scopes(&hash)) {
            Ok(scopes) if scopes.is_empty() => return,
            Ok(scopes) => scopes,
            Err(e) => {
                tracing::debug!(%hash, error = %e, "cannot tell which records an uploaded file serves");
                return;
            }
        };
        if let Err(e) = self.sync_blob_names() {
            // Not told: the commit of the page that references the blob syncs its name
            // first, or fails.
            tracing::warn!(%hash, error = %e, "cannot make the name of an uploaded file durable");
            return;
        }
        let ready = crate::notify::SyncEvent::ContentReady { hash, scopes };
        self.inner
            .notifier
            .publish(crate::notify::Event::Sync(ready));
    }

    /// Answers one exchange request (the responder's half of a round). A request whose marks
    /// digest does not match what this node recorded of the initiator is answered with
    /// [`ExchangeResponse::resend`] and changes nothing.
    ///
    /// # Errors
    /// The request breaks the protocol (nothing of it is applied), or the store failed.
    pub fn answer(&self, request: ExchangeRequest) -> Result<ExchangeResponse> {
        Ok(self.answer_pull(request, 0)?.0)
    }

    /// Answers a request that opens a streamed pull: as [`SyncEngine::answer`], and, when
    /// the answer's page was cut and the request asked for our floors (the transfer's frames
    /// are planned against the floors the response tells), the cursor of at most `frames`
    /// pages to send after it ([`PullCursor::next_frame`]).
    ///
    /// # Errors
    /// As for [`SyncEngine::answer`].
    pub fn answer_pull(
        &self,
        request: ExchangeRequest,
        frames: u32,
    ) -> Result<(ExchangeResponse, Option<PullCursor>)> {
        match self.open_answer(request)? {
            PushStart::Answered(response) => Ok((response, None)),
            PushStart::Receiving(transfer) => self.close_answer(transfer, frames),
        }
    }

    /// Takes the request that opens a streamed push (docs/protocol.md, "Streamed pushes"):
    /// as [`SyncEngine::answer`] takes a request, its page applied with what we record of
    /// the initiator; the answer waits for the frames ([`SyncEngine::take_frame`]) and is
    /// sent after the last ([`SyncEngine::answer_push`]). A request meant for another node,
    /// or whose marks must be resent, is answered at once ([`PushStart::Answered`]).
    ///
    /// # Errors
    /// As for [`SyncEngine::answer`].
    pub fn open_push(&self, request: ExchangeRequest) -> Result<PushStart> {
        self.open_answer(request)
    }

    /// Applies the next frame of a streamed push in its own transaction, as the request's
    /// page was applied (the watermark rule, halts, refusals below our floor, the initiator's
    /// floor crossed), with the same knowledge of the initiator.
    ///
    /// # Errors
    /// The frame is out of order ([`crate::error::ProtocolError::FrameOutOfOrder`]: nothing
    /// of it is applied, nor of any frame after it), its page breaks the protocol, or the
    /// store failed. The pages applied before stay.
    pub fn take_frame(&self, transfer: &mut PushTransfer, frame: PageFrame) -> Result<()> {
        let (seq, remaining) = (frame.seq, frame.remaining);
        let page = transfer.frame(frame)?;
        let from = transfer.from();
        let crossing = (transfer.floors.as_ref())
            .is_some_and(|floors| crosses(&page, |s| floor_in(floors, s)));
        let applied = self.apply_page(
            &from.to_string(),
            Sender::Initiator,
            &page,
            transfer.answer.scopes(),
            transfer.answer.knowledge(),
            transfer.seen.as_ref(),
        )?;
        self.announce_halts(&from.to_string(), &applied.halts);
        if crossing {
            self.adopt_floors(from, transfer.answer.scopes())?;
        }
        self.announce_page(&from.to_string(), seq, &applied, remaining);
        transfer.halted(applied.halts);
        transfer.refused.extend(applied.refused);
        transfer.changed_marks |= applied.changed_marks;
        Ok(())
    }

    /// The answer to a streamed push once its last frame was applied: the response planned
    /// when it opened, with our marks as they stand now (the pushed pages included), the
    /// halts and refusals of every page.
    ///
    /// # Errors
    /// The transfer did not end (its last frame was not taken), or the store failed.
    pub fn answer_push(&self, transfer: PushTransfer) -> Result<ExchangeResponse> {
        if !transfer.ended() {
            return Err(crate::error::ProtocolError::PushUnfinished {
                peer: transfer.from(),
            }
            .into());
        }
        Ok(self.close_answer(transfer, 0)?.0)
    }

    /// The first half of answering a request: everything up to the response, its page
    /// applied and its knowledge recorded in one transaction.
    fn open_answer(&self, mut request: ExchangeRequest) -> Result<PushStart> {
        // Only a version 2 request can hear how many versions remain, and only then do we
        // pay for counting them.
        let remaining_cap = match request.ext.is_empty() {
            true => 0,
            false => self.inner.config.remaining_cap,
        };
        let to = request.ext.to;
        let asked_floors = request.ext.floors.take();
        let refused = std::mem::take(&mut request.ext.refused);
        // Nothing of a request meant for another node is acted on (see `Answer::plan`).
        if to.is_none_or(|to| to == self.node_id()) {
            let label = request.from.to_string();
            // Our versions the initiator refused below its floor (reported with this
            // request) go before we plan, so the answer does not send them back.
            self.drop_refused(&label, &request.scopes, &refused)?;
            if let Some(floors) = &asked_floors {
                self.heard_floors(request.from, floors);
            }
        }
        let limits = self.page_limits(self.inner.config.max_page_limit);
        // What the initiator had seen of our writes when it wrote its page (for
        // `overwritten`): its marks when it sent them in full; a digest stands for the marks
        // we recorded of it, which the apply reads itself.
        let seen = match &request.marks {
            RequestMarks::Full(marks) if self.inner.notifier.has_subscribers() => {
                Some(marks.clone())
            }
            _ => None,
        };
        // An initiator that speaks version 2 (it told us its floors before) but did not ask
        // for ours this time gets no run that crosses our floor in this answer: its next
        // request asks, and hears the floor with the run (the re-clone's trigger).
        let withhold = asked_floors.is_none()
            && lock(&self.inner.peers)
                .floors_heard
                .contains_key(&request.from);
        let planned = Answer::plan_withholding(
            self.node_id(),
            &*self.inner.store.read()?,
            request,
            limits,
            remaining_cap,
            &|b: &BlobRef| self.has_blob(b),
            withhold,
        )?;
        let answer = match planned {
            Answering::Resend(mut response) => {
                // Addressed to the id we had before a fresh one: vouch that we were it.
                if to.is_some() && to != Some(response.from) && to == self.previous_id() {
                    response.ext.previous = to;
                }
                return Ok(PushStart::Answered(response));
            }
            Answering::Apply(answer) => answer,
        };
        let from = answer.from();
        // A run that starts below the initiator's floor claims past tombstones it purged:
        // once our marks cover them, its floor answers for them here too.
        let crossing = (asked_floors.as_ref())
            .is_some_and(|floors| crosses(answer.incoming(), |s| floor_in(floors, s)));
        let applied = self.apply_page(
            &from.to_string(),
            Sender::Initiator,
            answer.incoming(),
            answer.scopes(),
            answer.knowledge(),
            seen.as_ref(),
        )?;
        self.announce_halts(&from.to_string(), &applied.halts);
        self.note_exchange(from);
        if crossing {
            self.adopt_floors(from, answer.scopes())?;
        }
        let mut transfer = PushTransfer::new(answer, asked_floors, seen);
        transfer.halted(applied.halts);
        transfer.refused = applied.refused;
        transfer.changed_marks = applied.changed_marks;
        Ok(PushStart::Receiving(transfer))
    }

    /// The second half of answering a request (or a streamed push, once its frames are
    /// applied): the response, and the cursor of at most `frames` pages to stream after it.
    fn close_answer(
        &self,
        transfer: PushTransfer,
        frames: u32,
    ) -> Result<(ExchangeResponse, Option<PullCursor>)> {
        let scopes = transfer.answer.scopes().clone();
        let marks = match transfer.changed_marks {
            true => Some(marks_in_play(&*self.inner.store.read()?, &scopes)?),
            false => None,
        };
        let floors = match transfer.floors {
            Some(_) => Some(self.floors_in_play(&scopes)?),
            None => None,
        };
        let from = transfer.answer.from();
        let cursor = (floors.clone()).and_then(|floors| transfer.answer.pull(floors, frames));
        let (mut response, held) = transfer.answer.respond(transfer.halts, marks);
        response.ext.floors = floors.unwrap_or_default();
        response.ext.refused = transfer.refused;
        // The initiator records these marks of ours as its knowledge of us, so a round we
        // initiate next may send their digest alone (if the initiator does not record them,
        // that round costs one resend).
        lock(&self.inner.peers).answered.insert(from, held);
        Ok((response, cursor))
    }

    /// When each peer last completed a round with this node, in either role, since this
    /// engine was opened (memory only).
    pub fn last_exchanges(&self) -> HashMap<NodeId, SystemTime> {
        lock(&self.inner.peers).last_exchange.clone()
    }

    pub(super) fn note_exchange(&self, peer: NodeId) {
        lock(&self.inner.peers)
            .last_exchange
            .insert(peer, SystemTime::now());
    }
}
