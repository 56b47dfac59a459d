//! What a node says about itself: its name, zone, advertised address and start time (the
//! registry record), and whether it is ready (named blockers, as `/readyz` lists them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use meshnode_registry::{NodeRecord, Registration, Registry, ServiceRecord};

use crate::drain;
use crate::local::LocalServices;

/// This node's identity in the mesh.
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Zone label.
    pub zone: String,
    advertise: RwLock<SocketAddr>,
    /// When it started.
    pub started: Instant,
    /// When it started, in seconds since the epoch (the registry record).
    pub started_unix: u64,
}

impl NodeInfo {
    /// A node starting now, advertising `advertise`.
    pub fn new(name: &str, zone: &str, advertise: SocketAddr) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            zone: zone.to_string(),
            advertise: RwLock::new(advertise),
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// The advertised QUIC address.
    pub fn advertise(&self) -> SocketAddr {
        *self.advertise.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the advertised address (the host's address moved).
    pub fn set_advertise(&self, addr: SocketAddr) {
        *self.advertise.write().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// The registry record of this node and its services.
    pub fn registration(&self, local: &LocalServices) -> Registration {
        let mut services: Vec<ServiceRecord> = local
            .get()
            .values()
            .map(|s| ServiceRecord {
                service: s.name.clone(),
                node: self.name.clone(),
                protocol: s.protocol,
                port: s.port(),
                weight: s.weight,
                zone: self.zone.clone(),
            })
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        Registration {
            node: NodeRecord {
                name: self.name.clone(),
                addr: self.advertise().to_string(),
                zone: self.zone.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: self.started_unix,
            },
            services,
        }
    }
}

/// Readiness: listeners bound, registered once, not draining.
pub struct Readiness {
    listeners: AtomicBool,
    registry: Registry,
    drain: drain::Watch,
}

impl Readiness {
    /// Not ready until [`Readiness::listeners_bound`] and the first registration.
    pub fn new(registry: Registry, drain: drain::Watch) -> Readiness {
        Readiness {
            listeners: AtomicBool::new(false),
            registry,
            drain,
        }
    }

    /// Every listener is bound.
    pub fn listeners_bound(&self) {
        self.listeners.store(true, Ordering::SeqCst);
    }

    /// What keeps the node from being ready; empty when ready.
    pub fn blockers(&self) -> Vec<&'static str> {
        let mut blockers = Vec::new();
        if !self.listeners.load(Ordering::SeqCst) {
            blockers.push("listeners");
        }
        if !self.registry.status().borrow().registered {
            blockers.push("registry");
        }
        if self.drain.is_draining() {
            blockers.push("draining");
        }
        blockers
    }
}
