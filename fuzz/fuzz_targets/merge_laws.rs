//! Invariant: last-write-wins merge is commutative, associative and idempotent. Folding any
//! set of versions forwards, backwards, shuffled with repetitions, or as the merge of two
//! halves' folds gives the same state.
//!
//! Input: an 8-byte order seed, then 3 bytes a version (see `highwater::testing::fuzz_merge_laws`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = highwater::testing::fuzz_merge_laws(data) {
        panic!("{e}");
    }
});
