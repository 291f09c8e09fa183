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

/// Fuzz target `decode_envelope`: decodes `data` as every message kind and checks that
/// whatever decodes survives a re-encode and decode unchanged. An odd first byte puts the
/// rest behind a valid header ([`framed`]: kind 1 to 4, version 1 or 2), so the fuzzer
/// reaches the postcard body at once; an even one leaves the bytes as they are. Panics
/// and unbounded allocations are the fuzzer's to catch.
///
/// # Errors
/// A description of the message that did not round-trip.
pub fn fuzz_decode_envelope(data: &[u8]) -> Result<(), String> {
    use crate::wire::{AuditRequest, AuditResponse, ExchangeRequest, ExchangeResponse};
    let input = framed(data);
    round_trips::<ExchangeRequest>(&input)?;
    round_trips::<ExchangeResponse>(&input)?;
    round_trips::<AuditRequest>(&input)?;
    round_trips::<AuditResponse>(&input)
}

/// Fuzz target `decode_stream`: the rest of `data` is a streamed pull's body (length-prefixed
/// messages, `wire::Unframer`), fed in pieces of `1 + first byte % 64` bytes. It never panics
/// nor holds more than one message's worth beyond the limit (1 MiB here), it splits the same
/// messages out of the pieces as out of the bytes in one piece (up to the same error), and
/// each message that decodes (the first as a response, the rest as frames) round-trips.
///
/// # Errors
/// A description of the broken invariant.
pub fn fuzz_decode_stream(data: &[u8]) -> Result<(), String> {
    use crate::wire::{ExchangeResponse, PageFrame, Unframer};
    const MAX: usize = 1 << 20;
    let Some((&first, rest)) = data.split_first() else {
        return Ok(());
    };
    let split = |pieces: &mut dyn Iterator<Item = &[u8]>| {
        let mut unframer = Unframer::new(MAX);
        let mut messages = Vec::new();
        for piece in pieces {
            unframer.push(piece);
            loop {
                match unframer.next_message() {
                    Ok(Some(m)) => messages.push(m),
                    Ok(None) => break,
                    Err(e) => return (messages, Some(e)),
                }
            }
        }
        (messages, None)
    };
    let piece = 1 + usize::from(first) % 64;
    let (messages, error) = split(&mut rest.chunks(piece));
    let (whole, whole_error) = split(&mut std::iter::once(rest));
    if (&messages, &error) != (&whole, &whole_error) {
        return Err(format!(
            "pieces of {piece} split {} messages ({error:?}), one piece {} ({whole_error:?})",
            messages.len(),
            whole.len()
        ));
    }
    if let Some(m) = messages.iter().find(|m| m.len() > MAX) {
        return Err(format!("a message of {} bytes over the limit", m.len()));
    }
    for (i, message) in messages.iter().enumerate() {
        match i {
            0 => round_trips::<ExchangeResponse>(message)?,
            _ => round_trips::<PageFrame>(message)?,
        }
    }
    Ok(())
}

/// `data` behind a valid header when its first byte is odd (the kind is 1 plus the next two
/// bits, the protocol version 1 plus the bit after them), else as it is.
pub fn framed(data: &[u8]) -> Vec<u8> {
    use crate::wire::MAGIC;
    match data.split_first() {
        Some((&first, rest)) if first & 1 == 1 => {
            let kind = 1 + (first >> 1 & 3);
            let version = 1 + u16::from(first >> 3 & 1);
            [&MAGIC[..], &version.to_be_bytes(), &[kind], rest].concat()
        }
        _ => data.to_vec(),
    }
}

/// Fuzz target `audit_responder`: `data` (framed as for [`fuzz_decode_envelope`], as an
/// audit request) is answered by an in-memory node holding a few records in two scopes.
/// Whatever the request, the node does not panic, moves no watermark, changes nothing
/// outside the request's scopes, and answers (or refuses) with a message that round-trips.
///
/// # Errors
/// A description of the broken invariant.
pub fn fuzz_audit_responder(data: &[u8]) -> Result<(), String> {
    use crate::wire::{decode, encode, AuditRequest, AuditResponse};
    let Ok(request) = decode::<AuditRequest>(&framed(data)) else {
        return Ok(());
    };
    let time = super::sim_time();
    // A fixed id, so that a saved input replays against the same node.
    let store = crate::store::MemStore::new();
    let id = crate::NodeId::from_bytes([0x42; 16]).expect("not all zero");
    crate::store::Store::identity(&store, id).map_err(|e| format!("{e:?}"))?;
    let node = crate::SyncEngine::with_store(Box::new(store), super::sim_config(&time))
        .map_err(|e| format!("{e:?}"))?;
    let scopes = [super::scope(0), super::scope(1), super::scope(2)];
    for (i, s) in scopes.iter().enumerate() {
        for k in 0..8u8 {
            let key = Key::new([b'k', k]).expect("a two-byte key");
            node.put(s, &key, vec![i as u8, k])
                .map_err(|e| format!("{e:?}"))?;
        }
    }
    let marks = node.watermarks().map_err(|e| format!("{e:?}"))?;
    let outside: Vec<_> = scopes
        .iter()
        .filter(|s| !request.scopes.contains(s))
        .map(|s| node.versions(s).map_err(|e| format!("{e:?}")))
        .collect::<Result<_, _>>()?;
    let in_play = request.scopes.clone();
    let answered = node.answer_audit(request);
    if node.watermarks().map_err(|e| format!("{e:?}"))? != marks {
        return Err("an audit request moved a mark".into());
    }
    let after: Vec<_> = scopes
        .iter()
        .filter(|s| !in_play.contains(s))
        .map(|s| node.versions(s).map_err(|e| format!("{e:?}")))
        .collect::<Result<_, _>>()?;
    if after != outside {
        return Err("an audit request changed a scope outside its scopes".into());
    }
    if let Ok(response) = answered {
        let again = decode::<AuditResponse>(&encode(&response))
            .map_err(|e| format!("the response does not decode: {e}"))?;
        if again != response {
            return Err("the response does not round-trip".into());
        }
    }
    Ok(())
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
