//! Syncs in a child process, so the peak RSS measured is the sync's own: the bench re-runs
//! itself as `e2e --role pull --from DIR --into DIR`. The child opens both redb nodes, pulls
//! everything from `from` into `into` over the in-process transport, reads its peak RSS,
//! then checks that both nodes hold the same state, and prints one `RESULT {json}` line.
//! Any failed check exits non-zero.
//!
//! Over HTTP (`e2e --role pull-http --url URL --into DIR`) the child holds only the receiver
//! and pulls from the node served at `URL` (by the parent, which checks the states and counts
//! the bytes on the wire: the child's report leaves those at zero). `e2e --role push-http
//! --url URL --from DIR` is the other direction: the child holds the sender and pushes
//! everything to the node served at `URL` (the `wan` case's push).
//!
//! The `wan` case runs this role in a network namespace (`wan.rs`), and two long-running
//! roles of its own (`served.rs`: `serve-http`, `relay`).
//!
//! For tuning, the child reads four variables (unset: the engine's defaults):
//! `HIGHWATER_BENCH_PAGE_LIMIT` (versions per page the receiver asks for),
//! `HIGHWATER_BENCH_CHECKPOINT_VERSIONS` and `HIGHWATER_BENCH_CHECKPOINT_SECS` (when deferred
//! page applies are made durable), and `HIGHWATER_BENCH_CACHE_MIB` (redb's page cache of the
//! receiving node).

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use std::time::Duration;

use highwater::http::HttpTransport;
use highwater::{EngineConfig, ExchangeOptions, InProcess, SyncEngine};
use serde::{Deserialize, Serialize};

use crate::fixture::{pull_async, pull_with, scope};
use crate::{measure, Result};

/// The hidden first argument that makes the bench a child.
pub const ROLE_FLAG: &str = "--role";

/// What a child's pull did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PullReport {
    /// Seconds from the first round to the last.
    pub secs: f64,
    /// Rounds run.
    pub rounds: usize,
    /// Versions received.
    pub received: usize,
    /// Received versions that changed the receiver.
    #[serde(default)]
    pub applied: usize,
    /// Versions sent (by a pushing child).
    #[serde(default)]
    pub shipped: usize,
    /// Encoded request bytes (receiver to sender).
    pub bytes_sent: u64,
    /// Encoded response bytes (sender to receiver).
    pub bytes_received: u64,
    /// Blob bytes moved.
    pub blob_bytes: u64,
    /// Blobs fetched.
    pub blob_fetches: u64,
    /// The child's peak RSS (both nodes) when the sync ended, in bytes.
    pub peak_rss: u64,
    /// CPU seconds (user + system) the child used during the sync.
    pub cpu_secs: f64,
    /// Bytes the child wrote (write calls, both nodes) during the sync.
    pub written: u64,
    /// Records of the bench scope that are Resident on the receiver afterwards.
    pub resident: usize,
}

/// The child's entry point (arguments after `--role`).
pub fn main(args: &[String]) -> ExitCode {
    let long_running = match args.first().map(String::as_str) {
        Some("serve-http") => Some(crate::served::serve_http(&args[1..])),
        Some("relay") => Some(crate::served::relay(&args[1..])),
        _ => None,
    };
    if let Some(ended) = long_running {
        return match ended {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("e2e child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match role(args) {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(json) => {
                println!("RESULT {json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("e2e child: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("e2e child: {e}");
            ExitCode::FAILURE
        }
    }
}

fn role(args: &[String]) -> Result<PullReport> {
    match args {
        [role, f, from, i, into] if role == "pull" && f == "--from" && i == "--into" => {
            pull_into(Path::new(from), Path::new(into))
        }
        [role, u, url, i, into] if role == "pull-http" && u == "--url" && i == "--into" => {
            sync_http(url, Path::new(into))
        }
        [role, u, url, f, from] if role == "push-http" && u == "--url" && f == "--from" => {
            sync_http(url, Path::new(from))
        }
        _ => Err(format!("bad child arguments {args:?}").into()),
    }
}

/// The value of the variable `name`, parsed, if it is set.
fn tuning<T: std::str::FromStr>(name: &str) -> Result<Option<T>>
where
    T::Err: std::error::Error + 'static,
{
    match std::env::var(name) {
        Ok(v) => Ok(Some(v.parse::<T>()?)),
        Err(_) => Ok(None),
    }
}

/// The engine settings and round options the tuning variables ask for.
fn tuned() -> Result<(EngineConfig, ExchangeOptions)> {
    let mut config = EngineConfig::default();
    if let Some(v) = tuning("HIGHWATER_BENCH_CHECKPOINT_VERSIONS")? {
        config.checkpoint.versions = v;
    }
    if let Some(s) = tuning("HIGHWATER_BENCH_CHECKPOINT_SECS")? {
        config.checkpoint.interval = Duration::from_secs_f64(s);
    }
    if let Some(mib) = tuning::<usize>("HIGHWATER_BENCH_CACHE_MIB")? {
        config.cache_bytes = mib << 20;
    }
    let options = ExchangeOptions {
        page_limit: tuning("HIGHWATER_BENCH_PAGE_LIMIT")?,
        ..ExchangeOptions::default()
    };
    Ok((config, options))
}

/// CPU seconds and bytes written since `before` (zero where /proc does not say).
fn usage_since(before: (Option<f64>, Option<u64>)) -> (f64, u64) {
    let cpu = measure::cpu_secs_since(before.0);
    let written = match (before.1, measure::bytes_written()) {
        (Some(b), Some(a)) => a - b,
        _ => 0,
    };
    (cpu, written)
}

fn pull_into(from: &Path, into: &Path) -> Result<PullReport> {
    let (config, options) = tuned()?;
    let a = Arc::new(SyncEngine::open_with(from, config.clone())?);
    let b = SyncEngine::open_with(into, config)?;
    let link = InProcess::new(a.clone());
    let before = (measure::cpu_secs(), measure::bytes_written());
    let (pulled, secs) = measure::timed(|| pull_with(&b, &link, &options));
    let pulled = pulled?;
    let (cpu_secs, written) = usage_since(before);
    let peak_rss = measure::peak_rss().ok_or("no VmHWM in /proc/self/status")?;
    if a.digest()? != b.digest()? {
        return Err("receiver digest differs from sender digest".into());
    }
    if a.watermarks()? != b.watermarks()? {
        return Err("receiver watermarks differ from sender watermarks".into());
    }
    let counts = b.residency_counts(&scope())?;
    if counts.staged != 0 {
        return Err(format!("{} records still staged after the sync", counts.staged).into());
    }
    let stats = link.stats();
    Ok(PullReport {
        secs,
        rounds: pulled.rounds,
        received: pulled.received,
        applied: pulled.applied,
        shipped: pulled.shipped,
        bytes_sent: stats.bytes_sent,
        bytes_received: stats.bytes_received,
        blob_bytes: stats.blob_bytes,
        blob_fetches: stats.blob_fetches,
        peak_rss,
        cpu_secs,
        written,
        resident: counts.resident,
    })
}

/// Runs rounds from the node in `dir` with the node served at `url` until neither side
/// has more, over HTTP on a current-thread runtime: a pull into a new node (`pull-http`),
/// or a push from a full one (`push-http`, streamed pushes). Reports this side's usage; the
/// parent checks the states (it holds the sender of a pull, the receiver's directory of a
/// push).
fn sync_http(url: &str, dir: &Path) -> Result<PullReport> {
    let (config, options) = tuned()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let b = SyncEngine::open_with(dir, config)?;
    let before = (measure::cpu_secs(), measure::bytes_written());
    let (synced, secs) = measure::timed(|| {
        rt.block_on(async {
            let link = HttpTransport::new(url, None)?;
            pull_async(&b, &link, &options).await
        })
    });
    let synced = synced?;
    let (cpu_secs, written) = usage_since(before);
    let peak_rss = measure::peak_rss().ok_or("no VmHWM in /proc/self/status")?;
    let counts = b.residency_counts(&scope())?;
    if counts.staged != 0 {
        return Err(format!("{} records still staged after the sync", counts.staged).into());
    }
    b.flush()?;
    Ok(PullReport {
        secs,
        rounds: synced.rounds,
        received: synced.received,
        applied: synced.applied,
        shipped: synced.shipped,
        bytes_sent: 0,
        bytes_received: 0,
        blob_bytes: 0,
        blob_fetches: 0,
        peak_rss,
        cpu_secs,
        written,
        resident: counts.resident,
    })
}

/// Runs a child that pulls everything from the (closed) node in `from` into a new node in
/// `into`, and returns its report.
///
/// # Errors
/// The child could not run, or failed (its stderr is passed through).
pub fn spawn_pull(from: &Path, into: &Path) -> Result<PullReport> {
    spawn(&[
        "pull".as_ref(),
        "--from".as_ref(),
        from.as_os_str(),
        "--into".as_ref(),
        into.as_os_str(),
    ])
}

/// Runs a child that pulls everything from the node served at `url` into a new node in
/// `into` over HTTP, and returns its report (without bytes on the wire: the server counts
/// them).
///
/// # Errors
/// As for [`spawn_pull`].
pub fn spawn_pull_http(url: &str, into: &Path) -> Result<PullReport> {
    spawn(&pull_http_args(url, into))
}

/// Runs a child of this binary with `args` after `--role`, and returns its report.
///
/// # Errors
/// As for [`spawn_pull`].
pub fn spawn(args: &[&std::ffi::OsStr]) -> Result<PullReport> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(ROLE_FLAG).args(args);
    run(cmd)
}

/// The arguments of a child that pulls everything from `url` into `into` over HTTP.
pub fn pull_http_args<'a>(url: &'a str, into: &'a Path) -> [&'a std::ffi::OsStr; 5] {
    [
        "pull-http".as_ref(),
        "--url".as_ref(),
        url.as_ref(),
        "--into".as_ref(),
        into.as_os_str(),
    ]
}

/// The arguments of a child that pushes everything the node in `from` holds to `url` over
/// HTTP.
pub fn push_http_args<'a>(url: &'a str, from: &'a Path) -> [&'a std::ffi::OsStr; 5] {
    [
        "push-http".as_ref(),
        "--url".as_ref(),
        url.as_ref(),
        "--from".as_ref(),
        from.as_os_str(),
    ]
}

/// Runs `cmd`, a sync child, and returns its report.
///
/// # Errors
/// As for [`spawn_pull`].
pub fn run(mut cmd: Command) -> Result<PullReport> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        return Err(format!("the sync child failed ({})", out.status).into());
    }
    let stdout = String::from_utf8(out.stdout)?;
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or("the sync child printed no RESULT line")?;
    Ok(serde_json::from_str(json)?)
}
