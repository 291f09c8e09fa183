//! Convergence of 2-5 nodes under any schedule of writes, deletes, exchanges (any pair, any
//! page limit, any scope subset) and restarts, compared with a BTreeMap LWW oracle; the
//! watermark invariant is checked after every step, including rounds whose streamed pull is
//! cut after a random number of frames.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use highwater::testing::{Action, Simulation};
use proptest::prelude::*;

/// Streamed pulls and pushes cut so far, over every case of this file's tests.
static CUTS: AtomicUsize = AtomicUsize::new(0);
/// Of [`CUTS`], the pushes.
static PUSH_CUTS: AtomicUsize = AtomicUsize::new(0);

fn run(mut sim: Simulation, actions: &[Action]) -> Result<(), TestCaseError> {
    for a in actions {
        sim.step(a)
            .map_err(|e| TestCaseError::fail(format!("step {a:?}: {e}")))?;
    }
    CUTS.fetch_add(sim.cuts, Ordering::Relaxed);
    PUSH_CUTS.fetch_add(sim.push_cuts, Ordering::Relaxed);
    sim.converge().map_err(TestCaseError::fail)?;
    sim.check_quiet().map_err(TestCaseError::fail)?;
    Ok(())
}

/// Convergence with streamed pulls and pushes cut at random page boundaries (one exchange
/// action in four cuts its transfer after 0 to 3 frames): the pages before a cut stay
/// applied (on whichever side received them), the watermark invariant holds after the cut,
/// and the next rounds resume from the marks. The pages are small (1 to 6 versions), so most
/// transfers stream several frames; the test also checks that cuts of both kinds did happen.
#[test]
fn streamed_pulls_and_pushes_cut_at_random_frames_converge() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: common::cases(256),
        ..ProptestConfig::default()
    });
    let before = CUTS.load(Ordering::Relaxed);
    let pushes_before = PUSH_CUTS.load(Ordering::Relaxed);
    runner
        .run(
            &(2usize..=4, prop::collection::vec(any::<u8>(), 0..400)),
            |(nodes, bytes)| {
                let actions = Action::decode_all(&bytes, nodes);
                run(
                    Simulation::in_memory(nodes).expect("in-memory engines"),
                    &actions,
                )
            },
        )
        .expect("cut pulls converge");
    assert!(
        CUTS.load(Ordering::Relaxed) > before,
        "no streamed pull was cut: the test exercised nothing"
    );
    assert!(
        PUSH_CUTS.load(Ordering::Relaxed) > pushes_before,
        "no streamed push was cut: the test exercised no push"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(256), ..ProptestConfig::default() })]

    #[test]
    fn in_memory_nodes_converge(nodes in 2usize..=5, bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let actions = Action::decode_all(&bytes, nodes);
        run(Simulation::in_memory(nodes).expect("in-memory engines"), &actions)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), ..ProptestConfig::default() })]

    #[test]
    fn redb_nodes_converge_across_restarts_and_restores(nodes in 2usize..=4, bytes in prop::collection::vec(any::<u8>(), 0..240)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let actions = Action::decode_all(&bytes, nodes);
        run(Simulation::redb(nodes, dir.path()).expect("redb engines"), &actions)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    /// Power cuts at any point: each Crash action reopens a redb node from only what it had
    /// synced. Acknowledged local writes must survive (the oracle keeps them, and the final
    /// state must equal it), data and watermarks must never come apart (the watermark
    /// invariant is checked after every step), and the next rounds re-fetch what was lost.
    #[test]
    fn redb_nodes_converge_across_power_cuts(nodes in 2usize..=4, bytes in prop::collection::vec(any::<u8>(), 0..240)) {
        let actions = Action::decode_all(&bytes, nodes);
        run(Simulation::power_loss(nodes).expect("redb engines on power-loss disks"), &actions)?;
    }
}

/// Restores that lose writes (docs/protocol.md, "Restoring lost writes: what the audit
/// repairs"): a peer may already have moved a watermark past a version that a lost write
/// superseded, and no round brings it back; the audits in `converge` do. Between steps the
/// simulation's watermark check allows exactly that shortfall (a newer version of the key
/// was lost), and the end state must equal the oracle of what survived.
#[test]
fn lossy_restores_converge() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: common::cases(3000),
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(2usize..=4, prop::collection::vec(any::<u8>(), 0..240)),
            |(nodes, bytes)| {
                let actions = Action::decode_all(&bytes, nodes);
                run(
                    Simulation::in_memory(nodes)
                        .expect("in-memory engines")
                        .allow_lossy_restores(),
                    &actions,
                )
            },
        )
        .expect("lossy restores converge");
}
