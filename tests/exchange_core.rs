//! The exchange core alone (no engine, runtime or transport) keeps the watermark invariant
//! after every step of any schedule of writes, deletes and rounds (any pair, page limit and
//! scope, responses lost), and converges to the last-write-wins oracle with equal marks.

mod common;

use highwater::testing::{fuzz_exchange_core, CoreModel, CoreStep};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(256), ..ProptestConfig::default() })]

    #[test]
    fn replicas_driven_through_the_core_converge(
        nodes in 2usize..=4,
        bytes in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut model = CoreModel::new(nodes).map_err(TestCaseError::fail)?;
        for step in CoreStep::decode_all(nodes, &bytes) {
            model.step(&step).map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?;
        }
        model.converge().map_err(TestCaseError::fail)?;
    }
}

/// A schedule with lost responses and single-version pages: the responder's knowledge of the
/// initiator runs ahead of what the initiator holds, and the next rounds still fill the gap.
#[test]
fn lost_responses_cost_rounds_not_versions() -> Result<(), String> {
    let mut model = CoreModel::new(2)?;
    for key in 0..6 {
        model.step(&CoreStep::Write {
            node: 1,
            scope: 0,
            key,
            delete: key == 3,
        })?;
    }
    for _ in 0..3 {
        model.step(&CoreStep::Round {
            from: 0,
            to: 1,
            limit: 1,
            only: None,
            lose_response: true,
        })?;
    }
    model.step(&CoreStep::Round {
        from: 0,
        to: 1,
        limit: 2,
        only: None,
        lose_response: false,
    })?;
    model.converge()?;
    // The fuzz target's entry point runs the same model.
    fuzz_exchange_core(&[1, 0, 0, 0, 1, 1, 1, 1, 3])
}
