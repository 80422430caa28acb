//! What stands in front of each provider: a circuit breaker and a rate limit.
//!
//! Both run on real elapsed time (`Instant`), not business time: they protect a provider from
//! load now, whatever the business clock says.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Skips a provider that keeps failing. After `threshold` transient failures in a row the
/// circuit opens for `cooldown`; then one call is let through (half-open): its success closes
/// the circuit, its failure opens it again.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    /// A closed breaker.
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call may go to the provider now.
    pub(crate) fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> bool {
        let mut s = self.state();
        match s.open_until {
            None => true,
            Some(until) if now < until => false,
            // Half-open: one trial call at a time.
            Some(_) if s.probing => false,
            Some(_) => {
                s.probing = true;
                true
            }
        }
    }

    /// Whether the circuit is open (calls are being skipped).
    pub(crate) fn is_open(&self) -> bool {
        self.state().open_until.is_some()
    }

    /// The provider took a message.
    pub(crate) fn success(&self) {
        *self.state() = BreakerState::default();
    }

    /// The provider failed transiently.
    pub(crate) fn failure(&self) {
        self.failure_at(Instant::now());
    }

    fn failure_at(&self, now: Instant) {
        let mut s = self.state();
        s.failures += 1;
        if s.probing || s.failures >= self.threshold {
            s.open_until = Some(now + self.cooldown);
            s.probing = false;
            s.failures = 0;
        }
    }

    /// A call let through that ended without a verdict on the provider (a permanent failure
    /// of one message): a trial call may be made again.
    pub(crate) fn neutral(&self) {
        self.state().probing = false;
    }
}

/// A token bucket: at most `rate` calls a second on average, bursts of up to `rate` (at
/// least one).
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// A full bucket.
    pub(crate) fn new(rate: f64) -> RateLimit {
        let burst = rate.max(1.0);
        RateLimit {
            rate,
            burst,
            bucket: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, since) = *bucket;
        let tokens = (tokens + now.duration_since(since).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            Ok(())
        } else {
            *bucket = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    /// Waits for a token.
    pub(crate) async fn acquire(&self) {
        while let Err(wait) = self.try_take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_and_closes_after_a_good_trial() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        b.failure_at(t0);
        b.failure_at(t0);
        assert!(b.allow_at(t0), "two failures: still closed");
        b.success();
        b.failure_at(t0);
        b.failure_at(t0);
        assert!(b.allow_at(t0), "a success resets the count");
        b.failure_at(t0);
        assert!(!b.allow_at(t0 + Duration::from_secs(9)), "open");
        let later = t0 + Duration::from_secs(10);
        assert!(b.allow_at(later), "half-open: one trial");
        assert!(!b.allow_at(later), "only one trial at a time");
        b.failure_at(later);
        assert!(
            !b.allow_at(later + Duration::from_secs(9)),
            "a failed trial opens it again"
        );
        let again = later + Duration::from_secs(10);
        assert!(b.allow_at(again));
        b.success();
        assert!(b.allow_at(again) && b.allow_at(again), "closed");
        assert!(!b.is_open());
    }

    #[test]
    fn the_bucket_allows_the_rate_and_no_more() {
        let limit = RateLimit::new(10.0);
        let t0 = Instant::now();
        let taken = (0..50).filter(|_| limit.try_take(t0).is_ok()).count();
        assert_eq!(taken, 10, "a full bucket's burst");
        let wait = limit.try_take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Over one more second, ten more.
        let t1 = t0 + Duration::from_secs(1);
        let taken = (0..50).filter(|_| limit.try_take(t1).is_ok()).count();
        assert_eq!(taken, 10);
    }
}
