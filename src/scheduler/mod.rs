//! The scheduler: runs exchange rounds with each peer when they are due.
//!
//! A [`Scheduler`] owns one task per peer. The task runs a round
//!
//! - at once when the peer is added, and then every [`SchedulerConfig::interval`] after the
//!   last round ended;
//! - again at once while a round reports `has_more` (up to [`SchedulerConfig::max_burst`]
//!   rounds in a row);
//! - [`SchedulerConfig::debounce`] after a local change, or after versions from *another*
//!   peer were applied (so that a hub forwards them promptly); changes inside that window join
//!   the same round;
//! - at once when the peer's watch ([`Transport::watch`]) says it has news;
//! - at once on [`Scheduler::sync_now`].
//!
//! A round that leaves a stream halted (a file that could not be fetched or pushed, a clock
//! too far ahead; see [`ExchangeOutcome::halts`]) is followed by another after the
//! [`Backoff`] delay for the number of such rounds in a row, if that is sooner than the
//! interval: the held-back data is retried within a second or two, then less and less often,
//! without waiting a whole interval and without a tight loop.
//!
//! A failed round is retried after a delay from [`Backoff`] (exponential with jitter, reset by
//! a success). While a peer is backing off, changes and watch news do not cut the delay
//! short (an unreachable peer is not hammered); only [`Scheduler::sync_now`] does.
//!
//! Each round publishes `sync_applied`, or `sync_failed` then `sync_retry`, on the engine's
//! notifier. Optional hooks run before a round (an error aborts it: fail-closed) and after it
//! (an error is logged: fail-open).
//!
//! # Shutdown
//!
//! [`Scheduler::shutdown`] signals every task and waits for them. A round in flight is
//! abandoned at its next await point. That is safe: the engine applies each received page,
//! with its watermark advances and its knowledge of the peer, in one transaction, so dropping
//! the round's future leaves either all of a page or none of it (a commit already running on
//! its blocking thread completes there). What the peer already applied of our page is only
//! knowledge we lack, which the next round relearns. Dropping a [`Scheduler`] without shutting
//! it down aborts its tasks the same way.
//!
//! A round's storage work (redb reads and commits, blob files) runs on the runtime's blocking
//! threads ([`crate::blocking`]), so a slow commit never holds up the tasks that share a
//! worker thread with the round; see `docs/scheduling.md`.
//!
//! ```
//! use std::sync::Arc;
//! use highwater::notify::{Event, Notice, SyncEvent};
//! use highwater::{InProcess, Key, Scheduler, SchedulerConfig, Scope, SyncEngine};
//!
//! # let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
//! # runtime.block_on(async {
//! let a = Arc::new(SyncEngine::in_memory()?);
//! let b = Arc::new(SyncEngine::in_memory()?);
//! b.put(&Scope::shared(), &Key::try_from("k")?, b"from b".to_vec())?;
//!
//! let mut events = a.notifier().subscribe();
//! let scheduler = Scheduler::start(a.clone(), SchedulerConfig::default());
//! scheduler.add_peer("b", Arc::new(InProcess::new(b.clone())))?;
//! // The first round runs at once.
//! while let Some(notice) = events.recv().await {
//!     if let Notice::Event(Event::Sync(SyncEvent::Applied { peer, received, .. })) = notice {
//!         assert_eq!((peer.as_str(), received), ("b", 1));
//!         break;
//!     }
//! }
//! scheduler.shutdown().await?;
//! assert_eq!(a.digest()?, b.digest()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! One file over 600 lines because the configuration, the per-peer status and the scheduler's
//! control (add, pause, resume, shut down) are one public type's surface; the round loop is
//! in `rounds.rs`.

mod backoff;
mod rounds;
mod triggers;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::{
    HaltSide, HaltedStream, ListQuery, Listing, Lookup, NodeApi, PeerLink, PullProgress, Routed,
};
use crate::engine::{
    AuditOutcome, ExchangeOptions, ExchangeOutcome, LinkSource, RouteSource, SyncEngine,
};
use crate::error::Error;
use crate::exchange::{Halt, HaltReason, Session};
use crate::hlc::NodeId;
use crate::poison::lock;
use crate::record::{Hydration, Key, Scope, ScopeFilter};
use crate::transport::Transport;

pub use self::backoff::Backoff;
use self::rounds::run_peer;
use self::triggers::listen;

/// A hook run before each round with the peer's name; an error aborts the round, which then
/// counts as a failure (fail-closed).
pub type BeforeRound = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A hook run after each round with the peer's name and the round's result; an error is
/// logged and changes nothing else (fail-open).
pub type AfterRound =
    Arc<dyn Fn(&str, &Result<ExchangeOutcome, Error>) -> Result<(), String> + Send + Sync>;

/// Scheduler settings.
#[derive(Clone)]
pub struct SchedulerConfig {
    /// Time from the end of one round to the next when nothing else triggers one (default
    /// 30 s).
    pub interval: Duration,
    /// How long after a change a round starts; changes inside the window share the round
    /// (default 100 ms). Also the least time between two watch calls to one peer.
    pub debounce: Duration,
    /// Delays after failures.
    pub backoff: Backoff,
    /// Whether to watch each peer for news (default true). Peers whose transport does not
    /// support watching are not watched.
    pub watch: bool,
    /// How long one watch call waits for news (default 25 s).
    pub watch_timeout: Duration,
    /// Options of every round (scopes, page limit).
    pub options: ExchangeOptions,
    /// Rounds in a row while `has_more` before the peer falls back to its interval (default
    /// 100 000): a guard against a round that never stops reporting more.
    pub max_burst: usize,
    /// Seed of the jitter (default: random). Each peer draws from its own generator, seeded
    /// from this and the peer's name, so delays do not depend on how peers interleave.
    pub jitter_seed: Option<u64>,
    /// Runs before each round (fail-closed).
    pub before_round: Option<BeforeRound>,
    /// Runs after each round (fail-open).
    pub after_round: Option<AfterRound>,
    /// Time between audits with each peer (`None`: no scheduled audits), jittered by up to
    /// a tenth either way (default an hour). The first audit with a peer runs at the first
    /// idle moment after it is added (a node checks its contents when it starts), and one
    /// runs with every peer soon after the node detects it was restored from a backup. See
    /// [`SyncEngine::audit`].
    pub audit_interval: Option<Duration>,
    /// The hydration plan's boot scopes (default none: no plan). While any of them is not
    /// [`Hydration::Ready`], rounds pull only them; then rounds pull what
    /// [`SchedulerConfig::options`] says (the background). [`Scheduler::ready`] resolves
    /// once they are all ready.
    pub boot_scopes: BTreeSet<Scope>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            interval: Duration::from_secs(30),
            debounce: Duration::from_millis(100),
            backoff: Backoff::default(),
            watch: true,
            watch_timeout: Duration::from_secs(25),
            options: ExchangeOptions::default(),
            max_burst: 100_000,
            jitter_seed: None,
            before_round: None,
            after_round: None,
            audit_interval: Some(Duration::from_secs(3600)),
            boot_scopes: BTreeSet::new(),
        }
    }
}

impl fmt::Debug for SchedulerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchedulerConfig")
            .field("interval", &self.interval)
            .field("debounce", &self.debounce)
            .field("backoff", &self.backoff)
            .field("watch", &self.watch)
            .field("watch_timeout", &self.watch_timeout)
            .field("options", &self.options)
            .field("max_burst", &self.max_burst)
            .field("jitter_seed", &self.jitter_seed)
            .field("before_round", &self.before_round.is_some())
            .field("after_round", &self.after_round.is_some())
            .field("audit_interval", &self.audit_interval)
            .field("boot_scopes", &self.boot_scopes)
            .finish()
    }
}

/// What one peer's rounds do differently from the scheduler's defaults
/// ([`Scheduler::add_peer_with`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerOptions {
    /// The scopes synced with this peer (`None`: [`SchedulerConfig::options`]'s). A peer
    /// with its own scopes is outside the hydration plan: its rounds always pull these.
    pub scopes: Option<ScopeFilter>,
    /// Time between rounds with this peer when nothing triggers one sooner (`None`:
    /// [`SchedulerConfig::interval`]).
    pub interval: Option<Duration>,
}

/// Where the scheduler stands with one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The name the peer was added under.
    pub name: String,
    /// The peer's node id, once known.
    pub peer: Option<NodeId>,
    /// When the last round succeeded.
    pub last_success: Option<SystemTime>,
    /// Why the last failed round failed (kept after later successes).
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Whether the last round succeeded (false until one ended); its changes publish
    /// `connectivity_changed`.
    pub connected: bool,
    /// Whether the scheduler is paused ([`Scheduler::pause`]): no round, watch or audit
    /// runs until it resumes.
    pub paused: bool,
    /// Rounds that succeeded.
    pub rounds: u64,
    /// When the next round is due if nothing triggers one sooner (`None` while a round runs
    /// or follows at once).
    pub next_attempt: Option<Instant>,
    /// What this node keeps of its rounds with the peer: the streams either side halted
    /// and why, as of the last round that completed.
    pub session: Session,
    /// The last audit this scheduler ran with the peer: when it ended, and what it found
    /// or why it failed.
    pub last_audit: Option<(SystemTime, Result<AuditOutcome, String>)>,
    /// The current or last pull from the peer: versions received in the rounds in a row
    /// that had more, and how many the peer's last answer said remain (see
    /// [`PullProgress`]). `None` until a round succeeded.
    pub pull: Option<PullProgress>,
}

/// Errors of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// A peer of that name is already scheduled.
    #[error("peer {name:?} is already scheduled")]
    DuplicatePeer {
        /// The name.
        name: String,
    },
    /// No peer of that name is scheduled.
    #[error("no peer {name:?} is scheduled")]
    UnknownPeer {
        /// The name.
        name: String,
    },
}

/// One scheduled peer, as its task and the scheduler's other tasks see it.
pub(super) struct Peer {
    name: String,
    /// This peer's own scopes and interval.
    options: PeerOptions,
    /// Stops this peer's tasks ([`Scheduler::remove_peer`], or the scheduler's shutdown).
    stop: watch::Sender<bool>,
    status: Mutex<PeerStatus>,
    /// Changes and watch news: ignored while backing off.
    trigger: Notify,
    /// `sync_now`: cuts any wait short.
    force: Notify,
    /// An audit is wanted at the next idle moment (a restore was detected).
    audit_wanted: AtomicBool,
    /// The id noted in the store for this peer (what rounds after a restart expect), as
    /// far as this scheduler wrote or read it.
    noted: Mutex<Option<NodeId>>,
    /// The operator accepted a new identity for this peer: the next round that finds
    /// another node at its address re-attaches to it ([`Scheduler::accept_new_identity`]).
    accept_new: AtomicBool,
    /// The last failure logged at WARN and when: a peer that keeps failing the same way is
    /// logged once a minute, not every retry.
    warned: Mutex<Option<(std::time::Instant, String)>>,
    /// The peer's records API, as its transport reaches it: reads of a scope this peer
    /// hydrates go there until the scope is ready.
    reads: Option<Arc<dyn NodeApi>>,
}

impl Peer {
    fn status(&self) -> MutexGuard<'_, PeerStatus> {
        lock(&self.status)
    }

    /// The peer as the status document shows it (the engine adds what its store knows).
    fn link(&self) -> PeerLink {
        let status = self.status();
        let unix_ms = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .ok()
        };
        let here = status.session.halted_here();
        let files_missing = here
            .iter()
            .filter(|h| matches!(h.reason, HaltReason::BlobUnavailable { .. }))
            .count() as u64;
        let mut halted: Vec<HaltedStream> = here
            .into_iter()
            .map(|h| halted_stream(h, HaltSide::Here))
            .collect();
        halted.extend(
            status
                .session
                .halted_by_peer()
                .into_iter()
                .map(|h| halted_stream(h, HaltSide::Peer)),
        );
        PeerLink {
            name: status.name.clone(),
            id: status.peer,
            connected: status.connected,
            paused: status.paused,
            last_success_unix_ms: status.last_success.and_then(unix_ms),
            last_error: status.last_error.clone(),
            consecutive_failures: status.consecutive_failures,
            unacknowledged: 0,
            files_missing,
            halted,
            last_audit: None,
            pull: status.pull,
        }
    }

    /// Whether versions applied from `source` (`None`: a local change) are news to this peer.
    fn is_news(&self, source: Option<NodeId>) -> bool {
        source.is_none() || source != self.status().peer
    }
}

/// A halted stream as the status document shows it.
fn halted_stream(halt: Halt, by: HaltSide) -> HaltedStream {
    let (reason, ahead_by_ms) = match halt.reason {
        HaltReason::ClockSkew { ahead_by_ms } => ("clock_skew", Some(ahead_by_ms)),
        HaltReason::OwnOrigin => ("own_origin", None),
        HaltReason::BlobUnavailable { .. } => ("blob_unavailable", None),
        HaltReason::BelowFloor { .. } => ("below_floor", None),
    };
    HaltedStream {
        scope: halt.scope,
        origin: halt.origin,
        by,
        reason: reason.to_owned(),
        ahead_by_ms,
    }
}

/// What the scheduler's tasks share.
pub(super) struct Shared {
    engine: Arc<SyncEngine>,
    config: SchedulerConfig,
    peers: Mutex<Vec<Arc<Peer>>>,
    /// Whether every boot scope is ready (true when there are none).
    boot_ready: watch::Sender<bool>,
    /// Whether rounds are paused ([`Scheduler::pause`]).
    paused: watch::Sender<bool>,
}

impl Shared {
    /// The peer a read of `scope` goes to while the scope hydrates: the first added that
    /// pulls the scope and whose records can be read, connected ones first.
    fn route(&self, scope: &Scope) -> Option<(String, Arc<dyn NodeApi>)> {
        let peers = lock(&self.peers);
        let pulls = |p: &Peer| match &p.options.scopes {
            Some(own) => own.contains(scope),
            None => {
                self.config.options.scopes.contains(scope)
                    || self.config.boot_scopes.contains(scope)
            }
        };
        let candidates = || {
            peers
                .iter()
                .filter(|p| pulls(p))
                .filter_map(|p| p.reads.clone().map(|api| (p, api)))
        };
        candidates()
            .find(|(p, _)| p.status().connected)
            .or_else(|| candidates().next())
            .map(|(p, api)| (p.name.clone(), api))
    }

    /// The options of the next round: the boot scopes alone until they are ready, then the
    /// configured ones.
    pub(super) fn round_options(&self, peer: &Peer) -> ExchangeOptions {
        if let Some(scopes) = &peer.options.scopes {
            return ExchangeOptions {
                scopes: scopes.clone(),
                ..self.config.options.clone()
            };
        }
        if *self.boot_ready.borrow() {
            return self.config.options.clone();
        }
        ExchangeOptions {
            scopes: ScopeFilter::Only(self.config.boot_scopes.clone()),
            ..self.config.options.clone()
        }
    }
}

/// Runs exchange rounds with each peer when they are due (see the [module docs](self)).
pub struct Scheduler {
    shared: Arc<Shared>,
    /// What the engine's status document shows of the peers (it holds a weak reference).
    _links: Arc<LinkSource>,
    /// Where the engine's routed reads find a scope's peer (it holds a weak reference).
    _routes: Arc<RouteSource>,
    stop: watch::Sender<bool>,
    /// IMPORTANT: dropping the set aborts every task still in it (the drop guard).
    tasks: Mutex<JoinSet<()>>,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.shared.config)
            .field("peers", &self.peers())
            .finish_non_exhaustive()
    }
}

/// Whether every one of `boot` is ready in `engine`'s store. A failed read counts as not
/// ready: the first round finds out.
///
/// IMPORTANT: read on a thread of its own. The caller is often a runtime's thread, where a
/// store with a blocking client that runs its own runtime (PostgreSQL's) cannot be called.
fn boot_ready(engine: &SyncEngine, boot: &BTreeSet<Scope>) -> bool {
    if boot.is_empty() {
        return true;
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            boot.iter()
                .all(|scope| matches!(engine.hydration(scope), Ok(Hydration::Ready)))
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Scheduler {
    /// Starts a scheduler for `engine`, with no peers yet.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(engine: Arc<SyncEngine>, config: SchedulerConfig) -> Scheduler {
        let runtime = tokio::runtime::Handle::current();
        let changes = engine.notifier().subscribe();
        let boot_ready = boot_ready(&engine, &config.boot_scopes);
        let shared = Arc::new(Shared {
            engine,
            config,
            peers: Mutex::new(Vec::new()),
            boot_ready: watch::channel(boot_ready).0,
            paused: watch::channel(false).0,
        });
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn_on(listen(shared.clone(), changes, stopped), &runtime);
        let links: Arc<LinkSource> = {
            let shared = Arc::downgrade(&shared);
            Arc::new(move || match shared.upgrade() {
                Some(shared) => lock(&shared.peers).iter().map(|p| p.link()).collect(),
                None => Vec::new(),
            })
        };
        shared.engine.show_links(Arc::downgrade(&links));
        let routes: Arc<RouteSource> = {
            let shared = Arc::downgrade(&shared);
            Arc::new(move |scope: &Scope| shared.upgrade().and_then(|s| s.route(scope)))
        };
        shared.engine.route_reads(Arc::downgrade(&routes));
        Scheduler {
            shared,
            _links: links,
            _routes: routes,
            stop,
            tasks: Mutex::new(tasks),
            runtime,
        }
    }

    /// Schedules rounds with the peer reached over `transport`, under `name` (used in events
    /// and status). Its first round starts at once.
    ///
    /// # Errors
    /// [`SchedulerError::DuplicatePeer`] if `name` is taken.
    pub fn add_peer<T: Transport + 'static>(
        &self,
        name: impl Into<String>,
        transport: Arc<T>,
    ) -> Result<(), SchedulerError> {
        self.add_peer_with(name, transport, PeerOptions::default())
    }

    /// As [`Scheduler::add_peer`], with the peer's own scopes and interval.
    ///
    /// # Errors
    /// [`SchedulerError::DuplicatePeer`] if `name` is taken.
    pub fn add_peer_with<T: Transport + 'static>(
        &self,
        name: impl Into<String>,
        transport: Arc<T>,
        options: PeerOptions,
    ) -> Result<(), SchedulerError> {
        let name = name.into();
        let (stop, stopped) = watch::channel(*self.stop.borrow());
        let peer = {
            let mut peers = lock(&self.shared.peers);
            if peers.iter().any(|p| p.name == name) {
                return Err(SchedulerError::DuplicatePeer { name });
            }
            let peer = Arc::new(Peer {
                status: Mutex::new(PeerStatus {
                    name: name.clone(),
                    peer: transport.peer_id(),
                    last_success: None,
                    last_error: None,
                    consecutive_failures: 0,
                    connected: false,
                    paused: *self.shared.paused.borrow(),
                    rounds: 0,
                    next_attempt: None,
                    session: Session::named(name.clone()),
                    last_audit: None,
                    pull: None,
                }),
                name,
                options,
                stop,
                trigger: Notify::new(),
                force: Notify::new(),
                audit_wanted: AtomicBool::new(false),
                warned: Mutex::new(None),
                accept_new: AtomicBool::new(false),
                noted: Mutex::new(None),
                reads: transport.records(),
            });
            peers.push(peer.clone());
            peer
        };
        let task = run_peer(self.shared.clone(), peer, transport, stopped);
        lock(&self.tasks).spawn_on(task, &self.runtime);
        Ok(())
    }

    /// Accepts that the peer called `name` is now another node (the one at its address
    /// was replaced): the next round that finds a node other than the one expected
    /// re-attaches to it instead of refusing it. What this node knew of the old node is
    /// dropped, the new id is noted, and an audit (a full comparison of contents) follows
    /// the round. One change is accepted; a later one is refused again. Starts a round at
    /// once. See `docs/scheduling.md`, "A peer that changed its id".
    ///
    /// # Errors
    /// [`SchedulerError::UnknownPeer`] if no peer is called `name`.
    pub fn accept_new_identity(&self, name: &str) -> Result<(), SchedulerError> {
        let peers = lock(&self.shared.peers);
        let peer =
            peers
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| SchedulerError::UnknownPeer {
                    name: name.to_owned(),
                })?;
        peer.accept_new
            .store(true, std::sync::atomic::Ordering::SeqCst);
        peer.force.notify_one();
        Ok(())
    }

    /// Resolves once every boot scope of the hydration plan
    /// ([`SchedulerConfig::boot_scopes`]) is ready: pulled completely from a peer, now or
    /// before a restart. At once when there are none. Background scopes do not hold it up.
    pub fn ready(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut ready = self.shared.boot_ready.subscribe();
        async move {
            // An error means the scheduler is gone: nothing will become ready.
            if ready.wait_for(|r| *r).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether every boot scope is ready (see [`Scheduler::ready`]).
    pub fn is_ready(&self) -> bool {
        *self.shared.boot_ready.borrow()
    }

    /// Reads `key` where it is best read now: from this node once `scope` is
    /// [`Hydration::Ready`], before that from the peer that hydrates it (the first added
    /// that pulls the scope and can be read from, connected ones first), with this node's
    /// newer version where it has one; from this node if no peer can answer. The answer
    /// says which ([`Source`](crate::api::Source)). The same as the engine's
    /// [`NodeApi::get_routed`] while this scheduler runs. See docs/scheduling.md, "Routed
    /// reads".
    ///
    /// # Errors
    /// This node's store failed (a peer that cannot answer is not an error).
    pub async fn get_routed(&self, scope: Scope, key: Key) -> Result<Routed<Lookup>, Error> {
        NodeApi::get_routed(&*self.shared.engine, scope, key).await
    }

    /// Lists `scope` as [`Scheduler::get_routed`] reads: from the peer while the scope
    /// hydrates (merged with this node's newer versions), from here once it is ready.
    ///
    /// # Errors
    /// As for [`Scheduler::get_routed`].
    pub async fn list_routed(
        &self,
        scope: Scope,
        query: ListQuery,
    ) -> Result<Routed<Listing>, Error> {
        NodeApi::list_routed(&*self.shared.engine, scope, query).await
    }

    /// Stops syncing with the peer called `name`: its tasks end at their next await point (a
    /// round in flight is abandoned safely, see the [module docs](self)) and it leaves
    /// [`Scheduler::peers`] and the status. The id noted for it stays: added again under the
    /// same name, it expects the same node.
    ///
    /// # Errors
    /// [`SchedulerError::UnknownPeer`] if no peer is called `name`.
    pub fn remove_peer(&self, name: &str) -> Result<(), SchedulerError> {
        let mut peers = lock(&self.shared.peers);
        let at = peers.iter().position(|p| p.name == name).ok_or_else(|| {
            SchedulerError::UnknownPeer {
                name: name.to_owned(),
            }
        })?;
        let peer = peers.remove(at);
        peer.stop.send_replace(true);
        Ok(())
    }

    /// Pauses syncing (going offline on purpose): no round, watch call or audit starts with
    /// any peer until [`Scheduler::resume`]; a round in flight finishes. Local writes go on
    /// and are synced after resuming.
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
        for peer in lock(&self.shared.peers).iter() {
            peer.status().paused = true;
        }
    }

    /// Resumes syncing after [`Scheduler::pause`], with a round with every peer at once.
    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
        for peer in lock(&self.shared.peers).iter() {
            peer.status().paused = false;
            peer.force.notify_one();
        }
    }

    /// Starts a round with every peer now, even one that is backing off.
    pub fn sync_now(&self) {
        for peer in lock(&self.shared.peers).iter() {
            peer.force.notify_one();
        }
    }

    /// Where the scheduler stands with each peer, in the order they were added.
    pub fn peers(&self) -> Vec<PeerStatus> {
        lock(&self.shared.peers)
            .iter()
            .map(|p| p.status().clone())
            .collect()
    }

    /// Stops every task (a round in flight is abandoned at its next await point, see the
    /// [module docs](self)), waits for them to end, then makes the engine's applied pages
    /// durable.
    ///
    /// # Errors
    /// The final [`SyncEngine::flush`] failed.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.stop.send_replace(true);
        for peer in lock(&self.shared.peers).iter() {
            peer.stop.send_replace(true);
        }
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        while let Some(ended) = tasks.join_next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a scheduler task ended abnormally");
            }
        }
        // Off the runtime's threads (a PostgreSQL store's client cannot run on one).
        let engine = self.shared.engine.handle();
        match crate::blocking::run_blocking(move || engine.flush()).await {
            Ok(flushed) => flushed,
            Err(e) => {
                tracing::warn!(error = %e, "the final flush did not run");
                Ok(())
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Tasks still running see the signal at their next await; the JoinSet, dropped right
        // after, aborts them in any case.
        self.stop.send_replace(true);
        for peer in lock(&self.shared.peers).iter() {
            peer.stop.send_replace(true);
        }
    }
}

/// Resolves once rounds are not paused; `false` if the scheduler stopped first.
pub(super) async fn unpaused(shared: &Shared, stop: &mut watch::Receiver<bool>) -> bool {
    let mut paused = shared.paused.subscribe();
    tokio::select! {
        biased;
        () = stopped(stop) => false,
        resumed = paused.wait_for(|p| !*p) => resumed.is_ok(),
    }
}

/// Resolves once the scheduler stops (or is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the scheduler was dropped.
    let _ = stop.wait_for(|s| *s).await;
}

/// A per-peer random generator for jitter: from the configured seed and the peer's name (and
/// `stream`, so two loops of one peer draw independently), or from the OS.
pub(super) fn peer_rng(seed: Option<u64>, name: &str, stream: &str) -> StdRng {
    match seed {
        Some(seed) => {
            let mut h = blake3::Hasher::new();
            h.update(&seed.to_le_bytes());
            h.update(stream.as_bytes());
            h.update(name.as_bytes());
            StdRng::from_seed(*h.finalize().as_bytes())
        }
        None => StdRng::from_os_rng(),
    }
}
