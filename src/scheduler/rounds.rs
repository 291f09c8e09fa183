//! One peer's task: the round loop, one round with its hooks and events, a failure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::engine::ExchangeOutcome;
use crate::error::{error_chain, Error, ProtocolError, TransportError};
use crate::exchange::Session;
use crate::hlc::NodeId;
use crate::notify::{Event, SyncEvent};
use crate::transport::Transport;

use super::triggers::watch_loop;
use super::{peer_rng, stopped, Peer, Shared};

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
    let mut burst = 0usize;
    // A round of this burst heard the peer's purge floor rise.
    let mut recloning = false;
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
            result = run_round(shared, peer, transport) => result,
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

/// Runs one round with its hooks, and records and publishes its success.
pub(super) async fn run_round<T: Transport>(
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
    if let Err(Error::Protocol(ProtocolError::UnexpectedPeer { expected, found })) = &result {
        session = changed_peer(shared, peer, transport, *expected, *found);
    }
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

/// The peer's address answers as node `new`, not `old`: it was restored with a fresh id or
/// replaced. What this node knew of `old` (the session's held marks and halts, the id the
/// transport learnt) says nothing of `new`, so both start afresh; the next round sends our
/// marks in full and learns the new id. Returns the fresh session.
fn changed_peer<T: Transport>(
    shared: &Shared,
    peer: &Peer,
    transport: &T,
    old: NodeId,
    new: NodeId,
) -> Session {
    tracing::warn!(peer = %peer.name, %old, %new,
        "the peer answers as another node now (restored from a backup, or replaced); starting afresh with it");
    transport.forget_peer();
    shared
        .engine
        .notifier()
        .publish(Event::Sync(SyncEvent::PeerChanged {
            peer: peer.name.clone(),
            old,
            new,
        }));
    Session::named(peer.name.clone())
}

/// Records and publishes a failed round; returns the delay before the retry.
pub(super) fn failed(shared: &Shared, peer: &Peer, error: String, rng: &mut StdRng) -> Duration {
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
