//! A token bucket: `rate` tokens per second, at most `burst` saved up.
//!
//! Used for per-client flood control and the per-source UDP limit. The
//! caller passes the clock and the parameters, so a reloaded limit applies
//! at once and tests need no sleeping.

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            last: now,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        self.last = now;
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely, i.e. the owner has been
    /// quiet for a whole burst's worth of time.
    pub fn is_full(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= f64::from(burst)
    }

    /// The tokens left and how long ago the bucket was last refilled: what
    /// another process needs to continue it ([`TokenBucket::resume`]).
    pub fn export(&self, now: Instant) -> (f64, std::time::Duration) {
        (self.tokens, now.saturating_duration_since(self.last))
    }

    /// A bucket continuing one exported `age` ago.
    pub fn resume(tokens: f64, age: std::time::Duration, now: Instant) -> Self {
        Self {
            tokens,
            last: now.checked_sub(age).unwrap_or(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, t0);
        assert!((0..3).all(|_| b.try_take(2, 3, t0)));
        assert!(!b.try_take(2, 3, t0));
        assert!(b.try_take(2, 3, t0 + Duration::from_millis(500)));
        assert!(!b.try_take(2, 3, t0 + Duration::from_millis(600)));
        assert!(b.is_full(2, 3, t0 + Duration::from_secs(10)));
    }
}
