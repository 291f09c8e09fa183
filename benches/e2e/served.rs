//! The `wan` case's long-running children, and the parent's handle on them.
//!
//! - `e2e --role serve-http --dir DIR --listen ADDR --records N` serves the node in `DIR`
//!   (the counting server of `http.rs`: [`HighwaterService`](highwater::http::HighwaterService)
//!   with the connection settings of `serve`) and then reads commands on stdin, one a line:
//!   `update G` writes the delta's updates of generation `G` into the node (a store of `N`
//!   records) and answers `UPDATED`; `counts` answers `COUNTS EXCHANGES BYTES`, the
//!   exchanges answered so far and their body bytes; `usage` answers `USAGE CPU WRITTEN
//!   RSS`, the CPU seconds, bytes written and peak RSS of the process so far (the receiver's
//!   figures of a push into a new server). The end of stdin stops it.
//! - `e2e --role relay --listen ADDR --upstream ADDR --delay-us US --rate BYTES_PER_SEC`
//!   runs the delaying relay (`relay.rs`; rate 0: no cap) until the end of stdin.
//!
//! Each first prints `LISTENING ADDR` (the address it bound) on stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use highwater::SyncEngine;
use tokio::sync::oneshot;

use crate::fixture::{put, scope};
use crate::http::CountingServer;
use crate::records::{self, DELTA_UPDATES};
use crate::relay::{self, Link};
use crate::Result;

/// The `--name value` pairs of a role's arguments.
fn flags(args: &[String]) -> Result<HashMap<&str, &str>> {
    let mut out = HashMap::new();
    for pair in args.chunks(2) {
        match pair {
            [name, value] if name.starts_with("--") => {
                out.insert(&name[2..], value.as_str());
            }
            _ => return Err(format!("bad role arguments {args:?}").into()),
        }
    }
    Ok(out)
}

/// The value of flag `name`.
fn flag<'a>(flags: &HashMap<&str, &'a str>, name: &str) -> Result<&'a str> {
    flags
        .get(name)
        .copied()
        .ok_or_else(|| format!("missing --{name}").into())
}

/// The `serve-http` role (arguments after the role's name).
///
/// # Errors
/// Bad arguments, the node cannot be opened or served, a bad command, a store failure.
pub fn serve_http(args: &[String]) -> Result<()> {
    let flags = flags(args)?;
    let records: u64 = flag(&flags, "records")?.parse()?;
    let engine = Arc::new(SyncEngine::open(flag(&flags, "dir")?)?);
    let server = CountingServer::start_on(engine.clone(), flag(&flags, "listen")?)?;
    let addr = server
        .url
        .strip_prefix("http://")
        .ok_or("the server's url is not http://")?;
    println!("LISTENING {addr}");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["update", generation] => {
                update(&engine, records, generation.parse()?)?;
                println!("UPDATED");
            }
            ["counts"] => {
                let (exchanges, bytes) = server.exchanges();
                println!("COUNTS {exchanges} {bytes}");
            }
            ["usage"] => {
                let cpu = crate::measure::cpu_secs().unwrap_or(0.0);
                let written = crate::measure::bytes_written().unwrap_or(0);
                let rss = crate::measure::peak_rss().unwrap_or(0);
                println!("USAGE {cpu} {written} {rss}");
            }
            _ => return Err(format!("unknown command {line:?}").into()),
        }
    }
    Ok(())
}

/// Writes the delta's updates of `generation` into a node of `records` records.
fn update(engine: &SyncEngine, records: u64, generation: u64) -> Result<()> {
    let scope = scope();
    let updated = records::updated(records, DELTA_UPDATES);
    engine.write_batch(
        updated
            .iter()
            .map(|&j| put(&scope, &records::key(j), &records::value(j, generation))),
    )?;
    Ok(())
}

/// The `relay` role (arguments after the role's name).
///
/// # Errors
/// Bad arguments, the listener cannot be bound, accepting failed.
pub fn relay(args: &[String]) -> Result<()> {
    let flags = flags(args)?;
    let upstream = flag(&flags, "upstream")?.parse()?;
    let link = Link {
        delay: Duration::from_micros(flag(&flags, "delay-us")?.parse()?),
        rate: Some(flag(&flags, "rate")?.parse::<u64>()?).filter(|&r| r > 0),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(flag(&flags, "listen")?))?;
    println!("LISTENING {}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = stop.send(());
    });
    rt.block_on(relay::run(listener, upstream, link, async move {
        let _ = stopped.await;
    }))?;
    Ok(())
}

/// A running `serve-http` or `relay` child: stopped by [`Served::stop`], or killed when
/// dropped without it (after a failure).
pub struct Served {
    /// What it is, for errors.
    what: &'static str,
    /// The address it listens on.
    pub addr: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Served {
    /// Starts `cmd` (a bench role) and waits for its `LISTENING` line.
    ///
    /// # Errors
    /// It cannot start, or ends or prints something else first.
    pub fn start(what: &'static str, mut cmd: Command) -> Result<Served> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut served = Served {
            what,
            addr: String::new(),
            child,
            stdin: Some(stdin),
            stdout,
        };
        served.addr = served.reply("LISTENING")?;
        Ok(served)
    }

    /// The rest of the next stdout line, which must start with `word`.
    fn reply(&mut self, word: &str) -> Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim_end().strip_prefix(word) {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => Err(format!("the {} child said {line:?}, not {word}", self.what).into()),
        }
    }

    /// Sends `command` and returns the rest of its answer, which must start with `word`.
    ///
    /// # Errors
    /// The child is gone or answers something else.
    pub fn ask(&mut self, command: &str, word: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().ok_or("the child is stopped")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        self.reply(word)
    }

    /// Closes the child's stdin and waits for it to end.
    ///
    /// # Errors
    /// It failed.
    pub fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("the {} child failed ({status})", self.what).into());
        }
        Ok(())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
