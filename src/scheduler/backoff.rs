//! How long to wait before retrying after failures.

use std::time::Duration;

use rand::Rng;

/// How long to wait before retrying after consecutive failures:
/// `min(base * factor^(attempt - 1), cap)` plus a uniform jitter in `[0, jitter]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The delay after the first failure, before jitter (default 1 s).
    pub base: Duration,
    /// The growth per further failure (default 2). Values below 1 (and NaN) count as 1.
    pub factor: f64,
    /// The largest delay before jitter (default 60 s).
    pub cap: Duration,
    /// The largest jitter added to each delay (default 0.5 s).
    pub jitter: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(60),
            jitter: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    /// The delay after `attempt` consecutive failures (1 after the first), before jitter:
    /// `min(base * factor^(attempt - 1), cap)`. Attempt 0 counts as 1.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        if self.base.is_zero() {
            return Duration::ZERO;
        }
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        // f64::max ignores NaN, so a NaN factor counts as 1.
        let growth = self.factor.max(1.0).powi(exponent);
        // Nanoseconds as f64 are exact up to 2^53 ns (104 days), and multiplying by a power
        // of two stays exact, so the default formula gives whole durations.
        let raw = self.base.as_nanos() as f64 * growth;
        if raw >= self.cap.as_nanos() as f64 {
            return self.cap;
        }
        // raw < cap, which is a Duration: the cast cannot saturate past it.
        duration_from_nanos(raw as u128)
    }

    /// The delay after `attempt` consecutive failures: [`Backoff::ceiling`] plus a jitter
    /// drawn uniformly from `[0, jitter]` with `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let jitter = u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX);
        let extra = if jitter == 0 {
            0
        } else {
            rng.random_range(0..=jitter)
        };
        self.ceiling(attempt)
            .saturating_add(Duration::from_nanos(extra))
    }
}

fn duration_from_nanos(nanos: u128) -> Duration {
    const PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / PER_SEC).unwrap_or(u64::MAX);
    let sub = u32::try_from(nanos % PER_SEC).expect("a remainder below 10^9 fits a u32");
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn default_delays_double_up_to_the_cap() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=8).map(|a| b.ceiling(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn odd_factors_do_not_shrink_or_break_the_delay() {
        for factor in [f64::NAN, -3.0, 0.0, 0.5, f64::INFINITY] {
            let b = Backoff {
                factor,
                ..Backoff::default()
            };
            let expected = if factor == f64::INFINITY {
                [1, 60, 60]
            } else {
                [1, 1, 1]
            };
            let got: Vec<u64> = (1..=3).map(|a| b.ceiling(a).as_secs()).collect();
            assert_eq!(got, expected, "factor {factor}");
        }
    }

    proptest! {
        /// The delay is `min(base * factor^(attempt-1), cap)` plus at most `jitter`, checked
        /// against integer arithmetic for whole factors.
        #[test]
        fn delay_follows_the_formula(
            base_ms in 0u64..10_000,
            factor in 1u32..5,
            cap_ms in 0u64..1_000_000,
            jitter_ms in 0u64..5_000,
            attempt in 1u32..80,
            seed: u64,
        ) {
            let b = Backoff {
                base: Duration::from_millis(base_ms),
                factor: f64::from(factor),
                cap: Duration::from_millis(cap_ms),
                jitter: Duration::from_millis(jitter_ms),
            };
            let growth = u128::from(factor).checked_pow(attempt - 1);
            let model_ms = growth
                .and_then(|g| g.checked_mul(u128::from(base_ms)))
                .map_or(u128::from(cap_ms), |ms| ms.min(u128::from(cap_ms)));
            let ceiling = b.ceiling(attempt);
            prop_assert_eq!(ceiling.as_millis(), model_ms);
            let delay = b.delay(attempt, &mut StdRng::seed_from_u64(seed));
            prop_assert!(delay >= ceiling && delay <= ceiling + b.jitter, "{delay:?} vs {ceiling:?}");
            prop_assert!(b.ceiling(attempt + 1) >= ceiling, "never shrinks");
        }

        /// Fractional factors stay within the cap and grow monotonically.
        #[test]
        fn fractional_factors_grow_to_the_cap(
            factor in 1.0f64..3.0,
            attempt in 1u32..200,
        ) {
            let b = Backoff { factor, ..Backoff::default() };
            prop_assert!(b.ceiling(attempt) <= b.cap);
            prop_assert!(b.ceiling(attempt) >= b.base);
            prop_assert!(b.ceiling(attempt + 1) >= b.ceiling(attempt));
        }
    }
}
