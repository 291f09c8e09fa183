//! What to apply from a received page: validation and per-run decisions, with no IO.

use std::collections::BTreeSet;

use crate::error::{ClockError, ProtocolError};
use crate::hlc::{Hlc, NodeId};
use crate::record::{Key, Scope, Version};
use crate::store::Advance;
use crate::watermark::{Halt, HaltReason, Page, Run};
use crate::wire::ScopeFilter;

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
/// `own_mark`, with `check` telling whether a timestamp is within the clock's drift bound.
///
/// - Versions of our own id at or below our own mark are ones we wrote and still cover:
///   skipped. Any above it come from a restored backup or a cloned identity: the run halts
///   with [`HaltReason::OwnOrigin`] and nothing of it is applied.
/// - The run is applied up to the first version too far ahead of our clock; the mark then
///   advances only to the last version applied (the claim `(base, t]` holds for every `t`
///   up to `top`), and the run halts with [`HaltReason::ClockSkew`].
pub fn plan_run(
    run: &Run,
    me: NodeId,
    own_mark: Option<Hlc>,
    check: impl Fn(Hlc) -> Result<(), ClockError>,
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
    let skew = |e: ClockError| {
        let ahead_by_ms = match e {
            ClockError::Skew { ahead_by, .. } => {
                u64::try_from(ahead_by.as_millis()).unwrap_or(u64::MAX)
            }
            _ => u64::MAX,
        };
        Halt {
            scope: run.scope.clone(),
            origin: run.origin,
            reason: HaltReason::ClockSkew { ahead_by_ms },
        }
    };
    let mut accepted = 0;
    let mut halt = None;
    for (_, v) in &run.versions {
        if let Err(e) = check(v.hlc) {
            halt = Some(skew(e));
            break;
        }
        accepted += 1;
    }
    if halt.is_none() {
        halt = check(run.top).err().map(skew);
    }
    let applied = &run.versions[..accepted];
    let top = match halt {
        None => Some(run.top),
        Some(_) => applied.last().map(|(_, v)| v.hlc),
    };
    RunPlan {
        upserts: applied
            .iter()
            .map(|(k, v)| (run.scope.clone(), k.clone(), v.clone()))
            .collect(),
        advance: top.map(|top| Advance {
            scope: run.scope.clone(),
            base: run.base,
            top,
        }),
        halt,
    }
}
