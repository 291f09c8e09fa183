//! Applying a received page: one transaction, with its watermark advances and events.

use crate::error::Result;
use crate::exchange::{apply, evidence_in_marks, evidence_in_page, AppliedPage};
use crate::exchange::{Halt, HaltReason, Page};
use std::collections::{BTreeMap, BTreeSet};

use crate::hlc::{Hlc, NodeId};
use crate::notify::{Change, ChangeKind, Event, PageNews, SyncEvent};
use crate::record::ScopeFilter;
use crate::record::{Key, Scope, Version};
use crate::store::{Batch, Durability, PeerKnowledge};
use crate::watermark::ScopedWatermarks;

use super::{lock, RestoreDetection, SyncEngine};

/// How stale a peer's stored last-seen time may get before a round records it again: one
/// day, in NTP64 (upper 32 bits are seconds).
const SEEN_RESOLUTION: u64 = (24 * 3600) << 32;

impl From<Applied> for AppliedPage {
    fn from(a: Applied) -> AppliedPage {
        AppliedPage {
            received: a.received,
            applied: a.applied,
            halts: a.halts,
        }
    }
}

/// Who sent a page: a peer this node called (its response) or a node that called this one
/// (its request). An initiator's claims are trusted less: see `RestoreDetection` and
/// `EngineConfig::max_new_origins_per_request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sender {
    Responder,
    Initiator,
}

/// What applying a page reads before it plans: this node's marks, what it recorded of the
/// sender's, and when it last saw the sender (one snapshot).
struct Before {
    own: ScopedWatermarks,
    knowledge: Option<ScopedWatermarks>,
    seen: Option<u64>,
}

pub(super) struct Applied {
    pub(super) received: usize,
    pub(super) applied: usize,
    pub(super) halts: Vec<Halt>,
    /// Whether any watermark may have moved.
    pub(super) changed_marks: bool,
    /// Versions refused below the floor (their keys' deletes were purged here).
    pub(super) refused: Vec<super::Refused>,
}

/// Whether every mark of `marks` is of `sender` or of an origin `own` holds a mark for in
/// its scope, and no scope of `marks` is empty: whether bounding knowledge of the sender to
/// what this node holds (with no advance planned) would leave it as it is. One ordered walk
/// per scope.
fn within_own(marks: &ScopedWatermarks, own: &ScopedWatermarks, sender: NodeId) -> bool {
    marks.iter().all(|(scope, theirs)| {
        let mut held = own
            .scope(scope)
            .into_iter()
            .flat_map(|w| w.iter())
            .peekable();
        !theirs.is_empty()
            && theirs.iter().all(|mark| {
                let origin = mark.origin();
                while held.next_if(|h| h.origin() < origin).is_some() {}
                origin == sender || held.peek().is_some_and(|h| h.origin() == origin)
            })
    })
}

impl SyncEngine {
    /// Applies a received page in one transaction, with the sender's watermarks as knowledge.
    /// `peer` is what events call the sender. If the sender shows writes by our own id that
    /// we lost and `adopt` says to act on its evidence, the node first takes a fresh id, and
    /// the page's runs of the old id then apply as any other origin's; otherwise those runs
    /// halt ([`crate::HaltReason::OwnOrigin`]) and the evidence is logged.
    pub(super) fn apply_page(
        &self,
        peer: &str,
        sender: Sender,
        page: &Page,
        scopes: &ScopeFilter,
        knowledge: &PeerKnowledge,
        seen: Option<&ScopedWatermarks>,
    ) -> Result<Applied> {
        apply::validate_page(page, scopes)?;
        let me = self.node_id();
        let before = self.stored_before(knowledge.peer)?;
        let evidence = evidence_in_marks(me, &before.own, &knowledge.marks)
            .or_else(|| evidence_in_page(me, &before.own, page));
        let adopt = sender == Sender::Responder
            || self.inner.config.restore_detection == RestoreDetection::Any;
        match evidence {
            Some(evidence) if adopt => {
                let me = self.take_fresh_identity(peer, &evidence)?;
                // Read again: the state after the new id was taken.
                let before = self.stored_before(knowledge.peer)?;
                self.apply_page_as(me, peer, sender, page, scopes, knowledge, seen, before)
            }
            Some(evidence) => {
                self.warn_of_evidence(peer, knowledge.peer, &evidence);
                self.apply_page_as(me, peer, sender, page, scopes, knowledge, seen, before)
            }
            None => self.apply_page_as(me, peer, sender, page, scopes, knowledge, seen, before),
        }
    }

    /// What applying a page from `peer` reads first, from one snapshot of the store.
    fn stored_before(&self, peer: NodeId) -> Result<Before> {
        let read = self.inner.store.read()?;
        Ok(Before {
            own: read.watermarks()?,
            knowledge: read.peer_watermarks(peer)?,
            seen: read.peer_seen(peer)?,
        })
    }

    #[allow(clippy::too_many_arguments)] // apply_page's arguments, the id to apply as, and
                                         // what was read before
    fn apply_page_as(
        &self,
        me: NodeId,
        peer: &str,
        sender: Sender,
        page: &Page,
        scopes: &ScopeFilter,
        knowledge: &PeerKnowledge,
        seen: Option<&ScopedWatermarks>,
        before: Before,
    ) -> Result<Applied> {
        let Before {
            own,
            knowledge: stored_knowledge,
            seen: seen_at,
        } = before;
        let now = self.inner.config.time.now();
        // The peer's last-seen time (for retiring peers not seen for months) is kept to the
        // day: a quiet round commits nothing unless the stored time is a day old.
        let seen_due = seen_at.is_none_or(|t| now.saturating_sub(t) > SEEN_RESOLUTION);
        // IMPORTANT: pinned from the presence check to the commit, so a blob found present
        // here cannot be removed before the version that references it is stored; and the
        // pending names synced after that check, so a blob that arrived just before it
        // (found present) has its name durable before the commit counts on it.
        let (_pins, staged) = self.pin_for_commit(
            (page.runs.iter())
                .flat_map(|r| r.versions.iter().filter_map(|(_, v)| v.blob()))
                .map(|b| b.hash),
            || self.staged_keys(page.versions()),
        )?;
        let mut plan = apply::plan_page_apply(
            page,
            me,
            &own,
            |h| self.inner.clock.check(h),
            |scope, key, v| !staged.contains(&(scope.clone(), key.clone(), v.hlc)),
        );
        // What one page may add to this node's state is bounded: new origin marks by the
        // limits, and knowledge of the sender to the origins this node holds marks for (and
        // the sender's own).
        let config = &self.inner.config;
        let limits = apply::MarkLimits {
            per_scope: config.max_origins_per_scope,
            vacuous: (sender == Sender::Initiator).then_some(config.max_new_origins_per_request),
        };
        // A page without runs (a quiet round) plans no advance: nothing to bound.
        let quiet = page.runs.is_empty();
        if !quiet {
            let dropped = apply::bound_new_marks(&mut plan, page, &own, limits);
            if !dropped.is_empty() {
                self.warn_of_bounded_marks(peer, &dropped);
            }
        }
        // The sender's own origin stays too: it is the one origin it speaks for, and the
        // first pages between two nodes carry it before this node has a mark for it.
        let sender_id = knowledge.peer;
        let same_as_stored = |marks: &ScopedWatermarks| {
            stored_knowledge
                .as_ref()
                .is_some_and(|k| k.equals_in(|s| scopes.contains(s), marks))
        };
        // A quiet round's knowledge is most often what was stored (a digest stands for it):
        // when it is, and bounding would keep all of it, it is neither copied nor bounded.
        // Otherwise the bounded copy is what gets recorded.
        let (bounded, unchanged_knowledge) = if quiet
            && same_as_stored(&knowledge.marks)
            && within_own(&knowledge.marks, &own, sender_id)
        {
            (None, true)
        } else {
            let mut marks = knowledge.marks.clone();
            marks.retain_marks(|scope, mark| {
                mark.origin() == sender_id
                    || own.get(scope, mark.origin()).is_some()
                    || plan
                        .advances
                        .iter()
                        .any(|a| a.scope == *scope && a.top.origin() == mark.origin())
            });
            let unchanged = quiet && same_as_stored(&marks);
            (Some(marks), unchanged)
        };
        let halts = plan.halts;
        let mut batch = Batch::new(0, Durability::Deferred);
        batch.upserts = plan.upserts;
        batch.advances = plan.advances;
        let received = page.version_count();
        let knowledge_peer = knowledge.peer;
        if unchanged_knowledge && !seen_due {
            return Ok(Applied {
                received,
                applied: 0,
                halts,
                changed_marks: false,
                refused: Vec::new(),
            });
        }
        if let Some(max) = batch.upserts.iter().map(|(_, _, v)| v.hlc).max() {
            // Every accepted version passed the drift check in plan_run.
            self.inner.clock.raise(max);
        }
        // Our own writes the sender had not acknowledged that this page may replace.
        let mut unacknowledged = self.unacknowledged_writes(
            me,
            &own,
            seen.or(stored_knowledge.as_ref()),
            &batch.upserts,
        )?;
        batch.clock = self.inner.clock.last();
        batch.peer = Some(PeerKnowledge {
            peer: knowledge.peer,
            scopes: knowledge.scopes.clone(),
            marks: bounded.unwrap_or_else(|| knowledge.marks.clone()),
        });
        batch.seen = vec![(knowledge_peer, now)];
        batch.durability = self.durability_for(page.more, batch.upserts.len());
        let report = self.inner.store.commit(&batch)?;
        lock(&self.inner.guards).referenced(
            batch
                .upserts
                .iter()
                .filter_map(|(_, _, v)| v.blob().map(|b| b.hash)),
        );
        // IMPORTANT: a blob unreferenced by a commit a crash may take back is removed only
        // once that commit is durable.
        let durable =
            self.inner
                .note_commit(batch.durability, batch.upserts.len(), report.unreferenced);
        self.remove_unreferenced(&durable);
        self.announce(
            ChangeKind::RemoteUpdateAvailable,
            Some(knowledge_peer),
            report.applied.iter().map(|&i| {
                let (s, k, v) = &batch.upserts[i];
                (s, k, v.hlc)
            }),
        );
        for &i in &report.applied {
            let (scope, key, winner) = &batch.upserts[i];
            if winner.hlc.origin() == me {
                continue;
            }
            if let Some(lost) = unacknowledged.remove(&(scope.clone(), key.clone())) {
                self.inner
                    .notifier
                    .publish(Event::Sync(SyncEvent::Overwritten {
                        peer: peer.to_owned(),
                        scope: scope.clone(),
                        key: key.clone(),
                        lost,
                        winner: winner.hlc,
                    }));
            }
        }
        self.inner.notifier.scopes_changed(
            batch.advances.iter().map(|a| &a.scope),
            Some(knowledge_peer),
        );
        let refused = self.refused_in(peer, &batch, &report.refused);
        Ok(Applied {
            received,
            applied: report.applied.len(),
            halts,
            changed_marks: !batch.advances.is_empty(),
            refused,
        })
    }

    /// Logs (at most once a minute) that a page from `peer` named more new origins than
    /// the limits let it create marks for.
    fn warn_of_bounded_marks(&self, peer: &str, dropped: &[(Scope, NodeId)]) {
        let mut peers = lock(&self.inner.peers);
        if peers
            .bounded_warning
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60))
        {
            return;
        }
        peers.bounded_warning = Some(std::time::Instant::now());
        drop(peers);
        let config = &self.inner.config;
        tracing::warn!(
            %peer, dropped = dropped.len(), first_scope = %dropped[0].0,
            per_scope = config.max_origins_per_scope,
            per_request = config.max_new_origins_per_request,
            "a page named more new origins than this node keeps marks for (per scope, or \
             new origins without versions per request): their versions merged, their marks \
             were not created"
        );
    }

    /// Publishes one change event per scope for `keys` (grouped in order), if anyone listens.
    pub(super) fn announce<'a>(
        &self,
        kind: ChangeKind,
        peer: Option<NodeId>,
        keys: impl IntoIterator<Item = (&'a Scope, &'a Key, Hlc)>,
    ) {
        if !self.inner.notifier.has_subscribers() {
            return;
        }
        let mut by_scope: Vec<Change> = Vec::new();
        for (scope, key, hlc) in keys {
            match by_scope.iter_mut().find(|c| c.scope == *scope) {
                Some(c) => {
                    c.keys.push(key.clone());
                    c.versions.push(hlc);
                }
                None => by_scope.push(Change {
                    kind,
                    scope: scope.clone(),
                    keys: vec![key.clone()],
                    peer,
                    versions: vec![hlc],
                }),
            }
        }
        for change in by_scope {
            self.inner.notifier.publish(Event::Change(change));
        }
    }

    /// Tells that page `seq` of a streamed transfer from `peer` (the name its events
    /// carry) was applied, as `applied` says, and left `remaining` at the sender
    /// (`sync_page_applied`).
    pub(super) fn announce_page(
        &self,
        peer: &str,
        seq: u32,
        applied: &Applied,
        remaining: Option<u64>,
    ) {
        let news = PageNews {
            received: applied.received,
            applied: applied.applied,
            remaining,
        };
        self.inner.notifier.publish_page(peer, seq, news);
    }

    /// Publishes `clock_skew` and `blob_staged` for the streams this node halted when
    /// `peer` (the name its events carry) sent them.
    pub(super) fn announce_halts(&self, peer: &str, halts: &[Halt]) {
        for h in halts {
            let event = match &h.reason {
                HaltReason::ClockSkew { ahead_by_ms } => {
                    self.warn_of_skew(peer, h, *ahead_by_ms);
                    SyncEvent::ClockSkew {
                        peer: peer.to_owned(),
                        scope: h.scope.clone(),
                        origin: h.origin,
                        ahead_by_ms: *ahead_by_ms,
                    }
                }
                HaltReason::BlobUnavailable { hash } => SyncEvent::BlobStaged {
                    peer: peer.to_owned(),
                    scope: h.scope.clone(),
                    origin: h.origin,
                    hash: *hash,
                },
                _ => continue,
            };
            self.inner.notifier.publish(Event::Sync(event));
        }
    }

    /// Logs (at most once a minute per origin) that versions of `halt`'s origin were
    /// refused as too far ahead of this node's clock.
    fn warn_of_skew(&self, peer: &str, halt: &Halt, ahead_by_ms: u64) {
        const QUIET: std::time::Duration = std::time::Duration::from_secs(60);
        {
            let mut peers = super::lock(&self.inner.peers);
            let last = peers.skew_warned.get(&halt.origin);
            if last.is_some_and(|t| t.elapsed() < QUIET) {
                return;
            }
            peers
                .skew_warned
                .insert(halt.origin, std::time::Instant::now());
        }
        tracing::warn!(
            %peer, scope = %halt.scope, origin = %halt.origin, ahead_by_ms,
            max_drift = ?self.inner.config.max_drift,
            "versions of this origin are ahead of this node's clock by more than the max \
             drift: its stream halts until the clocks agree (fix the clock of the node that \
             wrote them, or this node's if it is behind)"
        );
    }

    /// This node's own live versions, in the scopes of `upserts`, above what `known` (the
    /// sender's marks as last learned) says the sender holds of our origin: the local writes
    /// an incoming version would overwrite unseen. Only when someone listens, and only
    /// scopes where such writes exist (at most [`UNACKNOWLEDGED_SCANNED`] each).
    fn unacknowledged_writes(
        &self,
        me: NodeId,
        own: &ScopedWatermarks,
        known: Option<&ScopedWatermarks>,
        upserts: &[(Scope, Key, Version)],
    ) -> Result<BTreeMap<(Scope, Key), Version>> {
        let mut found = BTreeMap::new();
        if !self.inner.notifier.has_subscribers() || upserts.is_empty() {
            return Ok(found);
        }
        let scopes: BTreeSet<&Scope> = upserts.iter().map(|(s, _, _)| s).collect();
        let read = self.inner.store.read()?;
        for scope in scopes {
            let Some(ours) = own.get(scope, me) else {
                continue;
            };
            let theirs = known.and_then(|k| k.get(scope, me));
            if theirs >= Some(ours) {
                continue;
            }
            for (key, version) in
                read.live_range(scope, me, theirs, ours, UNACKNOWLEDGED_SCANNED)?
            {
                found.insert((scope.clone(), key), version);
            }
        }
        Ok(found)
    }
}

/// The most unacknowledged local writes per scope that a page is checked against for
/// `overwritten`.
const UNACKNOWLEDGED_SCANNED: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16]).unwrap()
    }

    fn marks(of: &[(&Scope, u8, u64)]) -> ScopedWatermarks {
        let mut m = ScopedWatermarks::new();
        for (scope, origin, t) in of {
            m.observe(scope, Hlc::new(*t, id(*origin)));
        }
        m
    }

    /// The quiet round's shortcut (compare with what was stored, then check the bound holds
    /// all of it) says "unchanged" exactly when bounding the knowledge and comparing does,
    /// and then the knowledge is what bounding leaves.
    #[test]
    fn quiet_shortcut_agrees_with_bounding_then_comparing() {
        let (a, b, c) = (
            Scope::shared(),
            Scope::app("x", "y").unwrap(),
            Scope::app("x", "z").unwrap(),
        );
        let in_play = |s: &Scope| *s != c;
        let sender = 9;
        let own = marks(&[(&a, 1, 5), (&a, 3, 5), (&a, 5, 5), (&b, 2, 5)]);
        let mut with_empty = marks(&[(&a, 1, 4)]);
        with_empty.scope_mut(&b);
        let cases = [
            // (knowledge, stored)
            (
                marks(&[(&a, 1, 4), (&a, 5, 2)]),
                marks(&[(&a, 1, 4), (&a, 5, 2)]),
            ),
            // the sender's own origin is kept though this node holds no mark of it
            (
                marks(&[(&a, 9, 4), (&b, 2, 1)]),
                marks(&[(&a, 9, 4), (&b, 2, 1)]),
            ),
            // a stored scope out of play is left out of the comparison
            (marks(&[(&a, 3, 4)]), marks(&[(&a, 3, 4), (&c, 7, 1)])),
            // an origin this node holds no mark of (any more): bounding drops it
            (
                marks(&[(&a, 1, 4), (&a, 4, 2)]),
                marks(&[(&a, 1, 4), (&a, 4, 2)]),
            ),
            (marks(&[(&b, 1, 4)]), marks(&[(&b, 1, 4)])),
            (marks(&[(&a, 1, 4), (&a, 4, 2)]), marks(&[(&a, 1, 4)])),
            // a scope without marks: bounding drops it
            (with_empty.clone(), with_empty),
            // knowledge that moved
            (marks(&[(&a, 1, 6)]), marks(&[(&a, 1, 4)])),
            (marks(&[(&a, 1, 4)]), ScopedWatermarks::new()),
        ];
        let mut shortcuts = 0;
        for (i, (knowledge, stored)) in cases.into_iter().enumerate() {
            let mut bounded = knowledge.clone();
            bounded
                .retain_marks(|s, m| m.origin() == id(sender) || own.get(s, m.origin()).is_some());
            let mut kept = stored.clone();
            kept.retain(in_play);
            let unchanged = kept == bounded;
            let shortcut =
                stored.equals_in(in_play, &knowledge) && within_own(&knowledge, &own, id(sender));
            assert!(!shortcut || unchanged, "case {i}: shortcut but changed");
            assert!(
                !shortcut || bounded == knowledge,
                "case {i}: bounding would change it"
            );
            assert_eq!(stored.equals_in(in_play, &bounded), unchanged, "case {i}");
            shortcuts += usize::from(shortcut);
        }
        assert_eq!(shortcuts, 3, "the first three cases take the shortcut");
    }
}
