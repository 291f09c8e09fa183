//! Blob transfers within a round, and keeping blobs alive while they are in use.
//!
//! Before the initiator sends a page, it asks the responder which of the page's blobs it
//! lacks and uploads only those (destination short-circuit). After it receives the
//! responder's page, and before applying it, it fetches the blobs of the versions it will
//! keep and does not hold. Each hash moves at most once per round, a hash already being
//! fetched by another round is not fetched again (in-flight dedupe: that round's version
//! stays Staged and the next round finds the blob), and at most [`TRANSFER_CONCURRENCY`]
//! transfers run at once. A blob that could not be had leaves its version Staged, and the
//! run's watermark stops just below it (see `apply::plan_run`).
//!
//! Pins protect blobs from removal between their arrival and the commit that references
//! them: a blob whose reference count falls to zero is removed only if nothing pins it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use futures_util::stream::{self, StreamExt};

use super::{lock, Inner, SyncEngine, UPLOAD_GRACE};
use crate::blob::pipe::PipedWriter;
use crate::blob::BlobError;
use crate::blocking::run_blocking;
use crate::error::TransportError;
use crate::hash::Hash;
use crate::hlc::Hlc;
use crate::notify::{Event, SyncEvent};
use crate::record::{BlobRef, Key, Scope, Version};
use crate::transport::Transport;

/// Transfers running at once in one round.
pub const TRANSFER_CONCURRENCY: usize = 4;

/// What keeps blobs from removal while they are in use. One lock, so that a removal sees
/// every guard at once.
#[derive(Default)]
pub(super) struct BlobGuards {
    /// Blobs that must not be removed even if unreferenced: being written or fetched, and
    /// not yet referenced by a committed version. Counts per hash.
    pins: HashMap<Hash, usize>,
    /// Hashes being fetched by some round right now.
    in_flight: HashSet<Hash>,
    /// Blobs peers uploaded for a request not yet applied, with when they arrived: kept
    /// from removal until that request's page commits or [`UPLOAD_GRACE`] ends.
    uploads: HashMap<Hash, Instant>,
}

impl BlobGuards {
    /// Keeps a blob a peer uploaded from removal for [`UPLOAD_GRACE`], and forgets uploads
    /// older than that.
    pub(super) fn uploaded(&mut self, hash: Hash) {
        self.uploads
            .retain(|_, arrived| arrived.elapsed() < UPLOAD_GRACE);
        self.uploads.insert(hash, Instant::now());
    }

    /// Releases the uploads that a committed version now references.
    pub(super) fn referenced(&mut self, hashes: impl IntoIterator<Item = Hash>) {
        for hash in hashes {
            self.uploads.remove(&hash);
        }
    }
}

/// Keeps a blob from being removed while it lives.
pub(crate) struct Pin<'a> {
    guards: &'a Mutex<BlobGuards>,
    hash: Hash,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let pins = &mut lock(self.guards).pins;
        if let Some(n) = pins.get_mut(&self.hash) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.hash);
            }
        }
    }
}

/// Marks a fetch of a hash in flight; released when the fetch ends.
struct InFlight<'a> {
    guards: &'a Mutex<BlobGuards>,
    hash: Hash,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(self.guards).in_flight.remove(&self.hash);
    }
}

/// What the uploads of one round or one streamed push share: the hashes claimed (asked
/// about and uploaded by one page only), and the turns of at most [`TRANSFER_CONCURRENCY`]
/// uploads at once, given in the order asked (the semaphore is fair).
pub(crate) struct Uploads {
    claimed: Mutex<HashSet<Hash>>,
    budget: tokio::sync::Semaphore,
}

impl Default for Uploads {
    fn default() -> Self {
        Uploads {
            claimed: Mutex::default(),
            budget: tokio::sync::Semaphore::new(TRANSFER_CONCURRENCY),
        }
    }
}

/// A version received or sent, with its scope and key.
pub(crate) type Item<'a> = (&'a Scope, &'a Key, &'a Version);

/// The distinct blobs referenced by `versions`.
pub(crate) fn blobs_of<'a>(versions: impl IntoIterator<Item = Item<'a>>) -> Vec<BlobRef> {
    let mut seen = HashSet::new();
    versions
        .into_iter()
        .filter_map(|(_, _, v)| v.blob().copied())
        .filter(|b| seen.insert(b.hash))
        .collect()
}

impl Inner {
    /// Removes blobs that lost their last reference, unless a transfer or write pins them.
    pub(super) fn remove_unreferenced(&self, hashes: &[Hash]) {
        for hash in hashes {
            // Best effort: a blob left behind is found again by `collect_garbage`.
            let _ = self.remove_if_unused(hash);
        }
    }

    /// Removes `hash` if nothing pins it and no stored version references it. Returns
    /// whether it was removed.
    ///
    /// IMPORTANT: the guards stay locked from the check to the removal, so a transfer or
    /// write that pins the hash either comes first (and the blob stays) or after (and finds
    /// it gone, and fetches or writes it again).
    pub(super) fn remove_if_unused(&self, hash: &Hash) -> crate::Result<bool> {
        let guards = lock(&self.guards);
        let uploaded = guards
            .uploads
            .get(hash)
            .is_some_and(|t| t.elapsed() < UPLOAD_GRACE);
        if uploaded || guards.pins.contains_key(hash) || self.store.read()?.blob_refs(hash)? > 0 {
            return Ok(false);
        }
        let removed = self.blobs.remove(hash)?;
        drop(guards);
        Ok(removed)
    }
}

impl SyncEngine {
    /// Pins `hash` against removal until the returned guard drops.
    pub(crate) fn pin(&self, hash: Hash) -> Pin<'_> {
        *lock(&self.inner.guards).pins.entry(hash).or_insert(0) += 1;
        Pin {
            guards: &self.inner.guards,
            hash,
        }
    }

    /// Whether the blob is in the local store (a store failure counts as absent: the version
    /// is then held back, never shipped without its blob).
    pub(crate) fn has_blob(&self, blob: &BlobRef) -> bool {
        self.inner.blobs.contains(&blob.hash).unwrap_or(false)
    }

    fn claim_fetch(&self, hash: Hash) -> Option<InFlight<'_>> {
        lock(&self.inner.guards)
            .in_flight
            .insert(hash)
            .then_some(InFlight {
                guards: &self.inner.guards,
                hash,
            })
    }

    /// Removes blobs that lost their last reference, unless a transfer or write pins them.
    pub(crate) fn remove_unreferenced(&self, hashes: &[Hash]) {
        self.inner.remove_unreferenced(hashes);
    }

    /// Removes `hash` if nothing pins it and no stored version references it. Returns
    /// whether it was removed.
    pub(crate) fn remove_if_unused(&self, hash: &Hash) -> crate::Result<bool> {
        self.inner.remove_if_unused(hash)
    }

    /// Uploads the `blobs` (of versions about to be sent) that the responder lacks. Returns
    /// how many were pushed. Failures are not errors here: the responder applies those
    /// versions as Staged and reports the halt, and the next round retries.
    pub(crate) async fn push_blobs<T: Transport + ?Sized>(
        &self,
        transport: &T,
        blobs: Vec<BlobRef>,
    ) -> Result<usize, TransportError> {
        self.push_blobs_in(transport, blobs, &Uploads::default())
            .await
    }

    /// [`SyncEngine::push_blobs`] within `uploads`, which several pages' uploads share (a
    /// streamed push's frames, whose uploads overlap): a hash one of them claimed is not
    /// uploaded again, and at most [`TRANSFER_CONCURRENCY`] uploads run at once in all.
    ///
    /// # Errors
    /// The transport cannot tell which blobs the responder holds.
    pub(crate) async fn push_blobs_in<T: Transport + ?Sized>(
        &self,
        transport: &T,
        mut blobs: Vec<BlobRef>,
        uploads: &Uploads,
    ) -> Result<usize, TransportError> {
        // IMPORTANT: claimed before asking, on the first poll: pages are polled in order,
        // so of two that share a hash the earlier one claims it, and the later one (sent
        // after it, once its uploads have ended) neither asks about it nor uploads it.
        blobs.retain(|b| lock(&uploads.claimed).insert(b.hash));
        if blobs.is_empty() {
            return Ok(0);
        }
        let present = transport
            .blobs_present(blobs.iter().map(|b| b.hash).collect())
            .await?;
        let missing: Vec<BlobRef> = blobs
            .into_iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(b, _)| b)
            .collect();
        let pushed = stream::iter(missing)
            .map(|blob| async move {
                // Closed never: the budget lives as long as the uploads that share it.
                let Ok(_turn) = uploads.budget.acquire().await else {
                    return false;
                };
                let Ok(Some((_, reader))) = self.inner.blobs.open(&blob.hash) else {
                    return false;
                };
                transport.push_blob(blob, reader).await.is_ok()
            })
            .buffer_unordered(TRANSFER_CONCURRENCY)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        Ok(pushed)
    }

    /// The `versions` this node will keep (at least as new as what it stores) whose blob it
    /// does not hold, as (scope, key, Hlc, blob).
    fn missing_blobs<'a>(
        &self,
        versions: impl IntoIterator<Item = Item<'a>>,
    ) -> crate::Result<Vec<(Scope, Key, Hlc, BlobRef)>> {
        // Opened at the first version with a file: a page without any (most pages) costs
        // no read transaction.
        let mut read = None;
        let mut out = Vec::new();
        for (scope, key, v) in versions {
            let Some(blob) = v.blob() else { continue };
            let read = match &mut read {
                Some(read) => read,
                None => read.insert(self.inner.store.read()?),
            };
            let keeps = read.get(scope, key)?.is_none_or(|s| v.hlc >= s.hlc);
            if keeps && !self.inner.blobs.contains(&blob.hash)? {
                out.push((scope.clone(), key.clone(), v.hlc, *blob));
            }
        }
        Ok(out)
    }

    /// The distinct blobs to fetch before applying `versions`.
    pub(crate) fn needed_blobs<'a>(
        &self,
        versions: impl IntoIterator<Item = Item<'a>>,
    ) -> crate::Result<Vec<BlobRef>> {
        let mut seen = HashSet::new();
        Ok(self
            .missing_blobs(versions)?
            .into_iter()
            .map(|(.., b)| b)
            .filter(|b| seen.insert(b.hash))
            .collect())
    }

    /// Fetches `blobs` from the responder, verifying each; returns pins on the blobs that
    /// arrived (hold them until the page that references them is committed). The names
    /// of the blobs that arrived are made durable together, once all are in: a page of
    /// many small files costs one sync of each directory they went into. If that fails,
    /// no pin is returned (as if none had arrived), and the names stay pending:
    /// [`SyncEngine::sync_blob_names`] before a commit that references them tries again.
    pub(crate) async fn fetch_blobs<'a, T: Transport + ?Sized>(
        &'a self,
        transport: &T,
        blobs: Vec<BlobRef>,
    ) -> Vec<Pin<'a>> {
        let fetched: Vec<(Hash, Pin<'a>)> = stream::iter(blobs)
            .map(|blob| async move {
                let _claim = self.claim_fetch(blob.hash)?;
                let pin = self.pin(blob.hash);
                self.fetch_one(transport, blob)
                    .await
                    .ok()
                    .map(|()| (blob.hash, pin))
            })
            .buffer_unordered(TRANSFER_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        if fetched.is_empty() {
            return Vec::new();
        }
        let engine = self.handle();
        let error = match run_blocking(move || engine.sync_blob_names()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(error) = error {
            // The files stay, visible: the commit of a page that needs them syncs their
            // names first, or fails.
            tracing::warn!(%error, "cannot make the names of fetched files durable");
            return Vec::new();
        }
        let mut pins = Vec::with_capacity(fetched.len());
        for (hash, pin) in fetched {
            self.announce_content(hash).await;
            pins.push(pin);
        }
        pins
    }

    /// Makes the names of fetched blobs durable (see [`SyncEngine::fetch_blobs`]).
    pub(crate) fn sync_blob_names(&self) -> crate::Result<()> {
        Ok(self.inner.blobs.sync_names()?)
    }

    /// What a commit of versions that reference the blobs `hashes` holds from its presence
    /// check to the commit: a pin on each, then `check` (the presence check, whose answer
    /// is returned with the pins), then, if there are any pins, every pending blob name
    /// made durable (a file found present must survive a crash with the version that
    /// counts on it, and an upload or a fetch whose name sync failed left its name
    /// pending). The sync comes after the check, so a blob that arrived just before it is
    /// covered too.
    ///
    /// # Errors
    /// `check`'s; the names cannot be synced: the commit must not happen.
    pub(crate) fn pin_for_commit<T>(
        &self,
        hashes: impl IntoIterator<Item = Hash>,
        check: impl FnOnce() -> crate::Result<T>,
    ) -> crate::Result<(Vec<Pin<'_>>, T)> {
        let pins: Vec<_> = hashes.into_iter().map(|h| self.pin(h)).collect();
        let checked = check()?;
        if !pins.is_empty() {
            self.sync_blob_names()?;
        }
        Ok((pins, checked))
    }

    /// Fetches one blob: a large one's chunks are hashed and written on a blocking thread
    /// as they arrive ([`PipedWriter`]), and the blob is published with its name left to
    /// [`BlobStore::sync_names`](crate::blob::BlobStore::sync_names), which
    /// [`SyncEngine::fetch_blobs`] calls once for all of them.
    async fn fetch_one<T: Transport + ?Sized>(
        &self,
        transport: &T,
        blob: BlobRef,
    ) -> crate::Result<()> {
        let mut writer = Bounded {
            inner: PipedWriter::start(self.inner.blobs.writer()?, blob.size),
            room: blob.size,
        };
        transport.fetch_blob(blob, &mut writer).await?;
        // IMPORTANT: verified before it becomes visible; a mismatch stores nothing.
        writer.inner.finish(blob).await?;
        Ok(())
    }

    /// Publishes `content_ready` for a blob that just arrived if stored records already
    /// pointed at it (they were Staged, and are Resident now).
    async fn announce_content(&self, hash: Hash) {
        if !self.inner.notifier.has_subscribers() {
            return;
        }
        let engine = self.handle();
        let scopes = run_blocking(move || engine.inner.store.read()?.blob_scopes(&hash)).await;
        match scopes {
            Ok(Ok(scopes)) if !scopes.is_empty() => {
                self.inner
                    .notifier
                    .publish(Event::Sync(SyncEvent::ContentReady { hash, scopes }));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(%hash, error = %e, "cannot tell which records a fetched file serves")
            }
            Err(e) => {
                tracing::debug!(%hash, error = %e, "cannot tell which records a fetched file serves")
            }
        }
    }

    /// The (scope, key, Hlc) of `versions` whose needed blob is not local: they will be
    /// applied as Staged (and a run's mark stops below them).
    pub(crate) fn staged_keys<'a>(
        &self,
        versions: impl IntoIterator<Item = Item<'a>>,
    ) -> crate::Result<BTreeSet<(Scope, Key, Hlc)>> {
        Ok(self
            .missing_blobs(versions)?
            .into_iter()
            .map(|(s, k, h, _)| (s, k, h))
            .collect())
    }
}

impl From<BlobError> for crate::transport::Refusal {
    fn from(e: BlobError) -> Self {
        crate::transport::Refusal::from(&crate::Error::Blob(e))
    }
}

/// Refuses bytes beyond the expected size, so a peer cannot make us write more than the
/// blob it promised before the hash check in `finish` catches it.
struct Bounded<W> {
    inner: W,
    room: u64,
}

impl<W: std::io::Write> std::io::Write for Bounded<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.room {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "more bytes than the blob's size",
            ));
        }
        let n = self.inner.write(buf)?;
        self.room -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
