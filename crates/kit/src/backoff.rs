//! One retry delay policy for every loop that waits before trying again:
//! exponential growth, capped, with jitter.
//!
//! Jitter matters in a fleet: many executors that lose the same server at the
//! same moment would otherwise retry in lockstep and meet it again together.
//! The delay is drawn uniformly from `[ceiling / 2, ceiling]` ("equal
//! jitter"), so it never collapses to zero and never exceeds the cap.

use std::time::Duration;

/// Exponential backoff with equal jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// No delay is longer than this.
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The largest delay after failed try number `attempt` (1-based):
    /// `initial * 2^(attempt-1)`, capped at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay to wait after failed try number `attempt` (1-based): uniform
    /// in `[ceiling / 2, ceiling]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// [`Self::delay`] with the random draw (in `[0, 1)`) given, for tests.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let ceilings: Vec<u128> = (1..=5).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 500, 500]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(500));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
    }

    #[test]
    fn delays_stay_between_half_the_ceiling_and_the_ceiling() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for (attempt, unit, want_ms) in [
            (1, 0.0, 50),
            (1, 1.0, 100),
            (3, 0.5, 300),
            (20, 0.0, 15_000),
            (20, 1.0, 30_000),
            (2, -1.0, 100),
            (2, 7.0, 200),
        ] {
            assert_eq!(
                b.delay_with(attempt, unit).as_millis(),
                want_ms,
                "attempt {attempt}, draw {unit}"
            );
        }
    }

    #[test]
    fn random_delays_are_spread_not_in_lockstep() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let draws: std::collections::BTreeSet<u128> =
            (0..64).map(|_| b.delay(1).as_micros()).collect();
        assert!(
            draws.len() > 32,
            "only {} distinct delays of 64",
            draws.len()
        );
        assert!(draws.iter().all(|d| (500_000..=1_000_000).contains(d)));
    }
}
