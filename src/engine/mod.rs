//! The sync engine: local reads and writes, and both halves of an exchange round.
//!
//! # One exchange round
//!
//! The initiator sends its watermarks for the scopes in play, a page of versions the
//! responder lacks according to what the initiator last learned of the responder's
//! watermarks (nothing on first contact), and a page limit. The responder applies that page
//! in one transaction (watermarks advanced only where a run continues from its own mark),
//! then answers with its watermarks and a page of what the initiator lacks according to the
//! request. The initiator applies that page, records the responder's watermarks as its
//! knowledge of the peer in the same transaction, and reports `has_more` while either side
//! still holds something the other lacks. Callers repeat while `has_more`.
//!
//! Watermarks that the other side already recorded travel as a 16-byte digest: the
//! initiator's when it believes the responder recorded exactly its current marks, the
//! responder's ("same") when they hash to the digest of the initiator's knowledge. The
//! responder checks an initiator's digest against what it recorded and, if they differ, asks
//! for the marks in full ([`crate::wire::ResponseMarks::Resend`]); `exchange` then sends the
//! request again in the same call. A miss costs a round trip, never a skipped version.
//!
//! ```
//! use highwater::{InProcess, Key, Scope, SyncEngine};
//!
//! # futures_executor::block_on(async {
//! let a = SyncEngine::in_memory()?;
//! let b = std::sync::Arc::new(SyncEngine::in_memory()?);
//! let notes = Scope::app("notes", "items")?;
//! a.put(&notes, &Key::try_from("n1")?, b"from a".to_vec())?;
//! b.put(&notes, &Key::try_from("n2")?, b"from b".to_vec())?;
//!
//! let to_b = InProcess::new(b.clone());
//! while a.exchange(&to_b).await?.has_more {}
//!
//! assert_eq!(a.digest()?, b.digest()?);
//! assert_eq!(a.watermarks()?, b.watermarks()?);
//! # Ok::<(), highwater::Error>(())
//! # }).unwrap();
//! ```

mod blobs;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::blob::{write_blob, BlobStore, FsBlobStore, MemBlobStore};
use crate::error::{Error, InputError, ProtocolError, Result};
use crate::exchange::{Halt, HaltReason, Page, Streams};
use crate::hash::Hash;
use crate::hlc::{Clock, Hlc, NodeId, TimeSource, WallClock};
use crate::notify::{Change, ChangeKind, Event, Notifier, SyncEvent};
use crate::record::{BlobRef, Key, Op, Residency, Scope, Version};
use crate::store::{
    Advance, Batch, Durability, KeyRange, MemStore, PeerKnowledge, RedbStore, Store,
};
use crate::transport::{Refusal, Responder, Transport};
use crate::watermark::{MarksDigest, ScopedWatermarks};
use crate::wire::{ExchangeRequest, ExchangeResponse, RequestMarks, ResponseMarks, ScopeFilter};

pub use self::blobs::TRANSFER_CONCURRENCY;
use crate::exchange::apply;
use crate::exchange::plan::{self, PageLimits};

/// How long a blob a peer uploaded is kept, unreferenced, for the request that will
/// reference it.
pub const UPLOAD_GRACE: Duration = Duration::from_secs(600);

/// The blob directory's name inside a node's data directory.
pub const BLOB_DIR: &str = "blobs";

/// The redb file's name inside a node's data directory.
pub const DB_FILE: &str = "highwater.redb";

/// The largest page byte budget: a quarter of the message limit, leaving room for one
/// maximal value past the budget and for the watermarks.
pub const MAX_PAGE_BYTES: usize = crate::wire::MAX_MESSAGE_LEN / 4;

/// When deferred (non-durable) page applies are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Make durable once this many versions were applied since the last durable commit.
    pub versions: usize,
    /// Make durable once the oldest non-durable apply is this old.
    pub interval: Duration,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            versions: 100_000,
            interval: Duration::from_secs(1),
        }
    }
}

/// Engine settings.
#[derive(Clone)]
pub struct EngineConfig {
    /// Versions per page this node asks for and ships (default 1000).
    pub page_limit: usize,
    /// Approximate bytes of keys and values per page (default 4 MiB, at most
    /// [`MAX_PAGE_BYTES`]).
    pub page_bytes: usize,
    /// The largest page limit this node grants a requester (default 10 000).
    pub max_page_limit: usize,
    /// Versions further ahead of the local clock are refused (default 5 s).
    pub max_drift: Duration,
    /// The physical time source (default: the system clock).
    pub time: Arc<dyn TimeSource>,
    /// When applied pages are made durable.
    pub checkpoint: Checkpoint,
    /// redb's page cache for a node opened from a directory (default
    /// [`RedbStore::CACHE_BYTES`], 64 MiB): more memory, fewer page writes while a large
    /// sync is applied (see docs/performance.md).
    pub cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            page_limit: 1000,
            page_bytes: 4 << 20,
            max_page_limit: 10_000,
            max_drift: Duration::from_secs(5),
            time: Arc::new(WallClock),
            checkpoint: Checkpoint::default(),
            cache_bytes: RedbStore::CACHE_BYTES,
        }
    }
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("page_limit", &self.page_limit)
            .field("page_bytes", &self.page_bytes)
            .field("max_page_limit", &self.max_page_limit)
            .field("max_drift", &self.max_drift)
            .field("checkpoint", &self.checkpoint)
            .field("cache_bytes", &self.cache_bytes)
            .finish_non_exhaustive()
    }
}

/// Options of one exchange round.
#[derive(Clone, Debug, Default)]
pub struct ExchangeOptions {
    /// The scopes in play (default: all).
    pub scopes: ScopeFilter,
    /// Overrides the configured page limit for this round.
    pub page_limit: Option<usize>,
}

/// What one round did, seen from the initiator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeOutcome {
    /// The responder.
    pub peer: NodeId,
    /// Versions this node sent.
    pub shipped: usize,
    /// Versions the peer sent.
    pub received: usize,
    /// Received versions that won last-write-wins and changed this node's state.
    pub applied: usize,
    /// Whether another round would move more (call again at once).
    pub has_more: bool,
    /// Origins whose streams this node halted (clock skew, own id, blob unavailable).
    pub halts: Vec<Halt>,
    /// Origins whose streams the peer halted.
    pub peer_halts: Vec<Halt>,
    /// Blobs uploaded to the peer.
    pub blobs_pushed: usize,
    /// Blobs fetched from the peer.
    pub blobs_fetched: usize,
}

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

struct Applied {
    received: usize,
    applied: usize,
    halts: Vec<Halt>,
    /// Whether any watermark may have moved.
    changed_marks: bool,
}

#[derive(Default)]
struct Pending {
    versions: usize,
    since: Option<Instant>,
    /// Blobs unreferenced by deferred commits: removed once those commits are durable.
    unreferenced: Vec<Hash>,
}

/// A replica: its store, clock and identity, and the exchange protocol.
pub struct SyncEngine {
    id: NodeId,
    clock: Clock,
    store: Box<dyn Store>,
    config: EngineConfig,
    /// IMPORTANT: held from issuing an Hlc until its write commits, so our own watermark
    /// never passes an uncommitted write of ours.
    local_writes: Mutex<()>,
    pending: Mutex<Pending>,
    /// Per peer, the streams each side halted in the last round between us (memory only:
    /// after a restart the first round relearns them).
    halts: Mutex<HashMap<NodeId, StreamHalts>>,
    /// Per peer, our marks as it recorded them in the last round between us, as far as we
    /// can tell (memory only: after a restart the first request carries them in full).
    held: Mutex<HashMap<NodeId, HeldMarks>>,
    blobs: Arc<dyn BlobStore>,
    /// Blobs that must not be removed even if unreferenced: being written or fetched, and
    /// not yet referenced by a committed version. Counts per hash.
    pins: Mutex<HashMap<Hash, usize>>,
    /// Hashes being fetched by some round right now.
    in_flight: Mutex<HashSet<Hash>>,
    /// Blobs peers uploaded for a request not yet applied, with when they arrived: kept
    /// from removal until that request's page commits or [`UPLOAD_GRACE`] ends.
    uploads: Mutex<HashMap<Hash, Instant>>,
    notifier: Notifier,
    last_exchange: Mutex<HashMap<NodeId, SystemTime>>,
}

/// The (scope, origin) streams halted in the last round with one peer.
#[derive(Default, Clone)]
struct StreamHalts {
    /// Streams we halted when the peer sent them.
    ours: Streams,
    /// Streams the peer halted when we sent them.
    theirs: Streams,
}

/// Our marks in play as a peer recorded them at the end of the last round between us, as a
/// digest: while our marks still hash to it, our requests to that peer carry the digest
/// alone. A belief only: the peer checks the digest against what it did record.
struct HeldMarks {
    /// The scopes in play in that round.
    scopes: ScopeFilter,
    /// The digest of our marks as the peer recorded them.
    digest: MarksDigest,
}

/// What the initiator keeps from planning its request, to finish the round.
struct Round {
    /// The halts remembered for the peer when the request was planned.
    halts: StreamHalts,
    /// Streams our planning blocked on a blob we lack.
    blocked: Streams,
    /// Our marks in play, which the request carries in full or as their digest.
    mine: ScopedWatermarks,
    /// Our knowledge of the peer's marks in play, whose digest the request carries.
    known: Option<ScopedWatermarks>,
}

/// The initiator's marks as the responder records them at the end of a round: the marks the
/// request stood for, raised to the `top` of every run of the response page. Both sides
/// compute it from the same messages, so the initiator knows what the responder recorded.
fn held_after(mut marks: ScopedWatermarks, page: &Page) -> ScopedWatermarks {
    for run in &page.runs {
        marks.observe(&run.scope, run.top);
    }
    marks
}

fn streams(halts: &[Halt]) -> Streams {
    halts.iter().map(|h| (h.scope.clone(), h.origin)).collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain data, valid whatever a panicking holder did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SyncEngine {
    /// Opens (or creates) a node in directory `dir` with default settings.
    ///
    /// # Errors
    /// The directory or its redb file cannot be created or opened.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, EngineConfig::default())
    }

    /// Opens (or creates) a node in directory `dir`.
    ///
    /// # Errors
    /// The directory or its redb file cannot be created or opened, or `config.max_drift`
    /// is out of range.
    pub fn open_with(dir: impl AsRef<Path>, config: EngineConfig) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| crate::error::StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Self::open_dir(dir, config, false)
    }

    /// Opens a node in `dir` that was restored from a backup, under a fresh node id.
    ///
    /// A restored node may have lost writes that peers still hold. Under its old id it would
    /// refuse them (see [`crate::HaltReason::OwnOrigin`]) and could issue new timestamps
    /// that collide with them; under a new id the old one is an ordinary origin, the lost
    /// writes flow back, and nothing collides.
    ///
    /// # Errors
    /// As for [`SyncEngine::open_with`].
    pub fn open_restored(dir: impl AsRef<Path>, config: EngineConfig) -> Result<Self> {
        Self::open_dir(dir.as_ref(), config, true)
    }

    /// Opens the redb file and blob directory of the existing directory `dir`.
    fn open_dir(dir: &Path, config: EngineConfig, fresh_identity: bool) -> Result<Self> {
        let store = RedbStore::open_with_cache(dir.join(DB_FILE), config.cache_bytes)?;
        if fresh_identity {
            store.replace_identity(NodeId::random())?;
        }
        let blobs = Arc::new(FsBlobStore::open(dir.join(BLOB_DIR))?);
        Self::with_stores(Box::new(store), blobs, config)
    }

    /// A node on `store` under a fresh node id (see [`SyncEngine::open_restored`]).
    ///
    /// # Errors
    /// A store failure, or `config.max_drift` out of range.
    pub fn with_fresh_identity(store: Box<dyn Store>, config: EngineConfig) -> Result<Self> {
        store.replace_identity(NodeId::random())?;
        Self::with_store(store, config)
    }

    /// A node held in memory, with default settings.
    ///
    /// # Errors
    /// Never in practice; the signature matches the other constructors.
    pub fn in_memory() -> Result<Self> {
        Self::in_memory_with(EngineConfig::default())
    }

    /// A node held in memory.
    ///
    /// # Errors
    /// `config.max_drift` is out of range.
    pub fn in_memory_with(config: EngineConfig) -> Result<Self> {
        Self::with_store(Box::new(MemStore::new()), config)
    }

    /// A node on any store, with its blobs in memory: reads (or assigns) its id and
    /// restores its clock.
    ///
    /// # Errors
    /// A store failure, or `config.max_drift` out of range.
    pub fn with_store(store: Box<dyn Store>, config: EngineConfig) -> Result<Self> {
        Self::with_stores(store, Arc::new(MemBlobStore::new()), config)
    }

    /// A node on any record store and blob store.
    ///
    /// # Errors
    /// A store failure, or `config.max_drift` out of range.
    pub fn with_stores(
        store: Box<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        mut config: EngineConfig,
    ) -> Result<Self> {
        // A page must fit a message with room for one maximal value and the watermarks.
        config.page_bytes = config.page_bytes.clamp(1, MAX_PAGE_BYTES);
        let id = store.identity(NodeId::random())?;
        let clock = Clock::new(id, config.time.clone(), config.max_drift)?;
        clock.restore(store.read()?.clock()?);
        Ok(SyncEngine {
            id,
            clock,
            store,
            config,
            local_writes: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
            halts: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            blobs,
            pins: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            uploads: Mutex::new(HashMap::new()),
            notifier: Notifier::new(),
            last_exchange: Mutex::new(HashMap::new()),
        })
    }

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
        let blob = write_blob(&*self.blobs, content, None)?;
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
    /// reading it again.
    ///
    /// # Errors
    /// The blob store failed.
    pub fn residency_of(&self, version: Option<&Version>) -> Result<Residency> {
        let local = match version.and_then(Version::blob) {
            Some(b) => self.blobs.contains(&b.hash)?,
            None => true,
        };
        Ok(Residency::of(version, |_| local))
    }

    /// The residency of a live record (as read with [`SyncEngine::get`] or
    /// [`SyncEngine::scan`]): Staged while its file is not here, else Resident.
    ///
    /// # Errors
    /// The blob store failed.
    pub fn record_residency(&self, record: &Record) -> Result<Residency> {
        Ok(match &record.blob {
            Some(b) if !self.blobs.contains(&b.hash)? => Residency::Staged,
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
        &self.blobs
    }

    /// Removes every stored blob that no version references and nothing pins (blobs left
    /// by a crash or an interrupted sync). Returns how many were removed.
    ///
    /// # Errors
    /// A store or blob store failure.
    pub fn collect_garbage(&self) -> Result<usize> {
        let mut removed = 0;
        for (hash, _) in self.blobs.list()? {
            if self.remove_if_unused(&hash)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
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
        let mut pins = Vec::new();
        for (_, _, op) in &ops {
            op.validate()?;
            if let Op::Put { blob: Some(b), .. } = op {
                // Pinned until the commit, so it cannot be removed in between.
                pins.push(self.pin(b.hash));
                if !self.blobs.contains(&b.hash)? {
                    return Err(InputError::BlobNotLocal { hash: b.hash }.into());
                }
            }
        }
        let _guard = lock(&self.local_writes);
        let mut batch = Batch::new(0, Durability::Immediate);
        let mut hlcs = Vec::with_capacity(ops.len());
        for (scope, key, op) in ops {
            let hlc = self.clock.issue()?;
            batch.advances.push(Advance {
                scope: scope.clone(),
                base: None,
                top: hlc,
            });
            batch.upserts.push((scope, key, Version { hlc, op }));
            hlcs.push(hlc);
        }
        batch.clock = self.clock.last();
        let report = self.store.commit(&batch)?;
        drop(_guard);
        let removable = self.note_commit(Durability::Immediate, 0, report.unreferenced);
        self.remove_unreferenced(&removable);
        self.announce(
            ChangeKind::LocalChangeRecorded,
            None,
            batch.upserts.iter().map(|(s, k, _)| (s, k)),
        );
        self.notifier
            .scopes_changed(batch.advances.iter().map(|a| &a.scope), None);
        Ok(hlcs)
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
        Ok(self.store.read()?.get(scope, key)?)
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
        let read = self.store.read()?;
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
        let read = self.store.read()?;
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
        Ok(self.store.read()?.scopes()?)
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

    /// This node's watermarks in every scope.
    ///
    /// # Errors
    /// A store failure.
    pub fn watermarks(&self) -> Result<ScopedWatermarks> {
        Ok(self.store.read()?.watermarks()?)
    }

    /// What this node last learned of `peer`'s watermarks (`None` if never met).
    ///
    /// # Errors
    /// A store failure.
    pub fn peer_watermarks(&self, peer: NodeId) -> Result<Option<ScopedWatermarks>> {
        Ok(self.store.read()?.peer_watermarks(peer)?)
    }

    /// The peers this node has exchanged with.
    ///
    /// # Errors
    /// A store failure.
    pub fn peers(&self) -> Result<Vec<NodeId>> {
        Ok(self.store.read()?.peers()?)
    }

    /// When each peer last completed a round with this node, in either role, since this
    /// engine was opened (memory only).
    pub fn last_exchanges(&self) -> HashMap<NodeId, SystemTime> {
        lock(&self.last_exchange).clone()
    }

    fn note_exchange(&self, peer: NodeId) {
        lock(&self.last_exchange).insert(peer, SystemTime::now());
    }

    /// The clock's last issued or observed time (NTP64).
    pub fn clock_time(&self) -> u64 {
        self.clock.last()
    }

    /// Makes every applied page durable now.
    ///
    /// # Errors
    /// A store failure.
    pub fn flush(&self) -> Result<()> {
        self.store.flush()?;
        let removable = self.note_commit(Durability::Immediate, 0, Vec::new());
        self.remove_unreferenced(&removable);
        Ok(())
    }

    /// Runs one exchange round as initiator over `transport`, for all scopes.
    ///
    /// # Errors
    /// The transport failed, the peer's answer broke the protocol (nothing of it is
    /// applied), or the store failed.
    pub async fn exchange<T: Transport + ?Sized>(&self, transport: &T) -> Result<ExchangeOutcome> {
        self.exchange_with(transport, &ExchangeOptions::default())
            .await
    }

    /// Runs one exchange round as initiator over `transport`.
    ///
    /// # Errors
    /// As for [`SyncEngine::exchange`].
    pub async fn exchange_with<T: Transport + ?Sized>(
        &self,
        transport: &T,
        options: &ExchangeOptions,
    ) -> Result<ExchangeOutcome> {
        let expected = transport.peer_id();
        if expected == Some(self.id) {
            return Err(ProtocolError::PeerIsSelf { node: self.id }.into());
        }
        let (request, round) = self.prepare_request(expected, options)?;
        let blobs_pushed = self.push_blobs(transport, &request.page).await?;
        let response = self.send_request(transport, &request, &round).await?;
        let needed = self.needed_blobs(&response.page)?;
        // Pins keep fetched blobs alive until the page that references them is committed.
        let fetched = self.fetch_blobs(transport, needed).await;
        let mut outcome = self.finish_round(expected, options, &request.page, &round, response)?;
        outcome.blobs_pushed = blobs_pushed;
        outcome.blobs_fetched = fetched.len();
        self.note_exchange(outcome.peer);
        Ok(outcome)
    }

    fn page_limits(&self, versions: usize) -> PageLimits {
        PageLimits {
            versions,
            bytes: self.config.page_bytes,
        }
    }

    fn marks_in_play(
        &self,
        read: &dyn crate::store::StoreRead,
        scopes: &ScopeFilter,
    ) -> Result<ScopedWatermarks> {
        let mut mine = read.watermarks()?;
        mine.retain(|s| scopes.contains(s));
        Ok(mine)
    }

    /// Sends `request`; if the peer cannot resolve its marks digest, sends it once more
    /// with the marks in full.
    async fn send_request<T: Transport + ?Sized>(
        &self,
        transport: &T,
        request: &ExchangeRequest,
        round: &Round,
    ) -> Result<ExchangeResponse> {
        let response = transport.exchange(request.clone()).await?;
        if !matches!(response.marks, ResponseMarks::Resend) {
            return Ok(response);
        }
        let resend_refused = |peer| ProtocolError::UnexpectedMarks {
            peer,
            reason: "resend asked for marks sent in full",
        };
        if matches!(request.marks, RequestMarks::Full(_)) {
            return Err(resend_refused(response.from).into());
        }
        let mut full = request.clone();
        full.marks = RequestMarks::Full(round.mine.clone());
        let response = transport.exchange(full).await?;
        if matches!(response.marks, ResponseMarks::Resend) {
            return Err(resend_refused(response.from).into());
        }
        Ok(response)
    }

    /// The request of a round, and what finishing the round needs of its planning.
    fn prepare_request(
        &self,
        peer: Option<NodeId>,
        options: &ExchangeOptions,
    ) -> Result<(ExchangeRequest, Round)> {
        let read = self.store.read()?;
        let mine = self.marks_in_play(&*read, &options.scopes)?;
        let limit = options.page_limit.unwrap_or(self.config.page_limit).max(1);
        let known = match peer {
            Some(p) => read.peer_watermarks(p)?,
            None => None,
        };
        let halts = peer
            .and_then(|p| lock(&self.halts).get(&p).cloned())
            .unwrap_or_default();
        let mut blocked = BTreeSet::new();
        // First contact: we do not know what the peer holds, so we ship nothing yet.
        let page = match &known {
            Some(theirs) => plan::plan_page(
                &*read,
                &mine,
                theirs,
                self.page_limits(limit),
                &halts.theirs,
                &|b: &BlobRef| self.has_blob(b),
                &mut blocked,
            )?,
            None => Page::default(),
        };
        drop(read);
        let known = known.map(|mut k| {
            k.retain(|s| options.scopes.contains(s));
            k
        });
        let request = ExchangeRequest {
            from: self.id,
            scopes: options.scopes.clone(),
            marks: self.request_marks(peer, &options.scopes, &mine),
            known: known.as_ref().map(ScopedWatermarks::digest),
            page,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            deferred: halts.ours.iter().cloned().collect(),
        };
        let round = Round {
            halts,
            blocked,
            mine,
            known,
        };
        Ok((request, round))
    }

    /// Our marks for a request to `peer`: their digest if the peer recorded exactly these in
    /// our last round with it over the same scopes, else in full.
    fn request_marks(
        &self,
        peer: Option<NodeId>,
        scopes: &ScopeFilter,
        mine: &ScopedWatermarks,
    ) -> RequestMarks {
        // IMPORTANT: taken, not read. It is put back only when this round completes, so a
        // round that fails or is dropped half-way leaves the next request in full.
        let held = peer.and_then(|p| lock(&self.held).remove(&p));
        match held {
            Some(h) if h.scopes == *scopes && h.digest == mine.digest() => {
                RequestMarks::Digest(h.digest)
            }
            _ => RequestMarks::Full(mine.clone()),
        }
    }

    fn finish_round(
        &self,
        expected: Option<NodeId>,
        options: &ExchangeOptions,
        shipped: &Page,
        round: &Round,
        response: ExchangeResponse,
    ) -> Result<ExchangeOutcome> {
        let peer = response.from;
        if peer == self.id {
            return Err(ProtocolError::PeerIsSelf { node: self.id }.into());
        }
        if let Some(expected) = expected.filter(|e| *e != peer) {
            return Err(ProtocolError::UnexpectedPeer {
                expected,
                found: peer,
            }
            .into());
        }
        let theirs = match response.marks {
            ResponseMarks::Full(mut marks) => {
                marks.retain(|s| options.scopes.contains(s));
                marks
            }
            ResponseMarks::Same => round.known.clone().ok_or(ProtocolError::UnexpectedMarks {
                peer,
                reason: "same marks, but the request named none",
            })?,
            ResponseMarks::Resend => {
                return Err(ProtocolError::UnexpectedMarks {
                    peer,
                    reason: "resend asked for marks sent in full",
                }
                .into())
            }
        };
        let knowledge = PeerKnowledge {
            peer,
            scopes: options.scopes.clone(),
            marks: theirs.clone(),
        };
        let applied = self.apply_page(&response.page, &options.scopes, knowledge)?;
        self.remember_halts(
            peer,
            shipped,
            &response.page,
            &response.halts,
            &applied.halts,
        );
        // After a halt our marks stay below what the peer recorded: no digest next time.
        if applied.halts.is_empty() {
            let held = held_after(round.mine.clone(), &response.page);
            lock(&self.held).insert(
                peer,
                HeldMarks {
                    scopes: options.scopes.clone(),
                    digest: held.digest(),
                },
            );
        }
        let mine = self.marks_in_play(&*self.store.read()?, &options.scopes)?;
        let halted = |scope: &Scope, origin: NodeId| {
            response
                .halts
                .iter()
                .any(|h| h.scope == *scope && h.origin == origin)
        };
        self.announce(
            ChangeKind::LocalDataSynced,
            Some(peer),
            shipped
                .runs
                .iter()
                .filter(|r| !halted(&r.scope, r.origin))
                .flat_map(|r| r.versions.iter().map(move |(k, _)| (&r.scope, k))),
        );
        let peer_lacks = mine.iter().any(|(scope, marks)| {
            marks.iter().any(|mark| {
                theirs.get(scope, mark.origin()) < Some(mark)
                    && !halted(scope, mark.origin())
                    && !round.blocked.contains(&(scope.clone(), mark.origin()))
            })
        });
        Ok(ExchangeOutcome {
            peer,
            shipped: shipped.version_count(),
            received: applied.received,
            applied: applied.applied,
            has_more: response.page.more_beyond(&applied.halts, &round.halts.ours)
                || shipped.more_beyond(&response.halts, &round.halts.theirs)
                || peer_lacks,
            halts: applied.halts,
            peer_halts: response.halts,
            blobs_pushed: 0,
            blobs_fetched: 0,
        })
    }

    /// A stream stays halted, in either direction, until it is sent again and applies.
    fn remember_halts(
        &self,
        peer: NodeId,
        shipped: &Page,
        received: &Page,
        theirs: &[Halt],
        ours: &[Halt],
    ) {
        let mut all = lock(&self.halts);
        let known = all.entry(peer).or_default();
        let update = |set: &mut Streams, sent: &Page, halted: &[Halt]| {
            for (scope, origin) in sent.streams() {
                set.remove(&(scope.clone(), origin));
            }
            set.extend(streams(halted));
        };
        update(&mut known.ours, received, ours);
        update(&mut known.theirs, shipped, theirs);
    }

    /// Applies a received page in one transaction, with the sender's watermarks as knowledge.
    fn apply_page(
        &self,
        page: &Page,
        scopes: &ScopeFilter,
        knowledge: PeerKnowledge,
    ) -> Result<Applied> {
        apply::validate_page(page, scopes)?;
        let read = self.store.read()?;
        let own = read.watermarks()?;
        let unchanged_knowledge = page.runs.is_empty()
            && read.peer_watermarks(knowledge.peer)?.is_some_and(|k| {
                let mut k = k;
                k.retain(|s| scopes.contains(s));
                k == knowledge.marks
            });
        drop(read);
        // IMPORTANT: pinned from the presence check to the commit, so a blob found present
        // here cannot be removed before the version that references it is stored.
        let _pins: Vec<_> = page
            .runs
            .iter()
            .flat_map(|r| r.versions.iter().filter_map(|(_, v)| v.blob()))
            .map(|b| self.pin(b.hash))
            .collect();
        let staged = self.staged_keys(page)?;
        let mut batch = Batch::new(0, Durability::Deferred);
        let mut halts = Vec::new();
        for run in &page.runs {
            let plan = apply::plan_run(
                run,
                self.id,
                own.get(&run.scope, self.id),
                |h| self.clock.check(h),
                |key, v| !staged.contains(&(run.scope.clone(), key.clone(), v.hlc)),
            );
            batch.upserts.extend(plan.upserts);
            batch.advances.extend(plan.advance);
            halts.extend(plan.halt);
        }
        let received = page.version_count();
        let knowledge_peer = knowledge.peer;
        if unchanged_knowledge {
            self.announce_halts(knowledge_peer, &halts);
            return Ok(Applied {
                received,
                applied: 0,
                halts,
                changed_marks: false,
            });
        }
        if let Some(max) = batch.upserts.iter().map(|(_, _, v)| v.hlc).max() {
            // Every accepted version passed the drift check in plan_run.
            self.clock.raise(max);
        }
        batch.clock = self.clock.last();
        batch.peer = Some(knowledge);
        batch.durability = self.durability_for(page.more, batch.upserts.len());
        let report = self.store.commit(&batch)?;
        {
            let mut uploads = lock(&self.uploads);
            for (_, _, v) in &batch.upserts {
                if let Some(b) = v.blob() {
                    uploads.remove(&b.hash);
                }
            }
        }
        // IMPORTANT: a blob unreferenced by a commit a crash may take back is removed only
        // once that commit is durable.
        let durable = self.note_commit(batch.durability, batch.upserts.len(), report.unreferenced);
        self.remove_unreferenced(&durable);
        self.announce(
            ChangeKind::RemoteUpdateAvailable,
            Some(knowledge_peer),
            report.applied.iter().map(|&i| {
                let (s, k, _) = &batch.upserts[i];
                (s, k)
            }),
        );
        self.notifier.scopes_changed(
            batch.advances.iter().map(|a| &a.scope),
            Some(knowledge_peer),
        );
        self.announce_halts(knowledge_peer, &halts);
        Ok(Applied {
            received,
            applied: report.applied.len(),
            halts,
            changed_marks: !batch.advances.is_empty(),
        })
    }

    /// Deferred while a bulk transfer is under way; durable when a page carrying versions was
    /// the sender's last, or when enough versions or time have accumulated (see
    /// docs/protocol.md). A page without versions (advances and knowledge only) stays
    /// deferred: losing it costs one round.
    fn durability_for(&self, sender_has_more: bool, versions: usize) -> Durability {
        if versions == 0 {
            return Durability::Deferred;
        }
        let pending = lock(&self.pending);
        let due = pending.versions + versions >= self.config.checkpoint.versions
            || pending
                .since
                .is_some_and(|t| t.elapsed() >= self.config.checkpoint.interval);
        if !sender_has_more || due {
            Durability::Immediate
        } else {
            Durability::Deferred
        }
    }

    /// Records a commit's effect on what is pending durability; returns the blobs that are
    /// now safe to remove (unreferenced by commits that are durable).
    fn note_commit(
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

    /// The node's event notifier: subscribe to changes and sync events.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Publishes one change event per scope for `keys` (grouped in order), if anyone listens.
    fn announce<'a>(
        &self,
        kind: ChangeKind,
        peer: Option<NodeId>,
        keys: impl IntoIterator<Item = (&'a Scope, &'a Key)>,
    ) {
        if !self.notifier.has_subscribers() {
            return;
        }
        let mut by_scope: Vec<Change> = Vec::new();
        for (scope, key) in keys {
            match by_scope.iter_mut().find(|c| c.scope == *scope) {
                Some(c) => c.keys.push(key.clone()),
                None => by_scope.push(Change {
                    kind,
                    scope: scope.clone(),
                    keys: vec![key.clone()],
                    peer,
                }),
            }
        }
        for change in by_scope {
            self.notifier.publish(Event::Change(change));
        }
    }

    fn announce_halts(&self, peer: NodeId, halts: &[Halt]) {
        for h in halts {
            let event = match &h.reason {
                HaltReason::ClockSkew { ahead_by_ms } => SyncEvent::ClockSkew {
                    peer,
                    scope: h.scope.clone(),
                    origin: h.origin,
                    ahead_by_ms: *ahead_by_ms,
                },
                HaltReason::BlobUnavailable { hash } => SyncEvent::BlobStaged {
                    peer,
                    scope: h.scope.clone(),
                    origin: h.origin,
                    hash: *hash,
                },
                _ => continue,
            };
            self.notifier.publish(Event::Sync(event));
        }
    }

    /// Answers one exchange request (the responder's half of a round). A request whose marks
    /// digest does not match what this node recorded of the initiator is answered with
    /// [`ExchangeResponse::resend`] and changes nothing.
    ///
    /// # Errors
    /// The request breaks the protocol (nothing of it is applied), or the store failed.
    pub fn answer(&self, request: ExchangeRequest) -> Result<ExchangeResponse> {
        let ExchangeRequest {
            from,
            scopes,
            marks,
            known,
            page: incoming,
            limit,
            deferred,
        } = request;
        if from == self.id {
            return Err(ProtocolError::PeerIsSelf { node: self.id }.into());
        }
        // Plan from the state before the request's page is applied: the page's claims hold
        // for that state, and the versions the request brings are ones the initiator has.
        let read = self.store.read()?;
        // IMPORTANT: we plan from the initiator's true marks, never from a guess: a digest
        // stands for the marks we recorded of it only if those hash to it.
        let Some(theirs) = initiator_marks(&*read, from, &scopes, marks)? else {
            return Ok(ExchangeResponse::resend(self.id));
        };
        let mut watermarks = self.marks_in_play(&*read, &scopes)?;
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .clamp(1, self.config.max_page_limit);
        let deferred = deferred.into_iter().collect();
        let page = plan::plan_page(
            &*read,
            &watermarks,
            &theirs,
            self.page_limits(limit),
            &deferred,
            &|b: &BlobRef| self.has_blob(b),
            &mut BTreeSet::new(),
        )?;
        drop(read);
        // What the initiator will hold once it applies our page; if it does not (a halt, a
        // lost response), this knowledge is stale-high, which costs one round, never a gap.
        let knowledge = PeerKnowledge {
            peer: from,
            scopes: scopes.clone(),
            marks: held_after(theirs, &page),
        };
        let applied = self.apply_page(&incoming, &scopes, knowledge)?;
        if applied.changed_marks {
            watermarks = self.marks_in_play(&*self.store.read()?, &scopes)?;
        }
        self.note_exchange(from);
        let digest = watermarks.digest();
        // The initiator records these marks of ours as its knowledge of us, so a round we
        // initiate next may send their digest alone (if the initiator does not record them,
        // that round costs one resend).
        lock(&self.held).insert(
            from,
            HeldMarks {
                scopes: scopes.clone(),
                digest,
            },
        );
        let marks = if known == Some(digest) {
            ResponseMarks::Same
        } else {
            ResponseMarks::Full(watermarks)
        };
        Ok(ExchangeResponse {
            from: self.id,
            marks,
            page,
            halts: applied.halts,
        })
    }
}

/// The initiator's marks in play: those the request carries in full, or, for a digest, what
/// we recorded of the initiator if that hashes to the digest (`None` if it does not: the
/// initiator must resend them in full).
fn initiator_marks(
    read: &dyn crate::store::StoreRead,
    from: NodeId,
    scopes: &ScopeFilter,
    marks: RequestMarks,
) -> Result<Option<ScopedWatermarks>> {
    let (mut marks, digest) = match marks {
        RequestMarks::Full(marks) => (marks, None),
        RequestMarks::Digest(d) => (read.peer_watermarks(from)?.unwrap_or_default(), Some(d)),
    };
    marks.retain(|s| scopes.contains(s));
    Ok(match digest {
        Some(d) if marks.digest() != d => None,
        _ => Some(marks),
    })
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        // Best effort: a failure here only means applied pages are re-fetched after restart
        // (and blobs they unreferenced are left for `collect_garbage`).
        let _ = self.flush();
    }
}

impl Responder for SyncEngine {
    fn node_id(&self) -> NodeId {
        self.id
    }

    fn respond(&self, request: ExchangeRequest) -> std::result::Result<ExchangeResponse, Refusal> {
        self.answer(request).map_err(|e: Error| Refusal::from(&e))
    }

    fn blobs_present(&self, hashes: &[Hash]) -> std::result::Result<Vec<bool>, Refusal> {
        hashes
            .iter()
            .map(|h| self.blobs.contains(h).map_err(Refusal::from))
            .collect()
    }

    fn open_blob(
        &self,
        hash: &Hash,
    ) -> std::result::Result<Option<crate::blob::BlobReader>, Refusal> {
        self.blobs.open(hash).map_err(Refusal::from)
    }

    fn accept_blob(
        &self,
        blob: &BlobRef,
        content: &mut dyn Read,
    ) -> std::result::Result<(), Refusal> {
        write_blob(&*self.blobs, content, Some(blob)).map_err(Refusal::from)?;
        let mut uploads = lock(&self.uploads);
        uploads.retain(|_, arrived| arrived.elapsed() < UPLOAD_GRACE);
        uploads.insert(blob.hash, Instant::now());
        Ok(())
    }

    fn notifier(&self) -> Option<&Notifier> {
        Some(&self.notifier)
    }
}
