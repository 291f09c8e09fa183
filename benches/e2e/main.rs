//! End-to-end benchmark of highwater: record and blob sync between redb nodes, no-op and
//! delta rounds, the audit round, write-to-visible latency, the limits the figures are compared with (redb
//! bulk insert, postcard, blake3, disk writes, raw loopback HTTP with hyper), and the
//! automerge peer (`bench-peer/`), all in one run on the same generated records.
//!
//! ```text
//! cargo bench --bench e2e -- [--quick] [--case NAME]... [--records N] [--runs N]
//!     [--automerge BIN] [--wan-delay-ms MS] [--wan-rate BYTES_PER_SEC]
//! ```
//!
//! `--quick` uses small sizes (CI runs it so the harness keeps working); without it the
//! full sizes of docs/performance.md run (several minutes). The run prints the machine, the
//! sizes and a markdown table: each figure's median over its runs, its range, its ratio to
//! the limit or figure it is compared with, and the issue's target (judged at full sizes).
//! It exits non-zero if any case failed, including its sanity checks (a receiver whose
//! digest differs from the sender's, a no-op round that moved versions, ...).
//!
//! Peak RSS figures of a sync come from a child process (this binary re-run with a hidden
//! `--role`) that holds both in-process nodes, so its `VmHWM` is the sync's own.
//! The HTTP cases (`http.rs`) serve the sender from this process and pull into a child, so
//! their peak RSS is the receiving process's alone.
//!
//! Cases: see [`Case`].

mod audit;
mod blobs;
mod child;
mod fixture;
mod http;
#[cfg(feature = "postgres")]
mod hub;
#[cfg(feature = "postgres")]
mod hubproc;
mod limits;
mod measure;
mod peer;
mod purge;
mod rawhttp;
mod records;
mod relay;
mod report;
mod served;
mod sync;
mod topology;
mod visible;
mod wan;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::fixture::Fixture;
use crate::report::Row;

/// What a case returns: its rows, or why it failed.
pub type Result<T = Vec<Row>> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The cases, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// redb bulk insert, postcard, blake3, disk writes, raw loopback HTTP.
    Limits,
    /// Initial sync of every record, redb to redb, in-process (receiver RSS in a child).
    Initial,
    /// The same over loopback HTTP (receiver in a child).
    InitialHttp,
    /// The initial sync and a 100-update delta across a delaying relay (50 ms round trip),
    /// against the same without the relay: between two network namespaces as root, on
    /// loopback otherwise.
    Wan,
    /// 100 updated records into stores of two sizes; a no-op round at each size.
    Delta,
    /// A no-op round with 2, 10 and 100 origins.
    Noop,
    /// The audit round between a node of every record and its replica: equal, then 100 keys
    /// differing.
    Audit,
    /// Tombstone purge: a node after every record was put and deleted, and a hub of retired
    /// devices.
    Purge,
    /// Blob sync in-process, in small and in large files.
    Blob,
    /// The same over loopback HTTP (receiver in a child).
    BlobHttp,
    /// Write-to-visible latency through a hub, in-process, with watch.
    Visible,
    /// The same over loopback HTTP, with the devices' schedulers.
    VisibleHttp,
    /// The automerge peer on the same records.
    Automerge,
    /// Hub processes over PostgreSQL against a redb hub (issue 17): rounds per second served
    /// to many devices and CPU per round, one and two processes; the initial sync from each.
    /// Skips without `HIGHWATER_PG_URL`.
    Hub,
}

/// Latency cases run before the blob cases: deleting a few GiB of blob directories slowed
/// the fsyncs that follow for a while (write-to-visible p99 went from 2 ms to 33 ms). The
/// hub case runs last: it loads both cores with hub processes and PostgreSQL.
const ALL: [Case; 14] = [
    Case::Limits,
    Case::Initial,
    Case::InitialHttp,
    Case::Wan,
    Case::Delta,
    Case::Noop,
    Case::Audit,
    Case::Purge,
    Case::Visible,
    Case::VisibleHttp,
    Case::Blob,
    Case::BlobHttp,
    Case::Automerge,
    Case::Hub,
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Limits => "limits",
            Case::Initial => "initial",
            Case::InitialHttp => "initial-http",
            Case::Wan => "wan",
            Case::Delta => "delta",
            Case::Noop => "noop",
            Case::Audit => "audit",
            Case::Purge => "purge",
            Case::Blob => "blob",
            Case::BlobHttp => "blob-http",
            Case::Visible => "visible",
            Case::VisibleHttp => "visible-http",
            Case::Automerge => "automerge",
            Case::Hub => "hub",
        }
    }

    fn run(self, fx: &mut Fixture) -> Result {
        match self {
            Case::Limits => limits::run(fx),
            Case::Initial => sync::initial(fx),
            Case::InitialHttp => http::initial(fx),
            Case::Wan => wan::run(fx),
            Case::Delta => sync::delta(fx),
            Case::Noop => sync::noop(fx),
            Case::Audit => audit::run(fx),
            Case::Purge => purge::run(fx),
            Case::Blob => blobs::run(fx),
            Case::BlobHttp => http::blobs(fx),
            Case::Visible => visible::run(fx),
            Case::VisibleHttp => http::visible(fx),
            Case::Automerge => peer::run(fx),
            #[cfg(feature = "postgres")]
            Case::Hub => hub::run(fx),
            #[cfg(not(feature = "postgres"))]
            Case::Hub => {
                eprintln!("e2e: note: built without the `postgres` feature: the hub case skips");
                Ok(Vec::new())
            }
        }
    }
}

/// The `wan` relay's delay each way unless `--wan-delay-ms` says otherwise: a 50 ms round
/// trip.
const WAN_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

/// The sizes of one run.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Small sizes: targets are not judged.
    pub quick: bool,
    /// Records of the initial sync (and of the largest delta store).
    pub records: u64,
    /// Runs of each multi-second figure (initial sync, blob sync, limits).
    pub runs: usize,
    /// Store sizes of the delta case, smallest first.
    pub delta_stores: Vec<u64>,
    /// Delta syncs per store size.
    pub delta_reps: usize,
    /// Origin counts of the no-op case.
    pub noop_origins: Vec<usize>,
    /// No-op rounds per origin count.
    pub noop_rounds: usize,
    /// Audits of each kind (equal replicas, 100 keys differing).
    pub audit_reps: usize,
    /// Bytes of files per blob case.
    pub blob_total: u64,
    /// File sizes of the blob cases.
    pub blob_files: Vec<u64>,
    /// Writes of the write-to-visible case.
    pub visible_writes: usize,
    /// Bytes of the raw HTTP stream limit.
    pub http_stream: u64,
    /// Requests of the raw HTTP round-trip limit.
    pub http_requests: usize,
    /// Runs of the automerge peer.
    pub peer_runs: usize,
    /// Records of the `wan` case's initial sync (and of its delta's store).
    pub wan_records: u64,
    /// The `wan` relay's delay, each way.
    pub wan_delay: std::time::Duration,
    /// The `wan` relay's rate cap, each way, in bytes per second (`None`: no cap).
    pub wan_rate: Option<u64>,
    /// Simulated devices of the `hub` case.
    pub hub_devices: usize,
    /// Runs of each kind of round in the `hub` case.
    pub hub_runs: usize,
    /// Records of the `hub` case's initial sync.
    pub hub_records: u64,
}

impl Sizes {
    fn new(quick: bool, records: Option<u64>) -> Sizes {
        const MIB: u64 = 1 << 20;
        let mut s = if quick {
            Sizes {
                quick,
                records: 20_000,
                runs: 3,
                delta_stores: vec![2_000, 20_000],
                delta_reps: 5,
                noop_origins: vec![2, 10, 100],
                noop_rounds: 11,
                audit_reps: 5,
                blob_total: 16 * MIB,
                blob_files: vec![MIB, 8 * MIB],
                visible_writes: 100,
                http_stream: 64 * MIB,
                http_requests: 200,
                peer_runs: 1,
                // Through the relay today's sync is round-trip bound (~16 500 records/s).
                wan_records: 5_000,
                wan_delay: WAN_DELAY,
                wan_rate: None,
                hub_devices: 100,
                hub_runs: 3,
                // Seeding PostgreSQL through write_batch runs at ~3 000 records/s here: 20 000
                // would add 7 s to CI's quick run.
                hub_records: 5_000,
            }
        } else {
            Sizes {
                quick,
                records: 1_000_000,
                runs: 3,
                delta_stores: vec![10_000, 1_000_000],
                delta_reps: 10,
                noop_origins: vec![2, 10, 100],
                noop_rounds: 21,
                audit_reps: 10,
                blob_total: 1024 * MIB,
                blob_files: vec![MIB, 256 * MIB],
                visible_writes: 1000,
                http_stream: 1024 * MIB,
                http_requests: 1000,
                peer_runs: 3,
                wan_records: 1_000_000,
                wan_delay: WAN_DELAY,
                wan_rate: None,
                hub_devices: 1000,
                hub_runs: 5,
                hub_records: 1_000_000,
            }
        };
        if let Some(n) = records {
            s.records = n;
            s.wan_records = n;
            s.hub_records = n;
            if let Some(last) = s.delta_stores.last_mut() {
                *last = n;
            }
            s.delta_stores.retain(|&d| d <= n);
            s.delta_stores.dedup();
        }
        s
    }
}

/// The parsed command line.
struct Args {
    quick: bool,
    cases: Vec<Case>,
    records: Option<u64>,
    runs: Option<usize>,
    automerge: Option<PathBuf>,
    wan_delay_ms: Option<u64>,
    wan_rate: Option<u64>,
}

const USAGE: &str = "usage: cargo bench --bench e2e -- [--quick] [--case NAME]... [--records N] \
[--runs N] [--automerge BIN] [--wan-delay-ms MS] [--wan-rate BYTES_PER_SEC]
  --quick          small sizes (CI); targets are not judged
  --case NAME      run only these cases (repeatable): limits initial initial-http wan delta
                   noop audit purge visible visible-http blob blob-http automerge hub
  --records N      records of the initial syncs (also wan's and hub's) and of the largest
                   delta store
  --runs N         runs of each multi-second figure (default 3; quick peer 1)
  --automerge BIN  the automerge peer (default: target/release/highwater-bench-automerge,
                   built with `cargo build --release -p highwater-bench-automerge`)
  --wan-delay-ms MS            the wan relay's delay each way (default 25: 50 ms round trip)
  --wan-rate BYTES_PER_SEC     a cap on the wan relay's rate each way (default: none)";

fn parse_args(raw: &[String]) -> Result<Args> {
    let mut args = Args {
        quick: false,
        cases: Vec::new(),
        records: None,
        runs: None,
        automerge: None,
        wan_delay_ms: None,
        wan_rate: None,
    };
    let mut it = raw.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--quick" => args.quick = true,
            "--case" => {
                let name = value()?;
                let case = ALL
                    .into_iter()
                    .find(|c| c.name() == name)
                    .ok_or(format!("unknown case {name:?}\n{USAGE}"))?;
                args.cases.push(case);
            }
            "--records" => args.records = Some(value()?.parse()?),
            "--runs" => args.runs = Some(value()?.parse::<usize>()?.max(1)),
            "--automerge" => args.automerge = Some(PathBuf::from(value()?)),
            "--wan-delay-ms" => args.wan_delay_ms = Some(value()?.parse()?),
            "--wan-rate" => args.wan_rate = Some(value()?.parse()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some(child::ROLE_FLAG) {
        return child::main(&raw[1..]);
    }
    match run(&raw) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the selected cases; `Ok(false)` if any failed.
fn run(raw: &[String]) -> Result<bool> {
    let args = parse_args(raw)?;
    let mut sizes = Sizes::new(args.quick, args.records);
    if let Some(runs) = args.runs {
        sizes.runs = runs;
        sizes.peer_runs = runs;
    }
    if let Some(ms) = args.wan_delay_ms {
        sizes.wan_delay = std::time::Duration::from_millis(ms);
    }
    sizes.wan_rate = args.wan_rate.or(sizes.wan_rate);
    let selected: Vec<Case> = if args.cases.is_empty() {
        ALL.to_vec()
    } else {
        ALL.into_iter().filter(|c| args.cases.contains(c)).collect()
    };
    let mut fx = Fixture::new(sizes, args.automerge)?;
    print_header(&fx.sizes);
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for case in selected {
        // Each case starts without the dirty pages of the one before (best effort):
        // their write-back slowed the fsyncs of latency cases.
        let _ = std::process::Command::new("sync").status();
        eprintln!("e2e: case {} ...", case.name());
        let (result, secs) = measure::timed(|| case.run(&mut fx));
        match result {
            Ok(r) => {
                eprintln!("e2e: case {} done in {secs:.1} s", case.name());
                rows.extend(r);
            }
            Err(e) => {
                eprintln!("e2e: case {} FAILED: {e}", case.name());
                failed.push(format!("{}: {e}", case.name()));
            }
        }
    }
    println!();
    report::print_table(&rows, !fx.sizes.quick);
    for f in &failed {
        println!("\nFAILED {f}");
    }
    Ok(failed.is_empty())
}

fn print_header(sizes: &Sizes) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("# highwater e2e benchmark");
    println!();
    println!("- machine: {cores} cores, {cpu}");
    println!("- date (UTC): {}", fixture::today());
    println!(
        "- sizes: {}{} records of {} + {} bytes; runs {}",
        if sizes.quick { "quick, " } else { "" },
        sizes.records,
        records::KEY_LEN,
        records::VALUE_LEN,
        sizes.runs
    );
}
