//! What the `hub` case runs and reads besides the devices: `highwater serve` processes (the
//! release binary cargo built beside the bench), fresh PostgreSQL schemas, and the CPU time
//! of processes from `/proc`.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::Result;

#[path = "../../tests/common/listening.rs"]
mod listening;
use listening::await_listening;

/// The variable naming the database of the PostgreSQL set-ups (as the tests read it).
pub const URL_VAR: &str = "HIGHWATER_PG_URL";

/// How long a hub process may take to exit after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Connections a hub process keeps open at once: more than the devices, so that no idle
/// device connection is closed to make room (the default, 512, is below 1 000 devices).
const MAX_CONNECTIONS: &str = "4096";

/// The `highwater` binary cargo built with this bench (`cargo bench` builds it in the same
/// profile).
///
/// # Errors
/// The bench was built without the binary (feature `cli` off).
pub fn binary() -> Result<&'static str> {
    option_env!("CARGO_BIN_EXE_highwater")
        .ok_or_else(|| "the highwater binary was not built (feature `cli` is off)".into())
}

/// Where a hub process keeps the records.
#[derive(Clone, Debug)]
pub enum Store {
    /// `serve --data DIR`: a redb file in the data directory.
    Redb,
    /// `serve --store URL --store-schema SCHEMA --blobs DIR`: PostgreSQL, blobs in a shared
    /// directory.
    Pg {
        url: String,
        schema: String,
        blobs: PathBuf,
    },
}

/// A running `highwater serve`: stopped by [`HubProcess::stop`], killed when dropped without
/// it (after a failure).
pub struct HubProcess {
    child: Option<Child>,
    /// Its root URL, as it printed it.
    pub url: String,
    log: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl HubProcess {
    /// Starts `highwater serve` on `data` (its data directory) and `store`, with no peers,
    /// audits or purges of its own, its logs (warnings and worse) in `DATA.log`, and waits
    /// for its `listening on URL` line.
    ///
    /// # Errors
    /// It cannot start, or does not print its URL within 30 s.
    pub fn start(data: &Path, store: &Store) -> Result<HubProcess> {
        let log = data.with_extension("log");
        let mut cmd = Command::new(binary()?);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(["--interval", "1h", "--purge-interval", "off"])
            .args([
                "--audit-interval",
                "off",
                "--max-connections",
                MAX_CONNECTIONS,
            ]);
        if let Store::Pg { url, schema, blobs } = store {
            cmd.args(["--store", url, "--store-schema", schema, "--blobs"])
                .arg(blobs);
        }
        let mut child = cmd
            .env_remove("HIGHWATER_STORE")
            .env_remove("HIGHWATER_PEER_TOKEN")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let what = format!("hub process on {}", data.display());
        let (url, stdout) = await_listening(&mut child, &what, &log)?;
        Ok(HubProcess {
            child: Some(child),
            url,
            log,
            _stdout: stdout,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// CPU seconds (user + system, all threads) the process has used so far.
    ///
    /// # Errors
    /// Its `/proc/PID/stat` cannot be read.
    pub fn cpu_secs(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let t = stat_ticks(&stat).ok_or("unreadable /proc/PID/stat")?;
        Ok((t.utime + t.stime) as f64 / TICKS_PER_SEC)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit (killing it after 30 s).
    ///
    /// # Errors
    /// It did not exit in time, or exited with a failure.
    pub fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().ok_or("already stopped")?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill has no memory preconditions; `pid` is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    return Err(format!(
                        "hub process exited with {status}; log:\n{}",
                        self.log_text()
                    )
                    .into());
                }
                return Ok(());
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                return Err("hub process did not exit within 30 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Linux's clock ticks per second in `/proc` (`USER_HZ`).
const TICKS_PER_SEC: f64 = 100.0;

/// The CPU fields of a `/proc/PID/stat` line, in clock ticks.
struct Ticks {
    utime: u64,
    stime: u64,
    /// Of the process's children that it has waited for.
    cutime: u64,
    cstime: u64,
}

fn stat_ticks(stat: &str) -> Option<Ticks> {
    // The command name may hold spaces; the fields after it are fixed (utime is field 14
    // of the line, 12 after the name).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let at = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(Ticks {
        utime: at(11)?,
        stime: at(12)?,
        cutime: at(13)?,
        cstime: at(14)?,
    })
}

/// CPU seconds used so far by the processes named `postgres` (the database server: the
/// postmaster, its background workers and one backend per connection), including what
/// exited backends used (the postmaster's children's time), so that a backend ending inside a
/// window is still counted. Processes of another PostgreSQL on this machine count too.
pub fn postgres_cpu_secs() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != "postgres" {
            continue;
        }
        // A process may end between the two reads: it then counts nowhere but in its
        // parent's children's time, read later.
        if let Some(t) = std::fs::read_to_string(path.join("stat"))
            .ok()
            .as_deref()
            .and_then(stat_ticks)
        {
            ticks += t.utime + t.stime + t.cutime + t.cstime;
        }
    }
    ticks as f64 / TICKS_PER_SEC
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// A schema made for one set-up, dropped (with everything in it) when this is dropped, also
/// after a failure.
pub struct Schema {
    url: String,
    /// Its name.
    pub name: String,
}

impl Schema {
    /// A fresh schema `hw_bench_<pid>_<n>`.
    ///
    /// # Errors
    /// The database cannot be reached.
    pub fn fresh(url: &str, n: usize) -> Result<Schema> {
        let name = format!("hw_bench_{}_{n}", std::process::id());
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))?;
        Ok(Schema {
            url: url.to_owned(),
            name,
        })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let dropped = Client::connect(&self.url, NoTls).and_then(|mut c| {
            c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
        });
        if let Err(e) = dropped {
            eprintln!("e2e: could not drop the bench schema {}: {e}", self.name);
        }
    }
}
