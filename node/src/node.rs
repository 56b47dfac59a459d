//! A running node: the QUIC endpoint, inbound and outbound tunnels, the registry
//! registration, the admin API, and the background tasks that keep them in step.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshnode_registry::{MeshView, NodeRecord, Registration, Registry, ServiceRecord};
use meshnode_transport::tunnel::TunnelCounters;
use meshnode_transport::{EndpointOptions, Identity, MeshEndpoint, PeerPool};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::balance::{BalanceConfig, Balancer, RetryBudget};
use crate::config::{Config, ServiceConfig};
use crate::exit::{self, Failure};
use crate::metrics::Metrics;

/// Deadline for a tunnel open (header sent → status back) when the config names none. A
/// healthy peer answers in about one RTT plus a local TCP connect. A dead peer is not found by
/// this deadline but by the connection's idle timeout (about 1 s), which fails every pending
/// open on it at once; so this only bounds a live but overloaded peer, and is generous.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_millis(3_000);
/// How often QUIC statistics (RTT, losses) are sampled into metrics and the balancer.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// What a node is built from: the config, the TLS identity, and a started registry backend.
pub struct NodeParts {
    /// The validated config.
    pub config: Config,
    /// This node's TLS identity (its name must equal `config.node.name`).
    pub identity: Identity,
    /// The registry backend, already started.
    pub registry: Registry,
}

/// State shared by every task of a node.
pub(crate) struct Shared {
    pub name: String,
    pub zone: String,
    pub advertise: RwLock<SocketAddr>,
    pub started: Instant,
    pub started_unix: u64,
    pub config: Config,
    pub endpoint: MeshEndpoint,
    pub pool: PeerPool,
    pub registry: Registry,
    pub view: watch::Receiver<Arc<MeshView>>,
    pub local: RwLock<Arc<HashMap<String, ServiceConfig>>>,
    pub balancers: Mutex<HashMap<String, Arc<Balancer>>>,
    pub budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    pub balance_cfg: BalanceConfig,
    pub metrics: Metrics,
    pub bytes: Mutex<HashMap<String, Arc<TunnelCounters>>>,
    /// Inbound connections: each caller's current address and the migrations seen.
    pub inbound_paths: Mutex<HashMap<String, (SocketAddr, u64, usize)>>,
    /// Last seen remote address of each peer connection and the migrations counted.
    pub paths: Mutex<HashMap<String, (usize, SocketAddr, u64)>>,
    pub open_timeout: Duration,
    pub draining: AtomicBool,
    pub listeners_bound: AtomicBool,
    pub active: AtomicUsize,
    pub idle: Notify,
    /// HTTP clients: pooled HTTP/1.1 to local targets, h3 to peers.
    pub http: crate::http::HttpState,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn balancer(&self, service: &str) -> Arc<Balancer> {
        lock(&self.balancers)
            .entry(service.to_string())
            .or_insert_with(|| Arc::new(Balancer::new(self.balance_cfg.clone())))
            .clone()
    }

    /// Every service's balancer.
    pub fn all_balancers(&self) -> Vec<Arc<Balancer>> {
        lock(&self.balancers).values().cloned().collect()
    }

    pub fn balancer_if_any(&self, service: &str) -> Option<Arc<Balancer>> {
        lock(&self.balancers).get(service).cloned()
    }

    /// Tunnels in flight to `node` across every service.
    pub fn streams_to(&self, node: &str, now: Instant) -> u64 {
        let balancers: Vec<Arc<Balancer>> = lock(&self.balancers).values().cloned().collect();
        balancers
            .iter()
            .map(|b| u64::from(b.snapshot(node, now).inflight))
            .sum()
    }

    /// Path migrations seen on the connection to `node`.
    pub fn migrations_of(&self, node: &str) -> u64 {
        lock(&self.paths).get(node).map(|p| p.2).unwrap_or(0)
    }

    pub fn budget(&self, service: &str) -> Arc<RetryBudget> {
        let c = &self.balance_cfg;
        lock(&self.budgets)
            .entry(service.to_string())
            .or_insert_with(|| {
                Arc::new(RetryBudget::new(
                    c.retry_budget_ratio,
                    c.retry_budget_min_per_sec,
                    c.retry_budget_window,
                ))
            })
            .clone()
    }

    /// Live byte counters of a service (exported as `meshnode_tunnel_bytes_total`).
    pub fn bytes(&self, service: &str) -> Arc<TunnelCounters> {
        lock(&self.bytes)
            .entry(service.to_string())
            .or_default()
            .clone()
    }

    pub fn local_services(&self) -> Arc<HashMap<String, ServiceConfig>> {
        self.local.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn advertise(&self) -> SocketAddr {
        *self.advertise.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks one active tunnel or request, for draining and the active-tunnels gauge.
    pub fn track(self: &Arc<Self>, service: &str) -> ActiveGuard {
        self.metrics.add("meshnode_tunnels_active", &[service], 1.0);
        ActiveGuard {
            _hold: self.hold(),
            shared: self.clone(),
            service: service.to_string(),
        }
    }

    /// Makes a drain wait until the hold is dropped. An inbound stream or request takes one
    /// *before* it checks `draining`: a drain that begins after the check then waits for it.
    /// Taken only once the tunnel was open, as before, it left a window (the connect to the
    /// target) in which a drain could find nothing active and close the connection under a
    /// tunnel it had just accepted.
    pub fn hold(self: &Arc<Self>) -> DrainHold {
        self.active.fetch_add(1, Ordering::SeqCst);
        DrainHold {
            shared: self.clone(),
        }
    }

    pub fn registration(&self) -> Registration {
        let local = self.local_services();
        let mut services: Vec<ServiceRecord> = local
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

    /// Ready = listeners bound, registered once, not draining. Returns the blockers.
    pub fn readiness_blockers(&self) -> Vec<&'static str> {
        let mut blockers = Vec::new();
        if !self.listeners_bound.load(Ordering::SeqCst) {
            blockers.push("listeners");
        }
        if !self.registry.status().borrow().registered {
            blockers.push("registry");
        }
        if self.draining.load(Ordering::SeqCst) {
            blockers.push("draining");
        }
        blockers
    }
}

/// Releases an active-tunnel slot on drop.
pub(crate) struct ActiveGuard {
    _hold: DrainHold,
    shared: Arc<Shared>,
    service: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.shared
            .metrics
            .add("meshnode_tunnels_active", &[&self.service], -1.0);
    }
}

/// Work a drain waits for, until dropped ([`Shared::hold`]).
pub(crate) struct DrainHold {
    shared: Arc<Shared>,
}

impl Drop for DrainHold {
    fn drop(&mut self) {
        if self.shared.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

/// A running node.
pub struct Node {
    pub(crate) shared: Arc<Shared>,
    admin_thread: crate::admin::AdminThread,
    tasks: Vec<JoinHandle<()>>,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    http_proxy_addr: Option<SocketAddr>,
    pub(crate) outbounds: Mutex<Vec<OutboundListener>>,
}

/// One `[[outbound]]` listener and its accept task.
pub(crate) struct OutboundListener {
    pub service: String,
    /// The address in the config (may have port 0).
    pub configured: SocketAddr,
    /// The address actually bound.
    pub bound: SocketAddr,
    pub task: JoinHandle<()>,
}

impl OutboundListener {
    /// Binds and starts serving `service` on `listen`.
    pub(crate) async fn start(
        shared: &Arc<Shared>,
        service: &str,
        listen: SocketAddr,
    ) -> std::io::Result<OutboundListener> {
        let listener = TcpListener::bind(listen).await?;
        let bound = listener.local_addr()?;
        let task = tokio::spawn(crate::outbound::accept_loop(
            shared.clone(),
            service.to_string(),
            listener,
        ));
        Ok(OutboundListener {
            service: service.to_string(),
            configured: listen,
            bound,
            task,
        })
    }
}

impl Node {
    /// Binds every listener, registers, and starts serving. Fails with exit code 69 when an
    /// address cannot be bound, 78 when the identity does not fit the config.
    pub async fn start(parts: NodeParts) -> Result<Node, Failure> {
        let NodeParts {
            config,
            identity,
            registry,
        } = parts;
        if identity.node_name() != config.node.name {
            return Err(Failure::config(format!(
                "tls.cert: certificate is for node {:?} but node.name is {:?}",
                identity.node_name(),
                config.node.name
            )));
        }
        let opts = EndpointOptions {
            listen: config.node.listen,
            state_dir: Some(config.node.state_dir.clone()),
            transport: config.transport(),
        };
        let endpoint = MeshEndpoint::bind(&opts, identity).map_err(|e| match e {
            meshnode_transport::endpoint::BindError::Socket { .. } => {
                Failure::new(exit::UNAVAILABLE, format!("node.listen: {e}"))
            }
            other => Failure::config(format!("node.state_dir or tls: {other}")),
        })?;
        let quic_addr = endpoint
            .local_addr()
            .map_err(|e| Failure::new(exit::UNAVAILABLE, format!("node.listen: {e}")))?;
        let advertise = match config.node.advertise {
            Some(crate::config::Advertise::Addr(a)) => a,
            Some(crate::config::Advertise::Auto) => {
                let refs = crate::migrate::references(&config, &registry.view().borrow());
                let ip = crate::migrate::route_source(&refs).unwrap_or(quic_addr.ip());
                SocketAddr::new(ip, quic_addr.port())
            }
            None => quic_addr,
        };
        let admin = std::net::TcpListener::bind(config.admin.listen).map_err(|e| {
            Failure::new(
                exit::UNAVAILABLE,
                format!("admin.listen: cannot bind {}: {e}", config.admin.listen),
            )
        })?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;
        let local: HashMap<String, ServiceConfig> = config
            .service
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let open_timeout = config
            .transport
            .open_timeout
            .unwrap_or(DEFAULT_OPEN_TIMEOUT);
        let shared = Arc::new(Shared {
            name: config.node.name.clone(),
            zone: config.node.zone.clone(),
            advertise: RwLock::new(advertise),
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            pool: PeerPool::new(endpoint.clone()),
            endpoint,
            view: registry.view(),
            registry,
            local: RwLock::new(Arc::new(local)),
            balancers: Mutex::default(),
            budgets: Mutex::default(),
            balance_cfg: BalanceConfig::default(),
            metrics: Metrics::new(),
            bytes: Mutex::default(),
            paths: Mutex::default(),
            inbound_paths: Mutex::default(),
            open_timeout,
            draining: AtomicBool::new(false),
            listeners_bound: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            http: crate::http::HttpState::new(),
            config,
        });

        let reconnect_wake = Arc::new(Notify::new());
        let mut tasks = vec![
            tokio::spawn(crate::inbound::accept_loop(shared.clone())),
            tokio::spawn(sample_loop(shared.clone())),
            tokio::spawn(view_loop(shared.clone())),
            tokio::spawn(crate::peer_health::follow_pool_events(
                shared.clone(),
                shared.pool.subscribe(),
                reconnect_wake.clone(),
            )),
            tokio::spawn(crate::peer_health::reconnect_loop(
                shared.clone(),
                reconnect_wake,
            )),
        ];
        if shared.config.node.advertise == Some(crate::config::Advertise::Auto) {
            tasks.push(tokio::spawn(crate::migrate::follow_local_address(
                shared.clone(),
            )));
        }
        let admin_thread = crate::admin::spawn(shared.clone(), admin)
            .map_err(|e| Failure::new(exit::SOFTWARE, format!("admin API: {e}")))?;
        let mut outbound = Vec::new();
        for (i, o) in shared.config.outbound.iter().enumerate() {
            match OutboundListener::start(&shared, &o.service, o.listen).await {
                Ok(l) => outbound.push(l),
                Err(e) => {
                    return Err(abort_start(
                        &shared,
                        &tasks,
                        &outbound,
                        format!("outbound[{i}].listen: cannot bind {}: {e}", o.listen),
                    ));
                }
            }
        }
        let mut http_proxy_addr = None;
        if let Some(p) = &shared.config.http_proxy {
            let bound = match TcpListener::bind(p.listen).await {
                Ok(l) => l.local_addr().map(|a| (l, a)),
                Err(e) => Err(e),
            };
            match bound {
                Ok((listener, addr)) => {
                    http_proxy_addr = Some(addr);
                    tasks.push(tokio::spawn(crate::http::proxy::accept_loop(
                        shared.clone(),
                        listener,
                    )));
                }
                Err(e) => {
                    return Err(abort_start(
                        &shared,
                        &tasks,
                        &outbound,
                        format!("http_proxy.listen: cannot bind {}: {e}", p.listen),
                    ));
                }
            }
        }
        shared.listeners_bound.store(true, Ordering::SeqCst);
        shared
            .registry
            .register(shared.registration())
            .await
            .map_err(|e| Failure::config(format!("registration refused: {e}")))?;
        tracing::info!(
            node = %shared.name,
            quic = %quic_addr,
            %advertise,
            admin = %admin_addr,
            outbound = ?outbound.iter().map(|o| (&o.service, o.bound)).collect::<Vec<_>>(),
            "node started"
        );
        Ok(Node {
            shared,
            admin_thread,
            tasks,
            quic_addr,
            admin_addr,
            http_proxy_addr,
            outbounds: Mutex::new(outbound),
        })
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of the `[http_proxy]` listener, if configured.
    pub fn http_proxy_addr(&self) -> Option<SocketAddr> {
        self.http_proxy_addr
    }

    /// The bound address of the outbound listener for `service`.
    pub fn outbound_addr(&self, service: &str) -> Option<SocketAddr> {
        lock(&self.outbounds)
            .iter()
            .find(|o| o.service == service)
            .map(|o| o.bound)
    }

    /// This node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The `/status` document.
    pub fn status(&self) -> crate::status::StatusDoc {
        crate::status::build(&self.shared)
    }

    /// Whether the node is ready (registered, listening, not draining).
    pub fn is_ready(&self) -> bool {
        self.shared.readiness_blockers().is_empty()
    }

    /// Resolves once the node is ready (listeners bound and registered once).
    pub async fn wait_ready(&self) {
        let mut status = self.shared.registry.status();
        loop {
            if self.is_ready() {
                return;
            }
            // Readiness follows the registry; a short tick covers the rest.
            let _ = tokio::time::timeout(Duration::from_millis(100), status.changed()).await;
        }
    }

    /// Graceful shutdown (SPEC §8): readyz → 503, new tunnels refused with 503 (callers retry
    /// elsewhere), registry keys deleted, in-flight tunnels get `drain_timeout`, then every
    /// connection is closed with the draining code.
    pub async fn drain(self) {
        let shared = &self.shared;
        shared.draining.store(true, Ordering::SeqCst);
        tracing::info!(node = %shared.name, active = shared.active.load(Ordering::SeqCst), "draining");
        if let Err(e) = shared.registry.shutdown(Duration::from_secs(2)).await {
            tracing::warn!(error = %e, "registry deregistration failed; the lease will expire");
        }
        let grace = shared.config.node.drain_timeout;
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = shared.idle.notified();
            if shared.active.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                tracing::warn!(
                    active = shared.active.load(Ordering::SeqCst),
                    "drain timeout reached; closing remaining tunnels"
                );
                break;
            }
        }
        shared
            .endpoint
            .close(meshnode_transport::peers::CLOSE_DRAINING, b"draining");
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.endpoint.wait_idle()).await;
        for t in &self.tasks {
            t.abort();
        }
        for o in lock(&self.outbounds).iter() {
            o.task.abort();
        }
        self.admin_thread.stop();
        tracing::info!(node = %shared.name, "stopped");
    }

    /// Stops at once without deregistering or notifying anyone, like a crash (demo, tests).
    pub fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
        for o in lock(&self.outbounds).iter() {
            o.task.abort();
        }
        self.admin_thread.stop();
        self.shared.endpoint.close(0, b"");
    }
}

/// Undoes a start that failed part-way (a listener could not bind): stops the tasks started
/// so far, closes the QUIC endpoint, and returns the failure (exit 69) naming `reason`.
fn abort_start(
    shared: &Shared,
    tasks: &[tokio::task::JoinHandle<()>],
    outbound: &[OutboundListener],
    reason: String,
) -> Failure {
    for t in tasks.iter().chain(outbound.iter().map(|o| &o.task)) {
        t.abort();
    }
    shared.endpoint.close(0, b"start-up failed");
    Failure::new(exit::UNAVAILABLE, reason)
}

/// Samples QUIC statistics into metrics and the balancers, and the registry state.
async fn sample_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let balancers: Vec<Arc<Balancer>> = lock(&shared.balancers).values().cloned().collect();
        for peer in shared.pool.snapshot() {
            if peer.alpn != meshnode_transport::Alpn::Meshnode {
                continue;
            }
            if let (Some(remote), Some(id)) = (peer.remote, peer.conn_id) {
                let mut paths = lock(&shared.paths);
                let entry = paths.entry(peer.name.clone()).or_insert((id, remote, 0));
                if entry.0 != id {
                    // A new connection: its address is a fresh start, not a migration.
                    entry.0 = id;
                    entry.1 = remote;
                } else if entry.1 != remote {
                    tracing::info!(peer = %peer.name, old = %entry.1, new = %remote, "peer connection migrated");
                    entry.1 = remote;
                    entry.2 += 1;
                    shared.metrics.inc("meshnode_quic_migrations_total", &[]);
                }
            }
            if let Some(rtt) = peer.rtt {
                shared.metrics.set(
                    "meshnode_peer_rtt_seconds",
                    &[&peer.name],
                    rtt.as_secs_f64(),
                );
                for b in &balancers {
                    b.observe_rtt(&peer.name, rtt, now);
                }
            }
            shared.metrics.set_counter(
                "meshnode_quic_lost_packets_total",
                &[&peer.name],
                peer.lost_packets as f64,
            );
        }
        sync_metrics(&shared);
    }
}

/// Brings sampled values (registry state, byte totals) into the metrics; called by the
/// sampler and before every `/metrics` render so counters are exact when read.
pub(crate) fn sync_metrics(shared: &Shared) {
    let now = Instant::now();
    let balancers: Vec<(String, Arc<Balancer>)> = lock(&shared.balancers)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (service, b) in balancers {
        // Every endpoint the balancer holds, including ones just gone from the view.
        for node in b.nodes() {
            let ejections = b.snapshot(&node, now).ejections_total;
            if ejections > 0 {
                shared.metrics.set_counter(
                    "meshnode_endpoint_ejections_total",
                    &[&service, &node],
                    ejections as f64,
                );
            }
        }
    }
    let status = shared.registry.status().borrow().clone();
    let connected = status.state == meshnode_registry::RegistryState::Connected;
    shared.metrics.set(
        "meshnode_registry_connected",
        &[],
        if connected { 1.0 } else { 0.0 },
    );
    shared.metrics.set_counter(
        "meshnode_registry_updates_total",
        &[],
        status.updates_total as f64,
    );
    let bytes: Vec<(String, Arc<TunnelCounters>)> = lock(&shared.bytes)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (svc, c) in bytes {
        let sent = c.sent.load(Ordering::Relaxed) as f64;
        let received = c.received.load(Ordering::Relaxed) as f64;
        shared
            .metrics
            .set_counter("meshnode_tunnel_bytes_total", &[&svc, "sent"], sent);
        shared
            .metrics
            .set_counter("meshnode_tunnel_bytes_total", &[&svc, "received"], received);
    }
}

/// Forgets connections and balancer state of nodes that left the registry.
async fn view_loop(shared: Arc<Shared>) {
    let mut view = shared.view.clone();
    while view.changed().await.is_ok() {
        // Export what the balancers know of endpoints about to be forgotten (ejections).
        sync_metrics(&shared);
        let v = view.borrow_and_update().clone();
        shared.pool.retain(|n| v.nodes.contains_key(n));
        shared.http.peers.retain(|n| v.nodes.contains_key(n));
        let balancers: Vec<Arc<Balancer>> = lock(&shared.balancers).values().cloned().collect();
        for b in balancers {
            b.retain(|n| v.nodes.contains_key(n));
        }
    }
}
