//! The steps of a simulation: [`Action`], its decoding from arbitrary bytes, and the
//! scopes and file contents the actions name.

use crate::record::Scope;

// For doc links only.
#[cfg(doc)]
use super::Simulation;
#[cfg(doc)]
use crate::engine::SyncEngine;

/// One step of a simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Node `node` writes `value` under `key` in scope number `scope`.
    Put {
        /// Writer.
        node: usize,
        /// Scope index (see [`scope`]).
        scope: u8,
        /// Key byte.
        key: u8,
        /// Value byte.
        value: u8,
    },
    /// Node `node` deletes `key` in scope number `scope`.
    Delete {
        /// Writer.
        node: usize,
        /// Scope index.
        scope: u8,
        /// Key byte.
        key: u8,
    },
    /// One exchange round, `from` initiating to `to`, asking for at most `limit` versions.
    Exchange {
        /// Initiator.
        from: usize,
        /// Responder.
        to: usize,
        /// Page limit for this round.
        limit: usize,
        /// Limit the round to one scope (index) instead of all.
        only_scope: Option<u8>,
        /// If the round streams its pull or its push, the transfer breaks off after this many
        /// frames (the pages before stay applied; the next round resumes from the marks).
        cut: Option<u8>,
    },
    /// An audit round, `from` initiating to `to` (see [`crate::exchange::audit`]): their live
    /// contents compared and every difference repaired, no mark moved.
    Audit {
        /// Initiator.
        from: usize,
        /// Responder.
        to: usize,
    },
    /// Node `node` writes a record with a file under `key` (content chosen among a few, so
    /// equal files on different keys and nodes occur).
    PutFile {
        /// Writer.
        node: usize,
        /// Scope index.
        scope: u8,
        /// Key byte.
        key: u8,
        /// Which content.
        content: u8,
    },
    /// Transfers of the `blob`-th file written so far fail (or arrive corrupted) for the
    /// next `rounds` rounds, in both directions.
    BlobFault {
        /// Index into the files written so far.
        blob: u8,
        /// How many rounds the fault lasts.
        rounds: u8,
        /// Corrupt the bytes instead of failing the transfer.
        corrupt: bool,
    },
    /// Physical time moves forward by `millis`.
    Tick {
        /// Milliseconds.
        millis: u16,
    },
    /// Node `node` is closed and reopened.
    Restart {
        /// The node.
        node: usize,
    },
    /// Node `node` loses power: everything not synced to its storage is gone, and it is
    /// reopened from what was (on backends that model it; otherwise a restart).
    Crash {
        /// The node.
        node: usize,
    },
    /// Node `node` is closed, backed up, and reopened.
    Snapshot {
        /// The node.
        node: usize,
    },
    /// Node `node` is closed and its last backup put back (if it has one). Peers' knowledge
    /// of it is now stale-high. If it wrote since the backup, the restore loses writes: it
    /// happens only when the simulation allows lossy restores
    /// ([`Simulation::allow_lossy_restores`]), and the node then reopens under a fresh node
    /// id ([`SyncEngine::open_restored`]); otherwise the action is a plain restart.
    Restore {
        /// The node.
        node: usize,
    },
}

/// Scope number `i` of the simulation's three scopes.
pub fn scope(i: u8) -> Scope {
    match i % 3 {
        0 => Scope::shared(),
        1 => Scope::app("notes", "items").expect("valid scope"),
        _ => Scope::app("photos", "albums").expect("valid scope"),
    }
}

impl Action {
    /// Decodes a list of actions for `nodes` nodes from arbitrary bytes (4 bytes an action;
    /// every input decodes).
    pub fn decode_all(bytes: &[u8], nodes: usize) -> Vec<Action> {
        let nodes = nodes.max(2);
        bytes
            .chunks_exact(4)
            .map(|c| {
                let node = usize::from(c[1]) % nodes;
                match c[0] % 16 {
                    5 => Action::PutFile {
                        node,
                        scope: c[2] % 3,
                        key: c[3] % 8,
                        content: c[2] ^ c[3],
                    },
                    13 => Action::BlobFault {
                        blob: c[2],
                        rounds: 1 + c[3] % 4,
                        corrupt: c[3] & 0x80 != 0,
                    },
                    0..=4 => Action::Put {
                        node,
                        scope: c[2] % 3,
                        key: c[3] % 8,
                        value: c[2] ^ c[3],
                    },
                    6..=7 => Action::Delete {
                        node,
                        scope: c[2] % 3,
                        key: c[3] % 8,
                    },
                    12 => Action::Audit {
                        from: node,
                        to: (node + 1 + usize::from(c[2]) % (nodes - 1)) % nodes,
                    },
                    8..=11 => {
                        let to = (node + 1 + usize::from(c[2]) % (nodes - 1)) % nodes;
                        let only_scope = (c[3] & 0x80 != 0).then_some(c[3] % 3);
                        // One round in four (by the high bits of the byte that picks the
                        // responder) has its streamed pull or push cut after 0 to 3 frames.
                        let cut = (c[2] & 0xc0 == 0xc0).then_some(c[2] >> 4 & 3);
                        Action::Exchange {
                            from: node,
                            to,
                            limit: 1 + usize::from(c[3] & 0x7f) % 6,
                            only_scope,
                            cut,
                        }
                    }
                    14 => Action::Tick {
                        millis: u16::from_le_bytes([c[2], c[3]]),
                    },
                    _ => match c[2] % 4 {
                        0 => Action::Restart { node },
                        1 => Action::Snapshot { node },
                        2 => Action::Restore { node },
                        _ => Action::Crash { node },
                    },
                }
            })
            .collect()
    }
}

/// The bytes of file content number `n`: four patterns in four sizes (1 B to ~2 KiB).
pub fn file_content(n: u8) -> Vec<u8> {
    let len = 1 + usize::from(n >> 2 & 3) * 700;
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(n & 3))
        .collect()
}
