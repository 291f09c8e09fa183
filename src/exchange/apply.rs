//! What to apply from a received page: validation and per-run decisions, with no IO.

use std::collections::BTreeSet;

use crate::error::{ClockError, ProtocolError};
use crate::exchange::{Halt, HaltReason, Page, Run};
use crate::hlc::{Hlc, NodeId};
use crate::record::ScopeFilter;
use crate::record::{Key, Scope, Version};
use crate::store::Advance;
use crate::watermark::ScopedWatermarks;

/// Checks a received page before anything of it is applied: run shapes, one run per
/// (scope, origin), scopes in play, value sizes.
///
/// # Errors
/// The first [`ProtocolError`] found; the page must then be refused whole.
pub fn validate_page(page: &Page, scopes: &ScopeFilter) -> Result<(), ProtocolError> {
    let mut seen = BTreeSet::new();
    for run in &page.runs {
        if !scopes.contains(&run.scope) {
            return Err(ProtocolError::ScopeNotInPlay {
                scope: run.scope.clone(),
            });
        }
        if !seen.insert((&run.scope, run.origin)) {
            return Err(ProtocolError::DuplicateRun {
                scope: run.scope.clone(),
                origin: run.origin,
            });
        }
        let malformed = |reason| ProtocolError::MalformedRun {
            scope: run.scope.clone(),
            origin: run.origin,
            reason,
        };
        run.check_shape().map_err(malformed)?;
        if run.versions.iter().any(|(_, v)| v.op.validate().is_err()) {
            return Err(malformed("value over the size limit"));
        }
    }
    Ok(())
}

/// What to commit of a received page: its runs' decisions, gathered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PagePlan {
    /// Versions to merge, in page order.
    pub upserts: Vec<(Scope, Key, Version)>,
    /// The watermark advances the applied parts justify.
    pub advances: Vec<Advance>,
    /// The streams that stopped short of their run's top, and why.
    pub halts: Vec<Halt>,
}

/// Decides what to apply of every run of `page` (see [`plan_run`]) on node `me`, whose own
/// marks are `own`. `blob_ready` tells whether a version's blob (if it needs one) is local.
pub fn plan_page_apply(
    page: &Page,
    me: NodeId,
    own: &ScopedWatermarks,
    check: impl Fn(Hlc) -> Result<(), ClockError>,
    blob_ready: impl Fn(&Scope, &Key, &Version) -> bool,
) -> PagePlan {
    let mut plan = PagePlan::default();
    for run in &page.runs {
        let decided = plan_run(run, me, own.get(&run.scope, me), &check, |key, v| {
            blob_ready(&run.scope, key, v)
        });
        plan.upserts.extend(decided.upserts);
        plan.advances.extend(decided.advance);
        plan.halts.extend(decided.halt);
    }
    plan
}

/// The halt reason for a version the clock refused: how far ahead it is, in milliseconds.
pub fn skew_reason(e: &ClockError) -> HaltReason {
    let ahead_by_ms = match e {
        ClockError::Skew { ahead_by, .. } => {
            u64::try_from(ahead_by.as_millis()).unwrap_or(u64::MAX)
        }
        _ => u64::MAX,
    };
    HaltReason::ClockSkew { ahead_by_ms }
}

/// How many new marks a page may create on its receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkLimits {
    /// Origins a scope may have marks for; advances that would add one past it are dropped.
    pub per_scope: usize,
    /// New marks that runs *without versions* may create in one page (`None`: no bound).
    /// A run with versions carries what it claims; an empty run of an origin the receiver
    /// never heard of costs the sender nothing, so an initiator's pages get a budget.
    pub vacuous: Option<usize>,
}

/// Drops the advances of `plan` that would create marks past `limits`, given the
/// receiver's marks `own`; the versions still merge. Returns the (scope, origin) streams
/// whose mark was not created: the sender sends them again and a later page creates them,
/// as far as the limits allow.
pub fn bound_new_marks(
    plan: &mut PagePlan,
    page: &Page,
    own: &ScopedWatermarks,
    limits: MarkLimits,
) -> Vec<(Scope, NodeId)> {
    let carries: BTreeSet<(&Scope, NodeId)> = page
        .runs
        .iter()
        .filter(|r| !r.versions.is_empty())
        .map(|r| (&r.scope, r.origin))
        .collect();
    let mut per_scope: std::collections::BTreeMap<Scope, usize> = Default::default();
    let mut vacuous = 0usize;
    let mut dropped = Vec::new();
    plan.advances.retain(|a| {
        let origin = a.top.origin();
        if own.get(&a.scope, origin).is_some() {
            return true;
        }
        let count = per_scope
            .entry(a.scope.clone())
            .or_insert_with(|| own.scope(&a.scope).map_or(0, |w| w.len()));
        let empty = !carries.contains(&(&a.scope, origin));
        let keep = *count < limits.per_scope
            && !(empty && limits.vacuous.is_some_and(|budget| vacuous >= budget));
        if keep {
            *count += 1;
            vacuous += usize::from(empty);
        } else {
            dropped.push((a.scope.clone(), origin));
        }
        keep
    });
    dropped
}

/// The decision for one run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunPlan {
    /// Versions to merge.
    pub upserts: Vec<(Scope, Key, Version)>,
    /// The watermark advance the applied part justifies, if any.
    pub advance: Option<Advance>,
    /// Why the origin's stream stopped short of the run's top, if it did.
    pub halt: Option<Halt>,
}

/// Decides what to apply of `run` on node `me`, whose own mark in the run's scope is
/// `own_mark`. `check` tells whether a timestamp is within the clock's drift bound;
/// `blob_ready` whether a version's blob (if it needs one) is local.
///
/// - Versions of our own id at or below our own mark are ones we wrote and still cover:
///   skipped. Any above it come from a restored backup or a cloned identity: the run halts
///   with [`HaltReason::OwnOrigin`] and nothing of it is applied.
/// - The run is applied up to the first version too far ahead of our clock
///   ([`HaltReason::ClockSkew`]).
/// - A version whose blob is not local is applied (it will read as Staged), and so are the
///   versions after it, but the mark stops just below it ([`HaltReason::BlobUnavailable`]):
///   the next round re-ships from there and retries the transfer.
/// - The mark advances to `top` when nothing halted, else to the last version before the
///   first halt (the claim `(base, t]` holds for every `t` up to `top`), or not at all.
pub fn plan_run(
    run: &Run,
    me: NodeId,
    own_mark: Option<Hlc>,
    check: impl Fn(Hlc) -> Result<(), ClockError>,
    blob_ready: impl Fn(&Key, &Version) -> bool,
) -> RunPlan {
    if run.origin == me {
        if Some(run.top) <= own_mark {
            return RunPlan::default();
        }
        let halt = Halt {
            scope: run.scope.clone(),
            origin: me,
            reason: HaltReason::OwnOrigin,
        };
        return RunPlan {
            halt: Some(halt),
            ..RunPlan::default()
        };
    }
    let halt_for = |reason| Halt {
        scope: run.scope.clone(),
        origin: run.origin,
        reason,
    };
    let skew = |e: ClockError| halt_for(skew_reason(&e));
    let mut accepted = 0;
    // (index of the first version the mark must stop below, why)
    let mut first_halt: Option<(usize, Halt)> = None;
    for (i, (key, v)) in run.versions.iter().enumerate() {
        if let Err(e) = check(v.hlc) {
            first_halt.get_or_insert((i, skew(e)));
            break;
        }
        accepted += 1;
        if first_halt.is_none() && !blob_ready(key, v) {
            if let Some(blob) = v.blob() {
                let reason = HaltReason::BlobUnavailable { hash: blob.hash };
                first_halt = Some((i, halt_for(reason)));
            }
        }
    }
    if first_halt.is_none() {
        if let Err(e) = check(run.top) {
            first_halt = Some((run.versions.len(), skew(e)));
        }
    }
    let top = match &first_halt {
        None => Some(run.top),
        Some((0, _)) => None,
        Some((i, _)) => Some(run.versions[i - 1].1.hlc),
    };
    RunPlan {
        upserts: run.versions[..accepted]
            .iter()
            .map(|(k, v)| (run.scope.clone(), k.clone(), v.clone()))
            .collect(),
        advance: top.map(|top| Advance {
            scope: run.scope.clone(),
            base: run.base,
            top,
        }),
        halt: first_halt.map(|(_, h)| h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Op;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16]).expect("not all zero")
    }

    /// A page of empty runs for origins 10.. and one run with a version for origin 9.
    fn page(empty: u8) -> Page {
        let scope = Scope::shared();
        let mut runs: Vec<Run> = (0..empty)
            .map(|i| Run {
                scope: scope.clone(),
                origin: id(10 + i),
                base: None,
                top: Hlc::new(5, id(10 + i)),
                versions: vec![],
            })
            .collect();
        runs.push(Run {
            scope: scope.clone(),
            origin: id(9),
            base: None,
            top: Hlc::new(5, id(9)),
            versions: vec![(
                Key::new("k").expect("a valid key"),
                Version {
                    hlc: Hlc::new(5, id(9)),
                    op: Op::Delete,
                },
            )],
        });
        Page { runs, more: false }
    }

    fn plan(page: &Page) -> PagePlan {
        plan_page_apply(
            page,
            id(1),
            &ScopedWatermarks::new(),
            |_| Ok(()),
            |_, _, _| true,
        )
    }

    #[test]
    fn an_initiators_empty_runs_create_marks_up_to_its_budget_only() {
        let page = page(5);
        let mut p = plan(&page);
        let limits = MarkLimits {
            per_scope: 100,
            vacuous: Some(2),
        };
        let dropped = bound_new_marks(&mut p, &page, &ScopedWatermarks::new(), limits);
        assert_eq!(dropped.len(), 3, "{dropped:?}");
        // The run that carries a version keeps its mark, and its version still merges.
        assert!(p.advances.iter().any(|a| a.top.origin() == id(9)));
        assert_eq!((p.advances.len(), p.upserts.len()), (3, 1));
    }

    #[test]
    fn no_scope_gets_more_origins_than_its_limit() {
        let page = page(5);
        let mut own = ScopedWatermarks::new();
        own.observe(&Scope::shared(), Hlc::new(1, id(2)));
        own.observe(&Scope::shared(), Hlc::new(1, id(3)));
        let mut p = plan(&page);
        let limits = MarkLimits {
            per_scope: 4,
            vacuous: None,
        };
        bound_new_marks(&mut p, &page, &own, limits);
        assert_eq!(
            p.advances.len(),
            2,
            "two existing origins plus two new ones"
        );
    }
}
