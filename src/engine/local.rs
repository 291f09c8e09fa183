//! Local reads and writes: records, files, residency, and what a node holds.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use crate::blob::{write_blob, BlobStore};
use crate::error::{InputError, Result, StoreError};
use crate::hash::Hash;
use crate::hlc::{Hlc, NodeId};
use crate::notify::ChangeKind;
use crate::record::{BlobRef, Key, Op, Residency, Scope, Version};
use crate::store::{Advance, Batch, Durability, KeyRange};
use crate::watermark::ScopedWatermarks;

use super::{lock, SyncEngine};

/// How many times a local write issues its timestamps again when another writer sharing the
/// store moved its clock first ([`StoreError::IssuedBehind`]).
const ISSUE_ATTEMPTS: u32 = 64;

/// How much further ahead of the other writer each retry issues: a millisecond (NTP64).
const RETRY_LEAD: u64 = (1 << 32) / 1000;

/// Records of a scope by residency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResidencyCounts {
    /// Rows whose blob is not local yet.
    pub staged: usize,
    /// Rows with their blob, or without one.
    pub resident: usize,
    /// Deleted keys (tombstones).
    pub tombstoned: usize,
}

/// A live record as read by applications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key.
    pub key: Key,
    /// The value.
    pub value: Vec<u8>,
    /// The attached file, if any.
    pub blob: Option<BlobRef>,
    /// The version's timestamp (its origin is the writer).
    pub hlc: Hlc,
}

impl Record {
    fn from_version(key: Key, v: Version) -> Option<Record> {
        match v.op {
            Op::Put { value, blob } => Some(Record {
                key,
                value,
                blob,
                hlc: v.hlc,
            }),
            Op::Delete => None,
        }
    }
}

impl SyncEngine {
    /// Writes a record with a file: streams `content` into the blob store in chunks (never
    /// whole in memory), verifies and fsyncs it, then writes the record pointing at it.
    /// Durable when this returns.
    ///
    /// # Errors
    /// Reading `content` or the blob store failed (no record is written), or as for
    /// [`SyncEngine::put`].
    pub fn put_file(
        &self,
        scope: &Scope,
        key: &Key,
        value: impl Into<Vec<u8>>,
        content: &mut dyn Read,
    ) -> Result<Hlc> {
        let blob = write_blob(&*self.inner.blobs, content, None)?;
        // Keep the blob until the record that references it is committed. (Should a sweep
        // remove identical unreferenced content between `finish` and here, the write below
        // fails cleanly with `BlobNotLocal`.)
        let written = {
            let _pin = self.pin(blob.hash);
            self.write(
                scope,
                key,
                Op::Put {
                    value: value.into(),
                    blob: Some(blob),
                },
            )
        };
        if written.is_err() {
            // No record references the new blob (unless another one already did).
            self.remove_unreferenced(&[blob.hash]);
        }
        written
    }

    /// Writes a record with the file at `path`, streamed in chunks (see
    /// [`SyncEngine::put_file`]).
    ///
    /// # Errors
    /// The file cannot be opened or read (no record is written), or as for
    /// [`SyncEngine::put_file`].
    pub fn put_file_path(
        &self,
        scope: &Scope,
        key: &Key,
        value: impl Into<Vec<u8>>,
        path: impl AsRef<Path>,
    ) -> Result<Hlc> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| crate::blob::BlobError::Io {
            path: path.to_owned(),
            source,
        })?;
        self.put_file(scope, key, value, &mut std::io::BufReader::new(file))
    }

    /// Writes a record with a file given as bytes (see [`SyncEngine::put_file`]).
    ///
    /// # Errors
    /// As for [`SyncEngine::put_file`].
    pub fn put_file_bytes(
        &self,
        scope: &Scope,
        key: &Key,
        value: impl Into<Vec<u8>>,
        content: &[u8],
    ) -> Result<Hlc> {
        self.put_file(scope, key, value, &mut std::io::Cursor::new(content))
    }

    /// The file of the live record under `key`: its reference and a chunked reader, or
    /// `None` if the record is absent, deleted, has no file, or its file is not local yet
    /// (Staged).
    ///
    /// # Errors
    /// A store failure.
    pub fn open_file(
        &self,
        scope: &Scope,
        key: &Key,
    ) -> Result<Option<(BlobRef, Box<dyn Read + Send>)>> {
        let Some(blob) = self.get(scope, key)?.and_then(|r| r.blob) else {
            return Ok(None);
        };
        Ok(self
            .inner
            .blobs
            .open(&blob.hash)?
            .map(|(_, reader)| (blob, reader)))
    }

    /// Where the record under `key` stands on this node (derived, never stored).
    ///
    /// # Errors
    /// A store failure.
    pub fn residency(&self, scope: &Scope, key: &Key) -> Result<Residency> {
        let version = self.get_version(scope, key)?;
        self.residency_of(version.as_ref())
    }

    /// The residency of `version` (as read with [`SyncEngine::get_version`]), without
    /// reading it again. Callers outside the engine get a record's residency with the
    /// record, from [`crate::api::NodeApi`].
    ///
    /// # Errors
    /// The blob store failed.
    pub(super) fn residency_of(&self, version: Option<&Version>) -> Result<Residency> {
        let local = match version.and_then(Version::blob) {
            Some(b) => self.inner.blobs.contains(&b.hash)?,
            None => true,
        };
        Ok(Residency::of(version, |_| local))
    }

    /// The residency of a live record (as read with [`SyncEngine::get`] or
    /// [`SyncEngine::scan`]): Staged while its file is not here, else Resident.
    ///
    /// # Errors
    /// The blob store failed.
    pub(super) fn record_residency(&self, record: &Record) -> Result<Residency> {
        Ok(match &record.blob {
            Some(b) if !self.inner.blobs.contains(&b.hash)? => Residency::Staged,
            _ => Residency::Resident,
        })
    }

    /// How many records of `scope` are Staged, Resident and Tombstoned (a full scan).
    ///
    /// # Errors
    /// A store failure.
    pub fn residency_counts(&self, scope: &Scope) -> Result<ResidencyCounts> {
        let mut counts = ResidencyCounts::default();
        for (_, v) in self.versions(scope)? {
            match self.residency_of(Some(&v))? {
                Residency::Staged => counts.staged += 1,
                Residency::Resident => counts.resident += 1,
                Residency::Tombstoned => counts.tombstoned += 1,
                Residency::Absent => {}
            }
        }
        Ok(counts)
    }

    /// The blob store.
    pub fn blob_store(&self) -> &Arc<dyn BlobStore> {
        &self.inner.blobs
    }

    /// Removes every stored blob that no version references and nothing pins (blobs left
    /// by a crash or an interrupted sync). Returns how many were removed.
    ///
    /// # Errors
    /// A store or blob store failure.
    pub fn collect_garbage(&self) -> Result<usize> {
        let mut removed = 0;
        for (hash, _) in self.inner.blobs.list()? {
            if self.remove_if_unused(&hash)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes `value` under `key`; durable when this returns.
    ///
    /// # Errors
    /// A value over the size limit, a store failure, or an exhausted clock.
    pub fn put(&self, scope: &Scope, key: &Key, value: impl Into<Vec<u8>>) -> Result<Hlc> {
        self.write(
            scope,
            key,
            Op::Put {
                value: value.into(),
                blob: None,
            },
        )
    }

    /// Deletes `key` by writing a tombstone; durable when this returns.
    ///
    /// # Errors
    /// A store failure, or an exhausted clock.
    pub fn delete(&self, scope: &Scope, key: &Key) -> Result<Hlc> {
        self.write(scope, key, Op::Delete)
    }

    /// Writes one op; durable when this returns.
    ///
    /// # Errors
    /// A value over the size limit, a store failure, or an exhausted clock.
    pub fn write(&self, scope: &Scope, key: &Key, op: Op) -> Result<Hlc> {
        let hlcs = self.write_batch([(scope.clone(), key.clone(), op)])?;
        Ok(hlcs[0])
    }

    /// Writes several ops in one durable transaction, each with its own fresh Hlc.
    ///
    /// # Errors
    /// A value over the size limit or a blob that is not local (nothing is written), a store
    /// failure, or an exhausted clock.
    pub fn write_batch(&self, ops: impl IntoIterator<Item = (Scope, Key, Op)>) -> Result<Vec<Hlc>> {
        let ops: Vec<_> = ops.into_iter().collect();
        for (_, _, op) in &ops {
            op.validate()?;
        }
        let blobs = ops.iter().filter_map(|(_, _, op)| match op {
            Op::Put { blob: Some(b), .. } => Some(b.hash),
            _ => None,
        });
        // IMPORTANT: pinned until the commit, so a blob cannot be removed in between; and
        // one found here may have a name not yet durable (a peer's upload whose page has
        // not committed, a fetch whose sync failed): synced before a record counts on it,
        // or nothing is written.
        let (_pins, ()) = self.pin_for_commit(blobs.clone(), || {
            for hash in blobs {
                if !self.inner.blobs.contains(&hash)? {
                    return Err(InputError::BlobNotLocal { hash }.into());
                }
            }
            Ok(())
        })?;
        let _guard = lock(&self.inner.local_writes);
        let mut batch = Batch::new(0, Durability::Immediate);
        let unstamped = Hlc::new(0, self.node_id());
        for (scope, key, op) in ops {
            batch
                .upserts
                .push((scope, key, Version { hlc: unstamped, op }));
        }
        let mut attempts = 0;
        let report = loop {
            self.stamp(&mut batch)?;
            match self.inner.store.commit(&batch) {
                Ok(report) => break report,
                // Another process writing through the same store (a hub over PostgreSQL)
                // issued a later time, or took a fresh id: follow it and issue again. A
                // writer that keeps committing first would win every race by one tick, so
                // each retry issues a millisecond more ahead of it than the last.
                Err(StoreError::IssuedBehind {
                    before, identity, ..
                }) if attempts < ISSUE_ATTEMPTS => {
                    attempts += 1;
                    let lead = RETRY_LEAD.saturating_mul(u64::from(attempts));
                    self.follow_store_clock(before.saturating_add(lead), identity);
                }
                Err(e) => return Err(e.into()),
            }
        };
        drop(_guard);
        let hlcs: Vec<Hlc> = batch.upserts.iter().map(|(_, _, v)| v.hlc).collect();
        let removable = self
            .inner
            .note_commit(Durability::Immediate, 0, report.unreferenced);
        self.remove_unreferenced(&removable);
        self.announce(
            ChangeKind::LocalChangeRecorded,
            None,
            batch.upserts.iter().map(|(s, k, v)| (s, k, v.hlc)),
        );
        self.inner
            .notifier
            .scopes_changed(batch.advances.iter().map(|a| &a.scope), None);
        Ok(hlcs)
    }

    /// Gives each of `batch`'s versions a fresh timestamp, with the advances of our marks
    /// that cover them.
    fn stamp(&self, batch: &mut Batch) -> Result<()> {
        batch.issued = None;
        batch.advances.clear();
        for (scope, _, version) in &mut batch.upserts {
            let hlc = self.inner.clock.issue()?;
            batch.issued.get_or_insert(hlc);
            batch.advances.push(Advance {
                scope: scope.clone(),
                base: None,
                top: hlc,
            });
            version.hlc = hlc;
        }
        batch.clock = self.inner.clock.last();
        Ok(())
    }

    /// Takes the stored clock and identity another writer of the store left (see
    /// [`StoreError::IssuedBehind`]).
    fn follow_store_clock(&self, clock: u64, identity: Option<NodeId>) {
        let clock_of = &self.inner.clock;
        match identity {
            Some(id) if id != clock_of.id() => {
                tracing::warn!(
                    old = %clock_of.id(), new = %id,
                    "another process sharing this store took a fresh node id; following it"
                );
                clock_of.rotate(id, clock);
            }
            _ => clock_of.restore(clock),
        }
    }

    /// The live record under `key` (`None` if absent or deleted).
    ///
    /// # Errors
    /// A store failure.
    pub fn get(&self, scope: &Scope, key: &Key) -> Result<Option<Record>> {
        Ok(self
            .get_version(scope, key)?
            .and_then(|v| Record::from_version(key.clone(), v)))
    }

    /// The stored version under `key`, tombstones included.
    ///
    /// # Errors
    /// A store failure.
    pub fn get_version(&self, scope: &Scope, key: &Key) -> Result<Option<Version>> {
        Ok(self.inner.store.read()?.get(scope, key)?)
    }

    /// Live records of `scope` in key order: keys starting with `prefix`, strictly after
    /// `after`, at most `limit`.
    ///
    /// # Errors
    /// A store failure.
    pub fn scan(
        &self,
        scope: &Scope,
        prefix: &[u8],
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<Record>> {
        let read = self.inner.store.read()?;
        let mut out = Vec::new();
        let mut range = KeyRange {
            prefix: prefix.to_vec(),
            after: after.cloned(),
            limit: limit.clamp(1, 1000),
        };
        while out.len() < limit {
            let rows = read.scan(scope, &range)?;
            let Some((last, _)) = rows.last() else { break };
            range.after = Some(last.clone());
            let exhausted = rows.len() < range.limit;
            out.extend(
                rows.into_iter()
                    .filter_map(|(k, v)| Record::from_version(k, v)),
            );
            if exhausted {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Every stored version of `scope`, tombstones included, in key order.
    ///
    /// # Errors
    /// A store failure.
    pub fn versions(&self, scope: &Scope) -> Result<Vec<(Key, Version)>> {
        let read = self.inner.store.read()?;
        let mut out = Vec::new();
        let mut range = KeyRange {
            limit: 1000,
            ..KeyRange::default()
        };
        loop {
            let rows = read.scan(scope, &range)?;
            let done = rows.len() < range.limit;
            range.after = rows.last().map(|(k, _)| k.clone());
            out.extend(rows);
            if done {
                return Ok(out);
            }
        }
    }

    /// The scopes this node holds records or watermarks in.
    ///
    /// # Errors
    /// A store failure.
    pub fn scopes(&self) -> Result<Vec<Scope>> {
        Ok(self.inner.store.read()?.scopes()?)
    }

    /// A blake3 digest of every stored version (scope, key, Hlc, op), tombstones included:
    /// two nodes with equal digests hold the same state.
    ///
    /// # Errors
    /// A store failure.
    pub fn digest(&self) -> Result<Hash> {
        let mut h = blake3::Hasher::new();
        for scope in self.scopes()? {
            for (key, version) in self.versions(&scope)? {
                let row = postcard::to_allocvec(&(&scope, &key, &version))
                    .expect("postcard encoding into a Vec does not fail");
                h.update(&(row.len() as u64).to_le_bytes());
                h.update(&row);
            }
        }
        Ok(h.finalize().into())
    }

    /// The purge floor of every scope that has one: the newest tombstone purged there (see
    /// [`SyncEngine::purge`]).
    ///
    /// # Errors
    /// A store failure.
    pub fn floors(&self) -> Result<std::collections::BTreeMap<Scope, u64>> {
        Ok(self.inner.store.read()?.floors()?)
    }

    /// This node's watermarks in every scope.
    ///
    /// # Errors
    /// A store failure.
    pub fn watermarks(&self) -> Result<ScopedWatermarks> {
        Ok(self.inner.store.read()?.watermarks()?)
    }

    /// What this node last learned of `peer`'s watermarks (`None` if never met).
    ///
    /// # Errors
    /// A store failure.
    pub fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>> {
        Ok(self.inner.store.read()?.peer_watermarks(peer)?)
    }

    /// The peers this node has exchanged with.
    ///
    /// # Errors
    /// A store failure.
    pub fn peers(&self) -> Result<Vec<NodeId>> {
        Ok(self.inner.store.read()?.peers()?)
    }

    /// The clock's last issued or observed time (NTP64).
    pub fn clock_time(&self) -> u64 {
        self.inner.clock.last()
    }
}
