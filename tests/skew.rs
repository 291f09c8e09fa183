//! Clock skew is judged on the receiver's clock, per origin: a page that carries runs from
//! an origin too far ahead and from one within the bound applies the second, halts the
//! first without moving its watermark, and does not keep the caller looping. Once the
//! receiver's clock catches up, the halted stream applies.
//!
//! The cast: R (max drift 5 s, clock at T0); A (clock 60 s ahead); C (1 s ahead); H, a hub
//! whose clock is also 60 s ahead so that it accepts A's writes. C and A sync into H, then R
//! meets H: one page from H carries A's run and C's.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::rounds::{link, mem_node, sync, Node, TestResult};
use futures_executor::block_on;
use highwater::exchange::{Page, Run};
use highwater::wire::{decode, encode, ExchangeRequest, RequestMarks, ScopeFilter};
use highwater::{
    Halt, HaltReason, Hlc, Key, ManualTime, NodeId, Op, Scope, ScopedWatermarks, Version,
};

const T0: u32 = 1_700_000_000;
const WRITES: usize = 5;

struct World {
    r_time: Arc<ManualTime>,
    a: Node,
    c: Node,
    h: Node,
    r: Node,
}

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid app scope")
}

fn key(k: &str) -> Key {
    Key::try_from(k).expect("a short key")
}

fn a_keys() -> impl Iterator<Item = Key> {
    (0..WRITES).map(|i| key(&format!("a{i}")))
}

fn c_keys() -> impl Iterator<Item = Key> {
    (0..WRITES).map(|i| key(&format!("c{i}")))
}

/// A and C have written and synced into H; R has not met anyone.
fn world() -> TestResult<World> {
    let r_time = ManualTime::at_secs(T0);
    let a = mem_node(&ManualTime::at_secs(T0 + 60))?;
    let c = mem_node(&ManualTime::at_secs(T0 + 1))?;
    let h = mem_node(&ManualTime::at_secs(T0 + 60))?;
    let r = mem_node(&r_time)?;
    for k in a_keys() {
        a.put(&notes(), &k, b"from a, 60 s ahead".to_vec())?;
    }
    for k in c_keys() {
        c.put(&notes(), &k, b"from c, 1 s ahead".to_vec())?;
    }
    // C first, so that H has nothing of A's to send C (C's clock would refuse it).
    sync(&c, &link(&h))?;
    sync(&a, &link(&h))?;
    let marks = h.watermarks()?;
    assert_eq!(
        marks.get(&notes(), a.node_id()),
        a.watermarks()?.get(&notes(), a.node_id())
    );
    assert_eq!(
        marks.get(&notes(), c.node_id()),
        c.watermarks()?.get(&notes(), c.node_id())
    );
    Ok(World { r_time, a, c, h, r })
}

/// The one halt in `halts`, which must be a clock-skew halt of A's stream in `notes`
/// about 60 s ahead.
fn assert_one_skew_halt_for_a(halts: &[Halt], a: NodeId) {
    assert_eq!(halts.len(), 1, "exactly one halt: {halts:?}");
    let halt = &halts[0];
    assert_eq!((&halt.scope, halt.origin), (&notes(), a));
    match halt.reason {
        HaltReason::ClockSkew { ahead_by_ms } => {
            assert!(
                (54_000..=66_000).contains(&ahead_by_ms),
                "A ahead by {ahead_by_ms} ms"
            )
        }
        ref other => panic!("expected a clock-skew halt, got {other:?}"),
    }
}

/// R holds C's writes and H's mark for C, none of A's writes and no mark for A.
fn assert_c_applied_a_held_back(w: &World) -> TestResult {
    let r_marks = w.r.watermarks()?;
    assert_eq!(
        r_marks.get(&notes(), w.c.node_id()),
        w.h.watermarks()?.get(&notes(), w.c.node_id()),
        "R's W[C]"
    );
    assert_eq!(r_marks.get(&notes(), w.a.node_id()), None, "R's W[A]");
    for k in c_keys() {
        assert_eq!(
            w.r.get_version(&notes(), &k)?,
            w.h.get_version(&notes(), &k)?,
            "R holds C's {k:?}"
        );
    }
    for k in a_keys() {
        assert_eq!(w.r.get_version(&notes(), &k)?, None, "R took A's {k:?}");
    }
    Ok(())
}

#[test]
fn a_page_with_a_skewed_origin_applies_the_others_and_halts_it() -> TestResult {
    let w = world()?;
    let to_h = link(&w.h);

    let out = block_on(w.r.exchange(&to_h))?;
    // One page carried both runs; only C's applied.
    assert_eq!((out.received, out.applied), (2 * WRITES, WRITES));
    assert_one_skew_halt_for_a(&out.halts, w.a.node_id());
    assert!(out.peer_halts.is_empty());
    assert!(
        !out.has_more,
        "a halted stream must not keep the caller looping"
    );
    assert_c_applied_a_held_back(&w)?;

    // Asking again changes nothing: A is still too far ahead.
    let again = block_on(w.r.exchange(&to_h))?;
    assert_eq!(
        (again.received, again.applied, again.has_more),
        (WRITES, 0, false)
    );
    assert_one_skew_halt_for_a(&again.halts, w.a.node_id());
    assert_c_applied_a_held_back(&w)?;

    // R's clock catches up: A's stream applies, and R converges with H.
    w.r_time.advance(Duration::from_secs(60));
    let caught_up = block_on(w.r.exchange(&to_h))?;
    assert_eq!(caught_up.applied, WRITES);
    assert!(caught_up.halts.is_empty());
    sync(&w.r, &to_h)?;
    assert_eq!(w.r.digest()?, w.h.digest()?);
    assert_eq!(w.r.watermarks()?, w.h.watermarks()?);
    Ok(())
}

#[test]
fn a_responder_reports_its_skew_halt_to_the_initiator() -> TestResult {
    let w = world()?;
    let to_r = link(&w.r);

    // H initiates. Its first round is a first contact (it ships nothing); the second ships
    // both runs, and R's refusal of A's comes back as a peer halt. The loop must end.
    let mut reported = Vec::new();
    let mut rounds = 0;
    loop {
        let out = block_on(w.h.exchange(&to_r))?;
        rounds += 1;
        assert!(out.halts.is_empty());
        if !out.peer_halts.is_empty() {
            reported.push(out.peer_halts.clone());
        }
        if !out.has_more {
            break;
        }
        assert!(
            rounds < 10,
            "has_more still set after {rounds} rounds: {out:?}"
        );
    }
    assert_eq!(reported.len(), 1, "one round reported R's halt");
    assert_one_skew_halt_for_a(&reported[0], w.a.node_id());
    assert_c_applied_a_held_back(&w)?;

    // Once R's clock catches up, H's rounds deliver A's writes.
    w.r_time.advance(Duration::from_secs(60));
    sync(&w.h, &to_r)?;
    assert_eq!(w.r.digest()?, w.h.digest()?);
    assert_eq!(w.r.watermarks()?, w.h.watermarks()?);
    Ok(())
}

/// A request from a made-up peer whose one version (and the run's top) is at `time`.
fn request_at(time: u64, from: NodeId) -> ExchangeRequest {
    let hlc = Hlc::new(time, from);
    let version = Version {
        hlc,
        op: Op::Put {
            value: b"from the far future".to_vec(),
            blob: None,
        },
    };
    let run = Run {
        scope: notes(),
        origin: from,
        base: None,
        top: hlc,
        versions: vec![(key("far"), version)],
    };
    let mut watermarks = ScopedWatermarks::new();
    watermarks.observe(&notes(), hlc);
    ExchangeRequest {
        from,
        scopes: ScopeFilter::All,
        marks: RequestMarks::Full(watermarks),
        known: None,
        page: Page {
            runs: vec![run],
            more: false,
        },
        limit: 1000,
        deferred: Vec::new(),
        ext: Default::default(),
    }
}

#[test]
fn versions_at_the_end_of_time_are_refused_as_skew_without_panic() -> TestResult {
    let r_time = ManualTime::at_secs(T0);
    let r = mem_node(&r_time)?;
    r.put(&notes(), &key("mine"), b"before".to_vec())?;
    let before = (r.digest()?, r.watermarks()?, r.clock_time());

    for time in [u64::MAX - 1, u64::MAX] {
        let peer = NodeId::random();
        let request = request_at(time, peer);
        let request = decode::<ExchangeRequest>(&encode(&request)).map(|decoded| {
            assert_eq!(
                decoded, request,
                "the codec round-trips times near u64::MAX"
            );
            decoded
        })?;
        let response = r.answer(request)?;
        assert_eq!(response.halts.len(), 1, "{response:?}");
        let halt = &response.halts[0];
        assert_eq!((&halt.scope, halt.origin), (&notes(), peer));
        match halt.reason {
            // About 80 years (the NTP64 era's end) ahead of 2023.
            HaltReason::ClockSkew { ahead_by_ms } => {
                assert!(ahead_by_ms > 1_000_000_000_000, "ahead by {ahead_by_ms} ms")
            }
            ref other => panic!("expected a clock-skew halt, got {other:?}"),
        }
        assert!(response.page.runs.iter().all(|run| run.origin != peer));
        assert_eq!(
            (r.digest()?, r.watermarks()?, r.clock_time()),
            before,
            "the refused version changed R"
        );
        assert_eq!(r.get_version(&notes(), &key("far"))?, None);
    }

    // The clock was not dragged to the end of time: R still writes at its own time.
    let next = r.put(&notes(), &key("mine"), b"after".to_vec())?;
    assert!(
        next.time() >> 32 < u64::from(T0) + 10,
        "R's next write is at {next}"
    );
    Ok(())
}
