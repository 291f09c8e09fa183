//! Forgetting (issue 16): a redb node that put and then deleted every record, before and
//! after the purge (file size, stored versions, purge throughput), the same node after a
//! second cycle of other records (the file stays the same size: redb reuses the freed
//! pages), and a hub's marks after devices that each wrote and deleted one record were
//! retired.
//!
//! The nodes run on a manual clock, so a month passes in an instant: the figures are the
//! purge's own work, not the wait for the retention.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use highwater::engine::DB_FILE;
use highwater::{EngineConfig, InProcess, ManualTime, Op, PurgeReport, SyncEngine};

use crate::fixture::{pull, put, scope, Fixture, WRITE_BATCH};
use crate::measure::{self, Summary};
use crate::records;
use crate::report::{count, Row, Unit};
use crate::Result;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn config(time: &Arc<ManualTime>) -> EngineConfig {
    EngineConfig {
        time: time.clone(),
        ..EngineConfig::default()
    }
}

fn file_size(dir: &Path) -> Result<f64> {
    Ok(std::fs::metadata(dir.join(DB_FILE))?.len() as f64)
}

/// Purges until nothing is left to look at; returns the totals.
fn purge_all(node: &SyncEngine) -> Result<PurgeReport> {
    let mut total = PurgeReport::default();
    loop {
        let r = node.purge()?;
        total.purged += r.purged;
        total.scanned += r.scanned;
        total.retired_peers.extend(r.retired_peers);
        total.retired_origins.extend(r.retired_origins);
        if !r.more {
            return Ok(total);
        }
    }
}

/// Puts then deletes records `first..first + n` (in the write batches the other cases use).
fn put_and_delete(node: &SyncEngine, first: u64, n: u64) -> Result<()> {
    let scope = scope();
    let ids: Vec<u64> = (first..first + n).collect();
    for chunk in ids.chunks(WRITE_BATCH) {
        node.write_batch(
            chunk
                .iter()
                .map(|&i| put(&scope, &records::key(i), &records::value(i, 0))),
        )?;
    }
    for chunk in ids.chunks(WRITE_BATCH) {
        node.write_batch(chunk.iter().map(|&i| {
            (
                scope.clone(),
                highwater::Key::new(records::key(i).to_vec()).expect("a valid key"),
                Op::Delete,
            )
        }))?;
    }
    node.flush()?;
    Ok(())
}

/// Checks: every tombstone is purged, no stored version is left, the file after the fourth
/// cycle is no larger than 1.25 times after the second, and the hub keeps only the keeper's
/// mark.
pub fn run(fx: &mut Fixture) -> Result {
    let n = fx.sizes.records;
    let time = ManualTime::at_secs(1_700_000_000);
    let dir = fx.fresh_dir("purge");
    let node = SyncEngine::open_with(&dir, config(&time))?;
    put_and_delete(&node, 0, n)?;
    let before_size = file_size(&dir)?;
    let before_versions = node.versions(&scope())?.len() as f64;

    time.advance(31 * DAY);
    let (report, secs) = measure::timed(|| purge_all(&node));
    let report = report?;
    node.flush()?;
    if report.purged as u64 != n {
        return Err(format!("purge removed {} of {n} tombstones", report.purged).into());
    }
    let after_versions = node.versions(&scope())?.len() as f64;
    if after_versions != 0.0 {
        return Err(format!("{after_versions} versions left after the purge").into());
    }
    let after_size = file_size(&dir)?;

    // Three more months of other records, each put, deleted and purged: the pages the
    // purges freed are reused, so the file stops growing.
    let mut sizes = vec![after_size];
    for cycle in 1..4 {
        put_and_delete(&node, cycle * n, n)?;
        time.advance(31 * DAY);
        purge_all(&node)?;
        node.flush()?;
        sizes.push(file_size(&dir)?);
    }
    let second_size = sizes[1];
    let last_size = sizes[3];
    if last_size > second_size * 1.25 {
        return Err(format!("the file kept growing over purged cycles: {sizes:?} bytes").into());
    }
    drop(node);

    // A hub and devices that each wrote and deleted one record, then went away for good;
    // one device (the keeper) stays.
    let devices = if fx.sizes.quick { 200 } else { 10_000 };
    let hub_dir = fx.fresh_dir("purge-hub");
    let hub = Arc::new(SyncEngine::open_with(&hub_dir, config(&time))?);
    // Each device syncs its own table: in one shared table every device would also pull
    // every earlier device's tombstone and the hub would keep each device's knowledge of
    // every earlier origin (quadratic in the fleet, which is what retirement ends, but a
    // benchmark of 10 000 devices would then measure that set-up for an hour).
    for i in 0..devices {
        let device = SyncEngine::in_memory_with(config(&time))?;
        let table = highwater::Scope::app("fleet", &format!("d{i}"))?;
        let only = highwater::ExchangeOptions {
            scopes: highwater::ScopeFilter::Only([table.clone()].into_iter().collect()),
            ..highwater::ExchangeOptions::default()
        };
        let key = highwater::Key::new(b"k".to_vec())?;
        device.put(&table, &key, b"v".to_vec())?;
        device.delete(&table, &key)?;
        crate::fixture::pull_with(&device, &InProcess::new(hub.clone()), &only)?;
    }
    let scope = scope();
    let keeper = SyncEngine::in_memory_with(config(&time))?;
    keeper.put(
        &scope,
        &highwater::Key::new(b"kept".to_vec())?,
        b"v".to_vec(),
    )?;
    pull(&keeper, &InProcess::new(hub.clone()))?;
    hub.flush()?;
    let marks_before = hub.watermarks()?.mark_count() as f64;
    let hub_size_before = file_size(&hub_dir)?;
    for _ in 0..4 {
        time.advance(30 * DAY);
        pull(&keeper, &InProcess::new(hub.clone()))?;
    }
    let (hub_report, hub_secs) = measure::timed(|| purge_all(&hub));
    let hub_report = hub_report?;
    hub.flush()?;
    let marks_after = hub.watermarks()?.mark_count() as f64;
    if hub_report.retired_peers.len() != devices || marks_after != 1.0 {
        return Err(format!(
            "hub: retired {} of {devices} devices, {marks_after} marks left",
            hub_report.retired_peers.len()
        )
        .into());
    }
    let hub_size_after = file_size(&hub_dir)?;

    let case = format!("purge, redb, {} puts then deletes", count(n));
    let hub_case = format!("purge, hub of {} retired devices", count(devices as u64));
    let one = Summary::one;
    Ok(vec![
        Row::new(
            &case,
            "file size before the purge",
            Unit::MiB,
            one(before_size),
        ),
        Row::new(
            &case,
            "stored versions before",
            Unit::Count,
            one(before_versions),
        ),
        Row::new(&case, "purge time", Unit::Secs, one(secs)),
        Row::new(
            &case,
            "purge throughput (tombstones)",
            Unit::RecordsPerSec,
            one(n as f64 / secs),
        ),
        Row::new(
            &case,
            "file size after the purge",
            Unit::MiB,
            one(after_size),
        ),
        Row::new(
            &case,
            "stored versions after",
            Unit::Count,
            one(after_versions),
        ),
        Row::new(
            &case,
            "file size after a second purged cycle",
            Unit::MiB,
            one(second_size),
        ),
        Row::new(
            &case,
            "file size after a fourth purged cycle",
            Unit::MiB,
            one(last_size),
        ),
        Row::new(&hub_case, "marks before", Unit::Count, one(marks_before)),
        Row::new(
            &hub_case,
            "marks after the purge",
            Unit::Count,
            one(marks_after),
        ),
        Row::new(
            &hub_case,
            "file size before",
            Unit::MiB,
            one(hub_size_before),
        ),
        Row::new(&hub_case, "file size after", Unit::MiB, one(hub_size_after)),
        Row::new(&hub_case, "purge time", Unit::Secs, one(hub_secs)),
    ])
}
