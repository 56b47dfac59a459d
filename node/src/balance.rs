//! Load balancing and failover decisions (docs/README.md): which endpoint gets the next tunnel or
//! request, when an endpoint is ejected and how it comes back, and how many retries the mesh
//! can afford.
//!
//! Everything here is pure: no sockets, no runtime, no clock. Time arrives as `now` and
//! randomness as `&mut impl Rng`, so tests drive whole scenarios with constructed instants and
//! a seeded RNG. The outbound proxy owns a [`Balancer`] and a [`RetryBudget`] per service (behind
//! `Arc`s); locks are held for a few field updates and never across `.await`.
//!
//! - `config`: tuning, with the reason for each default.
//! - `ewma`: the peak-EWMA latency estimate.
//! - `eject`: the per-endpoint ejection / back-off / probe state machine.
//! - `pick`: power of two choices over the candidates, and the fallback when none is healthy.
//! - `budget`: the sliding-window retry budget.

mod budget;
mod config;
mod eject;
mod ewma;
mod peers;
mod pick;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use self::config::*;
pub use budget::RetryBudget;
pub use peers::{PeerHealth, PeerTable};

use eject::Health;
use ewma::PeakEwma;
use pick::Choice;

/// What `/status` shows for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// Receives traffic.
    Healthy,
    /// Skipped after failures or a dead connection; includes waiting for its probe.
    Ejected,
    /// The peer announced it is going away; skipped while others exist.
    Draining,
}

impl EndpointState {
    /// `"healthy"`, `"ejected"` or `"draining"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Ejected => "ejected",
            EndpointState::Draining => "draining",
        }
    }
}

/// One candidate for a pick: the endpoint's node name and its relative weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Endpoint key: the node name.
    pub node: &'a str,
    /// Relative share ([`DEFAULT_WEIGHT`] = 100); 0 is treated as 1.
    pub weight: u32,
}

/// Counters and state of one endpoint, for `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSnapshot {
    /// Current state; `Draining` wins over `Ejected`.
    pub state: EndpointState,
    /// Peak-EWMA latency estimate in milliseconds (`default_rtt` before any sample).
    pub ewma_ms: f64,
    /// Requests or tunnels currently open to it.
    pub inflight: u32,
    /// Attempts started on it ([`Balancer::start`]).
    pub requests_total: u64,
    /// Failed attempts ([`Balancer::record_failure`]).
    pub failures_total: u64,
    /// Times it was ejected.
    pub ejections_total: u64,
}

/// Per-service balancer: P2C over peak-EWMA latency × (in-flight + 1), scaled by weight, with
/// ejection, back-off, probing and draining. Shared by all connection tasks as `Arc<Balancer>`.
#[derive(Debug)]
pub struct Balancer {
    cfg: BalanceConfig,
    /// Peer facts (down, draining, RTT), shared by every balancer of a node.
    peers: Arc<PeerTable>,
    /// The table was made for this balancer alone (tests): `retain` prunes it too.
    owns_peers: bool,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    endpoints: HashMap<String, Endpoint>,
    /// Number of the latest pick. Its candidate list is the service's current set of endpoints,
    /// the base of the ejection cap; entries created by other calls (RTT samples arrive for
    /// every peer, whatever it serves) do not count.
    generation: u64,
    /// Picks since the last re-measurement pick (`remeasure_spacing` apart at least).
    picks_since_remeasure: u32,
    /// The [`PeerTable`] generation last applied.
    peers_seen: u64,
}

#[derive(Debug, Default)]
struct Endpoint {
    /// `generation` of the latest pick that listed it as a candidate; 0 = never listed.
    listed: u64,
    ewma: PeakEwma,
    /// Shared with the guards, so a guard outliving `retain` never touches a new entry.
    inflight: Arc<AtomicU32>,
    draining: bool,
    /// The peer's connection died or could not be dialled ([`Balancer::mark_down`]). A down
    /// endpoint that was ejected returns only through [`Balancer::mark_up`] (a new connection):
    /// probing it with an application's request would make that request wait for a dial
    /// timeout while the node's reconnector already knows the answer.
    down: bool,
    /// When its last answer (tunnel open, time to first byte) was recorded.
    last_answer: Option<Instant>,
    /// When a pick last chose it; `None` = never.
    picked_at: Option<Instant>,
    /// Picked because its estimate was stale: the next answer replaces the estimate.
    remeasuring: bool,
    health: Health,
    requests_total: u64,
    failures_total: u64,
    /// `downs`, `ups` and `rtt_samples` of the peer's [`PeerHealth`] last applied.
    downs_seen: u64,
    ups_seen: u64,
    rtt_seen: u64,
}

/// Marks one request or tunnel as in flight on an endpoint until dropped.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InflightGuard {
    inflight: Arc<AtomicU32>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// A balancer with no endpoint state yet and a peer table of its own; endpoints are learnt
    /// from the calls.
    pub fn new(cfg: BalanceConfig) -> Balancer {
        Balancer {
            cfg,
            peers: Arc::new(PeerTable::new()),
            owns_peers: true,
            table: Mutex::new(Table::default()),
        }
    }

    /// A balancer reading the node's shared peer table.
    pub fn with_peers(cfg: BalanceConfig, peers: Arc<PeerTable>) -> Balancer {
        Balancer {
            cfg,
            peers,
            owns_peers: false,
            table: Mutex::new(Table::default()),
        }
    }

    /// The peer table this balancer reads.
    pub fn peers(&self) -> &Arc<PeerTable> {
        &self.peers
    }

    /// The settings in use.
    pub fn config(&self) -> &BalanceConfig {
        &self.cfg
    }

    /// Picks one endpoint among `candidates` minus `exclude` (endpoints already tried for this
    /// request).
    ///
    /// An endpoint whose back-off expired gets the next request as its probe, one at a time;
    /// next, an endpoint never picked and never measured gets one request to be measured;
    /// next, a healthy endpoint not picked for `remeasure_after` (or never, but known from
    /// transport RTT samples) gets one to be measured again (at most one pick in
    /// `remeasure_spacing`).
    /// Otherwise power of two choices among the healthy, non-draining ones: two distinct draws
    /// with probability proportional to weight, the lower `ewma × (inflight + 1) / (weight/100)`
    /// wins. With none healthy: the non-draining endpoint ejected longest ago, then a draining
    /// one — a sick endpoint beats none. `None` only when nothing remains after `exclude`.
    pub fn pick(
        &self,
        candidates: &[Candidate<'_>],
        exclude: &[&str],
        now: Instant,
        rng: &mut impl rand::Rng,
    ) -> Option<String> {
        let mut table = self.lock();
        table.generation += 1;
        let generation = table.generation;
        let may_remeasure = table.picks_since_remeasure >= self.cfg.remeasure_spacing;
        let mut created = false;
        for c in candidates {
            if !table.endpoints.contains_key(c.node) {
                table
                    .endpoints
                    .insert(c.node.to_owned(), Endpoint::default());
                created = true;
            }
        }
        self.sync_peers(&mut table, created);
        let map = &mut table.endpoints;
        let mut nodes: Vec<&str> = Vec::with_capacity(candidates.len());
        let mut choices: Vec<Choice> = Vec::with_capacity(candidates.len());
        for c in candidates {
            let Some(ep) = map.get_mut(c.node) else {
                continue;
            };
            ep.listed = generation;
            if exclude.contains(&c.node) || nodes.contains(&c.node) {
                continue;
            }
            ep.health.refresh(now);
            nodes.push(c.node);
            // Down and ejected: waits for a new connection, not for a probe.
            let waits_for_reconnect = ep.down && ep.health.is_out();
            choices.push(Choice {
                weight: c.weight.max(1),
                cost: cost(ep, &self.cfg, c.weight, now),
                available: ep.health.available() && !waits_for_reconnect,
                wants_probe: ep.health.wants_probe() && !waits_for_reconnect,
                draining: ep.draining,
                ejected_at: ep.health.ejected_at(),
                unknown: ep.picked_at.is_none() && !ep.ewma.has_samples(),
                stale: may_remeasure
                    && ep.picked_at.is_none_or(|at| {
                        now.saturating_duration_since(at) >= self.cfg.remeasure_after
                    }),
            });
        }
        let chosen = pick::choose(&choices, rng)?;
        let node = nodes[chosen];
        if choices[chosen].stale {
            table.picks_since_remeasure = 0;
        } else {
            table.picks_since_remeasure = table.picks_since_remeasure.saturating_add(1);
        }
        if let Some(ep) = table.endpoints.get_mut(node) {
            ep.picked_at = Some(now);
            ep.remeasuring |= choices[chosen].stale;
            if ep.health.wants_probe() && !ep.draining {
                tracing::debug!(node, "probing ejected endpoint");
            }
            ep.health.on_pick(now);
        }
        Some(node.to_owned())
    }

    /// Call when a request or tunnel starts on `node`; the guard decrements in-flight on drop.
    pub fn start(self: &Arc<Self>, node: &str) -> InflightGuard {
        let mut table = self.lock();
        let ep = table.entry(node);
        ep.requests_total += 1;
        ep.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            inflight: Arc::clone(&ep.inflight),
        }
    }

    /// Outcome of a successful attempt; `latency` is the tunnel-open time or the HTTP time to
    /// first byte. A successful probe returns an ejected endpoint to service. The first answer,
    /// and the first after a re-measurement pick, replace the estimate: what it held was a
    /// guess, a smoothed transport RTT, or stale.
    pub fn record_success(&self, node: &str, latency: Duration, now: Instant) {
        let mut table = self.lock();
        self.sync_peers(&mut table, false);
        let ep = table.entry(node);
        if ep.last_answer.is_none() || std::mem::take(&mut ep.remeasuring) {
            ep.ewma.replace(latency, now);
        } else {
            ep.ewma.observe(latency, now, self.cfg.decay);
        }
        ep.last_answer = Some(now);
        // An answer came over a live connection, so the peer is not down.
        let was_down = std::mem::take(&mut ep.down);
        if ep.health.on_success(now) {
            tracing::info!(node, "endpoint back after a successful probe");
        }
        if was_down {
            self.peers.mark_up(node, now);
            if let Some(ep) = table.endpoints.get_mut(node) {
                ep.ups_seen = self.peers.get(node).map_or(0, |p| p.ups);
            }
        }
    }

    /// A failed attempt. Counts toward ejection; a failed probe re-ejects with doubled back-off.
    /// Never ejects more than `max_ejected_fraction` of the service's endpoints, counted from
    /// the candidate list of the latest [`Balancer::pick`].
    pub fn record_failure(&self, node: &str, now: Instant) {
        let mut table = self.lock();
        self.sync_peers(&mut table, false);
        let may_eject = table.may_eject(node, self.cfg.max_ejected_fraction);
        let ep = table.entry(node);
        ep.failures_total += 1;
        if let Some(backoff) = ep.health.on_failure(now, may_eject, &self.cfg) {
            tracing::info!(
                node,
                backoff_ms = backoff.as_millis() as u64,
                "endpoint ejected after failures"
            );
        }
    }

    /// A transport RTT sample of the peer, written to the peer table.
    ///
    /// It is the estimate of an endpoint without recent answers (never picked yet, or idle
    /// longer than `rtt_fallback_after`), and ignored while answers are fresh: an answer
    /// measures the same path plus the far node's work, at once, while QUIC's smoothed RTT
    /// trails a change by seconds and would hold a recovered endpoint at its old latency.
    pub fn observe_rtt(&self, node: &str, rtt: Duration, now: Instant) {
        self.peers.observe_rtt(node, rtt, now);
        self.sync_peers(&mut self.lock(), false);
    }

    /// The peer is known dead (QUIC connection closed or reset, or a dial failed): eject it
    /// now. It comes back with [`Balancer::mark_up`] when a connection to it succeeds, not by
    /// probing with an application's request. When the ejection cap leaves no room, it stays
    /// in service and its next failure ejects it. Written to the peer table, so every balancer
    /// sharing it applies it.
    pub fn mark_down(&self, node: &str, now: Instant) {
        self.peers.mark_down(node, now);
        self.sync_peers(&mut self.lock(), false);
    }

    /// A new connection to the peer succeeded: a down endpoint returns to service at once,
    /// whatever its back-off (a restarted or reconnected peer is fresh evidence). Does nothing
    /// for an endpoint that was not down; one ejected for failed answers still needs a probe.
    pub fn mark_up(&self, node: &str, now: Instant) {
        self.peers.mark_up(node, now);
        self.sync_peers(&mut self.lock(), false);
    }

    /// Peers marked down and not yet reconnected: what the node's reconnector dials.
    pub fn down_nodes(&self) -> Vec<String> {
        self.peers.down_peers()
    }

    /// Marks `node` as draining (the peer said it is going away) or not; draining endpoints get
    /// no new work while any other endpoint can take it.
    pub fn set_draining(&self, node: &str, draining: bool) {
        self.peers.set_draining(node, draining);
        self.sync_peers(&mut self.lock(), false);
    }

    /// Drops the state of endpoints for which `keep` is false (no longer in the registry).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if self.owns_peers {
            self.peers.retain(&keep);
        }
        self.lock().endpoints.retain(|node, _| keep(node));
    }

    /// Every endpoint this balancer holds state for.
    pub fn nodes(&self) -> Vec<String> {
        self.lock().endpoints.keys().cloned().collect()
    }

    /// State and counters of `node` at `now`; an unknown node reads as healthy and idle.
    pub fn snapshot(&self, node: &str, now: Instant) -> EndpointSnapshot {
        let mut table = self.lock();
        self.sync_peers(&mut table, false);
        let Some(ep) = table.endpoints.get_mut(node) else {
            return snapshot_of(&Endpoint::default(), &self.cfg);
        };
        ep.health.refresh(now);
        snapshot_of(ep, &self.cfg)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere cannot leave these counters inconsistent enough to matter more
        // than losing all balancing, so keep going with whatever is there.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Table {
    fn entry(&mut self, node: &str) -> &mut Endpoint {
        self.endpoints.entry(node.to_owned()).or_default()
    }

    /// Whether `node` may be ejected without more than `fraction` of the service's endpoints
    /// being out at once. Before the first pick every entry counts as an endpoint.
    fn may_eject(&self, node: &str, fraction: f64) -> bool {
        let listed = |ep: &Endpoint| self.generation == 0 || ep.listed == self.generation;
        let node_listed = self.endpoints.get(node).is_some_and(listed);
        let known =
            self.endpoints.values().filter(|ep| listed(ep)).count() + usize::from(!node_listed);
        let out = self
            .endpoints
            .iter()
            .filter(|(k, ep)| k.as_str() != node && listed(ep) && ep.health.is_out())
            .count();
        let allowed = (known as f64 * fraction.clamp(0.0, 1.0) + 1e-9).floor() as usize;
        let ok = out < allowed;
        if !ok {
            tracing::debug!(
                node,
                out,
                known,
                "ejection withheld: too many endpoints already out"
            );
        }
        ok
    }
}

/// `ewma × (inflight + 1) / (weight / 100)`, in nanoseconds.
/// The pick cost. The latency term decays with the time since the endpoint's last sample
/// (as tower's peak-EWMA does on read): an endpoint that gets neither picks nor transport RTT
/// samples (no live connection) would otherwise keep its worst estimate forever and never be
/// picked again to prove it recovered.
fn cost(ep: &Endpoint, cfg: &BalanceConfig, weight: u32, now: Instant) -> f64 {
    let load = f64::from(ep.inflight.load(Ordering::Relaxed)) + 1.0;
    let scale = f64::from(weight.max(1)) / f64::from(DEFAULT_WEIGHT);
    ep.ewma.decayed_ns(cfg.default_rtt, now, cfg.decay) * load / scale
}

fn snapshot_of(ep: &Endpoint, cfg: &BalanceConfig) -> EndpointSnapshot {
    let state = if ep.draining {
        EndpointState::Draining
    } else if ep.health.is_out() {
        EndpointState::Ejected
    } else {
        EndpointState::Healthy
    };
    EndpointSnapshot {
        state,
        ewma_ms: ep.ewma.estimate_ns(cfg.default_rtt) / 1e6,
        inflight: ep.inflight.load(Ordering::Relaxed),
        requests_total: ep.requests_total,
        failures_total: ep.failures_total,
        ejections_total: ep.health.ejections_total(),
    }
}
