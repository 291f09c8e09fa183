//! Convergence of 2-5 nodes under any schedule of writes, deletes, exchanges (any pair, any
//! page limit, any scope subset) and restarts, compared with a BTreeMap LWW oracle; the
//! watermark invariant is checked after every step.

mod common;

use highwater::testing::{sim_config, Action, Simulation};
use highwater::{ManualTime, SyncEngine};
use proptest::prelude::*;

fn run(mut sim: Simulation, actions: &[Action]) -> Result<(), TestCaseError> {
    for a in actions {
        sim.step(a).map_err(|e| TestCaseError::fail(format!("step {a:?}: {e}")))?;
    }
    sim.converge().map_err(TestCaseError::fail)?;
    sim.check_quiet().map_err(TestCaseError::fail)?;
    Ok(())
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
    fn redb_nodes_converge_across_restarts(nodes in 2usize..=4, bytes in prop::collection::vec(any::<u8>(), 0..240)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_owned();
        let time = ManualTime::at_secs(1_700_000_000);
        let engines = (0..nodes)
            .map(|i| SyncEngine::open_with(root.join(format!("n{i}")), sim_config(&time)))
            .collect::<Result<Vec<_>, _>>()
            .expect("redb engines");
        let t = time.clone();
        let reopen = Box::new(move |i: usize| SyncEngine::open_with(root.join(format!("n{i}")), sim_config(&t)));
        let actions = Action::decode_all(&bytes, nodes);
        run(Simulation::new(engines, time, Some(reopen)), &actions)?;
    }
}
