//! The records, files and status API of a node, as the engine answers it.

use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

use serde_json::json;

use super::SyncEngine;
use crate::http::access::Grant;
use crate::record::Scope;

/// The `/v1/status` document, limited to the scopes `grant` may read (also used by the CLI on
/// a data directory).
pub(crate) fn status_json(engine: &SyncEngine, grant: &Grant) -> crate::Result<serde_json::Value> {
    let marks = engine.watermarks()?;
    let readable = |s: &Scope| grant.can_read(s);
    let mut scopes = BTreeMap::new();
    for scope in engine.scopes()?.into_iter().filter(|s| readable(s)) {
        let counts = engine.residency_counts(&scope)?;
        let origins: BTreeMap<String, String> = marks
            .scope(&scope)
            .map(|w| {
                w.iter()
                    .map(|h| (h.origin().to_string(), h.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        scopes.insert(
            scope.as_str().to_owned(),
            json!({
                "watermarks": origins,
                "residency": {
                    "resident": counts.resident,
                    "staged": counts.staged,
                    "tombstoned": counts.tombstoned,
                },
            }),
        );
    }
    let last = engine.last_exchanges();
    let mut peers = Vec::new();
    for peer in engine.peers()? {
        let known = engine.peer_watermarks(peer)?.unwrap_or_default();
        let mut lacks = Vec::new();
        for (scope, ours) in marks.iter().filter(|(s, _)| readable(s)) {
            for mark in ours.iter() {
                let theirs = known.get(scope, mark.origin());
                if theirs < Some(mark) {
                    lacks.push(json!({
                        "scope": scope.as_str(),
                        "origin": mark.origin().to_string(),
                        "ours": mark.to_string(),
                        "theirs": theirs.map(|h| h.to_string()),
                    }));
                }
            }
        }
        // What the peer held, as of the last round, that we lack.
        let mut behind = Vec::new();
        for (scope, theirs) in known.iter().filter(|(s, _)| readable(s)) {
            for mark in theirs.iter() {
                let ours = marks.get(scope, mark.origin());
                if ours < Some(mark) {
                    behind.push(json!({
                        "scope": scope.as_str(),
                        "origin": mark.origin().to_string(),
                        "ours": ours.map(|h| h.to_string()),
                        "theirs": mark.to_string(),
                    }));
                }
            }
        }
        let last_ms = last
            .get(&peer)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        peers.push(json!({
            "id": peer.to_string(),
            "last_exchange_unix_ms": last_ms,
            "lacks": lacks,
            "behind": behind,
        }));
    }
    let blobs = engine.blob_store().list()?;
    Ok(json!({
        "node": engine.node_id().to_string(),
        "scopes": scopes,
        "peers": peers,
        "blobs": { "count": blobs.len(), "bytes": blobs.iter().map(|(_, n)| n).sum::<u64>() },
    }))
}
