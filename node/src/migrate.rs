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
//! keeps the stall well under the one second docs/README.md allows.
//!
//! The passive side (a peer's address changing under a live connection) is announced by the
//! transport's connection pool (`PeerEvent::Migrated`) and counted in `peer_health`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use meshnode_registry::{MeshView, Registry};
use meshnode_transport::MeshEndpoint;

use crate::config::Config;
use crate::info::NodeInfo;
use crate::local::LocalServices;
use crate::routing::Routing;
use crate::telemetry::Telemetry;

/// What following the host's address uses.
pub struct AddressInputs {
    /// Registry endpoints and static peers: references for the route lookup.
    pub config: Config,
    /// The advertised address.
    pub info: Arc<NodeInfo>,
    /// Rebound when bound to the old address.
    pub endpoint: MeshEndpoint,
    /// Re-registered with the new address.
    pub registry: Registry,
    /// The services to re-register.
    pub local: Arc<LocalServices>,
    /// The view: peers' addresses are references too.
    pub routing: Arc<Routing>,
    /// Counts this node's own migrations.
    pub telemetry: Arc<Telemetry>,
}

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
pub async fn follow_local_address(inputs: Arc<AddressInputs>) {
    let mut tick = tokio::time::interval(ADDRESS_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let refs = references(&inputs.config, &inputs.routing.view());
        let Some(ip) = route_source(&refs) else {
            continue;
        };
        let old = inputs.info.advertise();
        if ip == old.ip() {
            continue;
        }
        let new = SocketAddr::new(ip, old.port());
        if let Ok(bound) = inputs.endpoint.local_addr() {
            if !bound.ip().is_unspecified() && bound.ip() != ip {
                let to = SocketAddr::new(ip, bound.port());
                match inputs.endpoint.rebind(to) {
                    Ok(()) => tracing::info!(old = %bound, new = %to, "QUIC endpoint rebound"),
                    Err(e) => {
                        tracing::warn!(error = %e, new = %to, "cannot rebind the QUIC endpoint");
                        continue;
                    }
                }
            }
        }
        inputs.info.set_advertise(new);
        inputs.telemetry.migration();
        tracing::info!(%old, %new, "local address changed; connections migrate and the node re-registers");
        let registration = inputs.info.registration(&inputs.local);
        if let Err(e) = inputs.registry.register(registration).await {
            tracing::warn!(error = %e, "re-registration with the new address failed");
        }
    }
}
