//! Watermarks (the version vector).
//!
//! For each scope and origin `n`, `W[n]` means: *this node holds every version written by `n`
//! with Hlc <= `W[n]`, or a newer version of the same key.* A [`crate::exchange::Run`] is a
//! sender's claim over a range: "these are every live version I hold from `n` with
//! `base < Hlc <= top`".
//! A receiver whose `W[n] >= base` may therefore move `W[n]` to `top` after applying it; a
//! run whose `base` lies above the receiver's mark would skip a gap, so it is merged but
//! moves nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hlc::{Hlc, NodeId};
use crate::record::Scope;

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

    /// Drops the mark of `origin` (a retired origin); returns the mark it had.
    pub fn remove(&mut self, origin: NodeId) -> Option<Hlc> {
        self.0.remove(&origin)
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

/// The highest mark of each origin, as [`Watermarks::observe`] would leave it; built in one
/// pass over the sorted marks rather than one map insertion per mark (a store's marks are
/// read this way several times a round).
impl FromIterator<Hlc> for Watermarks {
    fn from_iter<I: IntoIterator<Item = Hlc>>(iter: I) -> Self {
        let mut marks: Vec<Hlc> = iter.into_iter().collect();
        // Each origin's highest first, then the others of that origin dropped.
        marks.sort_unstable_by(|a, b| a.origin().cmp(&b.origin()).then(b.cmp(a)));
        marks.dedup_by_key(|h| h.origin());
        Watermarks(marks.into_iter().map(|h| (h.origin(), h)).collect())
    }
}

/// Raises marks as [`Watermarks::observe`] does, one by one; into empty marks, in one build.
impl Extend<Hlc> for Watermarks {
    fn extend<I: IntoIterator<Item = Hlc>>(&mut self, iter: I) {
        if self.is_empty() {
            *self = iter.into_iter().collect();
            return;
        }
        for h in iter {
            self.observe(h);
        }
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

    /// Drops `scope`'s mark of `origin` (a retired origin), and the scope if no mark is
    /// left; returns the mark it had.
    pub fn remove(&mut self, scope: &Scope, origin: NodeId) -> Option<Hlc> {
        let marks = self.0.get_mut(scope)?;
        let had = marks.remove(origin);
        if marks.is_empty() {
            self.0.remove(scope);
        }
        had
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

    /// Keeps only the marks `keep` accepts (given their scope), then drops scopes left
    /// without marks.
    pub fn retain_marks(&mut self, mut keep: impl FnMut(&Scope, Hlc) -> bool) {
        for (scope, marks) in &mut self.0 {
            marks.0.retain(|_, h| keep(scope, *h));
        }
        self.retain_nonempty();
    }

    /// Whether `self`, kept to the scopes `in_play` accepts, equals `other`: what
    /// `retain(in_play)` then `==` would say, without a copy.
    pub fn equals_in(&self, mut in_play: impl FnMut(&Scope) -> bool, other: &Self) -> bool {
        self.0.iter().filter(|(s, _)| in_play(s)).eq(other.0.iter())
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
        // Each scope's encoding is hashed in one piece: an `update` costs more than a mark's
        // 24 bytes take to hash, and a round takes several digests of every mark.
        let mut encoding = Vec::new();
        for (scope, marks) in self.0.iter().filter(|(_, w)| !w.is_empty()) {
            let name = scope.as_str().as_bytes();
            encoding.clear();
            encoding.reserve(16 + name.len() + 24 * marks.len());
            encoding.extend_from_slice(&(name.len() as u64).to_le_bytes());
            encoding.extend_from_slice(name);
            encoding.extend_from_slice(&(marks.len() as u64).to_le_bytes());
            for mark in marks.iter() {
                encoding.extend_from_slice(&mark.origin().to_bytes());
                encoding.extend_from_slice(&mark.time().to_le_bytes());
            }
            h.update(&encoding);
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

    proptest::proptest! {
        /// Collecting and extending keep each origin's highest mark, as observing one by
        /// one does, whatever the order and the repeats.
        #[test]
        fn collect_and_extend_observe(
            first in proptest::collection::vec((1u8..6, 0u64..20), 0..24),
            then in proptest::collection::vec((1u8..6, 0u64..20), 0..24),
        ) {
            let hlcs = |of: &[(u8, u64)]| -> Vec<Hlc> {
                of.iter().map(|&(o, t)| Hlc::new(t, id(o))).collect()
            };
            let mut observed = Watermarks::new();
            for h in hlcs(&first) {
                observed.observe(h);
            }
            let mut collected: Watermarks = hlcs(&first).into_iter().collect();
            proptest::prop_assert_eq!(&collected, &observed);
            for h in hlcs(&then) {
                observed.observe(h);
            }
            collected.extend(hlcs(&then));
            proptest::prop_assert_eq!(collected, observed);
        }
    }

    /// The digest goes over the wire (a quiet round names marks by it), so its bytes are
    /// pinned: the documented encoding, hashed in one piece, and its value.
    #[test]
    fn digest_is_the_documented_encoding() {
        let (notes, shared) = (Scope::app("notes", "items").unwrap(), Scope::shared());
        // In scope order ("app/..." before "shared"), each scope's marks in origin order.
        let listed = [
            (&notes, vec![(3u8, 5u64)]),
            (
                &shared,
                (1..=40).map(|o| (o, u64::from(o) << 33 | 7)).collect(),
            ),
        ];
        let mut marks = ScopedWatermarks::new();
        let mut encoding = Vec::new();
        for (scope, of) in &listed {
            let name = scope.as_str().as_bytes();
            encoding.extend((name.len() as u64).to_le_bytes());
            encoding.extend(name);
            encoding.extend((of.len() as u64).to_le_bytes());
            for &(o, time) in of {
                marks.observe(scope, Hlc::new(time, id(o)));
                encoding.extend(id(o).to_bytes());
                encoding.extend(time.to_le_bytes());
            }
        }
        // A scope without marks is left out.
        marks.scope_mut(&Scope::app("empty", "scope").unwrap());
        let hash = blake3::Hasher::new_derive_key(MARKS_DIGEST_CONTEXT)
            .update(&encoding)
            .finalize();
        let digest = marks.digest().to_bytes();
        assert_eq!(digest, hash.as_bytes()[..16]);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "d020c2ab7b6a43966b5e5d72254b35cf");
    }

    #[test]
    fn watermarks_refuse_duplicate_origins_on_decode() {
        let bytes = postcard::to_allocvec(&vec![(id(1), 3u64), (id(1), 4u64)]).unwrap();
        assert!(postcard::from_bytes::<Watermarks>(&bytes).is_err());
    }
}
