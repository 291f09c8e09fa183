//! Syncs in a child process, so the peak RSS measured is the sync's own: the bench re-runs
//! itself as `e2e --role pull --from DIR --into DIR`. The child opens both redb nodes, pulls
//! everything from `from` into `into` over the in-process transport, reads its peak RSS,
//! then checks that both nodes hold the same state, and prints one `RESULT {json}` line.
//! Any failed check exits non-zero.
//!
//! For tuning, the child reads three variables (unset: the engine's defaults):
//! `HIGHWATER_BENCH_PAGE_LIMIT` (versions per page the receiver asks for),
//! `HIGHWATER_BENCH_CHECKPOINT_VERSIONS` and `HIGHWATER_BENCH_CHECKPOINT_SECS` (when deferred
//! page applies are made durable).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use std::time::Duration;

use highwater::{EngineConfig, ExchangeOptions, InProcess, SyncEngine};
use serde::{Deserialize, Serialize};

use crate::fixture::{pull_with, scope};
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

fn pull_into(from: &Path, into: &Path) -> Result<PullReport> {
    let mut config = EngineConfig::default();
    if let Some(v) = tuning("HIGHWATER_BENCH_CHECKPOINT_VERSIONS")? {
        config.checkpoint.versions = v;
    }
    if let Some(s) = tuning("HIGHWATER_BENCH_CHECKPOINT_SECS")? {
        config.checkpoint.interval = Duration::from_secs_f64(s);
    }
    let options = ExchangeOptions {
        page_limit: tuning("HIGHWATER_BENCH_PAGE_LIMIT")?,
        ..ExchangeOptions::default()
    };
    let a = Arc::new(SyncEngine::open_with(from, config.clone())?);
    let b = SyncEngine::open_with(into, config)?;
    let link = InProcess::new(a.clone());
    let (cpu_before, written_before) = (measure::cpu_secs(), measure::bytes_written());
    let (pulled, secs) = measure::timed(|| pull_with(&b, &link, &options));
    let pulled = pulled?;
    let cpu_secs = match (cpu_before, measure::cpu_secs()) {
        (Some(b), Some(a)) => a - b,
        _ => 0.0,
    };
    let written = match (written_before, measure::bytes_written()) {
        (Some(b), Some(a)) => a - b,
        _ => 0,
    };
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

/// Runs a child that pulls everything from the (closed) node in `from` into a new node in
/// `into`, and returns its report.
///
/// # Errors
/// The child could not run, or failed (its stderr is passed through).
pub fn spawn_pull(from: &Path, into: &PathBuf) -> Result<PullReport> {
    let out = Command::new(std::env::current_exe()?)
        .arg(ROLE_FLAG)
        .arg("pull")
        .arg("--from")
        .arg(from)
        .arg("--into")
        .arg(into)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
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
