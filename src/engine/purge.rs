//! Forgetting safely: tombstones purged once every peer has them, knowledge of peers not
//! seen for too long dropped, marks of origins with nothing left retired. See
//! docs/protocol.md, "Forgetting", for the rules and why each is safe.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::Result;
use crate::exchange::Page;
use crate::hlc::{duration_to_ntp64, Hlc, NodeId};
use crate::notify::{Event, SyncEvent};
use crate::record::{Key, Op, Scope, ScopeFilter};
use crate::store::{Batch, Durability, StoreRead};
use crate::watermark::ScopedWatermarks;

use super::{lock, SyncEngine, DAY};

/// A version refused below a purge floor: its scope, key and Hlc.
pub type Refused = (Scope, Key, Hlc);

/// Tombstones removed per transaction: a purge never holds the write lock for long.
pub const PURGE_BATCH: usize = 1000;

/// Stored versions one [`SyncEngine::purge`] call looks at, at most: a call returns with
/// [`PurgeReport::more`] set after this many, and the caller calls again.
pub const PURGE_SCAN_BUDGET: usize = 200_000;

/// What one [`SyncEngine::purge`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Tombstones removed.
    pub purged: usize,
    /// Stored versions looked at.
    pub scanned: usize,
    /// The floors raised, per scope, to the newest tombstone purged there.
    pub floors: BTreeMap<Scope, u64>,
    /// Peers whose knowledge was dropped: not seen for longer than
    /// [`crate::EngineConfig::peer_retirement`].
    pub retired_peers: Vec<NodeId>,
    /// `(scope, origin)` marks dropped: origins with no stored version left in a scope.
    pub retired_origins: Vec<(Scope, NodeId)>,
    /// Whether the call stopped at its budget with more to look at: call again.
    pub more: bool,
}

impl SyncEngine {
    /// One pass of forgetting, bounded in work ([`PURGE_SCAN_BUDGET`] versions looked at,
    /// [`PURGE_BATCH`] removals per transaction): retires peers not seen for
    /// [`crate::EngineConfig::peer_retirement`], purges tombstones older than
    /// [`crate::EngineConfig::tombstone_retention`] that are stable (every peer this node
    /// keeps knowledge of, sharing the scope, has a mark for the tombstone's origin past it)
    /// and that this node is complete below (no peer knows more of any origin below the
    /// tombstone than this node), raising the scope's floor in the same transaction, then
    /// retires the marks of origins with no stored version left at or below the floor.
    /// Does nothing but the peer upkeep when the retention is `None`.
    ///
    /// This is store work: async callers run it off the runtime's threads
    /// ([`crate::blocking::run_blocking`]).
    ///
    /// # Errors
    /// The store failed; what was committed before stays (each batch is whole).
    pub fn purge(&self) -> Result<PurgeReport> {
        let mut report = PurgeReport::default();
        let config = &self.inner.config;
        let now = config.time.now();
        let ago = |d: Duration| now.saturating_sub(duration_to_ntp64(d).unwrap_or(u64::MAX));
        self.retire_peers(now, config.peer_retirement.map(ago), &mut report)?;
        let Some(cutoff) = config.tombstone_retention.map(ago) else {
            return Ok(report);
        };
        let me = self.node_id();
        let read = self.inner.store.read()?;
        let own = read.watermarks()?;
        let mut known: Vec<ScopedWatermarks> = Vec::new();
        for peer in read.peers()? {
            known.push(read.peer_watermarks(peer)?.unwrap_or_default());
        }
        let scopes = read.scopes()?;
        drop(read);
        let mut removals = Batch::new(self.inner.clock.last(), Durability::Immediate);
        for scope in &scopes {
            let Some(marks) = own.scope(scope) else {
                continue;
            };
            let sharing: Vec<&ScopedWatermarks> =
                known.iter().filter(|k| k.scope(scope).is_some()).collect();
            let complete = complete_below(&own, scope, &sharing);
            let upto_time = cutoff.min(complete);
            for mark in marks.iter() {
                let origin = mark.origin();
                // Stable: every peer sharing the scope holds the origin's stream this far.
                let stable = sharing
                    .iter()
                    .map(|k| k.get(scope, origin))
                    .min()
                    .unwrap_or(Some(mark));
                let Some(stable) = stable else {
                    continue;
                };
                let upto = mark.min(stable).min(Hlc::new(upto_time, origin));
                let mut after: Option<Hlc> = None;
                loop {
                    if report.scanned >= PURGE_SCAN_BUDGET {
                        report.more = true;
                        break;
                    }
                    let page = self.inner.store.read()?.live_range(
                        scope,
                        origin,
                        after,
                        upto,
                        PURGE_BATCH,
                    )?;
                    report.scanned += page.len();
                    let Some((_, last)) = page.last() else {
                        break;
                    };
                    after = Some(last.hlc);
                    for (key, v) in page {
                        if matches!(v.op, Op::Delete) {
                            removals.removals.push((scope.clone(), key, v.hlc));
                            if removals.removals.len() >= PURGE_BATCH {
                                self.commit_purge(&mut removals, &mut report)?;
                            }
                        }
                    }
                }
            }
        }
        self.commit_purge(&mut removals, &mut report)?;
        if !report.more {
            self.retire_origins(me, &mut report)?;
        }
        if report.purged > 0 || !report.retired_origins.is_empty() {
            tracing::info!(
                purged = report.purged,
                scanned = report.scanned,
                retired_origins = report.retired_origins.len(),
                "purged tombstones past the retention that every peer holds"
            );
        }
        Ok(report)
    }

    /// Commits the gathered removals with the floors they raise, if any.
    fn commit_purge(&self, batch: &mut Batch, report: &mut PurgeReport) -> Result<()> {
        if batch.removals.is_empty() {
            return Ok(());
        }
        let mut floors: BTreeMap<Scope, u64> = BTreeMap::new();
        for (scope, _, hlc) in &batch.removals {
            let f = floors.entry(scope.clone()).or_default();
            *f = (*f).max(hlc.time());
        }
        batch.floors = floors.clone().into_iter().collect();
        batch.clock = self.inner.clock.last();
        let done = self.inner.store.commit(batch)?;
        report.purged += done.removed;
        for (scope, time) in floors {
            let f = report.floors.entry(scope).or_default();
            *f = (*f).max(time);
        }
        batch.removals.clear();
        batch.floors.clear();
        Ok(())
    }

    /// Drops the knowledge of peers not seen since `before` (if some other peer was seen
    /// since: a node that was itself offline retires nobody), and starts the clock of
    /// peers met before last-seen times were kept.
    fn retire_peers(&self, now: u64, before: Option<u64>, report: &mut PurgeReport) -> Result<()> {
        let read = self.inner.store.read()?;
        let mut seen = Vec::new();
        for peer in read.peers()? {
            seen.push((peer, read.peer_seen(peer)?));
        }
        drop(read);
        let mut batch = Batch::new(self.inner.clock.last(), Durability::Immediate);
        batch.seen = seen
            .iter()
            .filter(|(_, t)| t.is_none())
            .map(|(p, _)| (*p, now))
            .collect();
        if let Some(before) = before {
            let someone_recent = seen.iter().any(|(_, t)| t.is_some_and(|t| t >= before));
            if someone_recent {
                batch.forget = seen
                    .iter()
                    .filter(|(_, t)| t.is_some_and(|t| t < before))
                    .map(|(p, _)| *p)
                    .collect();
            }
        }
        if batch.seen.is_empty() && batch.forget.is_empty() {
            return Ok(());
        }
        self.inner.store.commit(&batch)?;
        for peer in &batch.forget {
            tracing::warn!(
                %peer,
                "retired a peer not seen for longer than the peer retirement: purges no \
                 longer wait for it, and if it comes back it re-clones what it missed"
            );
        }
        report.retired_peers = batch.forget;
        Ok(())
    }

    /// Retires the marks of origins (not ours) that have no stored version left in a scope,
    /// at or below its floor, and that every peer sharing the scope holds as far.
    fn retire_origins(&self, me: NodeId, report: &mut PurgeReport) -> Result<()> {
        let read = self.inner.store.read()?;
        let own = read.watermarks()?;
        let floors = read.floors()?;
        let mut known = Vec::new();
        for peer in read.peers()? {
            known.push(read.peer_watermarks(peer)?.unwrap_or_default());
        }
        let mut batch = Batch::new(self.inner.clock.last(), Durability::Immediate);
        for (scope, marks) in own.iter() {
            let floor = floors.get(scope).copied().unwrap_or(0);
            for mark in marks.iter() {
                let origin = mark.origin();
                if origin == me || mark.time() > floor {
                    continue;
                }
                let held_everywhere = known
                    .iter()
                    .all(|k| k.get(scope, origin).is_none_or(|theirs| theirs >= mark));
                if held_everywhere && !holds_any(&*read, scope, origin)? {
                    batch.retire.push((scope.clone(), origin));
                }
            }
        }
        drop(read);
        if batch.retire.is_empty() {
            return Ok(());
        }
        self.inner.store.commit(&batch)?;
        report.retired_origins = batch.retire;
        Ok(())
    }
}

impl SyncEngine {
    /// Our floors in play.
    pub(super) fn floors_in_play(&self, scopes: &ScopeFilter) -> Result<Vec<(Scope, u64)>> {
        floors_in(&*self.inner.store.read()?, scopes)
    }

    /// Records the floors `peer` told us; returns whether any rose past what it told
    /// before. A peer whose floor rose may have purged deletes this node never received:
    /// the caller audits the scope with it (the re-clone).
    pub(super) fn heard_floors(&self, peer: NodeId, floors: &[(Scope, u64)]) -> bool {
        let mut peers = lock(&self.inner.peers);
        let heard = peers.floors_heard.entry(peer).or_default();
        let mut rose = false;
        for (scope, floor) in floors {
            if heard.get(scope).is_none_or(|h| h < floor) {
                heard.insert(scope.clone(), *floor);
                rose = true;
            }
        }
        rose
    }

    /// Raises our floors in `scopes` to those `peer` last told us of: when our marks came to
    /// cover its purged tombstones (a run that [`crosses`] its floor, in either role), or
    /// after an audit with it that left nothing halted (our live contents there hold every
    /// version it holds). What its floor refuses (an older version of a key neither of us
    /// holds) ours then refuses too, and a node that takes marks from us past that floor
    /// re-clones against us as it would against `peer`: the floor travels with the marks it
    /// answers for. Returns the floors raised.
    pub(super) fn adopt_floors(
        &self,
        peer: NodeId,
        scopes: &ScopeFilter,
    ) -> Result<Vec<(Scope, u64)>> {
        let heard: Vec<(Scope, u64)> = {
            let peers = lock(&self.inner.peers);
            let Some(heard) = peers.floors_heard.get(&peer) else {
                return Ok(Vec::new());
            };
            (heard.iter())
                .filter(|(s, _)| scopes.contains(s))
                .map(|(s, f)| (s.clone(), *f))
                .collect()
        };
        let ours = self.inner.store.read()?.floors()?;
        let raised: Vec<(Scope, u64)> = heard
            .into_iter()
            .filter(|(s, f)| ours.get(s).is_none_or(|o| o < f))
            .collect();
        if raised.is_empty() {
            return Ok(raised);
        }
        let mut batch = Batch::new(self.inner.clock.last(), Durability::Immediate);
        batch.floors = raised.clone();
        self.inner.store.commit(&batch)?;
        self.inner.note_commit(Durability::Immediate, 0, Vec::new());
        tracing::info!(peer = %peer, floors = ?raised, "purge floors adopted from a peer");
        Ok(raised)
    }

    /// Whether a run of `page`, sent by `peer`, starts below the floor `peer` last told us
    /// of in its scope (see [`crosses`]).
    pub(super) fn crosses_floor(&self, peer: NodeId, page: &Page) -> bool {
        let peers = lock(&self.inner.peers);
        let heard = peers.floors_heard.get(&peer);
        heard.is_some_and(|h| crosses(page, |s| h.get(s).copied()))
    }

    /// Drops our versions that `peer` (called `label` in events) refused below its floor:
    /// each only if it is still our stored version, its scope is in play, and it is older
    /// than our own tombstone retention (30 days if purging is off), so that a peer cannot
    /// make this node drop recent writes; never a tombstone (the record is deleted either
    /// way, and the tombstone keeps older writes of its key from coming back here). Returns
    /// what was dropped.
    pub(super) fn drop_refused(
        &self,
        label: &str,
        scopes: &ScopeFilter,
        refused: &[Refused],
    ) -> Result<Vec<Refused>> {
        if refused.is_empty() {
            return Ok(Vec::new());
        }
        let retention = self.inner.config.tombstone_retention.unwrap_or(30 * DAY);
        let limit = self
            .inner
            .config
            .time
            .now()
            .saturating_sub(duration_to_ntp64(retention).unwrap_or(u64::MAX));
        let mut batch = Batch::new(self.inner.clock.last(), Durability::Immediate);
        let mut ignored = 0usize;
        let read = self.inner.store.read()?;
        for (scope, key, hlc) in refused {
            if !scopes.contains(scope) || hlc.time() > limit {
                ignored += 1;
                continue;
            }
            // A refused delete stays: it brings nothing back, and dropping it would leave the
            // key without the tombstone that makes an older write of it lose here (our floor
            // knows nothing of it). Our own purge takes it once it is stable.
            let tombstone = read
                .get(scope, key)?
                .is_some_and(|v| v.hlc == *hlc && matches!(v.op, Op::Delete));
            if !tombstone {
                batch.removals.push((scope.clone(), key.clone(), *hlc));
            }
        }
        drop(read);
        if ignored > 0 {
            tracing::warn!(
                peer = %label, ignored,
                "a peer refused versions of ours below its floor that are newer than our \
                 retention or outside the scopes in play: kept"
            );
        }
        if batch.removals.is_empty() {
            return Ok(Vec::new());
        }
        let report = self.inner.store.commit(&batch)?;
        let durable = self
            .inner
            .note_commit(Durability::Immediate, 0, report.unreferenced);
        self.remove_unreferenced(&durable);
        // What was dropped: the removals whose version was still stored are gone now.
        let read = self.inner.store.read()?;
        let mut dropped = Vec::new();
        for (scope, key, hlc) in batch.removals {
            if read.get(&scope, &key)?.is_none() {
                dropped.push((scope, key, hlc));
            }
        }
        drop(read);
        self.announce_refused(label, &dropped, true);
        Ok(dropped)
    }

    /// The upserts of `batch` that its commit refused below the floor (`indexes`, from
    /// [`crate::store::BatchReport::refused`]), announced as refused from `peer`.
    pub(super) fn refused_in(&self, peer: &str, batch: &Batch, indexes: &[usize]) -> Vec<Refused> {
        let refused: Vec<Refused> = indexes
            .iter()
            .map(|&i| {
                let (s, k, v) = &batch.upserts[i];
                (s.clone(), k.clone(), v.hlc)
            })
            .collect();
        self.announce_refused(peer, &refused, false);
        refused
    }

    /// Logs and publishes `floor_refused` for `refused`, grouped by scope.
    pub(super) fn announce_refused(&self, label: &str, refused: &[Refused], dropped: bool) {
        if refused.is_empty() {
            return;
        }
        tracing::warn!(
            peer = %label, versions = refused.len(), first_scope = %refused[0].0,
            first_key = %String::from_utf8_lossy(refused[0].1.as_bytes()).escape_debug(),
            dropped,
            "versions refused below a purge floor: their keys' deletes were purged, so they \
             stay deleted"
        );
        let mut by_scope: BTreeMap<&Scope, Vec<Key>> = BTreeMap::new();
        for (scope, key, _) in refused {
            by_scope.entry(scope).or_default().push(key.clone());
        }
        for (scope, keys) in by_scope {
            self.inner
                .notifier
                .publish(Event::Sync(SyncEvent::FloorRefused {
                    peer: label.to_owned(),
                    scope: scope.clone(),
                    keys,
                    dropped,
                }));
        }
    }
}

/// How long a session goes on with the peer's floors it heard before a request asks again:
/// a run that crosses a floor raised since then is found with the next request that asks
/// (the floor rose: an audit), at most this much later.
pub(crate) const FLOORS_FRESH: Duration = Duration::from_secs(600);

/// Whether a run of `page` starts below its sender's `floors` (its base's time, or 0 for a
/// run from the start, is below the floor of its scope). The sender may have purged
/// tombstones in between, which its run skips (they are gone) while they supersede versions
/// the receiver may still hold, of any origin: a receiver back after longer than the
/// retention, a new node that took older versions by an audit, a node whose mark for a quiet
/// origin is older than the floor. Only an audit tells: the receiver's versions at or below
/// the floor that the sender lacks are refused there and dropped here.
pub(super) fn crosses(page: &Page, floor_of: impl Fn(&Scope) -> Option<u64>) -> bool {
    (page.runs.iter()).any(|run| floor_of(&run.scope).is_some_and(|f| run.starts_below(f)))
}

/// The floor of `scope` in a list of floors, as messages carry them.
pub(super) fn floor_in(floors: &[(Scope, u64)], scope: &Scope) -> Option<u64> {
    floors.iter().find(|(s, _)| s == scope).map(|(_, f)| *f)
}

/// The floors of `read` in the scopes in play.
pub(super) fn floors_in(read: &dyn StoreRead, scopes: &ScopeFilter) -> Result<Vec<(Scope, u64)>> {
    Ok(read
        .floors()?
        .into_iter()
        .filter(|(s, _)| scopes.contains(s))
        .collect())
}

/// Whether the store holds any version of `origin` in `scope`.
fn holds_any(read: &dyn StoreRead, scope: &Scope, origin: NodeId) -> Result<bool> {
    Ok(!read
        .live_range(scope, origin, None, Hlc::new(u64::MAX, origin), 1)?
        .is_empty())
}

/// The time below which this node holds, of every origin in `scope`, at least what any peer
/// sharing it holds: a tombstone above it could hide an older write this node never had,
/// which a peer could still bring.
fn complete_below(own: &ScopedWatermarks, scope: &Scope, sharing: &[&ScopedWatermarks]) -> u64 {
    let mut origins: BTreeMap<NodeId, Option<Hlc>> = BTreeMap::new();
    for k in sharing {
        for theirs in k.scope(scope).into_iter().flat_map(|w| w.iter()) {
            origins
                .entry(theirs.origin())
                .or_insert_with(|| own.get(scope, theirs.origin()));
        }
    }
    origins
        .iter()
        .filter(|(origin, mine)| sharing.iter().any(|k| k.get(scope, **origin) > **mine))
        .map(|(_, mine)| mine.map_or(0, |h| h.time()))
        .min()
        .unwrap_or(u64::MAX)
}
