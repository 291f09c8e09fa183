//! What a node counts ([`Metrics`]), served as `GET /metrics` in the Prometheus text format
//! (exposition format 0.0.4, encoded by `prometheus-client`, the official Rust client).
//!
//! The server records what it serves (requests and their latency, the sync messages it
//! answers, its connections); the node records the rounds it initiates, through the
//! scheduler's hooks ([`Metrics::round_started`], [`Metrics::round_ended`]). docs/http.md
//! lists every metric and its labels.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::{Error, TransportError};
use crate::exchange::{ExchangeOutcome, Halt, HaltReason};
use crate::poison::lock;

/// The `Content-Type` of `GET /metrics`.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    kind: &'static str,
    status: &'static str,
    token: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    kind: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoundLabels {
    peer: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    role: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HaltLabels {
    role: &'static str,
    by: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    direction: &'static str,
}

/// Request latencies: 0.5 ms to about 16 s.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Round latencies: 1 ms to about 65 s.
fn round_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// A node's counters, gauges and histograms. One per node, shared by its server and its
/// scheduler's hooks (`Arc<Metrics>`); [`crate::http::ServerConfig::metrics`] holds it.
pub struct Metrics {
    registry: Registry,
    sync_requests: Family<SyncLabels, Counter>,
    request_seconds: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    message_bytes: Family<BytesLabels, Counter>,
    connections_open: Gauge,
    connections_evicted: Counter,
    connections_shed: Counter,
    rounds: Family<RoundLabels, Counter>,
    round_seconds: Family<PeerLabels, Histogram, fn() -> Histogram>,
    versions: Family<VersionLabels, Counter>,
    halts: Family<HaltLabels, Counter>,
    files: Family<FileLabels, Counter>,
    store_bytes: Gauge,
    staged_files: Gauge,
    /// Counts the Staged files at a scrape, at most once a [`STAGED_EVERY`].
    staged_source: Mutex<Option<StagedSource>>,
    /// The file whose length [`Metrics::render`] reports as the store's size.
    store_file: Mutex<Option<PathBuf>>,
    /// When each peer's round in progress started.
    round_starts: Mutex<HashMap<String, Instant>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric at zero (families without a series yet).
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("highwater"),
            sync_requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            message_bytes: Family::default(),
            connections_open: Gauge::default(),
            connections_evicted: Counter::default(),
            connections_shed: Counter::default(),
            rounds: Family::default(),
            round_seconds: Family::new_with_constructor(round_histogram),
            versions: Family::default(),
            halts: Family::default(),
            files: Family::default(),
            store_bytes: Gauge::default(),
            staged_files: Gauge::default(),
            staged_source: Mutex::new(None),
            store_file: Mutex::new(None),
            round_starts: Mutex::new(HashMap::new()),
        };
        m.registered()
    }

    fn registered(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "sync_requests",
            "Exchanges and audits this node answered, by kind, status class and token name (empty: no valid token)",
            self.sync_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from a request's headers to its response's headers, by endpoint (a watch waits for news)",
            self.request_seconds.clone(),
        );
        r.register(
            "sync_message_bytes",
            "Bytes of the exchange and audit messages this node answered: requests received, responses sent",
            self.message_bytes.clone(),
        );
        r.register(
            "http_connections_open",
            "Connections the server holds open",
            self.connections_open.clone(),
        );
        r.register(
            "http_connections_evicted",
            "Idle connections closed to make room at the connection cap",
            self.connections_evicted.clone(),
        );
        r.register(
            "http_connections_shed",
            "Connections refused at the cap because every connection was busy",
            self.connections_shed.clone(),
        );
        r.register(
            "rounds",
            "Rounds this node initiated, by peer and outcome",
            self.rounds.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Duration of the rounds this node initiated, by peer",
            self.round_seconds.clone(),
        );
        r.register(
            "versions",
            "Versions shipped and received, as initiator (rounds this node ran) and responder (exchanges it answered); applied: received versions that changed this node",
            self.versions.clone(),
        );
        r.register(
            "halts",
            "Streams halted, by role, by whom (this node or its peer) and reason",
            self.halts.clone(),
        );
        r.register(
            "files",
            "Files fetched from and pushed to peers in rounds this node initiated",
            self.files.clone(),
        );
        r.register(
            "store_bytes",
            "Size of the node's database file",
            self.store_bytes.clone(),
        );
        r.register(
            "staged_files",
            "Files referenced by stored records that this node's blob store lacks (their records are Staged), counted at most once a minute",
            self.staged_files.clone(),
        );
        self
    }

    /// Reports what `count` returns as `highwater_staged_files` (files referenced by stored
    /// records that the blob store lacks), counted at a scrape at most once a minute
    /// ([`STAGED_EVERY`]): counting looks at every referenced blob. `None` from `count` (a
    /// store failure) leaves the last figure.
    pub fn watch_staged_files(&self, count: impl Fn() -> Option<u64> + Send + Sync + 'static) {
        *lock(&self.staged_source) = Some(StagedSource {
            count: Box::new(count),
            last: None,
        });
    }

    /// Reports the length of `path` (the node's database file) as `highwater_store_bytes`
    /// at every scrape.
    pub fn watch_store_file(&self, path: PathBuf) {
        *lock(&self.store_file) = Some(path);
    }

    /// A round this node initiates with `peer` starts (the scheduler's `before_round` hook).
    pub fn round_started(&self, peer: &str) {
        lock(&self.round_starts).insert(peer.to_owned(), Instant::now());
    }

    /// A round with `peer` ended with `result` (the scheduler's `after_round` hook): counts
    /// it by outcome, its duration since [`Metrics::round_started`], and on success what it
    /// moved and halted.
    pub fn round_ended(&self, peer: &str, result: &Result<ExchangeOutcome, Error>) {
        let started = lock(&self.round_starts).remove(peer);
        if let Some(started) = started {
            self.round_seconds
                .get_or_create(&PeerLabels {
                    peer: peer.to_owned(),
                })
                .observe(started.elapsed().as_secs_f64());
        }
        self.rounds
            .get_or_create(&RoundLabels {
                peer: peer.to_owned(),
                outcome: round_outcome(result),
            })
            .inc();
        let Ok(outcome) = result else { return };
        for (direction, n) in [
            ("shipped", outcome.shipped),
            ("received", outcome.received),
            ("applied", outcome.applied),
        ] {
            self.count_versions("initiator", direction, n);
        }
        self.count_halts("initiator", "us", &outcome.halts);
        self.count_halts("initiator", "peer", &outcome.peer_halts);
        for (direction, n) in [
            ("fetched", outcome.blobs_fetched),
            ("pushed", outcome.blobs_pushed),
        ] {
            self.files
                .get_or_create(&FileLabels { direction })
                .inc_by(n as u64);
        }
    }

    pub(crate) fn count_versions(&self, role: &'static str, direction: &'static str, n: usize) {
        self.versions
            .get_or_create(&VersionLabels { role, direction })
            .inc_by(n as u64);
    }

    pub(crate) fn count_halts(&self, role: &'static str, by: &'static str, halts: &[Halt]) {
        for halt in halts {
            self.halts
                .get_or_create(&HaltLabels {
                    role,
                    by,
                    reason: halt_reason(&halt.reason),
                })
                .inc();
        }
    }

    /// One request answered: its latency by endpoint, and for a sync message its outcome by
    /// token (`None`: the request had no valid token).
    pub(crate) fn request(
        &self,
        endpoint: &'static str,
        token: Option<&str>,
        status: StatusCode,
        took: Duration,
    ) {
        self.request_seconds
            .get_or_create(&EndpointLabels { endpoint })
            .observe(took.as_secs_f64());
        if matches!(endpoint, "exchange" | "pull" | "push" | "audit") {
            self.sync_requests
                .get_or_create(&SyncLabels {
                    kind: endpoint,
                    status: status_class(status),
                    token: token.unwrap_or_default().to_owned(),
                })
                .inc();
        }
    }

    /// A sync message answered: the bytes of its request and of its response.
    pub(crate) fn message(&self, kind: &'static str, received: usize, sent: usize) {
        for (direction, n) in [("received", received), ("sent", sent)] {
            self.message_bytes
                .get_or_create(&BytesLabels { kind, direction })
                .inc_by(n as u64);
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_open.dec();
    }

    pub(crate) fn connection_evicted(&self) {
        self.connections_evicted.inc();
    }

    pub(crate) fn connection_shed(&self) {
        self.connections_shed.inc();
    }

    /// Every metric in the Prometheus text format. Reads the store file's length (one
    /// `stat`): call it off the runtime's threads.
    pub fn render(&self) -> String {
        let path = lock(&self.store_file).clone();
        if let Some(len) = path
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
        {
            self.store_bytes.set(i64::try_from(len).unwrap_or(i64::MAX));
        }
        if let Some(source) = lock(&self.staged_source).as_mut() {
            let due = source.last.is_none_or(|at| at.elapsed() >= STAGED_EVERY);
            if due {
                source.last = Some(Instant::now());
                if let Some(n) = (source.count)() {
                    self.staged_files.set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// How often a scrape counts the Staged files at most.
pub const STAGED_EVERY: Duration = Duration::from_secs(60);

/// Where the Staged files' count comes from, and when it was last taken.
struct StagedSource {
    count: Box<dyn Fn() -> Option<u64> + Send + Sync>,
    last: Option<Instant>,
}

/// `2xx`, `4xx`, `5xx`...
fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

fn halt_reason(reason: &HaltReason) -> &'static str {
    match reason {
        HaltReason::ClockSkew { .. } => "clock_skew",
        HaltReason::OwnOrigin => "own_origin",
        HaltReason::BlobUnavailable { .. } => "blob_unavailable",
        HaltReason::BelowFloor { .. } => "below_floor",
    }
}

/// What became of a round: `ok`, or the class of its failure.
fn round_outcome(result: &Result<ExchangeOutcome, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::Transport(t)) => match t {
            TransportError::Unreachable { .. } => "unreachable",
            TransportError::Certificate { .. } => "certificate",
            TransportError::Refused { .. } => "refused",
            TransportError::BadResponse(_) => "bad_response",
            TransportError::BlobNotFound { .. } | TransportError::BlobTransfer { .. } => "file",
            _ => "transport",
        },
        Err(Error::Protocol(_) | Error::Wire(_)) => "protocol",
        Err(Error::Clock(_)) => "clock",
        Err(Error::Store(_) | Error::Blob(_)) => "storage",
        Err(_) => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::NodeId;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn staged_files_are_counted_at_a_scrape_at_most_once_a_minute() {
        let m = Metrics::new();
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        m.watch_staged_files(move || Some(3 + counted.fetch_add(1, Ordering::SeqCst)));
        let first = m.render();
        assert!(first.contains("highwater_staged_files 3\n"), "{first}");
        // A second scrape within the minute shows the same figure without counting again.
        let second = m.render();
        assert!(second.contains("highwater_staged_files 3\n"), "{second}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn rounds_are_counted_by_peer_and_outcome_with_what_they_moved() {
        let m = Metrics::new();
        let peer = NodeId::random();
        let outcome = ExchangeOutcome {
            peer,
            shipped: 2,
            received: 5,
            applied: 4,
            has_more: false,
            halts: vec![Halt {
                scope: crate::record::Scope::shared(),
                origin: peer,
                reason: HaltReason::OwnOrigin,
            }],
            peer_halts: Vec::new(),
            blobs_pushed: 1,
            blobs_fetched: 0,
            refused: 0,
            dropped: 0,
            audit_wanted: false,
            remaining: None,
        };
        m.round_started("hub");
        m.round_ended("hub", &Ok(outcome));
        let refused = TransportError::Refused {
            code: crate::transport::RefusalCode::Forbidden,
            reason: "no".into(),
        };
        m.round_ended("hub", &Err(refused.into()));
        let text = m.render();
        for line in [
            r#"highwater_rounds_total{peer="hub",outcome="ok"} 1"#,
            r#"highwater_rounds_total{peer="hub",outcome="refused"} 1"#,
            r#"highwater_versions_total{role="initiator",direction="received"} 5"#,
            r#"highwater_versions_total{role="initiator",direction="applied"} 4"#,
            r#"highwater_halts_total{role="initiator",by="us",reason="own_origin"} 1"#,
            r#"highwater_files_total{direction="pushed"} 1"#,
            r#"highwater_round_duration_seconds_count{peer="hub"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
