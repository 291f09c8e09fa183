//! Invariant: 2 to 4 replicas driven through the exchange core alone (no engine), under any
//! schedule of writes, deletes and rounds (any pair, page limit and scope, responses lost),
//! keep the watermark invariant after every step, then converge to the last-write-wins oracle
//! with equal watermarks.
//!
//! Input: first byte = number of replicas, then 4 bytes a step
//! (see `highwater::testing::fuzz_exchange_core`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = highwater::testing::fuzz_exchange_core(data) {
        panic!("{e}");
    }
});
