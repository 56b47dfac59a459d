//! Telemetry of a node: metric handles registered once per label set and kept, so the data
//! path updates atomics — no lock, no string lookup, no allocation per increment. A service's
//! handles are found once per connection or request ([`Telemetry::service`]), an endpoint's
//! once per attempt ([`ServiceTelemetry::endpoint`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use ::metrics::{Counter, Gauge, Histogram};
use meshnode_transport::admission::HandshakeResult;
use meshnode_transport::tunnel::TunnelCounters;
use meshnode_transport::Alpn;

use crate::config::TracingConfig;
use crate::metrics::Metrics;
use crate::refusal::RefusalKind;
use crate::trace::{StartError, Tracer};

/// The `result` of `meshnode_tunnels_opened_total` and the `reason` of
/// `meshnode_retries_total`: one closed set, so handles live in arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// Opened.
    Ok,
    /// No connection to the peer.
    Unreachable,
    /// Refused with 403.
    Forbidden,
    /// Refused with 404.
    NotFound,
    /// Refused with 502.
    BadGateway,
    /// Refused with 503.
    Unavailable,
    /// Refused with 504.
    GatewayTimeout,
    /// Refused with another status.
    Refused,
    /// No answer within the deadline.
    Timeout,
    /// The stream failed.
    StreamError,
    /// The far node answered something unreadable.
    ProtocolError,
    /// The service has no endpoint.
    NoEndpoint,
    /// Every endpoint was tried.
    Exhausted,
    /// The retry budget refused a retry.
    BudgetExhausted,
    /// An HTTP answer 502 (retried).
    Status502,
    /// An HTTP answer 503 (retried).
    Status503,
}

const RESULTS: usize = 16;

impl AttemptResult {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::Unreachable => "unreachable",
            AttemptResult::Forbidden => "forbidden",
            AttemptResult::NotFound => "not_found",
            AttemptResult::BadGateway => "bad_gateway",
            AttemptResult::Unavailable => "unavailable",
            AttemptResult::GatewayTimeout => "gateway_timeout",
            AttemptResult::Refused => "refused",
            AttemptResult::Timeout => "timeout",
            AttemptResult::StreamError => "stream_error",
            AttemptResult::ProtocolError => "protocol_error",
            AttemptResult::NoEndpoint => "no_endpoint",
            AttemptResult::Exhausted => "exhausted",
            AttemptResult::BudgetExhausted => "budget_exhausted",
            AttemptResult::Status502 => "status_502",
            AttemptResult::Status503 => "status_503",
        }
    }
}

/// Handles created on first use, one per value of a closed label set.
struct Lazy<T, const N: usize>([OnceLock<T>; N]);

impl<T, const N: usize> Lazy<T, N> {
    fn new() -> Self {
        Lazy(std::array::from_fn(|_| OnceLock::new()))
    }

    fn get(&self, i: usize, make: impl FnOnce() -> T) -> &T {
        self.0[i.min(N - 1)].get_or_init(make)
    }
}

/// A node's telemetry.
pub struct Telemetry {
    metrics: Arc<Metrics>,
    services: RwLock<HashMap<String, Arc<ServiceTelemetry>>>,
    peers: RwLock<HashMap<String, Arc<PeerTelemetry>>>,
    rejected: Lazy<Counter, { RefusalKind::ALL.len() }>,
    migrations: Counter,
    registry_connected: OnceLock<Gauge>,
    registry_updates: OnceLock<Counter>,
    registry_leases: OnceLock<Counter>,
    ready: OnceLock<Gauge>,
    handshakes: Lazy<Counter, { HandshakeResult::ALL.len() }>,
    peer_connections: OnceLock<Gauge>,
    memory_trims: OnceLock<Counter>,
    tracer: Option<Tracer>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A fresh registry, every family described.
    pub fn new() -> Telemetry {
        let metrics = Arc::new(Metrics::new());
        Telemetry {
            migrations: metrics.counter("meshnode_quic_migrations_total", &[]),
            metrics,
            services: RwLock::default(),
            peers: RwLock::default(),
            rejected: Lazy::new(),
            registry_connected: OnceLock::new(),
            registry_updates: OnceLock::new(),
            registry_leases: OnceLock::new(),
            ready: OnceLock::new(),
            handshakes: Lazy::new(),
            peer_connections: OnceLock::new(),
            memory_trims: OnceLock::new(),
            tracer: None,
        }
    }

    /// Starts span export (`[tracing]`) for node `node` on the current runtime.
    pub fn start_tracing(
        &mut self,
        cfg: &TracingConfig,
        node: &str,
        trust_domain: &str,
    ) -> Result<(), StartError> {
        let dropped = self
            .metrics
            .counter("meshnode_trace_spans_dropped_total", &[]);
        dropped.absolute(0);
        self.tracer = Some(Tracer::start(cfg, node, trust_domain, dropped)?);
        Ok(())
    }

    /// The node's tracer; `None` without `[tracing]`, and then nothing is traced.
    pub fn tracer(&self) -> Option<&Tracer> {
        self.tracer.as_ref()
    }

    /// The registry (render, tests).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The handles of `service` (found once per connection or request).
    pub fn service(&self, service: &str) -> Arc<ServiceTelemetry> {
        if let Some(s) = read(&self.services).get(service) {
            return s.clone();
        }
        let mut all = self.services.write().unwrap_or_else(|p| p.into_inner());
        all.entry(service.to_string())
            .or_insert_with(|| Arc::new(ServiceTelemetry::new(self.metrics.clone(), service)))
            .clone()
    }

    /// The handles of `peer`.
    pub fn peer(&self, peer: &str) -> Arc<PeerTelemetry> {
        if let Some(p) = read(&self.peers).get(peer) {
            return p.clone();
        }
        let m = &self.metrics;
        let mut all = self.peers.write().unwrap_or_else(|p| p.into_inner());
        all.entry(peer.to_string())
            .or_insert_with(|| {
                Arc::new(PeerTelemetry {
                    rtt: m.gauge("meshnode_peer_rtt_seconds", &[("peer", peer)]),
                    lost: m.counter("meshnode_quic_lost_packets_total", &[("peer", peer)]),
                    connections: Default::default(),
                    metrics: m.clone(),
                    name: peer.to_string(),
                })
            })
            .clone()
    }

    /// Counts one client request (or connection) the caller's HTTP front-end refused or closed
    /// before routing it: `reason` is a `meshnode_http_rejected_total` label.
    pub fn http_rejected(&self, reason: &'static str) {
        self.metrics
            .counter("meshnode_http_rejected_total", &[("reason", reason)])
            .increment(1);
    }

    /// Counts one refused inbound stream or request.
    pub fn rejected(&self, kind: RefusalKind) {
        self.rejected
            .get(kind.index(), || {
                self.metrics.counter(
                    "meshnode_inbound_rejected_total",
                    &[("reason", kind.label())],
                )
            })
            .increment(1);
    }

    /// Counts one QUIC path migration.
    pub fn migration(&self) {
        self.migrations.increment(1);
    }

    /// The registry's state, sampled.
    pub fn registry(&self, connected: bool, updates_total: u64, lease_grants: u64) {
        let m = &self.metrics;
        self.registry_connected
            .get_or_init(|| m.gauge("meshnode_registry_connected", &[]))
            .set(if connected { 1.0 } else { 0.0 });
        self.registry_updates
            .get_or_init(|| m.counter("meshnode_registry_updates_total", &[]))
            .absolute(updates_total);
        self.registry_leases
            .get_or_init(|| m.counter("meshnode_registry_lease_grants_total", &[]))
            .absolute(lease_grants);
    }

    /// Readiness (what /readyz answers), sampled.
    pub fn ready(&self, ready: bool) {
        self.ready
            .get_or_init(|| self.metrics.gauge("meshnode_ready", &[]))
            .set(if ready { 1.0 } else { 0.0 });
    }

    /// Transport's handshake totals, sampled.
    pub fn handshakes(&self, totals: [(HandshakeResult, u64); HandshakeResult::ALL.len()]) {
        for (i, (result, total)) in totals.into_iter().enumerate() {
            self.handshakes
                .get(i, || {
                    self.metrics
                        .counter("meshnode_handshakes_total", &[("result", result.as_str())])
                })
                .absolute(total);
        }
    }

    /// Inbound peer connections held (transport's count against `max_peer_connections`), sampled.
    pub fn inbound_peer_connections(&self, held: u32) {
        self.peer_connections
            .get_or_init(|| self.metrics.gauge("meshnode_peer_connections_inbound", &[]))
            .set(f64::from(held));
    }

    /// Times the transport returned freed memory to the OS (its running total), sampled.
    pub fn memory_trims(&self, total: u64) {
        self.memory_trims
            .get_or_init(|| self.metrics.counter("meshnode_memory_trims_total", &[]))
            .absolute(total);
    }

    /// Every service's handles (the sampler).
    pub fn services(&self) -> Vec<Arc<ServiceTelemetry>> {
        read(&self.services).values().cloned().collect()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Handles of one peer.
pub struct PeerTelemetry {
    /// `meshnode_peer_rtt_seconds` (the `meshnode/1` connection's).
    pub rtt: Gauge,
    /// `meshnode_quic_lost_packets_total` (every connection this node dialled to the peer).
    pub lost: Counter,
    connections: [OnceLock<ConnectionTelemetry>; 4],
    metrics: Arc<Metrics>,
    name: String,
}

impl PeerTelemetry {
    /// The handles of this node's connection to or from the peer with `alpn`, registered on
    /// first use (a peer reached only one way or over one ALPN shows only those series).
    /// `outbound`: this node dialled it (it carries this node's requests); else the peer did.
    pub fn connection(&self, alpn: Alpn, outbound: bool) -> &ConnectionTelemetry {
        let i = match alpn {
            Alpn::Meshnode => 0,
            Alpn::H3 => 2,
        } + usize::from(!outbound);
        self.connections[i].get_or_init(|| {
            let m = &self.metrics;
            let direction = if outbound { "outbound" } else { "inbound" };
            let labels = [
                ("peer", self.name.as_str()),
                ("alpn", alpn.name()),
                ("direction", direction),
            ];
            ConnectionTelemetry {
                rtt: m.gauge("meshnode_quic_connection_rtt_seconds", &labels),
                cwnd: m.gauge("meshnode_quic_connection_cwnd_bytes", &labels),
                sent: m.counter("meshnode_quic_connection_sent_packets_total", &labels),
                lost: m.counter("meshnode_quic_connection_lost_packets_total", &labels),
                congestion: m.counter("meshnode_quic_connection_congestion_events_total", &labels),
            }
        })
    }
}

/// Handles of one QUIC connection between this node and a peer (one per ALPN and direction).
/// Counters are advanced by what each connection added since the last sample, so a reconnect
/// neither loses counts nor makes them fall.
pub struct ConnectionTelemetry {
    /// `meshnode_quic_connection_rtt_seconds`
    pub rtt: Gauge,
    /// `meshnode_quic_connection_cwnd_bytes`
    pub cwnd: Gauge,
    /// `meshnode_quic_connection_sent_packets_total`
    pub sent: Counter,
    /// `meshnode_quic_connection_lost_packets_total`
    pub lost: Counter,
    /// `meshnode_quic_connection_congestion_events_total`
    pub congestion: Counter,
}

/// Handles of one service.
pub struct ServiceTelemetry {
    metrics: Arc<Metrics>,
    name: String,
    /// Live byte totals of its tunnels (written by the splice, exported by [`Self::sync`]).
    pub bytes: Arc<TunnelCounters>,
    carried: AtomicBool,
    bytes_sent: OnceLock<Counter>,
    bytes_received: OnceLock<Counter>,
    active: OnceLock<Gauge>,
    retries: Lazy<Counter, RESULTS>,
    endpoints: RwLock<HashMap<String, Arc<EndpointTelemetry>>>,
    ejections: Mutex<HashMap<String, Counter>>,
}

impl ServiceTelemetry {
    fn new(metrics: Arc<Metrics>, name: &str) -> ServiceTelemetry {
        ServiceTelemetry {
            metrics,
            name: name.to_string(),
            bytes: Arc::default(),
            carried: AtomicBool::new(false),
            bytes_sent: OnceLock::new(),
            bytes_received: OnceLock::new(),
            active: OnceLock::new(),
            retries: Lazy::new(),
            endpoints: RwLock::default(),
            ejections: Mutex::default(),
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The handles of this service on `peer` (`""` when no endpoint was chosen).
    pub fn endpoint(&self, peer: &str) -> Arc<EndpointTelemetry> {
        if let Some(e) = read(&self.endpoints).get(peer) {
            return e.clone();
        }
        let mut all = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        all.entry(peer.to_string())
            .or_insert_with(|| {
                Arc::new(EndpointTelemetry {
                    metrics: self.metrics.clone(),
                    service: self.name.clone(),
                    peer: peer.to_string(),
                    opened: Lazy::new(),
                    codes: Lazy::new(),
                    other_codes: Mutex::default(),
                    duration: OnceLock::new(),
                })
            })
            .clone()
    }

    /// Counts a retry for `reason`.
    pub fn retry(&self, reason: AttemptResult) {
        self.retries
            .get(reason as usize, || {
                self.metrics.counter(
                    "meshnode_retries_total",
                    &[("service", &self.name), ("reason", reason.label())],
                )
            })
            .increment(1);
    }

    /// Counts one active tunnel or request until the guard drops.
    pub fn active(self: &Arc<Self>) -> ActiveGuard {
        self.carried.store(true, Ordering::Relaxed);
        let gauge = self
            .active
            .get_or_init(|| {
                self.metrics
                    .gauge("meshnode_tunnels_active", &[("service", &self.name)])
            })
            .clone();
        gauge.increment(1.0);
        ActiveGuard { gauge }
    }

    /// Brings sampled totals (bytes, the balancer's ejections by peer) into the exposition.
    pub fn sync(&self, ejections: impl IntoIterator<Item = (String, u64)>) {
        if self.carried.load(Ordering::Relaxed) {
            let m = &self.metrics;
            let dir = |d: &'static str| {
                m.counter(
                    "meshnode_tunnel_bytes_total",
                    &[("service", &self.name), ("direction", d)],
                )
            };
            self.bytes_sent
                .get_or_init(|| dir("sent"))
                .absolute(self.bytes.sent.load(Ordering::Relaxed));
            self.bytes_received
                .get_or_init(|| dir("received"))
                .absolute(self.bytes.received.load(Ordering::Relaxed));
        }
        let mut known = self.ejections.lock().unwrap_or_else(|p| p.into_inner());
        for (peer, total) in ejections {
            if total == 0 {
                continue;
            }
            known
                .entry(peer)
                .or_insert_with_key(|peer| {
                    self.metrics.counter(
                        "meshnode_endpoint_ejections_total",
                        &[("service", &self.name), ("peer", peer)],
                    )
                })
                .absolute(total);
        }
    }
}

/// Decrements `meshnode_tunnels_active` on drop.
pub struct ActiveGuard {
    gauge: Gauge,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Status codes whose series get a lock-free handle; others go through a small map.
const COMMON_CODES: [u16; 16] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 409, 429, 500, 502, 503, 504,
];

/// Handles of one service on one peer.
pub struct EndpointTelemetry {
    metrics: Arc<Metrics>,
    service: String,
    peer: String,
    opened: Lazy<Counter, RESULTS>,
    codes: Lazy<Counter, { COMMON_CODES.len() }>,
    other_codes: Mutex<HashMap<u16, Counter>>,
    duration: OnceLock<Histogram>,
}

impl EndpointTelemetry {
    /// Counts a tunnel open with `result`.
    pub fn opened(&self, result: AttemptResult) {
        self.opened
            .get(result as usize, || {
                self.metrics.counter(
                    "meshnode_tunnels_opened_total",
                    &[
                        ("service", &self.service),
                        ("peer", &self.peer),
                        ("result", result.label()),
                    ],
                )
            })
            .increment(1);
    }

    /// Counts an HTTP answer and the time to its head.
    pub fn http(&self, code: http::StatusCode, seconds: f64) {
        self.count_code(code);
        self.duration
            .get_or_init(|| {
                self.metrics.histogram(
                    "meshnode_http_request_duration_seconds",
                    &[("service", &self.service), ("peer", &self.peer)],
                )
            })
            .record(seconds);
    }

    /// Counts an HTTP answer without timing it (answered before any attempt).
    pub fn count_code(&self, code: http::StatusCode) {
        let make = || {
            self.metrics.counter(
                "meshnode_http_requests_total",
                &[
                    ("service", &self.service),
                    ("peer", &self.peer),
                    ("code", code.as_str()),
                ],
            )
        };
        match COMMON_CODES.iter().position(|c| *c == code.as_u16()) {
            Some(i) => self.codes.get(i, make).increment(1),
            None => self
                .other_codes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(code.as_u16())
                .or_insert_with(make)
                .increment(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_render_under_the_documented_names_and_labels() {
        let t = Telemetry::new();
        t.rejected(RefusalKind::Forbidden);
        t.rejected(RefusalKind::Forbidden);
        t.migration();
        let svc = t.service("echo");
        assert!(
            Arc::ptr_eq(&svc, &t.service("echo")),
            "one handle set per service"
        );
        svc.endpoint("node-b").opened(AttemptResult::Ok);
        svc.endpoint("").opened(AttemptResult::NoEndpoint);
        svc.retry(AttemptResult::Status503);
        svc.endpoint("node-b").http(http::StatusCode::OK, 0.0003);
        svc.endpoint("node-b")
            .http(http::StatusCode::IM_A_TEAPOT, 0.002);
        {
            let _a = svc.active();
            let _b = svc.active();
            assert_eq!(t.metrics().get("meshnode_tunnels_active", &["echo"]), 2.0);
        }
        svc.bytes.sent.fetch_add(10, Ordering::Relaxed);
        svc.sync([("node-b".to_string(), 2)]);
        t.registry(true, 7, 2);
        t.ready(true);
        let mut handshakes = HandshakeResult::ALL.map(|r| (r, 0));
        handshakes[1].1 = 5;
        t.handshakes(handshakes);
        t.inbound_peer_connections(3);
        t.memory_trims(2);
        let m = t.metrics();
        let get = |name: &str, labels: &[&str]| m.get(name, labels);
        assert_eq!(get("meshnode_registry_lease_grants_total", &[]), 2.0);
        assert_eq!(get("meshnode_ready", &[]), 1.0);
        assert_eq!(get("meshnode_peer_connections_inbound", &[]), 3.0);
        assert_eq!(get("meshnode_memory_trims_total", &[]), 2.0);
        assert_eq!(
            get(
                "meshnode_handshakes_total",
                &[HandshakeResult::ALL[1].as_str()]
            ),
            5.0
        );
        assert_eq!(get("meshnode_inbound_rejected_total", &["forbidden"]), 2.0);
        assert_eq!(get("meshnode_quic_migrations_total", &[]), 1.0);
        assert_eq!(
            get("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]),
            1.0
        );
        assert_eq!(
            get(
                "meshnode_tunnels_opened_total",
                &["echo", "", "no_endpoint"]
            ),
            1.0
        );
        assert_eq!(get("meshnode_retries_total", &["echo", "status_503"]), 1.0);
        assert_eq!(
            get("meshnode_http_requests_total", &["echo", "node-b", "200"]),
            1.0
        );
        assert_eq!(
            get("meshnode_http_requests_total", &["echo", "node-b", "418"]),
            1.0
        );
        assert_eq!(get("meshnode_tunnels_active", &["echo"]), 0.0);
        assert_eq!(get("meshnode_tunnel_bytes_total", &["echo", "sent"]), 10.0);
        assert_eq!(
            get("meshnode_tunnel_bytes_total", &["echo", "received"]),
            0.0
        );
        assert_eq!(
            get("meshnode_endpoint_ejections_total", &["echo", "node-b"]),
            2.0
        );
        assert_eq!(get("meshnode_registry_connected", &[]), 1.0);
        assert_eq!(get("meshnode_registry_updates_total", &[]), 7.0);
        let text = m.render();
        assert!(text.contains(
            "meshnode_http_request_duration_seconds_bucket{service=\"echo\",peer=\"node-b\",le=\"0.0005\"} 1"
        ), "{text}");
    }
}
