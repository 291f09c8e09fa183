//! A node: one data directory served over HTTP and kept in sync with its peers, plus what
//! the `highwater` command line needs around it (record commands over a running node or a
//! data directory, see [`records`]; one-shot sync; status).
//!
//! [`Node::start`] opens the data directory, reads the token file and binds the listener;
//! [`Node::run`] serves the directory and runs the scheduler with every peer until its
//! shutdown future completes, then stops the scheduler, lets requests in progress finish
//! and makes everything durable.
//!
//! A data directory is held by one process at a time: redb locks its file. Opening a
//! directory a running node holds fails with [`NodeError::DataDirInUse`], naming the node's
//! URL, which a running node writes to [`URL_FILE`] in its directory.
//!
//! ```no_run
//! use highwater::node::{Node, NodeOptions};
//!
//! # async fn run() -> Result<(), highwater::node::NodeError> {
//! let mut options = NodeOptions::new("/var/lib/highwater", "127.0.0.1:0".parse().unwrap());
//! options.peers.push("http://hub.example:7447".into());
//! let node = Node::start(options).await?;
//! println!("listening on {}", node.url());
//! node.run(highwater::node::termination()).await
//! # }
//! ```
//!
//! Over 600 lines with its tests: a node's lifecycle (open, bind, serve, schedule, stop) is one
//! sequence; record commands, one-shot sync and terminal output are modules of their own.

pub mod records;
mod status;
mod store;
mod sync;
pub mod terminal;

pub use self::records::{open_api, open_api_reading, open_api_with, CommandError};
pub use self::status::render_status;
pub use self::sync::{halt_line, render_audit, sync_until_done, SyncTotals};
/// The records API's types, where they were before [`crate::api`] held them.
pub use crate::api::{Listed, RecordRead as RemoteRecord, Written};
pub use crate::http::NodeClient;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::engine::{EngineConfig, ExchangeOptions, PurgeReport, SyncEngine};
use crate::error::{Error, StoreError, TransportError};
use crate::http::server::check_exposure;
use crate::http::{
    serve, Access, AccessError, ClientConfig, HttpTransport, Metrics, ServeError, ServerConfig,
    ServerTls, TlsError, DEFAULT_MAX_CONNECTIONS,
};
use crate::scheduler::{AfterRound, BeforeRound};
use crate::scheduler::{PeerOptions, Scheduler, SchedulerConfig};

/// The address a node listens on, and client commands reach, by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7447";

/// A node's store page cache by default (see [`NodeOptions::cache_bytes`]): a node is a
/// server or a desktop daemon, where the library's default (64 MiB) suits devices.
pub const NODE_CACHE_BYTES: usize = 192 << 20;

/// The node URL client commands use by default.
pub const DEFAULT_NODE_URL: &str = "http://127.0.0.1:7447";

/// The file in a data directory that holds the running node's URL (written once the node
/// listens, removed when it stops; left behind by a crash, and then only read while the
/// directory is locked, that is while a node runs).
pub const URL_FILE: &str = "node.url";

/// What a node runs with.
#[derive(Clone)]
pub struct NodeOptions {
    /// The data directory (created if missing).
    pub data: PathBuf,
    /// Where to listen (port 0: one the OS picks; see [`Node::local_addr`]).
    pub listen: SocketAddr,
    /// The peers' root URLs (`http://host:port` or `https://host:port`); the node syncs with
    /// each.
    pub peers: Vec<String>,
    /// The bearer token this node presents to its peers.
    pub peer_token: Option<String>,
    /// The token file (see [`crate::http::access`]); without one the node is open and may
    /// only listen on loopback.
    pub token_file: Option<PathBuf>,
    /// Time between rounds with a peer when nothing triggers one sooner (default 30 s).
    pub interval: Duration,
    /// Versions per page this node asks for and ships (default: the engine's, 1000).
    pub page_limit: Option<usize>,
    /// The PEM certificate chain the node presents over TLS; with [`NodeOptions::tls_key`],
    /// the node serves HTTPS only (default none: plain HTTP).
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of [`NodeOptions::tls_cert`].
    pub tls_key: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for `https://` peers, besides the system's
    /// trusted roots (default none).
    pub ca_file: Option<PathBuf>,
    /// Listen beyond loopback with tokens but without TLS (default false: refused, since the
    /// tokens would cross the network in clear text; see [`ServerConfig::insecure_http`]).
    pub insecure_http: bool,
    /// Connections the node keeps open at once (default [`DEFAULT_MAX_CONNECTIONS`]; see
    /// [`ServerConfig::max_connections`]).
    pub max_connections: usize,
    /// Time between audits with each peer (`None`: no scheduled audits; a detected restore
    /// still audits every peer at once). Default: [`SchedulerConfig`]'s, about an hour.
    pub audit_interval: Option<Duration>,
    /// Open the data directory as restored from a backup: the node takes a fresh id before
    /// it issues any timestamp (see [`SyncEngine::open_restored`]). For an operator who
    /// knows the directory came back from a backup; a restore is otherwise detected in the
    /// first round with a peer that holds later writes.
    pub restored: bool,
    /// Time between background purges (`None`: none). Default one hour.
    pub purge_interval: Option<Duration>,
    /// See [`EngineConfig::tombstone_retention`] (default 30 days).
    pub tombstone_retention: Option<Duration>,
    /// See [`EngineConfig::peer_retirement`] (default 90 days).
    pub peer_retirement: Option<Duration>,
    /// Peers (URLs among [`NodeOptions::peers`]) whose node this node accepts as another
    /// one than before, once: the node at that address was replaced on purpose (see
    /// [`Scheduler::accept_new_identity`]). Without it a node that answers with another id
    /// than the one noted for its address is refused.
    pub accept_new_peer_ids: Vec<String>,
    /// Per-peer scopes and intervals, by URL (one of [`NodeOptions::peers`]); peers not
    /// named use the node's.
    pub peer_options: BTreeMap<String, PeerOptions>,
    /// Start with syncing paused (offline on purpose, [`Scheduler::pause`]): the node serves
    /// and takes writes, and starts no round until resumed. On Unix, SIGUSR1 pauses a
    /// running node and SIGUSR2 resumes it.
    pub paused: bool,
    /// Where the node keeps its records: `None` (default), the redb file in
    /// [`NodeOptions::data`]; a `postgres://` URL, a PostgreSQL database that any number of
    /// node processes share as one hub (see docs/scale.md). The data directory then holds
    /// the process's URL file and, unless [`NodeOptions::blobs`] names another, the blobs.
    pub store: Option<String>,
    /// The PostgreSQL schema of [`NodeOptions::store`] (created if missing; default: the
    /// connection's search path).
    pub store_schema: Option<String>,
    /// Connections to the database at most (default `PgStore::POOL_SIZE`, 16); a request
    /// that finds none free within 10 s is answered 503.
    pub store_pool: Option<u32>,
    /// A PEM file of CA certificates to trust, besides the system's, for a
    /// [`NodeOptions::store`] URL with `sslmode=require` (TLS to the database, its
    /// certificate and name verified). Without `sslmode=require` the database connection is
    /// in clear text.
    pub store_ca_file: Option<PathBuf>,
    /// With [`NodeOptions::store`]: the blob directory (default `<data>/blobs`), which every
    /// process of the hub must share.
    pub blobs: Option<PathBuf>,
    /// The redb page cache (default [`NODE_CACHE_BYTES`], 192 MiB, where the library's
    /// default is 64 MiB). A bulk sync into a store larger than the cache rewrites the index
    /// pages the cache could not hold: on a 1M-record pull, 192 MiB writes 0.41 of the bytes
    /// per record of 64 MiB, for about 140 MiB more memory once the store is that large
    /// (the cache fills only as the store is read and written; docs/performance.md).
    pub cache_bytes: Option<usize>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the peer token itself.
        f.debug_struct("NodeOptions")
            .field("data", &self.data)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("peer_token", &self.peer_token.as_ref().map(|_| "…"))
            .field("token_file", &self.token_file)
            .field("interval", &self.interval)
            .field("page_limit", &self.page_limit)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("ca_file", &self.ca_file)
            .field("insecure_http", &self.insecure_http)
            .field("max_connections", &self.max_connections)
            .field("audit_interval", &self.audit_interval)
            .field("restored", &self.restored)
            .field("purge_interval", &self.purge_interval)
            .field("tombstone_retention", &self.tombstone_retention)
            .field("peer_retirement", &self.peer_retirement)
            .field("accept_new_peer_ids", &self.accept_new_peer_ids)
            .field("peer_options", &self.peer_options)
            .field("paused", &self.paused)
            .field("store", &self.store.as_deref().map(store::redacted))
            .field("store_schema", &self.store_schema)
            .field("store_pool", &self.store_pool)
            .field("store_ca_file", &self.store_ca_file)
            .field("blobs", &self.blobs)
            .field("cache_bytes", &self.cache_bytes)
            .finish()
    }
}

impl NodeOptions {
    /// Options for a node on `data` listening on `listen`, with no peers, no tokens, and
    /// default timings.
    pub fn new(data: impl Into<PathBuf>, listen: SocketAddr) -> NodeOptions {
        NodeOptions {
            data: data.into(),
            listen,
            peers: Vec::new(),
            peer_token: None,
            token_file: None,
            interval: SchedulerConfig::default().interval,
            page_limit: None,
            tls_cert: None,
            tls_key: None,
            ca_file: None,
            insecure_http: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            audit_interval: SchedulerConfig::default().audit_interval,
            restored: false,
            purge_interval: Some(PURGE_INTERVAL),
            tombstone_retention: EngineConfig::default().tombstone_retention,
            peer_retirement: EngineConfig::default().peer_retirement,
            accept_new_peer_ids: Vec::new(),
            peer_options: BTreeMap::new(),
            paused: false,
            store: None,
            store_schema: None,
            store_pool: None,
            store_ca_file: None,
            blobs: None,
            cache_bytes: None,
        }
    }

    /// The server's TLS identity, read from [`NodeOptions::tls_cert`] and
    /// [`NodeOptions::tls_key`].
    fn server_tls(&self) -> Result<Option<ServerTls>, NodeError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTls::from_pem_files(cert, key)?)),
            (None, None) => Ok(None),
            _ => Err(NodeError::TlsIncomplete),
        }
    }

    fn engine_config(&self) -> EngineConfig {
        let mut config = EngineConfig {
            tombstone_retention: self.tombstone_retention,
            peer_retirement: self.peer_retirement,
            ..EngineConfig::default()
        };
        if let Some(n) = self.page_limit {
            config.page_limit = n.max(1);
        }
        config.cache_bytes = self.cache_bytes.unwrap_or(NODE_CACHE_BYTES);
        config
    }
}

/// Why a node could not start or run (record commands fail with [`CommandError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A running node holds the data directory.
    #[error("{} is in use by a running node{}; use --node URL to reach it, or stop it first",
        dir.display(), url.as_deref().map(|u| format!(" ({u})")).unwrap_or_default())]
    DataDirInUse {
        /// The directory.
        dir: PathBuf,
        /// The running node's URL, if it wrote one.
        url: Option<String>,
    },
    /// A command that only reads was given a data directory that does not exist.
    #[error("no data directory at {}: a command that only reads does not create one (check --data)", dir.display())]
    NoDataDir {
        /// The directory.
        dir: PathBuf,
    },
    /// The data directory could not be opened.
    #[error("cannot open data directory {}", dir.display())]
    Open {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Error,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] Error),
    /// A node or peer URL that cannot be used.
    #[error("{reason}")]
    BadUrl {
        /// What is wrong with it.
        reason: String,
    },
    /// The transport to a node or peer cannot be set up (say, a token that is not a valid
    /// header value).
    #[error(transparent)]
    Transport(TransportError),
    /// The token file cannot be used.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Only one of the TLS certificate and key was given.
    #[error("a TLS certificate and its key go together: give both --tls-cert and --tls-key")]
    TlsIncomplete,
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server could not run.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// An option for one peer named a URL that is not one of the node's peers.
    #[error("{option} {url}: not one of the node's --peer URLs")]
    NotAPeer {
        /// The option (`--accept-new-peer-id`, `--peer-scopes`, `--peer-interval`).
        option: &'static str,
        /// The URL.
        url: String,
    },
    /// A peer was given twice.
    #[error("peer {url} given twice")]
    DuplicatePeer {
        /// The peer's URL.
        url: String,
    },
    /// The database named by [`NodeOptions::store`] could not be opened.
    #[error("cannot open the store at {url}")]
    Store {
        /// The store's URL, without its password.
        url: String,
        /// Why.
        #[source]
        source: Error,
    },
    /// [`NodeOptions::store`] names a store this build cannot use.
    #[error("{reason}")]
    StoreUnsupported {
        /// What is wrong.
        reason: String,
    },
    /// A file of the node (its URL file, or an output of the CLI) could not be written.
    #[error("i/o error on {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<TransportError> for NodeError {
    fn from(e: TransportError) -> NodeError {
        match e {
            e @ TransportError::InvalidUrl { .. } => NodeError::BadUrl {
                reason: e.to_string(),
            },
            other => NodeError::Transport(other),
        }
    }
}

/// Opens the data directory `dir`, or says clearly that a running node holds it.
///
/// # Errors
/// [`NodeError::DataDirInUse`] while another process (a running node) has it open;
/// [`NodeError::Open`] for any other failure.
pub fn open_data_dir(dir: &Path, config: EngineConfig) -> Result<SyncEngine, NodeError> {
    open_data_dir_as(dir, config, false)
}

/// Refuses a data directory that does not exist (for commands that only read).
///
/// # Errors
/// [`NodeError::NoDataDir`] when `dir` is not a directory.
pub fn require_data_dir(dir: &Path) -> Result<(), NodeError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(NodeError::NoDataDir {
            dir: dir.to_owned(),
        })
    }
}

/// [`open_data_dir`], or with `restored`, [`SyncEngine::open_restored`] (a fresh id first).
///
/// # Errors
/// As for [`open_data_dir`].
pub fn open_data_dir_as(
    dir: &Path,
    config: EngineConfig,
    restored: bool,
) -> Result<SyncEngine, NodeError> {
    let opened = if restored {
        SyncEngine::open_restored(dir, config)
    } else {
        SyncEngine::open_with(dir, config)
    };
    match opened {
        Ok(engine) => Ok(engine),
        Err(Error::Store(StoreError::Redb(e)))
            if matches!(*e, redb::Error::DatabaseAlreadyOpen) =>
        {
            let url = std::fs::read_to_string(dir.join(URL_FILE))
                .ok()
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty());
            Err(NodeError::DataDirInUse {
                dir: dir.to_owned(),
                url,
            })
        }
        Err(source) => Err(NodeError::Open {
            dir: dir.to_owned(),
            source,
        }),
    }
}

/// A node that listens and is ready to run (see the [module docs](self)).
pub struct Node {
    engine: Arc<SyncEngine>,
    listener: TcpListener,
    addr: SocketAddr,
    server: ServerConfig,
    peers: Vec<Arc<HttpTransport>>,
    scheduler: SchedulerConfig,
    /// Peers (base URLs) whose new identity is accepted once.
    accept_new: Vec<String>,
    /// Per-peer options, by base URL.
    peer_options: BTreeMap<String, PeerOptions>,
    data: PathBuf,
    purge_interval: Option<Duration>,
    /// Start with syncing paused.
    paused: bool,
    /// What tells this process of other processes' commits to a shared store (a hub over
    /// PostgreSQL); stops when the node does.
    _feed: Option<store::Feed>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node", &self.engine.node_id())
            .field("addr", &self.addr)
            .field("data", &self.data)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Reads the token file and the TLS certificate and key, checks the peers' URLs and the
    /// CA file, opens the data directory and binds the listener.
    ///
    /// # Errors
    /// The token file, the TLS certificate or key, or the CA file cannot be used, a peer URL
    /// is malformed, the node would be open on a non-loopback address (or serve tokens in
    /// clear text there, see [`NodeOptions::insecure_http`]), the data directory is in use or
    /// cannot be opened, or the address cannot be bound.
    pub async fn start(options: NodeOptions) -> Result<Node, NodeError> {
        let access = Arc::new(match &options.token_file {
            Some(path) => Access::from_file(path)?,
            None => Access::open(),
        });
        let server = ServerConfig {
            access,
            tls: options.server_tls()?,
            insecure_http: options.insecure_http,
            max_connections: options.max_connections,
            ..ServerConfig::default()
        };
        check_exposure(options.listen, &server)?;
        let mut peers: Vec<Arc<HttpTransport>> = Vec::new();
        for url in &options.peers {
            let client = ClientConfig {
                token: options.peer_token.clone(),
                ca_file: options.ca_file.clone(),
                ..ClientConfig::default()
            };
            let peer = HttpTransport::with_config(url, client)?;
            if peers.iter().any(|p| p.base_url() == peer.base_url()) {
                return Err(NodeError::DuplicatePeer { url: url.clone() });
            }
            peers.push(Arc::new(peer));
        }
        // Bound before the data directory is opened, so a port in use leaves no directory
        // behind (opening creates a missing one).
        let listener = bind(options.listen).map_err(|source| NodeError::Bind {
            addr: options.listen,
            source,
        })?;
        let base_of = |option: &'static str, url: &str| -> Result<String, NodeError> {
            let base = HttpTransport::new(url, None)?.base_url().to_owned();
            if !peers.iter().any(|p| p.base_url() == base) {
                return Err(NodeError::NotAPeer {
                    option,
                    url: url.to_owned(),
                });
            }
            Ok(base)
        };
        let mut accept_new = Vec::new();
        for url in &options.accept_new_peer_ids {
            accept_new.push(base_of("--accept-new-peer-id", url)?);
        }
        let mut peer_options = BTreeMap::new();
        for (url, o) in &options.peer_options {
            peer_options.insert(base_of("--peer-scopes/--peer-interval", url)?, o.clone());
        }
        // Off the runtime's threads: opening a database blocks (and its client runs a
        // runtime of its own, which cannot start inside this one).
        let opening = options.clone();
        let opened = tokio::task::spawn_blocking(move || store::open(&opening))
            .await
            .map_err(|e| NodeError::Io {
                path: options.data.clone(),
                source: std::io::Error::other(format!("opening the store failed: {e}")),
            })??;
        let engine = opened.engine;
        let addr = listener.local_addr().map_err(|source| NodeError::Bind {
            addr: options.listen,
            source,
        })?;
        if let Some(file) = opened.store_file {
            server.metrics.watch_store_file(file);
        }
        // Weak: the metrics must not keep a stopped node's store open.
        let counted = Arc::downgrade(&engine);
        server
            .metrics
            .watch_staged_files(move || counted.upgrade()?.staged_files().ok());
        let (before_round, after_round) = round_hooks(&server.metrics);
        let purge_interval = options.purge_interval;
        let scheduler = SchedulerConfig {
            interval: options.interval,
            options: ExchangeOptions {
                page_limit: options.page_limit,
                ..ExchangeOptions::default()
            },
            before_round: Some(before_round),
            after_round: Some(after_round),
            audit_interval: options.audit_interval,
            ..SchedulerConfig::default()
        };
        let node = Node {
            engine,
            listener,
            addr,
            server,
            peers,
            scheduler,
            accept_new,
            peer_options,
            data: options.data,
            purge_interval,
            paused: options.paused,
            _feed: opened.feed,
        };
        let url_file = node.data.join(URL_FILE);
        std::fs::write(&url_file, format!("{}\n", node.url())).map_err(|source| NodeError::Io {
            path: url_file,
            source,
        })?;
        Ok(node)
    }

    /// The address the node listens on (the port the OS picked, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's root URL (`http://host:port`, or `https://host:port` with TLS; an
    /// unspecified address becomes loopback).
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        let scheme = if self.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}")
    }

    /// The node's engine.
    pub fn engine(&self) -> &Arc<SyncEngine> {
        &self.engine
    }

    /// What the node counts (served as `GET /metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.server.metrics
    }

    /// Serves the data directory and syncs with every peer until `shutdown` completes; then
    /// stops the scheduler (a round in flight is abandoned safely), lets requests in progress
    /// finish (up to 10 s), and makes every applied page durable.
    ///
    /// # Errors
    /// The server failed, or the final flush failed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        let Node {
            engine,
            listener,
            addr,
            server: config,
            peers,
            scheduler,
            accept_new,
            peer_options,
            data,
            purge_interval,
            paused,
            _feed,
        } = self;
        tracing::info!(node = %engine.node_id(), %addr, data = %data.display(),
            peers = peers.len(), "node running");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(serve(engine.clone(), listener, config, async move {
            let _ = stopped.await;
        }));
        let purging = purge_interval.map(|every| tokio::spawn(purge_loop(engine.clone(), every)));
        let scheduler = Scheduler::start(engine.clone(), scheduler);
        if paused {
            // Before any peer is added: no round starts.
            scheduler.pause();
            tracing::info!("syncing paused (SIGUSR2 resumes it)");
        }
        for peer in peers {
            let name = peer.base_url().to_owned();
            // Names are the peers' distinct URLs (checked in `start`), so this cannot fail.
            let options = peer_options.get(&name).cloned().unwrap_or_default();
            if let Err(e) = scheduler.add_peer_with(name, peer, options) {
                tracing::error!(error = %e, "peer not scheduled");
            }
        }
        for name in &accept_new {
            // Checked in `start` to be one of the peers just added.
            if let Err(e) = scheduler.accept_new_identity(name) {
                tracing::error!(error = %e, "new identity not accepted");
            }
        }
        let mut control = ControlSignals::new();
        let shutdown = std::pin::pin!(shutdown);
        let mut shutdown = shutdown;
        let early = loop {
            tokio::select! {
                () = &mut shutdown => break None,
                ended = &mut server => break Some(ended),
                pause = control.next() => {
                    if pause {
                        scheduler.pause();
                        tracing::info!("syncing paused (SIGUSR1); SIGUSR2 resumes it");
                    } else {
                        scheduler.resume();
                        tracing::info!("syncing resumed (SIGUSR2)");
                    }
                }
            }
        };
        tracing::info!("stopping");
        if let Some(task) = purging {
            // A purge commits whole batches: stopping between or inside one loses nothing.
            task.abort();
        }
        let flushed = scheduler.shutdown().await;
        let served = match early {
            Some(ended) => ended,
            None => {
                let _ = stop.send(());
                server.await
            }
        };
        let _ = std::fs::remove_file(data.join(URL_FILE));
        // Off the runtime's threads, as all store work: a flush waits for the disk, and a
        // PostgreSQL store's client cannot run on a runtime thread at all.
        let handle = engine.handle();
        crate::blocking::run_blocking(move || handle.flush())
            .await
            .map_err(|e| NodeError::Io {
                path: data.clone(),
                source: std::io::Error::other(format!("the final flush did not run: {e}")),
            })??;
        flushed?;
        match served {
            Ok(result) => result.map_err(NodeError::from),
            Err(e) => {
                tracing::error!(error = %e, "the server task failed");
                Err(ServeError::Io(std::io::Error::other("server task failed")).into())
            }
        }
    }
}

/// Time between a node's background purges, by default.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Runs [`SyncEngine::purge`] until it has nothing more to look at, each call off the
/// runtime's threads; returns the calls' totals.
///
/// # Errors
/// A call failed (what earlier calls committed stays).
pub async fn purge_all(engine: &SyncEngine) -> Result<PurgeReport, Error> {
    let mut total = PurgeReport::default();
    loop {
        let handle = engine.handle();
        let report = crate::blocking::run_blocking(move || handle.purge()).await??;
        total.purged += report.purged;
        total.scanned += report.scanned;
        for (scope, floor) in report.floors {
            let f = total.floors.entry(scope).or_default();
            *f = (*f).max(floor);
        }
        total.retired_peers.extend(report.retired_peers);
        total.retired_origins.extend(report.retired_origins);
        if !report.more {
            return Ok(total);
        }
    }
}

/// Purges every `every` (the first a tenth of it after start), logging failures.
async fn purge_loop(engine: Arc<SyncEngine>, every: Duration) {
    let mut next = tokio::time::Instant::now() + every / 10;
    loop {
        tokio::time::sleep_until(next).await;
        next += every;
        if let Err(e) = purge_all(&engine).await {
            tracing::warn!(error = %crate::error::error_chain(&e), "purge failed; retried at the next interval");
        }
    }
}

/// The scheduler's hooks that count the rounds the node initiates in `metrics`. Neither
/// refuses a round nor reports an error: counting must never change what the node does.
fn round_hooks(metrics: &Arc<Metrics>) -> (BeforeRound, AfterRound) {
    let started = metrics.clone();
    let ended = metrics.clone();
    (
        Arc::new(move |peer: &str| {
            started.round_started(peer);
            Ok(())
        }),
        Arc::new(move |peer: &str, result: &Result<_, Error>| {
            ended.round_ended(peer, result);
            Ok(())
        }),
    )
}

/// Connections the kernel holds for the node before it accepts them. The standard library's
/// 128 overflows when a burst of connections arrives faster than the accept loop takes them
/// (hundreds at once when a flood of idle connections is being shed), and a connection
/// request the kernel drops costs its client a second before it tries again. The kernel caps
/// it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and, like the standard library's,
/// `SO_REUSEADDR`, so a node restarts at once on the port it just left).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// SIGUSR1 (pause syncing) and SIGUSR2 (resume) for a running node, on Unix; never on
/// other systems, or when the signals cannot be listened for (logged).
struct ControlSignals {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ControlSignals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signals = match (
                signal(SignalKind::user_defined1()),
                signal(SignalKind::user_defined2()),
            ) {
                (Ok(pause), Ok(resume)) => Some((pause, resume)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot listen for SIGUSR1/SIGUSR2: no pause by signal");
                    None
                }
            };
            ControlSignals { signals }
        }
        #[cfg(not(unix))]
        ControlSignals {}
    }

    /// The next request: `true` to pause, `false` to resume.
    async fn next(&mut self) -> bool {
        #[cfg(unix)]
        if let Some((pause, resume)) = self.signals.as_mut() {
            tokio::select! {
                Some(()) = pause.recv() => return true,
                Some(()) = resume.recv() => return false,
                else => {}
            }
        }
        std::future::pending().await
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM: the shutdown future for a node run
/// from a terminal or a service manager.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_data_dir_is_refused_with_the_url_its_node_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let held = open_data_dir(dir.path(), EngineConfig::default()).unwrap();
        std::fs::write(dir.path().join(URL_FILE), "http://127.0.0.1:9\n").unwrap();
        match open_data_dir(dir.path(), EngineConfig::default()) {
            Err(NodeError::DataDirInUse { dir: d, url }) => {
                assert_eq!(d, dir.path());
                assert_eq!(url.as_deref(), Some("http://127.0.0.1:9"));
            }
            other => panic!("expected DataDirInUse, got {:?}", other.map(|_| ())),
        }
        drop(held);
        assert!(open_data_dir(dir.path(), EngineConfig::default()).is_ok());
    }
}
