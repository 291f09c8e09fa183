//! A halted stream (here: an origin whose clock is far ahead) must neither keep the caller
//! looping (`has_more` forever) nor starve the other origins when pages are small and the
//! halted origin sorts first.

use std::sync::Arc;
use std::time::Duration;

use highwater::store::{MemStore, Store};
use highwater::{
    EngineConfig, ExchangeOptions, HaltReason, InProcess, Key, ManualTime, NodeId, Scope,
    SyncEngine,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn node(id: u8, time: &Arc<ManualTime>) -> highwater::Result<Arc<SyncEngine>> {
    let store = MemStore::new();
    store.identity(NodeId::from_bytes([id; 16]).expect("non-zero id"))?;
    Ok(Arc::new(SyncEngine::with_store(
        Box::new(store),
        EngineConfig {
            time: time.clone(),
            ..EngineConfig::default()
        },
    )?))
}

fn write_many(node: &SyncEngine, prefix: &str, n: usize) -> highwater::Result<()> {
    for i in 0..n {
        node.put(
            &Scope::shared(),
            &Key::new(format!("{prefix}{i:03}"))?,
            vec![1],
        )?;
    }
    Ok(())
}

/// Hub H and origin A run 60 s ahead; C and R are on time. A's id (1) sorts before C's (3),
/// so in every page A's stream comes first.
type Nodes = (
    Arc<SyncEngine>,
    Arc<SyncEngine>,
    Arc<SyncEngine>,
    Arc<SyncEngine>,
    Arc<ManualTime>,
);

fn setup() -> Result<Nodes, Box<dyn std::error::Error>> {
    let now = ManualTime::at_secs(1_700_000_000);
    let ahead = ManualTime::at_secs(1_700_000_060);
    let (a, h, c, r) = (
        node(1, &ahead)?,
        node(2, &ahead)?,
        node(3, &now)?,
        node(4, &now)?,
    );
    write_many(&a, "a", 40)?;
    write_many(&c, "c", 40)?;
    for from in [&a, &c] {
        let to_hub = InProcess::new(h.clone());
        while futures_executor::block_on(from.exchange(&to_hub))?.has_more {}
    }
    Ok((a, h, c, r, now))
}

fn drive(
    from: &SyncEngine,
    to: &Arc<SyncEngine>,
    limit: usize,
) -> Result<(usize, Vec<highwater::Halt>), Box<dyn std::error::Error>> {
    let transport = InProcess::new(to.clone());
    let options = ExchangeOptions {
        page_limit: Some(limit),
        ..ExchangeOptions::default()
    };
    let mut halts = Vec::new();
    for round in 1..=100 {
        let out = futures_executor::block_on(from.exchange_with(&transport, &options))?;
        halts.extend(out.halts.into_iter().chain(out.peer_halts));
        if !out.has_more {
            return Ok((round, halts));
        }
    }
    Err("has_more never cleared in 100 rounds".into())
}

fn assert_c_arrived_a_halted(
    r: &SyncEngine,
    h: &SyncEngine,
    a: &SyncEngine,
    c: &SyncEngine,
    halts: &[highwater::Halt],
) -> TestResult {
    let shared = Scope::shared();
    assert_eq!(
        r.watermarks()?.get(&shared, c.node_id()),
        h.watermarks()?.get(&shared, c.node_id()),
        "C's stream must not starve"
    );
    assert_eq!(
        r.versions(&shared)?.len(),
        40,
        "all of C's records and none of A's"
    );
    assert_eq!(r.watermarks()?.get(&shared, a.node_id()), None);
    assert!(halts
        .iter()
        .all(|h| h.origin == a.node_id() && matches!(h.reason, HaltReason::ClockSkew { .. })));
    assert!(!halts.is_empty());
    Ok(())
}

#[test]
fn a_halted_stream_in_the_responders_pages_neither_loops_nor_starves() -> TestResult {
    let (a, h, c, r, _) = setup()?;
    let (rounds, halts) = drive(&r, &h, 7)?;
    assert_c_arrived_a_halted(&r, &h, &a, &c, &halts)?;
    // 40 versions of C in pages of 7, plus at most a couple of rounds to learn the halt.
    assert!(rounds <= 9, "took {rounds} rounds");
    Ok(())
}

#[test]
fn a_halted_stream_in_the_initiators_pages_neither_loops_nor_starves() -> TestResult {
    let (a, h, c, r, _) = setup()?;
    // First contact ships nothing; H learns R's marks, then pushes in pages of 7.
    let (rounds, halts) = drive(&h, &r, 7)?;
    assert_c_arrived_a_halted(&r, &h, &a, &c, &halts)?;
    assert!(rounds <= 10, "took {rounds} rounds");
    Ok(())
}

#[test]
fn once_clocks_agree_the_halted_stream_completes() -> TestResult {
    let (_a, h, _c, r, now) = setup()?;
    drive(&r, &h, 7)?;
    // R's clock catches up: the next rounds apply A's stream too.
    now.advance(Duration::from_secs(61));
    let (_, halts) = drive(&r, &h, 7)?;
    assert!(halts.is_empty(), "{halts:?}");
    assert_eq!(r.digest()?, h.digest()?);
    assert_eq!(r.watermarks()?, h.watermarks()?);
    Ok(())
}
