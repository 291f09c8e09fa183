//! The benchmark's records: 32-byte keys and 120-byte values generated from their index, so
//! that every case, every limit and the automerge peer (which includes this file by path)
//! work on the same bytes.
//!
//! A key is the hex text of 16 pseudo-random bytes (32 ASCII bytes, usable as an automerge
//! map key as it is); a value is 120 pseudo-random bytes. Keys are in no particular order, as
//! real keys (ids, hashes) are: stores insert them at random places in their B-trees.

/// Bytes per key.
pub const KEY_LEN: usize = 32;
/// Bytes per value.
pub const VALUE_LEN: usize = 120;
/// How many records the delta cases update.
pub const DELTA_UPDATES: usize = 100;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The key of record `i`.
pub fn key(i: u64) -> [u8; KEY_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(b"highwater-bench key v1");
    h.update(&i.to_le_bytes());
    let digest = h.finalize();
    let mut out = [0u8; KEY_LEN];
    for (pair, byte) in out
        .chunks_exact_mut(2)
        .zip(&digest.as_bytes()[..KEY_LEN / 2])
    {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
    out
}

/// The value of record `i` as written by update `generation` (0: the first write).
pub fn value(i: u64, generation: u64) -> [u8; VALUE_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(b"highwater-bench value v1");
    h.update(&i.to_le_bytes());
    h.update(&generation.to_le_bytes());
    let mut out = [0u8; VALUE_LEN];
    h.finalize_xof().fill(&mut out);
    out
}

/// The indexes of the `count` records a delta updates in a store of `records`: spread evenly
/// over the store.
pub fn updated(records: u64, count: usize) -> Vec<u64> {
    let count = (count as u64).clamp(1, records.max(1));
    let step = records / count;
    (0..count).map(|j| j * step + step / 2).collect()
}

/// A blake3 digest of the first `records` records (generation 0), so that two programs can
/// check that they worked on the same data.
pub fn fingerprint(records: u64) -> String {
    let mut h = blake3::Hasher::new();
    for i in 0..records {
        h.update(&key(i));
        h.update(&value(i, 0));
    }
    h.finalize().to_hex().to_string()
}
