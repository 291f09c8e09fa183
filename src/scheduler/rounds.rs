//! One peer's task: the round loop, one round with its hooks and events, a failure.
//!
//! One file over 600 lines because the round loop, its hooks, its events and its failure handling
//! are one peer task's life: each step reads and updates the same per-peer state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::blocking::run_blocking;
use crate::engine::{ExchangeOptions, ExchangeOutcome};
use crate::error::{error_chain, Error, ProtocolError, TransportError};
use crate::exchange::{Halt, HaltReason, Session};
use crate::hlc::NodeId;
use crate::notify::{follow_pages, Event, SyncEvent};
use crate::poison::lock;
use crate::record::{Hydration, Scope, ScopeFilter};
use crate::transport::Transport;

use super::triggers::watch_loop;
use super::{peer_rng, stopped, unpaused, Peer, Shared};

pub(super) async fn run_peer<T: Transport + 'static>(
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
pub(super) enum Next {
    /// Another round at once (`has_more`).
    AtOnce,
    /// A round at this time, or sooner if triggered.
    At(Instant),
    /// A retry at this time; only `sync_now` comes sooner.
    Retry(Instant),
}

pub(super) async fn round_loop<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    mut stop: watch::Receiver<bool>,
) {
    let config = &shared.config;
    let mut rng = peer_rng(config.jitter_seed, &peer.name, "rounds");
    let mut next = Next::AtOnce;
    let mut next_audit = config
        .audit_interval
        .map(|every| Instant::now() + jittered(every, &mut rng));
    // A node that starts with files its records reference missing (a blob directory lost
    // or not restored) audits at its first idle moment, which fetches them.
    if config.audit_interval.is_some() && shared.engine.missing_files().await {
        peer.audit_wanted.store(true, Ordering::SeqCst);
    }
    // The node this peer was last found to be (noted across restarts): rounds are
    // addressed to it, and another node at the address is refused.
    let name = peer.name.clone();
    let engine = shared.engine.handle();
    match run_blocking(move || engine.expected_peer(&name)).await {
        Ok(Ok(Some(id))) => {
            *lock(&peer.noted) = Some(id);
            let mut status = peer.status();
            status.peer = Some(id);
            status.session = Session::named_expecting(peer.name.clone(), Some(id));
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::warn!(peer = %peer.name, error = %error_chain(&e),
            "cannot read the id this peer is expected to have; the first round learns it"),
        Err(e) => {
            tracing::warn!(peer = %peer.name, error = %e, "cannot read the peer's expected id")
        }
    }
    let mut burst = 0usize;
    // A round of this burst heard the peer's purge floor rise.
    let mut recloning = false;
    // Rounds in a row that left a stream halted.
    let mut halted = 0u32;
    let interval = peer.options.interval.unwrap_or(config.interval);
    loop {
        if !unpaused(shared, &mut stop).await {
            return;
        }
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
                // An audit that falls due before the next round wakes an idle peer (never
                // one backing off) for the audit alone.
                let audit_at = next_audit.filter(|a| !backing_off && *a < at);
                peer.status().next_attempt = Some(at);
                let audit_due = tokio::select! {
                    biased;
                    () = stopped(&mut stop) => return,
                    () = peer.force.notified() => false,
                    () = peer.trigger.notified(), if !backing_off => false,
                    () = sleep_until(audit_at.unwrap_or(at)) => audit_at.is_some(),
                };
                peer.status().next_attempt = None;
                if *shared.paused.borrow() {
                    // Paused while waiting: the round waits for the resume.
                    continue;
                }
                if audit_due {
                    next_audit = audit(shared, peer, transport, &mut rng).await;
                    continue;
                }
            }
        }
        // The round about to start covers every trigger that came before it.
        let _ = peer.trigger.notified().now_or_never();
        let _ = peer.force.notified().now_or_never();
        let result = tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            result = run_round(shared, peer, transport, burst == 0) => result,
        };
        next = match result {
            Ok(outcome) => {
                burst += 1;
                if outcome.audit_wanted {
                    // The peer's purge floor rose: audit with it once the burst ends, audits
                    // on an interval or not, so deletes it purged reach us (the re-clone).
                    recloning = true;
                }
                if outcome.has_more && burst < config.max_burst {
                    Next::AtOnce
                } else {
                    if outcome.has_more {
                        tracing::warn!(peer = %peer.name, rounds = burst,
                            "still more to sync after max_burst rounds in a row; waiting for the interval");
                    }
                    burst = 0;
                    let wanted = peer.audit_wanted.swap(false, Ordering::SeqCst);
                    if wanted || next_audit.is_some_and(|at| at <= Instant::now()) {
                        next_audit = audit(shared, peer, transport, &mut rng).await;
                    } else if recloning {
                        // Not due, or audits are off: this one is for the re-clone alone.
                        let _ = run_audit(shared, peer, transport).await;
                    }
                    recloning = false;
                    let mut wait = interval;
                    if !outcome
                        .halts
                        .iter()
                        .chain(&outcome.peer_halts)
                        .any(Halt::holds_stream)
                    {
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

/// `every` jittered by up to a tenth either way, so that a hub's peers do not all audit at
/// once.
fn jittered(every: Duration, rng: &mut StdRng) -> Duration {
    let tenth = every / 10;
    let spread = u64::try_from(tenth.as_millis()).unwrap_or(u64::MAX);
    let offset = Duration::from_millis(rng.random_range(0..=spread.saturating_mul(2)));
    (every - tenth).saturating_add(offset)
}

/// Runs one audit with the peer and returns when the next is due: an interval later after
/// a success, the backoff's first delay after a failure, never again (`None`) if the peer
/// cannot audit or audits are off.
async fn audit<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    rng: &mut StdRng,
) -> Option<Instant> {
    let every = shared.config.audit_interval?;
    match run_audit(shared, peer, transport).await {
        Ok(()) => Some(Instant::now() + jittered(every, rng)),
        Err(Error::Transport(TransportError::Unsupported { .. })) => {
            tracing::debug!(peer = %peer.name, "the peer's transport cannot audit; no scheduled audits");
            None
        }
        Err(_) => Some(Instant::now() + every.min(shared.config.backoff.delay(1, rng))),
    }
}

/// Runs one audit with the peer, records it in the peer's status and publishes it.
async fn run_audit<T: Transport>(shared: &Shared, peer: &Peer, transport: &T) -> Result<(), Error> {
    let result = shared.engine.audit(transport).await;
    let notifier = shared.engine.notifier();
    let event = match &result {
        Ok(out) => SyncEvent::AuditCompleted {
            peer: peer.name.clone(),
            received: out.received,
            repaired: out.repaired.len(),
            shipped: out.shipped,
            files_repaired: out.files_repaired,
        },
        Err(e) => {
            tracing::warn!(peer = %peer.name, error = %error_chain(e), "audit failed");
            SyncEvent::AuditFailed {
                peer: peer.name.clone(),
                error: error_chain(e),
            }
        }
    };
    notifier.publish(Event::Sync(event));
    let (recorded, result) = match result {
        Ok(out) => (Ok(out), Ok(())),
        Err(e) => (Err(error_chain(&e)), Err(e)),
    };
    peer.status().last_audit = Some((SystemTime::now(), recorded));
    result
}

/// Why a round failed: the error with its causes, and what the operator might do about it.
pub(super) struct Failure {
    pub(super) text: String,
    pub(super) hint: Option<String>,
}

/// What an operator can do about a failed round, for the errors that have a usual cause.
fn hint(error: &Error, peer: &str) -> Option<String> {
    use crate::error::RefusalCode;
    Some(match error {
        Error::Transport(TransportError::Refused {
            code: RefusalCode::Unauthorized,
            ..
        }) => "the peer does not accept this node's token: give the token from the peer's token \
             file with `serve --peer-token` or HIGHWATER_PEER_TOKEN (ClientConfig::token in \
             the library)"
            .to_owned(),
        Error::Transport(TransportError::Refused {
            code: RefusalCode::Forbidden,
            ..
        }) => "the peer's token file does not grant this node's token what the round asks \
             (`sync: true`, and read or write on the scopes in play)"
            .to_owned(),
        Error::Transport(TransportError::Unreachable { .. }) => {
            format!("is a node running at {peer}? check the peer's URL (`serve --peer`) and that it listens there")
        }
        Error::Transport(TransportError::Certificate { .. }) => {
            "trust the peer's CA with `--ca-file` or HIGHWATER_CA_FILE".to_owned()
        }
        _ => return None,
    })
}

/// Logs and publishes the streams the peer halted because our versions' clock is ahead of
/// its own: the other side of its `clock_skew`.
fn report_peer_halts(shared: &Shared, peer: &Peer, halts: &[Halt]) {
    for halt in halts {
        if let HaltReason::ClockSkew { ahead_by_ms } = halt.reason {
            if warn_now(peer, &format!("skew {} {}", halt.scope, halt.origin)) {
                tracing::warn!(peer = %peer.name, scope = %halt.scope, origin = %halt.origin,
                    ahead_by_ms,
                    "the peer refuses versions of this origin: their clock is ahead of the \
                     peer's by more than its max drift; the stream halts until the clocks agree \
                     (fix the clock of the node that wrote them)");
            }
            shared
                .engine
                .notifier()
                .publish(Event::Sync(SyncEvent::SkewAtPeer {
                    peer: peer.name.clone(),
                    scope: halt.scope.clone(),
                    origin: halt.origin,
                    ahead_by_ms,
                }));
        }
    }
}

/// How long a peer failing the same way stays quiet in the log.
const WARN_QUIET: Duration = Duration::from_secs(60);

/// Whether to log `what` at WARN now: it differs from the last warning for this peer, or
/// that one is older than [`WARN_QUIET`].
fn warn_now(peer: &Peer, what: &str) -> bool {
    let mut warned = lock(&peer.warned);
    let now = std::time::Instant::now();
    match &*warned {
        Some((at, last)) if last == what && now.duration_since(*at) < WARN_QUIET => false,
        _ => {
            *warned = Some((now, what.to_owned()));
            true
        }
    }
}

/// Runs one round with its hooks, and records and publishes its success; `first`: the
/// round starts a burst (a new pull).
pub(super) async fn run_round<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    first: bool,
) -> Result<ExchangeOutcome, Failure> {
    let config = &shared.config;
    if let Some(hook) = &config.before_round {
        hook(&peer.name).map_err(|e| Failure {
            text: format!("before-round hook refused the round: {e}"),
            hint: None,
        })?;
    }
    // The round works on a copy of the session, written back whether it succeeds or not
    // (a failed round leaves the session without held marks: its next request is in full).
    let (mut session, pull) = {
        let status = peer.status();
        (status.session.clone(), status.pull.unwrap_or_default())
    };
    let options = shared.round_options(peer);
    // The pull's progress moves with each page of a streamed transfer, not only per round.
    let mut pages = shared.engine.notifier().follow();
    let round = shared.engine.exchange_in(&mut session, transport, &options);
    let mut in_round = 0u64;
    let result = follow_pages(
        &mut pages,
        round,
        |p| p == peer.name,
        |page| {
            in_round += page.received as u64;
            peer.status().pull = Some(pull.after_round(first, in_round, page.remaining));
        },
    )
    .await;
    match &result {
        Err(Error::Protocol(ProtocolError::PeerRestored { old, new })) => {
            session = changed_peer(
                shared,
                peer,
                transport,
                *old,
                *new,
                "it was restored from a backup and vouches for its old id",
            )
            .await;
        }
        Err(Error::Protocol(ProtocolError::UnexpectedPeer { expected, found })) => {
            if peer.accept_new.swap(false, Ordering::SeqCst) {
                session = changed_peer(
                    shared,
                    peer,
                    transport,
                    *expected,
                    *found,
                    "the operator accepted a new identity",
                )
                .await;
            } else {
                refused_peer(shared, peer, transport, *expected, *found);
            }
        }
        _ => {}
    }
    peer.status().session = session;
    if let Some(hook) = &config.after_round {
        if let Err(e) = hook(&peer.name, &result) {
            tracing::warn!(peer = %peer.name, error = %e, "after-round hook failed");
        }
    }
    let outcome = result.map_err(|e| Failure {
        text: error_chain(&e),
        hint: hint(&e, &peer.name),
    })?;
    // Compared with the note, not the status: a transport may know its peer's id before
    // any round (in process), and the note must still be written once.
    let learnt = *lock(&peer.noted) != Some(outcome.peer);
    let reconnected = {
        let mut status = peer.status();
        status.peer = Some(outcome.peer);
        status.last_success = Some(SystemTime::now());
        status.consecutive_failures = 0;
        status.rounds += 1;
        status.pull = Some(pull.after_round(first, outcome.received as u64, outcome.remaining));
        !std::mem::replace(&mut status.connected, true)
    };
    if learnt {
        note_peer(shared, peer, outcome.peer).await;
    }
    let notifier = shared.engine.notifier();
    if reconnected {
        *lock(&peer.warned) = None;
        notifier.publish(Event::Sync(SyncEvent::ConnectivityChanged {
            peer: peer.name.clone(),
            connected: true,
        }));
    }
    report_peer_halts(shared, peer, &outcome.peer_halts);
    // IMPORTANT: read before `sync_applied` is published: a listener that writes to a new
    // scope when it hears of the round must not find that scope counted as pulled by it.
    let in_play = scopes_in_play(shared, &options).await;
    notifier.publish(Event::Sync(SyncEvent::Applied {
        peer: peer.name.clone(),
        shipped: outcome.shipped,
        received: outcome.received,
        applied: outcome.applied,
        has_more: outcome.has_more,
        remaining: outcome.remaining,
    }));
    if let Some(in_play) = in_play {
        hydrate(shared, in_play, &outcome).await;
    }
    Ok(outcome)
}

/// The scopes a round had in play: those its options name, or with
/// [`ScopeFilter::All`] the scopes the node holds after it (`None`, logged, if they cannot
/// be read: the hydration is then left as it was).
async fn scopes_in_play(shared: &Shared, options: &ExchangeOptions) -> Option<Vec<Scope>> {
    let (engine, scopes) = (shared.engine.handle(), options.scopes.clone());
    let read = run_blocking(move || -> Result<Vec<Scope>, Error> {
        Ok(match scopes {
            ScopeFilter::Only(set) => set.into_iter().collect(),
            ScopeFilter::All => engine.scopes()?,
        })
    })
    .await;
    match read {
        Ok(Ok(scopes)) => Some(scopes),
        Ok(Err(e)) => {
            tracing::warn!(error = %error_chain(&e), "cannot record the scopes' hydration");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the scopes' hydration");
            None
        }
    }
}

/// Moves the hydration of the scopes a round had in play: ready when it pulled them
/// completely (nothing more to come, no stream halted either way), else hydrating; publishes
/// each change, and opens [`super::Scheduler::ready`] once every boot scope is ready.
async fn hydrate(shared: &Shared, in_play: Vec<Scope>, outcome: &ExchangeOutcome) {
    // Refusals below a purge floor hold nothing: a pull that met them is complete.
    let complete = !outcome.has_more
        && !outcome
            .halts
            .iter()
            .chain(&outcome.peer_halts)
            .any(Halt::holds_stream);
    let state = if complete {
        Hydration::Ready
    } else {
        Hydration::Hydrating
    };
    let engine = shared.engine.handle();
    let changed = run_blocking(move || -> Result<Vec<Scope>, Error> {
        let mut changed = Vec::new();
        for scope in in_play {
            if engine.set_hydration(&scope, state)? {
                changed.push(scope);
            }
        }
        Ok(changed)
    })
    .await;
    let changed = match changed {
        Ok(Ok(changed)) => changed,
        Ok(Err(e)) => {
            tracing::warn!(error = %error_chain(&e), "cannot record the scopes' hydration");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the scopes' hydration");
            return;
        }
    };
    let notifier = shared.engine.notifier();
    for scope in changed {
        notifier.publish(Event::Sync(SyncEvent::HydrationChanged { scope, state }));
    }
    if state == Hydration::Ready && !*shared.boot_ready.borrow() {
        let boot = shared.config.boot_scopes.clone();
        let engine = shared.engine.handle();
        let all = run_blocking(move || {
            boot.iter()
                .all(|s| matches!(engine.hydration(s), Ok(Hydration::Ready)))
        })
        .await
        .unwrap_or(false);
        if all {
            shared.boot_ready.send_replace(true);
        }
    }
}

/// Notes, durably, that the peer is node `id`, so rounds after a restart are addressed to
/// it (a failure is logged: the note is then only as old as the last one written).
async fn note_peer(shared: &Shared, peer: &Peer, id: NodeId) {
    let (engine, name) = (shared.engine.handle(), peer.name.clone());
    match run_blocking(move || engine.expect_peer(&name, Some(id))).await {
        Ok(Ok(())) => *lock(&peer.noted) = Some(id),
        Ok(Err(e)) => {
            tracing::warn!(peer = %peer.name, error = %error_chain(&e), "cannot note the peer's id")
        }
        Err(e) => tracing::warn!(peer = %peer.name, error = %e, "cannot note the peer's id"),
    }
}

/// The peer's address answers as node `found`, not the `expected` one, and nothing vouches
/// for the change: the round is refused (nothing was pushed: the request was addressed to
/// `expected`, and the node that answered applied none of it). The session keeps expecting
/// `expected`; the transport forgets the id it learnt, so that the node expected is still
/// accepted if it comes back.
fn refused_peer<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    expected: NodeId,
    found: NodeId,
) {
    transport.forget_peer();
    if warn_now(peer, &format!("refused {found}")) {
        tracing::warn!(peer = %peer.name, %expected, %found,
            "the peer answers as another node than the one this node syncs with, and nothing \
             vouches for the change: refused, nothing is sent to it. If the node there was \
             replaced on purpose, accept its new id: `serve --accept-new-peer-id {}` \
             (Scheduler::accept_new_identity in the library)", peer.name);
    }
    shared
        .engine
        .notifier()
        .publish(Event::Sync(SyncEvent::PeerRefused {
            peer: peer.name.clone(),
            expected,
            found,
        }));
}

/// The peer's address answers as node `new`, not `old`, and the change is accepted (`why`:
/// `new` vouches that it was `old`, or the operator said so). What this node knew of `old`
/// (the session's held marks and halts, the id the transport learnt) says nothing of `new`,
/// so both start afresh: the next round sends our marks in full, learns and notes the new
/// id, and an audit (a full comparison of contents) follows it. Returns the fresh session.
async fn changed_peer<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    old: NodeId,
    new: NodeId,
    why: &str,
) -> Session {
    tracing::warn!(peer = %peer.name, %old, %new, %why,
        "the peer answers as another node now; starting afresh with it");
    transport.forget_peer();
    peer.status().peer = None;
    peer.audit_wanted.store(true, Ordering::SeqCst);
    shared
        .engine
        .notifier()
        .publish(Event::Sync(SyncEvent::PeerChanged {
            peer: peer.name.clone(),
            old,
            new,
        }));
    Session::named_expecting(peer.name.clone(), Some(new))
}

/// Records, logs and publishes a failed round; returns the delay before the retry.
///
/// The log line is a WARN with the error and a hint the first time, when the error
/// changes, and once a minute while it does not; DEBUG otherwise.
pub(super) fn failed(shared: &Shared, peer: &Peer, failure: Failure, rng: &mut StdRng) -> Duration {
    let Failure { text: error, hint } = failure;
    let (attempt, disconnected) = {
        let mut status = peer.status();
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
        status.last_error = Some(error.clone());
        (
            status.consecutive_failures,
            std::mem::replace(&mut status.connected, false),
        )
    };
    let delay = shared.config.backoff.delay(attempt, rng);
    let hint = hint.unwrap_or_default();
    if warn_now(peer, &error) {
        tracing::warn!(peer = %peer.name, %error, attempt, retry_in = ?delay, %hint, "round failed");
    } else {
        tracing::debug!(peer = %peer.name, %error, attempt, ?delay, "round failed");
    }
    let notifier = shared.engine.notifier();
    if disconnected {
        notifier.publish(Event::Sync(SyncEvent::ConnectivityChanged {
            peer: peer.name.clone(),
            connected: false,
        }));
    }
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
    // now rather than leave them to the next round (docs/protocol.md, durability). On a
    // multi-threaded runtime the worker steps out of it first (a PostgreSQL store's client
    // cannot run on a runtime thread; the node's runtime is multi-threaded).
    let flush = || {
        if let Err(e) = shared.engine.flush() {
            tracing::warn!(error = %error_chain(&e), "flush after a failed round failed");
        }
    };
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(flush),
        _ => flush(),
    }
    delay
}
