//! One-shot sync: exchange rounds with one peer until neither side has anything left.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::{AuditOutcome, ExchangeOptions, SyncEngine};
use crate::error::{Result, TransportError};
use crate::exchange::{Halt, HaltReason};
use crate::hlc::NodeId;
use crate::notify::follow_pages;
use crate::record::BlobRef;
use crate::transport::{Layer, Layered, Transport};

use super::terminal::escape_line;

/// What a one-shot sync moved so far (or in all, once it returns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncTotals {
    /// The peer, once it answered.
    pub peer: Option<NodeId>,
    /// Rounds completed.
    pub rounds: usize,
    /// Versions received from the peer.
    pub received: usize,
    /// Received versions that changed this node's state.
    pub applied: usize,
    /// Versions sent to the peer.
    pub shipped: usize,
    /// Files fetched from the peer.
    pub blobs_fetched: usize,
    /// Files uploaded to the peer.
    pub blobs_pushed: usize,
    /// Bytes of files fetched (including transfers that failed part-way).
    pub bytes_fetched: u64,
    /// Bytes of files uploaded.
    pub bytes_pushed: u64,
    /// Streams halted in the last round, by either side (clock skew, a file that could not
    /// be had): they are retried by the next sync.
    pub halts: Vec<Halt>,
    /// The peer's purge floor rose during the sync: an audit with it should follow (see
    /// [`crate::ExchangeOutcome::audit_wanted`]); `highwater sync` runs one.
    pub audit_wanted: bool,
    /// Versions the peer still held for this node after the last round, as it counted them
    /// ([`crate::ExchangeOutcome::remaining`]); `None` if it did not (a version 1 peer).
    pub remaining: Option<u64>,
}

impl SyncTotals {
    /// The sync's total of versions to receive, `received + remaining`, when the peer
    /// counted (a progress bar's length); `None` otherwise (a spinner).
    pub fn total(&self) -> Option<u64> {
        self.remaining
            .map(|r| (self.received as u64).saturating_add(r))
    }
}

/// Runs rounds with the peer behind `transport` while either side has more to send, calling
/// `progress` after each round and after each page of a streamed pull within one (its
/// `sync_page_applied`: a round may bring hundreds of pages); returns the totals.
///
/// # Errors
/// A round failed (the transport, the peer's answer, or the store). Every round completed
/// before it stays applied.
pub async fn sync_until_done<T: Transport>(
    engine: &SyncEngine,
    transport: &T,
    options: &ExchangeOptions,
    mut progress: impl FnMut(&SyncTotals),
) -> Result<SyncTotals> {
    let metered: Layered<&T, Metered> = Layered::new(transport);
    let mut totals = SyncTotals::default();
    let mut pages = engine.notifier().follow();
    loop {
        // Progress within the round, from its pages' events: named by the peer's id (the
        // session `exchange_with` keeps has no name), which is unknown until it answers.
        let known = totals.peer.or(transport.peer_id());
        let mut now = totals.clone();
        let round = engine.exchange_with(&metered, options);
        let ours = |peer: &str| known.is_none_or(|p| p.to_string() == peer);
        let outcome = follow_pages(&mut pages, round, ours, |page| {
            now.received += page.received;
            now.applied += page.applied;
            now.remaining = page.remaining;
            progress(&now);
        })
        .await?;
        totals.peer = Some(outcome.peer);
        totals.rounds += 1;
        totals.received += outcome.received;
        totals.applied += outcome.applied;
        totals.shipped += outcome.shipped;
        totals.blobs_fetched += outcome.blobs_fetched;
        totals.blobs_pushed += outcome.blobs_pushed;
        totals.bytes_fetched = metered.layer().fetched.load(Ordering::Relaxed);
        totals.bytes_pushed = metered.layer().pushed.load(Ordering::Relaxed);
        totals.halts = outcome.halts;
        totals.halts.extend(outcome.peer_halts);
        totals.audit_wanted |= outcome.audit_wanted;
        totals.remaining = outcome.remaining;
        progress(&totals);
        if !outcome.has_more {
            return Ok(totals);
        }
    }
}

/// What an audit found, for people: a summary line, then the keys it repaired here (at
/// most `shown`, escaped for a terminal; the rest counted), then the streams halted.
pub fn render_audit(outcome: &AuditOutcome, took: Duration, shown: usize) -> String {
    let peer = outcome.peer.map(|p| p.to_string()).unwrap_or_default();
    let mut out = format!(
        "audited against {peer} in {} request{} ({:.1} s): ",
        outcome.rounds,
        if outcome.rounds == 1 { "" } else { "s" },
        took.as_secs_f64()
    );
    if outcome.clean() {
        out.push_str("the same live contents on both sides\n");
    } else {
        out.push_str(&format!(
            "received {} versions ({} keys repaired here), sent {}; files: fetched {} ({} of \
             Staged records here), sent {}\n",
            outcome.received,
            outcome.repaired.len(),
            outcome.shipped,
            outcome.blobs_fetched,
            outcome.files_repaired,
            outcome.blobs_pushed
        ));
    }
    for (scope, key) in outcome.repaired.iter().take(shown) {
        out.push_str(&format!(
            "repaired: {scope} {}\n",
            escape_line(key.as_bytes())
        ));
    }
    if outcome.repaired.len() > shown {
        out.push_str(&format!(
            "repaired: and {} more\n",
            outcome.repaired.len() - shown
        ));
    }
    for halt in outcome.halts.iter().chain(&outcome.peer_halts) {
        out.push_str(&halt_line(halt, "audit"));
        out.push('\n');
    }
    out
}

/// A halt, for people: what stopped and whether the next `round` (`sync`, `audit`) retries
/// it; a refusal below a purge floor is final and says so.
pub fn halt_line(halt: &Halt, round: &str) -> String {
    match halt.reason {
        HaltReason::BelowFloor { versions } => format!(
            "refused below a purge floor: scope {} origin {}, {versions} version{} of deleted \
             records (their deletes were purged; they stay deleted)",
            halt.scope,
            halt.origin,
            if versions == 1 { "" } else { "s" }
        ),
        ref reason => format!(
            "halted: scope {} origin {} ({reason:?}); the next {round} retries it",
            halt.scope, halt.origin
        ),
    }
}

/// Counts the file bytes moved through a transport it layers: each fetched blob's bytes as
/// they are written (so a transfer that fails part-way counts what arrived), and each pushed
/// blob's size once the peer accepted it.
#[derive(Default)]
struct Metered {
    fetched: AtomicU64,
    pushed: AtomicU64,
}

impl Layer for Metered {
    fn fetch_into<'a>(
        &'a self,
        _blob: &BlobRef,
        into: &'a mut (dyn Write + Send),
    ) -> Box<dyn Write + Send + 'a> {
        Box::new(CountingWriter {
            inner: into,
            count: &self.fetched,
        })
    }

    fn after_push(&self, blob: &BlobRef, result: &Result<(), TransportError>) {
        if result.is_ok() {
            self.pushed.fetch_add(blob.size, Ordering::Relaxed);
        }
    }
}

/// Counts the bytes written through it.
struct CountingWriter<'a> {
    inner: &'a mut (dyn Write + Send),
    count: &'a AtomicU64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::record::{Key, Scope};
    use crate::transport::InProcess;

    #[tokio::test]
    async fn syncs_until_nothing_is_left_and_counts_what_moved() {
        let a = SyncEngine::in_memory().unwrap();
        let b = Arc::new(SyncEngine::in_memory().unwrap());
        let shared = Scope::shared();
        for i in 0..250 {
            b.put(
                &shared,
                &Key::try_from(format!("b{i:03}").as_str()).unwrap(),
                vec![1; 8],
            )
            .unwrap();
        }
        a.put(&shared, &Key::try_from("a").unwrap(), b"x".to_vec())
            .unwrap();
        b.put_file_bytes(
            &shared,
            &Key::try_from("g").unwrap(),
            Vec::new(),
            &[9u8; 30_000],
        )
        .unwrap();
        let content = vec![7u8; 100_000];
        a.put_file_bytes(&shared, &Key::try_from("f").unwrap(), Vec::new(), &content)
            .unwrap();
        let options = ExchangeOptions {
            page_limit: Some(40),
            ..ExchangeOptions::default()
        };
        let mut calls = 0;
        let mut bars = Vec::new();
        let totals = sync_until_done(&a, &InProcess::new(b.clone()), &options, |t| {
            calls += 1;
            bars.push((t.received as u64, t.total()));
        })
        .await
        .unwrap();
        // Every round and every page of one knows the total: 251 versions to receive (the
        // file's record too), and the bar only moves forward.
        assert!(
            bars.iter().all(|(_, total)| *total == Some(251)),
            "{bars:?}"
        );
        assert!(bars.windows(2).all(|w| w[0].0 <= w[1].0), "{bars:?}");
        assert_eq!(bars.last(), Some(&(251, Some(251))));
        assert_eq!(a.digest().unwrap(), b.digest().unwrap());
        assert_eq!(totals.received, 251);
        assert_eq!((totals.blobs_fetched, totals.bytes_fetched), (1, 30_000));
        assert_eq!(totals.shipped, 2);
        assert_eq!((totals.blobs_pushed, totals.bytes_pushed), (1, 100_000));
        // The pages of 40 stream back to back: fewer rounds than pages, and the progress is
        // told page by page, not only per round.
        assert!(totals.rounds < 250 / 40, "pages of 40: {totals:?}");
        assert!(calls > totals.rounds, "{calls} calls: {bars:?}");
        let told: Vec<u64> = (1..=6).map(|page| page * 40).chain([251]).collect();
        assert!(
            told.iter().all(|at| bars.iter().any(|(pos, _)| pos == at)),
            "not every page was told: {bars:?}"
        );
        assert_eq!(totals.peer, Some(b.node_id()));
    }
}
