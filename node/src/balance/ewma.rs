//! Peak-EWMA latency estimate: pessimistic on the way up, patient on the way down.
//!
//! A sample above the estimate replaces it at once, so an endpoint whose path just got slower
//! is penalised on the very next pick. A sample below it is blended in with weight
//! `1 - exp(-elapsed / decay)`, `elapsed` being the time since the previous update; the blend
//! therefore depends on how much *time* passed, not on how many samples arrived, and an
//! endpoint that recovered wins its traffic back over a few decay constants whether it is
//! sampled once a second (transport RTT) or a thousand times (answers).
//!
//! The pick cost reads the estimate decayed towards zero by the time since its last sample
//! ([`PeakEwma::decayed_ns`], as tower's peak-EWMA does): an endpoint that lost every P2C
//! contest gets cheaper the longer it waits, so it is picked again and measured, and a
//! recovered path wins its traffic back without anyone having to tell it.

use std::time::{Duration, Instant};

/// A peak-sensitive exponentially weighted moving average of latency, in nanoseconds.
#[derive(Debug, Clone, Default)]
pub(super) struct PeakEwma {
    /// `(estimate in ns, time of the last update)`; `None` until the first sample.
    state: Option<(f64, Instant)>,
}

impl PeakEwma {
    /// Folds one latency sample taken at `now` into the estimate.
    pub(super) fn observe(&mut self, sample: Duration, now: Instant, decay: Duration) {
        let sample = sample.as_nanos() as f64;
        let next = match self.state {
            None => sample,
            Some((estimate, _)) if sample >= estimate => sample,
            Some((estimate, at)) => {
                let w = weight_of_past(now.saturating_duration_since(at), decay);
                estimate * w + sample * (1.0 - w)
            }
        };
        // A sample stamped before the last update (callers race to the lock) must not move
        // the clock backwards, or the next blend would count the same time twice.
        let at = match self.state {
            Some((_, at)) if at > now => at,
            _ => now,
        };
        self.state = Some((next, at));
    }

    /// Forgets the estimate: `sample` taken at `now` is all there is, as for a first sample.
    pub(super) fn replace(&mut self, sample: Duration, now: Instant) {
        self.state = Some((sample.as_nanos() as f64, now));
    }

    /// Folds in a sample that is itself an average (the transport's smoothed RTT): blended
    /// both ways, never taken as a peak. A smoothed RTT lags the path by seconds; as a peak it
    /// would hold a recovered endpoint at its old latency until the transport caught up.
    pub(super) fn observe_smoothed(&mut self, sample: Duration, now: Instant, decay: Duration) {
        let sample_ns = sample.as_nanos() as f64;
        match self.state {
            None => self.state = Some((sample_ns, now)),
            Some((estimate, at)) => {
                let w = weight_of_past(now.saturating_duration_since(at), decay);
                let at = if at > now { at } else { now };
                self.state = Some((estimate * w + sample_ns * (1.0 - w), at));
            }
        }
    }

    /// The estimate in nanoseconds, or `default` when there has been no sample yet.
    pub(super) fn estimate_ns(&self, default: Duration) -> f64 {
        match self.state {
            Some((estimate, _)) => estimate,
            None => default.as_nanos() as f64,
        }
    }

    /// The estimate as seen at `now`: decayed towards zero by the time since the last sample,
    /// so that silence makes an endpoint look cheaper and it gets picked to be measured again.
    pub(super) fn decayed_ns(&self, default: Duration, now: Instant, decay: Duration) -> f64 {
        match self.state {
            Some((estimate, at)) => {
                estimate * weight_of_past(now.saturating_duration_since(at), decay)
            }
            None => default.as_nanos() as f64,
        }
    }

    /// Whether any sample has been observed.
    pub(super) fn has_samples(&self) -> bool {
        self.state.is_some()
    }
}

/// How much of the old estimate survives after `elapsed`: `exp(-elapsed / decay)`.
/// A zero decay means "no memory": the newest sample is the estimate.
fn weight_of_past(elapsed: Duration, decay: Duration) -> f64 {
    if decay.is_zero() {
        return 0.0;
    }
    (-(elapsed.as_secs_f64() / decay.as_secs_f64())).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn est_ms(e: &PeakEwma) -> f64 {
        e.estimate_ns(ms(1)) / 1e6
    }

    #[test]
    fn smoothed_samples_never_jump_up() {
        let base = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(1), base, ms(3000));
        e.observe_smoothed(ms(20), base + ms(500), ms(3000));
        let v = est_ms(&e);
        assert!(
            v > 1.0 && v < 20.0 * (1.0 - (-1.0f64 / 6.0).exp()) + 1.5,
            "{v}"
        );
    }

    #[test]
    fn empty_estimate_is_the_default() {
        let e = PeakEwma::default();
        assert!(!e.has_samples());
        assert_eq!(e.estimate_ns(ms(7)), 7e6);
    }

    #[test]
    fn first_sample_is_taken_as_is() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(3), t0, DECAY);
        assert!(e.has_samples());
        assert!((est_ms(&e) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn higher_sample_replaces_the_estimate_at_once() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(1), t0, DECAY);
        // Even microseconds later, the peak wins outright: no averaging on the way up.
        e.observe(ms(50), t0 + Duration::from_micros(1), DECAY);
        assert!((est_ms(&e) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn lower_sample_decays_with_elapsed_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(11), t0, DECAY);
        // One decay constant later a 1 ms sample keeps 1/e of the old excess.
        e.observe(ms(1), t0 + DECAY, DECAY);
        let expected = 1.0 + 10.0 * (-1.0f64).exp();
        assert!((est_ms(&e) - expected).abs() < 1e-6, "{}", est_ms(&e));
    }

    #[test]
    fn decay_depends_on_time_not_on_sample_count() {
        let t0 = Instant::now();
        let mut once = PeakEwma::default();
        once.observe(ms(20), t0, DECAY);
        once.observe(ms(2), t0 + ms(5_000), DECAY);

        let mut often = PeakEwma::default();
        often.observe(ms(20), t0, DECAY);
        for i in 1..=500 {
            often.observe(ms(2), t0 + ms(10 * i), DECAY);
        }
        assert!((est_ms(&once) - est_ms(&often)).abs() < 1e-6);
    }

    #[test]
    fn a_burst_of_low_samples_barely_moves_the_estimate() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(10), t0, DECAY);
        for _ in 0..1_000 {
            e.observe(ms(1), t0, DECAY);
        }
        assert!((est_ms(&e) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn reading_does_not_decay() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(10), t0, DECAY);
        assert_eq!(e.estimate_ns(ms(1)), 10e6);
    }

    #[test]
    fn sample_from_the_past_does_not_rewind_the_clock() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(10), t0 + DECAY, DECAY);
        e.observe(ms(1), t0, DECAY); // stale: zero elapsed, keeps the old estimate
        assert!((est_ms(&e) - 10.0).abs() < 1e-9);
        e.observe(ms(1), t0 + DECAY + DECAY, DECAY); // one full decay constant after t0+DECAY
        let expected = 1.0 + 9.0 * (-1.0f64).exp();
        assert!((est_ms(&e) - expected).abs() < 1e-6, "{}", est_ms(&e));
    }

    #[test]
    fn zero_decay_follows_the_latest_sample() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(10), t0, Duration::ZERO);
        e.observe(ms(2), t0, Duration::ZERO);
        assert!((est_ms(&e) - 2.0).abs() < 1e-9);
    }
}
