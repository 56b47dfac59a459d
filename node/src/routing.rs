//! Routing: which endpoints a service has (the registry view), and per service its balancer and
//! retry budget. Balancers read the node's one [`PeerTable`] for peer facts.
//!
//! A route is created on first use and survives view updates: a view change only forgets the
//! endpoints of nodes that left, so balancing state (latency estimates, ejections) carries on.
//!
//! An endpoint gone from the view while its node is connected and not draining stays a
//! last resort for a grace ([`last_resort`]; docs/behaviour.md, Last-resort endpoints): used
//! only when its service has no endpoint in the view. View changes are applied as the endpoint
//! changes they make ([`diff`]), so their cost follows what changed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use meshnode_registry::{MeshView, Protocol};
use tokio::sync::watch;

use crate::balance::{BalanceConfig, Balancer, PeerTable, RetryBudget};

pub mod diff;
pub mod last_resort;

pub use diff::{diff, diff_within, ViewDiff};
pub use last_resort::{Held, LastResort, Liveness};

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
    /// The view as of the last [`Routing::apply`]; until a newer view is applied, its
    /// endpoints missing from the current view count as held (they left a moment ago).
    applied: RwLock<Arc<MeshView>>,
    last_resort: Mutex<LastResort>,
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
        let applied = RwLock::new(view.borrow().clone());
        Routing {
            view,
            routes: RwLock::default(),
            cfg,
            peers,
            applied,
            last_resort: Mutex::new(LastResort::new(Duration::ZERO)),
            open_timeout,
        }
    }

    /// Keeps endpoints that leave the view while their node is connected as last resorts for
    /// `grace` (zero, the default: never).
    pub fn with_last_resort(self, grace: Duration) -> Routing {
        *self.lock_last_resort() = LastResort::new(grace);
        self
    }

    fn lock_last_resort(&self) -> std::sync::MutexGuard<'_, LastResort> {
        self.last_resort.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the peer table says of `node`'s connection.
    pub fn liveness(&self, node: &str) -> Liveness {
        match self.peers.get(node) {
            None => Liveness::Unknown,
            Some(p) if p.down => Liveness::Down,
            Some(p) if p.draining => Liveness::Draining,
            Some(p) if p.connected => Liveness::Connected,
            Some(_) => Liveness::Unknown,
        }
    }

    /// The view the last [`Routing::apply`] brought in.
    pub fn applied_view(&self) -> Arc<MeshView> {
        self.applied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies one slice of a view change at `now`: endpoints that left are held as last
    /// resorts when their node is connected and not draining, endpoints that arrived stop
    /// being last resorts.
    pub fn apply_changes(
        &self,
        left: &[(String, Target)],
        arrived: &[(String, String)],
        now: Instant,
    ) {
        let liveness: Vec<Liveness> = left.iter().map(|(_, t)| self.liveness(&t.node)).collect();
        let mut lr = self.lock_last_resort();
        for ((service, target), live) in left.iter().zip(liveness) {
            if lr.left(service, target.clone(), live, now) {
                tracing::info!(
                    service,
                    node = %target.node,
                    grace_ms = lr.grace().as_millis() as u64,
                    "endpoint gone from the registry while connected: kept as a last resort"
                );
            }
        }
        for (service, node) in arrived {
            lr.back(service, node);
        }
    }

    /// Marks `view` as applied (every slice of its changes went through
    /// [`Routing::apply_changes`]); returns the view applied before, for the caller to drop
    /// where it chooses.
    pub fn set_applied(&self, view: Arc<MeshView>) -> Arc<MeshView> {
        std::mem::replace(
            &mut *self.applied.write().unwrap_or_else(|p| p.into_inner()),
            view,
        )
    }

    /// Drops last resorts whose grace is over at `now` or whose node is draining or down;
    /// returns the nodes no longer held (to forget unless they are in the view).
    pub fn expire_last_resorts(&self, now: Instant) -> Vec<String> {
        let held: Vec<String> = {
            let lr = self.lock_last_resort();
            lr.all().into_iter().map(|(_, h)| h.target.node).collect()
        };
        let live: HashMap<String, Liveness> = held
            .into_iter()
            .map(|n| {
                let l = self.liveness(&n);
                (n, l)
            })
            .collect();
        let peer = |n: &str| live.get(n).copied().unwrap_or(Liveness::Unknown);
        let dropped = self.lock_last_resort().expire(now, peer);
        for node in &dropped {
            tracing::info!(node, "last-resort endpoint dropped");
        }
        dropped
    }

    /// When the next last-resort grace ends.
    pub fn next_last_resort_expiry(&self) -> Option<Instant> {
        self.lock_last_resort().next_expiry()
    }

    /// Whether `node` is held as a last resort for some service.
    pub fn holds_last_resort(&self, node: &str) -> bool {
        self.lock_last_resort().holds_node(node)
    }

    /// Every held last resort as (service, held) (for `/status`).
    pub fn last_resorts(&self) -> Vec<(String, Held)> {
        self.lock_last_resort().all()
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

    /// The endpoints of `service` in the current view; when `port` is given, only those that
    /// advertise that port (a `CONNECT service:port` reaches no other). With none, its last
    /// resorts (on `port` likewise): endpoints gone from the view whose node is still
    /// connected and not draining, within their grace.
    pub fn targets(&self, service: &str, port: Option<u16>) -> Vec<Target> {
        let in_view: Vec<Target> = {
            let view = self.view.borrow();
            view.endpoints(service)
                .filter(|(svc, _)| port.is_none_or(|p| p == svc.port))
                .filter_map(|(svc, node)| {
                    Some(Target {
                        node: node.name.clone(),
                        addr: node.addr.parse().ok()?,
                        port: svc.port,
                        weight: svc.weight,
                    })
                })
                .collect()
        };
        if !in_view.is_empty() {
            return in_view;
        }
        self.last_resort_targets(service, port, Instant::now())
    }

    /// The last resorts of `service` at `now`, on `port` when given (see
    /// [`Routing::targets`]).
    pub fn last_resort_targets(
        &self,
        service: &str,
        port: Option<u16>,
        now: Instant,
    ) -> Vec<Target> {
        if self.lock_last_resort().grace().is_zero() {
            return Vec::new();
        }
        // Endpoints of the view applied last: they left since, and the change is not applied
        // yet (a moment ago): held if their node is connected, as the apply will decide.
        let mut out: Vec<Target> = {
            let applied = self.applied_view();
            applied
                .endpoints(service)
                .filter_map(|(svc, node)| {
                    Some(Target {
                        node: node.name.clone(),
                        addr: node.addr.parse().ok()?,
                        port: svc.port,
                        weight: svc.weight,
                    })
                })
                .collect()
        };
        out.extend(self.lock_last_resort().targets(service, now, |_| {
            // Liveness is checked below for every candidate alike.
            Liveness::Connected
        }));
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out.dedup_by(|a, b| a.node == b.node);
        out.retain(|t| {
            port.is_none_or(|p| p == t.port) && self.liveness(&t.node) == Liveness::Connected
        });
        out
    }

    /// The protocol `service`'s endpoints declare. When they disagree (a change rolling out),
    /// `tcp` wins over HTTP/2 and HTTP/2 over HTTP/1.1: a tunnel reaches every target, while a
    /// front-end speaking HTTP would not reach a raw TCP one, nor HTTP/1.1 an h2c-only one. The
    /// view applied last answers when the current one has no endpoint (they left a moment
    /// ago); `None` when neither has any.
    pub fn protocol(&self, service: &str) -> Option<Protocol> {
        let rank = |p: &Protocol| match p {
            Protocol::Tcp => 2,
            p if p.is_h2() => 1,
            _ => 0,
        };
        let of = |view: &MeshView| {
            view.endpoints(service)
                .map(|(svc, _)| svc.protocol)
                .max_by_key(rank)
        };
        let current = of(&self.view.borrow());
        current.or_else(|| of(&self.applied_view()))
    }

    /// Whether `service` has any endpoint: in the view, or a last resort.
    pub fn has_endpoints(&self, service: &str) -> bool {
        self.view.borrow().endpoints(service).next().is_some()
            || !self
                .last_resort_targets(service, None, Instant::now())
                .is_empty()
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

#[cfg(test)]
mod tests {
    use super::*;
    use meshnode_registry::Update;

    /// A view where `web` is `(protocol, port)` on each listed node.
    fn view(endpoints: &[(&str, &str, u16)]) -> MeshView {
        let mut v = MeshView::new();
        for (i, (node, protocol, port)) in endpoints.iter().enumerate() {
            let put = |key: String, value: String| Update::Put {
                key,
                value: value.into_bytes(),
            };
            let addr = format!("127.0.0.1:{}", 7000 + i);
            v.apply(
                "/t",
                put(
                    format!("/t/nodes/{node}"),
                    format!(r#"{{"name":"{node}","addr":"{addr}"}}"#),
                ),
            );
            v.apply(
                "/t",
                put(
                    format!("/t/services/web/{node}"),
                    format!(
                        r#"{{"service":"web","node":"{node}","protocol":"{protocol}","port":{port}}}"#
                    ),
                ),
            );
        }
        v
    }

    fn routing(v: MeshView) -> Routing {
        let (_tx, rx) = watch::channel(Arc::new(v));
        Routing::new(
            rx,
            BalanceConfig::default(),
            Arc::new(PeerTable::new()),
            Duration::from_secs(1),
        )
    }

    fn nodes(ts: &[Target]) -> Vec<(&str, u16)> {
        ts.iter().map(|t| (t.node.as_str(), t.port)).collect()
    }

    #[test]
    fn a_named_port_keeps_only_the_endpoints_that_advertise_it() {
        let r = routing(view(&[("b", "tcp", 8080), ("c", "tcp", 9090)]));
        assert_eq!(nodes(&r.targets("web", None)), [("b", 8080), ("c", 9090)]);
        assert_eq!(nodes(&r.targets("web", Some(8080))), [("b", 8080)]);
        assert_eq!(nodes(&r.targets("web", Some(9090))), [("c", 9090)]);
        assert!(r.targets("web", Some(1)).is_empty());
    }

    #[test]
    fn an_http2_record_makes_the_service_http2() {
        assert_eq!(routing(view(&[])).protocol("web"), None);
        let r = routing(view(&[("b", "http", 80), ("c", "http", 80)]));
        assert_eq!(r.protocol("web"), Some(Protocol::Http));
        let r = routing(view(&[("b", "http", 80), ("c", "grpc", 80)]));
        assert_eq!(r.protocol("web"), Some(Protocol::Grpc));
        let r = routing(view(&[("b", "grpc", 80)]));
        assert_eq!(r.protocol("web"), Some(Protocol::Grpc));
    }

    #[test]
    fn a_services_protocol_is_tcp_when_any_endpoint_says_tcp() {
        let r = routing(view(&[("b", "http2", 80), ("c", "tcp", 80)]));
        assert_eq!(r.protocol("web"), Some(Protocol::Tcp));
        let r = routing(view(&[("b", "http", 80), ("c", "tcp", 80)]));
        assert_eq!(r.protocol("web"), Some(Protocol::Tcp));
    }
}
