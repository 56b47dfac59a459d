//! Routing: which endpoints a service has (the registry view), and per service its balancer and
//! retry budget. Balancers read the node's one [`PeerTable`] for peer facts.
//!
//! A route is created on first use and survives view updates: a view change only forgets the
//! endpoints of nodes that left, so balancing state (latency estimates, ejections) carries on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use meshnode_registry::MeshView;
use tokio::sync::watch;

use crate::balance::{BalanceConfig, Balancer, PeerTable, RetryBudget};

/// One endpoint of a service as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Hosting node.
    pub node: String,
    /// Its advertised QUIC address.
    pub addr: SocketAddr,
    /// The service's port there.
    pub port: u16,
    /// Relative weight.
    pub weight: u32,
}

/// What a service's requests share: the balancer and the retry budget.
pub struct Route {
    /// Service name.
    pub service: String,
    /// The balancer over its endpoints.
    pub balancer: Arc<Balancer>,
    /// Its retry budget.
    pub budget: RetryBudget,
}

/// The routing part of a node.
pub struct Routing {
    view: watch::Receiver<Arc<MeshView>>,
    routes: RwLock<HashMap<String, Arc<Route>>>,
    cfg: BalanceConfig,
    peers: Arc<PeerTable>,
    /// Ceiling of a tunnel open's deadline.
    pub open_timeout: Duration,
}

impl Routing {
    /// Routing over `view`, balancers reading `peers`.
    pub fn new(
        view: watch::Receiver<Arc<MeshView>>,
        cfg: BalanceConfig,
        peers: Arc<PeerTable>,
        open_timeout: Duration,
    ) -> Routing {
        Routing {
            view,
            routes: RwLock::default(),
            cfg,
            peers,
            open_timeout,
        }
    }

    /// The peer table.
    pub fn peers(&self) -> &Arc<PeerTable> {
        &self.peers
    }

    /// The current registry view.
    pub fn view(&self) -> Arc<MeshView> {
        self.view.borrow().clone()
    }

    /// A receiver of view changes.
    pub fn watch_view(&self) -> watch::Receiver<Arc<MeshView>> {
        self.view.clone()
    }

    /// The route of `service`, created on first use.
    pub fn route(&self, service: &str) -> Arc<Route> {
        if let Some(r) = self.route_if_any(service) {
            return r;
        }
        let c = &self.cfg;
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes
            .entry(service.to_string())
            .or_insert_with(|| {
                Arc::new(Route {
                    service: service.to_string(),
                    balancer: Arc::new(Balancer::with_peers(c.clone(), self.peers.clone())),
                    budget: RetryBudget::new(
                        c.retry_budget_ratio,
                        c.retry_budget_min_per_sec,
                        c.retry_budget_window,
                    ),
                })
            })
            .clone()
    }

    /// The route of `service` if it was ever used.
    pub fn route_if_any(&self, service: &str) -> Option<Arc<Route>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
    }

    /// Every route.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The endpoints of `service` in the current view (on `port` when given, else each
    /// endpoint's registered port).
    pub fn targets(&self, service: &str, port: Option<u16>) -> Vec<Target> {
        let view = self.view.borrow();
        view.endpoints(service)
            .filter_map(|(svc, node)| {
                Some(Target {
                    node: node.name.clone(),
                    addr: node.addr.parse().ok()?,
                    port: port.unwrap_or(svc.port),
                    weight: svc.weight,
                })
            })
            .collect()
    }

    /// Whether `service` has any endpoint in the view.
    pub fn has_endpoints(&self, service: &str) -> bool {
        self.view.borrow().endpoints(service).next().is_some()
    }

    /// Tunnels in flight to `node` across every service.
    pub fn streams_to(&self, node: &str, now: Instant) -> u64 {
        self.routes()
            .iter()
            .map(|r| u64::from(r.balancer.snapshot(node, now).inflight))
            .sum()
    }

    /// Forgets balancing state and peer facts of nodes for which `keep` is false (they left
    /// the registry).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.peers.retain(&keep);
        for r in self.routes() {
            r.balancer.retain(&keep);
        }
    }
}
