//! Timing, medians and the process's peak resident set.

use std::time::Instant;

/// The median and range of a figure's samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples.
    pub n: usize,
}

impl Summary {
    /// The summary of `samples` (which must not be empty).
    pub fn of(samples: &[f64]) -> Summary {
        assert!(!samples.is_empty(), "a figure needs at least one sample");
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 0 {
            (s[mid - 1] + s[mid]) / 2.0
        } else {
            s[mid]
        };
        Summary {
            median,
            min: s[0],
            max: s[s.len() - 1],
            n: s.len(),
        }
    }

    /// A single measurement.
    pub fn one(value: f64) -> Summary {
        Summary::of(&[value])
    }

    /// The `q` quantile (0 to 1) of `samples`, nearest rank.
    pub fn quantile(samples: &[f64], q: f64) -> f64 {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = (q * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    }
}

/// Runs `f` and returns its result and the seconds it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed().as_secs_f64())
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), in bytes.
pub fn peak_rss() -> Option<u64> {
    status_field("VmHWM:")
}

fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Bytes this process has passed to `write` and similar calls so far (`wchar` in
/// `/proc/self/io`): with the figure's record count, the write amplification of a store.
pub fn bytes_written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`
/// (Linux's clock ticks are 1/100 s).
pub fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// CPU seconds this process has used since `before` (a [`cpu_secs`] reading); zero where
/// /proc does not say.
pub fn cpu_secs_since(before: Option<f64>) -> f64 {
    match (before, cpu_secs()) {
        (Some(b), Some(a)) => a - b,
        _ => 0.0,
    }
}

/// CPU seconds (user + system) the calling thread has used so far
/// (`CLOCK_THREAD_CPUTIME_ID`: nanosecond resolution, unlike the 10 ms ticks of
/// `/proc/thread-self/stat`). Zero if the clock cannot be read.
pub fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call, which only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
