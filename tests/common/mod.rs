//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod rounds;
pub mod streams;

/// Proptest case count: `default`, or `HIGHWATER_PROPTEST_CASES` when set (soak runs).
pub fn cases(default: u32) -> u32 {
    std::env::var("HIGHWATER_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
pub mod certs;
pub mod http;
#[cfg(feature = "postgres")]
pub mod pg;
