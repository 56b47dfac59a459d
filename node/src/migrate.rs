//! Connection migration, active side: follow this host's own address.
//!
//! With `advertise = "auto"` the node asks the kernel, every [`ADDRESS_CHECK_INTERVAL`], which
//! local address it routes from towards the registry and its peers (a UDP `connect`, which
//! sends nothing). When that changes (interface renumbered, DHCP, failover):
//! - connections this node dialled keep working: quinn sends them without a fixed source
//!   address, so the next packet leaves from the new address and the peer validates the new
//!   path (QUIC connection migration); if the endpoint is bound to the old address itself,
//!   it is rebound to the new one, which migrates every connection;
//! - the node re-registers its new address, so peers that dial it afresh use it.
//!
//! Polling was chosen over rtnetlink: it needs no extra privileges or dependencies, costs one
//! syscall pair per check, and catches route changes as well as address changes. Half a second
//! keeps the stall well under the one second SPEC §8 allows.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use meshnode_registry::MeshView;

use crate::config::Config;
use crate::node::Shared;

/// How often the local address is checked.
pub const ADDRESS_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Addresses whose route tells us our own address: the registry's endpoints (IP literals) and
/// the peers we know, this node excluded.
pub(crate) fn references(config: &Config, view: &MeshView) -> Vec<SocketAddr> {
    let mut refs: Vec<SocketAddr> = config
        .registry
        .endpoints
        .iter()
        .filter_map(|u| {
            let hostport = u.split("://").nth(1)?.split('/').next()?;
            hostport.parse().ok()
        })
        .collect();
    refs.extend(config.registry.peers.iter().map(|p| p.addr));
    refs.extend(
        view.nodes
            .values()
            .filter(|n| n.name != config.node.name)
            .filter_map(|n| n.addr.parse::<SocketAddr>().ok()),
    );
    refs
}

/// The local address the kernel would send from towards the first routable reference.
pub(crate) fn route_source(refs: &[SocketAddr]) -> Option<IpAddr> {
    refs.iter().find_map(|r| {
        let any: SocketAddr = match r {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().ok()?,
            SocketAddr::V6(_) => "[::]:0".parse().ok()?,
        };
        let s = UdpSocket::bind(any).ok()?;
        s.connect(r).ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    })
}

/// Follows the host's address for as long as the node runs.
pub(crate) async fn follow_local_address(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(ADDRESS_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let refs = references(&shared.config, &shared.view.borrow());
        let Some(ip) = route_source(&refs) else {
            continue;
        };
        let old = shared.advertise();
        if ip == old.ip() {
            continue;
        }
        let new = SocketAddr::new(ip, old.port());
        if let Ok(bound) = shared.endpoint.local_addr() {
            if !bound.ip().is_unspecified() && bound.ip() != ip {
                let to = SocketAddr::new(ip, bound.port());
                match shared.endpoint.rebind(to) {
                    Ok(()) => tracing::info!(old = %bound, new = %to, "QUIC endpoint rebound"),
                    Err(e) => {
                        tracing::warn!(error = %e, new = %to, "cannot rebind the QUIC endpoint");
                        continue;
                    }
                }
            }
        }
        *shared.advertise.write().unwrap_or_else(|p| p.into_inner()) = new;
        shared.metrics.inc("meshnode_quic_migrations_total", &[]);
        tracing::info!(%old, %new, "local address changed; connections migrate and the node re-registers");
        if let Err(e) = shared.registry.register(shared.registration()).await {
            tracing::warn!(error = %e, "re-registration with the new address failed");
        }
    }
}

/// Migration, passive side: follows a caller's address on an inbound connection (NAT
/// rebinding, the caller's own migration) until the connection closes.
pub(crate) async fn follow_peer_address(
    shared: Arc<Shared>,
    peer: String,
    conn: meshnode_transport::quinn::Connection,
) {
    let mut last = conn.remote_address();
    let id = conn.stable_id();
    crate::node::lock(&shared.inbound_paths)
        .entry(peer.clone())
        .and_modify(|e| {
            e.0 = last;
            e.2 = id;
        })
        .or_insert((last, 0, id));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = conn.closed() => {
                let mut paths = crate::node::lock(&shared.inbound_paths);
                if paths.get(&peer).is_some_and(|e| e.2 == id) {
                    paths.remove(&peer);
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let now = conn.remote_address();
        if now != last {
            tracing::info!(%peer, old = %last, new = %now, "peer migrated to a new address");
            shared.metrics.inc("meshnode_quic_migrations_total", &[]);
            let mut paths = crate::node::lock(&shared.inbound_paths);
            let e = paths.entry(peer.clone()).or_insert((now, 0, id));
            e.0 = now;
            e.1 += 1;
            last = now;
        }
    }
}
