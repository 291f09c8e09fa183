//! Rows of figures and the markdown table they print as.

use crate::measure::Summary;

/// How a figure is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Records per second.
    RecordsPerSec,
    /// 10^6 bytes per second.
    MbPerSec,
    /// Seconds, shown in milliseconds.
    Millis,
    /// Seconds.
    Secs,
    /// Bytes.
    Bytes,
    /// Bytes, shown in MiB.
    MiB,
    /// Events per second (rounds, requests).
    PerSec,
    /// A plain count.
    Count,
    /// A dimensionless ratio.
    Ratio,
}

impl Unit {
    /// The number and its unit.
    fn parts(self, v: f64) -> (String, &'static str) {
        match self {
            Unit::RecordsPerSec => (group(v), "rec/s"),
            Unit::MbPerSec => (format!("{v:.0}"), "MB/s"),
            Unit::Millis if v < 0.001 => (format!("{:.1}", v * 1e6), "µs"),
            Unit::Millis => (format!("{:.2}", v * 1e3), "ms"),
            Unit::Secs => (format!("{v:.2}"), "s"),
            Unit::Bytes => (group(v), "B"),
            Unit::MiB => (format!("{:.1}", v / f64::from(1u32 << 20)), "MiB"),
            Unit::PerSec => (group(v), "/s"),
            Unit::Count => (group(v), ""),
            Unit::Ratio => (format!("{v:.2}"), ""),
        }
    }

    fn show(self, v: f64) -> String {
        let (n, unit) = self.parts(v);
        if unit.is_empty() {
            n
        } else {
            format!("{n} {unit}")
        }
    }
}

/// `n` with groups of three digits.
pub fn count(n: u64) -> String {
    group(n as f64)
}

/// `v` rounded, with thin groups of three digits.
fn group(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// What a target bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// The median must be at least this.
    AtLeast(f64),
    /// The median must be at most this.
    AtMost(f64),
    /// The ratio to the `versus` row must be at least this.
    RatioAtLeast(f64),
}

/// One figure of one case.
#[derive(Clone, Debug)]
pub struct Row {
    /// The case, with its size (for example "initial sync, in-process, 1 000 000 records").
    pub case: String,
    /// What was measured.
    pub figure: String,
    /// How it is shown.
    pub unit: Unit,
    /// The samples' median and range.
    pub summary: Summary,
    /// The name other rows use to refer to this one (limits, figures a peer compares with).
    pub key: Option<String>,
    /// The ratio column: this figure over the figure of the row with this key.
    pub versus: Option<String>,
    /// The targets for this figure.
    pub targets: Vec<Bound>,
}

impl Row {
    /// A row without key, ratio or target.
    pub fn new(case: impl Into<String>, figure: impl Into<String>, unit: Unit, s: Summary) -> Row {
        Row {
            case: case.into(),
            figure: figure.into(),
            unit,
            summary: s,
            key: None,
            versus: None,
            targets: Vec::new(),
        }
    }

    /// Names this row so others can refer to it.
    pub fn key(mut self, key: impl Into<String>) -> Row {
        self.key = Some(key.into());
        self
    }

    /// Shows this figure as a ratio to the row named `key`.
    pub fn versus(mut self, key: impl Into<String>) -> Row {
        self.versus = Some(key.into());
        self
    }

    /// Adds one of the targets for this figure.
    pub fn target(mut self, bound: Bound) -> Row {
        self.targets.push(bound);
        self
    }
}

/// A target's verdict: met, or missed by how much (percent of the bound).
fn verdict(bound: Bound, unit: Unit, value: f64, ratio: Option<f64>) -> String {
    let (text, v, want, at_least) = match bound {
        Bound::AtLeast(b) => (format!("≥ {}", unit.show(b)), value, b, true),
        Bound::AtMost(b) => (format!("≤ {}", unit.show(b)), value, b, false),
        Bound::RatioAtLeast(b) => match ratio {
            Some(r) => (format!("ratio ≥ {}", trim(b)), r, b, true),
            None => return format!("ratio ≥ {}: limit not measured", trim(b)),
        },
    };
    let met = if at_least { v >= want } else { v <= want };
    if met {
        format!("{text}: met")
    } else {
        let by = ((v - want) / want * 100.0).abs();
        format!("{text}: **missed by {by:.0} %**")
    }
}

fn trim(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() >= 1000.0 {
        group(v)
    } else {
        format!("{v}")
    }
}

/// Prints `rows` as a markdown table. Targets are judged only when `judge` (full sizes).
pub fn print_table(rows: &[Row], judge: bool) {
    println!("| case | figure | median | range (runs) | ratio | target |");
    println!("|---|---|--:|---|---|---|");
    for row in rows {
        let s = row.summary;
        let range = if s.n > 1 {
            // The minimum in the maximum's unit (µs and ms may differ).
            let (max, unit) = row.unit.parts(s.max);
            let min = match row.unit {
                Unit::Millis if s.max >= 0.001 => format!("{:.2}", s.min * 1e3),
                _ => row.unit.parts(s.min).0,
            };
            let unit = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            format!("{min} to {max}{unit} ({})", s.n)
        } else {
            "(1)".to_owned()
        };
        let reference = row
            .versus
            .as_ref()
            .map(|k| (k, rows.iter().find(|r| r.key.as_ref() == Some(k))));
        let ratio = match reference {
            Some((_, Some(r))) if r.summary.median != 0.0 => {
                Some(row.summary.median / r.summary.median)
            }
            _ => None,
        };
        let ratio_text = match (reference, ratio) {
            (Some((k, Some(_))), Some(x)) => format!("{x:.2} × {k}"),
            (Some((k, _)), _) => format!("({k} not measured)"),
            (None, _) => String::new(),
        };
        let target = if row.targets.is_empty() {
            String::new()
        } else if judge {
            let verdicts: Vec<_> = row
                .targets
                .iter()
                .map(|&b| verdict(b, row.unit, s.median, ratio))
                .collect();
            verdicts.join("; ")
        } else {
            "not judged (quick sizes)".to_owned()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row.case,
            row.figure,
            row.unit.show(s.median),
            range,
            ratio_text,
            target
        );
    }
}
