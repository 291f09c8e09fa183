//! Evidence of a restore: a peer holds writes by our own id that we do not hold.
//!
//! Our mark for our own id covers every write we issued, since each write advances it in its
//! own transaction. A peer can hold writes by our id only because we shipped them; if its mark
//! for our id (or a run it sends of our id) is above ours, we issued timestamps we no longer
//! hold: the data directory was restored from a backup, or copied and run twice. Writing on
//! under that id could issue a timestamp equal to a lost one with other content, so the node
//! must take a fresh id first (see `docs/protocol.md`, "Our own origin").

use crate::hlc::{Hlc, NodeId};
use crate::record::Scope;
use crate::watermark::ScopedWatermarks;

use super::Page;

/// What showed that a peer holds writes by our own id above our own mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreEvidence {
    /// The scope.
    pub scope: Scope,
    /// Our mark for our own id there (`None`: we hold no write of ours there).
    pub ours: Option<Hlc>,
    /// The newest write by our id the peer shows there.
    pub theirs: Hlc,
}

/// The first scope where `theirs` (a peer's marks) shows our id `me` above our own marks
/// `own`, if any.
pub fn evidence_in_marks(
    me: NodeId,
    own: &ScopedWatermarks,
    theirs: &ScopedWatermarks,
) -> Option<RestoreEvidence> {
    theirs.iter().find_map(|(scope, marks)| {
        let peer = marks.get(me)?;
        let ours = own.get(scope, me);
        (ours < Some(peer)).then(|| RestoreEvidence {
            scope: scope.clone(),
            ours,
            theirs: peer,
        })
    })
}

/// The first run of `page` from our id `me` that claims past our own mark, if any.
pub fn evidence_in_page(
    me: NodeId,
    own: &ScopedWatermarks,
    page: &Page,
) -> Option<RestoreEvidence> {
    page.runs.iter().find_map(|run| {
        let ours = own.get(&run.scope, me);
        (run.origin == me && ours < Some(run.top)).then(|| RestoreEvidence {
            scope: run.scope.clone(),
            ours,
            theirs: run.top,
        })
    })
}
