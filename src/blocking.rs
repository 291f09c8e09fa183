//! Where blocking work runs: storage IO (redb commits and reads, blob files, fsyncs) must not
//! hold up the async runtime's worker threads, or one slow commit stalls every task on its
//! thread (a timer, a watch, another peer's round).
//!
//! Two places, both on tokio's blocking pool, with the same semantics (below):
//!
//! - [`StorageLane::run`]: the engine's lane, which runs the store work of the rounds and
//!   audits it initiates one job after another, on one pool thread that waits a moment for
//!   the next job before it goes back to the pool. A round makes a few such trips (plan,
//!   apply) a network round trip apart; each trip as a task of its own (`spawn_blocking`)
//!   wakes or starts some pool thread, often another than the last, and glibc's malloc gives
//!   every thread that allocates an arena of its own, each keeping what it freed: a bulk
//!   pull over HTTP peaked at 2.5 times the memory of one thread (docs/performance.md).
//!   Commits take redb's one write lock anyway.
//! - [`run_blocking`]: a task of its own, for the rest (the server's handlers, the
//!   in-process transport's answers, blob streams, the records API), where requests from
//!   many peers may run side by side and a long transfer must not hold up a round.
//!
//! Semantics of both: outside a tokio runtime the work runs inline (a plain executor, such
//! as the tests' `block_on`, has no threads to keep free); a panic in the work is resumed
//! in the caller; if the caller's future is dropped while the work runs (or waits its turn),
//! the work still runs to its end: every store commit is one transaction, so it lands whole
//! or not at all either way.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The async runtime shut down before blocking work could start; the work did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the async runtime shut down before the work could run")]
pub struct Interrupted;

/// Runs `work` off the async runtime's worker threads and returns its result: on tokio's
/// blocking threads when called inside a tokio runtime, inline otherwise.
///
/// A panic in `work` is resumed in the caller. If the caller's future is dropped while
/// `work` runs, `work` still runs to its end on its thread.
///
/// # Errors
/// [`Interrupted`] if the runtime shut down before `work` started.
pub async fn run_blocking<T, F>(work: F) -> Result<T, Interrupted>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Ok(work());
    };
    match runtime.spawn_blocking(work).await {
        Ok(out) => Ok(out),
        Err(e) if e.is_panic() => panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Interrupted),
    }
}

/// A job for the storage lane: it catches its own panic and sends its outcome back.
type Job = Box<dyn FnOnce() + Send>;

/// How long the lane's thread waits for the next job before it goes back to tokio's pool. A
/// round's trips come a network round trip apart, so the next one usually finds it waiting;
/// while it waits, a paused tokio clock does not advance on its own (as while any blocking
/// task runs), so the wait is short.
const LINGER: Duration = Duration::from_millis(20);

/// Blocking work of one owner (an engine), run one job at a time in the order given, on one
/// thread of tokio's blocking pool that stays a moment for the next job (see the module doc).
/// Being tokio's, the thread counts as work in progress for tokio: a paused test clock does
/// not jump while a job runs. Nothing waits for the thread when the owner is dropped, so an
/// owner dropped by one of its own jobs does not wait for itself.
#[derive(Debug, Default)]
pub struct StorageLane {
    shared: Arc<Lane>,
}

#[derive(Default)]
struct Lane {
    queue: Mutex<Queue>,
    more: Condvar,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Whether a thread runs the lane's jobs (or is about to).
    running: bool,
}

impl StorageLane {
    /// A lane with no thread yet.
    pub fn new() -> StorageLane {
        StorageLane::default()
    }

    /// Runs `work` on this lane and returns its result when called inside a tokio runtime;
    /// inline otherwise. A panic in `work` is resumed in the caller (the lane carries on
    /// with the next job). If the caller's future is dropped, `work` still runs to its end.
    ///
    /// # Errors
    /// [`Interrupted`] if the runtime shut down before `work` ran.
    pub async fn run<T, F>(&self, work: F) -> Result<T, Interrupted>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Ok(work());
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // Nobody listening (the caller's future was dropped) is not an error.
            let _ = done.send(panic::catch_unwind(AssertUnwindSafe(work)));
        });
        let start = {
            let mut queue = lock(&self.shared.queue);
            queue.jobs.push_back(job);
            !std::mem::replace(&mut queue.running, true)
        };
        match start {
            true => {
                let runner = Runner {
                    lane: self.shared.clone(),
                    finished: false,
                };
                // Detached: the outcome comes through `done`.
                drop(runtime.spawn_blocking(move || runner.drain()));
            }
            false => self.shared.more.notify_one(),
        }
        match outcome.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(panicked)) => panic::resume_unwind(panicked),
            Err(_) => Err(Interrupted),
        }
    }
}

/// The lane's side of its thread.
struct Runner {
    lane: Arc<Lane>,
    /// Set when the runner left with the queue empty; otherwise its drop (the runtime shut
    /// down before or while it ran) drops the jobs left, whose callers then hear
    /// [`Interrupted`].
    finished: bool,
}

impl Runner {
    /// Runs the lane's jobs until none comes for [`LINGER`].
    fn drain(mut self) {
        while let Some(job) = self.next() {
            job();
        }
        self.finished = true;
    }

    fn next(&self) -> Option<Job> {
        let mut queue = lock(&self.lane.queue);
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                return Some(job);
            }
            let (guard, waited) = self
                .lane
                .more
                .wait_timeout(queue, LINGER)
                .unwrap_or_else(PoisonError::into_inner);
            queue = guard;
            if waited.timed_out() && queue.jobs.is_empty() {
                queue.running = false;
                return None;
            }
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if !self.finished {
            let mut queue = lock(&self.lane.queue);
            queue.running = false;
            queue.jobs.clear();
        }
    }
}

/// The queue, whatever a panicking thread left (jobs catch their own panics: none does).
fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn jobs_given_one_after_another_run_on_one_pool_thread_inside_a_runtime_and_inline_outside() {
        let storage = StorageLane::new();
        let here = thread::current().id();
        let outside = futures_executor::block_on(storage.run(|| thread::current().id()));
        assert_eq!(outside, Ok(here), "inline outside a runtime");
        let rt = runtime();
        let (a, b) = rt.block_on(async {
            let a = storage.run(|| thread::current().id()).await;
            let b = storage.run(|| thread::current().id()).await;
            (a, b)
        });
        let (a, b) = (a.expect("ran"), b.expect("ran"));
        assert_ne!(a, here, "off the runtime's thread");
        assert_eq!(a, b, "the same thread every time");
    }

    #[test]
    fn a_panic_is_resumed_in_the_caller_and_the_lane_carries_on() {
        let storage = StorageLane::new();
        let rt = runtime();
        let caught = rt.block_on(async {
            let run = storage.run(|| -> u32 { panic!("boom") });
            futures_util::FutureExt::catch_unwind(AssertUnwindSafe(run)).await
        });
        let payload = caught.expect_err("the panic reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
        assert_eq!(rt.block_on(storage.run(|| 7)), Ok(7));
    }

    #[test]
    fn work_runs_to_its_end_when_the_caller_lets_go() {
        let storage = StorageLane::new();
        let rt = runtime();
        let ran = Arc::new(AtomicUsize::new(0));
        let (gate, wait) = mpsc::channel::<()>();
        rt.block_on(async {
            // The first job holds the thread until the gate opens; the second is given and
            // its caller's future dropped while it waits its turn.
            let first = storage.run(move || wait.recv().is_ok());
            let counted = ran.clone();
            let second = storage.run(move || counted.fetch_add(1, Ordering::SeqCst));
            tokio::pin!(first);
            assert!(futures_util::FutureExt::now_or_never(first.as_mut()).is_none());
            let _ = futures_util::FutureExt::now_or_never(second);
            gate.send(()).expect("the first job waits");
            assert_eq!(first.await, Ok(true));
            // Jobs run in order: once a third has run, the dropped one has too.
            storage.run(|| ()).await.expect("ran");
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
