//! When applied pages become durable: deferred commits, checkpoints, flush.

use std::time::Instant;

use crate::error::Result;
use crate::hash::Hash;
use crate::store::Durability;

use super::{lock, Inner, SyncEngine};

#[derive(Default)]
pub(super) struct Pending {
    pub(super) versions: usize,
    pub(super) since: Option<Instant>,
    /// Blobs unreferenced by deferred commits: removed once those commits are durable.
    pub(super) unreferenced: Vec<Hash>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort: a failure here only means applied pages are re-fetched after restart
        // (and blobs they unreferenced are left for `collect_garbage`).
        let _ = self.flush();
    }
}

impl Inner {
    /// Records a commit's effect on what is pending durability; returns the blobs that are
    /// now safe to remove (unreferenced by commits that are durable).
    pub(super) fn note_commit(
        &self,
        durability: Durability,
        versions: usize,
        unreferenced: Vec<Hash>,
    ) -> Vec<Hash> {
        let mut pending = lock(&self.pending);
        match durability {
            Durability::Immediate => {
                let mut done = std::mem::take(&mut *pending).unreferenced;
                done.extend(unreferenced);
                done
            }
            Durability::Deferred => {
                if versions > 0 {
                    pending.versions += versions;
                    pending.since.get_or_insert_with(Instant::now);
                }
                pending.unreferenced.extend(unreferenced);
                Vec::new()
            }
        }
    }

    fn flush(&self) -> Result<()> {
        self.store.flush()?;
        let removable = self.note_commit(Durability::Immediate, 0, Vec::new());
        self.remove_unreferenced(&removable);
        Ok(())
    }
}

impl SyncEngine {
    /// Deferred while a bulk transfer is under way; durable when a page carrying versions was
    /// the sender's last, or when enough versions or time have accumulated (see
    /// docs/protocol.md). A page without versions (advances and knowledge only) stays
    /// deferred: losing it costs one round.
    pub(super) fn durability_for(&self, sender_has_more: bool, versions: usize) -> Durability {
        if versions == 0 {
            return Durability::Deferred;
        }
        let pending = lock(&self.inner.pending);
        let due = pending.versions + versions >= self.inner.config.checkpoint.versions
            || pending
                .since
                .is_some_and(|t| t.elapsed() >= self.inner.config.checkpoint.interval);
        if !sender_has_more || due {
            Durability::Immediate
        } else {
            Durability::Deferred
        }
    }

    /// Makes every applied page durable now.
    ///
    /// # Errors
    /// A store failure.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}
