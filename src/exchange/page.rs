//! What travels in a round: runs, pages, and the halts that stop a stream.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, NodeId};
use crate::record::{Key, Scope, Version};

/// A set of (scope, origin) streams: the unit that halts, defers and blocks.
pub type Streams = BTreeSet<(Scope, NodeId)>;

/// Every live version a sender holds from `origin` in `scope` with `base < Hlc <= top`, in
/// ascending Hlc order. `base = None` means "from the beginning".
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Run {
    /// The run's scope.
    pub scope: Scope,
    /// The node that wrote every version of the run.
    pub origin: NodeId,
    /// Exclusive lower bound (the mark the sender believed the receiver had).
    pub base: Option<Hlc>,
    /// Inclusive upper bound the claim covers.
    pub top: Hlc,
    /// The versions, ascending.
    pub versions: Vec<(Key, Version)>,
}

impl Run {
    /// Whether the run starts below `floor` (its base's time, or 0 for a run from the
    /// start): it may claim past tombstones its sender purged at or below that floor.
    pub fn starts_below(&self, floor: u64) -> bool {
        self.base.map_or(0, |b| b.time()) < floor
    }

    /// Checks the run's shape: `top` and every version from `origin`, versions strictly
    /// ascending and inside `(base, top]`.
    ///
    /// # Errors
    /// A static description of the first violation.
    pub fn check_shape(&self) -> Result<(), &'static str> {
        if self.top.origin() != self.origin {
            return Err("top is not from the run's origin");
        }
        if self
            .base
            .is_some_and(|b| b.origin() != self.origin || b >= self.top)
        {
            return Err("base is not below top");
        }
        let mut prev = self.base;
        for (_, v) in &self.versions {
            if v.hlc.origin() != self.origin {
                return Err("version from another origin");
            }
            if prev.is_some_and(|p| v.hlc <= p) {
                return Err("versions not strictly ascending above base");
            }
            prev = Some(v.hlc);
        }
        if prev.is_some_and(|p| p > self.top) {
            return Err("version above top");
        }
        Ok(())
    }

    /// Whether a receiver holding `mark` may advance to `top` after applying this run.
    pub fn continues(&self, mark: Option<Hlc>) -> bool {
        self.base <= mark
    }
}

/// A bounded batch of runs, and whether the sender cut it short.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Page {
    /// The runs, at most one per (scope, origin).
    pub runs: Vec<Run>,
    /// True when the sender stopped at its limit with more to send. The stream it stopped
    /// in is the last run's (or one after it).
    pub more: bool,
}

impl Page {
    /// Whether the sender has more to send that the receiver can use: it stopped at its
    /// limit, and not inside a stream the receiver halted again (in `halted`, and already
    /// in `deferred`, the streams the sender planned last). A cut inside a stream that was
    /// deferred means everything left is deferred too; a stream halted for the first time
    /// may have had others planned after it.
    pub fn more_beyond(&self, halted: &[Halt], deferred: &Streams) -> bool {
        let stuck = |r: &Run| {
            deferred.contains(&(r.scope.clone(), r.origin))
                && halted
                    .iter()
                    .any(|h| h.scope == r.scope && h.origin == r.origin)
        };
        self.more && !self.runs.last().is_some_and(stuck)
    }

    /// The (scope, origin) streams of the page's runs.
    pub fn streams(&self) -> impl Iterator<Item = (&Scope, NodeId)> {
        self.runs.iter().map(|r| (&r.scope, r.origin))
    }

    /// Every version of the page with its scope and key, run by run.
    pub fn versions(&self) -> impl Iterator<Item = (&Scope, &Key, &Version)> {
        self.runs
            .iter()
            .flat_map(|r| r.versions.iter().map(move |(k, v)| (&r.scope, k, v)))
    }

    /// Number of versions over all runs.
    pub fn version_count(&self) -> usize {
        self.runs.iter().map(|r| r.versions.len()).sum()
    }
}

/// Why a receiver stopped applying one origin's run: the origin's stream halts there, its
/// watermark stays below the refused version, and the next round retries. One reason is
/// final instead, and holds nothing: [`HaltReason::BelowFloor`] (see [`Halt::holds_stream`]).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Halt {
    /// The run's scope.
    pub scope: Scope,
    /// The origin whose stream halted.
    pub origin: NodeId,
    /// Why.
    pub reason: HaltReason,
}

/// The reason an origin's stream halted on the receiver.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HaltReason {
    /// A version's Hlc is ahead of the receiver's clock by more than its max drift.
    ClockSkew {
        /// How far ahead, in milliseconds.
        ahead_by_ms: u64,
    },
    /// The run carries versions of the receiver's own id that the receiver never wrote (or
    /// no longer has): a restored backup or a cloned data directory. See docs/protocol.md.
    OwnOrigin,
    // Appended: variant indexes are part of wire format 1.
    /// A version's blob could not be had (transfer failure, hash mismatch, missing at the
    /// sender): the version is applied as Staged and the watermark stops just below it.
    BlobUnavailable {
        /// The blob.
        hash: crate::hash::Hash,
    },
    /// Versions of keys whose deletes the receiver purged, at or below its purge floor: the
    /// receiver refused them for good (applying them would bring deleted records back) and
    /// the sender dropped them from its store (see docs/protocol.md, "Forgetting"). Unlike the
    /// other reasons this one holds nothing: the rest of the run applied and the watermark
    /// moved past the refused versions. It never travels in a version 1 message's halts: both
    /// sides build it from the refusals that wire version 2 carries (`refused`), and an app
    /// learns the keys from the `floor_refused` event.
    BelowFloor {
        /// How many versions of the stream were refused.
        versions: u64,
    },
}

impl Halt {
    /// Whether the stream waits at this halt until a later round applies it: true for every
    /// reason but [`HaltReason::BelowFloor`], whose refusal is final and holds nothing.
    pub fn holds_stream(&self) -> bool {
        !matches!(self.reason, HaltReason::BelowFloor { .. })
    }

    /// The refusals below a purge floor as halts, one per stream (scope, origin of the
    /// versions), in stream order.
    pub fn below_floor(refused: &[(Scope, Key, Hlc)]) -> Vec<Halt> {
        let mut streams: BTreeMap<(&Scope, NodeId), u64> = BTreeMap::new();
        for (scope, _, hlc) in refused {
            *streams.entry((scope, hlc.origin())).or_default() += 1;
        }
        streams
            .into_iter()
            .map(|((scope, origin), versions)| Halt {
                scope: scope.clone(),
                origin,
                reason: HaltReason::BelowFloor { versions },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16]).unwrap()
    }

    #[test]
    fn run_shape() {
        let s = Scope::shared();
        let k = Key::new("k").unwrap();
        let v = |t| Version {
            hlc: Hlc::new(t, id(1)),
            op: crate::record::Op::Delete,
        };
        let run = |base: Option<u64>, top, ts: &[u64]| Run {
            scope: s.clone(),
            origin: id(1),
            base: base.map(|b| Hlc::new(b, id(1))),
            top: Hlc::new(top, id(1)),
            versions: ts.iter().map(|t| (k.clone(), v(*t))).collect(),
        };
        assert!(run(Some(1), 5, &[2, 3, 5]).check_shape().is_ok());
        assert!(run(None, 5, &[]).check_shape().is_ok());
        assert!(run(Some(1), 5, &[3, 2]).check_shape().is_err());
        assert!(run(Some(3), 5, &[3]).check_shape().is_err());
        assert!(run(Some(1), 5, &[6]).check_shape().is_err());
        assert!(run(Some(5), 5, &[]).check_shape().is_err());
        assert!(run(Some(2), 5, &[]).continues(Some(Hlc::new(2, id(1)))));
        assert!(!run(Some(2), 5, &[]).continues(Some(Hlc::new(1, id(1)))));
        assert!(!run(Some(2), 5, &[]).continues(None));
        assert!(run(None, 5, &[]).continues(None));
    }
}
