//! The sampler: every [`SAMPLE_INTERVAL`], QUIC statistics (RTT, losses) go into the peer table
//! and the metrics, and sampled totals (registry state, tunnel bytes, ejections) into the
//! metrics. [`sync`] also runs before every `/metrics` render so counters are exact when read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_registry::{Registry, RegistryState};
use meshnode_transport::{Alpn, MeshEndpoint, PeerPool, QuicStats};

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
    let mut last = HashMap::new();
    loop {
        tick.tick().await;
        sample_connections(&inputs, &mut last, Instant::now());
        sync(&inputs);
    }
}

/// Where a connection's last sample is kept: peer, ALPN, dialled by this node.
type ConnKey = (String, Alpn, bool);

/// What a connection added since its last sample: everything it holds when it is another
/// connection (another id, or the same id with fewer packets sent, as quinn may reuse a closed
/// connection's id). Returns (sent, lost, congestion events).
fn added_since(now: &QuicStats, before: Option<&QuicStats>) -> (u64, u64, u64) {
    match before {
        Some(b) if b.conn_id == now.conn_id && now.sent_packets >= b.sent_packets => (
            now.sent_packets - b.sent_packets,
            now.lost_packets.saturating_sub(b.lost_packets),
            now.congestion_events.saturating_sub(b.congestion_events),
        ),
        _ => (now.sent_packets, now.lost_packets, now.congestion_events),
    }
}

/// QUIC statistics of every connection with a peer, both ways: per ALPN and direction into
/// `meshnode_quic_connection_*`; of the connections this node dialled (those that carry its
/// own traffic), the `meshnode/1` RTT into the peer table and `meshnode_peer_rtt_seconds` and
/// every ALPN's losses into `meshnode_quic_lost_packets_total`.
fn sample_connections(
    inputs: &SamplerInputs,
    last: &mut HashMap<ConnKey, QuicStats>,
    now: Instant,
) {
    let dialled = inputs
        .pool
        .snapshot()
        .into_iter()
        .filter_map(|p| Some((p.name, p.alpn, true, p.quic?)));
    let accepted = inputs
        .pool
        .inbound()
        .into_iter()
        .map(|i| (i.name, i.alpn, false, i.quic));
    let mut next = HashMap::with_capacity(last.len());
    for (name, alpn, outbound, quic) in dialled.chain(accepted) {
        let handles = inputs.telemetry.peer(&name);
        let conn = handles.connection(alpn, outbound);
        conn.rtt.set(quic.rtt.as_secs_f64());
        conn.cwnd.set(quic.cwnd as f64);
        let key = (name, alpn, outbound);
        let (sent, lost, congestion) = added_since(&quic, last.get(&key));
        conn.sent.increment(sent);
        conn.lost.increment(lost);
        conn.congestion.increment(congestion);
        if outbound {
            handles.lost.increment(lost);
            if alpn == Alpn::Meshnode {
                handles.rtt.set(quic.rtt.as_secs_f64());
                inputs.routing.peers().observe_rtt(&key.0, quic.rtt, now);
            }
        }
        next.insert(key, quic);
    }
    // Only live connections are kept: a connection gone, the next one counts from zero.
    *last = next;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshnode_transport::QuicStats;

    use super::added_since;

    fn q(
        conn_id: usize,
        sent_packets: u64,
        lost_packets: u64,
        congestion_events: u64,
    ) -> QuicStats {
        QuicStats {
            conn_id,
            rtt: Duration::from_micros(100),
            cwnd: 12_000,
            sent_packets,
            lost_packets,
            congestion_events,
        }
    }

    #[test]
    fn the_same_connection_adds_its_growth() {
        assert_eq!(
            added_since(&q(1, 150, 7, 2), Some(&q(1, 100, 5, 2))),
            (50, 2, 0)
        );
    }

    #[test]
    fn a_new_connection_adds_all_it_holds() {
        // A reconnect: the new connection's counts are smaller than the old one's, and all new.
        assert_eq!(
            added_since(&q(2, 30, 1, 1), Some(&q(1, 100, 5, 2))),
            (30, 1, 1)
        );
        // quinn reused the closed connection's id: fewer packets sent tells it apart.
        assert_eq!(
            added_since(&q(1, 20, 1, 0), Some(&q(1, 100, 5, 2))),
            (20, 1, 0)
        );
        assert_eq!(added_since(&q(3, 10, 0, 0), None), (10, 0, 0));
    }
}
