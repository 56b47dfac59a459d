//! Per-endpoint ejection state machine: consecutive failures eject with exponential back-off,
//! an expired back-off admits exactly one probe, and the probe's outcome decides.
//!
//! ```text
//!   Healthy --(N consecutive failures | mark_down, if the cap allows)--> Ejected{until}
//!   Ejected --(now >= until)--> Probing{no probe}
//!   Probing{no probe} --(picked)--> Probing{probe sent}
//!   Probing --(success)--> Healthy            Probing --(failure | mark_down)--> Ejected{2x}
//!   Ejected | Probing --(mark_up: a new connection to a peer that was down)--> Healthy
//! ```
//!
//! Pure: time is a parameter, and whether the service may lose one more endpoint (the
//! `max_ejected_fraction` rule) is decided by the caller, who sees all endpoints.

use std::time::{Duration, Instant};

use super::BalanceConfig;

/// A probe whose outcome never came back (the caller dropped the attempt without recording it)
/// frees the probe slot after this long. Longer than any tunnel-open deadline, so a slow probe
/// that is still running is not joined by a second one.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest back-off exponent kept; `2^16 × eject_base` is far past any sane `eject_max`.
const MAX_LEVEL: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Healthy,
    Ejected {
        until: Instant,
    },
    /// Back-off expired. `sent` is when the outstanding probe was handed out, if any.
    Probing {
        sent: Option<Instant>,
    },
}

/// Health of one endpoint.
#[derive(Debug, Clone)]
pub(super) struct Health {
    phase: Phase,
    consecutive_failures: u32,
    /// Ejections since the endpoint was last healthy for a full `eject_max`; the exponent of
    /// the next back-off.
    level: u32,
    /// Start of the latest ejection: the fallback prefers the endpoint ejected longest ago.
    ejected_at: Option<Instant>,
    /// When the endpoint last came back; a long healthy stretch forgives earlier ejections.
    healthy_since: Option<Instant>,
    ejections_total: u64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            phase: Phase::Healthy,
            consecutive_failures: 0,
            level: 0,
            ejected_at: None,
            healthy_since: None,
            ejections_total: 0,
        }
    }
}

impl Health {
    /// Applies the passage of time: an expired back-off turns into a probe slot, and a probe
    /// that never reported frees its slot after [`PROBE_TIMEOUT`].
    pub(super) fn refresh(&mut self, now: Instant) {
        match self.phase {
            Phase::Ejected { until } if now >= until => self.phase = Phase::Probing { sent: None },
            Phase::Probing { sent: Some(at) }
                if now.saturating_duration_since(at) >= PROBE_TIMEOUT =>
            {
                self.phase = Phase::Probing { sent: None }
            }
            _ => {}
        }
    }

    /// May receive a new request: healthy, or probing with the probe slot free.
    pub(super) fn available(&self) -> bool {
        matches!(self.phase, Phase::Healthy | Phase::Probing { sent: None })
    }

    /// Waiting for its probe slot to be used: the next pick should go here.
    pub(super) fn wants_probe(&self) -> bool {
        matches!(self.phase, Phase::Probing { sent: None })
    }

    /// Counts against the ejection cap: ejected, or not yet proven healthy by a probe.
    pub(super) fn is_out(&self) -> bool {
        !matches!(self.phase, Phase::Healthy)
    }

    pub(super) fn ejected_at(&self) -> Option<Instant> {
        self.ejected_at
    }

    pub(super) fn ejections_total(&self) -> u64 {
        self.ejections_total
    }

    /// The balancer handed this endpoint a request; if it was the probe, the slot is taken.
    pub(super) fn on_pick(&mut self, now: Instant) {
        if let Phase::Probing { sent: None } = self.phase {
            self.phase = Phase::Probing { sent: Some(now) };
        }
    }

    /// An attempt succeeded. Returns `true` when this brought the endpoint back.
    pub(super) fn on_success(&mut self, now: Instant) -> bool {
        match self.phase {
            // A request started before the ejection finished late; one old success does not
            // outweigh the failures that ejected it, so the back-off stands.
            Phase::Ejected { .. } => false,
            Phase::Probing { .. } => {
                self.phase = Phase::Healthy;
                self.consecutive_failures = 0;
                self.healthy_since = Some(now);
                true
            }
            Phase::Healthy => {
                self.consecutive_failures = 0;
                false
            }
        }
    }

    /// The peer is reachable again (a new connection). Returns `true` when this brought an
    /// ejected endpoint back. The back-off level stays, so an endpoint that keeps dying still
    /// backs off further after its next failures.
    pub(super) fn on_up(&mut self, now: Instant) -> bool {
        if matches!(self.phase, Phase::Healthy) {
            return false;
        }
        self.phase = Phase::Healthy;
        self.consecutive_failures = 0;
        self.healthy_since = Some(now);
        true
    }

    /// An attempt failed. `may_eject` says whether the service can lose one more endpoint.
    /// Returns the back-off when this ejected the endpoint.
    pub(super) fn on_failure(
        &mut self,
        now: Instant,
        may_eject: bool,
        cfg: &BalanceConfig,
    ) -> Option<Duration> {
        match self.phase {
            // Late results of requests sent before the ejection say nothing new.
            Phase::Ejected { .. } => None,
            // A failed probe: the endpoint already counts as out, so the cap is not consulted.
            Phase::Probing { .. } => Some(self.eject(now, cfg)),
            Phase::Healthy => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                (self.consecutive_failures >= cfg.failures_to_eject.max(1) && may_eject)
                    .then(|| self.eject(now, cfg))
            }
        }
    }

    /// The peer is known dead: counts as the last of the failures that eject, so it ejects
    /// at once if allowed and otherwise as soon as the cap leaves room (its next failure).
    /// Returns the back-off when ejected.
    pub(super) fn on_down(
        &mut self,
        now: Instant,
        may_eject: bool,
        cfg: &BalanceConfig,
    ) -> Option<Duration> {
        if matches!(self.phase, Phase::Healthy) {
            let armed = cfg.failures_to_eject.max(1) - 1;
            self.consecutive_failures = self.consecutive_failures.max(armed);
        }
        self.on_failure(now, may_eject, cfg)
    }

    fn eject(&mut self, now: Instant, cfg: &BalanceConfig) -> Duration {
        let forgiven = matches!(self.phase, Phase::Healthy)
            && self
                .healthy_since
                .is_some_and(|t| now.saturating_duration_since(t) >= cfg.eject_max);
        if forgiven {
            self.level = 0;
        }
        let backoff = backoff(cfg.eject_base, cfg.eject_max, self.level);
        self.level = (self.level + 1).min(MAX_LEVEL);
        self.phase = Phase::Ejected {
            until: now + backoff,
        };
        self.consecutive_failures = 0;
        self.ejected_at = Some(now);
        self.ejections_total += 1;
        backoff
    }
}

/// `base × 2^level`, capped at `max`.
fn backoff(base: Duration, max: Duration, level: u32) -> Duration {
    base.checked_mul(1u32 << level.min(MAX_LEVEL))
        .unwrap_or(max)
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn fail_n(h: &mut Health, n: u32, now: Instant, cfg: &BalanceConfig) -> Option<Duration> {
        (0..n).filter_map(|_| h.on_failure(now, true, cfg)).last()
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let got: Vec<_> = (0..8).map(|l| backoff(s(1), s(30), l)).collect();
        assert_eq!(got, [s(1), s(2), s(4), s(8), s(16), s(30), s(30), s(30)]);
        assert_eq!(backoff(s(1), s(30), u32::MAX), s(30));
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let cfg = BalanceConfig::default();
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(fail_n(&mut h, 2, t0, &cfg), None);
        h.on_success(t0);
        assert_eq!(fail_n(&mut h, 2, t0, &cfg), None);
        assert!(h.available());
        assert_eq!(h.on_failure(t0, true, &cfg), Some(s(1)));
        assert!(!h.available() && h.is_out());
        assert_eq!(h.ejections_total(), 1);
    }

    #[test]
    fn cap_blocks_ejection_until_room_appears() {
        let cfg = BalanceConfig::default();
        let t0 = Instant::now();
        let mut h = Health::default();
        for _ in 0..5 {
            assert_eq!(h.on_failure(t0, false, &cfg), None);
        }
        assert!(h.available());
        assert_eq!(h.on_failure(t0, true, &cfg), Some(s(1)));
    }

    #[test]
    fn expired_backoff_admits_one_probe() {
        let cfg = BalanceConfig::default();
        let t0 = Instant::now();
        let mut h = Health::default();
        fail_n(&mut h, 3, t0, &cfg);
        h.refresh(t0 + Duration::from_millis(999));
        assert!(!h.available());
        h.refresh(t0 + s(1));
        assert!(h.available() && h.wants_probe() && h.is_out());
        h.on_pick(t0 + s(1));
        assert!(!h.available());
        // Still out after a while: the probe is in flight.
        h.refresh(t0 + s(5));
        assert!(!h.available());
        // A lost probe frees the slot eventually.
        h.refresh(t0 + s(1) + PROBE_TIMEOUT);
        assert!(h.wants_probe());
    }

    #[test]
    fn probe_success_returns_the_endpoint() {
        let cfg = BalanceConfig::default();
        let t0 = Instant::now();
        let mut h = Health::default();
        fail_n(&mut h, 3, t0, &cfg);
        h.refresh(t0 + s(1));
        h.on_pick(t0 + s(1));
        assert!(h.on_success(t0 + s(1)));
        assert!(h.available() && !h.is_out());
    }

    #[test]
    fn probe_failure_doubles_the_backoff_up_to_the_cap() {
        let cfg = BalanceConfig::default();
        let mut now = Instant::now();
        let mut h = Health::default();
        let mut seen = vec![fail_n(&mut h, 3, now, &cfg).unwrap()];
        for _ in 0..6 {
            now += *seen.last().unwrap();
            h.refresh(now);
            h.on_pick(now);
            seen.push(
                h.on_failure(now, false, &cfg)
                    .expect("a failed probe re-ejects"),
            );
        }
        assert_eq!(seen, [s(1), s(2), s(4), s(8), s(16), s(30), s(30)]);
    }

    #[test]
    fn late_results_while_ejected_change_nothing() {
        let cfg = BalanceConfig::default();
        let t0 = Instant::now();
        let mut h = Health::default();
        fail_n(&mut h, 3, t0, &cfg);
        assert!(!h.on_success(t0));
        assert_eq!(h.on_failure(t0, true, &cfg), None);
        assert_eq!(h.on_down(t0, true, &cfg), None);
        assert_eq!(h.ejections_total(), 1);
    }

    #[test]
    fn long_healthy_stretch_resets_the_backoff() {
        let cfg = BalanceConfig::default();
        let t0 = Instant::now();
        let mut h = Health::default();
        fail_n(&mut h, 3, t0, &cfg);
        h.refresh(t0 + s(1));
        h.on_success(t0 + s(1));
        // Back soon: the second ejection is longer.
        assert_eq!(fail_n(&mut h, 3, t0 + s(2), &cfg), Some(s(2)));
        h.refresh(t0 + s(4));
        h.on_success(t0 + s(4));
        // Healthy for a full eject_max: forgiven, back to the base.
        assert_eq!(
            fail_n(&mut h, 3, t0 + s(4) + cfg.eject_max, &cfg),
            Some(s(1))
        );
    }

    #[test]
    fn mark_down_ejects_at_once_or_arms_the_count() {
        let cfg = BalanceConfig::default();
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.on_down(t0, false, &cfg), None);
        assert!(h.available());
        // Armed: the next failure ejects once the cap allows it.
        assert_eq!(h.on_failure(t0, true, &cfg), Some(s(1)));

        let mut h = Health::default();
        assert_eq!(h.on_down(t0, true, &cfg), Some(s(1)));
        assert_eq!(h.ejected_at(), Some(t0));
    }
}
