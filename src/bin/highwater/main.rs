//! `highwater`: run a node, read and write its records and files, sync once, show status.
//!
//! This file parses arguments, sets up logging (`RUST_LOG`, default `info`, to stderr) and
//! calls [`highwater::node`]; the logic lives there. `demo.rs` is the `demo` command.
//!
//! Over 600 lines because clap's argument definitions for every command sit here, one place to
//! read the command line; the work is in `highwater::node`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod demo;

use clap::{Args, Parser, Subcommand};
use highwater::api::{all_scopes, Listed, NodeApi};
use highwater::engine::EngineConfig;
use highwater::error::{RefusalCode, TransportError};
use highwater::http::{ClientConfig, HttpTransport, DEFAULT_MAX_CONNECTIONS};
use highwater::node::terminal::{escape_line, escape_text, EscapingWriter};
use highwater::node::{
    self, records, render_status, sync_until_done, CommandError, Node, NodeError, NodeOptions,
    SyncTotals, DEFAULT_LISTEN, DEFAULT_NODE_URL,
};
use highwater::{ExchangeOptions, Key, PeerOptions, Scope, ScopeFilter};
use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;

/// Replicas of records and files kept in sync between peers.
#[derive(Parser)]
#[command(name = "highwater", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: serve a data directory over HTTP (or HTTPS) and sync it with every --peer.
    ///
    /// Prints `listening on http://HOST:PORT` (`https://` with --tls-cert) on stdout once it
    /// accepts connections; logs go to stderr. Stops cleanly on Ctrl-C or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Write a record (the value from the argument, or from stdin without one).
    Put {
        #[command(flatten)]
        target: Target,
        /// `shared` or `app/<app_id>/<table>`.
        scope: Scope,
        /// The key (UTF-8 text).
        key: String,
        /// The value; read from stdin when left out.
        value: Option<String>,
    },
    /// Print a record's value (its bytes as they are on a pipe or file; on a terminal,
    /// control characters are shown escaped, `\x1b`); fails if there is none.
    Get {
        #[command(flatten)]
        target: Target,
        /// `shared` or `app/<app_id>/<table>`.
        scope: Scope,
        /// The key.
        key: String,
    },
    /// Delete a record.
    Rm {
        #[command(flatten)]
        target: Target,
        /// `shared` or `app/<app_id>/<table>`.
        scope: Scope,
        /// The key.
        key: String,
    },
    /// List the records of a scope: key (control characters escaped, `\x1b`), value size,
    /// residency, file size, version.
    Ls {
        #[command(flatten)]
        target: Target,
        /// `shared` or `app/<app_id>/<table>`.
        scope: Scope,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many records (default: all).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Write a record whose file is PATH (streamed; the value is empty).
    PutFile {
        #[command(flatten)]
        target: Target,
        /// `shared` or `app/<app_id>/<table>`.
        scope: Scope,
        /// The key.
        key: String,
        /// The file to store.
        path: PathBuf,
    },
    /// Save a record's file to PATH (`-` for stdout, escaped like `get` on a terminal),
    /// checked against its hash.
    GetFile {
        #[command(flatten)]
        target: Target,
        /// `shared` or `app/<app_id>/<table>`.
        scope: Scope,
        /// The key.
        key: String,
        /// Where to write it (`-`: stdout).
        path: PathBuf,
    },
    /// Sync a data directory with a peer once: exchange until neither side has anything
    /// left, then print a summary.
    Sync {
        #[command(flatten)]
        with: WithPeer,
        /// Versions per page.
        #[arg(long)]
        page_limit: Option<usize>,
    },
    /// Audit a data directory against a peer once: compare their live contents (not their
    /// watermarks), repair every difference both ways by last-write-wins, fetch the files of
    /// Staged records the peer holds, then print what differed. Rounds find everything a
    /// watermark says is missing; an audit also finds what none does (a restored backup,
    /// a lost blob directory).
    Audit {
        #[command(flatten)]
        with: WithPeer,
    },
    /// Purge a data directory once: remove tombstones older than the retention that every
    /// peer it knows holds, retire peers not seen for the peer retirement and origins with
    /// nothing left, then print what went. `serve` does the same in the background.
    Purge {
        /// The data directory (no node may be running on it).
        #[arg(long)]
        data: PathBuf,
        /// How old a tombstone must be before it goes (`30d`, `720h`).
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        tombstone_retention: Duration,
        /// How long a peer may go unseen before purges stop waiting for it (`90d`; `off`:
        /// never).
        #[arg(long, default_value = "90d", value_parser = interval_or_off)]
        peer_retirement: Every,
    },
    /// Run the demo: three nodes on loopback HTTP (a hub and two devices) write at once,
    /// one device goes offline, both sides edit (a conflict and a delete), a file transfer
    /// fails and heals, and all three converge. Exits 0 only if they did.
    Demo {
        /// Records each node writes at the start.
        #[arg(long, default_value_t = 5000)]
        records: usize,
        /// Size of each node's file, in KiB.
        #[arg(long, default_value_t = 2048)]
        file_kib: usize,
    },
    /// Show watermarks per scope and origin, residency counts, and peers with their lag.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the status document as JSON (the shape of `GET /v1/status`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The data directory (created if missing). With --store it holds only this process's
    /// URL file, and the blobs unless --blobs names another directory.
    #[arg(long)]
    data: PathBuf,
    /// Where to listen; port 0 lets the OS pick one.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// A peer's root URL (`http://host:port` or `https://host:port`) to sync with; repeat
    /// for several.
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// The token this node presents to its peers (prefer the environment variable: the
    /// command line is visible to other users).
    #[arg(long, env = "HIGHWATER_PEER_TOKEN", hide_env_values = true)]
    peer_token: Option<String>,
    /// The token file granting access to this node: JSON, `{"tokens": [{"name": "hub",
    /// "token": "<16+ chars>", "read": ["*"], "write": ["app/notes/*"], "sync": true}]}`.
    /// Without one the node is open and listens on loopback only.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Time between rounds with a peer when nothing triggers one sooner (`500ms`, `2s`, `1m`).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Versions per page this node asks for and ships.
    #[arg(long)]
    page_limit: Option<usize>,
    /// Serve HTTPS with this PEM certificate chain (the node's certificate first); needs
    /// --tls-key. The URL the node prints and writes to node.url becomes https://.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for `https://` peers, besides the system's
    /// trusted roots.
    #[arg(long, env = "HIGHWATER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Listen beyond loopback with tokens but without TLS, although the tokens then cross the
    /// network in clear text (refused without this flag).
    #[arg(long)]
    insecure_http: bool,
    /// Connections to keep open at once; at the cap the least recently active idle one gives
    /// way to a new one, which is refused (503) only when every connection is busy.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Time between audits with each peer, which compare live contents and repair what no
    /// watermark shows missing (`30m`, `2h`; `off` for none). A detected restore audits
    /// every peer at once either way.
    #[arg(long, default_value = "1h", value_parser = interval_or_off)]
    audit_interval: Every,
    /// The data directory was restored from a backup: take a fresh node id before issuing
    /// any timestamp. Not needed for a node that syncs with peers (it detects the restore in
    /// its first round with one that holds its later writes); for a hub that only answers,
    /// whose devices would otherwise see their later writes refused until they audit.
    #[arg(long)]
    restored: bool,
    /// Time between background purges of tombstones past the retention (`off`: none; run
    /// `highwater purge` by hand instead).
    #[arg(long, default_value = "1h", value_parser = interval_or_off)]
    purge_interval: Every,
    /// How old a tombstone must be before a purge removes it (`30d`). A peer offline for
    /// longer loses its oldest unsent writes of keys deleted here (docs/protocol.md).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    tombstone_retention: Duration,
    /// How long a peer may go unseen before purges stop waiting for it (`off`: never).
    #[arg(long, default_value = "90d", value_parser = interval_or_off)]
    peer_retirement: Every,
    /// Accept, once, that the node at this --peer URL is another node than before (it was
    /// replaced on purpose): without this, a peer that answers with another id than the one
    /// this node noted for its URL is refused and nothing is sent to it. A node restored
    /// from a backup with --restored vouches for its old id and needs none of this.
    #[arg(long = "accept-new-peer-id", value_name = "URL")]
    accept_new_peer_ids: Vec<String>,
    /// Sync only these scopes with one peer: `URL=SCOPE[,SCOPE...]` (repeat for several
    /// peers); other peers sync every scope.
    #[arg(long = "peer-scopes", value_name = "URL=SCOPES", value_parser = peer_scopes)]
    peer_scopes: Vec<(String, Vec<Scope>)>,
    /// Time between rounds with one peer: `URL=DURATION` (`URL=5s`; repeat for several);
    /// other peers use --interval.
    #[arg(long = "peer-interval", value_name = "URL=DURATION", value_parser = peer_interval)]
    peer_intervals: Vec<(String, Duration)>,
    /// Start with syncing paused (offline on purpose): serve and take writes, start no round.
    /// SIGUSR1 pauses a running node, SIGUSR2 resumes it.
    #[arg(long)]
    paused: bool,
    /// Keep the records in a PostgreSQL database (`postgres://user@host:port/db`) instead of
    /// the data directory: any number of `serve` processes on one database (and one --blobs
    /// directory) act as one hub behind a load balancer (docs/scale.md). Prefer the
    /// environment variable when the URL holds a password.
    #[arg(
        long,
        env = "HIGHWATER_STORE",
        hide_env_values = true,
        value_name = "URL"
    )]
    store: Option<String>,
    /// The PostgreSQL schema holding the hub's tables (created if missing; default: the
    /// connection's search path, usually `public`).
    #[arg(long, requires = "store", value_name = "SCHEMA")]
    store_schema: Option<String>,
    /// Database connections this process opens at most (default 16); a request that finds
    /// none free within 10 s is answered 503.
    #[arg(long, requires = "store", value_name = "N")]
    store_pool: Option<u32>,
    /// The store's page cache in MiB (default 192). It fills only as a large store is read
    /// and written; a bulk sync into a store larger than it rewrites index pages it could not
    /// hold (64 writes 2.4 times the bytes per record of 192 on a 1M-record pull).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..=65536))]
    cache_mib: Option<u32>,
    /// A PEM file of CA certificates to trust for the database, besides the system's: with
    /// `sslmode=require` in the --store URL the connection is TLS, the server's certificate
    /// and name verified (without it, clear text).
    #[arg(long, requires = "store", value_name = "FILE")]
    store_ca_file: Option<PathBuf>,
    /// With --store: the blob directory, which every process of the hub must share (a
    /// network filesystem across machines). Default: DATA/blobs.
    #[arg(long, requires = "store", value_name = "DIR")]
    blobs: Option<PathBuf>,
}

/// `URL=SCOPE[,SCOPE...]`.
fn peer_scopes(text: &str) -> Result<(String, Vec<Scope>), String> {
    let (url, scopes) = text
        .split_once('=')
        .ok_or("expected URL=SCOPE[,SCOPE...]")?;
    let scopes = scopes
        .split(',')
        .map(|s| s.parse::<Scope>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((url.to_owned(), scopes))
}

/// `URL=DURATION`.
fn peer_interval(text: &str) -> Result<(String, Duration), String> {
    let (url, every) = text.split_once('=').ok_or("expected URL=DURATION")?;
    let every = humantime::parse_duration(every).map_err(|e| e.to_string())?;
    Ok((url.to_owned(), every))
}

/// A period, or none (`off`).
#[derive(Clone, Copy)]
struct Every(Option<Duration>);

fn interval_or_off(text: &str) -> Result<Every, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(Every(None));
    }
    let period = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if period.is_zero() {
        return Err("use `off` for none, or a period above zero".to_owned());
    }
    Ok(Every(Some(period)))
}

/// A data directory and the peer a one-shot command (`sync`, `audit`) works with.
#[derive(Args)]
struct WithPeer {
    /// The data directory (no node may be running on it).
    #[arg(long)]
    data: PathBuf,
    /// The peer's root URL (`http://` or `https://`).
    #[arg(long)]
    peer: String,
    /// The token to present to the peer (`--peer-token` is the same option).
    #[arg(
        long = "token",
        visible_alias = "peer-token",
        env = "HIGHWATER_PEER_TOKEN",
        hide_env_values = true
    )]
    peer_token: Option<String>,
    /// A PEM file of CA certificates to trust for an `https://` peer, besides the system's
    /// trusted roots.
    #[arg(long, env = "HIGHWATER_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl WithPeer {
    /// The client settings for the peer.
    fn client(&self) -> ClientConfig {
        ClientConfig {
            token: self.peer_token.clone(),
            ca_file: self.ca_file.clone(),
            ..ClientConfig::default()
        }
    }
}

/// Where a record command acts.
#[derive(Args)]
struct Target {
    /// The running node to talk to (`http://` or `https://`).
    #[arg(long, env = "HIGHWATER_NODE", default_value = DEFAULT_NODE_URL)]
    node: String,
    /// The bearer token for the node.
    #[arg(long, env = "HIGHWATER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM file of CA certificates to trust for an `https://` node, besides the system's
    /// trusted roots.
    #[arg(long, env = "HIGHWATER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Work directly on this data directory instead of a node (refused while a node runs on
    /// it).
    #[arg(long)]
    data: Option<PathBuf>,
}

impl Target {
    fn client(&self) -> ClientConfig {
        ClientConfig {
            token: self.token.clone(),
            ca_file: self.ca_file.clone(),
            ..ClientConfig::default()
        }
    }

    /// The node or data directory, for a command that writes (a missing directory is
    /// created).
    fn open(&self) -> Result<Box<dyn NodeApi>, NodeError> {
        node::open_api_with(&self.node, self.client(), self.data.as_deref())
    }

    /// The node or data directory, for a command that only reads (a missing directory is
    /// an error, never created).
    fn read(&self) -> Result<Box<dyn NodeApi>, NodeError> {
        node::open_api_reading(&self.node, self.client(), self.data.as_deref())
    }
}

/// Why a command failed: the node (opening a data directory, serving, syncing) or a record
/// command.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The peer of `sync` or `audit` refused our token (401).
    #[error("the peer {peer} refused the token: {reason} (give the peer's token with --token or HIGHWATER_PEER_TOKEN)")]
    PeerUnauthorized { peer: String, reason: String },
}

/// A failed `sync` or `audit` with `peer`: a refused token names the option to give it with.
fn peer_failed(peer: &str, e: highwater::Error) -> CliError {
    match e {
        highwater::Error::Transport(TransportError::Refused {
            code: RefusalCode::Unauthorized,
            reason,
        }) => CliError::PeerUnauthorized {
            peer: peer.to_owned(),
            reason,
        },
        other => NodeError::from(other).into(),
    }
}

impl From<highwater::Error> for CliError {
    fn from(e: highwater::Error) -> CliError {
        CliError::Command(e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // The demo narrates on stdout; its nodes' routine logs would only clutter it.
            EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                EnvFilter::new(if matches!(cli.command, Command::Demo { .. }) {
                    "error"
                } else {
                    "info"
                })
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Demo { records, file_kib } = cli.command {
        let options = demo::DemoOptions {
            records_per_node: records,
            file_size: file_kib << 10,
            ..Default::default()
        };
        let mut out = std::io::stdout();
        return match runtime.block_on(demo::run(&options, &mut out)) {
            Ok(report) if report.converged => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {}", chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated, escaped for a terminal: a message may quote a
/// key, or come from a node (its refusals), and neither may reach the terminal raw.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    escape_text(out.as_bytes())
}

fn key(text: &str) -> Result<Key, CommandError> {
    Key::try_from(text).map_err(|e| highwater::Error::from(e).into())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CommandError + '_ {
    move |source| CommandError::Io {
        path: path.to_owned(),
        source,
    }
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(args) => Ok(serve(*args).await?),
        Command::Put {
            target,
            scope,
            key: k,
            value,
        } => {
            let value = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                        .map_err(io_error(Path::new("stdin")))?;
                    buf
                }
            };
            target.open()?.put(scope, key(&k)?, value).await?;
            Ok(())
        }
        Command::Get {
            target,
            scope,
            key: k,
        } => {
            let record = records::get(&*target.read()?, &scope, &key(&k)?).await?;
            let mut out = std::io::stdout().lock();
            let value = if out.is_terminal() {
                escape_text(&record.value).into_bytes()
            } else {
                record.value
            };
            out.write_all(&value)
                .and_then(|()| out.flush())
                .map_err(io_error(Path::new("stdout")))?;
            Ok(())
        }
        Command::Rm {
            target,
            scope,
            key: k,
        } => {
            target.open()?.delete(scope, key(&k)?).await?;
            Ok(())
        }
        Command::Ls {
            target,
            scope,
            prefix,
            limit,
        } => {
            let api = target.read()?;
            let mut out = std::io::stdout().lock();
            records::list(&*api, &scope, prefix.as_bytes(), limit, |item| {
                writeln!(out, "{}", listed_line(item)).map_err(io_error(Path::new("stdout")))
            })
            .await?;
            Ok(())
        }
        Command::PutFile {
            target,
            scope,
            key: k,
            path,
        } => {
            records::put_file(&*target.open()?, &scope, &key(&k)?, &path).await?;
            Ok(())
        }
        Command::GetFile {
            target,
            scope,
            key: k,
            path,
        } => Ok(get_file(&*target.read()?, &scope, &key(&k)?, &path).await?),
        Command::Sync { with, page_limit } => {
            sync(&with.data, &with.peer, with.client(), page_limit).await
        }
        Command::Audit { with } => audit(&with.data, &with.peer, with.client()).await,
        Command::Purge {
            data,
            tombstone_retention,
            peer_retirement,
        } => {
            let config = EngineConfig {
                tombstone_retention: Some(tombstone_retention),
                peer_retirement: peer_retirement.0,
                ..EngineConfig::default()
            };
            purge(&data, config).await
        }
        Command::Demo { .. } => unreachable!("handled in main"),
        Command::Status { target, json } => {
            let status = target.read()?.status(all_scopes()).await?;
            if json {
                println!("{:#}", status.to_json());
            } else {
                print!("{}", render_status(&status));
            }
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), NodeError> {
    let mut peer_options: BTreeMap<String, PeerOptions> = BTreeMap::new();
    for (url, scopes) in args.peer_scopes {
        peer_options.entry(url).or_default().scopes =
            Some(ScopeFilter::Only(scopes.into_iter().collect()));
    }
    for (url, every) in args.peer_intervals {
        peer_options.entry(url).or_default().interval = Some(every);
    }
    let options = NodeOptions {
        peers: args.peers,
        peer_token: args.peer_token,
        token_file: args.token_file,
        interval: args.interval,
        page_limit: args.page_limit,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        ca_file: args.ca_file,
        insecure_http: args.insecure_http,
        max_connections: args.max_connections,
        audit_interval: args.audit_interval.0,
        purge_interval: args.purge_interval.0,
        tombstone_retention: Some(args.tombstone_retention),
        peer_retirement: args.peer_retirement.0,
        restored: args.restored,
        accept_new_peer_ids: args.accept_new_peer_ids,
        paused: args.paused,
        peer_options,
        store: args.store,
        store_schema: args.store_schema,
        store_pool: args.store_pool,
        store_ca_file: args.store_ca_file,
        blobs: args.blobs,
        cache_bytes: args.cache_mib.map(|mib| (mib as usize) << 20),
        ..NodeOptions::new(args.data, args.listen)
    };
    let node = Node::start(options).await?;
    // The line scripts and tests read to learn the port.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", node.url())
        .and_then(|()| stdout.flush())
        .map_err(|source| NodeError::Io {
            path: "stdout".into(),
            source,
        })?;
    drop(stdout);
    node.run(node::termination()).await
}

fn listed_line(item: &Listed) -> String {
    let file = item
        .file
        .map(|f| format!("file {} B", f.size))
        .unwrap_or_else(|| "-".to_owned());
    format!(
        "{}\t{} B\t{}\t{file}\t{}",
        escape_line(item.key.as_bytes()),
        item.size,
        item.residency.as_str(),
        item.hlc
    )
}

async fn get_file(
    api: &dyn NodeApi,
    scope: &Scope,
    key: &Key,
    path: &Path,
) -> Result<(), CommandError> {
    if path == Path::new("-") {
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            let (out, _) = records::get_file(api, scope, key, EscapingWriter::new(stdout)).await?;
            return out.finish().map(drop).map_err(io_error(path));
        }
        let (mut out, _) = records::get_file(api, scope, key, stdout).await?;
        return out.flush().map_err(io_error(path));
    }
    // Written beside the target and renamed once complete and verified, so a failed
    // transfer never leaves a partial file under the name asked for.
    let partial = path.with_extension("highwater-partial");
    let file = std::fs::File::create(&partial).map_err(io_error(&partial))?;
    let fetched = records::get_file(api, scope, key, file).await;
    let done = fetched.and_then(|(file, _)| {
        file.sync_all().map_err(io_error(&partial))?;
        std::fs::rename(&partial, path).map_err(io_error(path))
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    done
}

async fn sync(
    data: &Path,
    peer: &str,
    client: ClientConfig,
    page_limit: Option<usize>,
) -> Result<(), CliError> {
    // A one-shot sync is the bulk transfer a node's cache is sized for.
    let config = EngineConfig {
        cache_bytes: node::NODE_CACHE_BYTES,
        ..EngineConfig::default()
    };
    let engine = node::open_data_dir(data, config)?;
    let transport = HttpTransport::with_config(peer, client).map_err(NodeError::from)?;
    let options = ExchangeOptions {
        page_limit,
        ..ExchangeOptions::default()
    };
    // Drawn on stderr, and only when it is a terminal: a spinner until the peer says how
    // many versions remain, then a bar (a version 1 peer never does: a spinner to the end).
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let show = |t: &SyncTotals| {
        if let Some(total) = t.total() {
            if bar.length().is_none() {
                bar.set_style(
                    ProgressStyle::with_template(
                        "{elapsed} [{wide_bar}] {pos}/{len} versions ({eta} left)\n{msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            }
            bar.set_length(total);
            bar.set_position(t.received as u64);
        }
        bar.set_message(progress_line(t));
    };
    let started = Instant::now();
    let result = tokio::select! {
        r = sync_until_done(&engine, &transport, &options, show) => r,
        () = node::termination() => {
            bar.abandon_with_message("interrupted");
            engine.flush().map_err(NodeError::from)?;
            return Err(CommandError::Interrupted.into());
        }
    };
    bar.finish_and_clear();
    engine.flush().map_err(NodeError::from)?;
    let totals = result.map_err(|e| peer_failed(peer, e))?;
    println!(
        "synced with {} in {} round{} ({:.1} s): {}",
        totals.peer.map(|p| p.to_string()).unwrap_or_default(),
        totals.rounds,
        if totals.rounds == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64(),
        progress_line(&totals)
    );
    for halt in &totals.halts {
        println!("{}", node::halt_line(halt, "sync"));
    }
    if totals.audit_wanted {
        // The peer purged deletes since we last heard: compare contents with it, so that a
        // record it deleted and purged does not live on here (the re-clone).
        println!("the peer's purge floor rose: auditing against it");
        let started = Instant::now();
        let outcome = engine.audit(&transport).await.map_err(NodeError::from)?;
        engine.flush().map_err(NodeError::from)?;
        print!(
            "{}",
            node::render_audit(&outcome, started.elapsed(), REPAIRED_SHOWN)
        );
    }
    Ok(())
}

async fn audit(data: &Path, peer: &str, client: ClientConfig) -> Result<(), CliError> {
    let engine = node::open_data_dir(data, EngineConfig::default())?;
    let transport = HttpTransport::with_config(peer, client).map_err(NodeError::from)?;
    let started = Instant::now();
    let result = tokio::select! {
        r = engine.audit(&transport) => r,
        () = node::termination() => {
            engine.flush().map_err(NodeError::from)?;
            return Err(CommandError::Interrupted.into());
        }
    };
    engine.flush().map_err(NodeError::from)?;
    let outcome = result.map_err(|e| peer_failed(peer, e))?;
    print!(
        "{}",
        node::render_audit(&outcome, started.elapsed(), REPAIRED_SHOWN)
    );
    Ok(())
}

async fn purge(data: &Path, config: EngineConfig) -> Result<(), CliError> {
    let engine = node::open_data_dir(data, config)?;
    let started = Instant::now();
    let total = node::purge_all(&engine).await.map_err(NodeError::from)?;
    engine.flush().map_err(NodeError::from)?;
    println!(
        "purged {} tombstone{} of {} versions looked at ({:.1} s); retired {} peer{} and {} \
         origin mark{}",
        total.purged,
        if total.purged == 1 { "" } else { "s" },
        total.scanned,
        started.elapsed().as_secs_f64(),
        total.retired_peers.len(),
        if total.retired_peers.len() == 1 {
            ""
        } else {
            "s"
        },
        total.retired_origins.len(),
        if total.retired_origins.len() == 1 {
            ""
        } else {
            "s"
        },
    );
    for (scope, floor) in &total.floors {
        println!(
            "floor of {scope}: {}",
            highwater::Hlc::new(*floor, engine.node_id())
        );
    }
    Ok(())
}

/// Repaired keys `audit` lists before it only counts the rest.
const REPAIRED_SHOWN: usize = 50;

fn progress_line(t: &SyncTotals) -> String {
    format!(
        "received {} versions ({} applied), sent {}; files: fetched {} ({} B), sent {} ({} B)",
        t.received,
        t.applied,
        t.shipped,
        t.blobs_fetched,
        t.bytes_fetched,
        t.blobs_pushed,
        t.bytes_pushed
    )
}
