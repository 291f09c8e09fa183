//! The exchange round, apart from its IO: given a message and what the stores answer, what
//! to commit and what to send next. No runtime, no file or socket, no wall clock: the
//! engine ([`crate::SyncEngine`]) drives these steps and does the IO, and the property
//! tests and fuzz targets drive them directly.
//!
//! # One round
//!
//! Two peers trade per-origin watermarks and ship what the other lacks. The *initiator*
//! plans its request from one snapshot of its store ([`Initiation::plan`]): its marks for
//! the scopes in play, and a page of the versions the responder lacks according to what it
//! last learned of the responder's marks (nothing on first contact, when it knows nothing).
//! A page is a list of [`Run`]s, one per (scope, origin), each claiming "these are every live
//! version I hold from this origin with `base < Hlc <= top`".
//!
//! The *responder* plans its answer from the state before it applies anything
//! ([`Answer::plan`]): a page of what the initiator lacks according to the request's marks.
//! It then applies the request's page in one transaction: versions merge by last-write-wins,
//! and each run advances the responder's mark for its origin to `top` only if the run
//! continues from where the responder stands (`base <= W`), so a crash or a stale belief
//! costs a re-fetch, never a gap ([`apply::plan_page_apply`]). It records what the initiator
//! will hold after applying the response as its knowledge of the initiator, in the same
//! transaction, and answers with its marks and its page ([`Answer::respond`]).
//!
//! The initiator applies the response's page the same way, records the responder's marks as
//! its knowledge of the responder in that transaction, and finishes ([`Initiation::finish`]):
//! it remembers in its [`Session`] which streams either side halted and what the responder
//! now holds of its marks, and reports `has_more` while either side still holds something
//! the other lacks. Callers repeat while `has_more`.
//!
//! Watermarks the other side already recorded travel as a 16-byte digest: the initiator's
//! when its session believes the responder recorded exactly its current marks, the
//! responder's (`Same`) when they hash to the digest of the initiator's knowledge. A
//! responder that cannot resolve the initiator's digest asks for the marks in full, and the
//! initiator sends the request again ([`Reply::Resend`]). A miss costs a round trip, never a
//! skipped version.
//!
//! A run that cannot be applied whole halts its stream ([`Halt`]): a version too far ahead
//! of the receiver's clock, a version by the receiver's own id that it does not hold, a file
//! that could not be had. The receiver's mark stops just below it, nothing is dropped, and
//! the next round retries; the halted stream is planned after all others meanwhile, so one
//! stuck origin cannot starve the rest.
//!
//! # Driving two peers
//!
//! ```
//! use highwater::exchange::apply::plan_page_apply;
//! use highwater::exchange::plan::PageLimits;
//! use highwater::exchange::{
//!     AppliedPage, Answer, Answering, ExchangeOptions, Initiation, Page, Reply, Session,
//! };
//! use highwater::store::{Advance, Batch, Durability, MemStore, PeerKnowledge, Store};
//! use highwater::{Hlc, Key, NodeId, Op, Scope, Version};
//!
//! type R<T> = Result<T, Box<dyn std::error::Error>>;
//!
//! // A local write: the version and the advance of our own mark, in one transaction.
//! fn write(store: &MemStore, hlc: Hlc, key: &str) -> R<()> {
//!     let mut batch = Batch::new(hlc.time(), Durability::Immediate);
//!     let op = Op::Put { value: key.as_bytes().to_vec(), blob: None };
//!     batch.upserts.push((Scope::shared(), Key::try_from(key)?, Version { hlc, op }));
//!     batch.advances.push(Advance { scope: Scope::shared(), base: None, top: hlc });
//!     store.commit(&batch)?;
//!     Ok(())
//! }
//!
//! // Applying a received page: what the core decides, committed with the knowledge.
//! fn apply(store: &MemStore, me: NodeId, page: &Page, known: PeerKnowledge) -> R<AppliedPage> {
//!     let own = store.read()?.watermarks()?;
//!     let plan = plan_page_apply(page, me, &own, |_| Ok(()), |_, _, _| true);
//!     let mut batch = Batch::new(0, Durability::Immediate);
//!     batch.upserts = plan.upserts;
//!     batch.advances = plan.advances;
//!     batch.peer = Some(known);
//!     let report = store.commit(&batch)?;
//!     let received = page.version_count();
//!     Ok(AppliedPage { received, applied: report.applied.len(), halts: plan.halts })
//! }
//!
//! # fn main() -> R<()> {
//! let (a, b) = (MemStore::new(), MemStore::new());
//! let (id_a, id_b) = (a.identity(NodeId::random())?, b.identity(NodeId::random())?);
//! for t in 1..=5 {
//!     write(&a, Hlc::new(t, id_a), &format!("a{t}"))?;
//!     write(&b, Hlc::new(t, id_b), &format!("b{t}"))?;
//! }
//!
//! // a initiates; b answers. Pages of two versions, so it takes a few rounds.
//! let limits = PageLimits { versions: 2, bytes: 1 << 20 };
//! let options = ExchangeOptions::default();
//! let mut session = Session::new();
//! let mut rounds = 0;
//! loop {
//!     rounds += 1;
//!     let mut round = Initiation::plan(
//!         id_a, &*a.read()?, &mut session, Some(id_b), &options, limits, &|_| true,
//!     )?;
//!     let response = match Answer::plan(id_b, &*b.read()?, round.request().clone(), limits, 0, &|_| true)? {
//!         Answering::Resend(response) => response,
//!         Answering::Apply(answer) => {
//!             let applied = apply(&b, id_b, answer.incoming(), answer.knowledge().clone())?;
//!             let marks = b.read()?.watermarks()?;
//!             answer.respond(applied.halts, Some(marks)).0
//!         }
//!     };
//!     let Reply::Apply(received) = round.receive(response)? else { unreachable!() };
//!     let applied = apply(&a, id_a, &received.page, received.knowledge.clone())?;
//!     let outcome = round.finish(&mut session, &received, applied, &a.read()?.watermarks()?);
//!     if !outcome.has_more {
//!         break;
//!     }
//! }
//! assert!(rounds > 2);
//! assert_eq!(a.read()?.watermarks()?, b.read()?.watermarks()?);
//! let keys = |s: &MemStore| -> R<Vec<Key>> {
//!     let range = Default::default();
//!     Ok(s.read()?.scan(&Scope::shared(), &highwater::store::KeyRange { limit: 100, ..range })?
//!         .into_iter().map(|(k, _)| k).collect())
//! };
//! assert_eq!(keys(&a)?.len(), 10);
//! assert_eq!(keys(&a)?, keys(&b)?);
//! # Ok(())
//! # }
//! ```

pub mod apply;
pub mod audit;
mod initiator;
mod messages;
mod page;
pub mod plan;
mod pull;
mod push;
pub mod ranges;
mod responder;
mod restore;
mod session;

pub use self::initiator::{
    AppliedPage, ExchangeOptions, ExchangeOutcome, Initiation, Pushed, Received, Reply,
};
pub use self::messages::{
    ExchangeRequest, ExchangeResponse, PageFrame, RequestExt, RequestMarks, ResponseExt,
    ResponseMarks,
};
pub use self::page::{Halt, HaltReason, Page, Run, Streams};
pub use self::pull::PullCursor;
pub use self::push::{PushStart, PushTransfer};
pub use self::responder::{Answer, Answering};
pub use self::restore::{evidence_in_marks, evidence_in_page, RestoreEvidence};
pub use self::session::{HeldMarks, Session};

use crate::error::StoreError;
use crate::record::ScopeFilter;
use crate::store::StoreRead;
use crate::watermark::ScopedWatermarks;

/// The receiver's marks as the sender records them at the end of a round: the marks the
/// receiver stood for, raised to the `top` of every run of the page sent to it. Both sides
/// compute it from the same messages, so each knows what the other recorded.
pub fn held_after(mut marks: ScopedWatermarks, page: &Page) -> ScopedWatermarks {
    for run in &page.runs {
        marks.observe(&run.scope, run.top);
    }
    marks
}

/// A node's marks for the scopes in play, read from `read`.
///
/// # Errors
/// A store read failure.
pub fn marks_in_play(
    read: &dyn StoreRead,
    scopes: &ScopeFilter,
) -> Result<ScopedWatermarks, StoreError> {
    let mut mine = read.watermarks()?;
    mine.retain(|s| scopes.contains(s));
    Ok(mine)
}
