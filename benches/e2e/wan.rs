//! The `wan` case: the initial sync and the 100-update delta across a link with a 50 ms
//! round trip (issue 19), against the same syncs without the delay, in the same run.
//!
//! The topology ([`Topology`]): as root, two network namespaces joined by a veth pair; the
//! sender is served in the first (`--role serve-http`, on 10.213.0.1), the delaying relay
//! (`--role relay`, [`crate::relay`]) and the puller (`--role pull-http`, the same child as
//! `initial-http`: [`HttpTransport`](highwater::http::HttpTransport) and the engine's
//! exchange loop) run in the second, the relay on its loopback in front of the puller. The
//! relay is on the client's side, as a slow access link would be. Without root, or if the
//! namespaces cannot be made, the same three processes run on loopback.
//!
//! Each run pulls everything into a fresh node twice, directly (the puller connects to the
//! server's address) and through the relay, alternately; the ratio of each run's pair is a
//! row of its own. Then the delta: the server writes 100 updates (`update` on its stdin) and
//! a puller brings a replica synced through the relay up to date, directly and through the
//! relay alternately; then as many no-op rounds each way (the round trip a round sees, and
//! so what the relay adds to it). Last, the initial push: a copy of the sender's node pushes
//! everything to a new empty node served on the same side as before, directly and through
//! the relay alternately, in streamed pushes (a new server and relay for each push, in the
//! same namespaces). Checks: after every pull the receiver's digest and
//! watermarks equal the sender's, the server answered one exchange per round the puller
//! counted, each delta received and applied 100 versions and an updated value arrived,
//! each no-op round received nothing, and after every push the receiving node's digest and
//! watermarks equal the sender's and the pusher shipped every record.

use std::path::Path;

use highwater::{Hash, Key, ScopedWatermarks, SyncEngine};

use crate::child::{self, PullReport};
use crate::fixture::{scope, Fixture};
use crate::measure::Summary;
use crate::records::{self, DELTA_UPDATES};
use crate::relay::Link;
use crate::report::{count, Bound, Row, Unit};
use crate::served::Served;
use crate::topology::{Side, Topology};
use crate::Result;

/// The targets for the initial sync over the link.
const TARGET_RECORDS_PER_SEC: f64 = 100_000.0;
const TARGET_SHARE_OF_DIRECT: f64 = 0.8;
/// A delta is one round trip plus the apply: at most one round, and at most one round trip
/// (as the no-op rounds measure it through the relay) more than the same delta without the
/// delay, with a tenth for noise.
const TARGET_DELTA_ROUNDS: f64 = 1.0;
const TARGET_DELTA_EXTRA_ROUND_TRIPS: f64 = 1.1;

/// The sender's state every receiver must reach.
struct Expected {
    digest: Hash,
    marks: ScopedWatermarks,
}

impl Expected {
    fn of(dir: &Path) -> Result<Expected> {
        let node = SyncEngine::open(dir)?;
        Ok(Expected {
            digest: node.digest()?,
            marks: node.watermarks()?,
        })
    }

    fn check(&self, receiver: &Path, what: &str) -> Result<()> {
        let node = SyncEngine::open(receiver)?;
        if node.digest()? != self.digest {
            return Err(format!("{what}: receiver digest differs from sender digest").into());
        }
        if node.watermarks()? != self.marks {
            return Err(format!("{what}: receiver watermarks differ from sender's").into());
        }
        Ok(())
    }
}

/// The serving child, the relay child and where they run. Dropped after a failure, the
/// children are killed before the namespaces are deleted (the fields' order).
struct Testbed {
    relay: Served,
    server: Served,
    topology: Topology,
}

impl Testbed {
    /// Serves the node in `from` (of `records` records) and starts the relay in front of it,
    /// in `topology`.
    fn start(topology: Topology, from: &Path, records: u64, link: Link) -> Result<Testbed> {
        let listen = format!("{}:0", topology.server_ip());
        let records = records.to_string();
        let server = Served::start(
            "server",
            topology.bench(
                Side::Server,
                &[
                    "serve-http".as_ref(),
                    "--dir".as_ref(),
                    from.as_os_str(),
                    "--listen".as_ref(),
                    listen.as_ref(),
                    "--records".as_ref(),
                    records.as_ref(),
                ],
            )?,
        )?;
        let delay_us = link.delay.as_micros().to_string();
        let rate = link.rate.unwrap_or(0).to_string();
        let relay = Served::start(
            "relay",
            topology.bench(
                Side::Client,
                &[
                    "relay".as_ref(),
                    "--listen".as_ref(),
                    "127.0.0.1:0".as_ref(),
                    "--upstream".as_ref(),
                    server.addr.as_ref(),
                    "--delay-us".as_ref(),
                    delay_us.as_ref(),
                    "--rate".as_ref(),
                    rate.as_ref(),
                ],
            )?,
        )?;
        Ok(Testbed {
            relay,
            server,
            topology,
        })
    }

    /// The URL the puller uses: through the relay, or straight to the server.
    fn url(&self, delayed: bool) -> String {
        let addr = if delayed {
            &self.relay.addr
        } else {
            &self.server.addr
        };
        format!("http://{addr}")
    }

    /// The exchanges the server has answered, and their body bytes.
    fn exchanges(&mut self) -> Result<(u64, u64)> {
        let counts = self.server.ask("counts", "COUNTS")?;
        match counts.split_whitespace().collect::<Vec<_>>()[..] {
            [e, b] => Ok((e.parse()?, b.parse()?)),
            _ => Err(format!("bad counts {counts:?}").into()),
        }
    }

    /// Pulls from the server into `into` on the client's side, through the relay if
    /// `delayed`. Returns the puller's report with the bytes on the wire (both ways).
    fn pull(&mut self, into: &Path, delayed: bool, what: &str) -> Result<PullReport> {
        let url = self.url(delayed);
        self.client(&child::pull_http_args(&url, into), what)
    }

    /// Pushes everything the node in `from` holds to the server from the client's side,
    /// through the relay if `delayed`. Returns the pusher's report with the bytes on the
    /// wire (both ways), and the receiving server's CPU time, bytes written and peak RSS in
    /// place of the pusher's (the server was started empty for this push).
    fn push(&mut self, from: &Path, delayed: bool, what: &str) -> Result<PullReport> {
        let url = self.url(delayed);
        let mut report = self.client(&child::push_http_args(&url, from), what)?;
        // A push's figures are the receiver's: the server, started empty for it.
        let usage = self.server.ask("usage", "USAGE")?;
        match usage.split_whitespace().collect::<Vec<_>>()[..] {
            [cpu, written, rss] => {
                report.cpu_secs = cpu.parse()?;
                report.written = written.parse()?;
                report.peak_rss = rss.parse()?;
            }
            _ => return Err(format!("bad usage {usage:?}").into()),
        }
        Ok(report)
    }

    /// Runs a sync child with `args` on the client's side; checks that the server answered
    /// one request per round it counted, and gives its report the bytes on the wire.
    fn client(&mut self, args: &[&std::ffi::OsStr], what: &str) -> Result<PullReport> {
        let before = self.exchanges()?;
        let mut report = child::run(self.topology.bench(Side::Client, args)?)?;
        let after = self.exchanges()?;
        if after.0 - before.0 != report.rounds as u64 {
            return Err(format!(
                "{what}: the server answered {} requests for the child's {} rounds",
                after.0 - before.0,
                report.rounds
            )
            .into());
        }
        report.bytes_received = after.1 - before.1;
        Ok(report)
    }

    /// Stops the children; the topology is handed back for the next testbed.
    fn stop(self) -> Result<Topology> {
        self.relay.stop()?;
        self.server.stop()?;
        Ok(self.topology)
    }
}

/// The figures of one kind of pull (direct or through the relay).
#[derive(Default)]
struct Pulls {
    reports: Vec<PullReport>,
}

impl Pulls {
    fn of(&self, f: impl Fn(&PullReport) -> f64) -> Summary {
        Summary::of(&self.reports.iter().map(f).collect::<Vec<_>>())
    }
}

/// Which way an initial transfer went: the rows name it and count its versions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// The client pulled (it received the records).
    Pull,
    /// The client pushed (it shipped them; the figures of the receiving process are the
    /// server's).
    Push,
}

impl Way {
    /// The case's name.
    fn name(self) -> &'static str {
        match self {
            Way::Pull => "initial sync",
            Way::Push => "initial push",
        }
    }

    /// The versions a report moved.
    fn moved(self, r: &PullReport) -> f64 {
        match self {
            Way::Pull => r.received as f64,
            Way::Push => r.shipped as f64,
        }
    }
}

fn per_round(r: &PullReport) -> f64 {
    r.secs / r.rounds as f64
}

/// The case: the initial syncs, then the deltas.
pub fn run(fx: &mut Fixture) -> Result {
    let n = fx.sizes.wan_records;
    let link = Link {
        delay: fx.sizes.wan_delay,
        rate: fx.sizes.wan_rate,
    };
    let (from, _) = fx.sender(n)?;
    let expected = Expected::of(&from)?;
    // The pusher's node: a copy of the sender's, taken before it is served and updated.
    let pusher = fx.fresh_dir("wan-pusher");
    copy_dir(&from, &pusher)?;
    let mut net = Testbed::start(Topology::set_up(), &from, n, link)?;
    eprintln!("e2e: wan topology: {}", net.topology.describe());
    let (direct, wan, replica) = initial(fx, &mut net, &expected, n)?;
    let (delta_direct, delta_wan) = delta(fx, &mut net, &replica, n)?;
    let (noop_direct, noop_wan) = noop(fx, &mut net, &replica)?;
    let topology = net.topology.describe();
    let net = net.stop()?;
    Expected::of(&from)?.check(&replica, "wan delta")?;
    std::fs::remove_dir_all(&replica)?;
    let (push_direct, push_wan) = push(fx, net, &pusher, &expected, n, link)?;
    std::fs::remove_dir_all(&pusher)?;
    let mut rows = initial_rows(&direct, &wan, n, link, &topology, Way::Pull);
    let pushes = initial_rows(&push_direct, &push_wan, n, link, &topology, Way::Push);
    rows.extend(pushes);
    // The round trip as a round sees it through the relay: the no-op rounds' difference.
    let round_trip = noop_wan.of(|r| r.secs).median - noop_direct.of(|r| r.secs).median;
    rows.extend(delta_rows(
        &delta_direct,
        &delta_wan,
        n,
        round_trip,
        &topology,
        link,
    ));
    rows.extend(noop_rows(&noop_direct, &noop_wan, n, link, &topology));
    Ok(rows)
}

/// `runs` initial syncs of `n` records each way, alternately; the receiver of the first
/// through the relay is kept as the delta's replica.
fn initial(
    fx: &mut Fixture,
    net: &mut Testbed,
    expected: &Expected,
    n: u64,
) -> Result<(Pulls, Pulls, std::path::PathBuf)> {
    let (mut direct, mut wan, mut replica) = (Pulls::default(), Pulls::default(), None);
    for _ in 0..fx.sizes.runs {
        for delayed in [false, true] {
            let what = if delayed {
                "wan initial"
            } else {
                "direct initial"
            };
            let into = fx.fresh_dir("wan");
            let report = net.pull(&into, delayed, what)?;
            if report.received as u64 != n || report.resident as u64 != n {
                return Err(format!(
                    "{what}: received {} versions and holds {} records, expected {n}",
                    report.received, report.resident
                )
                .into());
            }
            expected.check(&into, what)?;
            if delayed && replica.is_none() {
                replica = Some(into);
            } else {
                std::fs::remove_dir_all(&into)?;
            }
            if delayed { &mut wan } else { &mut direct }
                .reports
                .push(report);
        }
    }
    let replica = replica.ok_or("no initial sync ran")?;
    Ok((direct, wan, replica))
}

/// `runs` initial pushes of the `n` records in `pusher` each way, alternately, each to a
/// new empty node served in `topology`, which must then hold the sender's state.
fn push(
    fx: &mut Fixture,
    mut topology: Topology,
    pusher: &Path,
    expected: &Expected,
    n: u64,
    link: Link,
) -> Result<(Pulls, Pulls)> {
    let (mut direct, mut wan) = (Pulls::default(), Pulls::default());
    for _ in 0..fx.sizes.runs {
        for delayed in [false, true] {
            let what = if delayed { "wan push" } else { "direct push" };
            let into = fx.fresh_dir("wan-pushed");
            let mut net = Testbed::start(topology, &into, 0, link)?;
            let report = net.push(pusher, delayed, what)?;
            topology = net.stop()?;
            if report.shipped as u64 != n || report.received != 0 {
                return Err(format!(
                    "{what}: shipped {} versions and received {}, expected {n} and none",
                    report.shipped, report.received
                )
                .into());
            }
            expected.check(&into, what)?;
            std::fs::remove_dir_all(&into)?;
            if delayed { &mut wan } else { &mut direct }
                .reports
                .push(report);
        }
    }
    Ok((direct, wan))
}

/// Copies the node in `from` (its store file and its blob directory) into a new directory
/// `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// `delta_reps` deltas of 100 updates each way, alternately, into `replica`.
fn delta(fx: &mut Fixture, net: &mut Testbed, replica: &Path, n: u64) -> Result<(Pulls, Pulls)> {
    let (mut direct, mut wan) = (Pulls::default(), Pulls::default());
    let probe = records::updated(n, DELTA_UPDATES)[0];
    let probe_key = Key::new(records::key(probe).to_vec())?;
    for _ in 0..fx.sizes.delta_reps {
        for delayed in [false, true] {
            let what = if delayed { "wan delta" } else { "direct delta" };
            fx.generation += 1;
            net.server
                .ask(&format!("update {}", fx.generation), "UPDATED")?;
            let report = net.pull(replica, delayed, what)?;
            if report.received != DELTA_UPDATES || report.applied != DELTA_UPDATES {
                return Err(format!(
                    "{what}: received {} and applied {} versions, expected {DELTA_UPDATES}",
                    report.received, report.applied
                )
                .into());
            }
            let got = SyncEngine::open(replica)?.get(&scope(), &probe_key)?;
            if got.map(|r| r.value) != Some(records::value(probe, fx.generation).to_vec()) {
                return Err(format!("{what}: an updated record did not arrive").into());
            }
            if delayed { &mut wan } else { &mut direct }
                .reports
                .push(report);
        }
    }
    Ok((direct, wan))
}

/// `delta_reps` rounds that move nothing each way, alternately, from `replica` (up to
/// date): the round trip as a round sees it, with the relay and without.
fn noop(fx: &mut Fixture, net: &mut Testbed, replica: &Path) -> Result<(Pulls, Pulls)> {
    let (mut direct, mut wan) = (Pulls::default(), Pulls::default());
    for _ in 0..fx.sizes.delta_reps {
        for delayed in [false, true] {
            let what = if delayed { "wan no-op" } else { "direct no-op" };
            let report = net.pull(replica, delayed, what)?;
            if report.rounds != 1 || report.received != 0 {
                return Err(format!(
                    "{what}: {} rounds received {} versions, expected one round and none",
                    report.rounds, report.received
                )
                .into());
            }
            if delayed { &mut wan } else { &mut direct }
                .reports
                .push(report);
        }
    }
    Ok((direct, wan))
}

fn link_name(link: Link) -> String {
    let rtt = link.round_trip().as_secs_f64() * 1e3;
    match link.rate {
        Some(r) => format!("relay {rtt:.0} ms round trip, {} B/s cap", count(r)),
        None => format!("relay {rtt:.0} ms round trip"),
    }
}

/// The rows of the initial transfers `way` (the pulls, or the pushes): through the relay,
/// against the same run's direct ones, and direct.
fn initial_rows(
    direct: &Pulls,
    wan: &Pulls,
    n: u64,
    link: Link,
    topology: &str,
    way: Way,
) -> Vec<Row> {
    let wan_case = format!(
        "{}, WAN ({}, {topology}), {} records",
        way.name(),
        link_name(link),
        count(n)
    );
    let direct_case = format!(
        "{}, WAN case without the relay ({topology}), {} records",
        way.name(),
        count(n)
    );
    let rate = |r: &PullReport| way.moved(r) / r.secs;
    let written_per_record = |r: &PullReport| r.written as f64 / way.moved(r);
    let over_direct = match way {
        Way::Pull => "records/s, over the same run's direct sync",
        Way::Push => "records/s, over the same run's direct push",
    };
    let ratios: Vec<f64> = wan
        .reports
        .iter()
        .zip(&direct.reports)
        .map(|(w, d)| rate(w) / rate(d))
        .collect();
    vec![
        Row::new(&wan_case, "records/s", Unit::RecordsPerSec, wan.of(rate))
            .target(Bound::AtLeast(TARGET_RECORDS_PER_SEC)),
        Row::new(&wan_case, over_direct, Unit::Ratio, Summary::of(&ratios))
            .target(Bound::AtLeast(TARGET_SHARE_OF_DIRECT)),
        Row::new(&wan_case, "time", Unit::Secs, wan.of(|r| r.secs)),
        Row::new(
            &wan_case,
            "rounds",
            Unit::Count,
            wan.of(|r| r.rounds as f64),
        ),
        Row::new(&wan_case, "time per round", Unit::Millis, wan.of(per_round)),
        Row::new(
            &wan_case,
            "bytes on the wire (HTTP bodies, both ways)",
            Unit::Bytes,
            wan.of(|r| r.bytes_received as f64),
        ),
        Row::new(
            &wan_case,
            "peak RSS of the receiving process",
            Unit::MiB,
            wan.of(|r| r.peak_rss as f64),
        ),
        Row::new(
            &wan_case,
            "CPU time of the receiving process",
            Unit::Secs,
            wan.of(|r| r.cpu_secs),
        ),
        Row::new(
            &wan_case,
            "bytes written by the receiving process, per record",
            Unit::Count,
            wan.of(written_per_record),
        ),
        Row::new(
            &direct_case,
            "records/s",
            Unit::RecordsPerSec,
            direct.of(rate),
        ),
        Row::new(&direct_case, "time", Unit::Secs, direct.of(|r| r.secs)),
        Row::new(
            &direct_case,
            "rounds",
            Unit::Count,
            direct.of(|r| r.rounds as f64),
        ),
        Row::new(
            &direct_case,
            "time per round",
            Unit::Millis,
            direct.of(per_round),
        ),
        Row::new(
            &direct_case,
            "CPU time of the receiving process",
            Unit::Secs,
            direct.of(|r| r.cpu_secs),
        ),
        Row::new(
            &direct_case,
            "bytes written by the receiving process, per record",
            Unit::Count,
            direct.of(written_per_record),
        ),
    ]
}

/// The delta's rows; `round_trip` is the one the no-op rounds measured through the relay.
fn delta_rows(
    direct: &Pulls,
    wan: &Pulls,
    n: u64,
    round_trip: f64,
    topology: &str,
    link: Link,
) -> Vec<Row> {
    let wan_case = format!(
        "delta, 100 updates, WAN ({}, {topology}), store of {} records",
        link_name(link),
        count(n)
    );
    let direct_case = format!(
        "delta, 100 updates, WAN case without the relay ({topology}), store of {} records",
        count(n)
    );
    let nominal = link.round_trip().as_secs_f64();
    let direct_time = direct.of(|r| r.secs).median;
    let mut rows = vec![
        Row::new(&wan_case, "time", Unit::Millis, wan.of(|r| r.secs)),
        Row::new(
            &wan_case,
            "rounds",
            Unit::Count,
            wan.of(|r| r.rounds as f64),
        )
        .target(Bound::AtMost(TARGET_DELTA_ROUNDS)),
        Row::new(&wan_case, "time per round", Unit::Millis, wan.of(per_round)),
    ];
    if nominal > 0.0 {
        rows.push(Row::new(
            &wan_case,
            "time per round / the relay's nominal round trip",
            Unit::Ratio,
            wan.of(|r| per_round(r) / nominal),
        ));
    }
    if round_trip > 0.0 {
        rows.push(
            Row::new(
                &wan_case,
                "time over the direct delta's median, in measured round trips (no-op rows)",
                Unit::Ratio,
                wan.of(|r| (r.secs - direct_time) / round_trip),
            )
            .target(Bound::AtMost(TARGET_DELTA_EXTRA_ROUND_TRIPS)),
        );
    }
    rows.push(Row::new(
        &direct_case,
        "time",
        Unit::Millis,
        direct.of(|r| r.secs),
    ));
    rows.push(Row::new(
        &direct_case,
        "rounds",
        Unit::Count,
        direct.of(|r| r.rounds as f64),
    ));
    rows
}

fn noop_rows(direct: &Pulls, wan: &Pulls, n: u64, link: Link, topology: &str) -> Vec<Row> {
    let wan_case = format!(
        "no-op round, WAN ({}, {topology}), store of {} records",
        link_name(link),
        count(n)
    );
    let direct_case = format!(
        "no-op round, WAN case without the relay ({topology}), store of {} records",
        count(n)
    );
    let direct_time = direct.of(|r| r.secs).median;
    vec![
        Row::new(&wan_case, "time", Unit::Millis, wan.of(|r| r.secs)),
        Row::new(
            &wan_case,
            "time over the direct no-op's median (the round trip the relay adds)",
            Unit::Millis,
            wan.of(|r| r.secs - direct_time),
        ),
        Row::new(
            &wan_case,
            "bytes on the wire (HTTP bodies, both ways)",
            Unit::Bytes,
            wan.of(|r| r.bytes_received as f64),
        ),
        Row::new(&direct_case, "time", Unit::Millis, direct.of(|r| r.secs)),
    ]
}
