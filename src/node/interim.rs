//! TEMPORARY: a minimal stand-in for `crate::scheduler` until it lands on main. It runs
//! rounds with each peer every `interval` and again at once while `has_more`; no backoff,
//! no watch, no change triggers. Replaced by the real scheduler; do not build on it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::engine::{ExchangeOptions, SyncEngine};
use crate::error::Error;
use crate::transport::Transport;

/// Stand-in settings.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Time between rounds.
    pub interval: Duration,
    /// Options of every round.
    pub options: ExchangeOptions,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            interval: Duration::from_secs(30),
            options: ExchangeOptions::default(),
        }
    }
}

/// Stand-in scheduler.
pub struct Scheduler {
    engine: Arc<SyncEngine>,
    config: SchedulerConfig,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Scheduler {
    /// Starts with no peers.
    pub fn start(engine: Arc<SyncEngine>, config: SchedulerConfig) -> Scheduler {
        Scheduler {
            engine,
            config,
            stop: watch::channel(false).0,
            tasks: JoinSet::new(),
        }
    }

    /// Runs rounds with `transport`.
    pub fn add_peer<T: Transport + 'static>(
        &mut self,
        name: String,
        transport: Arc<T>,
    ) -> Result<(), std::convert::Infallible> {
        let (engine, config) = (self.engine.clone(), self.config.clone());
        let mut stop = self.stop.subscribe();
        self.tasks.spawn(async move {
            loop {
                let more = tokio::select! {
                    r = engine.exchange_with(&*transport, &config.options) => match r {
                        Ok(o) => o.has_more,
                        Err(e) => {
                            tracing::warn!(peer = %name, error = %e, "round failed");
                            false
                        }
                    },
                    _ = stop.wait_for(|s| *s) => return,
                };
                if !more {
                    tokio::select! {
                        () = tokio::time::sleep(config.interval) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        });
        Ok(())
    }

    /// Stops every task and flushes the engine.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        self.engine.flush()
    }
}
