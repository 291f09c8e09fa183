//! How an audit message's ranges travel: every point as a delta from the point before it,
//! fingerprints with a 64-bit sum.
//!
//! An audit's bytes are almost all ranges: a differing range is answered with [`FANOUT`]
//! parts, each a cut point and a fingerprint, at every level down to the items. Cut points
//! are sorted within a segment and mostly share their origin with the point before them, so
//! a point travels as the time delta from the last point written (any point of the ranges:
//! a segment's start, a part's end, a listed item), with its 16-byte origin only when the
//! origin changes. The layout, as a byte string inside the postcard body (its length as a
//! varint, then):
//!
//! ```text
//! ranges   = segment*                                              up to the string's end
//! segment  = head point(tag: 1 = a scope follows), [scope], parts varint, part*
//! part     = claim, hi point(no tag)
//! claim    = count << 1 | 0 as varint, sum u64 little-endian       a fingerprint
//!          | n << 1 | 1 as varint, item point(no tag) * n           an item list
//! point    = (payload << (2 + t) | kind << t | tag) as varint, [origin 16 bytes]
//!   kind 0: none (unbounded), payload 0
//!   kind 1: the last point's origin, its time plus payload
//!   kind 2: the last point's origin, its time minus payload
//!   kind 3: the origin follows, the time is the payload
//! ```
//!
//! Varints are unsigned LEB128 of up to 128 bits. A segment's scope is written when it is
//! not the previous segment's (a `postcard` string: length, UTF-8). Decoding refuses
//! anything else: a delta with no point before it, a time that overflows, an invalid origin
//! or scope, a tag or payload out of place, a count larger than the bytes left.
//!
//! [`FANOUT`]: super::audit::FANOUT

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hlc::NodeId;
use crate::record::Scope;
use crate::store::AuditPoint;

use super::audit::{Claim, Items, Part, Print, Segment};

const NONE: u128 = 0;
const LATER: u128 = 1;
const EARLIER: u128 = 2;
const ORIGIN: u128 = 3;

/// The claim tag of a fingerprint, and of an item list.
const FINGERPRINT: u128 = 0;
const ITEMS: u128 = 1;

/// The longest varint of a `u128`: 19 groups of 7 bits.
const MAX_VARINT: usize = 19;

/// Encodes `segments` (see the [module docs](self)).
pub fn encode(segments: &[Segment]) -> Vec<u8> {
    let mut w = Writer::default();
    for segment in segments {
        w.segment(segment);
    }
    w.out
}

/// Decodes what [`encode`] wrote.
///
/// # Errors
/// A description of what does not decode.
pub fn decode(bytes: &[u8]) -> Result<Vec<Segment>, &'static str> {
    let mut r = Reader {
        bytes,
        prev: None,
        scope: None,
    };
    let mut out = Vec::new();
    while !r.bytes.is_empty() {
        out.push(r.segment()?);
    }
    Ok(out)
}

#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    prev: Option<AuditPoint>,
    scope: Option<Scope>,
}

impl Writer {
    fn varint(&mut self, mut v: u128) {
        while v >= 0x80 {
            self.out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    /// Writes `point` with `tag` in the low `bits` bits of its head.
    fn point(&mut self, point: Option<AuditPoint>, tag: u128, bits: u32) {
        let Some(p) = point else {
            self.varint(NONE << bits | tag);
            return;
        };
        let (kind, payload, origin) = match self.prev {
            Some(prev) if prev.origin == p.origin && p.time >= prev.time => {
                (LATER, p.time - prev.time, None)
            }
            Some(prev) if prev.origin == p.origin => (EARLIER, prev.time - p.time, None),
            _ => (ORIGIN, p.time, Some(p.origin)),
        };
        self.varint(u128::from(payload) << (2 + bits) | kind << bits | tag);
        if let Some(origin) = origin {
            self.out.extend_from_slice(&origin.to_bytes());
        }
        self.prev = Some(p);
    }

    fn segment(&mut self, segment: &Segment) {
        let new_scope = self.scope.as_ref() != Some(&segment.scope);
        self.point(segment.lo, u128::from(new_scope), 1);
        if new_scope {
            postcard::to_io(&segment.scope, &mut self.out)
                .expect("postcard encoding into a Vec does not fail");
            self.scope = Some(segment.scope.clone());
        }
        self.varint(segment.parts.len() as u128);
        for part in &segment.parts {
            match &part.claim {
                Claim::Fingerprint(print) => {
                    self.varint(u128::from(print.count) << 1 | FINGERPRINT);
                    self.out.extend_from_slice(&print.sum.to_le_bytes());
                }
                Claim::Items(items) => {
                    self.varint((items.0.len() as u128) << 1 | ITEMS);
                    for hlc in &items.0 {
                        self.point(Some(AuditPoint::from(*hlc)), 0, 0);
                    }
                }
            }
            self.point(part.hi, 0, 0);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    prev: Option<AuditPoint>,
    scope: Option<Scope>,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let (head, rest) = self
            .bytes
            .split_first_chunk::<N>()
            .ok_or("ranges end early")?;
        self.bytes = rest;
        Ok(*head)
    }

    fn varint(&mut self) -> Result<u128, &'static str> {
        let mut v = 0u128;
        for i in 0..MAX_VARINT {
            let [b] = self.take::<1>()?;
            let group = u128::from(b & 0x7f);
            // The 19th group holds the top 2 bits of a u128.
            if i == MAX_VARINT - 1 && group > 0b11 {
                return Err("a varint overflows");
            }
            v |= group << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint overflows")
    }

    /// A count of things that each take at least one byte: never more than the bytes left.
    fn count(&mut self) -> Result<usize, &'static str> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or("a count larger than the bytes left")
    }

    /// Reads a point with a tag in the low `bits` bits of its head; returns both.
    fn point(&mut self, bits: u32) -> Result<(Option<AuditPoint>, u128), &'static str> {
        let head = self.varint()?;
        let tag = head & ((1 << bits) - 1);
        let kind = head >> bits & 3;
        let payload = u64::try_from(head >> (bits + 2)).map_err(|_| "a point time overflows")?;
        let point = match kind {
            NONE if payload == 0 => return Ok((None, tag)),
            NONE => return Err("an unbounded point with a time"),
            ORIGIN => {
                let origin = NodeId::from_bytes(self.take::<16>()?).ok_or("an invalid origin")?;
                AuditPoint {
                    origin,
                    time: payload,
                }
            }
            _ => {
                let prev = self.prev.ok_or("a point delta with no point before it")?;
                let time = if kind == LATER {
                    prev.time.checked_add(payload)
                } else {
                    prev.time.checked_sub(payload)
                };
                AuditPoint {
                    origin: prev.origin,
                    time: time.ok_or("a point time overflows")?,
                }
            }
        };
        self.prev = Some(point);
        Ok((Some(point), tag))
    }

    fn segment(&mut self) -> Result<Segment, &'static str> {
        let (lo, new_scope) = self.point(1)?;
        if new_scope == 1 {
            let (scope, rest) =
                postcard::take_from_bytes::<Scope>(self.bytes).map_err(|_| "an invalid scope")?;
            self.bytes = rest;
            self.scope = Some(scope);
        }
        let scope = self.scope.clone().ok_or("a range with no scope")?;
        let n = self.count()?;
        let mut parts = Vec::new();
        for _ in 0..n {
            let claim = self.claim()?;
            let (hi, _) = self.point(0)?;
            parts.push(Part { hi, claim });
        }
        Ok(Segment { scope, lo, parts })
    }

    fn claim(&mut self) -> Result<Claim, &'static str> {
        let head = self.varint()?;
        let n = u64::try_from(head >> 1).map_err(|_| "a count overflows")?;
        if head & 1 == FINGERPRINT {
            let sum = u64::from_le_bytes(self.take::<8>()?);
            return Ok(Claim::Fingerprint(Print { count: n, sum }));
        }
        if usize::try_from(n).map_or(true, |n| n > self.bytes.len()) {
            return Err("a count larger than the bytes left");
        }
        let mut items = Vec::new();
        for _ in 0..n {
            let (point, _) = self.point(0)?;
            let point = point.ok_or("an item with no point")?;
            items.push(point.hlc());
        }
        Ok(Claim::Items(Items(items)))
    }
}

/// Serializes ranges as their [`encode`]d bytes (for `#[serde(with)]`).
///
/// # Errors
/// The serializer's.
pub fn serialize<S: Serializer>(segments: &[Segment], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(&encode(segments))
}

/// Deserializes ranges from their [`encode`]d bytes (for `#[serde(with)]`).
///
/// # Errors
/// The bytes do not [`decode`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Segment>, D::Error> {
    d.deserialize_bytes(RangesVisitor)
}

/// Ranges as a tuple element of a message body: serialized as [`serialize`] does.
pub(crate) struct RangesOut<'a>(pub &'a [Segment]);

impl Serialize for RangesOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize(self.0, s)
    }
}

/// Ranges read as a tuple element of a message body, as [`deserialize`] does.
pub(crate) struct RangesIn(pub Vec<Segment>);

impl<'de> Deserialize<'de> for RangesIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize(d).map(RangesIn)
    }
}

struct RangesVisitor;

impl Visitor<'_> for RangesVisitor {
    type Value = Vec<Segment>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("audit ranges as bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        decode(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16]).expect("not all zero")
    }

    fn at(origin: u8, time: u64) -> Option<AuditPoint> {
        Some(AuditPoint {
            origin: id(origin),
            time,
        })
    }

    fn print(count: u64, sum: u64) -> Claim {
        Claim::Fingerprint(Print { count, sum })
    }

    fn app() -> Scope {
        Scope::app("notes", "items").expect("a valid scope")
    }

    #[test]
    fn ranges_round_trip_across_origins_scopes_and_unbounded_ends() {
        let segments = vec![
            Segment {
                scope: Scope::shared(),
                lo: None,
                parts: vec![
                    Part {
                        hi: at(1, 1 << 40),
                        claim: print(3, u64::MAX),
                    },
                    Part {
                        hi: at(2, 5),
                        claim: Claim::Items(Items(vec![
                            Hlc::new(1 << 40, id(1)),
                            Hlc::new(u64::MAX, id(1)),
                            Hlc::new(0, id(2)),
                        ])),
                    },
                    Part {
                        hi: None,
                        claim: print(0, 0),
                    },
                ],
            },
            // Same scope, a point before the last one, no parts.
            Segment {
                scope: Scope::shared(),
                lo: at(2, 1),
                parts: Vec::new(),
            },
            Segment {
                scope: app(),
                lo: at(2, 7),
                parts: vec![Part {
                    hi: at(2, 9),
                    claim: Claim::Items(Items::default()),
                }],
            },
        ];
        let bytes = encode(&segments);
        assert_eq!(decode(&bytes), Ok(segments));
        assert_eq!(decode(&encode(&[])), Ok(Vec::new()));
    }

    #[test]
    fn a_part_of_the_same_origin_costs_its_delta_count_and_sum() {
        // 16 parts of 1 000 items each, a second apart: what a split of one origin sends.
        let second = 1u64 << 32;
        let parts: Vec<Part> = (1..=16)
            .map(|i| Part {
                hi: at(1, (1 << 62) + i * second),
                claim: print(1000, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            })
            .collect();
        let segment = Segment {
            scope: Scope::shared(),
            lo: at(1, 1 << 62),
            parts,
        };
        let bytes = encode(&[segment]);
        // Per part: the count's head (2 bytes), the sum (8), the delta's head (5).
        assert!(
            bytes.len() <= 1 + 28 + 7 + 1 + 16 * 15,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        let good = encode(&[Segment {
            scope: Scope::shared(),
            lo: at(1, 10),
            parts: vec![Part {
                hi: at(1, 20),
                claim: print(1, 2),
            }],
        }]);
        let refused = |bytes: &[u8], why: &str| assert_eq!(decode(bytes), Err(why), "{bytes:x?}");
        refused(&good[..good.len() - 1], "ranges end early");
        // A second segment cut short.
        refused(&[good.clone(), vec![0]].concat(), "ranges end early");
        // A segment whose lo is a delta with nothing before it.
        refused(
            &[(LATER << 1) as u8],
            "a point delta with no point before it",
        );
        // A segment whose lo is unbounded but carries a time.
        refused(&[1 << 3], "an unbounded point with a time");
        // A part count far beyond the bytes.
        refused(
            &[&good[..24], &[0xff, 0x7f]].concat(),
            "a count larger than the bytes left",
        );
        // A new origin of all zero bytes.
        refused(
            &[&[(ORIGIN << 1) as u8][..], &[0; 16]].concat(),
            "an invalid origin",
        );
        // A segment with no scope before it.
        refused(&[0, 0], "a range with no scope");
        // An earlier time below zero.
        let mut under = vec![(ORIGIN << 1 | 1) as u8];
        under.extend_from_slice(&[1; 16]);
        under.extend_from_slice(&[6, b's', b'h', b'a', b'r', b'e', b'd']);
        under.extend_from_slice(&[1, 0]);
        under.extend_from_slice(&[0; 8]);
        under.extend_from_slice(&[(1 << 2 | EARLIER) as u8]);
        refused(&under, "a point time overflows");
        // A varint longer than 128 bits.
        refused(&[0xff; 20], "a varint overflows");
        assert_eq!(decode(&[]), Ok(Vec::new()));
    }
}
