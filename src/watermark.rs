//! Watermarks (the version vector) and runs.
//!
//! For each scope and origin `n`, `W[n]` means: *this node holds every version written by `n`
//! with Hlc <= `W[n]`, or a newer version of the same key.* A [`Run`] is a sender's claim
//! over a range: "these are every live version I hold from `n` with `base < Hlc <= top`".
//! A receiver whose `W[n] >= base` may therefore move `W[n]` to `top` after applying it; a
//! run whose `base` lies above the receiver's mark would skip a gap, so it is merged but
//! moves nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hlc::{Hlc, NodeId};
use crate::record::{Key, Scope, Version};

/// Per-origin watermarks of one scope. Absent origin = nothing seen from it.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct Watermarks(BTreeMap<NodeId, Hlc>);

impl Watermarks {
    /// No origin seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// The mark for `origin`.
    pub fn get(&self, origin: NodeId) -> Option<Hlc> {
        self.0.get(&origin).copied()
    }

    /// Raises the mark of `hlc.origin()` to `hlc` if it is below. Returns whether it moved.
    pub fn observe(&mut self, hlc: Hlc) -> bool {
        match self.0.entry(hlc.origin()) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(hlc);
                true
            }
            std::collections::btree_map::Entry::Occupied(mut e) if *e.get() < hlc => {
                e.insert(hlc);
                true
            }
            std::collections::btree_map::Entry::Occupied(_) => false,
        }
    }

    /// Pointwise max with `other`.
    pub fn merge(&mut self, other: &Watermarks) {
        for hlc in other.0.values() {
            self.observe(*hlc);
        }
    }

    /// Whether this holds everything `other` claims: nothing to send from `other` to us.
    pub fn covers(&self, other: &Watermarks) -> bool {
        other
            .0
            .values()
            .all(|h| self.get(h.origin()).is_some_and(|mine| mine >= *h))
    }

    /// Origins where this is ahead of `other`, with both marks.
    pub fn ahead_of<'a>(
        &'a self,
        other: &'a Watermarks,
    ) -> impl Iterator<Item = (NodeId, Option<Hlc>, Hlc)> + 'a {
        self.0.iter().filter_map(move |(o, mine)| {
            let theirs = other.get(*o);
            (theirs < Some(*mine)).then_some((*o, theirs, *mine))
        })
    }

    /// The marks in origin order.
    pub fn iter(&self) -> impl Iterator<Item = Hlc> + '_ {
        self.0.values().copied()
    }

    /// Number of origins.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no origin is known.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Hlc> for Watermarks {
    fn from_iter<I: IntoIterator<Item = Hlc>>(iter: I) -> Self {
        let mut w = Watermarks::new();
        for h in iter {
            w.observe(h);
        }
        w
    }
}

// Encoded as a sequence of (origin, time): the Hlc's id is the origin, so it is not repeated.
impl Serialize for Watermarks {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.values().map(|h| (h.origin(), h.time())))
    }
}

impl<'de> Deserialize<'de> for Watermarks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pairs = <Vec<(NodeId, u64)>>::deserialize(d)?;
        let mut map = BTreeMap::new();
        for (origin, time) in pairs {
            if map.insert(origin, Hlc::new(time, origin)).is_some() {
                return Err(serde::de::Error::custom("duplicate origin in watermarks"));
            }
        }
        Ok(Watermarks(map))
    }
}

/// A set of (scope, origin) streams: the unit that halts, defers and blocks.
pub type Streams = BTreeSet<(Scope, NodeId)>;

/// Watermarks for several scopes: the node's whole version vector, or the part in play.
/// A scope without marks is the same as an absent one (decoding drops it).
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize)]
pub struct ScopedWatermarks(BTreeMap<Scope, Watermarks>);

// postcard encodes a map exactly as a sequence of pairs; decoding pairs lets a repeated scope
// be refused, as a repeated origin is.
impl<'de> Deserialize<'de> for ScopedWatermarks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut map = BTreeMap::new();
        for (scope, marks) in <Vec<(Scope, Watermarks)>>::deserialize(d)? {
            if map.insert(scope, marks).is_some() {
                return Err(serde::de::Error::custom("duplicate scope in watermarks"));
            }
        }
        let mut marks = ScopedWatermarks(map);
        marks.retain_nonempty();
        Ok(marks)
    }
}

impl ScopedWatermarks {
    /// Nothing seen in any scope.
    pub fn new() -> Self {
        Self::default()
    }

    /// The marks of `scope` (empty if unknown).
    pub fn scope(&self, scope: &Scope) -> Option<&Watermarks> {
        self.0.get(scope)
    }

    /// The mark of `origin` in `scope`.
    pub fn get(&self, scope: &Scope, origin: NodeId) -> Option<Hlc> {
        self.0.get(scope).and_then(|w| w.get(origin))
    }

    /// Mutable marks of `scope`, created empty if needed.
    pub fn scope_mut(&mut self, scope: &Scope) -> &mut Watermarks {
        self.0.entry(scope.clone()).or_default()
    }

    /// Raises `scope`'s mark of `hlc.origin()` to `hlc`.
    pub fn observe(&mut self, scope: &Scope, hlc: Hlc) {
        self.scope_mut(scope).observe(hlc);
    }

    /// Pointwise max with `other`, scope by scope.
    pub fn merge(&mut self, other: &ScopedWatermarks) {
        for (scope, w) in &other.0 {
            self.scope_mut(scope).merge(w);
        }
    }

    /// Whether this holds everything `other` claims, in every scope.
    pub fn covers(&self, other: &ScopedWatermarks) -> bool {
        other
            .0
            .iter()
            .all(|(s, w)| self.0.get(s).map_or(w.is_empty(), |mine| mine.covers(w)))
    }

    /// The scopes and their marks, in scope order.
    pub fn iter(&self) -> impl Iterator<Item = (&Scope, &Watermarks)> {
        self.0.iter()
    }

    /// Keeps only the scopes `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&Scope) -> bool) {
        self.0.retain(|s, _| keep(s));
    }

    /// Drops scopes without marks.
    pub fn retain_nonempty(&mut self) {
        self.0.retain(|_, w| !w.is_empty());
    }

    /// Number of (scope, origin) marks.
    pub fn mark_count(&self) -> usize {
        self.0.values().map(Watermarks::len).sum()
    }

    /// A digest of the marks: blake3 (in key-derivation mode, which separates it from every
    /// other use of blake3) over a canonical encoding, truncated to 128 bits. Scopes without
    /// marks are left out, as decoding drops them, so equal marks always give equal digests.
    ///
    /// The encoding: for each scope with marks, in scope order, the scope's length (u64
    /// little-endian) and bytes, the number of its marks (u64 little-endian), then each mark
    /// in origin order as the origin's 16 bytes and the time (u64 little-endian). Every part
    /// is self-delimiting, so distinct marks never share an encoding.
    pub fn digest(&self) -> MarksDigest {
        let mut h = blake3::Hasher::new_derive_key(MARKS_DIGEST_CONTEXT);
        for (scope, marks) in self.0.iter().filter(|(_, w)| !w.is_empty()) {
            let name = scope.as_str().as_bytes();
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name);
            h.update(&(marks.len() as u64).to_le_bytes());
            for mark in marks.iter() {
                h.update(&mark.origin().to_bytes());
                h.update(&mark.time().to_le_bytes());
            }
        }
        let mut out = [0; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        MarksDigest(out)
    }
}

/// The blake3 key-derivation context of [`ScopedWatermarks::digest`]: a digest of marks is
/// its own domain, apart from every other blake3 hash.
const MARKS_DIGEST_CONTEXT: &str = "highwater 2026-11 sync protocol v1 watermarks digest";

/// A 128-bit digest of a set of watermarks ([`ScopedWatermarks::digest`]): two sets with the
/// same digest are equal but for a chance of about 2^-128.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct MarksDigest([u8; 16]);

impl MarksDigest {
    /// The digest with these bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        MarksDigest(bytes)
    }

    /// The digest's bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

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

    /// Number of versions over all runs.
    pub fn version_count(&self) -> usize {
        self.runs.iter().map(|r| r.versions.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16]).unwrap()
    }

    #[test]
    fn observe_merge_covers() {
        let mut a = Watermarks::new();
        a.observe(Hlc::new(5, id(1)));
        a.observe(Hlc::new(3, id(1)));
        assert_eq!(a.get(id(1)), Some(Hlc::new(5, id(1))));
        let b: Watermarks = [Hlc::new(2, id(1)), Hlc::new(9, id(2))]
            .into_iter()
            .collect();
        assert!(!a.covers(&b));
        a.merge(&b);
        assert!(a.covers(&b));
        assert_eq!(a.get(id(2)), Some(Hlc::new(9, id(2))));
        assert_eq!(b.ahead_of(&a).count(), 0);
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

    #[test]
    fn scoped_watermarks_refuse_duplicate_scopes_and_drop_empty_ones() {
        let w: Watermarks = [Hlc::new(3, id(1))].into_iter().collect();
        let dup = postcard::to_allocvec(&vec![
            (Scope::shared(), w.clone()),
            (Scope::shared(), w.clone()),
        ])
        .unwrap();
        assert!(postcard::from_bytes::<ScopedWatermarks>(&dup).is_err());
        let with_empty = postcard::to_allocvec(&vec![
            (Scope::shared(), w.clone()),
            (Scope::app("a", "b").unwrap(), Watermarks::new()),
        ])
        .unwrap();
        let decoded: ScopedWatermarks = postcard::from_bytes(&with_empty).unwrap();
        let mut expected = ScopedWatermarks::new();
        expected.observe(&Scope::shared(), Hlc::new(3, id(1)));
        assert_eq!(decoded, expected);
        // The map and the pair sequence are the same bytes.
        assert_eq!(
            postcard::to_allocvec(&expected).unwrap(),
            postcard::to_allocvec(&vec![(Scope::shared(), w)]).unwrap()
        );
    }

    #[test]
    fn digest_tells_marks_apart_and_ignores_empty_scopes() {
        let notes = Scope::app("notes", "items").unwrap();
        let mut a = ScopedWatermarks::new();
        a.observe(&Scope::shared(), Hlc::new(3, id(1)));
        let mut with_empty = a.clone();
        with_empty.scope_mut(&notes);
        assert_eq!(a.digest(), with_empty.digest());
        assert_ne!(a.digest(), ScopedWatermarks::new().digest());
        let mut later = a.clone();
        later.observe(&Scope::shared(), Hlc::new(4, id(1)));
        assert_ne!(a.digest(), later.digest());
        let mut other_origin = ScopedWatermarks::new();
        other_origin.observe(&Scope::shared(), Hlc::new(3, id(2)));
        assert_ne!(a.digest(), other_origin.digest());
        let mut other_scope = ScopedWatermarks::new();
        other_scope.observe(&notes, Hlc::new(3, id(1)));
        assert_ne!(a.digest(), other_scope.digest());
        // The same marks built in another order.
        let mut b = ScopedWatermarks::new();
        b.observe(&notes, Hlc::new(9, id(2)));
        b.observe(&Scope::shared(), Hlc::new(3, id(1)));
        let mut c = a.clone();
        c.observe(&notes, Hlc::new(9, id(2)));
        assert_eq!(b.digest(), c.digest());
    }

    #[test]
    fn watermarks_refuse_duplicate_origins_on_decode() {
        let bytes = postcard::to_allocvec(&vec![(id(1), 3u64), (id(1), 4u64)]).unwrap();
        assert!(postcard::from_bytes::<Watermarks>(&bytes).is_err());
    }
}

/// Why a receiver stopped applying one origin's run: the origin's stream halts there, its
/// watermark stays below the refused version, and the next round retries.
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
}
