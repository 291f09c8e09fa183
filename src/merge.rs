//! Last-write-wins by Hlc, the only merge rule.
//!
//! An incoming version replaces the stored one iff its Hlc is greater. Hlcs are totally
//! ordered and carry the writer's id, so two distinct versions never tie, and the merge is
//! commutative, associative and idempotent: any order or repetition of the same set of
//! versions yields the same state (checked by property tests and the `merge_laws` fuzz target).

use std::collections::BTreeMap;

use crate::record::{Key, Scope, Version};

/// Whether `incoming` replaces `stored`.
pub fn supersedes(incoming: &Version, stored: Option<&Version>) -> bool {
    stored.is_none_or(|s| incoming.hlc > s.hlc)
}

/// The winner of `stored` and `incoming`.
pub fn merge(stored: Option<Version>, incoming: Version) -> Version {
    match stored {
        Some(s) if !supersedes(&incoming, Some(&s)) => s,
        _ => incoming,
    }
}

/// The LWW state of a set of versions: per (scope, key), the version with the greatest Hlc.
pub type State = BTreeMap<(Scope, Key), Version>;

/// Merges `incoming` into `state`. Returns whether the state changed.
pub fn merge_into(state: &mut State, scope: &Scope, key: &Key, incoming: &Version) -> bool {
    let slot = state.get(&(scope.clone(), key.clone()));
    if !supersedes(incoming, slot) {
        return false;
    }
    state.insert((scope.clone(), key.clone()), incoming.clone());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::{Hlc, NodeId};
    use crate::record::Op;
    use proptest::prelude::*;

    fn arb_version() -> impl Strategy<Value = (u8, Version)> {
        (0u8..4, 0u64..20, 1u8..4).prop_map(|(k, t, n)| {
            let hlc = Hlc::new(t, NodeId::from_bytes([n; 16]).expect("n >= 1"));
            // One writer issues one version per timestamp, so the op is a function of the Hlc.
            let op = if (t + u64::from(n)) % 3 == 0 {
                Op::Delete
            } else {
                Op::Put {
                    value: hlc.to_string().into_bytes(),
                    blob: None,
                }
            };
            (k, Version { hlc, op })
        })
    }

    fn fold(vs: &[(u8, Version)]) -> State {
        let mut s = State::new();
        for (k, v) in vs {
            merge_into(&mut s, &Scope::shared(), &Key::new([*k]).unwrap(), v);
        }
        s
    }

    proptest! {
        #[test]
        fn lww_is_order_and_repetition_independent(vs in prop::collection::vec(arb_version(), 0..40), seed in any::<u64>()) {
            let base = fold(&vs);
            let mut shuffled = vs.clone();
            shuffled.extend(vs.iter().take(5).cloned());
            let mut rng = seed;
            for i in (1..shuffled.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (rng >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(fold(&shuffled), base);
        }
    }
}
