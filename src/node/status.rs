//! The status document (`GET /v1/status`) as text for people.

use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::terminal::escape_line;
use crate::api::{HaltSide, PeerLag, PeerLink, Status};
use crate::hlc::Hlc;

/// Renders a status document as a human-readable report: the node, its files, each scope's
/// residency counts and watermark per origin, and each peer with what it lacks from this
/// node and what this node lacks from it (as of their last round).
pub fn render_status(status: &Status) -> String {
    let now = SystemTime::now();
    let mut out = String::new();
    let _ = writeln!(out, "node   {}", status.node);
    if status.clock_ahead_ms > status.max_drift_ms {
        let _ = writeln!(
            out,
            "clock  {} ahead of this machine's clock (beyond the max drift of {} ms): peers \
             refuse this node's new writes until the wall clock catches up",
            age(Duration::from_millis(status.clock_ahead_ms)),
            status.max_drift_ms
        );
    }
    let _ = writeln!(
        out,
        "files  {} ({})",
        status.blobs.count,
        bytes(status.blobs.bytes)
    );
    let _ = writeln!(out, "\nscopes");
    if status.scopes.is_empty() {
        out.push_str("  (none)\n");
    }
    for (name, scope) in &status.scopes {
        let r = &scope.residency;
        let _ = writeln!(
            out,
            "  {name}: {} resident, {} staged, {} tombstoned; {}",
            r.resident,
            r.staged,
            r.tombstoned,
            scope.hydration.as_str().replace('_', " ")
        );
        for (origin, mark) in &scope.watermarks {
            let _ = writeln!(
                out,
                "    origin {origin}  up to {}",
                describe_mark(mark, now)
            );
        }
    }
    let _ = writeln!(out, "\npeers");
    if status.peers.is_empty() && status.configured_peers.is_empty() {
        out.push_str("  (none)\n");
    }
    for link in &status.configured_peers {
        let lag = status.peers.iter().find(|p| Some(p.id) == link.id);
        render_link(&mut out, link, lag, now);
    }
    for peer in &status.peers {
        if !status
            .configured_peers
            .iter()
            .any(|l| l.id == Some(peer.id))
        {
            render_peer(&mut out, &peer.id.to_string(), peer, now);
        }
    }
    out
}

/// A peer this node syncs with: its URL and state, then its lag if a round has met it.
fn render_link(out: &mut String, link: &PeerLink, lag: Option<&PeerLag>, now: SystemTime) {
    let since = |ms: u64| {
        age(now
            .duration_since(UNIX_EPOCH + Duration::from_millis(ms))
            .unwrap_or_default())
    };
    let state = match (link.connected, link.last_success_unix_ms) {
        (true, Some(ms)) => format!("connected, last success {} ago", since(ms)),
        (false, Some(ms)) => format!("not connected, last success {} ago", since(ms)),
        (_, None) if link.consecutive_failures > 0 => "not connected, never synced".to_owned(),
        (_, None) => "not synced yet".to_owned(),
    };
    let id = link
        .id
        .map(|id| format!("  (node {id})"))
        .unwrap_or_default();
    let lag_state = lag
        .map(|l| format!("  {}", lag_summary(l)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  {}  {state}{id}{lag_state}",
        escape_line(link.name.as_bytes())
    );
    if let Some(error) = &link.last_error {
        let failures = match link.consecutive_failures {
            0 => "since recovered".to_owned(),
            n => format!("{n} failure{} in a row", if n == 1 { "" } else { "s" }),
        };
        let _ = writeln!(
            out,
            "    last error ({failures}): {}",
            escape_line(error.as_bytes())
        );
    }
    if let Some(pull) = link.pull.filter(|p| p.remaining.is_some_and(|r| r > 0)) {
        let _ = writeln!(
            out,
            "    pulling: {} of {} versions received",
            pull.received,
            pull.total().unwrap_or_default()
        );
    }
    if link.unacknowledged > 0 {
        let _ = writeln!(
            out,
            "    {} local write(s) it has not acknowledged yet",
            link.unacknowledged
        );
    }
    if link.files_missing > 0 {
        let _ = writeln!(
            out,
            "    {} stream(s) waiting for a file from it",
            link.files_missing
        );
    }
    for h in &link.halted {
        let who = match h.by {
            HaltSide::Here => "halted here",
            HaltSide::Peer => "halted by the peer",
        };
        let skew = h
            .ahead_by_ms
            .map(|ms| format!(" ({ms} ms ahead)"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    {who}: {} from origin {}: {}{skew}",
            h.scope, h.origin, h.reason
        );
    }
    if let Some(lag) = lag {
        render_lag(out, lag, now);
    }
}

fn render_peer(out: &mut String, name: &str, peer: &PeerLag, now: SystemTime) {
    let last = match peer.last_exchange_unix_ms {
        Some(ms) => {
            let at = UNIX_EPOCH + Duration::from_millis(ms);
            format!(
                "last round {} ago",
                age(now.duration_since(at).unwrap_or_default())
            )
        }
        None => "no round since it started".to_owned(),
    };
    let _ = writeln!(out, "  {name}  {last}  {}", lag_summary(peer));
    render_lag(out, peer, now);
}

/// "in sync", or how many streams either side lacks, as of the last round.
fn lag_summary(peer: &PeerLag) -> String {
    let (lacks, behind) = (peer.lacks.len(), peer.behind.len());
    if lacks == 0 && behind == 0 {
        "in sync".to_owned()
    } else {
        format!(
            "it lacks {lacks} stream{} of ours; we lack {behind} of its",
            if lacks == 1 { "" } else { "s" }
        )
    }
}

/// A peer's last audit and the streams either side lacks.
fn render_lag(out: &mut String, peer: &PeerLag, now: SystemTime) {
    if let Some(audit) = &peer.last_audit {
        let at = UNIX_EPOCH + Duration::from_millis(audit.at_unix_ms);
        let found = if audit.received + audit.shipped + audit.files_repaired == 0 {
            "nothing differed".to_owned()
        } else {
            format!(
                "received {} version(s) ({} key(s) repaired here), sent {}, fetched {} file(s)",
                audit.received, audit.repaired, audit.shipped, audit.files_repaired
            )
        };
        let _ = writeln!(
            out,
            "    last audit {} ago ({}): {found}",
            age(now.duration_since(at).unwrap_or_default()),
            if audit.initiated { "ours" } else { "theirs" }
        );
    }
    for (gaps, label) in [(&peer.lacks, "it lacks"), (&peer.behind, "we lack")] {
        for gap in gaps {
            let mark = |m: Option<Hlc>| m.map_or("nothing".into(), |m| describe_mark(&m, now));
            let _ = writeln!(
                out,
                "    {label} {} from origin {}: ours up to {}, theirs up to {}",
                gap.scope,
                gap.origin,
                mark(gap.ours),
                mark(gap.theirs),
            );
        }
    }
}

/// A watermark as its time and age (`2025-01-01T12:00:03.1Z (4s ago)`).
fn describe_mark(mark: &Hlc, now: SystemTime) -> String {
    let time = mark.as_uhlc().get_time();
    let age = now
        .duration_since(time.to_system_time())
        .map(|d| format!(" ({} ago)", self::age(d)))
        .unwrap_or_default();
    format!("{}{age}", time.to_string_rfc3339_lossy())
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
        let status: Status = serde_json::from_value(status).unwrap();
        let text = render_status(&status);
        assert!(
            text.contains("shared: 3 resident, 1 staged, 2 tombstoned; not started"),
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
