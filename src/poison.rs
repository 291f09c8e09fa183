//! Locks whose data stays valid whatever a panicking holder did.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, and takes the data even if a thread panicked while holding it: every mutex
/// this crate locks through here guards plain data (maps, counters, flags) that no update
/// leaves half-written, so a panic elsewhere does not make it invalid, and refusing it would
/// turn one panic into a node that can no longer sync.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
