//! A round between converged peers ships nothing, and costs the same few bytes whatever the
//! number of records, origins and scopes: each side's marks travel as a 16-byte digest of
//! the marks the other already recorded. A node that cannot vouch for that (it restarted)
//! sends its marks in full once, and the round still converges.
//!
//! Run with `--nocapture` to see the measured sizes.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::rounds::{config, link, mem_node, sync, Node, TestResult};
use futures_executor::block_on;
use highwater::exchange::Page;
use highwater::wire::{
    encode, ExchangeRequest, ExchangeResponse, RequestExt, RequestMarks, ResponseMarks,
};
use highwater::{Key, ManualTime, Op, Scope, ScopeFilter, SyncEngine};

/// The most a quiet round may cost, request and response together.
const QUIET_ROUND_MAX: u64 = 100;

/// Encoded bytes of one round, each way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RoundSize {
    request: u64,
    response: u64,
}

impl RoundSize {
    fn total(self) -> u64 {
        self.request + self.response
    }
}

/// `count` scopes: `shared`, then app tables.
fn scopes(count: usize) -> TestResult<Vec<Scope>> {
    let mut out = vec![Scope::shared()];
    for i in 1..count {
        out.push(Scope::app("notes", &format!("t{i}"))?);
    }
    Ok(out)
}

/// Writes `count` records on `node` in one batch, cycling through `scopes`.
fn write_records(node: &SyncEngine, scopes: &[Scope], prefix: &str, count: usize) -> TestResult {
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let key = Key::try_from(format!("{prefix}{i:05}").as_str())?;
        ops.push((
            scopes[i % scopes.len()].clone(),
            key,
            Op::Put {
                value: vec![b'x'; 16],
                blob: None,
            },
        ));
    }
    node.write_batch(ops)?;
    Ok(())
}

/// `nodes` engines on one clock, each with writes in every one of `scope_count` scopes (node
/// 0 has `records`, the others one per scope), synced into node 1 and back out until all
/// hold the same state: every node has a mark for every origin in every scope.
fn converged(nodes: usize, scope_count: usize, records: usize) -> TestResult<Vec<Node>> {
    let scopes = scopes(scope_count)?;
    let time = ManualTime::at_secs(1_700_000_000);
    let all = (0..nodes)
        .map(|_| mem_node(&time))
        .collect::<highwater::Result<Vec<_>>>()?;
    write_records(&all[0], &scopes, "a", records.max(scope_count))?;
    for (i, node) in all.iter().enumerate().skip(1) {
        write_records(node, &scopes, &format!("n{i}-"), scope_count)?;
    }
    let hub = link(&all[1]);
    for _ in 0..2 {
        for node in all.iter().filter(|n| n.node_id() != all[1].node_id()) {
            sync(node, &hub)?;
        }
    }
    let marks = all[0].watermarks()?;
    assert_eq!(marks.mark_count(), nodes * scope_count);
    for node in &all {
        assert_eq!(node.digest()?, all[0].digest()?);
        assert_eq!(node.watermarks()?, marks);
    }
    Ok(all)
}

/// One round from `from` to `to` that must move nothing, in one request; its encoded sizes.
fn noop_round(from: &SyncEngine, to: &Node) -> TestResult<RoundSize> {
    let wire = link(to);
    let out = block_on(from.exchange(&wire))?;
    assert_eq!(
        (out.shipped, out.received, out.applied),
        (0, 0, 0),
        "a round between converged peers moved versions"
    );
    assert!(!out.has_more, "a no-op round asked for another");
    assert!(out.halts.is_empty() && out.peer_halts.is_empty());
    let stats = wire.stats();
    assert_eq!(
        stats.requests, 1,
        "the responder asked for the marks in full"
    );
    Ok(RoundSize {
        request: stats.last_request,
        response: stats.last_response,
    })
}

/// The size of a round from `from` to `to` that carries no version and both sides' marks
/// in full: what a round costs when neither side can send a digest (a session's first,
/// which also asks for the peer's purge floors).
fn full_marks_round(from: &SyncEngine, to: &SyncEngine) -> TestResult<RoundSize> {
    let request = ExchangeRequest {
        from: from.node_id(),
        scopes: ScopeFilter::All,
        marks: RequestMarks::Full(from.watermarks()?),
        known: Some(to.watermarks()?.digest()),
        page: Page::default(),
        limit: u32::try_from(from.config().page_limit)?,
        deferred: Vec::new(),
        // A session's first request asks for the peer's floors, and one with marks in full
        // names the node it is for.
        ext: RequestExt {
            floors: Some(Vec::new()),
            refused: Vec::new(),
            to: Some(to.node_id()),
        },
    };
    let response = ExchangeResponse {
        from: to.node_id(),
        marks: ResponseMarks::Full(to.watermarks()?),
        page: Page::default(),
        halts: Vec::new(),
        ext: Default::default(),
    };
    Ok(RoundSize {
        request: encode(&request).len() as u64,
        response: encode(&response).len() as u64,
    })
}

/// No-op rounds node 0 -> node 1 and back, printed; returns both sizes.
fn measure(nodes: usize, scope_count: usize, records: usize) -> TestResult<(RoundSize, RoundSize)> {
    let all = converged(nodes, scope_count, records)?;
    let marks = all[0].watermarks()?.mark_count();
    // The first request of a session also asks for the peer's purge floors (a few bytes of
    // version 2): measure the rounds after it.
    noop_round(&all[0], &all[1])?;
    noop_round(&all[1], &all[0])?;
    let there = noop_round(&all[0], &all[1])?;
    let back = noop_round(&all[1], &all[0])?;
    let full = full_marks_round(&all[0], &all[1])?;
    for (way, size) in [("0 -> 1", there), ("1 -> 0", back)] {
        println!(
            "no-op round {way}: request {} bytes, response {} bytes (marks in full: {} + {}), \
             records {}, origins {nodes}, scopes {scope_count}, marks {marks}",
            size.request,
            size.response,
            full.request,
            full.response,
            records.max(scope_count) + scope_count * (nodes - 1),
        );
    }
    Ok((there, back))
}

#[test]
fn noop_round_size_does_not_grow_with_records() -> TestResult {
    let sizes = [
        measure(2, 2, 10)?,
        measure(2, 2, 1_000)?,
        measure(2, 2, 10_000)?,
    ];
    assert_eq!(sizes[0], sizes[1], "10 vs 1000 records");
    assert_eq!(sizes[0], sizes[2], "10 vs 10 000 records");
    // Both ways carry the same digests.
    assert_eq!(sizes[0].0, sizes[0].1);
    Ok(())
}

#[test]
fn noop_round_costs_the_same_few_bytes_whatever_the_origins_and_scopes() -> TestResult {
    let small = measure(2, 2, 100)?;
    for (nodes, scope_count) in [(10, 3), (100, 4)] {
        let (there, back) = measure(nodes, scope_count, 100)?;
        assert_eq!(
            (there, back),
            small,
            "{nodes} origins, {scope_count} scopes"
        );
    }
    let (there, back) = small;
    assert_eq!(there, back);
    assert!(
        there.total() <= QUIET_ROUND_MAX,
        "a quiet round took {} + {} bytes",
        there.request,
        there.response
    );
    Ok(())
}

/// After B pulled everything from A, a round A initiates should ship nothing, as a round the
/// other way does.
#[test]
fn noop_round_after_the_peer_pulled() -> TestResult {
    let time = ManualTime::at_secs(1_700_000_000);
    let (a, b) = (mem_node(&time)?, mem_node(&time)?);
    write_records(&a, &scopes(2)?, "a", 1_000)?;
    sync(&b, &link(&a))?;
    assert_eq!(b.digest()?, a.digest()?);
    let size = noop_round(&a, &b)?;
    assert!(size.total() <= QUIET_ROUND_MAX, "{size:?}");
    Ok(())
}

/// Closes `node` and opens its directory again.
fn reopen(node: Node, dir: &Path, time: &Arc<ManualTime>) -> TestResult<Node> {
    let engine = Arc::try_unwrap(node).map_err(|_| "the engine is still shared")?;
    drop(engine);
    Ok(Arc::new(SyncEngine::open_with(dir, config(time))?))
}

/// One round from `from` to `to`, in one request, that brings `from` `expected` versions and
/// leaves both converged; its sizes.
fn catch_up_round(from: &SyncEngine, to: &Node, expected: usize) -> TestResult<RoundSize> {
    let wire = link(to);
    let out = block_on(from.exchange(&wire))?;
    assert_eq!((out.shipped, out.received), (0, expected));
    assert!(!out.has_more);
    assert_eq!(wire.stats().requests, 1, "the responder asked for a resend");
    assert_eq!(from.digest()?, to.digest()?);
    assert_eq!(from.watermarks()?, to.watermarks()?);
    Ok(RoundSize {
        request: wire.stats().last_request,
        response: wire.stats().last_response,
    })
}

/// A restarted node forgot which of its marks its peers recorded: its first request carries
/// them in full. Its peers recorded them durably, so their digests still resolve.
#[test]
fn the_first_round_after_a_restart_of_either_side_converges() -> TestResult {
    let time = ManualTime::at_secs(1_700_000_000);
    let root = tempfile::tempdir()?;
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    let scopes = scopes(3)?;
    let mut a = Arc::new(SyncEngine::open_with(&dir_a, config(&time))?);
    let mut b = Arc::new(SyncEngine::open_with(&dir_b, config(&time))?);
    write_records(&a, &scopes, "a", 30)?;
    write_records(&b, &scopes, "b", 30)?;
    sync(&a, &link(&b))?;
    // Each side's first request of a session also asks for the other's purge floors.
    sync(&b, &link(&a))?;
    let quiet = noop_round(&a, &b)?;
    assert!(quiet.total() <= QUIET_ROUND_MAX, "{quiet:?}");
    let full = full_marks_round(&a, &b)?;
    assert!(full.request > quiet.request && full.response > quiet.response);

    // A restarts; B writes meanwhile. A's marks are unchanged, but A cannot tell what B
    // recorded of them: it sends them in full, and B answers its own in full (they moved).
    a = reopen(a, &dir_a, &time)?;
    write_records(&b, &scopes, "b-late", 3)?;
    let first = catch_up_round(&a, &b, 3)?;
    assert_eq!(first.request, full.request, "A's marks in full");
    assert!(
        first.response > full.response,
        "B's marks in full, and 3 versions"
    );
    assert_eq!(noop_round(&a, &b)?, quiet);
    assert_eq!(noop_round(&b, &a)?, quiet);

    // B restarts and writes. A's digest still resolves: B recorded A's marks durably.
    b = reopen(b, &dir_b, &time)?;
    write_records(&b, &scopes, "b-later", 3)?;
    let after = catch_up_round(&a, &b, 3)?;
    assert_eq!(after.request, quiet.request, "A's marks as a digest");
    assert_eq!(noop_round(&a, &b)?, quiet);

    // B restarts again, A writes, and B initiates: B's first request carries its marks in full.
    b = reopen(b, &dir_b, &time)?;
    write_records(&a, &scopes, "a-late", 3)?;
    let b_full = full_marks_round(&b, &a)?;
    let b_first = catch_up_round(&b, &a, 3)?;
    assert_eq!(b_first.request, b_full.request, "B's marks in full");
    assert_eq!(noop_round(&b, &a)?, quiet);
    assert_eq!(noop_round(&a, &b)?, quiet);
    Ok(())
}
