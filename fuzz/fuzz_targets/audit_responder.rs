//! Invariant: an in-memory node answering any audit request (the bytes decoded as one)
//! does not panic, moves no watermark, changes nothing outside the request's scopes, and
//! answers with a message that round-trips through the codec.
//!
//! Input: as for `decode_envelope` (an odd first byte frames the rest as a version-1
//! message); see `highwater::testing::fuzz_audit_responder`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = highwater::testing::fuzz_audit_responder(data) {
        panic!("{e}");
    }
});
