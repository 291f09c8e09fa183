//! The audit round between two redb replicas of every record, over the in-process transport
//! (every message encoded and decoded with the real codec): what an audit of equal replicas
//! costs, and what one costs that repairs 100 keys updated on one side only.
//!
//! CPU time per side: without an async runtime the in-process transport calls the responder
//! on the initiator's thread, so the case reads that thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`) around the whole audit and, through [`Timed`], around each of
//! the responder's answers. The responder's figure is its answers (apply and respond); the
//! initiator's is the rest: its own steps plus the codec both ways, which the transport runs
//! between the two (an upper bound on the initiator's share).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};

use futures_executor::block_on;
use highwater::blob::BlobReader;
use highwater::engine::AuditOutcome;
use highwater::exchange::audit::{Claim, Items, Segment, Shipment};
use highwater::notify::Notifier;
use highwater::wire::{self, AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse};
use highwater::{BlobRef, Hash, InProcess, Key, NodeId, Refusal, Responder, Scope, SyncEngine};

use crate::fixture::{pull, put, scope, Fixture};
use crate::measure::{self, Summary};
use crate::records::{self, DELTA_UPDATES};
use crate::report::{count, Bound, Row, Unit};
use crate::Result;

/// The targets: bytes each way and CPU time per side, for equal replicas and for
/// 100 differing keys among 1M ("~1 KB", "~64 KB", taken as KiB).
const TARGET_EQUAL_BYTES: f64 = 1024.0;
const TARGET_EQUAL_CPU: f64 = 0.010;
const TARGET_DIFF_BYTES: f64 = 64.0 * 1024.0;
const TARGET_DIFF_CPU: f64 = 0.100;

/// The responder: the engine, with the CPU time its audit answers took on the calling
/// thread. Everything else is forwarded as it is.
#[derive(Clone)]
struct Timed {
    engine: Arc<SyncEngine>,
    /// Nanoseconds of thread CPU spent in [`Responder::audit`].
    cpu_nanos: Arc<AtomicU64>,
    /// The thread the initiator runs on: an answer on another thread breaks the split.
    initiator: ThreadId,
    /// Answers that ran on another thread.
    elsewhere: Arc<AtomicU64>,
    /// Where the bytes of each message went, in order (request, response, request, ...).
    traffic: Arc<Mutex<Vec<Traffic>>>,
    /// Nanoseconds of thread CPU spent taking messages apart for `traffic` (not the
    /// initiator's: subtracted from its figure).
    tally_nanos: Arc<AtomicU64>,
}

impl Timed {
    fn new(engine: Arc<SyncEngine>) -> Timed {
        Timed {
            engine,
            cpu_nanos: Arc::new(AtomicU64::new(0)),
            initiator: thread::current().id(),
            elsewhere: Arc::new(AtomicU64::new(0)),
            traffic: Arc::new(Mutex::new(Vec::new())),
            tally_nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Seconds of thread CPU the tally took so far.
    fn tally_secs(&self) -> f64 {
        self.tally_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// The traffic of the messages since the last call.
    fn take_traffic(&self) -> Vec<Traffic> {
        std::mem::take(&mut *self.traffic.lock().expect("not poisoned"))
    }

    /// Seconds of thread CPU the answers took so far.
    fn cpu_secs(&self) -> f64 {
        self.cpu_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

impl Responder for Timed {
    fn node_id(&self) -> NodeId {
        Responder::node_id(&*self.engine)
    }

    fn respond(&self, request: ExchangeRequest) -> std::result::Result<ExchangeResponse, Refusal> {
        Responder::respond(&*self.engine, request)
    }

    fn blobs_present(&self, hashes: &[Hash]) -> std::result::Result<Vec<bool>, Refusal> {
        Responder::blobs_present(&*self.engine, hashes)
    }

    fn open_blob(&self, hash: &Hash) -> std::result::Result<Option<BlobReader>, Refusal> {
        Responder::open_blob(&*self.engine, hash)
    }

    fn accept_blob(
        &self,
        blob: &BlobRef,
        content: &mut dyn Read,
    ) -> std::result::Result<(), Refusal> {
        Responder::accept_blob(&*self.engine, blob, content)
    }

    fn scopes(&self) -> std::result::Result<Vec<Scope>, Refusal> {
        Responder::scopes(&*self.engine)
    }

    fn blob_scopes(&self, hash: &Hash) -> std::result::Result<Vec<Scope>, Refusal> {
        Responder::blob_scopes(&*self.engine, hash)
    }

    fn notifier(&self) -> Option<&Notifier> {
        Responder::notifier(&*self.engine)
    }

    fn audit(&self, request: AuditRequest) -> std::result::Result<AuditResponse, Refusal> {
        if thread::current().id() != self.initiator {
            self.elsewhere.fetch_add(1, Ordering::Relaxed);
        }
        let started = measure::thread_cpu_secs();
        let asked = request.clone();
        let cloned = measure::thread_cpu_secs() - started;
        let started = measure::thread_cpu_secs();
        let answer = Responder::audit(&*self.engine, request);
        let took = measure::thread_cpu_secs() - started;
        self.cpu_nanos
            .fetch_add((took * 1e9).round() as u64, Ordering::Relaxed);
        let started = measure::thread_cpu_secs();
        let mut traffic = vec![Traffic::of(&asked)];
        if let Ok(answer) = &answer {
            traffic.push(Traffic::of(answer));
        }
        self.traffic.lock().expect("not poisoned").extend(traffic);
        let took = measure::thread_cpu_secs() - started + cloned;
        self.tally_nanos
            .fetch_add((took * 1e9).round() as u64, Ordering::Relaxed);
        answer
    }
}

/// Where one message's bytes went: each figure is the encoded message's length less the
/// length of the same message without that part, so it holds for any encoding.
#[derive(Clone, Copy, Debug, Default)]
struct Traffic {
    /// The whole message, encoded.
    total: usize,
    /// The ranges: cut points, fingerprints and item lists.
    ranges: usize,
    /// The item lists inside the ranges.
    items: usize,
    /// Parts told by a fingerprint.
    fingerprints: usize,
    /// Items listed.
    listed: usize,
    /// The versions shipped.
    versions: usize,
    /// How many versions.
    shipped: usize,
    /// Items wanted and offered, by Hlc.
    asks: usize,
}

/// `segments` with every item list emptied.
fn without_items(segments: &[Segment]) -> Vec<Segment> {
    let mut out = segments.to_vec();
    for part in out.iter_mut().flat_map(|s| s.parts.iter_mut()) {
        if let Claim::Items(items) = &mut part.claim {
            *items = Items::default();
        }
    }
    out
}

/// Fingerprint parts and listed items of `segments`.
fn claims(segments: &[Segment]) -> (usize, usize) {
    let parts = segments.iter().flat_map(|s| s.parts.iter());
    parts.fold((0, 0), |(f, l), p| match &p.claim {
        Claim::Fingerprint(_) => (f + 1, l),
        Claim::Items(items) => (f, l + items.0.len()),
    })
}

/// An audit message as [`Traffic::of`] takes it apart: its ranges, its versions, and what it
/// asks for (a request's wanted items; a response's wanted and offered ones).
trait Audited: wire::Message + Clone {
    fn segments(&mut self) -> &mut Vec<Segment>;
    fn versions(&mut self) -> &mut Shipment;
    fn clear_asks(&mut self);
}

impl Audited for AuditRequest {
    fn segments(&mut self) -> &mut Vec<Segment> {
        &mut self.segments
    }
    fn versions(&mut self) -> &mut Shipment {
        &mut self.versions
    }
    fn clear_asks(&mut self) {
        self.wanted.clear();
    }
}

impl Audited for AuditResponse {
    fn segments(&mut self) -> &mut Vec<Segment> {
        &mut self.segments
    }
    fn versions(&mut self) -> &mut Shipment {
        &mut self.versions
    }
    fn clear_asks(&mut self) {
        self.wanted.clear();
        self.offered.clear();
    }
}

impl Traffic {
    /// The tally of one audit message: each part's bytes are what the encoding shrinks by
    /// without it.
    fn of<M: Audited>(m: &M) -> Traffic {
        let total = wire::encode(m).len();
        let less = |f: &dyn Fn(&mut M)| {
            let mut m = m.clone();
            f(&mut m);
            total - wire::encode(&m).len()
        };
        let mut whole = m.clone();
        let (fingerprints, listed) = claims(whole.segments());
        Traffic {
            total,
            ranges: less(&|m| m.segments().clear()),
            items: less(&|m| *m.segments() = without_items(m.segments())),
            fingerprints,
            listed,
            versions: less(&|m| m.versions().clear()),
            shipped: whole.versions().iter().map(|(_, v)| v.len()).sum(),
            asks: less(&M::clear_asks),
        }
    }

    /// The sum of `messages`' figures.
    fn sum(messages: &[Traffic]) -> Traffic {
        messages.iter().fold(Traffic::default(), |a, t| Traffic {
            total: a.total + t.total,
            ranges: a.ranges + t.ranges,
            items: a.items + t.items,
            fingerprints: a.fingerprints + t.fingerprints,
            listed: a.listed + t.listed,
            versions: a.versions + t.versions,
            shipped: a.shipped + t.shipped,
            asks: a.asks + t.asks,
        })
    }
}

/// Prints one audit's messages, one line each, to stderr: where the bytes went, message by
/// message (the messages of an audit go one level of ranges deeper each).
fn print_traffic(label: &str, messages: &[Traffic]) {
    eprintln!("{label}: message | bytes | ranges (cut points, fingerprints) | fingerprint parts | item lists | items | versions | shipped | wanted and offered");
    for (i, t) in messages.iter().enumerate() {
        let dir = if i % 2 == 0 { "request" } else { "response" };
        eprintln!(
            "  {dir} {} | {} | {} | {} | {} | {} | {} | {} | {}",
            i / 2 + 1,
            t.total,
            t.ranges - t.items,
            t.fingerprints,
            t.items,
            t.listed,
            t.versions,
            t.shipped,
            t.asks
        );
    }
}

/// One audit's figures.
struct Sample {
    out: AuditOutcome,
    secs: f64,
    initiator_cpu: f64,
    responder_cpu: f64,
    sent: f64,
    received: f64,
    /// The initiator's messages, summed.
    requests: Traffic,
    /// The responder's messages, summed.
    responses: Traffic,
    /// Every message, in order.
    messages: Vec<Traffic>,
}

/// Runs one audit from `node` over `link` and measures it.
fn audit_once(node: &SyncEngine, link: &InProcess<Timed>) -> Result<Sample> {
    let before = link.stats();
    let responder_before = link.peer().cpu_secs();
    let tally_before = link.peer().tally_secs();
    link.peer().take_traffic();
    let cpu_before = measure::thread_cpu_secs();
    let (out, secs) = measure::timed(|| block_on(node.audit(link)));
    let cpu = measure::thread_cpu_secs() - cpu_before;
    let out = out?;
    let after = link.stats();
    if link.peer().elsewhere.load(Ordering::Relaxed) != 0 {
        return Err("the responder answered on another thread: the CPU split does not hold".into());
    }
    let responder_cpu = link.peer().cpu_secs() - responder_before;
    let tally = link.peer().tally_secs() - tally_before;
    let messages = link.peer().take_traffic();
    let side = |parity: usize| {
        let mine: Vec<Traffic> = messages.iter().skip(parity).step_by(2).copied().collect();
        Traffic::sum(&mine)
    };
    if !out.halts.is_empty() || !out.peer_halts.is_empty() {
        return Err(format!("an audit halted streams: {out:?}").into());
    }
    Ok(Sample {
        out,
        secs,
        initiator_cpu: cpu - responder_cpu - tally,
        responder_cpu,
        sent: (after.bytes_sent - before.bytes_sent) as f64,
        received: (after.bytes_received - before.bytes_received) as f64,
        requests: side(0),
        responses: side(1),
        messages,
    })
}

/// The rows of one kind of audit, with its targets (judged at full sizes).
fn rows(case: &str, samples: &[Sample], bytes: f64, cpu: f64) -> Vec<Row> {
    let of = |f: fn(&Sample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    vec![
        Row::new(
            case,
            "bytes, initiator to responder",
            Unit::Bytes,
            of(|s| s.sent),
        )
        .target(Bound::AtMost(bytes)),
        Row::new(
            case,
            "bytes, responder to initiator",
            Unit::Bytes,
            of(|s| s.received),
        )
        .target(Bound::AtMost(bytes)),
        Row::new(
            case,
            "CPU time, initiator (thread; with the codec both ways)",
            Unit::Millis,
            of(|s| s.initiator_cpu),
        )
        .target(Bound::AtMost(cpu)),
        Row::new(
            case,
            "CPU time, responder (thread; its answers)",
            Unit::Millis,
            of(|s| s.responder_cpu),
        )
        .target(Bound::AtMost(cpu)),
        Row::new(case, "time", Unit::Millis, of(|s| s.secs)),
        Row::new(
            case,
            "round trips",
            Unit::Count,
            of(|s| s.out.rounds as f64),
        ),
        Row::new(
            case,
            "versions received by the initiator",
            Unit::Count,
            of(|s| s.out.received as f64),
        ),
        Row::new(
            case,
            "versions shipped by the initiator",
            Unit::Count,
            of(|s| s.out.shipped as f64),
        ),
    ]
}

/// A figure of [`Traffic`]: its name, unit and how to read it.
type Figure = (&'static str, Unit, fn(Traffic) -> usize);

/// Where the bytes went, each way: ranges (cut points and fingerprints), item lists,
/// versions, wants and offers; and how many parts and items the ranges told.
fn traffic_rows(case: &str, samples: &[Sample]) -> Vec<Row> {
    let mut out = Vec::new();
    for (way, pick) in [
        (
            "initiator to responder",
            (|s: &Sample| s.requests) as fn(&Sample) -> Traffic,
        ),
        ("responder to initiator", |s: &Sample| s.responses),
    ] {
        let of = |f: fn(Traffic) -> usize| {
            Summary::of(
                &samples
                    .iter()
                    .map(|s| f(pick(s)) as f64)
                    .collect::<Vec<_>>(),
            )
        };
        let figures: [Figure; 6] = [
            (
                "bytes in ranges: cut points and fingerprints",
                Unit::Bytes,
                |t| t.ranges - t.items,
            ),
            ("parts told by fingerprint", Unit::Count, |t| t.fingerprints),
            ("bytes in item lists", Unit::Bytes, |t| t.items),
            ("items listed", Unit::Count, |t| t.listed),
            ("bytes in versions", Unit::Bytes, |t| t.versions),
            ("bytes in wanted and offered items", Unit::Bytes, |t| t.asks),
        ];
        for (figure, unit, f) in figures {
            out.push(Row::new(case, format!("{way}: {figure}"), unit, of(f)));
        }
    }
    out
}

/// The records the `rep`-th repairing audit updates: 100 spread over the store, next to the
/// delta case's and shifted by `rep`, so that each audit meets keys not updated before. Their
/// replaced versions then lie spread over the replica's `(origin, time)` order, as lost
/// writes would; updating the same keys again would put every difference at the end of it.
fn spread(n: u64, rep: usize) -> Vec<u64> {
    records::updated(n, DELTA_UPDATES)
        .into_iter()
        .map(|i| (i + 1 + rep as u64) % n)
        .collect()
}

/// Audits between the sender of every record and its synced replica: `audit_reps` audits of
/// the equal replicas, then `audit_reps` times 100 other records (spread over the store)
/// updated on the responder only and repaired by an audit. Checks: the equal audits find
/// nothing; each repairing audit repairs exactly the 100 updated keys, brings their new
/// values and moves no mark; the digests are equal after the last. Then a round brings the replica's marks up to date (it must apply nothing:
/// the audits brought every version) so later cases find the pair as synced.
pub fn run(fx: &mut Fixture) -> Result {
    let n = fx.sizes.records;
    let reps = fx.sizes.audit_reps;
    let (from, _) = fx.sender(n)?;
    let into = fx.replica(n)?;
    let a = Arc::new(SyncEngine::open(&from)?);
    let b = SyncEngine::open(&into)?;
    if a.digest()? != b.digest()? {
        return Err("audit: the replicas differ before the audits".into());
    }
    let link = InProcess::new(Timed::new(a.clone()));
    let mut equal = Vec::new();
    for _ in 0..reps {
        let s = audit_once(&b, &link)?;
        if !s.out.clean() {
            return Err(format!("audit of equal replicas moved versions: {:?}", s.out).into());
        }
        equal.push(s);
    }

    let scope = scope();
    let mut differing = Vec::new();
    for rep in 0..reps {
        let updated = spread(n, rep);
        let mut want: Vec<(Scope, Key)> = updated
            .iter()
            .map(|&j| Ok((scope.clone(), Key::new(records::key(j).to_vec())?)))
            .collect::<Result<_>>()?;
        want.sort();
        fx.generation += 1;
        let generation = fx.generation;
        a.write_batch(
            updated
                .iter()
                .map(|&j| put(&scope, &records::key(j), &records::value(j, generation))),
        )?;
        let marks = b.watermarks()?;
        let s = audit_once(&b, &link)?;
        let mut repaired = s.out.repaired.clone();
        repaired.sort();
        if repaired != want {
            return Err(format!(
                "audit repaired {} keys, expected the {} updated ones",
                repaired.len(),
                want.len()
            )
            .into());
        }
        if b.watermarks()? != marks {
            return Err("an audit moved the initiator's marks".into());
        }
        for &j in &updated {
            let got = b.get(&scope, &Key::new(records::key(j).to_vec())?)?;
            if got.map(|r| r.value) != Some(records::value(j, generation).to_vec()) {
                return Err("audit: an updated record did not arrive".into());
            }
        }
        differing.push(s);
    }
    // Once, not per audit: a digest reads every version (seconds at 1M records).
    if a.digest()? != b.digest()? {
        return Err("audit: digests differ after the repairing audits".into());
    }
    let caught_up = pull(&b, &link)?;
    if caught_up.applied != 0 {
        return Err(format!(
            "a round after the audits applied {} versions the audits had not brought",
            caught_up.applied
        )
        .into());
    }

    let equal_case = format!("audit, equal replicas, in-process, {} records", count(n));
    let diff_case = format!(
        "audit, {DELTA_UPDATES} keys updated on the responder, in-process, {} records",
        count(n)
    );
    let mut out = rows(&equal_case, &equal, TARGET_EQUAL_BYTES, TARGET_EQUAL_CPU);
    out.extend(rows(
        &diff_case,
        &differing,
        TARGET_DIFF_BYTES,
        TARGET_DIFF_CPU,
    ));
    out.extend(traffic_rows(&diff_case, &differing));
    if let Some(last) = differing.last() {
        print_traffic(&diff_case, &last.messages);
    }
    Ok(out)
}
