//! The scheduler, on tokio's paused clock: what it does is observed through the events it
//! publishes (`sync_applied`, `sync_failed`, `sync_retry`), the time between them, what the
//! transport saw, and the state the nodes converge to.
//!
//! - After failures, the delays follow `min(base * factor^(attempt-1), cap) + [0, jitter]`,
//!   rounds happen exactly that far apart, and the count resets after a success.
//! - A peer that is down is not hammered: changes do not cut its delay short; `sync_now` does.
//! - `has_more` repeats at once (up to `max_burst`), then the interval applies.
//! - A round that leaves a stream halted is followed by another on the backoff schedule.
//! - A local write triggers one round `debounce` later, shared by the writes of the window.
//! - A peer's watch news triggers a round at once; a hub forwards what it got from one peer
//!   to the others, and not back to the sender.
//! - Hooks: a failing before-round hook aborts the round (a failure with backoff); a failing
//!   after-round hook changes nothing.
//! - Shutdown leaves no task behind (every transport and engine handle is released), and a
//!   round in flight is abandoned without applying half of it.
//! - On a multi-thread runtime with the real clock, writes on either side reach the other.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use highwater::error::TransportError;
use highwater::notify::{Event, Notice, Subscription, SyncEvent};
use highwater::scheduler::{AfterRound, BeforeRound};
use highwater::wire::{ExchangeRequest, ExchangeResponse};
use highwater::{
    Backoff, BlobRef, ExchangeOptions, Hash, InProcess, Key, NodeId, Scheduler, SchedulerConfig,
    SchedulerError, Scope, SyncEngine, Transport, WatchReply,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use common::rounds::{Node, TestResult};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Longer than anything a test waits for: an event that has not come by then never will.
const PATIENCE: Duration = Duration::from_secs(24 * 3600);

const HOUR: Duration = Duration::from_secs(3600);

/// The paused clock's timer works in whole milliseconds: a deadline fires up to 1 ms late.
const TICK: Duration = Duration::from_millis(1);

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a valid key")
}

fn node() -> TestResult<Node> {
    Ok(Arc::new(SyncEngine::in_memory()?))
}

fn write(node: &Node, prefix: &str, n: usize) -> TestResult {
    for i in 0..n {
        node.put(&notes(), &key(&format!("{prefix}{i}")), b"v".to_vec())?;
    }
    Ok(())
}

/// Settings where nothing happens unless the test causes it: a long interval, no watch.
fn quiet() -> SchedulerConfig {
    SchedulerConfig {
        interval: HOUR,
        watch: false,
        jitter_seed: Some(7),
        ..SchedulerConfig::default()
    }
}

/// An in-process transport that can be switched off (the peer is unreachable), made to hang
/// after the peer answered (a round in flight), or made unable to watch; counts exchanges.
struct Switch {
    inner: InProcess<Node>,
    down: AtomicBool,
    hang: AtomicBool,
    can_watch: bool,
    exchanges: AtomicUsize,
    hanging: Notify,
    /// Rounds the peer answered (the answer may still hang).
    answered: AtomicUsize,
    answered_one: Notify,
    /// Runs once, before the first watch call without a token, after a round was answered.
    before_first_token: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Switch {
    fn new(peer: &Node, can_watch: bool) -> Arc<Switch> {
        Arc::new(Switch {
            inner: InProcess::new(peer.clone()),
            down: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            can_watch,
            exchanges: AtomicUsize::new(0),
            hanging: Notify::new(),
            answered: AtomicUsize::new(0),
            answered_one: Notify::new(),
            before_first_token: Mutex::new(None),
        })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn exchanges(&self) -> usize {
        self.exchanges.load(Ordering::SeqCst)
    }

    fn unreachable() -> TransportError {
        TransportError::Unreachable {
            reason: "switched off".to_owned(),
        }
    }
}

impl Transport for Switch {
    fn peer_id(&self) -> Option<NodeId> {
        self.inner.peer_id()
    }

    async fn exchange(&self, request: ExchangeRequest) -> Result<ExchangeResponse, TransportError> {
        self.exchanges.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(Self::unreachable());
        }
        let response = self.inner.exchange(request).await;
        self.answered.fetch_add(1, Ordering::SeqCst);
        self.answered_one.notify_one();
        if self.hang.load(Ordering::SeqCst) {
            // The peer has answered; the answer never arrives.
            self.hanging.notify_one();
            std::future::pending::<()>().await;
        }
        response
    }

    async fn blobs_present(&self, hashes: Vec<Hash>) -> Result<Vec<bool>, TransportError> {
        self.inner.blobs_present(hashes).await
    }

    async fn fetch_blob(
        &self,
        blob: BlobRef,
        into: &mut (dyn std::io::Write + Send),
    ) -> Result<(), TransportError> {
        self.inner.fetch_blob(blob, into).await
    }

    async fn push_blob(
        &self,
        blob: BlobRef,
        content: Box<dyn std::io::Read + Send>,
    ) -> Result<(), TransportError> {
        self.inner.push_blob(blob, content).await
    }

    async fn watch(
        &self,
        since: Option<String>,
        watcher: Option<NodeId>,
        timeout: Duration,
    ) -> Result<WatchReply, TransportError> {
        if !self.can_watch {
            return Err(TransportError::Unsupported { what: "watch" });
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(Self::unreachable());
        }
        let hook = match since {
            None => self.before_first_token.lock().expect("not poisoned").take(),
            Some(_) => None,
        };
        if let Some(hook) = hook {
            while self.answered.load(Ordering::SeqCst) == 0 {
                self.answered_one.notified().await;
            }
            hook();
        }
        self.inner.watch(since, watcher, timeout).await
    }
}

/// The scheduler's events on a node, with the (paused) time each was seen.
struct Events(Subscription);

impl Events {
    fn on(node: &Node) -> Events {
        Events(node.notifier().subscribe())
    }

    /// The next `sync_applied`, `sync_failed` or `sync_retry`, and when it was published.
    async fn next(&mut self) -> TestResult<(Instant, SyncEvent)> {
        loop {
            let notice = tokio::time::timeout(PATIENCE, self.0.recv())
                .await
                .map_err(|_| "no scheduler event within a day")?
                .ok_or("the notifier is gone")?;
            match notice {
                Notice::Event(Event::Sync(
                    e @ (SyncEvent::Applied { .. }
                    | SyncEvent::Failed { .. }
                    | SyncEvent::Retry { .. }),
                )) => return Ok((Instant::now(), e)),
                Notice::Missed(n) => return Err(format!("missed {n} events").into()),
                _ => {}
            }
        }
    }

    /// The next event, which must be `sync_applied`: when, and its fields.
    async fn applied(&mut self) -> TestResult<(Instant, Applied)> {
        match self.next().await? {
            (
                at,
                SyncEvent::Applied {
                    peer,
                    shipped,
                    received,
                    has_more,
                    ..
                },
            ) => Ok((
                at,
                Applied {
                    peer,
                    shipped,
                    received,
                    has_more,
                },
            )),
            (_, other) => Err(format!("expected sync_applied, got {other:?}").into()),
        }
    }

    /// The next two events, which must be `sync_failed` then `sync_retry`: when, the error,
    /// the attempt and the delay.
    async fn failed(&mut self) -> TestResult<(Instant, String, u32, Duration)> {
        let (at, error) = match self.next().await? {
            (at, SyncEvent::Failed { error, .. }) => (at, error),
            (_, other) => return Err(format!("expected sync_failed, got {other:?}").into()),
        };
        match self.next().await? {
            (then, SyncEvent::Retry { attempt, delay, .. }) if then == at => {
                Ok((at, error, attempt, delay))
            }
            (_, other) => Err(format!("expected sync_retry at once, got {other:?}").into()),
        }
    }
}

/// Shuts `sched` down; an error if that takes any (paused) time at all.
async fn stop(sched: Scheduler) -> TestResult {
    let asked = Instant::now();
    tokio::time::timeout(PATIENCE, sched.shutdown())
        .await
        .map_err(|_| "shutdown did not end")??;
    assert_eq!(Instant::now(), asked, "shutdown waited");
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
struct Applied {
    peer: String,
    shipped: usize,
    received: usize,
    has_more: bool,
}

/// `got` is `want`, give or take the timer's millisecond.
fn assert_about(got: Duration, want: Duration, what: &str) {
    assert!(
        got >= want && got <= want + TICK,
        "{what}: {got:?}, expected {want:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn backoff_delays_follow_the_formula_and_reset_after_a_success() -> TestResult {
    let (a, b) = (node()?, node()?);
    write(&b, "b", 1)?;
    let to_b = Switch::new(&b, false);
    to_b.set_down(true);
    let mut events = Events::on(&a);
    let config = quiet();
    let backoff = config.backoff;
    assert_eq!(backoff, Backoff::default(), "the defaults under test");
    let sched = Scheduler::start(a.clone(), config);
    sched.add_peer("b", to_b.clone())?;

    let mut last: Option<(Instant, Duration)> = None;
    let mut jittered = 0;
    for attempt in 1..=9 {
        let (at, error, n, delay) = events.failed().await?;
        assert_eq!(n, attempt);
        assert!(error.contains("switched off"), "{error}");
        let ceiling = backoff.ceiling(attempt);
        assert!(
            delay >= ceiling && delay <= ceiling + backoff.jitter,
            "attempt {attempt}: {delay:?} outside {ceiling:?} + [0, {:?}]",
            backoff.jitter
        );
        if delay > ceiling {
            jittered += 1;
        }
        if let Some((then, waited)) = last {
            assert_about(at - then, waited, "time between failed rounds");
        }
        last = Some((at, delay));
    }
    assert_eq!(
        [1, 2, 4, 8, 16, 32, 60, 60, 60].map(Duration::from_secs),
        std::array::from_fn(|i| backoff.ceiling(i as u32 + 1)),
        "base 1 s, x2, cap 60 s"
    );
    assert!(jittered >= 5, "jitter is drawn, not always zero");
    assert_eq!(to_b.exchanges(), 9, "one attempt per failure, no spinning");
    let status = &sched.peers()[0];
    assert_eq!(status.consecutive_failures, 9);
    assert!(status
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("switched off")));

    // The peer comes back: the scheduled retry succeeds and the count resets.
    to_b.set_down(false);
    let (at, applied) = events.applied().await?;
    let (then, waited) = last.expect("nine failures");
    assert_about(at - then, waited, "retry after the last failure");
    assert_eq!(applied.received, 1);
    assert_eq!(a.digest()?, b.digest()?);
    let status = &sched.peers()[0];
    assert_eq!((status.consecutive_failures, status.rounds), (0, 1));
    assert!(status.last_success.is_some());

    // The next failure starts again from the first delay.
    to_b.set_down(true);
    sched.sync_now();
    let (_, _, attempt, delay) = events.failed().await?;
    assert_eq!(attempt, 1);
    assert!(delay >= backoff.base && delay <= backoff.base + backoff.jitter);
    stop(sched).await
}

/// The first `n` retry delays of a scheduler with `seed`.
async fn delays(seed: u64, n: usize) -> TestResult<Vec<Duration>> {
    let (a, b) = (node()?, node()?);
    let to_b = Switch::new(&b, false);
    to_b.set_down(true);
    let mut events = Events::on(&a);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            jitter_seed: Some(seed),
            ..quiet()
        },
    );
    sched.add_peer("b", to_b)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(events.failed().await?.3);
    }
    stop(sched).await?;
    Ok(out)
}

#[tokio::test(start_paused = true)]
async fn a_jitter_seed_makes_delays_reproducible() -> TestResult {
    let first = delays(42, 5).await?;
    assert_eq!(first, delays(42, 5).await?);
    assert_ne!(first, delays(43, 5).await?);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_is_down_is_not_hammered_by_changes() -> TestResult {
    let (a, b) = (node()?, node()?);
    let to_b = Switch::new(&b, false);
    to_b.set_down(true);
    let mut events = Events::on(&a);
    let config = quiet();
    let debounce = config.debounce;
    let sched = Scheduler::start(a.clone(), config);
    sched.add_peer("b", to_b.clone())?;
    let mut failure = events.failed().await?;
    while failure.2 < 4 {
        failure = events.failed().await?;
    }
    let (at, _, _, delay) = failure;
    let before = to_b.exchanges();

    // Local changes during the backoff do not start rounds.
    for i in 0..3 {
        a.put(&notes(), &key(&format!("a{i}")), b"v".to_vec())?;
        tokio::time::sleep(debounce * 2).await;
    }
    let (next, _, attempt, _) = events.failed().await?;
    assert_eq!(attempt, 5);
    assert_about(next - at, delay, "the retry keeps its time");
    assert_eq!(to_b.exchanges(), before + 1);

    // sync_now does cut the delay short.
    let asked = Instant::now();
    sched.sync_now();
    let (now, _, attempt, delay) = events.failed().await?;
    assert_eq!((attempt, now), (6, asked));
    assert_eq!(to_b.exchanges(), before + 2);

    // Back up: the retry carries the writes, and the changes seen while backing off do not
    // add a round after it.
    to_b.set_down(false);
    let (at, mut applied) = events.applied().await?;
    assert_about(at - now, delay, "the retry");
    // On first contact nothing is shipped; the round says there is more.
    let mut shipped = applied.shipped;
    while applied.has_more {
        let (then, more) = events.applied().await?;
        assert_eq!(then, at);
        shipped += more.shipped;
        applied = more;
    }
    assert_eq!(shipped, 3);
    assert_eq!(a.digest()?, b.digest()?);
    let (next, _) = events.applied().await?;
    assert_about(next - at, HOUR, "the next round");
    stop(sched).await
}

// ---------------------------------------------------------------------------------------
// has_more, interval, debounce
// ---------------------------------------------------------------------------------------

/// A round that leaves a stream halted (here: a file that cannot be fetched) is followed by
/// another after the backoff delay for the number of such rounds in a row, not after the
/// hour-long interval; once the file arrives, the interval applies again.
#[tokio::test(start_paused = true)]
async fn a_halted_stream_is_retried_on_the_backoff_schedule() -> TestResult {
    let (a, b) = (node()?, node()?);
    let bytes = vec![7u8; 5000];
    b.put_file_bytes(&notes(), &key("f"), b"file".to_vec(), &bytes)?;
    let to_b = Arc::new(highwater::testing::FaultyTransport::new(InProcess::new(
        b.clone(),
    )));
    to_b.fail(Hash::of(&bytes));
    let mut events = Events::on(&a);
    let config = quiet();
    let backoff = config.backoff;
    // The wait after `n` halted rounds in a row: the backoff delay, jitter and timer included.
    let assert_backed_off = |waited: Duration, n: u32| {
        let ceiling = backoff.ceiling(n);
        assert!(
            waited >= ceiling && waited <= ceiling + backoff.jitter + TICK,
            "after {n} halted rounds: waited {waited:?}, backoff {ceiling:?}"
        );
    };
    let sched = Scheduler::start(a.clone(), config);
    sched.add_peer("b", to_b.clone())?;

    // The first round already receives the record and halts on its file.
    let (mut then, first) = events.applied().await?;
    assert!(!first.has_more);
    let mut halted_rounds = 1u32;
    while halted_rounds < 5 {
        let (at, applied) = events.applied().await?;
        let waited = at - then;
        then = at;
        assert!(!applied.has_more);
        if a.residency(&notes(), &key("f"))? != highwater::Residency::Staged {
            return Err(format!("round {halted_rounds}: the file is not held back").into());
        }
        assert_backed_off(waited, halted_rounds);
        halted_rounds += 1;
    }
    assert!(to_b.injected() >= 4, "each round retried the fetch");

    // The file becomes available: the next retry fetches it, and then the interval applies.
    to_b.heal();
    let (at, _) = events.applied().await?;
    assert_backed_off(at - then, halted_rounds);
    assert_eq!(
        a.residency(&notes(), &key("f"))?,
        highwater::Residency::Resident
    );
    assert_eq!(a.digest()?, b.digest()?);
    let (later, _) = events.applied().await?;
    assert_about(later - at, HOUR, "a round without halts waits the interval");
    stop(sched).await
}

#[tokio::test(start_paused = true)]
async fn has_more_repeats_at_once_then_the_interval_applies() -> TestResult {
    let (a, b) = (node()?, node()?);
    write(&b, "b", 10)?;
    let mut events = Events::on(&a);
    let options = ExchangeOptions {
        page_limit: Some(2),
        ..ExchangeOptions::default()
    };
    let start = Instant::now();
    let sched = Scheduler::start(a.clone(), SchedulerConfig { options, ..quiet() });
    sched.add_peer("b", Switch::new(&b, false))?;
    let mut received = 0;
    let mut rounds = 0;
    loop {
        let (at, applied) = events.applied().await?;
        assert_eq!(at, start, "round {rounds} waited");
        received += applied.received;
        rounds += 1;
        if !applied.has_more {
            break;
        }
    }
    assert_eq!((received, rounds), (10, 5), "5 pages of 2");
    assert_eq!(a.digest()?, b.digest()?);
    // Versions applied from b are not news to b: the next round is the interval's.
    let (at, applied) = events.applied().await?;
    assert_about(at - start, HOUR, "the next round");
    assert_eq!((applied.shipped, applied.received), (0, 0));
    stop(sched).await
}

#[tokio::test(start_paused = true)]
async fn max_burst_bounds_the_rounds_in_a_row() -> TestResult {
    let (a, b) = (node()?, node()?);
    write(&b, "b", 5)?;
    let mut events = Events::on(&a);
    let start = Instant::now();
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            options: ExchangeOptions {
                page_limit: Some(1),
                ..ExchangeOptions::default()
            },
            max_burst: 2,
            ..quiet()
        },
    );
    sched.add_peer("b", Switch::new(&b, false))?;
    let mut times = Vec::new();
    for _ in 0..4 {
        let (at, applied) = events.applied().await?;
        assert!(applied.has_more);
        times.push(at - start);
    }
    assert_eq!(&times[..2], [Duration::ZERO; 2]);
    assert_about(times[2], HOUR, "third round");
    assert_about(times[3], HOUR, "fourth round");
    stop(sched).await
}

#[tokio::test(start_paused = true)]
async fn a_local_write_triggers_one_round_within_the_debounce_window() -> TestResult {
    let (a, b) = (node()?, node()?);
    let mut events = Events::on(&a);
    let config = quiet();
    let debounce = config.debounce;
    assert_eq!(debounce, Duration::from_millis(100), "the default");
    let sched = Scheduler::start(a.clone(), config);
    sched.add_peer("b", Switch::new(&b, false))?;
    events.applied().await?; // the first round, at once

    tokio::time::sleep(Duration::from_secs(5)).await;
    let first_write = Instant::now();
    for i in 0..3 {
        a.put(&notes(), &key(&format!("a{i}")), b"v".to_vec())?;
        tokio::time::sleep(debounce / 4).await;
    }
    let (at, applied) = events.applied().await?;
    assert_about(at - first_write, debounce, "round after the first write");
    assert_eq!(applied.shipped, 3, "one round for the window's writes");
    assert_eq!(a.digest()?, b.digest()?);
    let (next, _) = events.applied().await?;
    assert_about(next - at, HOUR, "no second round for the same writes");
    stop(sched).await
}

// ---------------------------------------------------------------------------------------
// Watch, hub forwarding
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn watch_news_triggers_a_round_at_once() -> TestResult {
    let (a, b) = (node()?, node()?);
    let mut events = Events::on(&a);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            watch: true,
            ..quiet()
        },
    );
    sched.add_peer("b", Switch::new(&b, true))?;
    events.applied().await?;

    // Long enough for several watch calls to time out and be made again.
    tokio::time::sleep(Duration::from_secs(100)).await;
    let written = Instant::now();
    b.put(&notes(), &key("b0"), b"news".to_vec())?;
    let (at, applied) = events.applied().await?;
    assert_eq!(at, written, "no wait after the watch's news");
    assert_eq!(applied.received, 1);
    assert_eq!(a.digest()?, b.digest()?);
    stop(sched).await
}

#[tokio::test(start_paused = true)]
async fn a_change_before_the_first_watch_token_is_not_missed() -> TestResult {
    let (a, b) = (node()?, node()?);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            watch: true,
            ..quiet()
        },
    );
    let transport = Switch::new(&b, true);
    // A write lands on b after a's start-up round was answered, before a's first token.
    let late = b.clone();
    *transport.before_first_token.lock().expect("not poisoned") = Some(Box::new(move || {
        late.put(&notes(), &key("late"), b"between round and token".to_vec())
            .expect("an in-memory write");
    }));
    sched.add_peer("b", transport)?;
    // Far less than the hour-long interval: only a round triggered by the watch gets it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.get(&notes(), &key("late"))?.is_none() {
        assert!(
            Instant::now() < deadline,
            "a write made before the first watch token waited for the interval"
        );
        tokio::time::sleep(TICK).await;
    }
    assert_eq!(a.digest()?, b.digest()?);
    stop(sched).await
}

#[tokio::test(start_paused = true)]
async fn a_hub_forwards_to_the_other_peers_not_back_to_the_sender() -> TestResult {
    let (a, b, h) = (node()?, node()?, node()?);
    let mut events = Events::on(&h);
    let config = SchedulerConfig {
        watch: true,
        ..quiet()
    };
    let debounce = config.debounce;
    let sched = Scheduler::start(h.clone(), config);
    sched.add_peer("a", Switch::new(&a, true))?;
    sched.add_peer("b", Switch::new(&b, true))?;
    events.applied().await?;
    events.applied().await?;

    tokio::time::sleep(Duration::from_secs(10)).await;
    let written = Instant::now();
    a.put(&notes(), &key("a0"), b"from a".to_vec())?;
    let (at, from_a) = events.applied().await?;
    assert_eq!(
        (at, from_a.peer.as_str(), from_a.received),
        (written, "a", 1)
    );
    let (at, to_b) = events.applied().await?;
    assert_eq!((to_b.peer.as_str(), to_b.shipped), ("b", 1));
    assert_about(
        at - written,
        debounce,
        "forwarded after the debounce window",
    );
    assert_eq!(b.digest()?, a.digest()?);

    // Long after, short of the interval: a had two rounds (start, its news), none for
    // what came from it.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let rounds: BTreeMap<String, u64> = sched
        .peers()
        .into_iter()
        .map(|s| (s.name, s.rounds))
        .collect();
    assert_eq!(rounds["a"], 2, "{rounds:?}");
    assert!(rounds["b"] >= 2, "{rounds:?}");
    stop(sched).await
}

// ---------------------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_failing_before_hook_aborts_the_round_and_backs_off() -> TestResult {
    let (a, b) = (node()?, node()?);
    write(&b, "b", 1)?;
    let closed = Arc::new(AtomicBool::new(true));
    let gate = closed.clone();
    let before: BeforeRound = Arc::new(move |peer: &str| {
        if gate.load(Ordering::SeqCst) {
            Err(format!("{peer} is in maintenance"))
        } else {
            Ok(())
        }
    });
    let to_b = Switch::new(&b, false);
    let mut events = Events::on(&a);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            before_round: Some(before),
            ..quiet()
        },
    );
    sched.add_peer("b", to_b.clone())?;
    let (at, error, attempt, delay) = events.failed().await?;
    assert!(error.contains("b is in maintenance"), "{error}");
    assert_eq!(attempt, 1);
    assert_eq!(to_b.exchanges(), 0, "the round was not run");

    closed.store(false, Ordering::SeqCst);
    let (then, applied) = events.applied().await?;
    assert_about(then - at, delay, "retried after the backoff");
    assert_eq!(applied.received, 1);
    assert_eq!(to_b.exchanges(), 1);
    stop(sched).await
}

#[tokio::test(start_paused = true)]
async fn a_failing_after_hook_changes_nothing() -> TestResult {
    let (a, b) = (node()?, node()?);
    write(&b, "b", 2)?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let after: AfterRound = Arc::new(move |peer: &str, result| {
        let received = result
            .as_ref()
            .map(|o| o.received)
            .map_err(|e| e.to_string());
        log.lock()
            .expect("not poisoned")
            .push((peer.to_owned(), received));
        Err("audit log unavailable".to_owned())
    });
    let mut events = Events::on(&a);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            after_round: Some(after),
            ..quiet()
        },
    );
    sched.add_peer("b", Switch::new(&b, false))?;
    let (_, applied) = events.applied().await?;
    assert_eq!(applied.received, 2);
    assert_eq!(a.digest()?, b.digest()?);
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        [("b".to_owned(), Ok(2))]
    );
    let status = &sched.peers()[0];
    assert_eq!((status.rounds, status.consecutive_failures), (1, 0));
    assert_eq!(status.last_error, None);
    stop(sched).await
}

// ---------------------------------------------------------------------------------------
// Status, shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_name_is_scheduled_once() -> TestResult {
    let (a, b) = (node()?, node()?);
    let sched = Scheduler::start(a.clone(), quiet());
    sched.add_peer("b", Switch::new(&b, false))?;
    assert_eq!(
        sched.add_peer("b", Switch::new(&b, false)),
        Err(SchedulerError::DuplicatePeer { name: "b".into() })
    );
    assert_eq!(sched.peers().len(), 1);
    assert_eq!(sched.peers()[0].peer, Some(b.node_id()));
    stop(sched).await
}

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_no_task_behind() -> TestResult {
    let (a, b, c) = (node()?, node()?, node()?);
    let (to_b, to_c) = (Switch::new(&b, true), Switch::new(&c, true));
    to_c.set_down(true);
    let mut events = Events::on(&a);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            watch: true,
            ..quiet()
        },
    );
    sched.add_peer("b", to_b.clone())?;
    sched.add_peer("c", to_c.clone())?;
    // One peer idle between rounds with a watch call pending, one backing off.
    events.next().await?;
    events.next().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(Arc::strong_count(&to_b) > 1 && Arc::strong_count(&a) > 1);

    stop(sched).await?;
    assert_eq!(Arc::strong_count(&to_b), 1, "b's task is gone");
    assert_eq!(Arc::strong_count(&to_c), 1, "c's task is gone");
    assert_eq!(Arc::strong_count(&a), 1, "no task holds the engine");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn dropping_the_scheduler_aborts_its_tasks() -> TestResult {
    let (a, b) = (node()?, node()?);
    let to_b = Switch::new(&b, true);
    let mut events = Events::on(&a);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            watch: true,
            ..quiet()
        },
    );
    sched.add_peer("b", to_b.clone())?;
    events.applied().await?;
    drop(sched);
    // The paused clock moves only once every task has run: the aborted ones are gone then.
    tokio::time::sleep(TICK).await;
    assert_eq!(Arc::strong_count(&to_b), 1);
    assert_eq!(Arc::strong_count(&a), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_a_round_in_flight_without_half_applying_it() -> TestResult {
    let (a, b) = (node()?, node()?);
    // a knows b (on first contact nothing is shipped), then both write.
    let link = InProcess::new(b.clone());
    while a.exchange(&link).await?.has_more {}
    write(&a, "a", 3)?;
    write(&b, "b", 3)?;
    let (digest, marks) = (a.digest()?, a.watermarks()?);

    let to_b = Switch::new(&b, false);
    to_b.hang.store(true, Ordering::SeqCst);
    let sched = Scheduler::start(a.clone(), quiet());
    sched.add_peer("b", to_b.clone())?;
    to_b.hanging.notified().await;
    // b applied a's page; a has not got b's answer.
    assert_eq!(
        b.get(&notes(), &key("a0"))?.map(|r| r.value),
        Some(b"v".to_vec())
    );

    stop(sched).await?;
    assert_eq!(Arc::strong_count(&to_b), 1);
    assert_eq!(a.digest()?, digest, "nothing of b's page applied");
    assert_eq!(a.watermarks()?, marks, "no watermark moved");

    // The next rounds pick up where the abandoned one left off.
    while a.exchange(&link).await?.has_more {}
    assert_eq!(a.digest()?, b.digest()?);
    assert_eq!(a.watermarks()?, b.watermarks()?);
    Ok(())
}

/// The same triggers on real threads and the real clock (the other tests use one thread and
/// a paused clock): a write on either side reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_converge_on_a_multi_thread_runtime() -> TestResult {
    let (a, b) = (node()?, node()?);
    let mut events = Events::on(&a);
    let sched = Scheduler::start(
        a.clone(),
        SchedulerConfig {
            watch: true,
            ..SchedulerConfig::default()
        },
    );
    sched.add_peer("b", Switch::new(&b, true))?;
    let run = async {
        while events.applied().await?.1.has_more {}
        // Through the debounced local-change trigger.
        write(&a, "a", 3)?;
        while b.scan(&notes(), b"a", None, 10)?.len() < 3 {
            events.next().await?;
        }
        // Through b's watch.
        write(&b, "b", 3)?;
        while a.scan(&notes(), b"b", None, 10)?.len() < 3 {
            events.next().await?;
        }
        TestResult::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .map_err(|_| "no convergence within 20 s")??;
    sched.shutdown().await?;
    assert_eq!(a.watermarks()?, b.watermarks()?);
    Ok(())
}
