//! The audit reads: fingerprints summed from the audit chunks, splits located by the chunks'
//! counts, and the items of a range, over `versions-v2` and `audit-chunks-v1`.
//!
//! A range of a scope is read as segments: the chunks wholly inside it, whose fingerprints
//! and counts are used as stored, and at most two chunks cut by its ends, whose versions
//! inside the range are read (at most `B` versions each). A whole-scope fingerprint reads
//! one row per chunk and hashes nothing.

use redb::ReadableTable;

use super::tables::{
    decode_chunk, decode_point, decode_row, live_key, origin_key, scope_prefix, split_row, Chunk,
};
use crate::error::StoreError;
use crate::hlc::Hlc;
use crate::record::{Key, Scope, Version};
use crate::store::audit::{item_hash_parts, split_positions, AuditPoint, AuditRange, Fingerprint};

type Bytes = &'static [u8];

/// A range's keys in a `scope | origin | time BE` table.
struct Window {
    range: AuditRange,
    /// The scope prefix: every key of the scope starts with it.
    prefix: Vec<u8>,
    /// The first key in the range (the scope prefix itself when unbounded).
    lo: Vec<u8>,
    /// The first key after the range; `None`: the scope's end.
    hi: Option<Vec<u8>>,
}

impl Window {
    /// `None` for an empty range.
    fn new(scope: &Scope, range: &AuditRange) -> Option<Window> {
        if let (Some(lo), Some(hi)) = (range.lo, range.hi) {
            if lo >= hi {
                return None;
            }
        }
        let prefix = scope_prefix(scope);
        let key = |p: AuditPoint| live_key(scope, p.origin, p.time);
        Some(Window {
            range: *range,
            lo: range.lo.map_or_else(|| prefix.clone(), key),
            hi: range.hi.map(key),
            prefix,
        })
    }

    /// The rows of `table` from the key `from` (at least `self.lo`) to the range's end.
    fn rows<'t, T: ReadableTable<Bytes, Bytes>>(
        &self,
        table: &'t T,
        from: &[u8],
    ) -> Result<redb::Range<'t, Bytes, Bytes>, StoreError> {
        Ok(match &self.hi {
            Some(hi) => table.range::<&[u8]>(from..hi.as_slice())?,
            None => table.range::<&[u8]>(from..)?,
        })
    }
}

/// A part of a range: a chunk wholly inside it, or the versions from a key on (up to the
/// point `upto`, inclusive, if given) that lie in the range.
enum Segment {
    Whole(AuditPoint, Chunk),
    Cut {
        from: Vec<u8>,
        upto: Option<AuditPoint>,
    },
}

/// Visits the range's segments in order, until `visit` returns `false`.
fn segments(
    chunks: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    w: &Window,
    mut visit: impl FnMut(Segment) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    // The chunk holding `lo`, if `lo` falls after its first version.
    if let Some(lo) = w.range.lo {
        let origin = origin_key(scope, lo.origin);
        let row = chunks
            .range::<&[u8]>(origin.as_slice()..w.lo.as_slice())?
            .next_back();
        if let Some(row) = row {
            let (k, v) = row?;
            let chunk = decode_chunk(k.value(), v.value())?;
            if chunk.last >= lo.time {
                let go_on = visit(Segment::Cut {
                    from: w.lo.clone(),
                    upto: Some(AuditPoint {
                        origin: lo.origin,
                        time: chunk.last,
                    }),
                })?;
                if !go_on {
                    return Ok(());
                }
            }
        }
    }
    for row in w.rows(chunks, &w.lo)? {
        let (k, v) = row?;
        let k = k.value();
        if !k.starts_with(&w.prefix) {
            break;
        }
        let first = decode_point(k, w.prefix.len(), "audit chunk")?;
        let chunk = decode_chunk(k, v.value())?;
        let last = AuditPoint {
            origin: first.origin,
            time: chunk.last,
        };
        if w.range.hi.is_none_or(|hi| last < hi) {
            if !visit(Segment::Whole(first, chunk))? {
                break;
            }
        } else {
            // The chunk holding `hi`: the chunks after it start after `hi`.
            visit(Segment::Cut {
                from: k.to_vec(),
                upto: None,
            })?;
            break;
        }
    }
    Ok(())
}

/// Calls `each` with the point and key bytes of the range's versions from the key `from`
/// on, up to `upto` (inclusive) if given, until it returns `false`.
fn each_item(
    versions: &impl ReadableTable<Bytes, Bytes>,
    w: &Window,
    from: &[u8],
    upto: Option<AuditPoint>,
    mut each: impl FnMut(AuditPoint, &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    for row in w.rows(versions, from)? {
        let (k, v) = row?;
        let k = k.value();
        if !k.starts_with(&w.prefix) {
            break;
        }
        let point = decode_point(k, w.prefix.len(), "version")?;
        if upto.is_some_and(|u| point > u) {
            break;
        }
        let (key, _) = split_row(v.value())?;
        if !each(point, key)? {
            break;
        }
    }
    Ok(())
}

fn hash(point: AuditPoint, key: &[u8]) -> u128 {
    item_hash_parts(key, point.time, &point.origin.to_bytes())
}

/// The fingerprint of the range: the stored sums of the chunks inside it, plus the versions
/// of the chunks its ends cut, hashed.
pub(super) fn fingerprint(
    versions: &impl ReadableTable<Bytes, Bytes>,
    chunks: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    range: &AuditRange,
) -> Result<Fingerprint, StoreError> {
    let Some(w) = Window::new(scope, range) else {
        return Ok(Fingerprint::EMPTY);
    };
    let mut fp = Fingerprint::EMPTY;
    segments(chunks, scope, &w, |segment| match segment {
        Segment::Whole(_, chunk) => {
            fp = fp.combine(chunk.fp);
            Ok(true)
        }
        Segment::Cut { from, upto } => {
            each_item(versions, &w, &from, upto, |point, key| {
                fp.add(hash(point, key));
                Ok(true)
            })?;
            Ok(true)
        }
    })?;
    Ok(fp)
}

/// How many versions the range holds, counting up to `cap`: the chunks' stored counts,
/// plus the versions of the (at most two) chunks its ends cut. Costs one row per chunk
/// counted and at most a chunk's versions per end: about `min(n, cap) / B + 2 B` rows.
pub(super) fn count(
    versions: &impl ReadableTable<Bytes, Bytes>,
    chunks: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    range: &AuditRange,
    cap: u64,
) -> Result<u64, StoreError> {
    let Some(w) = Window::new(scope, range) else {
        return Ok(0);
    };
    let mut n = 0u64;
    if cap == 0 {
        return Ok(0);
    }
    segments(chunks, scope, &w, |segment| {
        match segment {
            Segment::Whole(_, chunk) => n = n.saturating_add(chunk.fp.count),
            Segment::Cut { from, upto } => each_item(versions, &w, &from, upto, |_, _| {
                n += 1;
                Ok(n < cap)
            })?,
        }
        Ok(n < cap)
    })?;
    Ok(n.min(cap))
}

/// The live versions of the range, at most `limit`, in order.
pub(super) fn items(
    versions: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    range: &AuditRange,
    limit: usize,
) -> Result<Vec<(Hlc, Key)>, StoreError> {
    let mut out = Vec::new();
    let Some(w) = Window::new(scope, range) else {
        return Ok(out);
    };
    if limit == 0 {
        return Ok(out);
    }
    each_item(versions, &w, &w.lo, None, |point, key| {
        let key = Key::new(key).map_err(|_| StoreError::Corrupt { what: "version" })?;
        out.push((point.hlc(), key));
        Ok(out.len() < limit)
    })?;
    Ok(out)
}

/// Points cutting the range into `parts` non-empty parts, exactly where the model cuts
/// ([`split_positions`]): the chunks' counts locate each cut, and only the chunks holding a
/// cut are read, up to it. A split costs one row per chunk in the range and at most a
/// chunk's versions per cut.
pub(super) fn split(
    versions: &impl ReadableTable<Bytes, Bytes>,
    chunks: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    range: &AuditRange,
    parts: usize,
) -> Result<Vec<AuditPoint>, StoreError> {
    let Some(w) = Window::new(scope, range) else {
        return Ok(Vec::new());
    };
    if parts <= 1 {
        return Ok(Vec::new());
    }
    // The range's segments in order, each with its number of versions.
    let mut counted: Vec<(Segment, u64)> = Vec::new();
    segments(chunks, scope, &w, |segment| {
        let count = match &segment {
            Segment::Whole(_, chunk) => chunk.fp.count,
            Segment::Cut { from, upto, .. } => {
                let mut count = 0u64;
                each_item(versions, &w, from, *upto, |_, _| {
                    count += 1;
                    Ok(true)
                })?;
                count
            }
        };
        counted.push((segment, count));
        Ok(true)
    })?;
    let items = counted.iter().map(|(_, n)| n).sum();
    let mut cuts = split_positions(items, parts).peekable();
    let mut out = Vec::new();
    // The position of the segment's first version in the range.
    let mut at = 0u64;
    for (segment, count) in counted {
        let end = at + count;
        let mut offsets = Vec::new();
        while let Some(cut) = cuts.next_if(|&cut| cut < end) {
            offsets.push(cut - at);
        }
        at = end;
        let (from, upto) = match segment {
            _ if offsets.is_empty() => continue,
            Segment::Whole(first, _) if offsets == [0] => {
                out.push(first);
                continue;
            }
            Segment::Whole(first, chunk) => (
                live_key(scope, first.origin, first.time),
                Some(AuditPoint {
                    origin: first.origin,
                    time: chunk.last,
                }),
            ),
            Segment::Cut { from, upto, .. } => (from, upto),
        };
        let mut offsets = offsets.into_iter().peekable();
        let mut i = 0u64;
        each_item(versions, &w, &from, upto, |point, _| {
            if offsets.next_if_eq(&i).is_some() {
                out.push(point);
            }
            i += 1;
            Ok(offsets.peek().is_some())
        })?;
    }
    Ok(out)
}

/// The stored version with Hlc `hlc`, with its key.
pub(super) fn version_by_hlc(
    versions: &impl ReadableTable<Bytes, Bytes>,
    scope: &Scope,
    hlc: Hlc,
) -> Result<Option<(Key, Version)>, StoreError> {
    let Some(row) = versions.get(live_key(scope, hlc.origin(), hlc.time()).as_slice())? else {
        return Ok(None);
    };
    let (key, version) = decode_row(row.value())?;
    if version.hlc != hlc {
        return Err(StoreError::Corrupt { what: "version" });
    }
    Ok(Some((key, version)))
}
