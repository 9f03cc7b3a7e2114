//! A token bucket (the classic rate limiter): `rate` tokens a second, at most `burst` saved
//! up, one taken per event. Used for the REST reads of entities the mirror does not hold
//! (`hub.rs`) and for new tokens checked with HA (`ha_tokens.rs`). Pure: every call takes
//! `now`.

use std::time::Instant;

/// A token bucket, starting full.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens saved up.
    burst: f64,
    /// Tokens now (fractional).
    tokens: f64,
    /// When `tokens` was computed.
    at: Instant,
}

impl Bucket {
    /// A full bucket of `burst` tokens, refilled at `rate` a second.
    pub fn full(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t = Instant::now();
        let mut b = Bucket::full(2.0, 3.0, t);
        assert_eq!((0..10).filter(|_| b.take(t)).count(), 3, "the burst");
        let later = t + Duration::from_millis(1500);
        assert_eq!(
            (0..10).filter(|_| b.take(later)).count(),
            3,
            "2/s for 1.5 s"
        );
        let much_later = t + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| b.take(much_later)).count(),
            3,
            "never over the burst"
        );
    }
}
