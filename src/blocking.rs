//! Where blocking work runs: storage IO (redb commits and reads, blob files, fsyncs) must not
//! hold up the async runtime's worker threads, or one slow commit stalls every task on its
//! thread (a timer, a watch, another peer's round).
//!
//! Two places, with the same semantics (below):
//!
//! - [`StorageThread::run`]: a thread of the engine's own, which runs the store work of the
//!   rounds it initiates and of its audits, one job after another. Every round makes a few
//!   such trips (plan, apply), so they go to one thread that is already running instead of
//!   tokio's blocking pool: a fresh pool thread for each trip costs a thread wake-up or a
//!   thread start, and glibc's malloc gives every thread that allocates an arena of its
//!   own, each keeping what it freed (a bulk pull over HTTP peaked at 2.5 times the memory
//!   of one thread: docs/performance.md). Commits take redb's one write lock anyway.
//! - [`run_blocking`]: tokio's blocking pool, for the rest (the server's handlers, the
//!   in-process transport's answers, blob streams, the records API), where requests from
//!   many peers may run side by side and a long transfer must not hold up a round.
//!
//! Semantics of both: outside a tokio runtime the work runs inline (a plain executor, such
//! as the tests' `block_on`, has no threads to keep free); a panic in the work is resumed
//! in the caller; if the caller's future is dropped while the work runs (or waits its turn),
//! the work still runs to its end: every store commit is one transaction, so it lands whole
//! or not at all either way.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;

/// The blocking work could not run: the async runtime shut down, or the storage thread is
/// gone, before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the async runtime or the storage thread shut down before the work could run")]
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

/// A job for the storage thread: it catches its own panic and sends its outcome back.
type Job = Box<dyn FnOnce() + Send>;

/// One thread that runs blocking work in the order it is given (see the module doc). It
/// starts at the first job given inside a tokio runtime and ends once its owner is dropped
/// and the jobs already given have run; nothing waits for it to end, so an owner dropped
/// by one of its own jobs does not wait for itself.
#[derive(Debug, Default)]
pub struct StorageThread {
    /// Where jobs go; `None` if the thread could not be started (work then goes to
    /// [`run_blocking`]).
    jobs: OnceLock<Option<mpsc::Sender<Job>>>,
}

impl StorageThread {
    /// A storage thread, not started yet.
    pub fn new() -> StorageThread {
        StorageThread::default()
    }

    /// Runs `work` on this thread and returns its result when called inside a tokio runtime;
    /// inline otherwise. A panic in `work` is resumed in the caller (the thread carries on
    /// with the next job). If the caller's future is dropped, `work` still runs to its end.
    ///
    /// # Errors
    /// [`Interrupted`] if the thread is gone before `work` ran (it never is while its owner
    /// lives, unless the system refused to start it and the runtime shut down).
    pub async fn run<T, F>(&self, work: F) -> Result<T, Interrupted>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return Ok(work());
        }
        let Some(jobs) = self.jobs() else {
            return run_blocking(work).await;
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // Nobody listening (the caller's future was dropped) is not an error.
            let _ = done.send(panic::catch_unwind(AssertUnwindSafe(work)));
        });
        if jobs.send(job).is_err() {
            return Err(Interrupted);
        }
        match outcome.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(panicked)) => panic::resume_unwind(panicked),
            Err(_) => Err(Interrupted),
        }
    }

    /// The job queue, starting the thread on first use.
    fn jobs(&self) -> Option<&mpsc::Sender<Job>> {
        self.jobs
            .get_or_init(|| {
                let (jobs, queue) = mpsc::channel::<Job>();
                let started =
                    thread::Builder::new()
                        .name("highwater-store".into())
                        .spawn(move || {
                            // Ends when every sender is gone and the queue is empty.
                            for job in queue {
                                job();
                            }
                        });
                match started {
                    Ok(_) => Some(jobs),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a storage thread; store work \
                            runs on the async runtime's blocking pool instead");
                        None
                    }
                }
            })
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn work_runs_on_one_thread_of_its_own_inside_a_runtime_and_inline_outside() {
        let storage = StorageThread::new();
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
    fn a_panic_is_resumed_in_the_caller_and_the_thread_carries_on() {
        let storage = StorageThread::new();
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
        let storage = StorageThread::new();
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
            drop(futures_util::FutureExt::now_or_never(second));
            gate.send(()).expect("the first job waits");
            assert_eq!(first.await, Ok(true));
            // Jobs run in order: once a third has run, the dropped one has too.
            storage.run(|| ()).await.expect("ran");
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
