//! A round between converged peers ships nothing, and its size on the wire depends on the
//! number of (scope, origin) marks only, never on the number of records.
//!
//! Run with `--nocapture` to see the measured sizes.

mod common;

use common::rounds::{link, mem_node, sync, Node, TestResult};
use futures_executor::block_on;
use highwater::{Key, ManualTime, Op, Scope};

/// Encoded bytes of one round, each way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RoundSize {
    request: u64,
    response: u64,
}

fn scopes() -> TestResult<[Scope; 2]> {
    Ok([Scope::shared(), Scope::app("notes", "items")?])
}

/// Writes `count` records on `node` in one batch, alternating between the two scopes.
fn write_records(node: &Node, prefix: &str, count: usize) -> TestResult {
    let scopes = scopes()?;
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let key = Key::try_from(format!("{prefix}{i:05}").as_str())?;
        ops.push((
            scopes[i % 2].clone(),
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

/// `nodes` engines on one clock, each with writes in both scopes (node 0 has `records`,
/// the others two each), synced into node 1 and back out until all hold the same state.
fn converged(nodes: usize, records: usize) -> TestResult<Vec<Node>> {
    let time = ManualTime::at_secs(1_700_000_000);
    let all = (0..nodes)
        .map(|_| mem_node(&time))
        .collect::<highwater::Result<Vec<_>>>()?;
    write_records(&all[0], "a", records)?;
    for (i, node) in all.iter().enumerate().skip(1) {
        write_records(node, &format!("n{i}-"), 2)?;
    }
    let hub = link(&all[1]);
    for node in all.iter().filter(|n| n.node_id() != all[1].node_id()) {
        sync(node, &hub)?;
    }
    for node in all.iter().filter(|n| n.node_id() != all[1].node_id()) {
        sync(node, &hub)?;
    }
    for node in &all {
        assert_eq!(node.digest()?, all[0].digest()?);
        assert_eq!(node.watermarks()?, all[0].watermarks()?);
    }
    Ok(all)
}

/// One round from `from` to `to` that must move nothing; its encoded sizes.
fn noop_round(from: &Node, to: &Node) -> TestResult<RoundSize> {
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
    assert_eq!(stats.requests, 1);
    Ok(RoundSize {
        request: stats.last_request,
        response: stats.last_response,
    })
}

/// No-op rounds node 0 -> node 1 and back, printed; returns both sizes.
fn measure(nodes: usize, records: usize) -> TestResult<(RoundSize, RoundSize)> {
    let all = converged(nodes, records)?;
    let marks = all[0].watermarks()?.mark_count();
    // Node 0 first: its request also brings node 1's knowledge of it up to date.
    let there = noop_round(&all[0], &all[1])?;
    let back = noop_round(&all[1], &all[0])?;
    for (way, size) in [("0 -> 1", there), ("1 -> 0", back)] {
        println!(
            "no-op round {way}: request {} bytes, response {} bytes, records {}, origins {nodes}, scopes 2, marks {marks}",
            size.request, size.response, records + 2 * (nodes - 1),
        );
    }
    Ok((there, back))
}

#[test]
fn noop_round_size_does_not_grow_with_records() -> TestResult {
    let sizes = [measure(2, 10)?, measure(2, 1_000)?, measure(2, 10_000)?];
    assert_eq!(sizes[0], sizes[1], "10 vs 1000 records");
    assert_eq!(sizes[0], sizes[2], "10 vs 10 000 records");
    // Both ways carry the same marks.
    assert_eq!(sizes[0].0, sizes[0].1);
    Ok(())
}

#[test]
fn noop_round_size_grows_only_with_origins() -> TestResult {
    let (two, _) = measure(2, 1_000)?;
    let (three, _) = measure(3, 1_000)?;
    let (three_more, _) = measure(3, 10_000)?;
    assert_eq!(three, three_more, "three origins, 1000 vs 10 000 records");
    let grew = (three.request - two.request, three.response - two.response);
    println!(
        "no-op round, 2 -> 3 origins: request +{} bytes, response +{} bytes (2 scopes)",
        grew.0, grew.1
    );
    // One more origin adds one mark per scope to each message: its 16-byte id and a varint
    // time (at most 10 bytes).
    assert_eq!(grew.0, grew.1);
    assert!(
        (2 * 17..=2 * 26).contains(&grew.0),
        "one origin in two scopes added {} bytes",
        grew.0
    );
    Ok(())
}

/// After B pulled everything from A, a round A initiates should ship nothing, as a round the
/// other way does. Today A's knowledge of B is the marks of B's last request, taken before B
/// applied A's answer, so A re-ships all it just sent.
#[test]
fn noop_round_after_the_peer_pulled() -> TestResult {
    let time = ManualTime::at_secs(1_700_000_000);
    let (a, b) = (mem_node(&time)?, mem_node(&time)?);
    write_records(&a, "a", 1_000)?;
    sync(&b, &link(&a))?;
    assert_eq!(b.digest()?, a.digest()?);
    noop_round(&a, &b)?;
    Ok(())
}
