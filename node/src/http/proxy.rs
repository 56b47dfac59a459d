//! Caller side: the local HTTP proxy on `[http_proxy] listen`, HTTP/1.1 and h2c (prior
//! knowledge, told apart by the connection's first bytes), and the same serving for an
//! `[[outbound]]` port in `auto` mode with its service fixed ([`serve_connection`]). Requests
//! are routed by the absolute-form URI's host (`HTTP_PROXY` clients), by h2's `:authority` or
//! by `Host`, without the port; each request (each HTTP/2 stream) is sent as an HTTP/3
//! request to one endpoint chosen per request by the dispatch engine, and retried elsewhere
//! when the engine says so (docs/README.md, Failover). This file is the engine's HTTP adapter.
//!
//! One h3 client per peer connection: the QUIC connection comes from the node's pool (ALPN
//! `h3`, dialled by this node); the h3 client on it is built once, its driver polled in a task
//! of its own, and its `SendRequest` cloned per request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshnode_transport::{Alpn, PeerPool};
use tokio::net::TcpListener;

use super::body::{self, Body};
use super::grpc::{self, RequestBody};
use super::headers::{add_forwarded_for, continue_trace, host_of, strip_hop_by_hop, traceparent};
use super::sniff::{self, Preface, Verdict};
use super::upgrade;
use super::{is_idempotent, mesh_error, MAX_HEADER_BYTES, MESH_ERROR};

use crate::admit::ListenerAdmission;
use crate::balance::InflightGuard;
use crate::dispatch::{self, Decision, Dispatch, Outcome};
use crate::drain;
use crate::outbound::Outbound;
use crate::prefixed::Prefixed;
use crate::refusal::RefusalKind;
use crate::routing::{Routing, Target};
use crate::telemetry::{AttemptResult, EndpointTelemetry, Telemetry};
use crate::trace::{Span, Start};

/// Streams an h2c client may have open at once on one connection (more are refused).
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams an h2c client may reset before the proxy answered, and streams the proxy may reset
/// for a client's errors, before the connection is closed with GOAWAY (HTTP/2 rapid reset).
pub const MAX_PENDING_RESETS: usize = 32;

/// What the proxy uses.
pub(crate) struct Proxy {
    /// Endpoints, balancers, budgets.
    pub routing: Arc<Routing>,
    /// This node's connections to peers (ALPN `h3`).
    pub pool: PeerPool,
    /// Metric handles.
    pub telemetry: Arc<Telemetry>,
    /// The L4 adapter, for CONNECT.
    pub outbound: Arc<Outbound>,
    /// One h3 client per peer connection.
    pub h3: H3Clients,
    /// `node.http_idle_timeout`: a client connection silent this long is closed gracefully.
    pub idle_timeout: Duration,
}

/// Accepts proxy clients until a drain begins or the task is stopped.
pub(crate) async fn accept_loop(
    proxy: Arc<Proxy>,
    drain: drain::Watch,
    listener: TcpListener,
    admission: ListenerAdmission,
) {
    crate::admit::accept_loop(listener, &drain, &admission, "http_proxy", |tcp, client| {
        serve_client(proxy.clone(), drain.clone(), tcp, client)
    })
    .await;
}

async fn serve_client(
    proxy: Arc<Proxy>,
    drain: drain::Watch,
    tcp: tokio::net::TcpStream,
    client: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    serve_connection(proxy, drain, tcp, client, None).await;
}

/// The service every request of a connection goes to, whatever the request names: the
/// connection came in on an `[[outbound]]` port of that service (docs/behaviour.md, Outbound
/// ports). Carried as a request extension, read by [`route`].
#[derive(Clone)]
struct FixedService(Arc<str>);

/// Serves one client connection, HTTP/1.1 or h2c: the proxy's (`fixed` = `None`: each request
/// names its service), or an `[[outbound]]` port's in `auto` mode (`fixed` = its service).
pub(crate) async fn serve_connection<I>(
    proxy: Arc<Proxy>,
    drain: drain::Watch,
    io: I,
    client: SocketAddr,
    fixed: Option<Arc<str>>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let telemetry = proxy.telemetry.clone();
    let io = match check_preface(io).await {
        Ok(io) => io,
        Err(refused) => {
            if let Some(reason) = refused {
                telemetry.http_rejected(reason);
            }
            tracing::debug!(%client, reason = refused, "proxy client connection refused before HTTP");
            return;
        }
    };
    let verdict = Arc::new(AtomicU8::new(0));
    let idle_timeout = proxy.idle_timeout;
    let (io, activity) = super::idle::IdleIo::new(super::sniff::Sniffer::new(io, verdict.clone()));
    let io = TokioIo::new(io);
    let service = service_fn(move |mut req: Request<Incoming>| {
        let (proxy, drain) = (proxy.clone(), drain.clone());
        let verdict = Verdict::of(&verdict);
        let mismatch = fixed.is_none() && host_mismatch(&req);
        let refused = fixed.as_ref().and_then(|s| fix_service(&mut req, s));
        async move {
            let resp = if let Some(refused) = refused {
                refused
            } else if let Some(verdict) = verdict {
                if verdict == Verdict::Smuggling {
                    proxy.telemetry.rejected(RefusalKind::Smuggling);
                }
                proxy.telemetry.http_rejected(verdict.label());
                let mut r = mesh_error(StatusCode::BAD_REQUEST, verdict.reason());
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                r
            } else if mismatch {
                proxy.telemetry.http_rejected("host_mismatch");
                mesh_error(
                    StatusCode::BAD_REQUEST,
                    "Host and the request's authority name different services",
                )
            } else {
                // Boxed: the request's state machine is large, and hyper moves the future
                // it is given into place for every request (a copy of every byte of it).
                super::boxed_in_place(|| handle(proxy, drain, client, req)).await
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        // A request head (and an idle keep-alive connection's next one) must arrive within
        // this: a slowloris client is closed, not held for ever.
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_PENDING_RESETS)
        // WebSocket over HTTP/2 (RFC 8441).
        .enable_connect_protocol();
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    // The idle deadline (`http/idle.rs`): checked when it could have passed, not per byte.
    let mut closing = false;
    let served = loop {
        let wait = idle_timeout.saturating_sub(activity.idle_for());
        tokio::select! {
            served = conn.as_mut() => break served,
            () = tokio::time::sleep(wait), if !closing => {
                if activity.idle_for() >= idle_timeout {
                    tracing::debug!(%client, ?idle_timeout, "idle HTTP client connection closed");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    };
    if let Err(e) = served {
        // hyper answered (400, 431) or closed these itself, before any request reached us.
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_timeout() {
                telemetry.http_rejected("header_timeout");
            } else if e.is_parse_too_large() {
                telemetry.http_rejected("head_too_large");
            } else if e.is_parse() {
                telemetry.http_rejected("malformed");
            } else if let Some(reason) = h2_goaway(e) {
                telemetry.http_rejected(reason);
            }
        }
        tracing::debug!(%client, error = %e, "proxy client connection ended");
    }
}

/// Reads a client's first bytes far enough to check an HTTP/2 connection preface
/// (`sniff::preface`), and hands the connection on with them in front. HTTP/1.1 goes on at its
/// first byte that departs from the magic. An invalid preface is answered with SETTINGS and
/// GOAWAY(PROTOCOL_ERROR) and the connection closed; the error is the
/// `meshnode_http_rejected_total` reason (`None`: the connection failed, nothing to count).
async fn check_preface<I>(mut io: I) -> Result<Prefixed<I>, Option<&'static str>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut first = bytes::BytesMut::with_capacity(64);
    let read = async {
        loop {
            if let Some(p) = sniff::preface(&first) {
                return Ok(p);
            }
            if io.read_buf(&mut first).await? == 0 {
                // The end of the stream: hyper makes of the bytes what it can.
                return Ok::<_, std::io::Error>(Preface::NotH2);
            }
        }
    };
    let checked = tokio::time::timeout(HEADER_READ_TIMEOUT, read).await;
    match checked {
        Ok(Ok(Preface::Invalid)) => {
            let _ = io.write_all(&sniff::bad_preface_answer()).await;
            let _ = io.shutdown().await;
            Err(Some("h2_protocol_error"))
        }
        Ok(Ok(_)) => Ok(Prefixed::new(first.freeze(), io)),
        Ok(Err(_)) => Err(None),
        Err(_) => Err(Some("header_timeout")),
    }
}

/// The `meshnode_http_rejected_total` reason of an h2c connection the proxy closed with a
/// GOAWAY for the client's fault (hyper's HTTP/2 decided and says so in its error): a client
/// past a limit (rapid reset, CONTINUATION flood, a header list far over the limit) is told
/// `ENHANCE_YOUR_CALM`, one that broke the protocol `PROTOCOL_ERROR`, `FRAME_SIZE_ERROR`,
/// `COMPRESSION_ERROR`, ... A GOAWAY from the client, or its connection just ending, is not
/// counted.
fn h2_goaway(e: &hyper::Error) -> Option<&'static str> {
    let h2 = std::error::Error::source(e)?.downcast_ref::<h2::Error>()?;
    if !(h2.is_go_away() && h2.is_library()) {
        return None;
    }
    match h2.reason()? {
        h2::Reason::NO_ERROR => None,
        h2::Reason::ENHANCE_YOUR_CALM => Some("h2_enhance_your_calm"),
        _ => Some("h2_protocol_error"),
    }
}

/// How long a client has to send a request head, counted from the connection's start or the
/// end of its previous request: also the idle keep-alive timeout (hyper's default, as long as
/// common servers' keep-alive: nginx 75 s, Envoy's request-headers timeout unset).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An absolute-form or h2 request whose authority names another host than its `Host` header
/// (RFC 9112 §3.2.2 says to ignore Host then; a proxy that routed by one and forwarded the other
/// would let a client reach a service it did not name).
fn host_mismatch(req: &Request<Incoming>) -> bool {
    let Some(authority) = req.uri().authority() else {
        return false;
    };
    let hosts = req.headers().get_all(http::header::HOST);
    hosts.iter().any(|h| {
        h.to_str().map_or(true, |h| {
            !host_of(h).eq_ignore_ascii_case(&host_of(authority.as_str()))
        })
    })
}

/// Marks `req` as one for `service` (an `[[outbound]]` port's): whatever `Host` or
/// `:authority` named reaches the target as `x-forwarded-host` (the target sees `Host:
/// SERVICE`, as through the proxy). CONNECT is refused: it would reach other services than
/// the port's.
fn fix_service(req: &mut Request<Incoming>, service: &Arc<str>) -> Option<Response<Body>> {
    if req.method() == Method::CONNECT {
        return Some(mesh_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served on an outbound port",
        ));
    }
    let named = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            let host = req.headers().get(http::header::HOST)?;
            host.to_str().ok().map(str::to_string)
        });
    if let Some(named) = named.filter(|n| host_of(n) != **service) {
        if let Ok(v) = http::HeaderValue::from_str(&named) {
            req.headers_mut().entry("x-forwarded-host").or_insert(v);
        }
    }
    req.extensions_mut().insert(FixedService(service.clone()));
    None
}

/// The service a request names: an `[[outbound]]` port's own, the absolute-form URI's host,
/// else the `Host` header.
fn route(req: &Request<Incoming>) -> Option<String> {
    if let Some(FixedService(s)) = req.extensions().get::<FixedService>() {
        return Some(s.to_string());
    }
    if let Some(a) = req.uri().authority() {
        return Some(host_of(a.as_str()));
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_of)
}

async fn handle(
    proxy: Arc<Proxy>,
    drain: drain::Watch,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    if let Some(protocol) = upgrade::extended_connect(&req) {
        if upgrade::websocket_ask(&req).is_none() {
            let reason = format!("extended CONNECT for {protocol} is not supported");
            return mesh_error(StatusCode::NOT_IMPLEMENTED, &reason);
        }
    } else if req.method() == Method::CONNECT {
        return super::tunnel::connect(&proxy.outbound, drain, req).await;
    }
    if grpc::is_grpc(req.headers()) {
        // A gRPC caller understands only gRPC statuses: mesh errors are answered as such. Its
        // `grpc-timeout` bounds the wait for the answer's head, retries included.
        let Some(deadline) = grpc::timeout(req.headers()) else {
            return grpc::answer(handle_request(proxy, drain, client, req).await);
        };
        let answer = handle_request(proxy, drain, client, req);
        return match tokio::time::timeout(deadline, answer).await {
            Ok(resp) => grpc::answer(resp),
            Err(_) => {
                let reason = "grpc-timeout passed";
                let mut resp = grpc::trailers_only(
                    grpc::Code::DeadlineExceeded,
                    &format!("meshnode: {reason}"),
                );
                resp.headers_mut()
                    .insert(MESH_ERROR, http::HeaderValue::from_static(reason));
                resp
            }
        };
    }
    handle_request(proxy, drain, client, req).await
}

async fn handle_request(
    proxy: Arc<Proxy>,
    drain: drain::Watch,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(service) = route(&req) else {
        return mesh_error(
            StatusCode::BAD_REQUEST,
            "no Host header and no absolute URI",
        );
    };
    let svc = proxy.telemetry.service(&service);
    if !proxy.routing.has_endpoints(&service) {
        svc.endpoint("").count_code(StatusCode::NOT_FOUND);
        return mesh_error(StatusCode::NOT_FOUND, &format!("unknown service {service}"));
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let started = Instant::now();
    let resp = match upgrade::websocket_ask(&req) {
        Some(ask) => upgrade::websocket(&proxy.outbound, drain, client, &service, ask, req).await,
        None => forward(&proxy, client, &service, req).await,
    };
    // One access-log line per request (off unless MESHNODE_LOG enables meshnode::access), at
    // the response head: the body may stream for a long time after.
    tracing::info!(
        target: "meshnode::access",
        direction = "http",
        %service,
        %client,
        %method,
        path,
        status = resp.status().as_u16(),
        mesh_error = resp.headers().contains_key(MESH_ERROR),
        head_ms = started.elapsed().as_millis() as u64,
        "http request answered"
    );
    resp
}

/// One request as each attempt sends it.
struct Prepared {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The body, until an attempt takes it (a streamed body is sent once).
    body: Option<Body>,
    /// A body read whole (a small gRPC request), sent again on every attempt.
    replay: Option<(Bytes, Option<HeaderMap>)>,
    body_empty: bool,
    /// A gRPC call: a trailers-only `UNAVAILABLE` answer may be retried elsewhere.
    grpc: bool,
}

async fn forward(
    proxy: &Proxy,
    client: SocketAddr,
    service: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let (parts, incoming) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    add_forwarded_for(&mut headers, client.ip());
    let start = Start {
        service,
        traceparent: traceparent(&headers),
        port: None,
        http: Some((&parts.method, parts.uri.path())),
    };
    let mut span = Span::client(proxy.telemetry.tracer(), start);
    let trace_id = continue_trace(&mut headers, &span);
    // The request target as the callee sees it: `https://{service}{path}`, from the parts
    // already parsed (the path is not parsed again).
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let Ok(uri) = Uri::builder()
        .scheme(http::uri::Scheme::HTTPS)
        .authority(service)
        .path_and_query(path)
        .build()
    else {
        return mesh_error(StatusCode::BAD_REQUEST, "malformed request target");
    };
    let body_empty = incoming.is_end_stream();
    let grpc = grpc::is_grpc(&headers);
    // A gRPC call whose body ends soon and small is read whole, so that it can be replayed
    // on another endpoint; gRPC calls count as idempotent for a trailers-only UNAVAILABLE or
    // a mesh refusal before any answer (docs/behaviour.md, gRPC).
    let (body, replay) = match (grpc && !body_empty, incoming) {
        (true, incoming) => match grpc::buffer(incoming).await {
            RequestBody::Whole(data, trailers) => (None, Some((data, trailers))),
            RequestBody::Streaming(b) => (Some(b), None),
        },
        (false, incoming) => (
            Some(
                incoming
                    .map_err(|e| Box::new(e) as body::BoxError)
                    .boxed_unsync(),
            ),
            None,
        ),
    };
    let request = dispatch::Request {
        replayable: body_empty || replay.is_some(),
        idempotent: grpc || is_idempotent(&parts.method),
    };
    let mut prepared = Prepared {
        method: parts.method,
        uri,
        headers,
        body,
        replay,
        body_empty,
        grpc,
    };
    let svc = proxy.telemetry.service(service);
    let route = proxy.routing.route(service);
    let mut dispatch = Dispatch::new(&route, request, Instant::now());
    loop {
        let all = proxy.routing.targets(service, None);
        let target = match dispatch.pick(&all, Instant::now(), &mut rand::thread_rng()) {
            Ok(t) => t,
            Err(_) => {
                let answer = mesh_error(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint");
                return finish(&svc.endpoint(""), &mut span, started, answer);
            }
        };
        let node = target.node.clone();
        let inflight = dispatch.start(&node);
        let (outcome, answer) = attempt(proxy, service, target, &mut prepared, inflight).await;
        match dispatch.report(&node, outcome, Instant::now()) {
            Decision::Retry => {
                let reason = retry_reason(outcome);
                svc.retry(reason);
                span.attempt_failed(&node, target.addr, reason.label(), true);
                tracing::debug!(%service, peer = %node, %trace_id, attempt = dispatch.attempts() - 1, reason = reason.label(), "retrying on another endpoint");
            }
            Decision::Deliver | Decision::OutOfBudget => {
                span.peer(&node, target.addr);
                return finish(&svc.endpoint(&node), &mut span, started, answer);
            }
        }
    }
}

/// The `meshnode_retries_total` reason of an HTTP attempt.
pub(super) fn retry_reason(outcome: Outcome) -> AttemptResult {
    match outcome {
        Outcome::Unreachable => AttemptResult::Unreachable,
        Outcome::NotServed => AttemptResult::NotFound,
        Outcome::Timeout => AttemptResult::Timeout,
        Outcome::Refused { status: 502, .. } => AttemptResult::Status502,
        Outcome::Refused { .. } => AttemptResult::Status503,
        _ => AttemptResult::StreamError,
    }
}

/// One attempt on `target`: the typed outcome, and the answer the client gets if it is the
/// last (a peer's response, or a mesh error saying what failed).
async fn attempt(
    proxy: &Proxy,
    service: &str,
    target: &Target,
    req: &mut Prepared,
    inflight: InflightGuard,
) -> (Outcome, Response<Body>) {
    let node = &target.node;
    let failed = |reason: &str| mesh_error(StatusCode::BAD_GATEWAY, &format!("peer {reason}"));
    let mut sr = match proxy.h3.get(&proxy.pool, node, target.addr).await {
        Ok(sr) => sr,
        Err(reason) => {
            tracing::info!(%service, peer = %node, %reason, "h3 connection failed");
            return (Outcome::Unreachable, failed("unreachable"));
        }
    };
    let mut h3req = Request::new(());
    *h3req.method_mut() = req.method.clone();
    *h3req.uri_mut() = req.uri.clone();
    *h3req.headers_mut() = req.headers.clone();
    let t0 = Instant::now();
    let stream = match sr.send_request(h3req).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%service, peer = %node, error = %e, "h3 request failed");
            return (Outcome::ResetBeforeSend, failed("stream_error"));
        }
    };
    let (mut send, mut recv) = stream.split();
    let mut body_sent = None;
    if req.body_empty {
        let _ = send.finish().await;
    } else if let Some((data, trailers)) = &req.replay {
        let b = RequestBody::whole_body(data, trailers);
        tokio::spawn(async move {
            let _ = body::send_client_body(&mut send, b).await;
        });
    } else if let Some(b) = req.body.take() {
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        body_sent = Some(sent_rx);
        tokio::spawn(async move {
            let _ = sent_tx.send(body::send_client_body(&mut send, b).await);
        });
    }
    let head = match recv.recv_response().await {
        Ok(h) => h,
        Err(e) => {
            tracing::info!(%service, peer = %node, error = %e, "no response");
            // The client's own body failed (a malformed chunk, a cut-off upload): the reset
            // that follows is its doing, not the peer's. The body task has ended by then, or
            // ends within moments of the stream's reset.
            let client_body_failed = match body_sent {
                Some(rx) => matches!(
                    tokio::time::timeout(Duration::from_millis(200), rx).await,
                    Ok(Ok(body::SendOutcome::BodyFailed))
                ),
                None => false,
            };
            if client_body_failed {
                proxy.telemetry.http_rejected("bad_body");
                let answer = mesh_error(
                    StatusCode::BAD_REQUEST,
                    "request body malformed or cut short",
                );
                return (Outcome::ClientFailed, answer);
            }
            let answer = if req.body_empty || req.replay.is_some() {
                failed("stream_error")
            } else {
                mesh_error(StatusCode::BAD_GATEWAY, "peer reset the request")
            };
            return (Outcome::ResetAfterSend, answer);
        }
    };
    let latency = t0.elapsed();
    let status = head.status().as_u16();
    // What the far node says, decoded once: its own refusal (`meshnode-error`), and whether
    // that refusal means the target never saw the request.
    let refusal = head.headers().get(MESH_ERROR);
    let mesh = refusal.is_some();
    let kind = refusal.and_then(|v| RefusalKind::from_wire(v.as_bytes()));
    let unreached = kind.is_some_and(RefusalKind::target_unreached);
    let outcome = if matches!(
        kind,
        Some(RefusalKind::UnknownService | RefusalKind::UnknownPort)
    ) {
        // The view says the node hosts the service; the node says it does not (a stale
        // record): another endpoint may.
        Outcome::NotServed
    } else if mesh || matches!(status, 502..=504) {
        Outcome::Refused {
            status,
            mesh,
            unreached,
            latency,
        }
    } else if req.grpc && grpc::is_unavailable(head.headers()) {
        // The application said UNAVAILABLE before any message: like a 503, retried within
        // the budget.
        Outcome::Refused {
            status: 503,
            mesh: false,
            unreached: false,
            latency,
        }
    } else {
        Outcome::Ok { latency }
    };
    let (mut rparts, ()) = head.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    rparts.version = http::Version::HTTP_11;
    let rbody = body::ClientRecvBody::new(recv, None, Some(Box::new(inflight))).boxed_unsync();
    if req.grpc && rparts.headers.contains_key("grpc-status") {
        // A trailers-only answer: sent on as a head that ends the stream (a gRPC client reads
        // `grpc-status` in a head only then). The h3 stream is read to its end by the
        // dropped body, which holds the in-flight guard until then.
        drop(rbody);
        return (outcome, Response::from_parts(rparts, body::empty()));
    }
    (outcome, Response::from_parts(rparts, rbody))
}

/// Counts the answer in the HTTP metrics and the request's span (which ends at the answer's
/// head, as the duration metric does), and returns it.
fn finish(
    endpoint: &EndpointTelemetry,
    span: &mut Span,
    started: Instant,
    resp: Response<Body>,
) -> Response<Body> {
    endpoint.http(resp.status(), started.elapsed().as_secs_f64());
    let reason = resp.headers().get(MESH_ERROR).and_then(|v| v.to_str().ok());
    span.status(resp.status(), reason);
    resp
}

/// Sends requests on one peer connection.
pub(crate) type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// The cached client of one peer: the connection's stable id and its `SendRequest`.
type Slot = Arc<tokio::sync::Mutex<Option<(usize, SendRequest)>>>;

/// h3 clients by peer name. Dropping the last `SendRequest` of a connection closes it, so the
/// cache keeps one per live connection and replaces it only when the pool's connection changes.
#[derive(Default)]
pub(crate) struct H3Clients {
    slots: Mutex<HashMap<String, Slot>>,
}

impl H3Clients {
    /// The h3 client for `node` at `addr`, dialling and setting it up if needed.
    pub(crate) async fn get(
        &self,
        pool: &PeerPool,
        node: &str,
        addr: SocketAddr,
    ) -> Result<SendRequest, String> {
        let conn = pool
            .connection(node, addr, Alpn::H3)
            .await
            .map_err(|e| e.to_string())?;
        let id = conn.stable_id();
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_default()
            .clone();
        let mut cached = slot.lock().await;
        if let Some((cached_id, sr)) = cached.as_ref() {
            if *cached_id == id {
                return Ok(sr.clone());
            }
        }
        let (mut driver, sr) = h3::client::builder()
            .max_field_section_size(MAX_HEADER_BYTES as u64)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| format!("h3 set-up: {e}"))?;
        let peer = node.to_string();
        tokio::spawn(async move {
            let reason = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            tracing::debug!(%peer, %reason, "h3 client connection ended");
        });
        *cached = Some((id, sr.clone()));
        Ok(sr)
    }

    /// Forgets peers for which `keep` is false (nodes that left the mesh).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
    }
}
