//! Record sync between redb nodes over the in-process transport: the initial sync, deltas
//! into stores of two sizes, and no-op rounds with many origins.

use std::sync::Arc;

use futures_executor::block_on;
use highwater::{InProcess, Key, SyncEngine};

use crate::child::spawn_pull;
use crate::fixture::{pull, put, scope, Fixture};
use crate::measure::{self, Summary};
use crate::records::{self, DELTA_UPDATES};
use crate::report::{count, Bound, Row, Unit};
use crate::Result;

/// The targets (on a 2-core machine). They are stated for HTTP; the in-process
/// figures are judged against them too, as the bound HTTP can at best reach.
const TARGET_RECORDS_PER_SEC: f64 = 200_000.0;
const TARGET_SHARE_OF_REDB: f64 = 0.70;
const TARGET_PEAK_RSS: f64 = 256.0 * 1024.0 * 1024.0;
const TARGET_DELTA_SECS: f64 = 0.005;
const TARGET_DELTA_RATIO: f64 = 1.5;
const TARGET_NOOP_BYTES: f64 = 100.0;

/// Initial sync: every record from a redb node to an empty one, pulled by the receiver
/// in a child process (its peak RSS holds both nodes), `runs` times into fresh receivers.
pub fn initial(fx: &mut Fixture) -> Result {
    let n = fx.sizes.records;
    let (from, write_secs) = fx.sender(n)?;
    let mut reports = Vec::new();
    for _ in 0..fx.sizes.runs {
        let into = fx.fresh_dir("initial");
        let report = spawn_pull(&from, &into)?;
        if report.received as u64 != n || report.resident as u64 != n {
            return Err(format!(
                "initial sync received {} versions and holds {} records, expected {n}",
                report.received, report.resident
            )
            .into());
        }
        if reports.is_empty() {
            fx.keep_replica(n, into);
        } else {
            std::fs::remove_dir_all(&into)?;
        }
        reports.push(report);
    }
    let case = format!("initial sync, in-process, {} records", count(n));
    let of = |f: fn(&crate::child::PullReport) -> f64| {
        Summary::of(&reports.iter().map(f).collect::<Vec<_>>())
    };
    let rate = of(|r| r.received as f64 / r.secs);
    Ok(vec![
        Row::new(
            format!("local write_batch, {} records", count(n)),
            "records/s (10 000 per durable batch)",
            Unit::RecordsPerSec,
            Summary::one(n as f64 / write_secs),
        )
        .versus("redb bulk insert"),
        Row::new(&case, "records/s", Unit::RecordsPerSec, rate)
            .key("highwater initial rate")
            .versus("redb bulk insert")
            .target(Bound::AtLeast(TARGET_RECORDS_PER_SEC))
            .target(Bound::RatioAtLeast(TARGET_SHARE_OF_REDB)),
        Row::new(&case, "time", Unit::Secs, of(|r| r.secs)).key("highwater initial time"),
        Row::new(&case, "rounds", Unit::Count, of(|r| r.rounds as f64)),
        Row::new(
            &case,
            "CPU time of the sync process",
            Unit::Secs,
            of(|r| r.cpu_secs),
        ),
        Row::new(
            &case,
            "bytes written by the sync process, per record",
            Unit::Count,
            of(|r| r.written as f64 / r.received as f64),
        ),
        Row::new(
            &case,
            "bytes on the wire (both ways)",
            Unit::Bytes,
            of(|r| (r.bytes_sent + r.bytes_received) as f64),
        )
        .key("highwater initial bytes"),
        Row::new(
            &case,
            "peak RSS of the sync process (both nodes)",
            Unit::MiB,
            of(|r| r.peak_rss as f64),
        )
        .key("highwater initial RSS")
        .target(Bound::AtMost(TARGET_PEAK_RSS)),
    ])
}

/// Delta sync: 100 records updated on a node of each size, pulled by its replica; then a
/// no-op round at that size (cost must follow the changes, not the store).
pub fn delta(fx: &mut Fixture) -> Result {
    let stores = fx.sizes.delta_stores.clone();
    let mut rows = Vec::new();
    let mut per_round = Vec::new();
    for (i, &n) in stores.iter().enumerate() {
        let largest = i + 1 == stores.len();
        let (from, _) = fx.sender(n)?;
        let into = fx.replica(n)?;
        let a = Arc::new(SyncEngine::open(&from)?);
        let b = SyncEngine::open(&into)?;
        let link = InProcess::new(a.clone());
        let scope = scope();
        let updated = records::updated(n, DELTA_UPDATES);
        let (mut secs, mut rounds, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
        let mut written = Vec::new();
        for _ in 0..fx.sizes.delta_reps {
            fx.generation += 1;
            let generation = fx.generation;
            a.write_batch(
                updated
                    .iter()
                    .map(|&j| put(&scope, &records::key(j), &records::value(j, generation))),
            )?;
            let before = link.stats();
            let written_before = measure::bytes_written().unwrap_or(0);
            let (pulled, took) = measure::timed(|| pull(&b, &link));
            let pulled = pulled?;
            let after = link.stats();
            written.push((measure::bytes_written().unwrap_or(0) - written_before) as f64);
            if pulled.received != DELTA_UPDATES || pulled.applied != DELTA_UPDATES {
                return Err(format!(
                    "delta at {n}: received {} and applied {} versions, expected {DELTA_UPDATES}",
                    pulled.received, pulled.applied
                )
                .into());
            }
            let probe = updated[0];
            let got = b.get(&scope, &Key::new(records::key(probe).to_vec())?)?;
            if got.map(|r| r.value) != Some(records::value(probe, generation).to_vec()) {
                return Err(format!("delta at {n}: an updated record did not arrive").into());
            }
            secs.push(took / pulled.rounds as f64);
            rounds.push(pulled.rounds as f64);
            bytes.push(
                (after.bytes_sent - before.bytes_sent + after.bytes_received
                    - before.bytes_received) as f64,
            );
        }
        let (noop_secs, noop_bytes) = noop_rounds(&b, &link, fx.sizes.noop_rounds)?;
        if a.digest()? != b.digest()? {
            return Err(format!("delta at {n}: digests differ after the deltas").into());
        }
        let case = format!("delta, 100 updates, store of {} records", count(n));
        let time = Summary::of(&secs);
        per_round.push(time.median);
        let mut time_row = Row::new(&case, "time per round", Unit::Millis, time);
        let mut bytes_row = Row::new(&case, "bytes (both ways)", Unit::Bytes, Summary::of(&bytes));
        let noop_case = format!("no-op round, store of {} records, 1 origin", count(n));
        let mut noop_time = Row::new(&noop_case, "time", Unit::Millis, Summary::of(&noop_secs));
        let mut noop_b = Row::new(
            &noop_case,
            "bytes (both ways)",
            Unit::Bytes,
            Summary::of(&noop_bytes),
        )
        .target(Bound::AtMost(TARGET_NOOP_BYTES));
        if largest {
            time_row = time_row
                .key("highwater delta time")
                .target(Bound::AtMost(TARGET_DELTA_SECS));
            bytes_row = bytes_row.key("highwater delta bytes");
            noop_time = noop_time.key("highwater no-op time");
            noop_b = noop_b.key("highwater no-op bytes");
        }
        rows.push(time_row);
        rows.push(Row::new(&case, "rounds", Unit::Count, Summary::of(&rounds)));
        rows.push(bytes_row);
        rows.push(Row::new(
            &case,
            "bytes written to disk (both nodes)",
            Unit::Bytes,
            Summary::of(&written),
        ));
        rows.push(noop_time);
        rows.push(noop_b);
    }
    if let (Some(first), Some(last)) = (per_round.first(), per_round.last()) {
        if stores.len() > 1 {
            rows.push(
                Row::new(
                    format!(
                        "delta, time per round, {} / {} records",
                        count(stores[stores.len() - 1]),
                        count(stores[0])
                    ),
                    "ratio",
                    Unit::Ratio,
                    Summary::one(last / first),
                )
                .target(Bound::AtMost(TARGET_DELTA_RATIO)),
            );
        }
    }
    Ok(rows)
}

/// Runs `rounds` rounds that must move nothing; their seconds and bytes (both ways).
fn noop_rounds(
    node: &SyncEngine,
    link: &InProcess<Arc<SyncEngine>>,
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut secs, mut bytes) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let before = link.stats();
        let (out, took) = measure::timed(|| block_on(node.exchange(link)));
        let out = out?;
        let after = link.stats();
        if out.shipped + out.received + out.applied != 0 || out.has_more {
            return Err(format!("a no-op round moved versions: {out:?}").into());
        }
        secs.push(took);
        bytes.push(
            (after.bytes_sent - before.bytes_sent + after.bytes_received - before.bytes_received)
                as f64,
        );
    }
    Ok((secs, bytes))
}

/// No-op rounds between a node and a hub that hold writes of 2, 10 and 100 origins.
pub fn noop(fx: &mut Fixture) -> Result {
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    let origins_list = fx.sizes.noop_origins.clone();
    for &origins in &origins_list {
        let hub = Arc::new(SyncEngine::open(fx.fresh_dir("noop-hub"))?);
        let node = SyncEngine::open(fx.fresh_dir("noop-node"))?;
        let to_hub = InProcess::new(hub.clone());
        let scope = scope();
        for o in 0..origins {
            let writer = SyncEngine::in_memory()?;
            writer.write_batch((0..5u64).map(|j| {
                let i = (o as u64) * 5 + j;
                put(&scope, &records::key(i), &records::value(i, 0))
            }))?;
            pull(&writer, &to_hub)?;
        }
        pull(&node, &to_hub)?;
        if node.digest()? != hub.digest()? || node.watermarks()? != hub.watermarks()? {
            return Err(format!("no-op setup with {origins} origins did not converge").into());
        }
        let marks = hub.watermarks()?.mark_count();
        if marks != origins {
            return Err(format!("the hub holds {marks} marks, expected {origins}").into());
        }
        let (secs, bytes) = noop_rounds(&node, &to_hub, fx.sizes.noop_rounds)?;
        let case = format!("no-op round, {origins} origins");
        let b = Summary::of(&bytes);
        medians.push(b.median);
        rows.push(
            Row::new(&case, "bytes (both ways)", Unit::Bytes, b)
                .target(Bound::AtMost(TARGET_NOOP_BYTES)),
        );
        rows.push(Row::new(&case, "time", Unit::Millis, Summary::of(&secs)));
    }
    if let (Some(first), Some(last)) = (medians.first(), medians.last()) {
        rows.push(
            Row::new(
                format!(
                    "no-op round, bytes at {} / {} origins",
                    origins_list[origins_list.len() - 1],
                    origins_list[0]
                ),
                "ratio (not growing: ≤ 1)",
                Unit::Ratio,
                Summary::one(last / first),
            )
            .target(Bound::AtMost(1.0)),
        );
    }
    Ok(rows)
}
