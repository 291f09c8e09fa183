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

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use crate::engine::{ExchangeOptions, ExchangeOutcome, SyncEngine};
use crate::error::{error_chain, Error, TransportError};
use crate::exchange::Session;
use crate::hlc::NodeId;
use crate::notify::{ChangeKind, Event, Notice, Subscription, SyncEvent};
use crate::transport::Transport;

/// How long to wait before retrying after consecutive failures:
/// `min(base * factor^(attempt - 1), cap)` plus a uniform jitter in `[0, jitter]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The delay after the first failure, before jitter (default 1 s).
    pub base: Duration,
    /// The growth per further failure (default 2). Values below 1 (and NaN) count as 1.
    pub factor: f64,
    /// The largest delay before jitter (default 60 s).
    pub cap: Duration,
    /// The largest jitter added to each delay (default 0.5 s).
    pub jitter: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(60),
            jitter: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    /// The delay after `attempt` consecutive failures (1 after the first), before jitter:
    /// `min(base * factor^(attempt - 1), cap)`. Attempt 0 counts as 1.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        if self.base.is_zero() {
            return Duration::ZERO;
        }
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        // f64::max ignores NaN, so a NaN factor counts as 1.
        let growth = self.factor.max(1.0).powi(exponent);
        // Nanoseconds as f64 are exact up to 2^53 ns (104 days), and multiplying by a power
        // of two stays exact, so the default formula gives whole durations.
        let raw = self.base.as_nanos() as f64 * growth;
        if raw >= self.cap.as_nanos() as f64 {
            return self.cap;
        }
        // raw < cap, which is a Duration: the cast cannot saturate past it.
        duration_from_nanos(raw as u128)
    }

    /// The delay after `attempt` consecutive failures: [`Backoff::ceiling`] plus a jitter
    /// drawn uniformly from `[0, jitter]` with `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let jitter = u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX);
        let extra = if jitter == 0 {
            0
        } else {
            rng.random_range(0..=jitter)
        };
        self.ceiling(attempt)
            .saturating_add(Duration::from_nanos(extra))
    }
}

fn duration_from_nanos(nanos: u128) -> Duration {
    const PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / PER_SEC).unwrap_or(u64::MAX);
    let sub = u32::try_from(nanos % PER_SEC).expect("a remainder below 10^9 fits a u32");
    Duration::new(secs, sub)
}

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
            .finish()
    }
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
    /// Rounds that succeeded.
    pub rounds: u64,
    /// When the next round is due if nothing triggers one sooner (`None` while a round runs
    /// or follows at once).
    pub next_attempt: Option<Instant>,
    /// What this node keeps of its rounds with the peer: the streams either side halted
    /// and why, as of the last round that completed.
    pub session: Session,
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
}

/// One scheduled peer, as its task and the scheduler's other tasks see it.
struct Peer {
    name: String,
    status: Mutex<PeerStatus>,
    /// Changes and watch news: ignored while backing off.
    trigger: Notify,
    /// `sync_now`: cuts any wait short.
    force: Notify,
}

impl Peer {
    fn status(&self) -> MutexGuard<'_, PeerStatus> {
        lock(&self.status)
    }

    /// Whether versions applied from `source` (`None`: a local change) are news to this peer.
    fn is_news(&self, source: Option<NodeId>) -> bool {
        source.is_none() || source != self.status().peer
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain data, valid whatever a panicking holder did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the scheduler's tasks share.
struct Shared {
    engine: Arc<SyncEngine>,
    config: SchedulerConfig,
    peers: Mutex<Vec<Arc<Peer>>>,
}

/// Runs exchange rounds with each peer when they are due (see the [module docs](self)).
pub struct Scheduler {
    shared: Arc<Shared>,
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

impl Scheduler {
    /// Starts a scheduler for `engine`, with no peers yet.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(engine: Arc<SyncEngine>, config: SchedulerConfig) -> Scheduler {
        let runtime = tokio::runtime::Handle::current();
        let changes = engine.notifier().subscribe();
        let shared = Arc::new(Shared {
            engine,
            config,
            peers: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn_on(listen(shared.clone(), changes, stopped), &runtime);
        Scheduler {
            shared,
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
        let name = name.into();
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
                    rounds: 0,
                    next_attempt: None,
                    session: Session::named(name.clone()),
                }),
                name,
                trigger: Notify::new(),
                force: Notify::new(),
            });
            peers.push(peer.clone());
            peer
        };
        let task = run_peer(self.shared.clone(), peer, transport, self.stop.subscribe());
        lock(&self.tasks).spawn_on(task, &self.runtime);
        Ok(())
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
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        while let Some(ended) = tasks.join_next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a scheduler task ended abnormally");
            }
        }
        self.shared.engine.flush()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Tasks still running see the signal at their next await; the JoinSet, dropped right
        // after, aborts them in any case.
        self.stop.send_replace(true);
    }
}

/// Resolves once the scheduler stops (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the scheduler was dropped.
    let _ = stop.wait_for(|s| *s).await;
}

/// A per-peer random generator for jitter: from the configured seed and the peer's name (and
/// `stream`, so two loops of one peer draw independently), or from the OS.
fn peer_rng(seed: Option<u64>, name: &str, stream: &str) -> StdRng {
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

async fn run_peer<T: Transport + 'static>(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    transport: Arc<T>,
    stop: watch::Receiver<bool>,
) {
    let watching = async {
        if shared.config.watch {
            watch_loop(&shared, &peer, &*transport, stop.clone()).await;
        }
    };
    // The watch goes first, so that its first call (which fetches a token, and counts as
    // news) is made before the first round where the transport answers it at once.
    tokio::join!(
        watching,
        round_loop(&shared, &peer, &*transport, stop.clone())
    );
}

/// What follows a round.
enum Next {
    /// Another round at once (`has_more`).
    AtOnce,
    /// A round at this time, or sooner if triggered.
    At(Instant),
    /// A retry at this time; only `sync_now` comes sooner.
    Retry(Instant),
}

async fn round_loop<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    mut stop: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let mut rng = peer_rng(config.jitter_seed, &peer.name, "rounds");
    let mut next = Next::AtOnce;
    let mut burst = 0usize;
    // Rounds in a row that left a stream halted.
    let mut halted = 0u32;
    loop {
        match next {
            Next::AtOnce => {
                // A burst of rounds over a transport that never waits must still let other
                // tasks (and the stop signal) in.
                tokio::task::yield_now().await;
                if *stop.borrow() {
                    return;
                }
            }
            Next::At(at) | Next::Retry(at) => {
                let backing_off = matches!(next, Next::Retry(_));
                peer.status().next_attempt = Some(at);
                tokio::select! {
                    biased;
                    () = stopped(&mut stop) => return,
                    () = peer.force.notified() => {}
                    () = peer.trigger.notified(), if !backing_off => {}
                    () = sleep_until(at) => {}
                }
                peer.status().next_attempt = None;
            }
        }
        // The round about to start covers every trigger that came before it.
        let _ = peer.trigger.notified().now_or_never();
        let _ = peer.force.notified().now_or_never();
        let result = tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            result = run_round(shared, peer, transport) => result,
        };
        next = match result {
            Ok(outcome) => {
                burst += 1;
                if outcome.has_more && burst < config.max_burst {
                    Next::AtOnce
                } else {
                    if outcome.has_more {
                        tracing::warn!(peer = %peer.name, rounds = burst,
                            "still more to sync after max_burst rounds in a row; waiting for the interval");
                    }
                    burst = 0;
                    let mut wait = config.interval;
                    if outcome.halts.is_empty() && outcome.peer_halts.is_empty() {
                        halted = 0;
                    } else {
                        halted = halted.saturating_add(1);
                        wait = wait.min(config.backoff.delay(halted, &mut rng));
                    }
                    Next::At(Instant::now() + wait)
                }
            }
            Err(error) => {
                burst = 0;
                Next::Retry(Instant::now() + failed(shared, peer, error, &mut rng))
            }
        };
    }
}

/// Runs one round with its hooks, and records and publishes its success.
async fn run_round<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
) -> Result<ExchangeOutcome, String> {
    let config = &shared.config;
    if let Some(hook) = &config.before_round {
        hook(&peer.name).map_err(|e| format!("before-round hook refused the round: {e}"))?;
    }
    // The round works on a copy of the session, written back whether it succeeds or not
    // (a failed round leaves the session without held marks: its next request is in full).
    let mut session = peer.status().session.clone();
    let result = shared
        .engine
        .exchange_in(&mut session, transport, &config.options)
        .await;
    peer.status().session = session;
    if let Some(hook) = &config.after_round {
        if let Err(e) = hook(&peer.name, &result) {
            tracing::warn!(peer = %peer.name, error = %e, "after-round hook failed");
        }
    }
    let outcome = result.map_err(|e| error_chain(&e))?;
    {
        let mut status = peer.status();
        status.peer = Some(outcome.peer);
        status.last_success = Some(SystemTime::now());
        status.consecutive_failures = 0;
        status.rounds += 1;
    }
    shared
        .engine
        .notifier()
        .publish(Event::Sync(SyncEvent::Applied {
            peer: peer.name.clone(),
            shipped: outcome.shipped,
            received: outcome.received,
            applied: outcome.applied,
            has_more: outcome.has_more,
        }));
    Ok(outcome)
}

/// Records and publishes a failed round; returns the delay before the retry.
fn failed(shared: &Shared, peer: &Peer, error: String, rng: &mut StdRng) -> Duration {
    let attempt = {
        let mut status = peer.status();
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
        status.last_error = Some(error.clone());
        status.consecutive_failures
    };
    let delay = shared.config.backoff.delay(attempt, rng);
    tracing::debug!(peer = %peer.name, %error, attempt, ?delay, "round failed");
    let notifier = shared.engine.notifier();
    notifier.publish(Event::Sync(SyncEvent::Failed {
        peer: peer.name.clone(),
        error,
    }));
    notifier.publish(Event::Sync(SyncEvent::Retry {
        peer: peer.name.clone(),
        attempt,
        delay,
    }));
    // Pages applied before the failure may be deferred (not yet durable); make them durable
    // now rather than leave them to the next round (docs/protocol.md, durability).
    if let Err(e) = shared.engine.flush() {
        tracing::warn!(error = %error_chain(&e), "flush after a failed round failed");
    }
    delay
}

/// Waits on the peer's watch and triggers a round when it reports news.
async fn watch_loop<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    mut stop: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let mut rng = peer_rng(config.jitter_seed, &peer.name, "watch");
    let mut token: Option<String> = None;
    let mut failures = 0u32;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            () = sleep_until(next) => {}
        }
        let started = Instant::now();
        let reply = tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            reply = transport.watch(token.clone(), Some(shared.engine.node_id()), config.watch_timeout) => reply,
        };
        next = match reply {
            Ok(reply) => {
                failures = 0;
                // A reply to a call without a token is news too: the peer may have changed
                // between our last round's answer and the moment this token was taken, and
                // no later watch reports what happened before its token.
                if reply.news {
                    peer.trigger.notify_one();
                }
                token = Some(reply.token);
                // A peer that answers at once cannot make this loop spin.
                started + config.debounce
            }
            Err(TransportError::Unsupported { .. }) => {
                tracing::debug!(peer = %peer.name, "transport cannot watch; relying on the interval");
                return;
            }
            Err(e) => {
                if matches!(
                    e,
                    TransportError::Refused { .. } | TransportError::BadResponse(_)
                ) {
                    // The peer may not take our token (or we misread its reply): start over.
                    token = None;
                }
                failures = failures.saturating_add(1);
                let delay = config.backoff.delay(failures, &mut rng);
                tracing::debug!(peer = %peer.name, error = %error_chain(&e), ?delay, "watch failed");
                Instant::now() + delay
            }
        };
    }
}

/// Triggers rounds after local changes and after versions applied from a peer (for every
/// other peer), `debounce` after the first change of a window.
async fn listen(shared: Arc<Shared>, mut changes: Subscription, mut stop: watch::Receiver<bool>) {
    // Where the changes of the open window came from (`None`: local, or unknown).
    let mut sources: BTreeSet<Option<NodeId>> = BTreeSet::new();
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                for peer in lock(&shared.peers).iter() {
                    if sources.iter().any(|s| peer.is_news(*s)) {
                        peer.trigger.notify_one();
                    }
                }
                sources.clear();
                deadline = None;
            }
            notice = changes.recv() => {
                let Some(notice) = notice else {
                    // The engine's notifier outlives this task; wait for the stop anyway.
                    stopped(&mut stop).await;
                    return;
                };
                if let Some(source) = change_source(&notice) {
                    sources.insert(source);
                    deadline.get_or_insert_with(|| Instant::now() + shared.config.debounce);
                }
            }
        }
    }
}

/// The source of a change that should trigger rounds: `Some(None)` for a local change (or
/// missed events, which may have been any change), `Some(Some(peer))` for versions applied
/// from `peer`, `None` for anything else.
fn change_source(notice: &Notice) -> Option<Option<NodeId>> {
    match notice {
        Notice::Missed(_) => Some(None),
        Notice::Event(Event::Change(c)) => match c.kind {
            ChangeKind::LocalChangeRecorded => Some(None),
            ChangeKind::RemoteUpdateAvailable => Some(c.peer),
            ChangeKind::LocalDataSynced => None,
        },
        Notice::Event(Event::Sync(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_delays_double_up_to_the_cap() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=8).map(|a| b.ceiling(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn odd_factors_do_not_shrink_or_break_the_delay() {
        for factor in [f64::NAN, -3.0, 0.0, 0.5, f64::INFINITY] {
            let b = Backoff {
                factor,
                ..Backoff::default()
            };
            let expected = if factor == f64::INFINITY {
                [1, 60, 60]
            } else {
                [1, 1, 1]
            };
            let got: Vec<u64> = (1..=3).map(|a| b.ceiling(a).as_secs()).collect();
            assert_eq!(got, expected, "factor {factor}");
        }
    }

    proptest! {
        /// The delay is `min(base * factor^(attempt-1), cap)` plus at most `jitter`, checked
        /// against integer arithmetic for whole factors.
        #[test]
        fn delay_follows_the_formula(
            base_ms in 0u64..10_000,
            factor in 1u32..5,
            cap_ms in 0u64..1_000_000,
            jitter_ms in 0u64..5_000,
            attempt in 1u32..80,
            seed: u64,
        ) {
            let b = Backoff {
                base: Duration::from_millis(base_ms),
                factor: f64::from(factor),
                cap: Duration::from_millis(cap_ms),
                jitter: Duration::from_millis(jitter_ms),
            };
            let growth = u128::from(factor).checked_pow(attempt - 1);
            let model_ms = growth
                .and_then(|g| g.checked_mul(u128::from(base_ms)))
                .map_or(u128::from(cap_ms), |ms| ms.min(u128::from(cap_ms)));
            let ceiling = b.ceiling(attempt);
            prop_assert_eq!(ceiling.as_millis(), model_ms);
            let delay = b.delay(attempt, &mut StdRng::seed_from_u64(seed));
            prop_assert!(delay >= ceiling && delay <= ceiling + b.jitter, "{delay:?} vs {ceiling:?}");
            prop_assert!(b.ceiling(attempt + 1) >= ceiling, "never shrinks");
        }

        /// Fractional factors stay within the cap and grow monotonically.
        #[test]
        fn fractional_factors_grow_to_the_cap(
            factor in 1.0f64..3.0,
            attempt in 1u32..200,
        ) {
            let b = Backoff { factor, ..Backoff::default() };
            prop_assert!(b.ceiling(attempt) <= b.cap);
            prop_assert!(b.ceiling(attempt) >= b.base);
            prop_assert!(b.ceiling(attempt + 1) >= b.ceiling(attempt));
        }
    }
}
