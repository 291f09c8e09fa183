//! The database restarting under load: two hub processes on one schema, a device pushing
//! 20 000 records through them while the PostgreSQL server restarts. Rounds fail during
//! the restart and are retried; afterwards the device's push completes, a fresh device
//! pulls exactly what was pushed, and both hub processes are still serving.
//!
//! It restarts the whole server, which would break other tests running against it at the
//! same moment, so it runs only when asked: `HIGHWATER_PG_RESTART=1` (with
//! `HIGHWATER_PG_URL`, as root on a machine whose cluster `pg_ctlcluster` manages):
//!
//! ```text
//! HIGHWATER_PG_URL=postgres://root@127.0.0.1:5432/test HIGHWATER_PG_RESTART=1 \
//!     cargo test --test pg_restart -- --nocapture
//! ```

mod common;
#[path = "common/process.rs"]
mod process;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{write_bulk, Schema, URL_VAR};
use highwater::http::HttpTransport;
use highwater::{ExchangeOptions, Scope, SyncEngine};
use process::{ServeProcess, TestResult};

const RECORDS: usize = 20_000;

fn restart_server() -> TestResult {
    let versions = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect::<Vec<_>>();
    for version in versions {
        let status = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main", "restart"])
            .status()?;
        if !status.success() {
            return Err(format!("pg_ctlcluster {version} main restart: {status}").into());
        }
    }
    Ok(())
}

#[test]
fn a_database_restart_under_load_fails_rounds_and_corrupts_nothing() -> TestResult {
    if std::env::var("HIGHWATER_PG_RESTART").is_err() {
        eprintln!("note: HIGHWATER_PG_RESTART is not set: the database restart test skips");
        return Ok(());
    }
    let Some(schema) = Schema::fresh("a_database_restart_under_load")? else {
        return Ok(());
    };
    let url = std::env::var(URL_VAR)?;
    let dir = tempfile::tempdir()?;
    let blobs = dir.path().join("blobs");
    let hub = |name: &str| {
        ServeProcess::start(
            &dir.path().join(name),
            &[
                "--store",
                &url,
                "--store-schema",
                schema.name(),
                "--blobs",
                process::arg(&blobs),
                "--interval",
                "1h",
            ],
        )
    };
    let (p1, p2) = (hub("p1")?, hub("p2")?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bulk = Scope::app("restart", "bulk")?;
    let device = Arc::new(SyncEngine::in_memory()?);
    write_bulk(&device, &bulk, RECORDS, |i| format!("value {i}"))?;
    let hubs = [
        HttpTransport::new(&p1.url, None)?,
        HttpTransport::new(&p2.url, None)?,
    ];
    let small = ExchangeOptions {
        page_limit: Some(200),
        ..ExchangeOptions::default()
    };
    let pushing = {
        let (device, small) = (device.clone(), small.clone());
        rt.spawn(async move {
            let (mut failures, mut at) = (0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(300);
            while Instant::now() < deadline {
                // Alternate processes on failure, as a load balancer would.
                match device.exchange_with(&hubs[at % 2], &small).await {
                    Ok(out) if !out.has_more => return Ok(failures),
                    Ok(_) => {}
                    Err(e) => {
                        failures += 1;
                        at += 1;
                        if failures % 20 == 1 {
                            eprintln!("round failed ({failures} so far): {e}");
                        }
                        // The scheduler's retry backoff, in short.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            Err(format!(
                "the push did not finish in 300 s ({failures} failed rounds)"
            ))
        })
    };
    // Restart once a fifth of the records are in.
    let mut db = schema.client()?;
    loop {
        let held = schema.keys_held(&mut db, &bulk)?;
        if held >= (RECORDS / 5) as i64 {
            eprintln!("restarting the database with {held} records in");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(db);
    restart_server()?;
    let failures = rt.block_on(pushing)??;
    eprintln!("the push finished after {failures} failed rounds");
    assert!(
        failures > 0,
        "no round failed: the restart came too late to test anything"
    );

    // A fresh device pulls exactly what was pushed, through the other process.
    let fresh = SyncEngine::in_memory()?;
    let through = HttpTransport::new(&p2.url, None)?;
    rt.block_on(async {
        while fresh.exchange(&through).await?.has_more {}
        Ok::<_, highwater::Error>(())
    })?;
    assert_eq!(fresh.versions(&bulk)?, device.versions(&bulk)?);
    assert_eq!(fresh.versions(&bulk)?.len(), RECORDS);
    assert_eq!(fresh.watermarks()?, device.watermarks()?);
    drop((p1, p2));
    Ok(())
}
