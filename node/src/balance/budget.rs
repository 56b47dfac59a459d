//! Retry budget: retries may add at most `ratio` to the load over a sliding window, plus a
//! small constant allowance so a quiet service can still retry. The same idea as Finagle's
//! `RetryBudget` and Linkerd's retry budgets: when the whole mesh is sick, retries stop
//! instead of multiplying the load.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Slices per window. The budget slides in steps of `window / SLICES`: fine enough that
/// capacity returns smoothly, coarse enough that the state stays a fixed, tiny array.
const SLICES: usize = 10;

/// A sliding-window retry budget shared by all connection tasks of a node.
///
/// Call [`RetryBudget::record_request`] once per original request (never per retry) and
/// [`RetryBudget::try_retry`] before each retry; a `false` answer means "fail now".
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// Retries always allowed per window: `min_per_sec × window`.
    reserve: f64,
    slice: Duration,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// Time origin of slice numbering: the first instant the budget saw.
    origin: Option<Instant>,
    /// Ring of `(slice number, requests, retries)`; a stale slice number means "empty".
    slices: [(u64, u64, u64); SLICES],
}

impl RetryBudget {
    /// A budget allowing `ratio × requests + min_per_sec × window` retries in any `window`.
    /// A negative or NaN ratio counts as zero; a zero window is treated as one millisecond.
    pub fn new(ratio: f64, min_per_sec: u32, window: Duration) -> RetryBudget {
        let window = window.max(Duration::from_millis(1));
        let ratio = if ratio.is_finite() && ratio > 0.0 {
            ratio
        } else {
            0.0
        };
        RetryBudget {
            ratio,
            reserve: f64::from(min_per_sec) * window.as_secs_f64(),
            slice: window / SLICES as u32,
            state: Mutex::new(Window::default()),
        }
    }

    /// Deposits one original request made at `now`.
    pub fn record_request(&self, now: Instant) {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let i = self.current(&mut w, now);
        w.slices[i].1 += 1;
    }

    /// Withdraws one retry at `now` if the budget allows it; `false` means no retry.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let i = self.current(&mut w, now);
        let (requests, retries) = w.slices.iter().fold((0, 0), |(q, r), s| (q + s.1, r + s.2));
        let allowed = (self.ratio * requests as f64 + self.reserve).floor();
        if (retries as f64) < allowed {
            w.slices[i].2 += 1;
            true
        } else {
            false
        }
    }

    /// Ring index of the slice holding `now`, after clearing slices that slid out of the window.
    fn current(&self, w: &mut Window, now: Instant) -> usize {
        let origin = *w.origin.get_or_insert(now);
        let n = (now.saturating_duration_since(origin).as_nanos() / self.slice.as_nanos().max(1))
            as u64;
        for s in &mut w.slices {
            // Slices newer than `n` come from an instant later than this call's (callers race
            // to the lock); they are still inside the window, so they stay.
            if s.0 + (SLICES as u64) <= n {
                *s = (s.0, 0, 0);
            }
        }
        let i = (n % SLICES as u64) as usize;
        // A slot holding a newer slice belongs to a caller that took the lock first with a
        // later instant; this late call is counted there, which only delays its expiry a bit.
        if w.slices[i].0 < n {
            w.slices[i] = (n, 0, 0);
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: f64) -> Duration {
        Duration::from_secs_f64(n)
    }

    fn retries_allowed(b: &RetryBudget, now: Instant) -> usize {
        (0..10_000).take_while(|_| b.try_retry(now)).count()
    }

    #[test]
    fn ratio_of_recent_requests_then_refused() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.2, 0, secs(10.0));
        for _ in 0..100 {
            b.record_request(t0);
        }
        assert_eq!(retries_allowed(&b, t0), 20);
        assert!(!b.try_retry(t0));
    }

    #[test]
    fn minimum_allowance_is_added_per_second_of_window() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.2, 10, secs(10.0));
        for _ in 0..100 {
            b.record_request(t0);
        }
        // 20 % of 100 requests + 10/s × 10 s.
        assert_eq!(retries_allowed(&b, t0), 20 + 100);
    }

    #[test]
    fn quiet_service_gets_the_minimum_only() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.2, 3, secs(1.0));
        assert_eq!(retries_allowed(&b, t0), 3);
    }

    #[test]
    fn budget_refills_as_the_window_slides() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.2, 0, secs(10.0));
        for _ in 0..100 {
            b.record_request(t0);
        }
        assert_eq!(retries_allowed(&b, t0), 20);

        // Half a window later: new requests bring new allowance, old retries still count.
        let t5 = t0 + secs(5.0);
        for _ in 0..50 {
            b.record_request(t5);
        }
        assert_eq!(retries_allowed(&b, t5), 10);

        // The first burst (and its retries) slides out; only the second burst remains.
        let t10 = t0 + secs(10.0);
        assert_eq!(
            retries_allowed(&b, t10),
            0,
            "the second burst's 10 retries used its share"
        );
        let t15 = t0 + secs(15.0);
        for _ in 0..100 {
            b.record_request(t15);
        }
        assert_eq!(retries_allowed(&b, t15), 20);

        // Everything has slid out: nothing to retry on.
        assert_eq!(retries_allowed(&b, t0 + secs(40.0)), 0);
    }

    #[test]
    fn retries_do_not_refill_the_budget() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.5, 0, secs(10.0));
        for _ in 0..10 {
            b.record_request(t0);
        }
        assert_eq!(retries_allowed(&b, t0), 5);
        assert!(!b.try_retry(t0 + secs(1.0)));
    }

    #[test]
    fn late_caller_is_counted_not_lost() {
        let t0 = Instant::now();
        let b = RetryBudget::new(1.0, 0, secs(10.0));
        b.record_request(t0);
        b.record_request(t0 + secs(12.0));
        b.record_request(t0 + secs(2.5)); // stamped earlier, reached the lock later
        assert_eq!(retries_allowed(&b, t0 + secs(12.0)), 2);
    }

    #[test]
    fn nonsense_parameters_are_safe() {
        let t0 = Instant::now();
        let b = RetryBudget::new(f64::NAN, 0, Duration::ZERO);
        b.record_request(t0);
        assert!(!b.try_retry(t0));
        let b = RetryBudget::new(-1.0, 1, secs(1.0));
        assert!(b.try_retry(t0));
        assert!(!b.try_retry(t0));
    }
}
