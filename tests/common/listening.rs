//! Waiting for a `highwater serve` child to say where it listens. Shared by the tests'
//! `process.rs` and the benchmark's hub processes (`benches/e2e/hubproc.rs`), each of which
//! includes it with `#[path]`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout};
use std::sync::mpsc;
use std::time::Duration;

/// How long a node may take to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// Reads `child`'s first line, `listening on URL`, within [`START_DEADLINE`] (on a thread,
/// so a node that never prints cannot hang the caller), and returns the URL and the stdout,
/// which the caller keeps open. A node that does not print that in time is killed, and is
/// an error naming `what` (quoting its log when it printed nothing).
///
/// # Errors
/// As above.
pub fn await_listening(
    child: &mut Child,
    what: &str,
    log: &Path,
) -> Result<(String, BufReader<ChildStdout>), Box<dyn std::error::Error>> {
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        let _ = tx.send(read.map(|_| line));
        stdout
    });
    let line = match rx.recv_timeout(START_DEADLINE) {
        Ok(Ok(line)) => line,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{what} did not start ({other:?}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
            .into());
        }
    };
    let stdout = reader.join().map_err(|_| "stdout reader panicked")?;
    match line.trim().strip_prefix("listening on ") {
        Some(url) => Ok((url.to_owned(), stdout)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{what} said {line:?}, not `listening on URL`").into())
        }
    }
}
