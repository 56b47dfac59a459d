//! The sampler: every [`SAMPLE_INTERVAL`], QUIC statistics (RTT, losses) go into the peer table
//! and the metrics, and sampled totals (registry state, tunnel bytes, ejections) into the
//! metrics. [`sync`] also runs before every `/metrics` render so counters are exact when read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_registry::{Registry, RegistryState};
use meshnode_transport::{Alpn, MeshEndpoint, PeerPool};

use crate::info::Readiness;
use crate::routing::Routing;
use crate::telemetry::Telemetry;

/// How often QUIC statistics are sampled into metrics and the balancers.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// What the sampler reads and writes.
pub struct SamplerInputs {
    /// Balancers (ejections) and the peer table (RTT).
    pub routing: Arc<Routing>,
    /// Connection statistics.
    pub pool: PeerPool,
    /// Registry state.
    pub registry: Registry,
    /// Where the numbers go.
    pub telemetry: Arc<Telemetry>,
    /// What /readyz answers (`meshnode_ready`).
    pub readiness: Arc<Readiness>,
    /// Handshake admission totals.
    pub endpoint: MeshEndpoint,
}

/// Samples until the task is stopped.
pub async fn run(inputs: Arc<SamplerInputs>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        for peer in inputs.pool.snapshot() {
            if peer.alpn != Alpn::Meshnode {
                continue;
            }
            let handles = inputs.telemetry.peer(&peer.name);
            if let Some(rtt) = peer.rtt {
                handles.rtt.set(rtt.as_secs_f64());
                inputs.routing.peers().observe_rtt(&peer.name, rtt, now);
            }
            handles.lost.absolute(peer.lost_packets);
        }
        sync(&inputs);
    }
}

/// Brings sampled values (registry state, byte totals, ejections) into the metrics.
pub fn sync(inputs: &SamplerInputs) {
    let now = Instant::now();
    for route in inputs.routing.routes() {
        // Every endpoint the balancer holds, including ones just gone from the view.
        let ejections = route
            .balancer
            .nodes()
            .into_iter()
            .map(|node| {
                let total = route.balancer.snapshot(&node, now).ejections_total;
                (node, total)
            })
            .filter(|(_, total)| *total > 0)
            .collect::<Vec<_>>();
        if !ejections.is_empty() {
            inputs.telemetry.service(&route.service).sync(ejections);
        }
    }
    for svc in inputs.telemetry.services() {
        svc.sync(std::iter::empty());
    }
    let status = inputs.registry.status().borrow().clone();
    inputs.telemetry.registry(
        status.state == RegistryState::Connected,
        status.updates_total,
        status.lease_grants,
    );
    inputs
        .telemetry
        .ready(inputs.readiness.blockers().is_empty());
    inputs
        .telemetry
        .handshakes(inputs.endpoint.handshake_stats().snapshot());
    inputs
        .telemetry
        .inbound_peer_connections(inputs.endpoint.inbound_connections());
    inputs
        .telemetry
        .memory_trims(inputs.endpoint.memory_trims());
}
