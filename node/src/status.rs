//! The `/status` document (docs/README.md), built from the node's live state.

use std::collections::BTreeMap;
use std::time::Instant;

use std::sync::Arc;

use meshnode_registry::Registry;
use meshnode_transport::PeerPool;
use serde::{Deserialize, Serialize};

use crate::info::{NodeInfo, Readiness};
use crate::local::LocalServices;
use crate::peer_health::Migrations;
use crate::routing::Routing;

/// What `/status` reads.
pub struct StatusInputs {
    /// Name, zone, address, uptime.
    pub info: Arc<NodeInfo>,
    /// Readiness blockers.
    pub readiness: Arc<Readiness>,
    /// Registry state.
    pub registry: Registry,
    /// Peer connections.
    pub pool: PeerPool,
    /// The view and the balancers.
    pub routing: Arc<Routing>,
    /// Hosted services.
    pub local: Arc<LocalServices>,
    /// Path migrations per peer.
    pub migrations: Arc<Migrations>,
}

/// The whole `/status` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    /// This node.
    pub node: NodeStatus,
    /// The registry backend.
    pub registry: RegistryStatusDoc,
    /// Peers this node has dialled.
    pub peers: Vec<PeerStatus>,
    /// Every service the node knows, local and remote.
    pub services: Vec<ServiceStatus>,
    /// `true` when `/readyz` answers 200.
    pub ready: bool,
    /// What keeps the node from being ready.
    pub readiness_blockers: Vec<String>,
}

/// The node line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Advertised QUIC address.
    pub addr: String,
    /// Zone label.
    pub zone: String,
    /// meshnode version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
}

/// Registry health.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryStatusDoc {
    /// Backend name.
    pub backend: String,
    /// connected | connecting | disconnected.
    pub state: String,
    /// Current lease.
    pub lease_id: Option<i64>,
    /// Lease TTL, seconds.
    pub lease_ttl_s: u64,
    /// Invalid records skipped.
    pub invalid_records: u64,
    /// Conflicts seen (two processes claiming one name).
    pub conflicts: Vec<String>,
    /// Why the last session broke or could not start (`null` once connected again).
    #[serde(default)]
    pub last_error: Option<String>,
    /// When `state` last changed, Unix seconds.
    #[serde(default)]
    pub since: u64,
}

/// One peer connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer node name.
    pub name: String,
    /// The address the connection uses now.
    pub addr: String,
    /// connected | connecting | down | draining.
    pub state: String,
    /// Smoothed RTT in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Tunnels active to this peer.
    pub streams_active: u64,
    /// UDP bytes sent.
    pub bytes_sent: u64,
    /// UDP bytes received.
    pub bytes_received: u64,
    /// Path migrations seen.
    pub migrations: u64,
}

/// One service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// tcp | http.
    pub protocol: String,
    /// Hosted on this node.
    pub local: bool,
    /// The nodes that host it.
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint as this node's balancer sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// Hosting node.
    pub node: String,
    /// Its advertised address.
    pub addr: String,
    /// healthy | ejected | draining | last_resort (gone from the registry, its node still
    /// connected: used only while the service has no other endpoint; docs/admin.md).
    pub state: String,
    /// Peak-EWMA latency, milliseconds.
    pub ewma_ms: f64,
    /// Requests or tunnels in flight.
    pub inflight: u32,
    /// Attempts sent.
    pub requests_total: u64,
    /// Attempts failed.
    pub failures_total: u64,
}

/// Builds the document.
pub fn build(shared: &StatusInputs) -> StatusDoc {
    let reg = shared.registry.status().borrow().clone();
    let view = shared.routing.view();
    let now = Instant::now();
    let peers: Vec<PeerStatus> = shared
        .pool
        .snapshot()
        .into_iter()
        .filter(|p| p.alpn == meshnode_transport::Alpn::Meshnode)
        .map(|p| PeerStatus {
            addr: p.remote.unwrap_or(p.addr).to_string(),
            state: p.state.as_str().to_string(),
            rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1e3),
            streams_active: shared.routing.streams_to(&p.name, now),
            bytes_sent: p.bytes_sent,
            bytes_received: p.bytes_received,
            migrations: shared.migrations.of(&p.name),
            name: p.name,
        })
        .collect();
    // Callers that have not been dialled back appear through their inbound connection.
    let mut peers: Vec<PeerStatus> = peers;
    for inbound in shared.pool.inbound() {
        if !peers.iter().any(|p| p.name == inbound.name) {
            peers.push(PeerStatus {
                migrations: shared.migrations.of(&inbound.name),
                name: inbound.name,
                addr: inbound.remote.to_string(),
                state: "connected".into(),
                rtt_ms: None,
                streams_active: 0,
                bytes_sent: 0,
                bytes_received: 0,
            });
        }
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let local = shared.local.get();
    let mut services: BTreeMap<String, ServiceStatus> = BTreeMap::new();
    for (name, by_node) in &view.services {
        let balancer = shared
            .routing
            .route_if_any(name)
            .map(|r| r.balancer.clone());
        let mut endpoints = Vec::new();
        let mut protocol = String::new();
        for (svc, node) in view.endpoints(name) {
            protocol = svc.protocol.to_string();
            let snap = balancer.as_ref().map(|b| b.snapshot(&node.name, now));
            endpoints.push(EndpointStatus {
                node: node.name.clone(),
                addr: node.addr.clone(),
                state: snap
                    .as_ref()
                    .map(|s| s.state.as_str().to_string())
                    .unwrap_or_else(|| "healthy".into()),
                ewma_ms: snap.as_ref().map(|s| s.ewma_ms).unwrap_or(0.0),
                inflight: snap.as_ref().map(|s| s.inflight).unwrap_or(0),
                requests_total: snap.as_ref().map(|s| s.requests_total).unwrap_or(0),
                failures_total: snap.as_ref().map(|s| s.failures_total).unwrap_or(0),
            });
        }
        let _ = by_node;
        services.insert(
            name.clone(),
            ServiceStatus {
                name: name.clone(),
                protocol,
                local: local.contains_key(name),
                endpoints,
            },
        );
    }
    // Last resorts: endpoints gone from the view whose node is still connected, within grace.
    for (name, held) in shared.routing.last_resorts() {
        let live = shared.routing.last_resort_targets(&name, None, now);
        if !live.iter().any(|t| t.node == held.target.node) {
            continue;
        }
        let entry = services
            .entry(name.clone())
            .or_insert_with(|| ServiceStatus {
                name: name.clone(),
                protocol: String::new(),
                local: local.contains_key(&name),
                endpoints: Vec::new(),
            });
        // Shown only while in use: the service has no endpoint in the view.
        if entry
            .endpoints
            .iter()
            .any(|e| e.state != "last_resort" || e.node == held.target.node)
        {
            continue;
        }
        let snap = shared
            .routing
            .route_if_any(&name)
            .map(|r| r.balancer.snapshot(&held.target.node, now));
        entry.endpoints.push(EndpointStatus {
            node: held.target.node.clone(),
            addr: held.target.addr.to_string(),
            state: "last_resort".into(),
            ewma_ms: snap.as_ref().map(|s| s.ewma_ms).unwrap_or(0.0),
            inflight: snap.as_ref().map(|s| s.inflight).unwrap_or(0),
            requests_total: snap.as_ref().map(|s| s.requests_total).unwrap_or(0),
            failures_total: snap.as_ref().map(|s| s.failures_total).unwrap_or(0),
        });
    }
    for (name, svc) in local.iter() {
        services
            .entry(name.clone())
            .or_insert_with(|| ServiceStatus {
                name: name.clone(),
                protocol: svc.protocol.to_string(),
                local: true,
                endpoints: Vec::new(),
            });
    }
    let blockers = shared.readiness.blockers();
    let info = &shared.info;
    StatusDoc {
        node: NodeStatus {
            name: info.name.clone(),
            addr: info.advertise().to_string(),
            zone: info.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: info.started.elapsed().as_secs(),
        },
        registry: RegistryStatusDoc {
            backend: reg.backend.to_string(),
            state: reg.state.to_string(),
            lease_id: reg.lease_id,
            lease_ttl_s: reg.lease_ttl_s,
            invalid_records: reg.invalid_records_total,
            conflicts: reg.conflicts.clone(),
            last_error: reg.last_error.clone(),
            since: reg.since,
        },
        peers,
        services: services.into_values().collect(),
        ready: blockers.is_empty(),
        readiness_blockers: blockers.into_iter().map(String::from).collect(),
    }
}
