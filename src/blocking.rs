//! Where blocking work runs: storage IO (redb commits and reads, blob files, fsyncs) must not
//! hold up the async runtime's worker threads, or one slow commit stalls every task on its
//! thread (a timer, a watch, another peer's round). The store work of a round, of the
//! server's handlers and of the in-process transport goes through [`run_blocking`].

use std::panic;

/// The async runtime shut down before blocking work could start; the work did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the async runtime shut down before the work could run")]
pub struct Interrupted;

/// Runs `work` off the async runtime's worker threads and returns its result: on tokio's
/// blocking threads when called inside a tokio runtime, inline otherwise (a plain executor,
/// such as the tests' `block_on`, has no threads to keep free).
///
/// A panic in `work` is resumed in the caller. If the caller's future is dropped while
/// `work` runs, `work` still runs to its end on its thread: every store commit is one
/// transaction, so it lands whole or not at all either way.
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
