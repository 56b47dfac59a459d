//! A log line allowance: at most a few lines per period, with the count of the suppressed ones
//! carried by the next line that is written.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::TokenBucket;

/// Lines written per period by default, and the period.
pub const DEFAULT_LINES: u32 = 5;
/// See [`DEFAULT_LINES`].
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    bucket: TokenBucket,
    suppressed: u64,
}

/// Rate limiter for one kind of log line. Events are always counted elsewhere; this decides only
/// whether this one is also written.
#[derive(Debug)]
pub struct RateLimitedLog {
    state: Mutex<State>,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        RateLimitedLog::new(DEFAULT_LINES, DEFAULT_PERIOD)
    }
}

impl RateLimitedLog {
    /// At most `lines` lines (in a burst) and `lines` more per `period`.
    pub fn new(lines: u32, period: Duration) -> RateLimitedLog {
        RateLimitedLog {
            state: Mutex::new(State {
                bucket: TokenBucket::new(lines, lines, period),
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be written at `now`: `Some(n)` with the number of lines suppressed
    /// since the last one written, `None` to stay silent (this one is then counted as
    /// suppressed).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.bucket.take(now) {
            Some(std::mem::take(&mut st.suppressed))
        } else {
            st.suppressed += 1;
            None
        }
    }
}
