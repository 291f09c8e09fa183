//! The audit set of a scope and its fingerprints.
//!
//! An audit round compares two replicas' *live contents*, not their watermarks. Per scope,
//! the set it compares holds one item per stored version (tombstones included: a tombstone
//! is the live version of its key), identified by its [`Hlc`] and ordered by
//! **(origin, time)**, the order of the redb store's `versions-v2` table. A range of that
//! order is an [`AuditRange`] between two [`AuditPoint`]s, and its [`Fingerprint`] is the
//! number of items in it and the wrapping sum of their [`item_hash`]es.
//!
//! The sum makes fingerprints additive: the fingerprint of a range is the
//! [`Fingerprint::combine`] of the fingerprints of any ranges that partition it, so a store
//! can keep sums over large runs of items up to date as items come and go
//! ([`Fingerprint::add`], [`Fingerprint::remove`]) instead of hashing them at every audit.
//!
//! **What a fingerprint proves.** Equal sets have equal fingerprints. Two different sets
//! whose differences are accidental (lost writes, a restore, a bug) have equal fingerprints
//! with probability about 2^-128. The sum is linear, though: someone who can choose the items
//! of a replica (a peer forging versions) can craft a set with another replica's fingerprint
//! by solving a linear system over chosen item hashes. The audit finds accidental divergence;
//! it is not a defence against a peer that lies.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, NodeId};
use crate::record::Key;

/// A position in a scope's audit order: `(origin, time)`.
///
/// `Ord` compares the origin first, then the time (the fields' order), which is the byte
/// order of the redb store's `versions-v2` keys within a scope.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct AuditPoint {
    /// The origin (issuing node) of the version.
    pub origin: NodeId,
    /// The NTP64 time of the version's Hlc.
    pub time: u64,
}

impl From<Hlc> for AuditPoint {
    fn from(hlc: Hlc) -> Self {
        AuditPoint {
            origin: hlc.origin(),
            time: hlc.time(),
        }
    }
}

impl AuditPoint {
    /// The Hlc at this point.
    pub fn hlc(self) -> Hlc {
        Hlc::new(self.time, self.origin)
    }
}

/// The half-open range `[lo, hi)` of a scope's audit order; `None` is unbounded on that side.
/// A range with `lo >= hi` is empty.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct AuditRange {
    /// The first point in the range (inclusive); `None` from the beginning.
    pub lo: Option<AuditPoint>,
    /// The first point after the range (exclusive); `None` to the end.
    pub hi: Option<AuditPoint>,
}

impl AuditRange {
    /// The whole scope.
    pub const ALL: AuditRange = AuditRange { lo: None, hi: None };

    /// The whole scope ([`AuditRange::ALL`]).
    pub fn all() -> Self {
        Self::ALL
    }

    /// Whether `point` lies in `[lo, hi)`.
    pub fn contains(&self, point: AuditPoint) -> bool {
        self.lo.is_none_or(|lo| lo <= point) && self.hi.is_none_or(|hi| point < hi)
    }
}

/// A set fingerprint: how many items, and the sum of their [`item_hash`]es modulo 2^128.
///
/// Equal sets give equal fingerprints. Two different sets whose differences are accidental
/// (lost writes, a restore, a bug) have equal fingerprints with probability about 2^-128.
/// The sum is linear, though: whoever can choose the items of a set (a peer forging
/// versions) can craft one with a given fingerprint, so fingerprints find accidental
/// divergence and are no defence against a peer that lies. Fingerprints of disjoint sets
/// [`combine`](Fingerprint::combine) into the fingerprint of their union, which lets a store
/// keep sums over runs of items instead of hashing every item at every audit.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The number of items.
    pub count: u64,
    /// The wrapping sum of the items' hashes.
    pub sum: u128,
}

impl Fingerprint {
    /// The fingerprint of the empty set.
    pub const EMPTY: Fingerprint = Fingerprint { count: 0, sum: 0 };

    /// Adds the item with hash `hash` to the set.
    pub fn add(&mut self, hash: u128) {
        self.count = self.count.wrapping_add(1);
        self.sum = self.sum.wrapping_add(hash);
    }

    /// Removes the item with hash `hash` from the set (which must hold it).
    pub fn remove(&mut self, hash: u128) {
        self.count = self.count.wrapping_sub(1);
        self.sum = self.sum.wrapping_sub(hash);
    }

    /// The fingerprint of the union of two disjoint sets.
    #[must_use]
    pub fn combine(self, other: Fingerprint) -> Fingerprint {
        Fingerprint {
            count: self.count.wrapping_add(other.count),
            sum: self.sum.wrapping_add(other.sum),
        }
    }
}

/// The blake3 key-derivation context of [`item_hash`]. Changing it, or the encoding the hash
/// covers, changes every fingerprint: a new protocol version, and a new store format.
const ITEM_CONTEXT: &str = "highwater 2026-12 audit item v1";

/// A hasher in key-derivation mode for `ITEM_CONTEXT`, made once and cloned per item:
/// blake3's key derivation first hashes the context, and that hash is the same for every
/// item.
static ITEM_HASHER: LazyLock<blake3::Hasher> =
    LazyLock::new(|| blake3::Hasher::new_derive_key(ITEM_CONTEXT));

/// The 128-bit hash of the audit item "`key`'s live version has Hlc `hlc`".
///
/// blake3 in key-derivation mode with the context `"highwater 2026-12 audit item v1"`, over
/// the canonical, self-delimiting encoding `hlc time (u64 LE) | origin (16 bytes,
/// NodeId::to_bytes) | key length (u64 LE) | key bytes`, truncated to its first 16 bytes,
/// read as a little-endian `u128`. Fingerprints travel between nodes, so this value is part
/// of the protocol and never changes for a given item.
pub fn item_hash(key: &Key, hlc: Hlc) -> u128 {
    item_hash_parts(key.as_bytes(), hlc.time(), &hlc.origin().to_bytes())
}

/// [`item_hash`] from a key's bytes and the Hlc's parts, as stores read them from rows.
pub(crate) fn item_hash_parts(key: &[u8], time: u64, origin: &[u8; 16]) -> u128 {
    let mut head = [0u8; 32];
    head[..8].copy_from_slice(&time.to_le_bytes());
    head[8..24].copy_from_slice(origin);
    // A key is at most MAX_KEY_LEN bytes, so its length always fits.
    head[24..].copy_from_slice(&(key.len() as u64).to_le_bytes());
    let mut hasher = ITEM_HASHER.clone();
    hasher.update(&head);
    hasher.update(key);
    let out = hasher.finalize();
    let mut low = [0u8; 16];
    low.copy_from_slice(&out.as_bytes()[..16]);
    u128::from_le_bytes(low)
}

/// Where the exact split of `items` ordered items into `parts` parts cuts: the positions
/// (0-based indexes of the items that start parts 2, 3, ...) `floor(i * items / k)` for
/// `i` in `1..k`, `k = min(parts, items)`. Strictly increasing, never 0, so every part is
/// non-empty. Every store cuts a range it scans here, so their answers agree.
pub(crate) fn split_positions(items: u64, parts: usize) -> impl Iterator<Item = u64> {
    let k = u64::try_from(parts).unwrap_or(u64::MAX).min(items);
    (1..k.max(1)).map(move |i| {
        let at = u128::from(i) * u128::from(items) / u128::from(k);
        u64::try_from(at).expect("below items, a u64")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16]).expect("a non-zero id")
    }

    #[test]
    fn item_hash_is_blake3_derive_key_over_the_documented_encoding() {
        let key = Key::new(b"k".to_vec()).expect("a valid key");
        let hlc = Hlc::new(130, id(0x22));
        let mut material = Vec::new();
        material.extend_from_slice(&130u64.to_le_bytes());
        material.extend_from_slice(&[0x22; 16]);
        material.extend_from_slice(&1u64.to_le_bytes());
        material.extend_from_slice(b"k");
        let full = blake3::derive_key(ITEM_CONTEXT, &material);
        let mut low = [0u8; 16];
        low.copy_from_slice(&full[..16]);
        assert_eq!(item_hash(&key, hlc), u128::from_le_bytes(low));
        // Pinned: fingerprints travel between builds, so the value must never change.
        assert_eq!(
            format!("{:032x}", item_hash(&key, hlc)),
            "4c625b8d8168a834827e707fb182c4d0"
        );
    }

    #[test]
    fn the_encoding_delimits_the_key() {
        // Same bytes overall, split differently between time and key: different items.
        let a = item_hash(
            &Key::new(b"ab".to_vec()).expect("valid"),
            Hlc::new(1, id(1)),
        );
        let b = item_hash(&Key::new(b"a".to_vec()).expect("valid"), Hlc::new(1, id(1)));
        assert_ne!(a, b);
    }

    #[test]
    fn points_order_by_origin_then_time() {
        let early_late_origin = AuditPoint::from(Hlc::new(1, id(2)));
        let late_early_origin = AuditPoint::from(Hlc::new(9, id(1)));
        assert!(late_early_origin < early_late_origin);
        assert_eq!(early_late_origin.hlc(), Hlc::new(1, id(2)));
        let range = AuditRange {
            lo: Some(late_early_origin),
            hi: Some(early_late_origin),
        };
        assert!(range.contains(late_early_origin));
        assert!(!range.contains(early_late_origin));
        assert!(AuditRange::ALL.contains(early_late_origin));
    }

    #[test]
    fn split_positions_cut_into_non_empty_nearly_equal_parts() {
        let cut = |n, p| split_positions(n, p).collect::<Vec<_>>();
        assert_eq!(cut(0, 4), Vec::<u64>::new());
        assert_eq!(cut(1, 4), Vec::<u64>::new());
        assert_eq!(cut(5, 0), Vec::<u64>::new());
        assert_eq!(cut(5, 1), Vec::<u64>::new());
        assert_eq!(cut(3, 4), vec![1, 2]);
        assert_eq!(cut(10, 4), vec![2, 5, 7]);
        let huge: Vec<u64> = split_positions(u64::MAX, usize::MAX).take(2).collect();
        assert_eq!(huge, vec![1, 2], "no overflow");
    }

    #[test]
    fn fingerprints_add_remove_and_combine() {
        let mut f = Fingerprint::EMPTY;
        f.add(u128::MAX);
        f.add(2);
        assert_eq!(f, Fingerprint { count: 2, sum: 1 });
        let mut g = Fingerprint::default();
        g.add(5);
        assert_eq!(f.combine(g), Fingerprint { count: 3, sum: 6 });
        f.remove(u128::MAX);
        assert_eq!(f, Fingerprint { count: 1, sum: 2 });
    }
}
