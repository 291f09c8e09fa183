//! The status document (`GET /v1/status`) as text for people.

use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::hlc::Hlc;

/// Renders a status document (the JSON of `GET /v1/status`) as a human-readable report:
/// the node, its files, each scope's residency counts and watermark per origin, and each
/// peer with what it lacks from this node and what this node lacks from it (as of their
/// last round). Fields it does not know are left out rather than guessed.
pub fn render_status(status: &Value) -> String {
    let now = SystemTime::now();
    let mut out = String::new();
    let text = |v: &Value, name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    let num = |v: &Value, name: &str| v.get(name).and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(out, "node   {}", text(status, "node").unwrap_or_default());
    if let Some(blobs) = status.get("blobs") {
        let _ = writeln!(
            out,
            "files  {} ({})",
            num(blobs, "count"),
            bytes(num(blobs, "bytes"))
        );
    }
    let scopes = status.get("scopes").and_then(Value::as_object);
    let _ = writeln!(out, "\nscopes");
    match scopes {
        Some(scopes) if !scopes.is_empty() => {
            for (name, scope) in scopes {
                let r = scope.get("residency").unwrap_or(&Value::Null);
                let _ = writeln!(
                    out,
                    "  {name}: {} resident, {} staged, {} tombstoned",
                    num(r, "resident"),
                    num(r, "staged"),
                    num(r, "tombstoned")
                );
                let marks = scope.get("watermarks").and_then(Value::as_object);
                for (origin, mark) in marks.into_iter().flatten() {
                    let when = mark
                        .as_str()
                        .map(|m| describe_mark(m, now))
                        .unwrap_or_default();
                    let _ = writeln!(out, "    origin {origin}  up to {when}");
                }
            }
        }
        _ => out.push_str("  (none)\n"),
    }
    let _ = writeln!(out, "\npeers");
    let peers = status.get("peers").and_then(Value::as_array);
    match peers {
        Some(peers) if !peers.is_empty() => {
            for peer in peers {
                render_peer(&mut out, peer, now);
            }
        }
        _ => out.push_str("  (none)\n"),
    }
    out
}

fn render_peer(out: &mut String, peer: &Value, now: SystemTime) {
    let id = peer.get("id").and_then(Value::as_str).unwrap_or("?");
    let last = match peer.get("last_exchange_unix_ms").and_then(Value::as_u64) {
        Some(ms) => {
            let at = UNIX_EPOCH + Duration::from_millis(ms);
            format!(
                "last round {} ago",
                age(now.duration_since(at).unwrap_or_default())
            )
        }
        None => "no round since it started".to_owned(),
    };
    let count = |name: &str| peer.get(name).and_then(Value::as_array).map_or(0, Vec::len);
    let (lacks, behind) = (count("lacks"), count("behind"));
    let state = if lacks == 0 && behind == 0 {
        "in sync".to_owned()
    } else {
        format!(
            "it lacks {lacks} stream{} of ours; we lack {behind} of its",
            if lacks == 1 { "" } else { "s" }
        )
    };
    let _ = writeln!(out, "  {id}  {last}  {state}");
    for (name, label) in [("lacks", "it lacks"), ("behind", "we lack")] {
        for gap in peer
            .get(name)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = |f: &str| gap.get(f).and_then(Value::as_str).unwrap_or("-");
            let _ = writeln!(
                out,
                "    {label} {} from origin {}: ours up to {}, theirs up to {}",
                field("scope"),
                field("origin"),
                gap.get("ours")
                    .and_then(Value::as_str)
                    .map_or("nothing".into(), |m| describe_mark(m, now)),
                gap.get("theirs")
                    .and_then(Value::as_str)
                    .map_or("nothing".into(), |m| describe_mark(m, now)),
            );
        }
    }
}

/// A watermark as its time and age (`2025-01-01T12:00:03.1Z (4s ago)`), or as it is.
fn describe_mark(mark: &str, now: SystemTime) -> String {
    match mark.parse::<Hlc>() {
        Ok(hlc) => {
            let time = hlc.as_uhlc().get_time();
            let age = now
                .duration_since(time.to_system_time())
                .map(|d| format!(" ({} ago)", self::age(d)))
                .unwrap_or_default();
            format!("{}{age}", time.to_string_rfc3339_lossy())
        }
        Err(_) => mark.to_owned(),
    }
}

fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_scopes_marks_and_peer_gaps() {
        let status = json!({
            "node": "aa",
            "scopes": {"shared": {
                "watermarks": {"aa": "7000000000000000000/aa"},
                "residency": {"resident": 3, "staged": 1, "tombstoned": 2},
            }},
            "peers": [
                {"id": "bb", "last_exchange_unix_ms": null, "lacks": [], "behind": []},
                {"id": "cc", "last_exchange_unix_ms": 1, "behind": [],
                 "lacks": [{"scope": "shared", "origin": "aa", "ours": "7000000000000000000/aa", "theirs": null}]},
            ],
            "blobs": {"count": 2, "bytes": 3 << 20},
        });
        let text = render_status(&status);
        assert!(
            text.contains("shared: 3 resident, 1 staged, 2 tombstoned"),
            "{text}"
        );
        assert!(text.contains("origin aa  up to 2"), "{text}");
        assert!(text.contains("files  2 (3.0 MiB)"), "{text}");
        assert!(
            text.contains("bb  no round since it started  in sync"),
            "{text}"
        );
        assert!(text.contains("cc  last round"), "{text}");
        assert!(
            text.contains("it lacks 1 stream of ours; we lack 0 of its"),
            "{text}"
        );
        assert!(
            text.contains("it lacks shared from origin aa: ours up to 2"),
            "{text}"
        );
        assert!(text.contains("theirs up to nothing"), "{text}");
    }
}
