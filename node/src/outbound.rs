//! Outbound: an application's TCP connection on a local port becomes a tunnel to one of the
//! service's endpoints, chosen by the balancer and retried elsewhere if the open fails.
//!
//! Nothing is read from the application before the tunnel is open, so a retry is invisible
//! to it: its first bytes wait in the kernel's socket buffer, not in ours.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_proto::StreamHeader;
use meshnode_transport::tunnel::{self, OpenError};
use meshnode_transport::Alpn;
use tokio::net::{TcpListener, TcpStream};

use crate::balance::{Balancer, Candidate, InflightGuard};
use crate::node::Shared;

/// Attempts per connection: the first try plus up to two retries on other endpoints.
pub const MAX_ATTEMPTS: usize = 3;
/// A tunnel open may take this many times the endpoint's peak-EWMA latency before it is
/// abandoned and retried elsewhere: far above normal jitter, far below "dead".
pub const OPEN_DEADLINE_FACTOR: f64 = 10.0;
/// The shortest open deadline: below this, a busy but healthy target (a TCP accept queue, a
/// GC pause) would be retried needlessly.
pub const MIN_OPEN_DEADLINE: Duration = Duration::from_millis(500);

/// The deadline for opening a tunnel to an endpoint whose peak-EWMA latency is `ewma_ms`:
/// derived from what was measured, between [`MIN_OPEN_DEADLINE`] and the configured ceiling.
pub fn open_deadline(ewma_ms: f64, ceiling: Duration) -> Duration {
    let measured = Duration::from_secs_f64((ewma_ms.max(0.0) * OPEN_DEADLINE_FACTOR) / 1e3);
    measured
        .max(MIN_OPEN_DEADLINE)
        .min(ceiling.max(MIN_OPEN_DEADLINE))
}

/// Accepts application connections for `service` until the task is stopped.
pub(crate) async fn accept_loop(shared: Arc<Shared>, service: String, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                let shared = shared.clone();
                let service = service.clone();
                tokio::spawn(async move { handle(shared, service, tcp, client).await });
            }
            Err(e) => {
                // EMFILE and the like: back off briefly rather than spin.
                tracing::warn!(%service, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One endpoint of a service as the balancer sees it.
pub(crate) struct Target {
    pub node: String,
    pub addr: SocketAddr,
    pub port: u16,
    pub weight: u32,
}

/// The endpoints of `service` in the current view.
pub(crate) fn targets(shared: &Shared, service: &str) -> Vec<Target> {
    let view = shared.view.borrow().clone();
    view.endpoints(service)
        .filter_map(|(svc, node)| {
            Some(Target {
                node: node.name.clone(),
                addr: node.addr.parse().ok()?,
                port: svc.port,
                weight: svc.weight,
            })
        })
        .collect()
}

/// Picks an endpoint of `all` for the next attempt, skipping those already `tried` — unless
/// every endpoint failed once already: a second try on one of them still beats failing the
/// application (a transient overload, a connection being replaced).
pub(crate) fn pick_endpoint(
    balancer: &Balancer,
    all: &[Target],
    tried: &[String],
) -> Option<String> {
    let candidates: Vec<Candidate<'_>> = all
        .iter()
        .map(|t| Candidate {
            node: &t.node,
            weight: t.weight,
        })
        .collect();
    let mut exclude: Vec<&str> = tried.iter().map(String::as_str).collect();
    if !candidates.is_empty() && candidates.iter().all(|c| exclude.contains(&c.node)) {
        exclude.clear();
    }
    balancer.pick(
        &candidates,
        &exclude,
        Instant::now(),
        &mut rand::thread_rng(),
    )
}

/// Why an attempt failed, for metrics and logs.
pub(crate) enum AttemptError {
    Connect(String),
    Open(OpenError),
}

async fn handle(shared: Arc<Shared>, service: String, tcp: TcpStream, client: SocketAddr) {
    let started = Instant::now();
    // One W3C trace per application connection; every attempt is its own span, and the far
    // node logs the same trace id, so a tunnel can be followed across the mesh.
    let trace_id = format!("{:032x}", rand::random::<u128>());
    let opened = match open_with_retries(&shared, &service, None, &trace_id).await {
        Ok(o) => o,
        Err(failure) => {
            let counted = match &failure {
                NoTunnel::NoEndpoint { tried } if tried.is_empty() => Some("no_endpoint"),
                NoTunnel::NoEndpoint { .. } => Some("exhausted"),
                NoTunnel::BudgetExhausted => Some("budget_exhausted"),
                NoTunnel::Failed(_) => None,
            };
            if let Some(result) = counted {
                shared
                    .metrics
                    .inc("meshnode_tunnels_opened_total", &[&service, "", result]);
            }
            tracing::warn!(%service, %client, reason = %failure, "no tunnel; connection reset");
            reset(tcp);
            return;
        }
    };
    let Opened {
        node,
        tunnel: t,
        inflight,
        attempts,
    } = opened;
    let _active = shared.track(&service);
    let counters = shared.bytes(&service);
    let outcome = tunnel::splice(tcp, t.send, t.recv, t.leftover, &counters).await;
    drop(inflight);
    tracing::info!(
        target: "meshnode::access",
        direction = "outbound",
        %service,
        peer = %node,
        %client,
        %trace_id,
        attempts,
        to_peer = outcome.to_peer,
        from_peer = outcome.from_peer,
        clean = outcome.is_clean(),
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
}

/// A tunnel opened by [`open_with_retries`].
pub(crate) struct Opened {
    /// The endpoint that accepted it.
    pub node: String,
    pub tunnel: tunnel::OpenTunnel,
    /// Keeps the tunnel counted as in flight on `node` until dropped.
    pub inflight: InflightGuard,
    /// Attempts it took, the successful one included.
    pub attempts: usize,
}

/// Why [`open_with_retries`] opened nothing.
pub(crate) enum NoTunnel {
    /// No endpoint left to try (`tried` is empty when the service had none at all).
    NoEndpoint { tried: Vec<String> },
    /// A retry was due but the service's retry budget refused it.
    BudgetExhausted,
    /// The last attempt failed: not retryable, or the attempts ran out.
    Failed(AttemptError),
}

impl std::fmt::Display for NoTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoTunnel::NoEndpoint { tried } if tried.is_empty() => write!(f, "no endpoint"),
            NoTunnel::NoEndpoint { tried } => write!(f, "no endpoint left after {tried:?}"),
            NoTunnel::BudgetExhausted => write!(f, "retry budget exhausted"),
            NoTunnel::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(r) => write!(f, "peer unreachable: {r}"),
            AttemptError::Open(o) => write!(f, "{o}"),
        }
    }
}

/// Opens a tunnel to one of `service`'s endpoints (on `port` when given, else each endpoint's
/// registered port): picks with the balancer, retries a failure that is retryable on another
/// endpoint within [`MAX_ATTEMPTS`] and the retry budget, and reports every outcome to the
/// balancer and the metrics. Shared by `[[outbound]]` listeners and the proxy's CONNECT.
pub(crate) async fn open_with_retries(
    shared: &Shared,
    service: &str,
    port: Option<u16>,
    trace_id: &str,
) -> Result<Opened, NoTunnel> {
    let balancer = shared.balancer(service);
    let budget = shared.budget(service);
    budget.record_request(Instant::now());
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<AttemptError> = None;
    for attempt in 0..MAX_ATTEMPTS {
        let mut all = targets(shared, service);
        if let Some(port) = port {
            for t in &mut all {
                t.port = port;
            }
        }
        // The budget is checked before `pick`, so every endpoint picked gets an outcome
        // reported (a picked probe that never reported would keep its endpoint out).
        if attempt > 0 && !budget.try_retry(Instant::now()) {
            return Err(NoTunnel::BudgetExhausted);
        }
        let Some(node) = pick_endpoint(&balancer, &all, &tried) else {
            return Err(NoTunnel::NoEndpoint { tried });
        };
        // `pick` chose from `all`, so the lookup cannot miss.
        let Some(target) = all.iter().find(|t| t.node == node) else {
            return Err(NoTunnel::NoEndpoint { tried });
        };
        let inflight = balancer.start(&node);
        let mut open_started = Instant::now();
        let traceparent = format!("00-{trace_id}-{:016x}-01", rand::random::<u64>());
        let deadline = open_deadline(
            balancer.snapshot(&node, Instant::now()).ewma_ms,
            shared.open_timeout,
        );
        let e = match open(
            shared,
            service,
            target,
            &traceparent,
            deadline,
            &mut open_started,
        )
        .await
        {
            Ok(t) => {
                balancer.record_success(&node, open_started.elapsed(), Instant::now());
                shared
                    .metrics
                    .inc("meshnode_tunnels_opened_total", &[service, &node, "ok"]);
                return Ok(Opened {
                    node,
                    tunnel: t,
                    inflight,
                    attempts: attempt + 1,
                });
            }
            Err(e) => e,
        };
        drop(inflight);
        let (result, retry) = match &e {
            AttemptError::Connect(_) => {
                balancer.mark_down(&node, Instant::now());
                ("unreachable", true)
            }
            AttemptError::Open(o) => {
                if o.is_retryable() {
                    balancer.record_failure(&node, Instant::now());
                } else {
                    // 403/404/400: the endpoint is alive and answered; the request is
                    // refused, the endpoint is not failing.
                    balancer.record_success(&node, open_started.elapsed(), Instant::now());
                }
                (open_result(o), o.is_retryable())
            }
        };
        shared
            .metrics
            .inc("meshnode_tunnels_opened_total", &[service, &node, result]);
        tracing::info!(%service, peer = %node, attempt, reason = %e, retry, "tunnel open failed");
        if !retry {
            return Err(NoTunnel::Failed(e));
        }
        shared
            .metrics
            .inc("meshnode_retries_total", &[service, result]);
        tried.push(node);
        last = Some(e);
    }
    Err(match last {
        Some(e) => NoTunnel::Failed(e),
        None => NoTunnel::NoEndpoint { tried },
    })
}

pub(crate) fn open_result(e: &OpenError) -> &'static str {
    match e {
        OpenError::Refused(s) => match s.code.as_u16() {
            403 => "forbidden",
            404 => "not_found",
            502 => "bad_gateway",
            503 => "unavailable",
            504 => "gateway_timeout",
            _ => "refused",
        },
        OpenError::Timeout(_) => "timeout",
        OpenError::Stream(_) | OpenError::Closed(_) => "stream_error",
        OpenError::Header(_) | OpenError::Malformed(_) => "protocol_error",
    }
}

/// Opens a tunnel to `target`. `open_started` is reset once a connection is at hand, so the
/// latency sample is the tunnel open alone, not a first dial's handshake.
pub(crate) async fn open(
    shared: &Shared,
    service: &str,
    target: &Target,
    traceparent: &str,
    deadline: Duration,
    open_started: &mut Instant,
) -> Result<tunnel::OpenTunnel, AttemptError> {
    let conn = shared
        .pool
        .connection(&target.node, target.addr, Alpn::Meshnode)
        .await
        .map_err(|e| AttemptError::Connect(e.to_string()))?;
    *open_started = Instant::now();
    let header = StreamHeader {
        service: service.to_string(),
        port: target.port,
        traceparent: Some(traceparent.to_string()),
        deadline_ms: u32::try_from(deadline.as_millis()).ok(),
    };
    tunnel::open(&conn, &header, deadline)
        .await
        .map_err(AttemptError::Open)
}

/// Closes the application's connection with RST, so it sees a failure at once rather than an
/// orderly end of an empty stream.
fn reset(tcp: TcpStream) {
    // Linger zero makes close send RST; it does not block, unlike a non-zero linger.
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_deadline_follows_measured_latency_within_bounds() {
        let ceiling = Duration::from_secs(3);
        assert_eq!(open_deadline(0.0, ceiling), MIN_OPEN_DEADLINE);
        assert_eq!(open_deadline(1.0, ceiling), MIN_OPEN_DEADLINE);
        assert_eq!(open_deadline(80.0, ceiling), Duration::from_millis(800));
        assert_eq!(open_deadline(1_000.0, ceiling), ceiling);
        assert_eq!(open_deadline(f64::NAN, ceiling), MIN_OPEN_DEADLINE);
    }
}
