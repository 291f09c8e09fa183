//! The audit round's steps: range-based set reconciliation of two replicas' live contents.
//!
//! Watermarks say what a replica *should* hold; an audit checks what it *does* hold. Per
//! scope, each side's set is its live versions, identified by their Hlc and ordered by
//! `(origin, time)` ([`crate::store::AuditPoint`]); a range's [`Fingerprint`] is its item
//! count and the sum of its items' hashes, which the stores keep up to date.
//!
//! The initiator opens with one fingerprint per scope in play. The answering side compares
//! every range it is told about with its own fingerprint of the same range: equal ranges are
//! done; a differing range with few items on the answering side is answered with those items
//! (their Hlcs); a larger one is split into [`FANOUT`] parts at the answering side's items,
//! each sent with its fingerprint, and the other side does the same with those parts. A side
//! that is told another's items knows both sides of that range: it ships the versions the
//! other lacks and asks for the ones it lacks. Both sides apply what they receive by
//! last-write-wins and move no watermark: an audit repairs what the marks promise, and a
//! second audit finds nothing.
//!
//! The responder keeps no state between messages: every message carries the ranges still
//! open. Equal replicas settle in one round trip of a few dozen bytes per scope; `d`
//! differences among `n` items take about `log16(n / 32)` round trips and O(d log n) bytes.
//!
//! Over 600 lines with its tests: the audit's messages and the two sides' steps (`Auditor`,
//! `answer`) share the range and claim types and are one protocol.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::StoreError;
use crate::hlc::{Hlc, NodeId};
use crate::record::{Key, Scope, ScopeFilter, Version};
use crate::store::{AuditPoint, AuditRange, Fingerprint, StoreRead};

use super::Halt;

/// Parts a differing range is split into.
pub const FANOUT: usize = 16;
/// A differing range with at most this many items on the answering side is answered with
/// its items.
pub const ITEMS_AT: u64 = 32;
/// The most items listed for one range told as items: a side that holds more there lists
/// these, and reopens the rest of the range with its fingerprint.
pub const LIST_LIMIT: usize = 1024;
/// The most versions one audit message ships; the rest follow in later messages.
pub const MAX_VERSIONS: usize = 1000;
/// The most range parts an initiator's message carries; the rest follow in later messages.
/// Each part is answered with at most [`FANOUT`] parts, so a response carries at most
/// `MAX_PARTS * FANOUT` (and a responder never has to hold any back).
pub const MAX_PARTS: usize = 1024;

/// What one side says of a range of a scope's live items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The sender's fingerprint of the range.
    Fingerprint(Print),
    /// Every item the sender holds in the range.
    Items(Items),
}

/// A [`Fingerprint`] as audit messages carry it: the item count and the low 64 bits of the
/// sum. Two sets that differ by accident have equal prints with probability about 2^-64
/// (docs/protocol.md, "What is compared").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Print {
    /// The number of items.
    pub count: u64,
    /// The sum of the items' hashes, modulo 2^64.
    pub sum: u64,
}

impl From<Fingerprint> for Print {
    fn from(f: Fingerprint) -> Print {
        Print {
            count: f.count,
            // IMPORTANT: the low 64 bits of a sum modulo 2^128 are the sum modulo 2^64.
            sum: f.sum as u64,
        }
    }
}

/// Items of a range, by their Hlcs, in `(origin, time)` order. Encoded grouped by origin,
/// with time deltas (inside ranges, as points: see [`super::ranges`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Items(pub Vec<Hlc>);

/// Consecutive parts of one scope's audit order: the first starts at `lo`, each ends where
/// the next starts, at its `hi`. Travels as [`super::ranges`] has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The scope.
    pub scope: Scope,
    /// Where the first part starts (`None`: at the beginning).
    pub lo: Option<AuditPoint>,
    /// The parts, in order.
    pub parts: Vec<Part>,
}

/// One range of a [`Segment`] and what the sender says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Where the range ends, exclusive (`None`: at the end).
    pub hi: Option<AuditPoint>,
    /// What the sender says of it.
    pub claim: Claim,
}

/// Versions shipped by an audit, by scope. Applied by last-write-wins; no mark moves.
pub type Shipment = Vec<(Scope, Vec<(Key, Version)>)>;

/// Every version of a shipment with its scope and key.
pub fn shipped(shipment: &Shipment) -> impl Iterator<Item = (&Scope, &Key, &Version)> {
    shipment
        .iter()
        .flat_map(|(scope, vs)| vs.iter().map(move |(k, v)| (scope, k, v)))
}

/// Items wanted from the other side, by scope.
pub type Wanted = Vec<(Scope, Items)>;

/// The initiator's message of an audit round (kind 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRequest {
    /// The initiator.
    pub from: NodeId,
    /// The scopes in play.
    pub scopes: ScopeFilter,
    /// The audit's first message: the responder also answers with its roots for the scopes
    /// in play that hold items there and that no segment names (scopes the initiator does
    /// not hold).
    pub opening: bool,
    /// Ranges still open, as the initiator sees them.
    #[serde(with = "super::ranges")]
    pub segments: Vec<Segment>,
    /// Versions the responder lacks.
    pub versions: Shipment,
    /// Versions the initiator lacks, by Hlc.
    pub wanted: Wanted,
    /// What version 2 adds (empty: the message is version 1, byte for byte).
    pub ext: AuditExt,
}

/// What an audit message carries beyond version 1 (see docs/protocol.md, "Versioning").
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AuditExt {
    /// The sender's purge floors in play. An initiator sends them with every request
    /// (`Some`, even empty), which also says it reads version 2 answers: a response can
    /// report refusals only to such a request.
    pub floors: Option<Vec<(Scope, u64)>>,
    /// Versions of the other side's last message that the sender refused below its purge
    /// floor (their keys' deletes were purged there): the receiver drops them if they are
    /// still its stored versions and older than its retention (as for an exchange's
    /// [`crate::exchange::ResponseExt::refused`]).
    pub refused: Vec<(Scope, Key, Hlc)>,
}

impl AuditExt {
    /// Whether nothing here needs version 2.
    pub fn is_empty(&self) -> bool {
        *self == AuditExt::default()
    }
}

/// The responder's message of an audit round (kind 4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditResponse {
    /// The responder.
    pub from: NodeId,
    /// Ranges still open, as the responder sees them.
    #[serde(with = "super::ranges")]
    pub segments: Vec<Segment>,
    /// Versions the initiator lacks.
    pub versions: Shipment,
    /// Versions the responder lacks, by Hlc.
    pub wanted: Wanted,
    /// Versions the initiator lacks that did not fit this message: the initiator asks for
    /// them in its next one.
    pub offered: Wanted,
    /// Versions of the request the responder refused, by stream and reason (clock skew,
    /// its own id).
    pub halts: Vec<Halt>,
    /// What version 2 adds (empty: the message is version 1, byte for byte).
    pub ext: AuditExt,
}

impl AuditRequest {
    /// Whether the message carries nothing to answer: no open range, version or want.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.versions.is_empty() && self.wanted.is_empty()
    }
}

impl AuditResponse {
    /// Whether the message leaves nothing open: no range, version, want or offer.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
            && self.versions.is_empty()
            && self.wanted.is_empty()
            && self.offered.is_empty()
    }
}

/// The initiator's side of an audit, between its messages. The driver applies the versions
/// each response carries (by last-write-wins, no mark moves) before [`Auditor::receive`].
#[derive(Debug)]
pub struct Auditor {
    me: NodeId,
    scopes: ScopeFilter,
    /// Ranges to tell the responder about.
    pending: Vec<Segment>,
    /// Our items the responder lacks, not shipped yet.
    ship: Vec<(Scope, Hlc)>,
    /// Its items we lack, not asked for yet.
    want: Vec<(Scope, Hlc)>,
    /// Items asked for in the last request.
    asked: Vec<(Scope, Hlc)>,
    /// Requests sent.
    rounds: usize,
}

impl Auditor {
    /// Opens an audit of the scopes `local` holds among `scopes` (in play), from one
    /// snapshot of our store.
    ///
    /// # Errors
    /// A store read failure.
    pub fn start(
        me: NodeId,
        read: &dyn StoreRead,
        scopes: &ScopeFilter,
        local: &[Scope],
    ) -> Result<Auditor, StoreError> {
        let in_play: Vec<Scope> = local
            .iter()
            .filter(|s| scopes.contains(s))
            .cloned()
            .collect();
        Ok(Auditor {
            me,
            scopes: scopes.clone(),
            pending: open(read, &in_play)?,
            ship: Vec::new(),
            want: Vec::new(),
            asked: Vec::new(),
            rounds: 0,
        })
    }

    /// The next request, or `None` when nothing is left open: ranges (at most
    /// [`MAX_PARTS`]), the versions the responder lacks (at most [`MAX_VERSIONS`]) and the
    /// items we lack. The first request is always sent (it carries the roots).
    ///
    /// Versions are shipped only once no range is open and nothing is asked for: until then
    /// the versions we receive may replace ones we would ship. A key updated on the other
    /// side shows on each side as an item the other lacks (our replaced version, its new
    /// one), found in different ranges at different times; once its version has replaced
    /// ours, ours is no longer live and is not shipped (see [`collect`]).
    ///
    /// # Errors
    /// A store read failure.
    pub fn request(&mut self, read: &dyn StoreRead) -> Result<Option<AuditRequest>, StoreError> {
        let versions = if self.want.is_empty() && self.pending.is_empty() {
            let (versions, rest) = collect(read, std::mem::take(&mut self.ship), MAX_VERSIONS)?;
            self.ship = rest;
            versions
        } else {
            Vec::new()
        };
        // Nothing shipped with nothing asked means nothing is left to ship.
        if self.rounds > 0 && self.pending.is_empty() && versions.is_empty() && self.want.is_empty()
        {
            return Ok(None);
        }
        self.rounds += 1;
        self.asked = std::mem::take(&mut self.want);
        Ok(Some(AuditRequest {
            from: self.me,
            scopes: self.scopes.clone(),
            opening: self.rounds == 1,
            segments: take_parts(&mut self.pending, MAX_PARTS),
            versions,
            wanted: group(self.asked.iter().cloned()),
            ext: AuditExt::default(),
        }))
    }

    /// Takes in a response whose versions the driver applied: answers its ranges from our
    /// store (after the apply), queues what the responder wants, offers or failed to send.
    ///
    /// # Errors
    /// A store read failure.
    pub fn receive(
        &mut self,
        read: &dyn StoreRead,
        response: &AuditResponse,
    ) -> Result<(), StoreError> {
        let scopes = self.scopes.clone();
        let answered = answer(read, &response.segments, &|s| scopes.contains(s))?;
        self.pending.extend(answered.segments);
        self.ship.extend(answered.ship);
        self.ship.extend(flatten(&response.wanted));
        self.want.extend(answered.want);
        self.want.extend(flatten(&response.offered));
        // Asked-for versions that did not come: re-ask while the response was full (they
        // did not fit); otherwise they are no longer live there (a newer version of their
        // key replaced them, which the next fingerprints show).
        let delivered: usize = response.versions.iter().map(|(_, v)| v.len()).sum();
        if delivered >= MAX_VERSIONS {
            let got: BTreeSet<Hlc> = response
                .versions
                .iter()
                .flat_map(|(_, vs)| vs.iter().map(|(_, v)| v.hlc))
                .collect();
            self.want
                .extend(self.asked.drain(..).filter(|(_, h)| !got.contains(h)));
        }
        self.asked.clear();
        Ok(())
    }

    /// Requests sent so far.
    pub fn rounds(&self) -> usize {
        self.rounds
    }
}

/// The responder's answer to an audit request, from one snapshot of its store taken after
/// it applied the request's versions: its view of the open ranges, the versions the
/// initiator asked for or lacks (at most [`MAX_VERSIONS`]; the rest offered), and what it
/// lacks. `in_play` says which scopes it may answer for; `halts` are the request's refused
/// versions.
///
/// # Errors
/// A store read failure.
pub fn respond(
    me: NodeId,
    read: &dyn StoreRead,
    request: &AuditRequest,
    in_play: &dyn Fn(&Scope) -> bool,
    halts: Vec<Halt>,
) -> Result<AuditResponse, StoreError> {
    let mut answered = answer(read, &request.segments, in_play)?;
    if request.opening {
        let named: BTreeSet<&Scope> = request.segments.iter().map(|s| &s.scope).collect();
        let unnamed: Vec<Scope> = read
            .scopes()?
            .into_iter()
            .filter(|s| in_play(s) && !named.contains(s))
            .collect();
        answered.segments.extend(
            open(read, &unnamed)?
                .into_iter()
                .filter(|s| !matches!(&s.parts[..], [Part { claim: Claim::Fingerprint(f), .. }] if f.count == 0)),
        );
    }
    let asked = flatten(&request.wanted).filter(|(s, _)| in_play(s));
    let (versions, rest) = collect(read, asked.chain(answered.ship).collect(), MAX_VERSIONS)?;
    Ok(AuditResponse {
        from: me,
        segments: answered.segments,
        versions,
        wanted: group(answered.want),
        offered: group(rest),
        halts,
        ext: AuditExt::default(),
    })
}

fn flatten(items: &Wanted) -> impl Iterator<Item = (Scope, Hlc)> + '_ {
    items
        .iter()
        .flat_map(|(scope, items)| items.0.iter().map(move |h| (scope.clone(), *h)))
}

/// What answering the other side's ranges gives: the ranges to tell it about, the items it
/// lacks (to ship), and the items we lack (to ask for).
#[derive(Debug, Default)]
pub struct Answered {
    /// Ranges still open, as we see them.
    pub segments: Vec<Segment>,
    /// Our items the other side lacks.
    pub ship: Vec<(Scope, Hlc)>,
    /// Its items we lack.
    pub want: Vec<(Scope, Hlc)>,
}

/// The root of each scope in `scopes`: one range over the whole scope, with our fingerprint.
///
/// # Errors
/// A store read failure.
pub fn open(read: &dyn StoreRead, scopes: &[Scope]) -> Result<Vec<Segment>, StoreError> {
    scopes
        .iter()
        .map(|scope| {
            let fingerprint = read.fingerprint(scope, &AuditRange::ALL)?;
            Ok(Segment {
                scope: scope.clone(),
                lo: None,
                parts: vec![Part {
                    hi: None,
                    claim: Claim::Fingerprint(fingerprint.into()),
                }],
            })
        })
        .collect()
}

/// Answers the other side's `segments` from our store: for every range it told us about,
/// compares, splits or lists (see the [module docs](self)). `in_play` says which scopes we
/// may answer for; ranges of other scopes are ignored.
///
/// # Errors
/// A store read failure.
pub fn answer(
    read: &dyn StoreRead,
    segments: &[Segment],
    in_play: &dyn Fn(&Scope) -> bool,
) -> Result<Answered, StoreError> {
    let mut out = Answered::default();
    for segment in segments.iter().filter(|s| in_play(&s.scope)) {
        let mut lo = segment.lo;
        for part in &segment.parts {
            let range = AuditRange { lo, hi: part.hi };
            answer_part(read, &segment.scope, range, &part.claim, &mut out)?;
            lo = part.hi;
            if lo.is_none() {
                break;
            }
        }
    }
    Ok(out)
}

fn answer_part(
    read: &dyn StoreRead,
    scope: &Scope,
    range: AuditRange,
    claim: &Claim,
    out: &mut Answered,
) -> Result<(), StoreError> {
    if empty(&range) {
        return Ok(());
    }
    match claim {
        Claim::Fingerprint(theirs) => {
            let mine = read.fingerprint(scope, &range)?;
            if Print::from(mine) == *theirs {
                return Ok(());
            }
            if mine.count <= ITEMS_AT {
                let items = read.audit_items(scope, &range, LIST_LIMIT)?;
                let items = Items(items.into_iter().map(|(h, _)| h).collect());
                out.segments
                    .push(one_part(scope, range, Claim::Items(items)));
            } else {
                out.segments.push(split(read, scope, range)?);
            }
        }
        Claim::Items(theirs) => compare_items(read, scope, range, theirs, out)?,
    }
    Ok(())
}

/// Both sides of `range` are known: ship what they lack, want what we lack. If we hold more
/// than [`LIST_LIMIT`] items there, the rest of the range is reopened with our fingerprint.
fn compare_items(
    read: &dyn StoreRead,
    scope: &Scope,
    range: AuditRange,
    theirs: &Items,
    out: &mut Answered,
) -> Result<(), StoreError> {
    let mine = read.audit_items(scope, &range, LIST_LIMIT)?;
    // Where our listing stops, if it was cut: items from there on are decided next time.
    let cut = (mine.len() == LIST_LIMIT)
        .then(|| mine.last().map(|(h, _)| next_point(AuditPoint::from(*h))))
        .flatten();
    let decided = |h: &Hlc| cut.is_none_or(|c| AuditPoint::from(*h) < c);
    let mine_set: BTreeSet<Hlc> = mine.iter().map(|(h, _)| *h).collect();
    let theirs_set: BTreeSet<Hlc> = theirs
        .0
        .iter()
        .copied()
        .filter(|h| range.contains(AuditPoint::from(*h)))
        .collect();
    out.ship.extend(
        mine_set
            .difference(&theirs_set)
            .map(|h| (scope.clone(), *h)),
    );
    out.want.extend(
        theirs_set
            .difference(&mine_set)
            .filter(|h| decided(h))
            .map(|h| (scope.clone(), *h)),
    );
    if let Some(cut) = cut {
        let rest = AuditRange {
            lo: Some(cut),
            hi: range.hi,
        };
        let fingerprint = read.fingerprint(scope, &rest)?;
        out.segments.push(one_part(
            scope,
            rest,
            Claim::Fingerprint(fingerprint.into()),
        ));
    }
    Ok(())
}

/// `range` cut at our items into up to [`FANOUT`] parts, each with our fingerprint.
fn split(read: &dyn StoreRead, scope: &Scope, range: AuditRange) -> Result<Segment, StoreError> {
    let points = read.audit_split(scope, &range, FANOUT)?;
    let mut parts = Vec::with_capacity(points.len() + 1);
    let mut lo = range.lo;
    for hi in points.into_iter().map(Some).chain([range.hi]) {
        let fingerprint = read.fingerprint(scope, &AuditRange { lo, hi })?;
        parts.push(Part {
            hi,
            claim: Claim::Fingerprint(fingerprint.into()),
        });
        lo = hi;
    }
    Ok(Segment {
        scope: scope.clone(),
        lo: range.lo,
        parts,
    })
}

fn one_part(scope: &Scope, range: AuditRange, claim: Claim) -> Segment {
    Segment {
        scope: scope.clone(),
        lo: range.lo,
        parts: vec![Part {
            hi: range.hi,
            claim,
        }],
    }
}

fn empty(range: &AuditRange) -> bool {
    matches!((range.lo, range.hi), (Some(lo), Some(hi)) if lo >= hi)
}

/// The point just after `p` in the audit order.
fn next_point(p: AuditPoint) -> AuditPoint {
    match p.time.checked_add(1) {
        Some(time) => AuditPoint { time, ..p },
        // The last time of an origin: the next point is the next origin's first.
        None => AuditPoint {
            origin: next_origin(p.origin),
            time: 0,
        },
    }
}

fn next_origin(origin: NodeId) -> NodeId {
    let mut bytes = origin.to_bytes();
    for b in bytes.iter_mut().rev() {
        let (v, carry) = b.overflowing_add(1);
        *b = v;
        if !carry {
            break;
        }
    }
    NodeId::from_bytes(bytes).unwrap_or(origin)
}

/// Takes at most `max` parts off the front of `pending`, splitting a segment if needed; the
/// rest stays in `pending` for later messages.
pub fn take_parts(pending: &mut Vec<Segment>, max: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut room = max;
    while room > 0 && !pending.is_empty() {
        let segment = &mut pending[0];
        if segment.parts.len() <= room {
            room -= segment.parts.len();
            out.push(pending.remove(0));
        } else {
            let rest = segment.parts.split_off(room);
            let head = Segment {
                scope: segment.scope.clone(),
                lo: segment.lo,
                parts: std::mem::replace(&mut segment.parts, rest),
            };
            segment.lo = head.parts.last().and_then(|p| p.hi);
            out.push(head);
            room = 0;
        }
    }
    out
}

/// Groups `(scope, hlc)` pairs by scope, Hlcs in `(origin, time)` order.
pub fn group(items: impl IntoIterator<Item = (Scope, Hlc)>) -> Wanted {
    let mut by_scope: BTreeMap<Scope, Vec<Hlc>> = BTreeMap::new();
    for (scope, hlc) in items {
        by_scope.entry(scope).or_default().push(hlc);
    }
    by_scope
        .into_iter()
        .map(|(scope, mut hlcs)| {
            hlcs.sort_by_key(|h| AuditPoint::from(*h));
            hlcs.dedup();
            (scope, Items(hlcs))
        })
        .collect()
}

/// The live versions of `items` that `read` holds (items no longer live are skipped: a newer
/// version of their key replaced them, and shows in the next fingerprints), at most `max`;
/// returns the shipment and the items left over.
///
/// # Errors
/// A store read failure.
pub fn collect(
    read: &dyn StoreRead,
    items: Vec<(Scope, Hlc)>,
    max: usize,
) -> Result<(Shipment, Vec<(Scope, Hlc)>), StoreError> {
    let mut by_scope: BTreeMap<Scope, Vec<(Key, Version)>> = BTreeMap::new();
    let mut taken = 0;
    let mut rest = Vec::new();
    for (scope, hlc) in items {
        if taken >= max {
            rest.push((scope, hlc));
            continue;
        }
        if let Some((key, version)) = read.version_at(&scope, hlc)? {
            by_scope.entry(scope).or_default().push((key, version));
            taken += 1;
        }
    }
    Ok((by_scope.into_iter().collect(), rest))
}

// Items travel grouped by origin, each origin's times as deltas: a range of one origin costs
// 16 bytes plus a varint per item, not 24 bytes per item.
impl Serialize for Items {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut groups: Vec<(NodeId, Vec<u64>)> = Vec::new();
        let mut prev = 0u64;
        for h in &self.0 {
            match groups.last_mut() {
                Some((origin, deltas)) if *origin == h.origin() => {
                    deltas.push(h.time().wrapping_sub(prev));
                }
                _ => groups.push((h.origin(), vec![h.time()])),
            }
            prev = h.time();
        }
        groups.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let groups = <Vec<(NodeId, Vec<u64>)>>::deserialize(d)?;
        let mut out = Vec::new();
        for (origin, deltas) in groups {
            let mut time = 0u64;
            for (i, delta) in deltas.into_iter().enumerate() {
                time = if i == 0 {
                    delta
                } else {
                    time.checked_add(delta)
                        .ok_or_else(|| serde::de::Error::custom("item time overflows"))?
                };
                out.push(Hlc::new(time, origin));
            }
        }
        Ok(Items(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16]).expect("not all zero")
    }

    #[test]
    fn items_round_trip_grouped_by_origin() {
        let items = Items(vec![
            Hlc::new(5, id(1)),
            Hlc::new(9, id(1)),
            Hlc::new(2, id(2)),
            Hlc::new(u64::MAX, id(2)),
        ]);
        let bytes = postcard::to_allocvec(&items).expect("encodes");
        let back: Items = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back, items);
        // Two groups: origin, count, first time, deltas.
        assert!(bytes.len() < 4 * 24, "{} bytes", bytes.len());
    }

    #[test]
    fn take_parts_splits_a_segment_and_keeps_its_bounds() {
        let p = |t: u64| {
            Some(AuditPoint {
                origin: id(1),
                time: t,
            })
        };
        let part = |hi| Part {
            hi,
            claim: Claim::Items(Items::default()),
        };
        let mut pending = vec![Segment {
            scope: Scope::shared(),
            lo: p(1),
            parts: vec![part(p(3)), part(p(5)), part(None)],
        }];
        let first = take_parts(&mut pending, 2);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].lo, first[0].parts.len()), (p(1), 2));
        assert_eq!((pending[0].lo, pending[0].parts.len()), (p(5), 1));
        assert_eq!(take_parts(&mut pending, 10).len(), 1);
        assert!(pending.is_empty());
    }

    #[test]
    fn next_point_carries_into_the_next_origin() {
        let last = AuditPoint {
            origin: id(1),
            time: u64::MAX,
        };
        let next = next_point(last);
        assert!(next > last);
        assert_eq!(next.time, 0);
    }
}
