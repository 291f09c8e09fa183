//! What triggers rounds besides the interval: the peer's watch, and changes applied here.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::error::{error_chain, TransportError};
use crate::hlc::NodeId;
use crate::notify::{ChangeKind, Event, Notice, Subscription, SyncEvent};
use crate::transport::Transport;

use super::{lock, peer_rng, stopped, unpaused, Peer, Shared};

/// Waits on the peer's watch and triggers a round when it reports news.
pub(super) async fn watch_loop<T: Transport>(
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
        if !unpaused(shared, &mut stop).await {
            return;
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
pub(super) async fn listen(
    shared: Arc<Shared>,
    mut changes: Subscription,
    mut stop: watch::Receiver<bool>,
) {
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
                if let Notice::Event(Event::Sync(SyncEvent::RestoreDetected { .. })) = notice {
                    // The node lost writes: audit every peer at its next idle moment, so
                    // that what the restore left short anywhere is found and repaired.
                    for peer in lock(&shared.peers).iter() {
                        peer.audit_wanted.store(true, Ordering::SeqCst);
                        peer.trigger.notify_one();
                    }
                }
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
pub(super) fn change_source(notice: &Notice) -> Option<Option<NodeId>> {
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
