//! One peer's task: the round loop, one round with its hooks and events, a failure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::engine::ExchangeOutcome;
use crate::error::error_chain;
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
