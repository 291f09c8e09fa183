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
//! A little over 600 lines: the engine's configuration (each field documented), its
//! constructors and the state they share belong together; the work of rounds, audits,
//! purges, files and local writes lives in the submodules.
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

mod api;
mod audit;
mod blobs;
mod durability;
mod identity;
mod initiate;
mod local;
mod purge;
mod receive;
mod respond;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::api::LastAudit;
use crate::blob::{BlobStore, FsBlobStore, MemBlobStore};
use crate::blocking::{Interrupted, StorageLane};
use crate::error::Result;
use crate::hlc::{Clock, NodeId, TimeSource, WallClock};
use crate::notify::Notifier;
use crate::poison::lock;
use crate::record::{Hydration, Scope};
use crate::store::{MemStore, RedbStore, Store};

pub use self::api::ROUTED_READ_TIMEOUT;
pub use self::audit::{AuditOptions, AuditOutcome};
use self::blobs::BlobGuards;
pub use self::blobs::TRANSFER_CONCURRENCY;
use self::durability::Pending;
pub use self::local::{Record, ResidencyCounts};
pub use self::purge::{PurgeReport, Refused, PURGE_BATCH, PURGE_SCAN_BUDGET};
pub use crate::exchange::{ExchangeOptions, ExchangeOutcome};
use crate::exchange::{HeldMarks, Session};

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
    /// How far this node, as responder, counts the versions an initiator still lacks beyond
    /// the page it answers (`remaining` in a version 2 response; default 100 000; 0: it
    /// does not count). A count that reaches the cap reports the cap. Its cost is
    /// [`crate::store::StoreRead::live_count`]'s for each stream the page leaves unfinished:
    /// on redb about `cap / 64` rows at most (0.3 ms at the default, about half the read of
    /// a 1000-version page), on PostgreSQL and in memory `cap` index entries (see
    /// docs/protocol.md, "Progress").
    pub remaining_cap: u64,
    /// The most pages a streamed pull sends after its response, in either role (default
    /// 256; 0: this node neither asks for nor sends streamed pulls, and pulls in rounds). As
    /// initiator, a round whose last page was cut, or the first of a session, asks for a
    /// stream when the transport can carry one; as responder, a transfer ends after this many
    /// pages and the initiator's next round opens another (docs/protocol.md, "Streamed
    /// pulls").
    pub pull_frames: u32,
    /// The most pages a streamed push sends after its request, in either role (default 256;
    /// 0: this node neither opens nor takes streamed pushes, and pushes in rounds). As
    /// initiator, a round whose own page was cut (more to send) opens one when the
    /// transport and the peer can carry it; the peer answers after the last page, and the
    /// next round opens another if more is left (docs/protocol.md, "Streamed pushes").
    pub push_frames: u32,
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
    /// Whose evidence of a restore makes this node take a fresh id (default
    /// [`RestoreDetection::Initiator`]).
    pub restore_detection: RestoreDetection,
    /// Origins a scope keeps watermarks for (default 100 000): a page that would add one
    /// past it merges its versions without the mark, and a warning is logged. A scope
    /// written by more distinct nodes than this is far beyond any fleet the defaults are for.
    pub max_origins_per_scope: usize,
    /// Marks of origins this node never heard of that one *request* may create from runs
    /// without versions (default 64): such a run costs its sender nothing, so a token with
    /// the sync right could otherwise make a node keep any number of made-up origins.
    /// Runs with versions, and pages of peers this node calls, are not bound by it.
    pub max_new_origins_per_request: usize,
    /// How old a tombstone must be before [`SyncEngine::purge`] may remove it (default 30
    /// days; `None`: never). A peer offline for longer than this may lose its oldest
    /// unsent writes to a purge floor: see docs/protocol.md, "Forgetting".
    pub tombstone_retention: Option<Duration>,
    /// How long a peer may go unseen before its knowledge is dropped, so that purges no
    /// longer wait for it (default 90 days; `None`: never).
    pub peer_retirement: Option<Duration>,
}

/// One day: the default tombstone retention is 30 of them, the default peer retirement 90.
pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);

/// Whose evidence of a restore makes a node take a fresh id at once (see
/// [`crate::exchange::RestoreEvidence`] and docs/protocol.md, "Restores").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoreDetection {
    /// Peers this node calls: a response that shows writes by our id above our own mark. An
    /// initiator that shows it only halts its run ([`crate::HaltReason::OwnOrigin`]) and is
    /// logged: any token holder with the sync right can claim it, and a hub that changed
    /// its id on such a claim would cut off every device that expects its old one.
    #[default]
    Initiator,
    /// Any peer, in either role: for meshes whose every peer is trusted (in-process peers,
    /// nodes of one owner).
    Any,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            page_limit: 1000,
            page_bytes: 4 << 20,
            max_page_limit: 10_000,
            remaining_cap: 100_000,
            pull_frames: 256,
            push_frames: 256,
            max_drift: Duration::from_secs(5),
            time: Arc::new(WallClock),
            checkpoint: Checkpoint::default(),
            cache_bytes: RedbStore::CACHE_BYTES,
            restore_detection: RestoreDetection::default(),
            max_origins_per_scope: 100_000,
            max_new_origins_per_request: 64,
            tombstone_retention: Some(30 * DAY),
            peer_retirement: Some(90 * DAY),
        }
    }
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("page_limit", &self.page_limit)
            .field("page_bytes", &self.page_bytes)
            .field("max_page_limit", &self.max_page_limit)
            .field("remaining_cap", &self.remaining_cap)
            .field("pull_frames", &self.pull_frames)
            .field("push_frames", &self.push_frames)
            .field("max_drift", &self.max_drift)
            .field("checkpoint", &self.checkpoint)
            .field("cache_bytes", &self.cache_bytes)
            .field("restore_detection", &self.restore_detection)
            .field("max_origins_per_scope", &self.max_origins_per_scope)
            .field(
                "max_new_origins_per_request",
                &self.max_new_origins_per_request,
            )
            .field("tombstone_retention", &self.tombstone_retention)
            .field("peer_retirement", &self.peer_retirement)
            .finish_non_exhaustive()
    }
}

/// A replica: its store, clock and identity, and the exchange protocol.
///
/// A handle on the replica's state, which a round's store work also holds while it runs off
/// the async runtime's threads (see [`crate::blocking`]); the state is flushed and closed
/// when the last holder lets go.
pub struct SyncEngine {
    inner: Arc<Inner>,
}

struct Inner {
    /// The clock, which also holds the node's id (it changes when a restore is detected).
    clock: Clock,
    store: Box<dyn Store>,
    config: EngineConfig,
    /// IMPORTANT: held from issuing an Hlc until its write commits, so our own watermark
    /// never passes an uncommitted write of ours.
    local_writes: Mutex<()>,
    pending: Mutex<Pending>,
    /// What the engine keeps of its peers (memory only).
    peers: Mutex<PeerMemory>,
    blobs: Arc<dyn BlobStore>,
    /// What keeps blobs from removal while they are in use.
    guards: Mutex<BlobGuards>,
    notifier: Notifier,
    /// Where the store work of the rounds and audits this node initiates runs (see
    /// [`crate::blocking`]).
    storage: StorageLane,
}

/// What the engine keeps of its peers, in memory: after a restart the first round with each
/// relearns it.
#[derive(Default)]
struct PeerMemory {
    /// The session of each peer, for callers that keep none ([`SyncEngine::exchange`]).
    sessions: HashMap<NodeId, Session>,
    /// Our marks as each peer recorded them when we last answered it, until a round we
    /// initiate with it takes them (see [`crate::exchange::HeldMarks`]).
    answered: HashMap<NodeId, HeldMarks>,
    /// When each peer last completed a round with us, in either role.
    last_exchange: HashMap<NodeId, SystemTime>,
    /// When we last warned of restore evidence an initiator showed us, per initiator.
    warned: HashMap<NodeId, Instant>,
    /// When we last warned that an origin's versions were too far ahead of our clock.
    skew_warned: HashMap<NodeId, Instant>,
    /// Scopes a pull is under way for (see [`SyncEngine::hydration`]).
    hydrating: std::collections::BTreeSet<Scope>,
    /// The last audit with each peer, in either role.
    audits: HashMap<NodeId, LastAudit>,
    /// When we last warned that a page named more new origins than the limits allow.
    bounded_warning: Option<Instant>,
    /// The purge floors each peer told us, per scope.
    floors_heard: HashMap<NodeId, std::collections::BTreeMap<crate::record::Scope, u64>>,
    /// The id this node had before it last took a fresh one (stored as a note), which it
    /// vouches for when a request is addressed to it.
    previous: Option<NodeId>,
    /// Where the status document finds the peers a scheduler runs rounds with (weak: a
    /// scheduler that is gone shows none).
    links: Option<std::sync::Weak<LinkSource>>,
    /// Where routed reads find the peer that hydrates a scope (weak, as `links`).
    routes: Option<std::sync::Weak<RouteSource>>,
}

/// Logs loudly when the stored clock is further ahead of the time source than the drift
/// bound: the node stamps its writes that far ahead, and peers refuse them (`clock_skew`)
/// until its time source catches up (see docs/protocol.md, "The clock").
fn warn_if_ahead(clock: &Clock) {
    let ahead = clock.ahead();
    if ahead > clock.max_drift() {
        tracing::warn!(
            ahead = ?ahead, max_drift = ?clock.max_drift(),
            "this node's stored clock is ahead of its wall clock by more than the max drift \
             (the wall clock was set back, or ran ahead before): its writes carry timestamps \
             that far ahead and peers refuse them until the wall clock catches up; the status \
             shows how far (clock_ahead_ms)"
        );
    }
}

/// The note that says `scope` was pulled completely once.
fn hydration_note(scope: &Scope) -> String {
    format!("hydrated/{scope}")
}

/// The note holding the id a node had before it took a fresh one.
const PREVIOUS_ID_NOTE: &str = "previous_id";

/// Takes a fresh node id in `store`, noting the id it replaces first (a crash between the
/// two leaves the note naming the id still in use, which vouches for nothing).
fn take_fresh_id(store: &dyn Store) -> Result<NodeId> {
    let old = store.identity(NodeId::random())?;
    store.set_note(PREVIOUS_ID_NOTE, Some(&old.to_bytes()))?;
    let new = NodeId::random();
    store.replace_identity(new)?;
    Ok(old)
}

/// What a scheduler tells the status document of its peers (see [`crate::api::PeerLink`];
/// the engine fills in what its store knows).
pub(crate) type LinkSource = dyn Fn() -> Vec<crate::api::PeerLink> + Send + Sync;

/// Where a scheduler pulls a scope from: the name and records API of the peer that
/// hydrates it, if one can be read from (see [`crate::api::NodeApi::get_routed`]).
pub(crate) type RouteSource =
    dyn Fn(&Scope) -> Option<(String, Arc<dyn crate::api::NodeApi>)> + Send + Sync;

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
            take_fresh_id(&store)?;
        }
        let blobs = Arc::new(FsBlobStore::open(dir.join(BLOB_DIR))?);
        Self::with_stores(Box::new(store), blobs, config)
    }

    /// A node on `store` under a fresh node id (see [`SyncEngine::open_restored`]).
    ///
    /// # Errors
    /// A store failure, or `config.max_drift` out of range.
    pub fn with_fresh_identity(store: Box<dyn Store>, config: EngineConfig) -> Result<Self> {
        take_fresh_id(&*store)?;
        Self::with_store(store, config)
    }

    /// [`SyncEngine::with_stores`] under a fresh node id, taken before any timestamp is
    /// issued (see [`SyncEngine::open_restored`]).
    ///
    /// # Errors
    /// A store failure, or `config.max_drift` out of range.
    pub fn with_stores_restored(
        store: Box<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        config: EngineConfig,
    ) -> Result<Self> {
        take_fresh_id(&*store)?;
        Self::with_stores(store, blobs, config)
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
        let previous = store
            .note(PREVIOUS_ID_NOTE)?
            .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
            .and_then(NodeId::from_bytes);
        let clock = Clock::new(id, config.time.clone(), config.max_drift)?;
        clock.restore(store.read()?.clock()?);
        warn_if_ahead(&clock);
        let inner = Inner {
            clock,
            store,
            config,
            local_writes: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
            peers: Mutex::new(PeerMemory {
                previous,
                ..PeerMemory::default()
            }),
            blobs,
            guards: Mutex::new(BlobGuards::default()),
            notifier: Notifier::new(),
            storage: StorageLane::new(),
        };
        Ok(SyncEngine {
            inner: Arc::new(inner),
        })
    }

    /// Another handle on this engine, for store work that runs on another thread.
    pub(crate) fn handle(&self) -> SyncEngine {
        SyncEngine {
            inner: self.inner.clone(),
        }
    }

    /// Runs `work` on this engine's storage lane inside a tokio runtime, inline otherwise
    /// ([`StorageLane::run`]).
    pub(crate) async fn on_storage<T, F>(&self, work: F) -> std::result::Result<T, Interrupted>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.inner.storage.run(work).await
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.clock.id()
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The id the peer called `name` is expected to answer with (see
    /// [`SyncEngine::expect_peer`]), if one is noted.
    ///
    /// # Errors
    /// The store failed.
    pub fn expected_peer(&self, name: &str) -> Result<Option<NodeId>> {
        let note = self.inner.store.note(&format!("peer/{name}"))?;
        Ok(note
            .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
            .and_then(NodeId::from_bytes))
    }

    /// Notes, durably, that the peer called `name` (the scheduler's name for it: a node's
    /// peers are their URLs) is node `id` (`None`: forget it), so that rounds with it after
    /// a restart are addressed to that node and refused by any other (see
    /// `docs/scheduling.md`, "A peer that changed its id").
    ///
    /// # Errors
    /// The store failed; the old note stands.
    pub fn expect_peer(&self, name: &str, id: Option<NodeId>) -> Result<()> {
        let bytes = id.map(|id| id.to_bytes());
        self.inner.store.set_note(
            &format!("peer/{name}"),
            bytes.as_ref().map(|b| b.as_slice()),
        )?;
        Ok(())
    }

    /// How far this node's clock (the last time it issued or observed) is ahead of its
    /// time source. Beyond [`EngineConfig::max_drift`] its new writes are refused by peers
    /// with a correct clock until the time source catches up.
    pub fn clock_ahead(&self) -> Duration {
        self.inner.clock.ahead()
    }

    /// How far this node has pulled `scope` from its peers: ready once a round pulled it
    /// completely (noted durably), hydrating while a pull is under way (memory), else not
    /// started.
    ///
    /// # Errors
    /// The store failed.
    pub fn hydration(&self, scope: &Scope) -> Result<Hydration> {
        if self.inner.store.note(&hydration_note(scope))?.is_some() {
            return Ok(Hydration::Ready);
        }
        Ok(if lock(&self.inner.peers).hydrating.contains(scope) {
            Hydration::Hydrating
        } else {
            Hydration::NotStarted
        })
    }

    /// Records that a pull of `scope` is under way (`Hydrating`) or complete (`Ready`,
    /// durably); returns whether the state changed. A ready scope stays ready.
    ///
    /// # Errors
    /// The store failed; the state is unchanged.
    pub fn set_hydration(&self, scope: &Scope, state: Hydration) -> Result<bool> {
        let was = self.hydration(scope)?;
        if was == Hydration::Ready || was == state {
            return Ok(false);
        }
        match state {
            Hydration::Ready => {
                self.inner
                    .store
                    .set_note(&hydration_note(scope), Some(b"ready"))?;
                lock(&self.inner.peers).hydrating.remove(scope);
            }
            Hydration::Hydrating => {
                lock(&self.inner.peers).hydrating.insert(scope.clone());
            }
            Hydration::NotStarted => {
                lock(&self.inner.peers).hydrating.remove(scope);
            }
        }
        Ok(true)
    }

    /// The id this node had before it last took a fresh one, if it ever did.
    pub fn previous_id(&self) -> Option<NodeId> {
        lock(&self.inner.peers).previous
    }

    /// Makes the status document list the peers `source` names (the last scheduler started
    /// on this engine; see [`crate::api::Status::configured_peers`]).
    pub(crate) fn show_links(&self, source: std::sync::Weak<LinkSource>) {
        lock(&self.inner.peers).links = Some(source);
    }

    /// Makes routed reads ask the peers `source` names (the last scheduler started on this
    /// engine).
    pub(crate) fn route_reads(&self, source: std::sync::Weak<RouteSource>) {
        lock(&self.inner.peers).routes = Some(source);
    }

    /// The peer a routed read of `scope` asks, if a scheduler names one.
    fn route(&self, scope: &Scope) -> Option<(String, Arc<dyn crate::api::NodeApi>)> {
        let source = lock(&self.inner.peers).routes.clone();
        source.and_then(|s| s.upgrade()).and_then(|s| s(scope))
    }

    /// The peers the scheduler runs rounds with, as it sees them.
    fn links(&self) -> Vec<crate::api::PeerLink> {
        let source = lock(&self.inner.peers).links.clone();
        source
            .and_then(|s| s.upgrade())
            .map(|s| s())
            .unwrap_or_default()
    }

    /// The node's event notifier: subscribe to changes and sync events.
    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }
}
