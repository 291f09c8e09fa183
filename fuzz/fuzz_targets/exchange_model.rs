//! Invariant: 2 to 4 in-memory nodes under any schedule of writes, deletes, exchanges (any
//! pair, page limit and scope), clock ticks, restarts, snapshots and restores keep the
//! watermark invariant after every step, then converge to the last-write-wins oracle with
//! equal watermarks, after which every round is quiet (ships nothing, `has_more` false).
//!
//! Input: first byte = number of nodes, then 4 bytes an action
//! (see `highwater::testing::fuzz_exchange_model`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = highwater::testing::fuzz_exchange_model(data) {
        panic!("{e}");
    }
});
