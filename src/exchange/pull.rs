//! A streamed pull: the pages a responder sends after its response, back to back, in one
//! transfer (docs/protocol.md, "Streamed pulls"). An initiator plans the frames of a streamed
//! push with the same cursor ([`super::Initiation::push`]).
//!
//! The responder's side is a [`PullCursor`]: what it needs to plan the next page without the
//! request (the initiator's marks raised to the tops of every page sent so far, the scopes,
//! the limits, the deferred streams). Each page is planned from a fresh snapshot, so no read
//! transaction stays open while a page waits for the network, and each holds the claims of a
//! committed state, as a round's page does. The initiator's side is in
//! [`super::Initiation::frame`].

use std::collections::BTreeSet;

use crate::error::Result;
use crate::hlc::NodeId;
use crate::record::{BlobRef, Scope, ScopeFilter};
use crate::store::StoreRead;
use crate::watermark::ScopedWatermarks;

use super::plan::{plan_page, PageLimits};
use super::{held_after, marks_in_play, Page, PageFrame, Streams};

/// Where the sender of a streamed transfer is (a responder in a pull, an initiator in a
/// push): enough to plan the next page.
#[derive(Clone, Debug)]
pub struct PullCursor {
    /// The node the pages go to.
    pub(super) from: NodeId,
    pub(super) scopes: ScopeFilter,
    /// The receiver's marks once it applies every page sent so far.
    pub(super) held: ScopedWatermarks,
    pub(super) deferred: Streams,
    pub(super) limits: PageLimits,
    /// Our purge floors in play when the transfer opened (the response, or the push's
    /// request, carried them).
    pub(super) floors: Vec<(Scope, u64)>,
    /// The last frame's number (0 before the first).
    pub(super) seq: u32,
    /// Frames still allowed in this transfer.
    pub(super) left: u32,
    pub(super) remaining_cap: u64,
}

impl PullCursor {
    /// The node the pages go to (the initiator of a pull, the responder of a push).
    pub fn from(&self) -> NodeId {
        self.from
    }

    /// Plans the next frame from `read`, a snapshot of our store, and moves the cursor past
    /// it. The frame ends the transfer (`end`) when its page is the last one (not cut), when
    /// the transfer's frame budget is spent, when planning moved nothing (every stream left
    /// waits on a file we lack), or when our purge floors in play changed since the
    /// transfer opened: a run below a floor the initiator has not heard of must not reach
    /// it, so the transfer stops and the next round hears the new floors with the runs.
    ///
    /// # Errors
    /// A store read failed.
    pub fn next_frame(
        &mut self,
        read: &dyn StoreRead,
        has_blob: &dyn Fn(&BlobRef) -> bool,
    ) -> Result<PageFrame> {
        self.seq += 1;
        self.left = self.left.saturating_sub(1);
        let floors: Vec<(Scope, u64)> = read
            .floors()?
            .into_iter()
            .filter(|(s, _)| self.scopes.contains(s))
            .collect();
        if floors != self.floors {
            self.left = 0;
            return Ok(PageFrame {
                seq: self.seq,
                page: Page {
                    runs: Vec::new(),
                    more: true,
                },
                remaining: None,
                end: true,
            });
        }
        let mine = marks_in_play(read, &self.scopes)?;
        let page = plan_page(
            read,
            &mine,
            &self.held,
            self.limits,
            &self.deferred,
            has_blob,
            &mut BTreeSet::new(),
        )?;
        self.held = held_after(std::mem::take(&mut self.held), &page);
        let remaining = match self.remaining_cap {
            0 => None,
            cap => Some(super::responder::remaining(read, &mine, &self.held, cap)?),
        };
        if !page.more || page.runs.is_empty() {
            self.left = 0;
        }
        Ok(PageFrame {
            seq: self.seq,
            end: self.left == 0,
            page,
            remaining,
        })
    }
}
