//! Invariant: splitting a streamed pull's body (length-prefixed messages) never panics,
//! never holds more than one message beyond the limit, splits the same messages whatever
//! pieces the bytes arrive in, and every message that decodes round-trips.
//!
//! Input: the first byte picks the piece size, the rest is the body
//! (see `highwater::testing::fuzz_decode_stream`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = highwater::testing::fuzz_decode_stream(data) {
        panic!("{e}");
    }
});
