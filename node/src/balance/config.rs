//! Balancer tuning: one struct, each default a named constant with the reason for its value.

use std::time::Duration;

use super::RetryBudget;

/// docs/README.md: "the EWMA decays over ~10 s", read as: a slow spell is forgotten ten seconds later
/// (its excess is down to `exp(-10)`). Between picks the cost decays on read, so an endpoint
/// that lost every P2C contest is picked again after `decay × ln(slow / fast)` — 3.7 s for a
/// path 40× slower with 1 s, 11 s with 3 s, 37 s with Linkerd's 10 s; [`DEFAULT_REMEASURE_AFTER`]
/// bounds that wait whatever the ratio. A single slow answer still sets the estimate at once
/// (peak), so a short constant does not make the balancer slower to leave a bad path.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(1);
/// A healthy endpoint not picked for this long gets the next request, to be measured again, and
/// that answer replaces the estimate instead of being blended with it: the old number is stale
/// evidence. Without it a recovered endpoint waits `decay × ln(slow / fast)` for its decayed
/// estimate to win a contest, which grows with the ratio: 6.9 s for a 1,000× slower path, and
/// 2.9–8.6 s measured in `node/tests/failover.rs` (+10 ms against a fast LAN answer). With it,
/// a slow endpoint still gets only one request in this interval (0.5 % of 100 requests/s) while
/// it stays slow, and a recovered one is back within it.
pub const DEFAULT_REMEASURE_AFTER: Duration = Duration::from_secs(2);
/// At most one pick in this many is a re-measurement: a service with many endpoints and little
/// traffic must not have every request spent on measuring (that would be round robin).
pub const DEFAULT_REMEASURE_SPACING: u32 = 10;
/// How long answers stay the only evidence: the transport's smoothed RTT feeds an endpoint's
/// estimate only after this long without an answer. Longer than the time a healthy but slower
/// endpoint waits between picks (`decay × ln(ratio)`), so under traffic it never applies.
pub const DEFAULT_RTT_FALLBACK_AFTER: Duration = Duration::from_secs(10);
/// Latency assumed before the first sample: a LAN round trip, so a new endpoint is tried soon
/// rather than starved (Linkerd assumes 30 ms for the wider internet; a mesh is mostly one site).
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Consecutive failures that eject: fewer than Envoy's 5 and Linkerd's 7, because a failed
/// attempt is retried elsewhere anyway and every extra failure costs a retry.
pub const DEFAULT_FAILURES_TO_EJECT: u32 = 3;
/// First ejection: one second is enough to skip a restarting peer without losing a healthy one
/// for long over a transient error.
pub const DEFAULT_EJECT_BASE: Duration = Duration::from_secs(1);
/// Longest ejection: a peer that keeps failing is still probed twice a minute.
pub const DEFAULT_EJECT_MAX: Duration = Duration::from_secs(30);
/// docs/README.md: never more than half of a service's endpoints ejected, so a fault on the client's
/// side (which makes every endpoint look bad) cannot empty the pool.
pub const DEFAULT_MAX_EJECTED_FRACTION: f64 = 0.5;
/// Retries may add at most 20 % load: Finagle's and Linkerd's default.
pub const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.2;
/// Retries always allowed per second, so a quiet service can still fail over (Finagle: 10).
pub const DEFAULT_RETRY_BUDGET_MIN_PER_SEC: u32 = 10;
/// Window over which requests and retries are counted (Finagle and Linkerd: 10 s).
pub const DEFAULT_RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Relative weight of an endpoint that does not set one (the registry's record default); cost
/// is divided by `weight / 100`.
pub use meshnode_registry::DEFAULT_WEIGHT;

/// Balancer tuning. Every default is one of the `DEFAULT_*` constants of this module.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// EWMA decay time constant.
    pub decay: Duration,
    /// Latency assumed for an endpoint with no samples yet.
    pub default_rtt: Duration,
    /// A healthy endpoint not picked for this long is picked to be measured again.
    pub remeasure_after: Duration,
    /// At most one pick in this many is such a re-measurement.
    pub remeasure_spacing: u32,
    /// Transport RTT samples are used only after this long without an answer.
    pub rtt_fallback_after: Duration,
    /// Consecutive failures that eject an endpoint.
    pub failures_to_eject: u32,
    /// Length of the first ejection; doubles with each re-ejection.
    pub eject_base: Duration,
    /// Cap on the ejection length. Also how long an endpoint must stay healthy before its
    /// back-off starts again from `eject_base`.
    pub eject_max: Duration,
    /// Largest share of a service's known endpoints that may be ejected at once.
    pub max_ejected_fraction: f64,
    /// Retries allowed as a fraction of recent requests.
    pub retry_budget_ratio: f64,
    /// Retries per second always allowed on top of the ratio.
    pub retry_budget_min_per_sec: u32,
    /// Sliding window of the retry budget.
    pub retry_budget_window: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            decay: DEFAULT_DECAY,
            default_rtt: DEFAULT_RTT,
            remeasure_after: DEFAULT_REMEASURE_AFTER,
            remeasure_spacing: DEFAULT_REMEASURE_SPACING,
            rtt_fallback_after: DEFAULT_RTT_FALLBACK_AFTER,
            failures_to_eject: DEFAULT_FAILURES_TO_EJECT,
            eject_base: DEFAULT_EJECT_BASE,
            eject_max: DEFAULT_EJECT_MAX,
            max_ejected_fraction: DEFAULT_MAX_EJECTED_FRACTION,
            retry_budget_ratio: DEFAULT_RETRY_BUDGET_RATIO,
            retry_budget_min_per_sec: DEFAULT_RETRY_BUDGET_MIN_PER_SEC,
            retry_budget_window: DEFAULT_RETRY_BUDGET_WINDOW,
        }
    }
}

impl BalanceConfig {
    /// The retry budget these settings describe.
    pub fn retry_budget(&self) -> RetryBudget {
        RetryBudget::new(
            self.retry_budget_ratio,
            self.retry_budget_min_per_sec,
            self.retry_budget_window,
        )
    }
}
