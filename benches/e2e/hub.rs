//! The `hub` case (issue 17): one hub served by `highwater serve` processes, measured in one
//! run in three set-ups: one redb hub process (`serve --data DIR`), one PostgreSQL hub
//! process (`serve --store URL --store-schema S --blobs DIR`), and two PostgreSQL hub
//! processes on one schema and one blob directory, the devices split between them as a load
//! balancer would. Each set-up starts on a fresh schema (dropped afterwards) or directory.
//!
//! 1. **Rounds per second** served to [`Sizes::hub_devices`] simulated devices: in-memory
//!    [`SyncEngine`]s in this process, each with its own [`HttpTransport`] to its hub
//!    process, [`IN_FLIGHT`] rounds in flight at once on a two-thread tokio runtime. Each
//!    device syncs a scope of its own (`app/hub/dNNNN`, as an app whose users each have
//!    their own data), so a round moves the device's versions and nothing of the others'.
//!    After a first contact (rounds until nothing is left), *quiet* runs (every device one
//!    no-op round, [`QUIET_PASSES`] times) and *push* runs (every device writes
//!    [`PUSH_VERSIONS`] records, untimed, then one round). Checks: a quiet round moves
//!    nothing, a push round ships exactly its versions and receives none, and afterwards a
//!    fresh device that pulls every scope through the last hub process holds every pushed
//!    record.
//! 2. **CPU per round** over each run: the hub processes' utime + stime (`/proc/PID/stat`),
//!    and for the PostgreSQL set-ups the database server's (every `postgres` process),
//!    reported apart, and the bench process's own (the devices' side), all divided by the
//!    run's rounds.
//! 3. **Initial sync** of [`Sizes::hub_records`] records: a PostgreSQL hub's schema seeded
//!    by a [`SyncEngine`] on a [`PgStore`] in this process (`write_batch` of 10 000), served
//!    by one hub process, pulled over HTTP into a fresh redb node by a child process (the
//!    `pull-http` child of `initial-http`); the same from a redb hub process serving the
//!    fixture's sender node, for the ratio. Checks: every record received and Resident, the
//!    receiver's digest equal to the seeded node's.
//!
//! Everything shares the machine's cores: the devices, the hub processes, PostgreSQL and
//! the pulling child. The case reports the load average before and after. Without
//! `HIGHWATER_PG_URL` it skips with a note and no rows.
//!
//! One file of some 640 lines: its three parts share the set-ups ([`Hub`]), the CPU windows
//! and the rows' naming, and read best together; what is not the case itself (processes,
//! schemas, `/proc`) is in `hubproc.rs`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use highwater::http::HttpTransport;
use highwater::store::{PgOptions, PgStore};
use highwater::{
    EngineConfig, ExchangeOptions, ExchangeOutcome, Hash, Scope, ScopeFilter, SyncEngine,
};
use tokio::runtime::Runtime;

use crate::child::{self, PullReport};
use crate::fixture::{put, Fixture, WRITE_BATCH};
use crate::hubproc::{self, HubProcess, Schema, Store};
use crate::measure::{self, Summary};
use crate::report::{count, Row, Unit};
use crate::{Result, Sizes};

/// Rounds in flight at once, over all devices.
pub const IN_FLIGHT: usize = 64;
/// Versions each device writes before a push round.
pub const PUSH_VERSIONS: usize = 10;
/// Passes over every device in one quiet run (a pass of 1 000 quiet rounds takes well under
/// a second: more rounds per window make its CPU figures, in 10 ms ticks, steadier).
pub const QUIET_PASSES: usize = 3;
/// Rounds a device's first contact may take.
const FIRST_CONTACT_ROUNDS: usize = 100;

/// One hub set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// One `serve --data DIR` process.
    Redb,
    /// This many `serve --store postgres://...` processes on one schema.
    Pg(usize),
}

impl Setup {
    fn describe(self) -> String {
        match self {
            Setup::Redb => "redb hub, 1 process".to_owned(),
            Setup::Pg(1) => "PostgreSQL hub, 1 process".to_owned(),
            Setup::Pg(n) => format!("PostgreSQL hub, {n} processes"),
        }
    }

    fn tag(self) -> String {
        match self {
            Setup::Redb => "redb".to_owned(),
            Setup::Pg(n) => format!("pg{n}"),
        }
    }
}

/// The running processes of one set-up. Dropped after a failure, the processes are killed
/// before the schema is dropped (the fields' order).
struct Hub {
    procs: Vec<HubProcess>,
    schema: Option<Schema>,
}

impl Hub {
    /// Starts `setup`'s processes on a fresh directory or schema (`n` names the schema).
    fn start(fx: &mut Fixture, url: &str, setup: Setup, n: usize) -> Result<Hub> {
        match setup {
            Setup::Redb => {
                let data = fx.fresh_dir("hub-redb");
                Ok(Hub {
                    procs: vec![HubProcess::start(&data, &Store::Redb)?],
                    schema: None,
                })
            }
            Setup::Pg(k) => {
                let schema = Schema::fresh(url, n)?;
                let hub = Hub::on_schema(fx, url, &schema, k)?;
                Ok(Hub {
                    schema: Some(schema),
                    ..hub
                })
            }
        }
    }

    /// `k` processes on `schema` (which the caller keeps), one after the other, so that the
    /// first has made the tables before the next opens them.
    fn on_schema(fx: &mut Fixture, url: &str, schema: &Schema, k: usize) -> Result<Hub> {
        let store = Store::Pg {
            url: url.to_owned(),
            schema: schema.name.clone(),
            blobs: fx.fresh_dir("hub-blobs"),
        };
        let procs = (0..k)
            .map(|_| HubProcess::start(&fx.fresh_dir("hub-pg"), &store))
            .collect::<Result<Vec<_>>>()?;
        Ok(Hub {
            procs,
            schema: None,
        })
    }

    /// CPU seconds the hub's processes have used so far.
    fn cpu_secs(&self) -> Result<f64> {
        self.procs.iter().map(HubProcess::cpu_secs).sum()
    }

    /// Stops the processes (SIGTERM), then drops the schema.
    fn stop(self) -> Result<()> {
        for p in self.procs {
            p.stop()?;
        }
        drop(self.schema);
        Ok(())
    }
}

/// One simulated device: its node, its link to its hub process and its own scope.
struct Device {
    engine: SyncEngine,
    link: HttpTransport,
    scope: Scope,
    options: ExchangeOptions,
}

/// What a round of a pass must have done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Rounds until nothing is left (not measured).
    FirstContact,
    /// Nothing moved.
    Quiet,
    /// The device's [`PUSH_VERSIONS`] versions shipped, nothing received.
    Push,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::FirstContact => "first contact",
            Kind::Quiet => "quiet",
            Kind::Push => "push",
        }
    }

    fn check(self, device: usize, out: &ExchangeOutcome) -> std::result::Result<(), String> {
        let shipped = match self {
            Kind::FirstContact => return Ok(()),
            Kind::Quiet => 0,
            Kind::Push => PUSH_VERSIONS,
        };
        let halted = !out.halts.is_empty() || !out.peer_halts.is_empty();
        if out.shipped != shipped || out.received != 0 || out.has_more || halted {
            return Err(format!(
                "device {device}: a {} round shipped {} (expected {shipped}), received {}, \
                 has_more {}, halts {:?} {:?}",
                self.name(),
                out.shipped,
                out.received,
                out.has_more,
                out.halts,
                out.peer_halts
            ));
        }
        Ok(())
    }
}

/// Runs the case (see the module docs).
///
/// # Errors
/// A hub process, the database, a device or the pulling child failed, or a check failed.
pub fn run(fx: &mut Fixture) -> Result {
    let Ok(url) = std::env::var(hubproc::URL_VAR) else {
        eprintln!(
            "e2e: note: {} is not set: the hub case skips",
            hubproc::URL_VAR
        );
        return Ok(Vec::new());
    };
    hubproc::binary()?;
    let load_before = load_row("before")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = vec![load_before];
    for (n, setup) in [Setup::Redb, Setup::Pg(1), Setup::Pg(2)]
        .into_iter()
        .enumerate()
    {
        eprintln!("e2e: hub: rounds, {}", setup.describe());
        rows.extend(rounds(fx, &rt, &url, setup, n)?);
    }
    eprintln!("e2e: hub: initial sync from a redb hub");
    rows.extend(initial_redb(fx)?);
    eprintln!("e2e: hub: initial sync from a PostgreSQL hub");
    rows.extend(initial_pg(fx, &url)?);
    rows.push(load_row("after")?);
    Ok(rows)
}

/// The 1-minute load average as a row (`when`: before or after the case).
fn load_row(when: &str) -> Result<Row> {
    let [one, five, fifteen] = hubproc::load_average().ok_or("no /proc/loadavg")?;
    eprintln!("e2e: hub: load average {when} the case: {one} {five} {fifteen}");
    Ok(Row::new(
        "hub (issue 17): the machine",
        format!("load average (1 min) {when} the case"),
        Unit::Ratio,
        Summary::one(one),
    ))
}

/// Part 1 and 2 for `setup`: its rows.
fn rounds(fx: &mut Fixture, rt: &Runtime, url: &str, setup: Setup, n: usize) -> Result {
    let sizes = fx.sizes.clone();
    let hub = Hub::start(fx, url, setup, n)?;
    let devices = Arc::new(devices(rt, &hub, sizes.hub_devices)?);
    rt.block_on(pass(devices.clone(), Kind::FirstContact))?;
    let mut rows = Vec::new();
    for kind in [Kind::Quiet, Kind::Push] {
        let samples = measure_runs(rt, &hub, &devices, kind, &sizes)?;
        rows.extend(samples.rows(setup, kind, &sizes));
    }
    check_pushed(rt, &hub, &devices, &sizes)?;
    drop(devices);
    hub.stop()?;
    Ok(rows)
}

/// `n` devices, device `i` on hub process `i % processes`.
fn devices(rt: &Runtime, hub: &Hub, n: usize) -> Result<Vec<Device>> {
    let _in_runtime = rt.enter();
    (0..n)
        .map(|i| {
            let scope = Scope::app("hub", &format!("d{i:04}"))?;
            let options = ExchangeOptions {
                scopes: ScopeFilter::Only(BTreeSet::from([scope.clone()])),
                ..ExchangeOptions::default()
            };
            Ok(Device {
                engine: SyncEngine::in_memory()?,
                link: HttpTransport::new(&hub.procs[i % hub.procs.len()].url, None)?,
                scope,
                options,
            })
        })
        .collect()
}

/// One round from every device, [`IN_FLIGHT`] at once (for a first contact, rounds until
/// nothing is left), each checked against `kind`: how many rounds failed once and were
/// retried.
async fn pass(devices: Arc<Vec<Device>>, kind: Kind) -> Result<usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..IN_FLIGHT.min(devices.len()))
        .map(|_| {
            let (devices, next, retried) = (devices.clone(), next.clone(), retried.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(d) = devices.get(i) else {
                        return Ok(());
                    };
                    round(i, d, kind, &retried).await?;
                }
            })
        })
        .collect();
    for w in workers {
        w.await?
            .map_err(|e: String| -> Box<dyn std::error::Error> { e.into() })?;
    }
    Ok(retried.load(Ordering::Relaxed))
}

/// One exchange of device `i`, tried again once if it fails (counted in `retried`): the
/// client keeps an idle connection for 90 s, the hub closes it after 10 s without a request,
/// and a round sent on it as the hub closes it fails with "connection closed before message
/// completed" (a device's scheduler would retry it the same way, after a backoff).
async fn exchange(
    i: usize,
    d: &Device,
    kind: Kind,
    retried: &AtomicUsize,
) -> std::result::Result<ExchangeOutcome, String> {
    match d.engine.exchange_with(&d.link, &d.options).await {
        Ok(out) => Ok(out),
        Err(first) => {
            if retried.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("e2e: hub: device {i}: {kind:?} round failed, retried: {first}");
            }
            d.engine
                .exchange_with(&d.link, &d.options)
                .await
                .map_err(|e| format!("device {i}: {kind:?} round, retried after {first}: {e}"))
        }
    }
}

/// Device `i`'s round (rounds, for a first contact).
async fn round(
    i: usize,
    d: &Device,
    kind: Kind,
    retried: &AtomicUsize,
) -> std::result::Result<(), String> {
    for _ in 0..FIRST_CONTACT_ROUNDS {
        let out = exchange(i, d, kind, retried).await?;
        kind.check(i, &out)?;
        if kind != Kind::FirstContact || !out.has_more {
            return Ok(());
        }
    }
    Err(format!(
        "device {i}: still has_more after {FIRST_CONTACT_ROUNDS} rounds"
    ))
}

/// The samples of one kind of round in one set-up, one per run.
#[derive(Default)]
struct Samples {
    rounds_per_sec: Vec<f64>,
    hub_cpu: Vec<f64>,
    db_cpu: Vec<f64>,
    devices_cpu: Vec<f64>,
    retried: Vec<f64>,
}

/// [`Sizes::hub_runs`] runs of `kind` rounds, each timed and its CPU read around it.
fn measure_runs(
    rt: &Runtime,
    hub: &Hub,
    devices: &Arc<Vec<Device>>,
    kind: Kind,
    sizes: &Sizes,
) -> Result<Samples> {
    let passes = if kind == Kind::Quiet { QUIET_PASSES } else { 1 };
    let mut s = Samples::default();
    for run in 0..sizes.hub_runs {
        if kind == Kind::Push {
            for d in devices.iter() {
                d.engine.write_batch((0..PUSH_VERSIONS).map(|j| {
                    let key = format!("run{run:02}-{j:02}");
                    put(&d.scope, key.as_bytes(), &[b'v'; 120])
                }))?;
            }
        }
        let (hub0, db0) = (hub.cpu_secs()?, hubproc::postgres_cpu_secs());
        let self0 = measure::cpu_secs().ok_or("no /proc/self/stat")?;
        let started = Instant::now();
        let mut retried = 0;
        for _ in 0..passes {
            retried += rt.block_on(pass(devices.clone(), kind))?;
        }
        let secs = started.elapsed().as_secs_f64();
        let rounds = (devices.len() * passes) as f64;
        s.rounds_per_sec.push(rounds / secs);
        s.hub_cpu.push((hub.cpu_secs()? - hub0) / rounds);
        s.db_cpu.push((hubproc::postgres_cpu_secs() - db0) / rounds);
        let self1 = measure::cpu_secs().ok_or("no /proc/self/stat")?;
        s.devices_cpu.push((self1 - self0) / rounds);
        s.retried.push(retried as f64);
    }
    Ok(s)
}

impl Samples {
    fn rows(&self, setup: Setup, kind: Kind, sizes: &Sizes) -> Vec<Row> {
        let case = format!(
            "hub, {} devices, {} rounds{}, {}",
            count(sizes.hub_devices as u64),
            kind.name(),
            if kind == Kind::Push {
                format!(" of {PUSH_VERSIONS} versions")
            } else {
                String::new()
            },
            setup.describe()
        );
        let key = |what: &str, tag: &str| format!("hub-{what}-{}-{tag}", kind.name());
        let compared = |row: Row, what: &str| {
            let row = row.key(key(what, &setup.tag()));
            if setup == Setup::Redb {
                row
            } else {
                row.versus(key(what, "redb"))
            }
        };
        let mut rows = vec![
            compared(
                Row::new(
                    &case,
                    "rounds/s",
                    Unit::PerSec,
                    Summary::of(&self.rounds_per_sec),
                ),
                "rate",
            ),
            compared(
                Row::new(
                    &case,
                    "hub processes' CPU per round",
                    Unit::Millis,
                    Summary::of(&self.hub_cpu),
                ),
                "cpu",
            ),
        ];
        if setup != Setup::Redb {
            rows.push(Row::new(
                &case,
                "PostgreSQL's CPU per round",
                Unit::Millis,
                Summary::of(&self.db_cpu),
            ));
        }
        rows.push(Row::new(
            &case,
            "devices' CPU per round (the bench process)",
            Unit::Millis,
            Summary::of(&self.devices_cpu),
        ));
        rows.push(Row::new(
            &case,
            "rounds retried once per run (a closed idle connection)",
            Unit::Count,
            Summary::of(&self.retried),
        ));
        rows
    }
}

/// A fresh device pulls every scope through the last hub process and must hold every
/// record the devices pushed (the push runs' keys are all distinct).
fn check_pushed(rt: &Runtime, hub: &Hub, devices: &[Device], sizes: &Sizes) -> Result<()> {
    let last = hub.procs.last().ok_or("a hub without processes")?;
    let checker = SyncEngine::in_memory()?;
    let link = {
        let _in_runtime = rt.enter();
        HttpTransport::new(&last.url, None)?
    };
    rt.block_on(crate::fixture::pull_async(
        &checker,
        &link,
        &ExchangeOptions::default(),
    ))?;
    let mut held = 0;
    for d in devices {
        held += checker.residency_counts(&d.scope)?.resident;
    }
    let expected = devices.len() * PUSH_VERSIONS * sizes.hub_runs;
    if held != expected {
        return Err(format!("the hub holds {held} pushed records, not {expected}").into());
    }
    Ok(())
}

/// The rows of one hub's initial-sync runs.
struct InitialRuns {
    rates: Vec<f64>,
    hub_cpu: Vec<f64>,
    db_cpu: Vec<f64>,
    receiver_cpu: Vec<f64>,
}

/// [`Sizes::runs`] pulls of every record from `hub` into fresh redb nodes in child
/// processes, each checked against `expected` (the served node's digest).
fn pull_runs(fx: &mut Fixture, hub: &Hub, expected: Hash) -> Result<InitialRuns> {
    let n = fx.sizes.hub_records;
    let mut r = InitialRuns {
        rates: Vec::new(),
        hub_cpu: Vec::new(),
        db_cpu: Vec::new(),
        receiver_cpu: Vec::new(),
    };
    for _ in 0..fx.sizes.runs {
        let into = fx.fresh_dir("hub-pull");
        let (hub0, db0) = (hub.cpu_secs()?, hubproc::postgres_cpu_secs());
        let report: PullReport = child::spawn_pull_http(&hub.procs[0].url, &into)?;
        r.hub_cpu.push(hub.cpu_secs()? - hub0);
        r.db_cpu.push(hubproc::postgres_cpu_secs() - db0);
        r.receiver_cpu.push(report.cpu_secs);
        if report.received as u64 != n || report.resident as u64 != n {
            return Err(format!(
                "initial sync from the hub: {} received, {} resident, not {n}",
                report.received, report.resident
            )
            .into());
        }
        if SyncEngine::open(&into)?.digest()? != expected {
            return Err("initial sync from the hub: receiver digest differs".into());
        }
        std::fs::remove_dir_all(&into)?;
        r.rates.push(n as f64 / report.secs);
    }
    Ok(r)
}

impl InitialRuns {
    fn rows(&self, setup: Setup, n: u64) -> Vec<Row> {
        let case = format!(
            "hub, initial sync of {} records over HTTP, {}",
            count(n),
            setup.describe()
        );
        let rate = Row::new(
            &case,
            "records/s",
            Unit::RecordsPerSec,
            Summary::of(&self.rates),
        )
        .key(format!("hub-initial-{}", setup.tag()));
        let mut rows = vec![if setup == Setup::Redb {
            rate
        } else {
            rate.versus("hub-initial-redb")
        }];
        rows.push(Row::new(
            &case,
            "hub process's CPU",
            Unit::Secs,
            Summary::of(&self.hub_cpu),
        ));
        if setup != Setup::Redb {
            rows.push(Row::new(
                &case,
                "PostgreSQL's CPU",
                Unit::Secs,
                Summary::of(&self.db_cpu),
            ));
        }
        rows.push(Row::new(
            &case,
            "receiver's CPU (child process)",
            Unit::Secs,
            Summary::of(&self.receiver_cpu),
        ));
        rows
    }
}

/// Part 3 from a redb hub process serving the fixture's sender node.
fn initial_redb(fx: &mut Fixture) -> Result {
    let n = fx.sizes.hub_records;
    let (dir, _) = fx.sender(n)?;
    let expected = SyncEngine::open(&dir)?.digest()?;
    let hub = Hub {
        procs: vec![HubProcess::start(&dir, &Store::Redb)?],
        schema: None,
    };
    let runs = pull_runs(fx, &hub, expected)?;
    hub.stop()?;
    Ok(runs.rows(Setup::Redb, n))
}

/// Part 3 from one PostgreSQL hub process on a schema seeded in this process.
fn initial_pg(fx: &mut Fixture, url: &str) -> Result {
    let n = fx.sizes.hub_records;
    let schema = Schema::fresh(url, 9)?;
    let (expected, seed_secs) = seed(fx, url, &schema, n)?;
    let hub = Hub::on_schema(fx, url, &schema, 1)?;
    let runs = pull_runs(fx, &hub, expected)?;
    hub.stop()?;
    drop(schema);
    let mut rows = vec![Row::new(
        format!(
            "hub, {} records written into PostgreSQL (write_batch of {})",
            count(n),
            count(WRITE_BATCH as u64)
        ),
        "records/s (seeding, for the record)",
        Unit::RecordsPerSec,
        Summary::one(n as f64 / seed_secs),
    )];
    rows.extend(runs.rows(Setup::Pg(1), n));
    Ok(rows)
}

/// Writes the first `n` records into `schema` through a [`SyncEngine`] on a [`PgStore`]:
/// the node's digest and the seconds the writes took.
fn seed(fx: &mut Fixture, url: &str, schema: &Schema, n: u64) -> Result<(Hash, f64)> {
    let store = PgStore::open_with(
        url,
        &PgOptions {
            schema: Some(schema.name.clone()),
            ..PgOptions::default()
        },
    )?;
    let node = SyncEngine::with_store(Box::new(store), EngineConfig::default())?;
    let scope = crate::fixture::scope();
    let data = fx.records(n);
    let (written, secs) = measure::timed(|| -> Result<()> {
        for chunk in data.chunks(WRITE_BATCH) {
            node.write_batch(chunk.iter().map(|(k, v)| put(&scope, k, v)))?;
        }
        node.flush()?;
        Ok(())
    });
    written?;
    eprintln!(
        "e2e: hub: {} records written into PostgreSQL in {secs:.1} s",
        count(n)
    );
    Ok((node.digest()?, secs))
}
