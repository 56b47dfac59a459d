//! Outbound, L4: an application's TCP connection on a local port becomes a tunnel to one of the
//! service's endpoints, chosen and retried by the dispatch engine. This file is the engine's
//! L4 adapter ([`Outbound::open`], shared with the proxy's CONNECT) and the tunnel of an
//! `[[outbound]]` connection ([`carry`]; the ports themselves are `outbound_port.rs`).
//!
//! Nothing more is read from the application before the tunnel is open, so a retry is
//! invisible to it: its first bytes wait in the kernel's socket buffer, or, when an `auto`
//! port read them to tell HTTP apart, in the connection's held prefix, sent once open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_proto::StreamHeader;
use meshnode_transport::tunnel::{self, LocalSide, OpenError};
use meshnode_transport::{Alpn, PeerPool};
use tokio::net::TcpStream;

use crate::balance::InflightGuard;
use crate::dispatch::{Decision, Dispatch, Outcome, Request};
use crate::drain;
use crate::prefixed::Prefixed;
use crate::routing::{Routing, Target};
use crate::telemetry::{AttemptResult, ServiceTelemetry, Telemetry};
use crate::trace::TunnelTrace;

/// What the L4 adapter uses: routing, the peer pool, telemetry.
pub struct Outbound {
    /// Endpoints, balancers, budgets.
    pub routing: Arc<Routing>,
    /// This node's connections to peers.
    pub pool: PeerPool,
    /// Metric handles.
    pub telemetry: Arc<Telemetry>,
}

/// Carries one application connection as a tunnel to an endpoint of `svc`'s service: its held
/// prefix first, then both directions spliced. With no tunnel, the connection is reset.
pub(crate) async fn carry(
    outbound: Arc<Outbound>,
    drain: drain::Watch,
    svc: Arc<ServiceTelemetry>,
    mut conn: Prefixed<TcpStream>,
    client: SocketAddr,
) {
    let started = Instant::now();
    let service = svc.name();
    // One W3C trace per application connection, carried to the far node, whose access log
    // shows the same trace id; with `[tracing]`, the tunnel's client span.
    let mut trace = TunnelTrace::start(outbound.telemetry.tracer(), service, None);
    // A client that goes away while its tunnel is being opened (a connect-and-close burst)
    // ends the attempt at once: its socket is not held through retries it no longer wants.
    // (A client that already sent bytes may have half-closed on purpose: it is not watched.)
    let watch = !conn.has_prefix();
    let opened = tokio::select! {
        opened = outbound.open(&svc, None, &mut trace) => opened,
        () = client_gone(conn.get_ref()), if watch => {
            tracing::debug!(%service, %client, "client left before its tunnel opened");
            return;
        }
    };
    let opened = match opened {
        Ok(o) => o,
        Err(failure) => {
            trace.span.fail(&failure);
            tracing::warn!(%service, %client, reason = %failure, "no tunnel; connection reset");
            // An abortive close: the application sees a failure at once rather than an
            // orderly end of an empty stream.
            conn.abort();
            return;
        }
    };
    let Opened {
        node,
        tunnel: t,
        inflight,
        attempts,
    } = opened;
    let _hold = drain.hold();
    let _active = svc.active();
    let (mut send, mut recv) = (t.send, t.recv);
    let outcome =
        tunnel::splice_with(&mut conn, &mut send, &mut recv, t.leftover, &svc.bytes).await;
    drop(inflight);
    trace.span.tunnel_closed(&outcome);
    tracing::info!(
        target: "meshnode::access",
        direction = "outbound",
        %service,
        peer = %node,
        %client,
        trace_id = trace.trace_id(),
        attempts,
        to_peer = outcome.to_peer,
        from_peer = outcome.from_peer,
        clean = outcome.is_clean(),
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
}

/// Resolves when the client of `tcp` has closed or reset its connection without sending a
/// byte; pends for ever once it has sent bytes (they wait for the tunnel, and a client may
/// half-close after its request on purpose).
async fn client_gone(tcp: &TcpStream) {
    let mut byte = [0u8; 1];
    match tcp.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// A tunnel opened by [`Outbound::open`].
pub struct Opened {
    /// The endpoint that accepted it.
    pub node: String,
    /// The tunnel.
    pub tunnel: tunnel::OpenTunnel,
    /// Keeps the tunnel counted as in flight on `node` until dropped.
    pub inflight: InflightGuard,
    /// Attempts it took, the successful one included.
    pub attempts: usize,
}

/// Why an attempt failed.
#[derive(Debug)]
pub enum AttemptError {
    /// No connection to the peer.
    Connect(String),
    /// The tunnel open failed.
    Open(OpenError),
}

impl AttemptError {
    /// The typed outcome the engine decides on.
    pub(crate) fn outcome(&self, latency: Duration) -> Outcome {
        match self {
            AttemptError::Connect(_) => Outcome::Unreachable,
            // The far node does not serve the service on that port: its record is stale.
            AttemptError::Open(OpenError::Refused(s))
                if s.code == meshnode_proto::StatusCode::NotFound =>
            {
                Outcome::NotServed
            }
            AttemptError::Open(OpenError::Refused(s)) => Outcome::Refused {
                status: s.code.as_u16(),
                mesh: true,
                // A `meshnode/1` refusal comes before any application byte was read: the far
                // node's 502/503/504 mean the target never saw this tunnel.
                unreached: self.is_open_retryable(),
                latency,
            },
            AttemptError::Open(OpenError::Timeout(_)) => Outcome::Timeout,
            AttemptError::Open(OpenError::Stream(_)) => Outcome::ResetBeforeSend,
            AttemptError::Open(OpenError::Closed(_)) => Outcome::ResetAfterSend,
            AttemptError::Open(OpenError::Header(_) | OpenError::Malformed(_)) => {
                Outcome::Protocol { latency }
            }
        }
    }

    fn is_open_retryable(&self) -> bool {
        matches!(self, AttemptError::Open(o) if o.is_retryable())
    }

    /// The `result` label.
    pub fn result(&self) -> AttemptResult {
        match self {
            AttemptError::Connect(_) => AttemptResult::Unreachable,
            AttemptError::Open(e) => open_result(e),
        }
    }
}

/// Why [`Outbound::open`] opened nothing.
#[derive(Debug)]
pub enum NoTunnel {
    /// No endpoint left to try (`tried` is empty when the service had none at all).
    NoEndpoint {
        /// Endpoints tried.
        tried: Vec<String>,
    },
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

/// The `result` label of a failed open.
pub fn open_result(e: &OpenError) -> AttemptResult {
    match e {
        OpenError::Refused(s) => match s.code.as_u16() {
            403 => AttemptResult::Forbidden,
            404 => AttemptResult::NotFound,
            502 => AttemptResult::BadGateway,
            503 => AttemptResult::Unavailable,
            504 => AttemptResult::GatewayTimeout,
            _ => AttemptResult::Refused,
        },
        OpenError::Timeout(_) => AttemptResult::Timeout,
        OpenError::Stream(_) | OpenError::Closed(_) => AttemptResult::StreamError,
        OpenError::Header(_) | OpenError::Malformed(_) => AttemptResult::ProtocolError,
    }
}

impl Outbound {
    /// Opens a tunnel to one of `svc`'s endpoints (on `port` when given, else each endpoint's
    /// registered port), driving the dispatch engine, and counts every attempt and a failure
    /// without an attempt. Shared by `[[outbound]]` listeners and the proxy's CONNECT. Each
    /// attempt carries `trace`'s traceparent; failed attempts are events of its span.
    pub async fn open(
        &self,
        svc: &ServiceTelemetry,
        port: Option<u16>,
        trace: &mut TunnelTrace,
    ) -> Result<Opened, NoTunnel> {
        let service = svc.name();
        let route = self.routing.route(service);
        let mut dispatch = Dispatch::new(&route, Request::TUNNEL, Instant::now());
        loop {
            let all = self.routing.targets(service, port);
            let target = match dispatch.pick(&all, Instant::now(), &mut rand::thread_rng()) {
                Ok(t) => t,
                Err(none) => {
                    let result = if none.tried.is_empty() {
                        AttemptResult::NoEndpoint
                    } else {
                        AttemptResult::Exhausted
                    };
                    svc.endpoint("").opened(result);
                    return Err(NoTunnel::NoEndpoint { tried: none.tried });
                }
            };
            let node = target.node.clone();
            let inflight = dispatch.start(&node);
            let traceparent = trace.traceparent();
            let deadline = dispatch.deadline(&node, self.routing.open_timeout, Instant::now());
            let mut open_started = Instant::now();
            let attempt = dispatch.attempts();
            let endpoint = svc.endpoint(&node);
            let e = match self
                .attempt(service, target, &traceparent, deadline, &mut open_started)
                .await
            {
                Ok(t) => {
                    let latency = open_started.elapsed();
                    dispatch.report(&node, Outcome::Ok { latency }, Instant::now());
                    endpoint.opened(AttemptResult::Ok);
                    trace.span.peer(&node, target.addr);
                    return Ok(Opened {
                        node,
                        tunnel: t,
                        inflight,
                        attempts: attempt,
                    });
                }
                Err(e) => e,
            };
            drop(inflight);
            let result = e.result();
            endpoint.opened(result);
            let decision =
                dispatch.report(&node, e.outcome(open_started.elapsed()), Instant::now());
            let retry = decision == Decision::Retry;
            trace
                .span
                .attempt_failed(&node, target.addr, result.label(), retry);
            tracing::info!(%service, peer = %node, attempt = attempt - 1, reason = %e, retry, "tunnel open failed");
            match decision {
                Decision::Retry => svc.retry(result),
                Decision::Deliver => return Err(NoTunnel::Failed(e)),
                Decision::OutOfBudget => {
                    svc.endpoint("").opened(AttemptResult::BudgetExhausted);
                    return Err(NoTunnel::BudgetExhausted);
                }
            }
        }
    }

    /// One attempt on `target` (for adapters that drive the engine themselves, such as the
    /// WebSocket upgrade). `open_started` is reset once a connection is at hand, so the
    /// latency sample is the tunnel open alone, not a first dial's handshake.
    pub(crate) async fn attempt(
        &self,
        service: &str,
        target: &Target,
        traceparent: &str,
        deadline: Duration,
        open_started: &mut Instant,
    ) -> Result<tunnel::OpenTunnel, AttemptError> {
        let conn = self
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
}
