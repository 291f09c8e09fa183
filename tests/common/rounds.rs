//! Engines in one process and the rounds between them.

use std::sync::Arc;

use futures_executor::block_on;
use highwater::{EngineConfig, ExchangeOptions, InProcess, ManualTime, SyncEngine};

/// An engine shared between a test and the transports that reach it.
pub type Node = Arc<SyncEngine>;
/// The in-process transport to a [`Node`].
pub type Link = InProcess<Node>;
/// What a test returns.
pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Rounds a sync may take before the test calls it a livelock (`has_more` never clears).
pub const MAX_ROUNDS: usize = 1000;

/// Default settings on the manual clock `time`.
pub fn config(time: &Arc<ManualTime>) -> EngineConfig {
    EngineConfig {
        time: time.clone(),
        ..EngineConfig::default()
    }
}

/// An in-memory engine on the manual clock `time`.
pub fn mem_node(time: &Arc<ManualTime>) -> highwater::Result<Node> {
    Ok(Arc::new(SyncEngine::in_memory_with(config(time))?))
}

/// A transport to `peer`.
pub fn link(peer: &Node) -> Link {
    InProcess::new(peer.clone())
}

/// What a sequence of rounds moved, summed over its rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Rounds run.
    pub rounds: usize,
    /// Versions the initiator sent.
    pub shipped: usize,
    /// Versions the responder sent.
    pub received: usize,
    /// Received versions that changed the initiator's state.
    pub applied: usize,
}

/// Runs rounds from `from` over `to` while `has_more`, with `options`.
///
/// # Errors
/// A round failed, or `has_more` was still set after [`MAX_ROUNDS`] rounds.
pub fn sync_with(from: &SyncEngine, to: &Link, options: &ExchangeOptions) -> TestResult<Totals> {
    let mut totals = Totals::default();
    loop {
        let out = block_on(from.exchange_with(to, options))?;
        totals.rounds += 1;
        totals.shipped += out.shipped;
        totals.received += out.received;
        totals.applied += out.applied;
        if !out.has_more {
            return Ok(totals);
        }
        if totals.rounds >= MAX_ROUNDS {
            return Err(format!("has_more still set after {MAX_ROUNDS} rounds: {out:?}").into());
        }
    }
}

/// Runs rounds from `from` over `to` while `has_more`, with default options.
///
/// # Errors
/// As for [`sync_with`].
pub fn sync(from: &SyncEngine, to: &Link) -> TestResult<Totals> {
    sync_with(from, to, &ExchangeOptions::default())
}
