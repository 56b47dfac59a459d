//! A running node: the QUIC endpoint, inbound and outbound tunnels, the registry
//! registration, the admin API, and the background tasks that keep them in step.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshnode_registry::Registry;
use meshnode_transport::{EndpointOptions, Identity, MeshEndpoint, PeerPool};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::admin::AdminInputs;
use crate::balance::{BalanceConfig, PeerTable};
use crate::config::Config;
use crate::drain;
use crate::exit::{self, Failure};
use crate::http::proxy::{H3Clients, Proxy};
use crate::http::server::H3Server;
use crate::inbound::Inbound;
use crate::info::{NodeInfo, Readiness};
use crate::local::LocalServices;
use crate::metrics::Metrics;
use crate::migrate::AddressInputs;
use crate::outbound::Outbound;
use crate::outbound_port::{OutboundListener, Ports};
use crate::peer_health::{Migrations, PeerHealthInputs};
use crate::routing::Routing;
use crate::sampler::SamplerInputs;
use crate::status::StatusInputs;
use crate::telemetry::Telemetry;

/// Deadline for a tunnel open (header sent → status back) when the config names none. A
/// healthy peer answers in about one RTT plus a local TCP connect. A dead peer is not found by
/// this deadline but by the connection's idle timeout (about 1 s), which fails every pending
/// open on it at once; so this only bounds a live but overloaded peer, and is generous.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_millis(3_000);
/// How long a drain waits for the last spans to reach the collector: one export's deadline.
pub const TRACE_FLUSH_TIMEOUT: Duration = crate::trace::EXPORT_TIMEOUT;
/// How often QUIC statistics (RTT, losses) are sampled into metrics and the balancer.
pub use crate::sampler::SAMPLE_INTERVAL;

/// What a node is built from: the config, the TLS identity, and a started registry backend.
pub struct NodeParts {
    /// The validated config.
    pub config: Config,
    /// This node's TLS identity (its name must equal `config.node.name`).
    pub identity: Identity,
    /// The registry backend, already started.
    pub registry: Registry,
}

/// A running node.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) info: Arc<NodeInfo>,
    pub(crate) endpoint: MeshEndpoint,
    pub(crate) registry: Registry,
    pub(crate) local: Arc<LocalServices>,
    telemetry: Arc<Telemetry>,
    status: Arc<StatusInputs>,
    pub(crate) ports: Arc<Ports>,
    drain: drain::Trigger,
    pub(crate) drain_watch: drain::Watch,
    admin_thread: crate::admin::AdminThread,
    tasks: Vec<JoinHandle<()>>,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    http_proxy_addr: Option<SocketAddr>,
    pub(crate) outbounds: Mutex<Vec<OutboundListener>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        let open_timeout = config
            .transport
            .open_timeout
            .unwrap_or(DEFAULT_OPEN_TIMEOUT);
        let (drain, drain_watch) = drain::new();
        let info = Arc::new(NodeInfo::new(
            &config.node.name,
            &config.node.zone,
            advertise,
        ));
        let pool = PeerPool::new(endpoint.clone());
        // Subscribed before any dial can happen.
        let pool_events = pool.subscribe();
        let mut telemetry = Telemetry::new();
        if let Some(t) = &config.tracing {
            let trust_domain = endpoint.identity().trust_domain().to_string();
            if let Err(e) = telemetry.start_tracing(t, &config.node.name, &trust_domain) {
                endpoint.close(0, b"start-up failed");
                return Err(Failure::config(e.to_string()));
            }
        }
        let telemetry = Arc::new(telemetry);
        let routing = Arc::new(
            Routing::new(
                registry.view(),
                BalanceConfig::default(),
                Arc::new(PeerTable::new()),
                open_timeout,
            )
            .with_last_resort(last_resort_grace(&config)),
        );
        let local = Arc::new(LocalServices::new(
            &config.node.name,
            &config.service,
            drain_watch.clone(),
        ));
        let readiness = Arc::new(Readiness::new(registry.clone(), drain_watch.clone()));
        let migrations = Arc::new(Migrations::default());
        let outbound = Arc::new(Outbound {
            routing: routing.clone(),
            pool: pool.clone(),
            telemetry: telemetry.clone(),
        });
        let h3 = Arc::new(H3Server {
            local: local.clone(),
            telemetry: telemetry.clone(),
            drain: drain_watch.clone(),
            targets: crate::http::TargetClient::new(),
        });
        let inbound = Arc::new(Inbound {
            endpoint: endpoint.clone(),
            pool: pool.clone(),
            local: local.clone(),
            telemetry: telemetry.clone(),
            drain: drain_watch.clone(),
            h3,
        });
        let health = Arc::new(PeerHealthInputs {
            node: config.node.name.clone(),
            routing: routing.clone(),
            pool: pool.clone(),
            telemetry: telemetry.clone(),
            migrations: migrations.clone(),
            connect_timeout: config.transport().connect_timeout,
        });
        let sampler = Arc::new(SamplerInputs {
            routing: routing.clone(),
            pool: pool.clone(),
            registry: registry.clone(),
            telemetry: telemetry.clone(),
            readiness: readiness.clone(),
            endpoint: endpoint.clone(),
        });
        let status = Arc::new(StatusInputs {
            info: info.clone(),
            readiness: readiness.clone(),
            registry: registry.clone(),
            pool: pool.clone(),
            routing: routing.clone(),
            local: local.clone(),
            migrations,
        });
        // The HTTP adapter serves the proxy and every `auto` outbound port.
        let proxy = Arc::new(Proxy {
            routing: routing.clone(),
            pool: pool.clone(),
            telemetry: telemetry.clone(),
            outbound: outbound.clone(),
            h3: H3Clients::default(),
            idle_timeout: config.node.http_idle_timeout,
        });
        let nofile = crate::limits::raise_nofile().map_or(1024, |l| l.now);
        let admission = crate::admit::NodeAdmission::new(
            config
                .node
                .max_connections
                .unwrap_or_else(|| crate::admit::default_node_cap(nofile)),
            telemetry.clone(),
        );
        tracing::info!(
            max_connections = admission.cap(),
            nofile,
            "application connection cap"
        );
        let ports = Arc::new(Ports {
            l4: outbound.clone(),
            http: proxy.clone(),
            admission,
        });

        let reconnect_wake = Arc::new(Notify::new());
        let mut tasks = vec![
            tokio::spawn(crate::inbound::accept_loop(inbound)),
            tokio::spawn(crate::sampler::run(sampler.clone())),
            tokio::spawn(follow_view(sampler.clone(), proxy.clone())),
            tokio::spawn(crate::peer_health::follow_pool_events(
                health.clone(),
                pool_events,
                reconnect_wake.clone(),
            )),
            tokio::spawn(crate::peer_health::reconnect_loop(health, reconnect_wake)),
        ];
        if config.node.advertise == Some(crate::config::Advertise::Auto) {
            tasks.push(tokio::spawn(crate::migrate::follow_local_address(
                Arc::new(AddressInputs {
                    config: config.clone(),
                    info: info.clone(),
                    endpoint: endpoint.clone(),
                    registry: registry.clone(),
                    local: local.clone(),
                    routing: routing.clone(),
                    telemetry: telemetry.clone(),
                }),
            )));
        }
        let admin_inputs = AdminInputs {
            status: status.clone(),
            sampler,
        };
        let admin_thread = crate::admin::spawn(Arc::new(admin_inputs), admin)
            .map_err(|e| Failure::new(exit::SOFTWARE, format!("admin API: {e}")))?;
        let mut outbound_listeners = Vec::new();
        for (i, o) in config.outbound.iter().enumerate() {
            match OutboundListener::start(&ports, &drain_watch, o).await {
                Ok(l) => outbound_listeners.push(l),
                Err(e) => {
                    return Err(abort_start(
                        &endpoint,
                        &tasks,
                        &outbound_listeners,
                        format!("outbound[{i}].listen: cannot bind {}: {e}", o.listen),
                    ));
                }
            }
        }
        let mut http_proxy_addr = None;
        if let Some(p) = &config.http_proxy {
            let bound = match TcpListener::bind(p.listen).await {
                Ok(l) => l.local_addr().map(|a| (l, a)),
                Err(e) => Err(e),
            };
            match bound {
                Ok((listener, addr)) => {
                    http_proxy_addr = Some(addr);
                    let admission = ports.admission.listener(addr, p.max_connections);
                    tasks.push(tokio::spawn(crate::http::proxy::accept_loop(
                        proxy,
                        drain_watch.clone(),
                        listener,
                        admission,
                    )));
                }
                Err(e) => {
                    return Err(abort_start(
                        &endpoint,
                        &tasks,
                        &outbound_listeners,
                        format!("http_proxy.listen: cannot bind {}: {e}", p.listen),
                    ));
                }
            }
        }
        readiness.listeners_bound();
        registry
            .register(info.registration(&local))
            .await
            .map_err(|e| Failure::config(format!("registration refused: {e}")))?;
        tracing::info!(
            node = %info.name,
            quic = %quic_addr,
            %advertise,
            admin = %admin_addr,
            outbound = ?outbound_listeners.iter().map(|o| (&o.service, o.bound)).collect::<Vec<_>>(),
            "node started"
        );
        Ok(Node {
            config,
            info,
            endpoint,
            registry,
            local,
            telemetry,
            status,
            ports,
            drain,
            drain_watch,
            admin_thread,
            tasks,
            quic_addr,
            admin_addr,
            http_proxy_addr,
            outbounds: Mutex::new(outbound_listeners),
        })
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.info.name
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
        self.telemetry.metrics()
    }

    /// The `/status` document.
    pub fn status(&self) -> crate::status::StatusDoc {
        crate::status::build(&self.status)
    }

    /// Whether the node is ready (registered, listening, not draining).
    pub fn is_ready(&self) -> bool {
        self.status.readiness.blockers().is_empty()
    }

    /// Resolves once the node is ready (listeners bound and registered once).
    pub async fn wait_ready(&self) {
        let mut status = self.registry.status();
        loop {
            if self.is_ready() {
                return;
            }
            // Readiness follows the registry; a short tick covers the rest.
            let _ = tokio::time::timeout(Duration::from_millis(100), status.changed()).await;
        }
    }

    /// Graceful shutdown (docs/README.md): readyz → 503, new tunnels refused with 503 (callers retry
    /// elsewhere), registry keys deleted, in-flight tunnels get `drain_timeout`, then every
    /// connection is closed with the draining code.
    pub async fn drain(self) {
        // Raised first: readiness, the authoriser and the accept loops see it at once.
        self.drain.signal();
        tracing::info!(node = %self.info.name, active = self.drain.active(), "draining");
        if let Err(e) = self.registry.shutdown(Duration::from_secs(2)).await {
            tracing::warn!(error = %e, "registry deregistration failed; the lease will expire");
        }
        let left = self.drain.drain(self.config.node.drain_timeout).await;
        if left > 0 {
            tracing::warn!(
                active = left,
                "drain timeout reached; closing remaining tunnels"
            );
        }
        self.endpoint
            .close(meshnode_transport::peers::CLOSE_DRAINING, b"draining");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        if let Some(tracer) = self.telemetry.tracer() {
            // The spans of the tunnels that just ended, before the process exits.
            tracer.flush(TRACE_FLUSH_TIMEOUT).await;
        }
        let name = self.info.name.clone();
        self.stop_tasks();
        tracing::info!(node = %name, "stopped");
    }

    /// Stops at once without deregistering or notifying anyone, like a crash (demo, tests).
    pub fn kill(self) {
        let endpoint = self.endpoint.clone();
        self.stop_tasks();
        endpoint.close(0, b"");
    }

    fn stop_tasks(self) {
        for t in &self.tasks {
            t.abort();
        }
        for o in lock(&self.outbounds).iter() {
            o.task.abort();
        }
        self.admin_thread.stop();
    }
}

/// How long an endpoint gone from the view stays a last resort while its node is connected:
/// 2 × the lease TTL (a registrar's trouble outlasts one lease); none with the static backend,
/// whose view never loses a record.
fn last_resort_grace(config: &Config) -> Duration {
    match config.registry.backend {
        crate::config::Backend::Static => Duration::ZERO,
        crate::config::Backend::Etcd => config.registry.lease_ttl.saturating_mul(2),
    }
}

/// Undoes a start that failed part-way (a listener could not bind): stops the tasks started
/// so far, closes the QUIC endpoint, and returns the failure (exit 69) naming `reason`.
fn abort_start(
    endpoint: &MeshEndpoint,
    tasks: &[tokio::task::JoinHandle<()>],
    outbound: &[OutboundListener],
    reason: String,
) -> Failure {
    for t in tasks.iter().chain(outbound.iter().map(|o| &o.task)) {
        t.abort();
    }
    endpoint.close(0, b"start-up failed");
    Failure::new(exit::UNAVAILABLE, reason)
}

/// Endpoint changes applied between two yields of [`follow_view`]: a burst of registry
/// updates never holds a runtime thread for long.
const APPLY_SLICE: usize = 256;

/// Record changes up to which a view change is compared on the executor itself; above, on
/// the blocking pool. Comparing costs what changed (one publication of a burst: some 30
/// records, a fraction of a millisecond in a debug build); a hand-off costs two wake-ups and,
/// on a busy host with 1-2 CPUs, a wait for the other thread to be scheduled.
const INLINE_CHANGES: usize = 256;

/// Follows the registry view (docs/behaviour.md, Last-resort endpoints and Registry bursts):
/// applies each change as the endpoint changes it makes, in slices with a yield between them
/// (a burst is coalesced: the watch channel only holds the latest view); keeps endpoints that
/// left while their node is connected as last resorts; forgets connections, h3 clients,
/// balancer state and peer facts of nodes that left and are not held, or whose grace ended.
async fn follow_view(sampler: Arc<SamplerInputs>, proxy: Arc<Proxy>) {
    let routing = sampler.routing.clone();
    let mut view = routing.watch_view();
    let mut open = true;
    loop {
        let expiry = routing.next_last_resort_expiry();
        if !open && expiry.is_none() {
            return;
        }
        let mut changed = false;
        tokio::select! {
            r = view.changed(), if open => match r {
                Ok(()) => changed = true,
                // The registry is gone (shutdown): only graces remain to end.
                Err(_) => open = false,
            },
            _ = sleep_until_opt(expiry), if expiry.is_some() => {}
        }
        let mut gone: Vec<String> = Vec::new();
        let current = if changed {
            let new = view.borrow_and_update().clone();
            let old = routing.applied_view();
            // Views share every part a change did not touch, so comparing them costs what
            // changed (a watch batch: a handful of records): done here. A large change (a
            // snapshot after a reconnect) is compared, and the old view dropped, on the
            // blocking pool, so the executor that carries tunnels keeps its turns (on 1-2 CPU
            // hosts it is the only thread).
            let inline = crate::routing::diff_within(&old, &new, INLINE_CHANGES);
            let large = inline.is_none();
            let d = match inline {
                Some(d) => d,
                None => {
                    let next = new.clone();
                    match tokio::task::spawn_blocking(move || crate::routing::diff(&old, &next))
                        .await
                    {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::warn!(error = %e, "view comparison failed; applying the view whole");
                            crate::routing::diff(&routing.applied_view(), &new)
                        }
                    }
                }
            };
            let now = std::time::Instant::now();
            for slice in d.left.chunks(APPLY_SLICE) {
                routing.apply_changes(slice, &[], now);
                tokio::task::yield_now().await;
            }
            for slice in d.arrived.chunks(APPLY_SLICE) {
                routing.apply_changes(&[], slice, now);
                tokio::task::yield_now().await;
            }
            let previous = routing.set_applied(new.clone());
            if large {
                tokio::task::spawn_blocking(move || drop(previous));
            }
            gone.extend(
                d.nodes_gone
                    .into_iter()
                    .filter(|n| !routing.holds_last_resort(n)),
            );
            new
        } else {
            routing.applied_view()
        };
        gone.extend(
            routing
                .expire_last_resorts(std::time::Instant::now())
                .into_iter()
                .filter(|n| !current.nodes.contains_key(n)),
        );
        if gone.is_empty() {
            continue;
        }
        // Export what the balancers know of endpoints about to be forgotten (ejections).
        crate::sampler::sync(&sampler);
        let gone: std::collections::HashSet<String> = gone.into_iter().collect();
        let keep = |n: &str| !gone.contains(n);
        sampler.pool.retain(keep);
        proxy.h3.retain(keep);
        routing.retain(keep);
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
