//! `[[outbound]]` ports: each accepted application connection goes to one service, either as
//! one raw tunnel (the L4 adapter, `outbound.rs`) or, in mode `auto`, when it speaks HTTP/1.1
//! or h2c, through the HTTP adapter with the service fixed (`http/proxy.rs`), each request
//! balanced on its own (docs/behaviour.md, Outbound ports).
//!
//! How a connection on an `auto` port is carried:
//!
//! | the service's endpoints declare | the connection's first bytes | carried as |
//! |---|---|---|
//! | `tcp` (any endpoint) | not read | a tunnel |
//! | `http`, `http2`, `grpc`, or no endpoint known | HTTP/1.1 request line, h2c preface | HTTP, per request |
//! | the same | anything else, end of stream, nothing for [`DETECT_TIMEOUT`] (no endpoint known: [`UNKNOWN_DETECT_TIMEOUT`]) | a tunnel |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meshnode_registry::Protocol;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::admit::{ListenerAdmission, NodeAdmission};
use crate::config::{OutboundConfig, OutboundMode};
use crate::drain;
use crate::http::proxy::Proxy;
use crate::http::sniff::{self, Detected};
use crate::outbound::Outbound;
use crate::prefixed::Prefixed;
use crate::telemetry::ServiceTelemetry;

/// How long an `auto` port of an HTTP-family service waits for a connection's first bytes to
/// tell HTTP from other protocols before it tunnels the connection anyway (Linkerd's protocol
/// detection waits as long). Clients of HTTP services speak first, at once; one that keeps an
/// idle connection (a pool warming up) ends up in a tunnel, which still works.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The same wait when no endpoint of the service is known (so neither is its protocol): an
/// HTTP client has spoken long before, and a silent or server-speaks-first client learns
/// soon that there is no endpoint (its tunnel attempt resets it) instead of after 10 s.
pub const UNKNOWN_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What outbound ports use: the L4 adapter and the HTTP adapter.
pub(crate) struct Ports {
    /// Tunnels.
    pub l4: Arc<Outbound>,
    /// Per-request HTTP.
    pub http: Arc<Proxy>,
    /// The node-wide cap on application connections.
    pub admission: Arc<NodeAdmission>,
}

/// One `[[outbound]]` listener and its accept task.
pub struct OutboundListener {
    /// The service it serves.
    pub service: String,
    /// Its mode.
    pub mode: OutboundMode,
    /// Its own connection cap.
    pub max_connections: Option<usize>,
    /// The address in the config (may have port 0).
    pub configured: SocketAddr,
    /// The address actually bound.
    pub bound: SocketAddr,
    /// The accept loop.
    pub task: JoinHandle<()>,
}

impl OutboundListener {
    /// Binds `config.listen` and starts serving `config.service` in `config.mode`.
    pub(crate) async fn start(
        ports: &Arc<Ports>,
        drain: &drain::Watch,
        config: &OutboundConfig,
    ) -> std::io::Result<OutboundListener> {
        let listener = TcpListener::bind(config.listen).await?;
        let bound = listener.local_addr()?;
        let mode = config.mode();
        let admission = ports.admission.listener(bound, config.max_connections);
        let task = tokio::spawn(accept_loop(
            ports.clone(),
            drain.clone(),
            config.service.clone(),
            mode,
            listener,
            admission,
        ));
        Ok(OutboundListener {
            service: config.service.clone(),
            mode,
            max_connections: config.max_connections,
            configured: config.listen,
            bound,
            task,
        })
    }

    /// Whether this listener is what `config` asks for.
    pub fn serves(&self, config: &OutboundConfig) -> bool {
        self.service == config.service
            && self.configured == config.listen
            && self.mode == config.mode()
            && self.max_connections == config.max_connections
    }
}

/// Accepts application connections for `service` until a drain begins or the task is stopped.
async fn accept_loop(
    ports: Arc<Ports>,
    drain: drain::Watch,
    service: String,
    mode: OutboundMode,
    listener: TcpListener,
    admission: ListenerAdmission,
) {
    let svc = ports.l4.telemetry.service(&service);
    let fixed: Arc<str> = Arc::from(service.as_str());
    crate::admit::accept_loop(listener, &drain, &admission, &service, |tcp, client| {
        serve(
            ports.clone(),
            drain.clone(),
            svc.clone(),
            fixed.clone(),
            mode,
            tcp,
            client,
        )
    })
    .await;
}

async fn serve(
    ports: Arc<Ports>,
    drain: drain::Watch,
    svc: Arc<ServiceTelemetry>,
    service: Arc<str>,
    mode: OutboundMode,
    mut tcp: TcpStream,
    client: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    let wait = match (mode, ports.l4.routing.protocol(&service)) {
        (OutboundMode::Tcp, _) | (OutboundMode::Auto, Some(Protocol::Tcp)) => None,
        (OutboundMode::Auto, Some(_)) => Some(DETECT_TIMEOUT),
        (OutboundMode::Auto, None) => Some(UNKNOWN_DETECT_TIMEOUT),
    };
    let (detected, first) = if let Some(wait) = wait {
        match first_bytes(&mut tcp, wait).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%service, %client, error = %e, "client connection failed before its first bytes");
                return;
            }
        }
    } else {
        (Detected::Other, Bytes::new())
    };
    let conn = Prefixed::new(first, tcp);
    match detected {
        Detected::Http1 | Detected::H2c => {
            tracing::debug!(%service, %client, ?detected, "outbound connection served as HTTP");
            crate::http::proxy::serve_connection(
                ports.http.clone(),
                drain,
                conn,
                client,
                Some(service),
            )
            .await;
        }
        Detected::Other => crate::outbound::carry(ports.l4.clone(), drain, svc, conn, client).await,
    }
}

/// Reads until the bytes tell HTTP/1.1 or h2c from anything else (`sniff::detect`); returns
/// the verdict and the bytes read. The end of the stream or `wait` without a verdict is
/// `Other`: the connection is tunnelled with what it sent.
async fn first_bytes(tcp: &mut TcpStream, wait: Duration) -> std::io::Result<(Detected, Bytes)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(d) = sniff::detect(&buf) {
            return Ok((d, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Detected::Other, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}
