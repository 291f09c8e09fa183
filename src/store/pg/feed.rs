//! The change feed: how processes sharing one PostgreSQL store hear of each other's commits
//! (docs/scale.md, "News across processes").
//!
//! Every commit that changes a scope's versions or marks takes the next number of the
//! `changes` counter (under the commit lock, so numbers follow commit order) and upserts a
//! row `(scope, writer, cause) -> seq` in `highwater_changes`, then `NOTIFY`s the channel
//! `highwater_changes` (delivered at commit, never for a rollback). A [`ChangeFeed`] holds
//! one connection of its own: it `LISTEN`s, and on each notification, or every
//! [`FeedOptions::poll`] when none comes (the fallback for databases without
//! `LISTEN`/`NOTIFY`, and a safety net for a lost one), reads the rows numbered above the last
//! it saw and hands the scopes other writers changed, with their causes, to its callback.
//!
//! One row per scope, writer and cause keeps a change by one peer from hiding a change by
//! another (a watcher is not told of its own pages, see docs/http.md, `GET
//! /v1/sync/watch`); rows not renewed within [`FeedOptions::retain`] are pruned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use super::{quote_ident, PgStore, PgTls};
use crate::error::StoreError;
use crate::hlc::NodeId;
use crate::record::Scope;

/// A scope another process changed, and the peer whose page changed it (`None`: a local
/// write, or a change whose cause is unknown).
pub type Change = (Scope, Option<NodeId>);

/// How a [`ChangeFeed`] listens.
#[derive(Clone, Debug)]
pub struct FeedOptions {
    /// `LISTEN` for notifications (default true). Without them (or when the database
    /// refuses `LISTEN`, as CockroachDB does) the feed polls every [`FeedOptions::poll`].
    pub listen: bool,
    /// The longest wait between two reads of the feed (default 1 s with notifications,
    /// which wake it at once; set it lower when polling).
    pub poll: Duration,
    /// How long a row of the feed is kept after its last change (default 1 h): a feed
    /// reconnecting after a longer gap counts every scope as changed.
    pub retain: Duration,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions {
            listen: true,
            poll: Duration::from_secs(1),
            retain: Duration::from_secs(3600),
        }
    }
}

/// A thread that hears of other processes' commits to a store (see the module docs); it
/// stops when dropped (within one [`FeedOptions::poll`]).
pub struct ChangeFeed {
    stop: Arc<AtomicBool>,
    listening: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("listening", &self.listening())
            .finish_non_exhaustive()
    }
}

impl ChangeFeed {
    /// Whether the feed is connected and listening for notifications (false while it
    /// polls, or reconnects).
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Not joined: the thread may be waiting for the database (a connect timeout); it
        // ends by itself after its current wait.
        drop(self.thread.take());
    }
}

impl PgStore {
    /// Starts a [`ChangeFeed`] on this store: `news` is called, on the feed's thread, with
    /// the scopes other handles of the store (other processes) changed since the last call.
    /// Changes committed before the feed started are not news.
    ///
    /// # Errors
    /// The thread cannot be spawned. Connection failures are retried on the thread (and
    /// logged); the first connection is not waited for.
    pub fn watch_changes(
        &self,
        options: FeedOptions,
        news: impl Fn(Vec<Change>) + Send + 'static,
    ) -> Result<ChangeFeed, StoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let listening = Arc::new(AtomicBool::new(false));
        let feed = Feed {
            config: self.config.clone(),
            tls: self.tls.clone(),
            schema: self.schema.clone(),
            writer: self.writer,
            options,
            stop: stop.clone(),
            listening: listening.clone(),
            last: None,
            heard: None,
            pruned: None,
        };
        let thread = std::thread::Builder::new()
            .name("highwater-pg-feed".into())
            .spawn(move || feed.run(&news))
            .map_err(|source| StoreError::Io {
                path: "highwater-pg-feed thread".into(),
                source,
            })?;
        Ok(ChangeFeed {
            stop,
            listening,
            thread: Some(thread),
        })
    }
}

/// The feed thread's state.
struct Feed {
    config: postgres::Config,
    tls: PgTls,
    schema: Option<String>,
    writer: i64,
    options: FeedOptions,
    stop: Arc<AtomicBool>,
    listening: Arc<AtomicBool>,
    /// The last change number read (`None`: not connected yet).
    last: Option<i64>,
    /// When the feed last read the changes.
    heard: Option<Instant>,
    /// When the feed last pruned old rows.
    pruned: Option<Instant>,
}

impl Feed {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn run(mut self, news: &dyn Fn(Vec<Change>)) {
        let mut backoff = Duration::from_millis(100);
        while !self.stopped() {
            match self.session(news) {
                Ok(()) => return,
                Err(e) => {
                    self.listening.store(false, Ordering::Release);
                    tracing::warn!(
                        error = %crate::error::error_chain(&e),
                        retry_in = ?backoff,
                        "the PostgreSQL change feed lost its connection: other processes' \
                         writes are not news here until it is back"
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One connection's life: until stopped (`Ok`) or a database failure (`Err`).
    fn session(&mut self, news: &dyn Fn(Vec<Change>)) -> Result<(), postgres::Error> {
        let mut client = self.config.connect(self.tls.clone())?;
        if let Some(schema) = &self.schema {
            client.batch_execute(&format!("SET search_path TO {}", quote_ident(schema)))?;
        }
        let listening = self.options.listen
            && match client.batch_execute("LISTEN highwater_changes") {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        error = %e, poll = ?self.options.poll,
                        "the database refused LISTEN: the change feed polls instead"
                    );
                    false
                }
            };
        self.listening.store(listening, Ordering::Release);
        let counter: i64 = client
            .query_one("SELECT num FROM highwater_meta WHERE name = 'changes'", &[])?
            .try_get(0)?;
        match self.last {
            None => self.last = Some(counter),
            // Back after a gap longer than rows are kept: changes may be gone unread.
            Some(_)
                if self
                    .heard
                    .is_some_and(|t| t.elapsed() >= self.options.retain / 2) =>
            {
                let rows = client.query("SELECT DISTINCT scope FROM highwater_marks", &[])?;
                let all = rows
                    .iter()
                    .filter_map(|r| r.try_get::<_, &str>(0).ok()?.parse().ok())
                    .map(|s| (s, None))
                    .collect();
                news(all);
            }
            Some(_) => {}
        }
        loop {
            if self.stopped() {
                return Ok(());
            }
            self.read(&mut client, news)?;
            self.prune(&mut client)?;
            if listening {
                let mut notifications = client.notifications();
                // One notification, or the poll's timeout; then whatever else came.
                notifications.timeout_iter(self.options.poll).next()?;
                while notifications.iter().next()?.is_some() {}
            } else {
                std::thread::sleep(self.options.poll);
            }
        }
    }

    /// Reads the changes numbered above the last read and hands other writers' to `news`.
    fn read(
        &mut self,
        client: &mut Client,
        news: &dyn Fn(Vec<Change>),
    ) -> Result<(), postgres::Error> {
        let last = self.last.unwrap_or(i64::MIN);
        let rows = client.query(
            "SELECT scope, cause, seq FROM highwater_changes
             WHERE seq > $1 AND writer <> $2 ORDER BY seq",
            &[&last, &self.writer],
        )?;
        self.heard = Some(Instant::now());
        let mut changes = Vec::with_capacity(rows.len());
        let mut newest = last;
        for row in &rows {
            let seq: i64 = row.try_get(2)?;
            newest = newest.max(seq);
            let Ok(scope) = row.try_get::<_, &str>(0)?.parse::<Scope>() else {
                continue;
            };
            let cause: &[u8] = row.try_get(1)?;
            let cause = <[u8; 16]>::try_from(cause)
                .ok()
                .and_then(NodeId::from_bytes);
            changes.push((scope, cause));
        }
        // Commits take their numbers under the commit lock and hold it until they are
        // visible, so the rows read are every change numbered up to `newest`.
        self.last = Some(newest);
        if !changes.is_empty() {
            news(changes);
        }
        Ok(())
    }

    /// Drops the rows not renewed within the retention, at most once per tenth of it.
    fn prune(&mut self, client: &mut Client) -> Result<(), postgres::Error> {
        let every = self.options.retain / 10;
        if self.pruned.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        self.pruned = Some(Instant::now());
        client.execute(
            "DELETE FROM highwater_changes WHERE at < now() - make_interval(secs => $1)",
            &[&self.options.retain.as_secs_f64()],
        )?;
        Ok(())
    }
}
