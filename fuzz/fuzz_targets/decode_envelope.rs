//! Invariant: decoding untrusted bytes as an `ExchangeRequest` or an `ExchangeResponse`
//! never panics and never allocates without bound, and every message that decodes
//! re-encodes to bytes that decode to an equal message.
//!
//! Input: odd first byte = the rest behind a valid version-1 header (so the fuzzer reaches
//! the postcard body at once), even = the bytes as they are
//! (see `highwater::testing::fuzz_decode_envelope`).
//! Run with `-rss_limit_mb=512 -malloc_limit_mb=256` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = highwater::testing::fuzz_decode_envelope(data) {
        panic!("{e}");
    }
});
