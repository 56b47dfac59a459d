//! Capped exponential reconnect back-off with jitter.
//!
//! Jitter matters here: after an etcd restart every node of the mesh reconnects, and without
//! it they would all retry in lock-step.

use std::time::Duration;

use rand::Rng;

/// Reconnect delays: `min`, doubling up to `max`; each delay is drawn from `[d/2, d]`.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt; grows the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let floor = ceiling / 2;
        let span = ceiling.saturating_sub(floor);
        let jitter = rand::thread_rng().gen_range(0..=span.as_micros() as u64);
        floor + Duration::from_micros(jitter)
    }

    /// After a session was established: the next failure retries quickly again.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{ceiling:?}/2, {ceiling:?}]"
            );
            ceiling = (ceiling * 2).min(max);
        }
        assert_eq!(ceiling, max);
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn degenerate_bounds_are_sane() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next_delay() <= Duration::from_millis(1));
    }
}
