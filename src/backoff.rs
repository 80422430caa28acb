//! Exponential backoff with full jitter, for every loop that retries after a failure.

use std::time::Duration;

/// Exponential backoff with full jitter.
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.max);
        self.attempt += 1;
        ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}
