//! The responder's half of a round, as steps: plan the answer, then respond once the
//! request's page is applied.

use std::collections::BTreeSet;

use super::{ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks};
use crate::error::{ProtocolError, Result};
use crate::hlc::NodeId;
use crate::record::{BlobRef, Scope, ScopeFilter};
use crate::store::{PeerKnowledge, StoreRead};
use crate::watermark::{MarksDigest, ScopedWatermarks};

use super::plan::{plan_page, PageLimits};
use super::pull::PullCursor;
use super::{held_after, marks_in_play, Halt, HeldMarks, Page, ResponseExt, Streams};

/// A request being answered, between its steps.
#[derive(Debug)]
pub struct Answer {
    me: NodeId,
    from: NodeId,
    scopes: ScopeFilter,
    known: Option<MarksDigest>,
    /// Our marks in play before the request's page is applied.
    marks: ScopedWatermarks,
    /// The versions the initiator lacks.
    page: Page,
    /// The request's page, to apply.
    incoming: Page,
    /// What the initiator will hold once it applies our page.
    knowledge: PeerKnowledge,
    /// How many versions the initiator lacks beyond our page, if we counted.
    remaining: Option<u64>,
    /// The page limits granted, the streams planned last and the count's cap: what a
    /// streamed pull plans its next pages with.
    limits: PageLimits,
    deferred: Streams,
    remaining_cap: u64,
}

/// How a request is answered.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per request, moved once
pub enum Answering {
    /// Answer this and change nothing: the request's marks digest does not match what we
    /// recorded of the initiator ([`ExchangeResponse::resend`]), or the request is addressed
    /// to another node ([`ExchangeResponse::elsewhere`]).
    Resend(ExchangeResponse),
    /// Apply [`Answer::incoming`] with [`Answer::knowledge`] in one transaction, then
    /// [`Answer::respond`].
    Apply(Answer),
}

impl Answer {
    /// Plans the answer to `request` from one snapshot of our store, taken before the
    /// request's page is applied (its claims hold for that state, and the versions it brings
    /// are ones the initiator has). `limits.versions` is the largest page we grant; the
    /// request may ask for fewer.
    ///
    /// IMPORTANT: we plan from the initiator's true marks, never from a guess: a digest
    /// stands for the marks we recorded of it only if those hash to it.
    ///
    /// The answer says how many versions the initiator lacks beyond our page, counted up
    /// to `remaining_cap` (0: not counted; the caller counts only for a version 2 request,
    /// the only kind whose answer can carry it); see [`ResponseExt::remaining`].
    ///
    /// # Errors
    /// The request comes from ourselves, or a store read failed.
    pub fn plan(
        me: NodeId,
        read: &dyn StoreRead,
        request: ExchangeRequest,
        limits: PageLimits,
        remaining_cap: u64,
        has_blob: &dyn Fn(&BlobRef) -> bool,
    ) -> Result<Answering> {
        Self::plan_withholding(me, read, request, limits, remaining_cap, has_blob, false)
    }

    /// Plans as [`Answer::plan`]; with `withhold`, leaves out of the page every run that
    /// starts below our purge floor in its scope and says there is more (`Page::more`). The
    /// driver withholds from an initiator that speaks version 2 but did not ask for our
    /// floors this time: its next request, pulling, asks, and gets those runs with the
    /// floors they cross, so it can tell it must audit (the re-clone, docs/protocol.md).
    ///
    /// # Errors
    /// As for [`Answer::plan`].
    pub fn plan_withholding(
        me: NodeId,
        read: &dyn StoreRead,
        request: ExchangeRequest,
        limits: PageLimits,
        remaining_cap: u64,
        has_blob: &dyn Fn(&BlobRef) -> bool,
        withhold: bool,
    ) -> Result<Answering> {
        let ExchangeRequest {
            from,
            scopes,
            marks,
            known,
            page: incoming,
            limit,
            deferred,
            ext,
        } = request;
        if from == me {
            return Err(ProtocolError::PeerIsSelf { node: me }.into());
        }
        // IMPORTANT: before anything of the request is read or applied.
        if ext.to.is_some_and(|to| to != me) {
            return Ok(Answering::Resend(ExchangeResponse::elsewhere(me)));
        }
        let Some(theirs) = initiator_marks(read, from, &scopes, marks)? else {
            return Ok(Answering::Resend(ExchangeResponse::resend(me)));
        };
        let marks = marks_in_play(read, &scopes)?;
        let limits = PageLimits {
            versions: usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .clamp(1, limits.versions),
            bytes: limits.bytes,
        };
        let deferred: Streams = deferred.into_iter().collect();
        let mut page = plan_page(
            read,
            &marks,
            &theirs,
            limits,
            &deferred,
            has_blob,
            &mut BTreeSet::new(),
        )?;
        if withhold && !page.runs.is_empty() {
            let floors = read.floors()?;
            let before = page.runs.len();
            page.runs
                .retain(|run| !floors.get(&run.scope).is_some_and(|f| run.starts_below(*f)));
            page.more |= page.runs.len() < before;
        }
        // What the initiator will hold once it applies our page; if it does not (a halt, a
        // lost response), this knowledge is stale-high, which costs one round, never a gap.
        let knowledge = PeerKnowledge {
            peer: from,
            scopes: scopes.clone(),
            marks: held_after(theirs, &page),
        };
        let remaining = match remaining_cap {
            0 => None,
            cap => Some(remaining(read, &marks, &knowledge.marks, cap)?),
        };
        Ok(Answering::Apply(Answer {
            me,
            from,
            scopes,
            known,
            marks,
            page,
            incoming,
            knowledge,
            remaining,
            limits,
            deferred,
            remaining_cap,
        }))
    }

    /// The cursor of a streamed pull that continues after this answer, if its page was cut
    /// (more to send): at most `frames` more pages, planned from the initiator's marks raised
    /// to this page's tops. `floors` are our purge floors in play, as the response tells them.
    pub fn pull(&self, floors: Vec<(Scope, u64)>, frames: u32) -> Option<PullCursor> {
        (self.page.more && frames > 0).then(|| PullCursor {
            from: self.from,
            scopes: self.scopes.clone(),
            held: self.knowledge.marks.clone(),
            deferred: self.deferred.clone(),
            limits: self.limits,
            floors,
            seq: 0,
            left: frames,
            remaining_cap: self.remaining_cap,
        })
    }

    /// The initiator.
    pub fn from(&self) -> NodeId {
        self.from
    }

    /// The scopes in play.
    pub fn scopes(&self) -> &ScopeFilter {
        &self.scopes
    }

    /// The request's page, to apply.
    pub fn incoming(&self) -> &Page {
        &self.incoming
    }

    /// What to record of the initiator in the transaction that applies its page.
    pub fn knowledge(&self) -> &PeerKnowledge {
        &self.knowledge
    }

    /// The response, once the request's page was applied: `halts` are the streams we halted,
    /// `marks` our marks in play after the apply if it may have moved them (`None`: as
    /// planned). Also returns our marks as the initiator will record them, which a round we
    /// initiate next may name by their digest.
    pub fn respond(
        self,
        halts: Vec<Halt>,
        marks: Option<ScopedWatermarks>,
    ) -> (ExchangeResponse, HeldMarks) {
        let marks = marks.unwrap_or(self.marks);
        let digest = marks.digest();
        let held = HeldMarks {
            scopes: self.scopes,
            digest,
        };
        let marks = if self.known == Some(digest) {
            ResponseMarks::Same
        } else {
            ResponseMarks::Full(marks)
        };
        let response = ExchangeResponse {
            from: self.me,
            marks,
            page: self.page,
            halts,
            ext: ResponseExt {
                remaining: self.remaining,
                ..ResponseExt::default()
            },
        };
        (response, held)
    }
}

/// How many live versions under our marks `mine` lie above `held` (the initiator's marks
/// once it applies our page), counted up to `cap`: one [`StoreRead::live_count`] per stream
/// the page did not finish, so a page that ends every stream costs no read at all.
pub(super) fn remaining(
    read: &dyn StoreRead,
    mine: &ScopedWatermarks,
    held: &ScopedWatermarks,
    cap: u64,
) -> Result<u64> {
    let mut n = 0u64;
    for (scope, marks) in mine.iter() {
        for top in marks.iter() {
            let base = held.get(scope, top.origin());
            if base >= Some(top) {
                continue;
            }
            n += read.live_count(scope, top.origin(), base, top, cap - n)?;
            if n >= cap {
                return Ok(cap);
            }
        }
    }
    Ok(n)
}

/// The initiator's marks in play: those the request carries in full, or, for a digest, what
/// we recorded of the initiator if that hashes to the digest (`None` if it does not: the
/// initiator must resend them in full).
fn initiator_marks(
    read: &dyn StoreRead,
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
