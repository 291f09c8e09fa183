//! The fuzz targets' entry points (also replayed by `tests/fuzz_regressions.rs`), and the
//! merge-law check with the version decoding it fuzzes.

use super::{Action, Simulation};
use crate::merge::{self, State};
use crate::record::{Key, Op, Scope, Version};

/// Checks the merge laws over `versions` (keyed by a small key index): folding them in any
/// of the given orders, with repetitions, gives the same state.
///
/// # Errors
/// A description of the orders that disagree.
pub fn check_merge_laws(versions: &[(u8, Version)], order_seed: u64) -> Result<(), String> {
    let fold = |vs: &mut dyn Iterator<Item = &(u8, Version)>| {
        let mut s = State::new();
        for (k, v) in vs {
            merge::merge_into(
                &mut s,
                &Scope::shared(),
                &Key::new([*k]).expect("one byte is a valid key"),
                v,
            );
        }
        s
    };
    let forward = fold(&mut versions.iter());
    let backward = fold(&mut versions.iter().rev());
    let mut shuffled: Vec<_> = versions.iter().chain(versions.iter().take(3)).collect();
    let mut rng = order_seed | 1;
    for i in (1..shuffled.len()).rev() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        shuffled.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    let mixed = fold(&mut shuffled.into_iter());
    // Associativity: merging two halves' folds equals folding everything.
    let mid = versions.len() / 2;
    let mut left = fold(&mut versions[..mid].iter());
    let right = fold(&mut versions[mid..].iter());
    for ((scope, key), v) in &right {
        merge::merge_into(&mut left, scope, key, v);
    }
    if forward != backward || forward != mixed || forward != left {
        return Err(format!("merge is order-dependent over {versions:?}"));
    }
    Ok(())
}

/// Decodes versions for [`check_merge_laws`] from arbitrary bytes: one writer issues one
/// version per timestamp, so the op is a function of the Hlc (as in a real system).
pub fn decode_versions(bytes: &[u8]) -> Vec<(u8, Version)> {
    bytes
        .chunks_exact(3)
        .map(|c| {
            let origin = crate::NodeId::from_bytes([1 + c[1] % 4; 16]).expect("non-zero id");
            let hlc = crate::Hlc::new(u64::from(c[2]), origin);
            let op = if (c[2] ^ c[1]) % 4 == 0 {
                Op::Delete
            } else {
                Op::Put {
                    value: hlc.to_string().into_bytes(),
                    blob: None,
                }
            };
            (c[0] % 6, Version { hlc, op })
        })
        .collect()
}

/// Fuzz target `merge_laws` (also replayed by `tests/fuzz_regressions.rs`): the first 8
/// bytes (zero-padded) are the order seed, the rest [`decode_versions`]; checks
/// [`check_merge_laws`].
///
/// # Errors
/// A description of the broken law.
pub fn fuzz_merge_laws(data: &[u8]) -> Result<(), String> {
    let (seed, rest) = data.split_at(data.len().min(8));
    let mut seed_bytes = [0u8; 8];
    seed_bytes[..seed.len()].copy_from_slice(seed);
    check_merge_laws(&decode_versions(rest), u64::from_le_bytes(seed_bytes))
}

/// Fuzz target `decode_envelope`: decodes `data` as both message kinds and checks that
/// whatever decodes survives a re-encode and decode unchanged. An odd first byte puts the
/// rest behind a valid version-1 header (kind 1 or 2 by the next bit), so the fuzzer
/// reaches the postcard body at once; an even one leaves the bytes as they are. Panics
/// and unbounded allocations are the fuzzer's to catch.
///
/// # Errors
/// A description of the message that did not round-trip.
pub fn fuzz_decode_envelope(data: &[u8]) -> Result<(), String> {
    use crate::wire::{ExchangeRequest, ExchangeResponse, Message, MAGIC, PROTOCOL_VERSION};
    let framed;
    let input = match data.split_first() {
        Some((&first, rest)) if first & 1 == 1 => {
            let kind = if first & 2 == 0 {
                ExchangeRequest::KIND
            } else {
                ExchangeResponse::KIND
            };
            framed = [&MAGIC[..], &PROTOCOL_VERSION.to_be_bytes(), &[kind], rest].concat();
            &framed[..]
        }
        _ => data,
    };
    round_trips::<ExchangeRequest>(input)?;
    round_trips::<ExchangeResponse>(input)
}

fn round_trips<M: crate::wire::Message + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
) -> Result<(), String> {
    use crate::wire::{decode, encode};
    let Ok(msg) = decode::<M>(bytes) else {
        return Ok(());
    };
    let again = decode::<M>(&encode(&msg))
        .map_err(|e| format!("{msg:?} re-encoded does not decode: {e}"))?;
    if again != msg {
        return Err(format!(
            "round trip changed the message:\n before: {msg:?}\n after: {again:?}"
        ));
    }
    Ok(())
}

/// Fuzz target `exchange_model`: the first byte picks 2 to 4 nodes, the rest are
/// [`Action::decode_all`]; runs them on an in-memory [`Simulation`] (checking the watermark
/// invariant after every step), then [`Simulation::converge`] and [`Simulation::check_quiet`].
///
/// # Errors
/// An engine error or a description of the broken invariant.
pub fn fuzz_exchange_model(data: &[u8]) -> Result<(), String> {
    let Some((&first, rest)) = data.split_first() else {
        return Ok(());
    };
    let n = 2 + usize::from(first) % 3;
    let mut sim = Simulation::in_memory(n).map_err(|e| format!("in-memory engines: {e:?}"))?;
    for action in Action::decode_all(rest, n) {
        sim.step(&action)
            .map_err(|e| format!("step {action:?}: {e}"))?;
    }
    sim.converge()?;
    sim.check_quiet()
}
