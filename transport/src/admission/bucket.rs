//! A token bucket on an injected clock.

use std::time::{Duration, Instant};

/// Up to `capacity` tokens, one more every `period / per_period`. Integer arithmetic only: the
/// refill keeps the remainder of a partly earned token.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: u32,
    tokens: u32,
    /// Time to earn one token; `None`: the bucket never refills.
    interval: Option<Duration>,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket (its clock starts at its first use) holding at most `capacity` tokens and earning `per_period` tokens each
    /// `period`.
    pub fn new(capacity: u32, per_period: u32, period: Duration) -> TokenBucket {
        let interval = (per_period > 0).then(|| period / per_period);
        TokenBucket {
            capacity,
            tokens: capacity,
            interval: interval.filter(|i| !i.is_zero()),
            last: None,
        }
    }

    /// The same bucket, full at `now` (its clock starts there).
    pub fn full_at(mut self, now: Instant) -> TokenBucket {
        self.tokens = self.capacity;
        self.last = Some(now);
        self
    }

    fn refill(&mut self, now: Instant) {
        let last = *self.last.get_or_insert(now);
        if self.tokens >= self.capacity {
            self.last = Some(now.max(last));
            return;
        }
        let Some(interval) = self.interval else {
            return;
        };
        let elapsed = now.saturating_duration_since(last);
        let earned = elapsed.as_nanos() / interval.as_nanos();
        if earned == 0 {
            return;
        }
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(self.capacity);
        self.last = if self.tokens >= self.capacity {
            Some(now)
        } else {
            // Keep the part of a token already earned.
            Some(last + interval * earned)
        };
    }

    /// Takes one token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Returns a token taken by a caller that did not use it.
    pub fn put_back(&mut self) {
        self.tokens = self.tokens.saturating_add(1).min(self.capacity);
    }

    /// Whether the bucket is full at `now` (it then holds no information worth keeping).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}
