//! A streamed push: the pages an initiator sends after its request, back to back, in one
//! transfer (docs/protocol.md, "Streamed pushes").
//!
//! The initiator plans its frames with a [`PullCursor`] of its own (from
//! [`super::Initiation::push`]): the same planning as a pull's, against the responder's marks
//! raised to the tops of every page sent before. The responder's side is a [`PushTransfer`]:
//! the answer it planned when the request came (its page for the initiator, what it recorded
//! of it) and what the frames' pages did, until the last frame, when it answers.

use super::{Answer, ExchangeResponse, Halt, Page, PageFrame};
use crate::error::{ProtocolError, Result};
use crate::hlc::NodeId;
use crate::record::{Key, Scope, ScopeFilter};
use crate::watermark::ScopedWatermarks;

/// A version refused below a purge floor: its scope, key and Hlc.
type Refused = (Scope, Key, crate::hlc::Hlc);

/// How a responder takes the request that opens a streamed push.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per transfer, moved once
pub enum PushStart {
    /// Answer this at once and take nothing of the frames: the request is addressed to
    /// another node, or its marks must be resent.
    Answered(ExchangeResponse),
    /// The request's page is applied: take the frames into this, then answer.
    Receiving(PushTransfer),
}

/// A streamed push being received, between its frames: the answer planned from the request
/// (sent once the last frame is applied) and what the pages applied so far did.
#[derive(Debug)]
pub struct PushTransfer {
    pub(crate) answer: Answer,
    /// The last frame's number (0 before the first).
    seq: u32,
    ended: bool,
    /// A frame was refused: nothing more is taken, and the transfer is never answered.
    broken: bool,
    /// The streams halted here, in the request's page and every frame's.
    pub(crate) halts: Vec<Halt>,
    /// Versions refused below our floor, in every page.
    pub(crate) refused: Vec<Refused>,
    /// Whether any page may have moved our marks.
    pub(crate) changed_marks: bool,
    /// The initiator's floors, if the request told them (and asked for ours).
    pub(crate) floors: Option<Vec<(Scope, u64)>>,
    /// The initiator's marks as its request carried them in full, for the `overwritten` of
    /// change events.
    pub(crate) seen: Option<ScopedWatermarks>,
}

impl PushTransfer {
    /// A transfer whose request `answer` answers; `floors` are the initiator's, if it told
    /// them, and `seen` its marks, if it sent them in full.
    pub(crate) fn new(
        answer: Answer,
        floors: Option<Vec<(Scope, u64)>>,
        seen: Option<ScopedWatermarks>,
    ) -> PushTransfer {
        PushTransfer {
            answer,
            seq: 0,
            ended: false,
            broken: false,
            halts: Vec::new(),
            refused: Vec::new(),
            changed_marks: false,
            floors,
            seen,
        }
    }

    /// The initiator.
    pub fn from(&self) -> NodeId {
        self.answer.from()
    }

    /// The scopes in play.
    pub fn scopes(&self) -> &ScopeFilter {
        self.answer.scopes()
    }

    /// Whether the last frame (`end`) was taken: the transfer may be answered.
    pub fn ended(&self) -> bool {
        self.ended && !self.broken
    }

    /// Takes the next frame: its page, to apply as the request's was. Frames must come in
    /// order, 1, 2, ..., and none after the one that ends the transfer.
    ///
    /// # Errors
    /// [`ProtocolError::FrameOutOfOrder`]: nothing of the frame may be applied, and the
    /// transfer stops (the pages applied before it stay).
    pub fn frame(&mut self, frame: PageFrame) -> Result<Page> {
        let due = self.seq + 1;
        if self.ended || self.broken || frame.seq != due {
            let expected = if self.ended || self.broken { 0 } else { due };
            // Nothing after a refused frame is taken either.
            self.broken = true;
            return Err(ProtocolError::FrameOutOfOrder {
                peer: self.from(),
                expected,
                found: frame.seq,
            }
            .into());
        }
        self.seq = due;
        self.ended = frame.end;
        Ok(frame.page)
    }

    /// Adds the halts of a page applied, one per stream.
    pub(crate) fn halted(&mut self, halts: Vec<Halt>) {
        for h in halts {
            if !(self.halts.iter()).any(|k| k.scope == h.scope && k.origin == h.origin) {
                self.halts.push(h);
            }
        }
    }
}
