//! Peer health from the transport (docs/README.md, Failover): the pool's connection events write the
//! node's one peer table (which every balancer reads), and a reconnector dials the peers that are
//! down. Path migrations, announced by the pool as events too, are counted here.
//!
//! - A connection that dies (idle timeout of a silent peer, stateless reset from a restarted
//!   one) marks the peer down at once: no new work goes there.
//! - A connection closed with the draining code marks it draining.
//! - A successful dial brings a down peer back at once, whatever its ejection back-off: the
//!   handshake proved the peer's process is up and holds its identity.
//! - The reconnector dials each down peer that is still in the registry, one dial at a time per
//!   peer, so a restarted or unblocked peer is back within one handshake of answering. A failed
//!   dial waits a little longer before the next (see [`retry_delay`]), except that any change
//!   of the registry view dials every down peer at once: a restarted peer registers itself again
//!   as soon as it is ready, so that change is the news of its return (with the back-off alone it
//!   was found up to [`RECONNECT_MAX`] later: 1.9 s once in `node/tests/failover.rs`).
//!
//! Application requests never serve as the probe of a down peer: they would wait for a dial
//! timeout that the reconnector pays instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshnode_transport::{Alpn, PeerEvent, PeerPool};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Notify;

use crate::balance::PeerTable;
use crate::routing::Routing;
use crate::telemetry::Telemetry;

/// How often the reconnector looks for down peers (it is also woken when one goes down).
pub const RECONNECT_TICK: Duration = Duration::from_millis(100);
/// Wait after the first failed dial; doubles per consecutive failure up to [`RECONNECT_MAX`].
pub const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// Longest wait between dials to a peer that stays down (on top of the dial's own timeout).
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Handshake timeout of the first reconnect dial; doubles per failure up to the configured
/// connect timeout. A dial resends its Initial on QUIC's probe timer, whose gaps double too
/// (30, 60, 120, 240 ms... from a 10 ms initial RTT): short first dials keep those gaps short
/// while a restarting peer is coming up, and later full-length dials still reach a peer whose
/// round trip is long.
pub const RECONNECT_FIRST_DIAL: Duration = Duration::from_millis(250);

/// What the peer-health tasks use.
pub struct PeerHealthInputs {
    /// This node's name (never dialled).
    pub node: String,
    /// The view (who is in the registry) and the peer table.
    pub routing: Arc<Routing>,
    /// The connection pool: its events, its dials.
    pub pool: PeerPool,
    /// Migration counter.
    pub telemetry: Arc<Telemetry>,
    /// Path migrations per peer, for `/status`.
    pub migrations: Arc<Migrations>,
    /// The transport's connect timeout (the longest reconnect dial).
    pub connect_timeout: Duration,
}

/// Path migrations seen per peer: the one place they are counted.
#[derive(Default)]
pub struct Migrations {
    by_peer: Mutex<HashMap<String, u64>>,
}

impl Migrations {
    /// Migrations seen on connections with `peer`.
    pub fn of(&self, peer: &str) -> u64 {
        self.by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }

    fn record(&self, peer: &str) {
        *self
            .by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer.to_string())
            .or_insert(0) += 1;
    }
}

/// Applies the pool's connection events to the peer table until the pool is gone; wakes the
/// reconnector when a peer goes down, and counts path migrations. `events` is subscribed
/// before any dial can happen.
pub async fn follow_pool_events(
    inputs: Arc<PeerHealthInputs>,
    mut events: tokio::sync::broadcast::Receiver<PeerEvent>,
    wake: Arc<Notify>,
) {
    loop {
        match events.recv().await {
            Ok(event) => {
                apply(inputs.routing.peers(), &event, Instant::now());
                match &event {
                    PeerEvent::Lost { .. } => wake.notify_one(),
                    PeerEvent::Migrated {
                        peer,
                        alpn: Alpn::Meshnode,
                        ..
                    } => {
                        inputs.migrations.record(peer);
                        inputs.telemetry.migration();
                    }
                    _ => {}
                }
            }
            Err(RecvError::Lagged(missed)) => {
                // Missed "lost" events are caught by failed opens and the reconnector; missed
                // "connected" events by the reconnector's own success.
                tracing::warn!(missed, "peer events lagged behind");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// One event's effect on the peer table (and so on every balancer).
fn apply(peers: &PeerTable, event: &PeerEvent, now: Instant) {
    let peer = event.peer();
    match event {
        PeerEvent::Connected { .. } => peers.connected(peer, now),
        PeerEvent::Lost { reason, .. } => {
            tracing::info!(peer, %reason, "peer marked down: connection lost");
            peers.mark_down(peer, now);
        }
        PeerEvent::DialFailed { .. } => peers.mark_down(peer, now),
        PeerEvent::Draining { .. } => {
            tracing::info!(peer, "peer draining: no new work");
            peers.set_draining(peer, true);
        }
        PeerEvent::Migrated { .. } => {}
    }
}

/// Per down peer: whether a dial is running, failures in a row, and when the next may start.
#[derive(Default)]
struct Attempts {
    dialing: bool,
    failures: u32,
    next: Option<Instant>,
}

/// The wait after `failures` consecutive failed dials: `RECONNECT_BASE × 2^(failures-1)`,
/// capped at [`RECONNECT_MAX`].
pub fn retry_delay(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    RECONNECT_BASE
        .checked_mul(1 << shift)
        .unwrap_or(RECONNECT_MAX)
        .min(RECONNECT_MAX)
}

/// The handshake timeout of a reconnect dial after `failures` failed ones:
/// [`RECONNECT_FIRST_DIAL`] doubled per failure, at most `ceiling` (the connect timeout).
pub fn dial_timeout(failures: u32, ceiling: Duration) -> Duration {
    RECONNECT_FIRST_DIAL
        .checked_mul(1 << failures.min(16))
        .unwrap_or(ceiling)
        .min(ceiling.max(RECONNECT_FIRST_DIAL))
}

/// Dials every peer the table holds as down, while it is in the registry.
pub async fn reconnect_loop(inputs: Arc<PeerHealthInputs>, wake: Arc<Notify>) {
    let attempts: Arc<Mutex<HashMap<String, Attempts>>> = Arc::default();
    let connect_timeout = inputs.connect_timeout;
    let mut views = Some(inputs.routing.watch_view());
    loop {
        let mut view_changed = false;
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_TICK) => {}
            _ = wake.notified() => {}
            changed = async { views.as_mut()?.changed().await.ok() }, if views.is_some() => {
                match changed {
                    Some(()) => view_changed = true,
                    // The registry is gone (shutdown): the tick and the wake remain.
                    None => views = None,
                }
            }
        }
        let down = inputs.routing.peers().down_peers();
        let view = inputs.routing.view();
        let now = Instant::now();
        let mut table = attempts.lock().unwrap_or_else(|p| p.into_inner());
        // Forget peers that are no longer down (back, or gone from the registry).
        table.retain(|node, a| a.dialing || down.contains(node));
        for node in down {
            if node == inputs.node {
                continue;
            }
            let Some(addr) = view
                .nodes
                .get(&node)
                .and_then(|n| n.addr.parse::<SocketAddr>().ok())
            else {
                continue;
            };
            let a = table.entry(node.clone()).or_default();
            if view_changed && !a.dialing {
                // Maybe the peer's own new registration: start over with a short dial.
                a.failures = 0;
                a.next = None;
            }
            if a.dialing || a.next.is_some_and(|t| now < t) {
                continue;
            }
            a.dialing = true;
            let timeout = dial_timeout(a.failures, connect_timeout);
            let (inputs, attempts) = (inputs.clone(), attempts.clone());
            tokio::spawn(async move {
                let result = inputs
                    .pool
                    .connection_within(&node, addr, Alpn::Meshnode, timeout)
                    .await;
                let ok = result.is_ok();
                if ok {
                    // The pool announces a new connection itself; a connection that was already
                    // up (the peer was marked down by another protocol's failure) is not
                    // announced, so mark it up here as well.
                    inputs.routing.peers().mark_up(&node, Instant::now());
                }
                let mut table = attempts.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(a) = table.get_mut(&node) {
                    a.dialing = false;
                    if ok {
                        a.failures = 0;
                        a.next = None;
                    } else {
                        a.failures = a.failures.saturating_add(1);
                        a.next = Some(Instant::now() + retry_delay(a.failures));
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{BalanceConfig, Balancer, Candidate, EndpointState};

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        assert_eq!(retry_delay(0), RECONNECT_BASE);
        assert_eq!(retry_delay(1), RECONNECT_BASE);
        assert_eq!(retry_delay(2), RECONNECT_BASE * 2);
        assert_eq!(retry_delay(3), RECONNECT_BASE * 4);
        assert_eq!(retry_delay(40), RECONNECT_MAX);
        assert_eq!(retry_delay(u32::MAX), RECONNECT_MAX);
    }

    #[test]
    fn dial_timeout_grows_to_the_connect_timeout() {
        let ceiling = Duration::from_secs(1);
        assert_eq!(dial_timeout(0, ceiling), RECONNECT_FIRST_DIAL);
        assert_eq!(dial_timeout(1, ceiling), RECONNECT_FIRST_DIAL * 2);
        assert_eq!(dial_timeout(2, ceiling), ceiling);
        assert_eq!(dial_timeout(u32::MAX, ceiling), ceiling);
        // A connect timeout below the first dial's does not shrink it to nothing.
        assert_eq!(dial_timeout(3, Duration::ZERO), RECONNECT_FIRST_DIAL);
    }

    fn event(kind: &str, peer: &str) -> PeerEvent {
        let (peer, alpn) = (peer.to_string(), Alpn::Meshnode);
        match kind {
            "connected" => PeerEvent::Connected { peer, alpn },
            "lost" => PeerEvent::Lost {
                peer,
                alpn,
                reason: "timed out".into(),
            },
            "dial_failed" => PeerEvent::DialFailed { peer, alpn },
            _ => PeerEvent::Draining { peer, alpn },
        }
    }

    #[test]
    fn events_move_the_peer_through_down_draining_and_back() {
        let b = Arc::new(Balancer::new(BalanceConfig::default()));
        let all = b.peers().clone();
        let t0 = Instant::now();
        let cands: Vec<Candidate<'_>> = ["a", "b", "c"]
            .iter()
            .map(|&node| Candidate { node, weight: 100 })
            .collect();
        let mut rng = rand::thread_rng();
        b.pick(&cands, &[], t0, &mut rng);

        apply(&all, &event("lost", "a"), t0);
        assert_eq!(b.snapshot("a", t0).state, EndpointState::Ejected);
        assert_eq!(b.down_nodes(), ["a"]);
        // Long past the back-off, a down peer still gets no application request.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..50 {
            assert_ne!(b.pick(&cands, &[], later, &mut rng).as_deref(), Some("a"));
        }
        apply(&all, &event("connected", "a"), later);
        assert_eq!(b.snapshot("a", later).state, EndpointState::Healthy);
        assert!(b.down_nodes().is_empty());

        apply(&all, &event("draining", "b"), later);
        assert_eq!(b.snapshot("b", later).state, EndpointState::Draining);
        apply(&all, &event("connected", "b"), later);
        assert_eq!(b.snapshot("b", later).state, EndpointState::Healthy);

        apply(&all, &event("dial_failed", "c"), later);
        assert_eq!(b.snapshot("c", later).state, EndpointState::Ejected);
    }
}
