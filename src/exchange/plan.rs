//! What to ship: a pure function of the sender's watermarks, what it knows of the
//! receiver's, and range scans of the live-version index.

use crate::error::StoreError;
use crate::exchange::{Page, Run, Streams};
use crate::hlc::Hlc;
use crate::record::{BlobRef, Key, Scope};
use crate::store::StoreRead;
use crate::watermark::ScopedWatermarks;

/// Bounds on one page.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PageLimits {
    /// At most this many versions.
    pub versions: usize,
    /// At most about this many bytes of keys and values (at least one version is always
    /// shipped, so a single large value still moves).
    pub bytes: usize,
}

const RUN_OVERHEAD: usize = 48;
const VERSION_OVERHEAD: usize = 12;

fn version_size(key: &Key, op: &crate::record::Op) -> usize {
    VERSION_OVERHEAD + key.as_bytes().len() + op.encoded_len_hint()
}

/// Plans the page of versions the receiver lacks, given our marks `mine` and its marks
/// `theirs`, scanning `read` (one snapshot, so marks and versions agree).
///
/// Streams in `deferred` (ones the receiver halted last time) are planned after all others.
/// A run ends just below any version whose blob is not local (`has_blob`); such streams are
/// added to `blocked_streams` (the receiver will not catch up on them this round).
/// For each (scope, origin) where we are ahead, the run covers `(theirs, mine]`: every live
/// version in that range, ascending. Complete runs claim up to our own mark even when their
/// last live version is older (later ones were superseded), and origins with nothing live
/// to send get an empty run, so watermarks meet in one round. When a limit cuts a run, its
/// `top` is the last version shipped, no later run is sent, and `more` is set.
///
/// # Errors
/// A store read failure.
pub fn plan_page(
    read: &dyn StoreRead,
    mine: &ScopedWatermarks,
    theirs: &ScopedWatermarks,
    limits: PageLimits,
    deferred: &Streams,
    has_blob: &dyn Fn(&BlobRef) -> bool,
    blocked_streams: &mut Streams,
) -> Result<Page, StoreError> {
    let mut page = Page::default();
    let (mut count, mut bytes) = (0usize, 0usize);
    let streams = || {
        mine.iter()
            .flat_map(|(scope, marks)| marks.iter().map(move |top| (scope, top)))
    };
    let is_deferred = |scope: &Scope, top: Hlc| deferred.contains(&(scope.clone(), top.origin()));
    let ordered = streams()
        .filter(|(s, t)| !is_deferred(s, *t))
        .chain(streams().filter(|(s, t)| is_deferred(s, *t)));
    for (scope, my_top) in ordered {
        let origin = my_top.origin();
        let base = theirs.get(scope, origin);
        if base >= Some(my_top) {
            continue;
        }
        let room = limits.versions.saturating_sub(count);
        if room == 0 {
            page.more = true;
            return Ok(page);
        }
        let found = read.live_range(scope, origin, base, my_top, room.saturating_add(1))?;
        let mut cut = found.len() > room;
        let mut run = Run {
            scope: scope.clone(),
            origin,
            base,
            top: my_top,
            versions: Vec::new(),
        };
        let mut blocked = false;
        for (key, version) in found.into_iter().take(room) {
            // IMPORTANT: never ship a version whose blob we lack (it can be under our mark
            // when a peer's claim passed it while it was superseded there): the run ends
            // just below it, and the stream resumes once the blob lands or the version is
            // superseded here too.
            if version.blob().is_some_and(|b| !has_blob(b)) {
                blocked = true;
                break;
            }
            let size = version_size(&key, &version.op);
            if count > 0 && bytes + size > limits.bytes {
                cut = true;
                break;
            }
            bytes += size;
            count += 1;
            run.versions.push((key, version));
        }
        // A blocked run stopped before the end of its scan, so a cut found by the scan
        // does not apply: later streams are still planned.
        if blocked {
            blocked_streams.insert((scope.clone(), origin));
            if let Some(last) = run.versions.last().map(|(_, v)| v.hlc) {
                bytes += RUN_OVERHEAD;
                run.top = last;
                page.runs.push(run);
            }
            continue;
        }
        if cut {
            if let Some(last) = run.versions.last().map(|(_, v)| v.hlc) {
                run.top = last;
                page.runs.push(run);
            }
            page.more = true;
            return Ok(page);
        }
        bytes += RUN_OVERHEAD;
        page.runs.push(run);
    }
    Ok(page)
}
