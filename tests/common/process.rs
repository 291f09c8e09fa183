//! The `highwater` binary as a child process: nodes that are killed when the test ends, and
//! one-off commands. Included with `#[path]` by the tests that run the binary only (the
//! binary exists only with the `cli` feature).
#![allow(dead_code)]

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// What a test returns.
pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

#[path = "listening.rs"]
mod listening;
pub use listening::await_listening;

/// The binary cargo built for this test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_highwater")
}

/// A running `highwater serve`, killed (SIGKILL) when dropped.
pub struct ServeProcess {
    child: Child,
    /// The node's root URL, as it printed it.
    pub url: String,
    /// Its data directory.
    pub data: PathBuf,
    /// Where its stderr (the logs) goes.
    pub log: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl ServeProcess {
    /// Starts `highwater serve --data DATA --listen 127.0.0.1:0 ARGS...` (without the
    /// `--listen` when ARGS has one) and waits for its `listening on URL` line. Its logs go to
    /// `DATA.log`.
    pub fn start(data: &Path, args: &[&str]) -> TestResult<ServeProcess> {
        Self::start_with_env(data, args, &[])
    }

    /// As [`ServeProcess::start`], with environment variables.
    pub fn start_with_env(
        data: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> TestResult<ServeProcess> {
        Self::start_command(Command::new(bin()), data, args, env)
    }

    /// As [`ServeProcess::start`], in a process that may hold at most `limit` open files
    /// (set by the shell's `ulimit -n`, which then execs the node: the pid is the node's).
    pub fn start_with_open_files(
        data: &Path,
        args: &[&str],
        limit: u64,
    ) -> TestResult<ServeProcess> {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
            .arg(bin());
        Self::start_command(sh, data, args, &[])
    }

    /// Runs `command serve --listen 127.0.0.1:0 --data DATA ARGS...` (`command` names the
    /// binary, or a wrapper that execs it with its arguments).
    fn start_command(
        mut command: Command,
        data: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> TestResult<ServeProcess> {
        let log = data.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        command.arg("serve");
        // A port the OS picks, unless the test names the address.
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .arg("--data")
            .arg(data)
            .args(args)
            .env_remove("HIGHWATER_PEER_TOKEN")
            .env_remove("HIGHWATER_CA_FILE")
            .env_remove("HIGHWATER_STORE")
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()?;
        let what = format!("node on {}", data.display());
        let (url, stdout) = await_listening(&mut child, &what, &log)?;
        Ok(ServeProcess {
            child,
            url,
            data: data.to_owned(),
            log,
            _stdout: stdout,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the node with SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) -> TestResult {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits up to `deadline` for the node to exit.
    pub fn terminate(&mut self, deadline: Duration) -> TestResult<ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !sent.success() {
            return Err("kill -TERM failed".into());
        }
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > until {
                return Err(format!("node did not exit within {deadline:?} of SIGTERM").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `highwater ARGS...` to completion.
pub fn run(args: &[&str]) -> TestResult<Output> {
    run_with_env(args, &[])
}

/// Runs `highwater ARGS...` with environment variables, to completion.
pub fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> TestResult<Output> {
    Ok(Command::new(bin())
        .args(args)
        .env_remove("HIGHWATER_TOKEN")
        .env_remove("HIGHWATER_NODE")
        .env_remove("HIGHWATER_PEER_TOKEN")
        .env_remove("HIGHWATER_CA_FILE")
        .env_remove("HIGHWATER_STORE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?)
}

/// Runs `highwater ARGS...`, which must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> TestResult<Vec<u8>> {
    let out = run(args)?;
    if !out.status.success() {
        return Err(format!(
            "highwater {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(out.stdout)
}

/// Calls `attempt` every `every` until it returns `Some`, or fails after `deadline`. For
/// state held by another process, which the test can only observe by asking.
pub fn poll<T>(
    deadline: Duration,
    every: Duration,
    what: &str,
    mut attempt: impl FnMut() -> TestResult<Option<T>>,
) -> TestResult<T> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(found) = attempt()? {
            return Ok(found);
        }
        if Instant::now() > until {
            return Err(format!("{what}: not within {deadline:?}").into());
        }
        std::thread::sleep(every);
    }
}

/// A path as a `&str` argument.
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
