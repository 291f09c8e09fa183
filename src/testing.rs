//! Checks shared by the test suite and the fuzz targets (feature `testing`).
//!
//! A [`Simulation`] drives 2 to 5 engines through [`Action`]s (writes, deletes, exchanges
//! between any pair with any page limit, restarts) while keeping an oracle: every version
//! ever written, and their last-write-wins fold. After every round it checks the watermark
//! invariant on every node; [`Simulation::converge`] then syncs all pairs and checks that
//! every node equals the oracle and that all watermarks agree.
//!
//! Actions decode from arbitrary bytes ([`Action::decode_all`]), so proptest strategies and
//! libFuzzer inputs drive the very same code.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Read as _;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use std::path::PathBuf;

use crate::blob::{write_blob, BlobStore, FsBlobStore, MemBlobStore};
use crate::engine::{EngineConfig, ExchangeOptions, SyncEngine, BLOB_DIR, DB_FILE};
use crate::error::TransportError;
use crate::hash::Hash;
use crate::hlc::ManualTime;
use crate::hlc::NodeId;
use crate::merge::{self, State};
use crate::record::BlobRef;
use crate::record::{Key, Op, Scope, Version};
use crate::store::{MemStore, RedbStore, Store};
use crate::transport::InProcess;
use crate::transport::Transport;
use crate::watermark::HaltReason;
use crate::wire::{ExchangeRequest, ExchangeResponse};

/// Runs a future to completion on the current thread (in-process exchanges never wait).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

/// One step of a simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Node `node` writes `value` under `key` in scope number `scope`.
    Put {
        /// Writer.
        node: usize,
        /// Scope index (see [`scope`]).
        scope: u8,
        /// Key byte.
        key: u8,
        /// Value byte.
        value: u8,
    },
    /// Node `node` deletes `key` in scope number `scope`.
    Delete {
        /// Writer.
        node: usize,
        /// Scope index.
        scope: u8,
        /// Key byte.
        key: u8,
    },
    /// One exchange round, `from` initiating to `to`, asking for at most `limit` versions.
    Exchange {
        /// Initiator.
        from: usize,
        /// Responder.
        to: usize,
        /// Page limit for this round.
        limit: usize,
        /// Limit the round to one scope (index) instead of all.
        only_scope: Option<u8>,
    },
    /// Node `node` writes a record with a file under `key` (content chosen among a few, so
    /// equal files on different keys and nodes occur).
    PutFile {
        /// Writer.
        node: usize,
        /// Scope index.
        scope: u8,
        /// Key byte.
        key: u8,
        /// Which content.
        content: u8,
    },
    /// Transfers of the `blob`-th file written so far fail (or arrive corrupted) for the
    /// next `rounds` rounds, in both directions.
    BlobFault {
        /// Index into the files written so far.
        blob: u8,
        /// How many rounds the fault lasts.
        rounds: u8,
        /// Corrupt the bytes instead of failing the transfer.
        corrupt: bool,
    },
    /// Physical time moves forward by `millis`.
    Tick {
        /// Milliseconds.
        millis: u16,
    },
    /// Node `node` is closed and reopened.
    Restart {
        /// The node.
        node: usize,
    },
    /// Node `node` loses power: everything not synced to its storage is gone, and it is
    /// reopened from what was (on backends that model it; otherwise a restart).
    Crash {
        /// The node.
        node: usize,
    },
    /// Node `node` is closed, backed up, and reopened.
    Snapshot {
        /// The node.
        node: usize,
    },
    /// Node `node` is closed and its last backup put back (if it has one). Peers' knowledge
    /// of it is now stale-high. If it wrote since the backup, the restore loses writes: it
    /// happens only when the simulation allows lossy restores
    /// ([`Simulation::allow_lossy_restores`]), and the node then reopens under a fresh node
    /// id ([`SyncEngine::open_restored`]); otherwise the action is a plain restart.
    Restore {
        /// The node.
        node: usize,
    },
}

/// Scope number `i` of the simulation's three scopes.
pub fn scope(i: u8) -> Scope {
    match i % 3 {
        0 => Scope::shared(),
        1 => Scope::app("notes", "items").expect("valid scope"),
        _ => Scope::app("photos", "albums").expect("valid scope"),
    }
}

impl Action {
    /// Decodes a list of actions for `nodes` nodes from arbitrary bytes (4 bytes an action;
    /// every input decodes).
    pub fn decode_all(bytes: &[u8], nodes: usize) -> Vec<Action> {
        let nodes = nodes.max(2);
        bytes
            .chunks_exact(4)
            .map(|c| {
                let node = usize::from(c[1]) % nodes;
                match c[0] % 16 {
                    5 => Action::PutFile {
                        node,
                        scope: c[2] % 3,
                        key: c[3] % 8,
                        content: c[2] ^ c[3],
                    },
                    13 => Action::BlobFault {
                        blob: c[2],
                        rounds: 1 + c[3] % 4,
                        corrupt: c[3] & 0x80 != 0,
                    },
                    0..=4 => Action::Put {
                        node,
                        scope: c[2] % 3,
                        key: c[3] % 8,
                        value: c[2] ^ c[3],
                    },
                    6..=7 => Action::Delete {
                        node,
                        scope: c[2] % 3,
                        key: c[3] % 8,
                    },
                    8..=12 => {
                        let to = (node + 1 + usize::from(c[2]) % (nodes - 1)) % nodes;
                        let only_scope = (c[3] & 0x80 != 0).then_some(c[3] % 3);
                        Action::Exchange {
                            from: node,
                            to,
                            limit: 1 + usize::from(c[3] & 0x7f) % 6,
                            only_scope,
                        }
                    }
                    14 => Action::Tick {
                        millis: u16::from_le_bytes([c[2], c[3]]),
                    },
                    _ => match c[2] % 4 {
                        0 => Action::Restart { node },
                        1 => Action::Snapshot { node },
                        2 => Action::Restore { node },
                        _ => Action::Crash { node },
                    },
                }
            })
            .collect()
    }
}

/// The bytes of file content number `n`: four patterns in four sizes (1 B to ~2 KiB).
pub fn file_content(n: u8) -> Vec<u8> {
    let len = 1 + usize::from(n >> 2 & 3) * 700;
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(n & 3))
        .collect()
}

/// Copies every blob of `from` into `to`.
///
/// # Errors
/// A blob store failure.
pub fn copy_blobs(from: &dyn BlobStore, to: &dyn BlobStore) -> Result<(), String> {
    for (hash, _) in from.list().map_err(|e| format!("{e:?}"))? {
        if let Some((size, mut reader)) = from.open(&hash).map_err(|e| format!("{e:?}"))? {
            write_blob(to, &mut reader, Some(&BlobRef { hash, size }))
                .map_err(|e| format!("{e:?}"))?;
        }
    }
    Ok(())
}

/// A fault on one blob's transfers in a simulation.
#[derive(Clone, Copy, Debug)]
struct Fault {
    rounds_left: u8,
    corrupt: bool,
}

/// Something to run at a chosen point of a round (e.g. a garbage collection).
pub type Hook = Box<dyn Fn() + Send + Sync>;

/// Wraps a transport: blobs marked with [`FaultyTransport::fail`] are refused
/// ([`TransportError::BlobTransfer`]) both ways; blobs marked with
/// [`FaultyTransport::corrupt`] move with one byte flipped both ways. Everything else is
/// delegated unchanged. Optional hooks run before each blob transfer and before the
/// exchange request.
pub struct FaultyTransport<T> {
    inner: T,
    fail: Mutex<BTreeSet<Hash>>,
    corrupt: Mutex<BTreeSet<Hash>>,
    injected: AtomicUsize,
    before_transfer: Mutex<Option<Hook>>,
    before_exchange: Mutex<Option<Hook>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> FaultyTransport<T> {
    /// Wraps `inner`, with no faults yet.
    pub fn new(inner: T) -> Self {
        FaultyTransport {
            inner,
            fail: Mutex::default(),
            corrupt: Mutex::default(),
            injected: AtomicUsize::new(0),
            before_transfer: Mutex::default(),
            before_exchange: Mutex::default(),
        }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Transfers of `hash` fail from now on.
    pub fn fail(&self, hash: Hash) {
        locked(&self.fail).insert(hash);
    }

    /// Transfers of `hash` arrive with one byte flipped from now on.
    pub fn corrupt(&self, hash: Hash) {
        locked(&self.corrupt).insert(hash);
    }

    /// Every transfer works again.
    pub fn heal(&self) {
        locked(&self.fail).clear();
        locked(&self.corrupt).clear();
    }

    /// Transfers refused or corrupted so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::Relaxed)
    }

    /// Runs `hook` before every blob transfer.
    pub fn before_transfer(&self, hook: impl Fn() + Send + Sync + 'static) {
        *locked(&self.before_transfer) = Some(Box::new(hook));
    }

    /// Runs `hook` before every exchange request.
    pub fn before_exchange(&self, hook: impl Fn() + Send + Sync + 'static) {
        *locked(&self.before_exchange) = Some(Box::new(hook));
    }

    fn run(hook: &Mutex<Option<Hook>>) {
        if let Some(hook) = &*locked(hook) {
            hook();
        }
    }

    /// Before a transfer of `hash`: runs the hook, fails if asked to, and says whether to
    /// corrupt it.
    fn gate(&self, hash: &Hash) -> Result<bool, TransportError> {
        Self::run(&self.before_transfer);
        if self.hit(&self.fail, hash) {
            return Err(injected_failure(*hash));
        }
        Ok(self.hit(&self.corrupt, hash))
    }

    fn hit(&self, set: &Mutex<BTreeSet<Hash>>, hash: &Hash) -> bool {
        let hit = locked(set).contains(hash);
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }
}

fn flip_one(bytes: &mut [u8]) {
    let middle = bytes.len() / 2;
    if let Some(b) = bytes.get_mut(middle) {
        *b ^= 0x01;
    }
}

fn injected_failure(hash: Hash) -> TransportError {
    TransportError::BlobTransfer {
        hash,
        reason: "injected failure".to_owned(),
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    fn peer_id(&self) -> Option<NodeId> {
        self.inner.peer_id()
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        Self::run(&self.before_exchange);
        self.inner.exchange(request).await
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        self.inner.blobs_present(hashes).await
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn std::io::Write + Send),
    ) -> Result<(), TransportError> {
        if !self.gate(&blob.hash)? {
            return self.inner.fetch_blob(blob, into).await;
        }
        let mut bytes = Vec::new();
        self.inner.fetch_blob(blob, &mut bytes).await?;
        flip_one(&mut bytes);
        into.write_all(&bytes)
            .map_err(|e| TransportError::BlobTransfer {
                hash: blob.hash,
                reason: e.to_string(),
            })
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        mut content: Box<dyn std::io::Read + Send>,
    ) -> Result<(), TransportError> {
        if !self.gate(&blob.hash)? {
            return self.inner.push_blob(blob, content).await;
        }
        let mut bytes = Vec::new();
        content
            .read_to_end(&mut bytes)
            .map_err(|e| TransportError::BlobTransfer {
                hash: blob.hash,
                reason: e.to_string(),
            })?;
        flip_one(&mut bytes);
        self.inner
            .push_blob(blob, Box::new(std::io::Cursor::new(bytes)))
            .await
    }
}

/// How a simulation opens, backs up and restores its nodes.
pub trait Backend {
    /// Opens node `i` (any previous engine of it has been dropped), under a fresh node id
    /// if `fresh_identity`.
    ///
    /// # Errors
    /// The engine could not be opened.
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine>;

    /// Backs up node `i` (closed).
    ///
    /// # Errors
    /// A description of the failure.
    fn snapshot(&mut self, i: usize) -> Result<(), String>;

    /// Captures what node `i`'s storage would hold after a power loss *now* (only what was
    /// synced), so that the next `open(i)` sees exactly that. Called while the engine is
    /// still alive (dropping it flushes). `false` if this backend cannot crash a node: the
    /// action is then a plain restart.
    ///
    /// # Errors
    /// A description of the failure.
    fn crash(&mut self, i: usize) -> Result<bool, String> {
        let _ = i;
        Ok(false)
    }

    /// Puts node `i`'s last backup back (closed) and discards it; `false` if it has none.
    ///
    /// # Errors
    /// A description of the failure.
    fn restore(&mut self, i: usize) -> Result<bool, String>;
}

/// Nodes on in-memory stores.
pub struct MemBackend {
    time: Arc<ManualTime>,
    stores: Vec<Arc<MemStore>>,
    blobs: Vec<Arc<MemBlobStore>>,
    backups: Vec<Option<(MemStore, MemBlobStore)>>,
    ids: SimIds,
}

/// Deterministic node ids, so that a failing seed replays the same run: node `i` starts as
/// `[i + 1; 16]`, and restored nodes take `[0x80 + k; 16]` for the k-th restore.
#[derive(Default)]
struct SimIds {
    restores: u8,
}

impl SimIds {
    fn initial(i: usize) -> NodeId {
        let b = u8::try_from(i + 1).expect("simulations have few nodes");
        NodeId::from_bytes([b; 16]).expect("non-zero id")
    }

    fn fresh(&mut self) -> NodeId {
        self.restores = self.restores.wrapping_add(1);
        NodeId::from_bytes([0x80 | (self.restores & 0x7f); 16]).expect("non-zero id")
    }

    /// Gives `store` its deterministic id, then opens an engine on it.
    fn open(
        &mut self,
        store: Box<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        i: usize,
        fresh: bool,
        time: &Arc<ManualTime>,
    ) -> crate::Result<SyncEngine> {
        if fresh {
            store.replace_identity(self.fresh())?;
        } else {
            store.identity(Self::initial(i))?;
        }
        SyncEngine::with_stores(store, blobs, sim_config(time))
    }
}

impl MemBackend {
    /// `n` empty in-memory nodes reading `time`.
    pub fn new(n: usize, time: Arc<ManualTime>) -> Self {
        MemBackend {
            time,
            stores: (0..n).map(|_| Arc::new(MemStore::new())).collect(),
            blobs: (0..n).map(|_| Arc::new(MemBlobStore::new())).collect(),
            backups: (0..n).map(|_| None).collect(),
            ids: SimIds::default(),
        }
    }
}

impl Backend for MemBackend {
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine> {
        self.ids.open(
            Box::new(self.stores[i].clone()),
            self.blobs[i].clone(),
            i,
            fresh_identity,
            &self.time,
        )
    }

    fn snapshot(&mut self, i: usize) -> Result<(), String> {
        let blobs = MemBlobStore::new();
        copy_blobs(&*self.blobs[i], &blobs)?;
        self.backups[i] = Some((self.stores[i].duplicate(), blobs));
        Ok(())
    }

    fn restore(&mut self, i: usize) -> Result<bool, String> {
        let Some((store, blobs)) = self.backups[i].take() else {
            return Ok(false);
        };
        self.stores[i] = Arc::new(store);
        self.blobs[i] = Arc::new(blobs);
        Ok(true)
    }
}

/// Nodes on redb files under one directory: `n<i>/highwater.redb` and `n<i>/blobs/`;
/// backups `n<i>.backup` and `n<i>.blobs-backup/`.
pub struct RedbBackend {
    time: Arc<ManualTime>,
    root: PathBuf,
    ids: SimIds,
}

impl RedbBackend {
    /// Nodes under `root` reading `time`.
    pub fn new(root: impl Into<PathBuf>, time: Arc<ManualTime>) -> Self {
        RedbBackend {
            time,
            root: root.into(),
            ids: SimIds::default(),
        }
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}"))
    }

    fn backup(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}.backup"))
    }

    fn blob_backup(&self, i: usize) -> PathBuf {
        self.root.join(format!("n{i}.blobs-backup"))
    }
}

impl Backend for RedbBackend {
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine> {
        let dir = self.dir(i);
        std::fs::create_dir_all(&dir).map_err(|source| crate::error::StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let store = Box::new(RedbStore::open(dir.join(DB_FILE))?);
        let blobs = Arc::new(FsBlobStore::open(dir.join(BLOB_DIR))?);
        self.ids.open(store, blobs, i, fresh_identity, &self.time)
    }

    fn snapshot(&mut self, i: usize) -> Result<(), String> {
        std::fs::copy(self.dir(i).join(DB_FILE), self.backup(i))
            .map_err(|e| format!("backup node {i}: {e}"))?;
        let err = |e| format!("backup blobs of node {i}: {e:?}");
        let _ = std::fs::remove_dir_all(self.blob_backup(i));
        let live = FsBlobStore::open(self.dir(i).join(BLOB_DIR)).map_err(err)?;
        let backup = FsBlobStore::open(self.blob_backup(i)).map_err(err)?;
        copy_blobs(&live, &backup)
    }

    fn restore(&mut self, i: usize) -> Result<bool, String> {
        if !self.backup(i).exists() {
            return Ok(false);
        }
        std::fs::rename(self.backup(i), self.dir(i).join(DB_FILE))
            .map_err(|e| format!("restore node {i}: {e}"))?;
        let blobs = self.dir(i).join(BLOB_DIR);
        std::fs::remove_dir_all(&blobs).map_err(|e| format!("restore node {i}: {e}"))?;
        std::fs::rename(self.blob_backup(i), blobs)
            .map_err(|e| format!("restore node {i}: {e}"))?;
        Ok(true)
    }
}

/// A redb storage backend that models power loss: writes land in a volatile image,
/// `sync_data` makes them durable, and [`PowerLossDisk::after_power_loss`] gives a disk
/// holding only what was synced.
#[derive(Debug, Default)]
pub struct PowerLossDisk {
    images: Mutex<DiskImages>,
}

#[derive(Debug, Default)]
struct DiskImages {
    volatile: Vec<u8>,
    durable: Vec<u8>,
}

impl PowerLossDisk {
    /// A new, empty disk.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A disk holding what this one had synced: everything written since the last
    /// `sync_data` is lost, as in a power cut.
    pub fn after_power_loss(&self) -> Arc<Self> {
        let durable = locked(&self.images).durable.clone();
        Arc::new(PowerLossDisk {
            images: Mutex::new(DiskImages {
                volatile: durable.clone(),
                durable,
            }),
        })
    }
}

/// A handle redb can own, sharing the disk with the test.
#[derive(Debug)]
pub struct DiskHandle(pub Arc<PowerLossDisk>);

fn out_of_range() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "read past the end of the disk",
    )
}

impl redb::StorageBackend for DiskHandle {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(locked(&self.0.images).volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let images = locked(&self.0.images);
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(out.len()).ok_or_else(out_of_range)?;
        out.copy_from_slice(images.volatile.get(start..end).ok_or_else(out_of_range)?);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        locked(&self.0.images).volatile.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut images = locked(&self.0.images);
        images.durable = images.volatile.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut images = locked(&self.0.images);
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(data.len()).ok_or_else(out_of_range)?;
        if images.volatile.len() < end {
            images.volatile.resize(end, 0);
        }
        images.volatile[start..end].copy_from_slice(data);
        Ok(())
    }
}

/// redb nodes on [`PowerLossDisk`]s, whose blobs (in memory) are durable once written,
/// as an fsynced blob file is; [`Action::Crash`] cuts a node's power.
pub struct PowerLossBackend {
    time: Arc<ManualTime>,
    disks: Vec<Arc<PowerLossDisk>>,
    blobs: Vec<Arc<MemBlobStore>>,
    ids: SimIds,
}

impl PowerLossBackend {
    /// `n` empty nodes reading `time`.
    pub fn new(n: usize, time: Arc<ManualTime>) -> Self {
        PowerLossBackend {
            time,
            disks: (0..n).map(|_| PowerLossDisk::new()).collect(),
            blobs: (0..n).map(|_| Arc::new(MemBlobStore::new())).collect(),
            ids: SimIds::default(),
        }
    }
}

impl Backend for PowerLossBackend {
    fn open(&mut self, i: usize, fresh_identity: bool) -> crate::Result<SyncEngine> {
        let store = Box::new(RedbStore::with_backend(DiskHandle(self.disks[i].clone()))?);
        self.ids
            .open(store, self.blobs[i].clone(), i, fresh_identity, &self.time)
    }

    fn crash(&mut self, i: usize) -> Result<bool, String> {
        self.disks[i] = self.disks[i].after_power_loss();
        Ok(true)
    }

    fn snapshot(&mut self, _i: usize) -> Result<(), String> {
        Ok(())
    }

    fn restore(&mut self, _i: usize) -> Result<bool, String> {
        Ok(false)
    }
}

/// Several engines, an oracle, and the invariant checks.
pub struct Simulation {
    nodes: Vec<Option<Arc<SyncEngine>>>,
    backend: Box<dyn Backend>,
    wrote_since_backup: Vec<bool>,
    history: Vec<(Scope, Key, Version)>,
    oracle: State,
    files: Vec<Hash>,
    faults: BTreeMap<Hash, Fault>,
    time: Arc<ManualTime>,
    lossy_restores: bool,
    /// Rounds run so far.
    pub rounds: usize,
}

/// The configuration simulations give their engines: a shared manual clock.
pub fn sim_config(time: &Arc<ManualTime>) -> EngineConfig {
    EngineConfig {
        time: time.clone(),
        ..EngineConfig::default()
    }
}

/// The manual clock simulations start from.
pub fn sim_time() -> Arc<ManualTime> {
    ManualTime::at_secs(1_700_000_000)
}

impl Simulation {
    /// `n` in-memory nodes sharing one manual clock.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn in_memory(n: usize) -> crate::Result<Self> {
        let time = sim_time();
        Self::with_backend(n, Box::new(MemBackend::new(n, time.clone())), time)
    }

    /// `n` redb nodes under `root`, sharing one manual clock.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn redb(n: usize, root: impl Into<PathBuf>) -> crate::Result<Self> {
        let time = sim_time();
        Self::with_backend(n, Box::new(RedbBackend::new(root, time.clone())), time)
    }

    /// `n` redb nodes on power-loss disks (see [`PowerLossBackend`]), sharing one manual
    /// clock.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn power_loss(n: usize) -> crate::Result<Self> {
        let time = sim_time();
        Self::with_backend(n, Box::new(PowerLossBackend::new(n, time.clone())), time)
    }

    /// `n` nodes opened through `backend`, whose engines read `time`.
    ///
    /// # Errors
    /// Engine creation failed.
    pub fn with_backend(
        n: usize,
        mut backend: Box<dyn Backend>,
        time: Arc<ManualTime>,
    ) -> crate::Result<Self> {
        let nodes = (0..n)
            .map(|i| backend.open(i, false).map(|e| Some(Arc::new(e))))
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Simulation {
            nodes,
            backend,
            wrote_since_backup: vec![false; n],
            history: Vec::new(),
            oracle: State::new(),
            files: Vec::new(),
            faults: BTreeMap::new(),
            time,
            lossy_restores: false,
            rounds: 0,
        })
    }

    /// Lets [`Action::Restore`] restore nodes that wrote since their backup (losing those
    /// writes where no peer has them). See docs/protocol.md, "Known limitation: restoring
    /// lost writes", for why convergence can then fail.
    pub fn allow_lossy_restores(mut self) -> Self {
        self.lossy_restores = true;
        self
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Arc<SyncEngine> {
        self.nodes[i]
            .as_ref()
            .expect("nodes are always reopened after a restart")
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the simulation has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The LWW fold of every version written so far.
    pub fn oracle(&self) -> &State {
        &self.oracle
    }

    /// Applies one action, then checks the watermark invariant on every node.
    ///
    /// # Errors
    /// An engine error, or a description of a broken invariant.
    pub fn step(&mut self, action: &Action) -> Result<(), String> {
        let n = self.len();
        match *action {
            Action::Put {
                node,
                scope: s,
                key,
                value,
            } => self.write(
                node % n,
                s,
                key,
                Op::Put {
                    value: vec![value],
                    blob: None,
                },
            )?,
            Action::Delete {
                node,
                scope: s,
                key,
            } => self.write(node % n, s, key, Op::Delete)?,
            Action::Exchange {
                from,
                to,
                limit,
                only_scope,
            } => {
                let options = ExchangeOptions {
                    scopes: match only_scope {
                        None => crate::ScopeFilter::All,
                        Some(s) => crate::ScopeFilter::Only([scope(s)].into_iter().collect()),
                    },
                    page_limit: Some(limit),
                };
                self.round(from % n, to % n, &options)?;
            }
            Action::PutFile {
                node,
                scope: sc,
                key,
                content,
            } => self.write_file(node % n, sc, key, content)?,
            Action::BlobFault {
                blob,
                rounds,
                corrupt,
            } => {
                if !self.files.is_empty() {
                    let hash = self.files[usize::from(blob) % self.files.len()];
                    self.faults.insert(
                        hash,
                        Fault {
                            rounds_left: rounds,
                            corrupt,
                        },
                    );
                }
            }
            Action::Tick { millis } => self
                .time
                .advance(std::time::Duration::from_millis(u64::from(millis))),
            Action::Restart { node } => {
                self.reopen(node % n, |_| Ok(false))?;
            }
            Action::Crash { node } => {
                self.backend.crash(node % n)?;
                self.reopen(node % n, |_| Ok(false))?;
            }
            Action::Snapshot { node } => {
                self.reopen(node % n, |b| b.snapshot(node % n).map(|()| false))?;
                self.wrote_since_backup[node % n] = false;
            }
            Action::Restore { node }
                if self.wrote_since_backup[node % n] && !self.lossy_restores =>
            {
                self.reopen(node % n, |_| Ok(false))?;
            }
            Action::Restore { node } => {
                let fresh = self.wrote_since_backup[node % n];
                let restored = self.reopen(node % n, |b| Ok(b.restore(node % n)? && fresh))?;
                if restored {
                    self.wrote_since_backup[node % n] = false;
                }
                self.forget_lost_versions()?;
            }
        }
        self.check_watermarks()
    }

    fn write(&mut self, node: usize, s: u8, key: u8, op: Op) -> Result<(), String> {
        let (scope, key) = (scope(s), Key::new([key]).expect("one byte is a valid key"));
        let hlc = self
            .node(node)
            .write(&scope, &key, op.clone())
            .map_err(|e| format!("write on node {node}: {e:?}"))?;
        let version = Version { hlc, op };
        self.wrote_since_backup[node] = true;
        merge::merge_into(&mut self.oracle, &scope, &key, &version);
        self.history.push((scope, key, version));
        Ok(())
    }

    fn write_file(&mut self, node: usize, s: u8, key: u8, content: u8) -> Result<(), String> {
        let (scope, key) = (scope(s), Key::new([key]).expect("one byte is a valid key"));
        let bytes = file_content(content);
        let value = vec![content];
        let hlc = self
            .node(node)
            .put_file_bytes(&scope, &key, value.clone(), &bytes)
            .map_err(|e| format!("put_file on node {node}: {e:?}"))?;
        let blob = BlobRef {
            hash: Hash::of(&bytes),
            size: bytes.len() as u64,
        };
        let version = Version {
            hlc,
            op: Op::Put {
                value,
                blob: Some(blob),
            },
        };
        self.wrote_since_backup[node] = true;
        self.files.push(blob.hash);
        merge::merge_into(&mut self.oracle, &scope, &key, &version);
        self.history.push((scope, key, version));
        Ok(())
    }

    /// One round from `from` to `to`. Returns `has_more`.
    ///
    /// # Errors
    /// An engine error, or a self-exchange.
    pub fn round(
        &mut self,
        from: usize,
        to: usize,
        options: &ExchangeOptions,
    ) -> Result<bool, String> {
        if from == to {
            return Ok(false);
        }
        let transport = FaultyTransport::new(InProcess::new(self.node(to).clone()));
        for (hash, fault) in &self.faults {
            if fault.corrupt {
                transport.corrupt(*hash);
            } else {
                transport.fail(*hash);
            }
        }
        let out = block_on(self.node(from).exchange_with(&transport, options))
            .map_err(|e| format!("exchange {from}->{to}: {e:?}"))?;
        self.rounds += 1;
        let faulty = |h: &crate::Halt| matches!(h.reason, HaltReason::BlobUnavailable { hash } if self.faults.contains_key(&hash));
        if !out.halts.iter().chain(&out.peer_halts).all(faulty) {
            return Err(format!(
                "unexpected halts in {from}->{to}: {:?} {:?} (faults {:?})",
                out.halts, out.peer_halts, self.faults
            ));
        }
        self.faults.retain(|_, f| {
            f.rounds_left = f.rounds_left.saturating_sub(1);
            f.rounds_left > 0
        });
        Ok(out.has_more)
    }

    /// Closes node `i`, runs `between` on the backend (which says whether to reopen under a
    /// fresh id), and opens it again. Returns what `between` said.
    fn reopen(
        &mut self,
        i: usize,
        between: impl FnOnce(&mut dyn Backend) -> Result<bool, String>,
    ) -> Result<bool, String> {
        // Drop the engine first: a redb file may be opened once per process.
        self.nodes[i] = None;
        let fresh = between(&mut *self.backend)?;
        let engine = self
            .backend
            .open(i, fresh)
            .map_err(|e| format!("reopen node {i}: {e:?}"))?;
        self.nodes[i] = Some(Arc::new(engine));
        Ok(fresh)
    }

    /// After a restore, versions that no node holds (nor anything newer of their key) are
    /// gone for good, as they would be: drop them from the history and rebuild the oracle
    /// from what survives.
    fn forget_lost_versions(&mut self) -> Result<(), String> {
        let mut survivors = State::new();
        for i in 0..self.len() {
            for ((scope, key), v) in self.state_of(i)? {
                merge::merge_into(&mut survivors, &scope, &key, &v);
            }
        }
        self.history.retain(|(s, k, v)| {
            survivors
                .get(&(s.clone(), k.clone()))
                .is_some_and(|held| held.hlc >= v.hlc)
        });
        self.oracle = survivors;
        Ok(())
    }

    /// Checks the watermark invariant on every node, in the form the protocol guarantees at
    /// every step: for every version `v` ever written by origin `n` with Hlc <= the node's
    /// `W[n]`, the node holds `v` or a newer version of the same key, *or* some newer
    /// version `w` of that key exists whose origin's stream the node has not yet passed
    /// (`W[w.origin] < w.hlc`), so `w` (or newer) is still on its way. See
    /// docs/protocol.md, "What a watermark claims". At quiescence this is the strict claim.
    ///
    /// # Errors
    /// A description of the first violation: a watermark that advanced over a gap.
    pub fn check_watermarks(&self) -> Result<(), String> {
        for i in 0..self.len() {
            let node = self.node(i);
            let marks = node.watermarks().map_err(|e| format!("{e:?}"))?;
            let passed = |scope: &Scope, v: &Version| {
                marks.get(scope, v.hlc.origin()).is_some_and(|w| v.hlc <= w)
            };
            for (scope, key, v) in &self.history {
                if !passed(scope, v) {
                    continue;
                }
                let held = node.get_version(scope, key).map_err(|e| format!("{e:?}"))?;
                if held.as_ref().is_some_and(|h| h.hlc >= v.hlc) {
                    continue;
                }
                let on_its_way = self
                    .history
                    .iter()
                    .any(|(s, k, w)| s == scope && k == key && w.hlc > v.hlc && !passed(s, w));
                if !on_its_way {
                    return Err(format!(
                        "node {i}: watermark {:?} of {scope} covers {v:?} for {key:?}, but it holds {held:?} and nothing newer is on its way",
                        marks.get(scope, v.hlc.origin())
                    ));
                }
            }
        }
        Ok(())
    }

    /// Node `i`'s full state, tombstones included.
    ///
    /// # Errors
    /// An engine error.
    pub fn state_of(&self, i: usize) -> Result<State, String> {
        let node = self.node(i);
        let mut out = BTreeMap::new();
        for s in 0..3 {
            let scope = scope(s);
            for (key, version) in node.versions(&scope).map_err(|e| format!("{e:?}"))? {
                out.insert((scope.clone(), key), version);
            }
        }
        Ok(out)
    }

    /// Syncs every ordered pair until nothing moves (bounded), then checks that every node
    /// equals the oracle and that all watermarks agree.
    ///
    /// # Errors
    /// A description of what did not converge.
    pub fn converge(&mut self) -> Result<(), String> {
        let n = self.len();
        let options = ExchangeOptions::default();
        // Failures "stop after a while": heal every transfer before the final sync.
        self.faults.clear();
        for _pass in 0..3 {
            for from in 0..n {
                for to in 0..n {
                    let mut guard = 0;
                    while self.round(from, to, &options)? {
                        guard += 1;
                        if guard > 10_000 {
                            return Err(format!("{from}->{to}: has_more never cleared"));
                        }
                    }
                    self.check_watermarks()?;
                }
            }
        }
        let first = self.node(0).watermarks().map_err(|e| format!("{e:?}"))?;
        for i in 0..n {
            let state = self.state_of(i)?;
            if state != self.oracle {
                return Err(format!(
                    "node {i} differs from the oracle:\n node: {state:?}\n oracle: {:?}",
                    self.oracle
                ));
            }
            for sc in 0..3 {
                let counts = self
                    .node(i)
                    .residency_counts(&scope(sc))
                    .map_err(|e| format!("{e:?}"))?;
                if counts.staged != 0 {
                    return Err(format!(
                        "node {i} still has {} Staged records in {}",
                        counts.staged,
                        scope(sc)
                    ));
                }
            }
            let marks = self.node(i).watermarks().map_err(|e| format!("{e:?}"))?;
            if marks != first {
                return Err(format!(
                    "watermarks differ: node 0 {first:?} vs node {i} {marks:?}"
                ));
            }
        }
        Ok(())
    }

    /// After [`Simulation::converge`]: one more round between every pair ships nothing and
    /// reports `has_more == false`.
    ///
    /// # Errors
    /// A description of the first round that moved something.
    pub fn check_quiet(&mut self) -> Result<(), String> {
        let n = self.len();
        for from in 0..n {
            for to in (0..n).filter(|t| *t != from) {
                let transport = InProcess::new(self.node(to).clone());
                let out =
                    block_on(self.node(from).exchange(&transport)).map_err(|e| format!("{e:?}"))?;
                if out.shipped != 0 || out.received != 0 || out.has_more {
                    return Err(format!(
                        "round {from}->{to} after convergence was not quiet: {out:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks the merge laws over `versions` (keyed by a small key index): folding them in any
/// of the given orders, with repetitions, gives the same state.
///
/// # Errors
/// A description of the orders that disagree.
pub fn check_merge_laws(versions: &[(u8, Version)], order_seed: u64) -> Result<(), String> {
    let fold = |vs: &mut dyn Iterator<Item = &(u8, Version)>| {
        let mut s = State::new();
        for (k, v) in vs {
            merge::merge_into(
                &mut s,
                &Scope::shared(),
                &Key::new([*k]).expect("one byte is a valid key"),
                v,
            );
        }
        s
    };
    let forward = fold(&mut versions.iter());
    let backward = fold(&mut versions.iter().rev());
    let mut shuffled: Vec<_> = versions.iter().chain(versions.iter().take(3)).collect();
    let mut rng = order_seed | 1;
    for i in (1..shuffled.len()).rev() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        shuffled.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    let mixed = fold(&mut shuffled.into_iter());
    // Associativity: merging two halves' folds equals folding everything.
    let mid = versions.len() / 2;
    let mut left = fold(&mut versions[..mid].iter());
    let right = fold(&mut versions[mid..].iter());
    for ((scope, key), v) in &right {
        merge::merge_into(&mut left, scope, key, v);
    }
    if forward != backward || forward != mixed || forward != left {
        return Err(format!("merge is order-dependent over {versions:?}"));
    }
    Ok(())
}

/// Decodes versions for [`check_merge_laws`] from arbitrary bytes: one writer issues one
/// version per timestamp, so the op is a function of the Hlc (as in a real system).
pub fn decode_versions(bytes: &[u8]) -> Vec<(u8, Version)> {
    bytes
        .chunks_exact(3)
        .map(|c| {
            let origin = crate::NodeId::from_bytes([1 + c[1] % 4; 16]).expect("non-zero id");
            let hlc = crate::Hlc::new(u64::from(c[2]), origin);
            let op = if (c[2] ^ c[1]) % 4 == 0 {
                Op::Delete
            } else {
                Op::Put {
                    value: hlc.to_string().into_bytes(),
                    blob: None,
                }
            };
            (c[0] % 6, Version { hlc, op })
        })
        .collect()
}

/// Fuzz target `merge_laws` (also replayed by `tests/fuzz_regressions.rs`): the first 8
/// bytes (zero-padded) are the order seed, the rest [`decode_versions`]; checks
/// [`check_merge_laws`].
///
/// # Errors
/// A description of the broken law.
pub fn fuzz_merge_laws(data: &[u8]) -> Result<(), String> {
    let (seed, rest) = data.split_at(data.len().min(8));
    let mut seed_bytes = [0u8; 8];
    seed_bytes[..seed.len()].copy_from_slice(seed);
    check_merge_laws(&decode_versions(rest), u64::from_le_bytes(seed_bytes))
}

/// Fuzz target `decode_envelope`: decodes `data` as both message kinds and checks that
/// whatever decodes survives a re-encode and decode unchanged. An odd first byte puts the
/// rest behind a valid version-1 header (kind 1 or 2 by the next bit), so the fuzzer
/// reaches the postcard body at once; an even one leaves the bytes as they are. Panics
/// and unbounded allocations are the fuzzer's to catch.
///
/// # Errors
/// A description of the message that did not round-trip.
pub fn fuzz_decode_envelope(data: &[u8]) -> Result<(), String> {
    use crate::wire::{ExchangeRequest, ExchangeResponse, Message, MAGIC, PROTOCOL_VERSION};
    let framed;
    let input = match data.split_first() {
        Some((&first, rest)) if first & 1 == 1 => {
            let kind = if first & 2 == 0 {
                ExchangeRequest::KIND
            } else {
                ExchangeResponse::KIND
            };
            framed = [&MAGIC[..], &PROTOCOL_VERSION.to_be_bytes(), &[kind], rest].concat();
            &framed[..]
        }
        _ => data,
    };
    round_trips::<ExchangeRequest>(input)?;
    round_trips::<ExchangeResponse>(input)
}

fn round_trips<M: crate::wire::Message + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
) -> Result<(), String> {
    use crate::wire::{decode, encode};
    let Ok(msg) = decode::<M>(bytes) else {
        return Ok(());
    };
    let again = decode::<M>(&encode(&msg))
        .map_err(|e| format!("{msg:?} re-encoded does not decode: {e}"))?;
    if again != msg {
        return Err(format!(
            "round trip changed the message:\n before: {msg:?}\n after: {again:?}"
        ));
    }
    Ok(())
}

/// Fuzz target `exchange_model`: the first byte picks 2 to 4 nodes, the rest are
/// [`Action::decode_all`]; runs them on an in-memory [`Simulation`] (checking the watermark
/// invariant after every step), then [`Simulation::converge`] and [`Simulation::check_quiet`].
///
/// # Errors
/// An engine error or a description of the broken invariant.
pub fn fuzz_exchange_model(data: &[u8]) -> Result<(), String> {
    let Some((&first, rest)) = data.split_first() else {
        return Ok(());
    };
    let n = 2 + usize::from(first) % 3;
    let mut sim = Simulation::in_memory(n).map_err(|e| format!("in-memory engines: {e:?}"))?;
    for action in Action::decode_all(rest, n) {
        sim.step(&action)
            .map_err(|e| format!("step {action:?}: {e}"))?;
    }
    sim.converge()?;
    sim.check_quiet()
}
