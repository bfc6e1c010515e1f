//! Exponential backoff with jitter, for reconnecting to hubs and retrying failed syncs: the
//! n-th wait is drawn from [d/2, d] with d = base * 2^n capped at `max`, so many agents cut
//! off by one hub restart do not come back in lockstep.

use rand::Rng;
use std::time::Duration;

#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The ceiling of the next wait, without jitter.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next wait (jittered), and counts the attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let low = ceiling / 2;
        let span = (ceiling - low).as_millis() as u64;
        low + Duration::from_millis(rand::rng().random_range(0..=span))
    }

    /// After a success: start again from `base`.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut last_ceiling = Duration::ZERO;
        for _ in 0..30 {
            let ceiling = b.ceiling();
            assert!(ceiling >= last_ceiling);
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            last_ceiling = ceiling;
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert_eq!(b.attempts(), 0);
    }
}
