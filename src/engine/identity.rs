//! Taking a fresh identity when a peer shows that this node lost writes (see
//! [`crate::exchange::RestoreEvidence`]).

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::exchange::RestoreEvidence;
use crate::hlc::NodeId;
use crate::notify::{Event, SyncEvent};

use super::{lock, SyncEngine};

impl SyncEngine {
    /// Takes a fresh node id, durably and at once, because `peer` holds writes by our id
    /// above our own mark (`evidence`). The old id becomes an ordinary origin: the writes we
    /// lost come back under it by the usual rules. Returns the id now in use.
    ///
    /// IMPORTANT: under the local-writes lock, so no write issues a timestamp between the
    /// detection and the switch; and the clock moves past the newest lost write the peer
    /// showed, so none issued later can equal one issued before, under either id.
    ///
    /// # Errors
    /// The store could not record the new id; the node keeps its id (and the next round
    /// detects the restore again).
    pub(super) fn take_fresh_identity(
        &self,
        peer: &str,
        evidence: &RestoreEvidence,
    ) -> Result<NodeId> {
        let _writes = lock(&self.inner.local_writes);
        let old = self.node_id();
        if evidence.theirs.origin() != old {
            // A concurrent round saw the same evidence and switched first.
            return Ok(old);
        }
        let new = NodeId::random();
        self.inner
            .store
            .set_note(super::PREVIOUS_ID_NOTE, Some(&old.to_bytes()))?;
        self.inner.store.replace_identity(new)?;
        lock(&self.inner.peers).previous = Some(old);
        self.inner.clock.rotate(new, evidence.theirs.time());
        tracing::warn!(
            %peer, old = %old, new = %new, scope = %evidence.scope,
            ours = ?evidence.ours.map(|h| h.to_string()), theirs = %evidence.theirs,
            "a peer holds writes by this node's id that this node lost (restored from a \
             backup, or a copied data directory): took a fresh node id; the lost writes \
             come back under the old one"
        );
        self.inner
            .notifier
            .publish(Event::Sync(SyncEvent::RestoreDetected {
                peer: peer.to_owned(),
                old,
                new,
                scope: evidence.scope.clone(),
                ours: evidence.ours,
                theirs: evidence.theirs,
            }));
        Ok(new)
    }

    /// Logs (at most once a minute per initiator) that initiator `from` showed writes by
    /// our id above our own mark, which this node does not act on (see
    /// [`super::RestoreDetection`]); its runs of our id halt.
    pub(super) fn warn_of_evidence(&self, peer: &str, from: NodeId, evidence: &RestoreEvidence) {
        const QUIET: Duration = Duration::from_secs(60);
        {
            let mut peers = lock(&self.inner.peers);
            let last = peers.warned.get(&from);
            if last.is_some_and(|t| t.elapsed() < QUIET) {
                return;
            }
            peers.warned.insert(from, Instant::now());
        }
        tracing::warn!(
            %peer, node = %self.node_id(), scope = %evidence.scope,
            ours = ?evidence.ours.map(|h| h.to_string()), theirs = %evidence.theirs,
            "an initiator shows writes by this node's id above its own mark: if this node \
             was restored from a backup, restart it with --restored (SyncEngine::open_restored); \
             otherwise the initiator's claim is refused (its runs of this id halt)"
        );
    }
}
