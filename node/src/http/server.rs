//! Callee side: the h3 server on inbound `h3` connections. Each request names a local
//! service by `:authority`; it is checked (known, `allow`, not draining) and forwarded to the
//! service's target over pooled HTTP/1.1 (`http`) or h2c (`http2`, `grpc`), the body and
//! its trailers streaming both ways. CONNECT requests are
//! served here too (RFC 9114 §4.4): `:authority` = `service:port` opens a TCP connection to
//! the service's target, answered 200, then bytes both ways; a FIN on either side is passed
//! on as a FIN, a TCP reset resets the stream.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use meshnode_transport::tunnel::splice_with;
use meshnode_transport::StreamLimit;

use super::body::{self, Body, ServerRecv, ServerSend};
use super::headers::{host_of, set_parent, strip_hop_by_hop, traceparent};
use super::quic::{self, CallerGone, Watches};
use super::stream::{H3Recv, H3Send};
use super::{mesh_error, TargetClient, MAX_HEADER_BYTES};
use crate::drain;
use crate::inbound::HEADER_TIMEOUT;
use crate::local::LocalServices;
use crate::refusal::{Refusal, RefusalKind};
use crate::telemetry::Telemetry;
use crate::trace::{Caller, Span, Start};

/// What the h3 server uses.
pub(crate) struct H3Server {
    /// The hosted services and the authoriser.
    pub local: Arc<LocalServices>,
    /// Metric handles.
    pub telemetry: Arc<Telemetry>,
    /// Drain signal and holds.
    pub drain: drain::Watch,
    /// HTTP/1.1 and h2c clients to local targets (pooled).
    pub targets: TargetClient,
}

impl H3Server {
    /// Serves HTTP/3 requests on one inbound connection until it closes. `peer` is the
    /// caller's node name, taken from its certificate.
    /// `limit` is the connection's stream credit: each request holds a permit while it runs.
    pub(crate) async fn serve(
        self: Arc<Self>,
        peer: String,
        conn: quinn::Connection,
        limit: StreamLimit,
    ) {
        serve(self, peer, conn, limit).await;
    }

    /// Counts and answers a refusal.
    async fn refuse(&self, send: &mut ServerSend, refusal: &Refusal) {
        self.telemetry.rejected(refusal.kind);
        respond_error(send, refusal.kind.http_code(), refusal.wire()).await;
    }
}

async fn serve(shared: Arc<H3Server>, peer: String, conn: quinn::Connection, limit: StreamLimit) {
    let watches = Watches::default();
    let caller = conn.clone();
    let built = h3::server::builder()
        .max_field_section_size(MAX_HEADER_BYTES as u64)
        .build::<_, Bytes>(quic::Connection::new(conn, watches.clone()))
        .await;
    let mut h3conn = match built {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%peer, error = %e, "h3 connection set-up failed");
            return;
        }
    };
    loop {
        match h3conn.accept().await {
            Ok(Some(resolver)) => {
                let shared = shared.clone();
                let peer = peer.clone();
                let watches = watches.clone();
                let permit = limit.on_accept();
                // The caller's current address, for its span (read only when tracing: it
                // takes the connection's lock).
                let remote = shared.telemetry.tracer().map(|_| caller.remote_address());
                // Boxed: the request's future (h3, the target client, the body pump) is large,
                // and tokio moves a spawned future by value several times (into the task, its
                // stages); through a box each move is a pointer (callgrind: thousands of
                // instructions of memcpy per request otherwise).
                tokio::spawn(Box::pin(async move {
                    let _permit = permit;
                    // A request whose headers do not arrive in time is dropped (its stream
                    // reset) and counted, like a slow `meshnode/1` header: a silent stream must
                    // not hold a permit of the connection's stream credit for ever.
                    let resolved =
                        tokio::time::timeout(HEADER_TIMEOUT, resolver.resolve_request()).await;
                    match resolved {
                        Ok(Ok((req, stream))) => {
                            let (send, recv) = stream.split();
                            let gone = watches.take(send.send_id());
                            handle(shared, peer, remote, req, send, recv, gone).await;
                        }
                        Ok(Err(e)) => {
                            shared.telemetry.rejected(RefusalKind::Malformed);
                            tracing::debug!(%peer, error = %e, "bad h3 request");
                        }
                        Err(_) => {
                            shared.telemetry.rejected(RefusalKind::SlowHeader);
                            tracing::debug!(%peer, "h3 request headers not complete in time");
                        }
                    }
                }));
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "h3 connection ended");
                return;
            }
        }
    }
}

/// Sends a mesh error (status, `meshnode-error`, one-line body) on `send`.
pub(crate) async fn respond_error(send: &mut ServerSend, code: StatusCode, reason: &str) {
    let (parts, body) = mesh_error(code, reason).into_parts();
    let resp = Response::from_parts(parts, ());
    if send.send_response(resp).await.is_ok() {
        let _ = body::send_server_body(send, body).await;
    }
}

/// The callee's span of a request from `peer` for `service` (nothing without tracing).
fn server_span(
    shared: &H3Server,
    peer: &str,
    remote: Option<SocketAddr>,
    service: &str,
    req: &Request<()>,
    port: Option<u16>,
) -> Span {
    let (Some(tracer), Some(addr)) = (shared.telemetry.tracer(), remote) else {
        return Span::OFF;
    };
    let start = Start {
        service,
        traceparent: traceparent(req.headers()),
        port,
        http: Some((req.method(), req.uri().path())),
    };
    Span::server(Some(tracer), start, Caller { node: peer, addr })
}

/// Serves one request. `gone` fires if the caller lets the request go (its client cancelled,
/// or the connection is lost): the request to the target is then dropped, which resets its
/// HTTP/2 stream or closes its HTTP/1.1 connection, so the target sees the cancellation.
async fn handle(
    shared: Arc<H3Server>,
    peer: String,
    remote: Option<SocketAddr>,
    req: Request<()>,
    mut send: ServerSend,
    mut recv: ServerRecv,
    mut gone: CallerGone,
) {
    if req.method() == Method::CONNECT {
        serve_connect(shared, peer, remote, req, send, recv).await;
        return;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    let Some(service) = authority.map(|a| host_of(&a)) else {
        respond_error(&mut send, StatusCode::BAD_REQUEST, "no authority").await;
        return;
    };
    let mut span = server_span(&shared, &peer, remote, &service, &req, None);
    // Before the draining check inside, so that a drain beginning now waits for this request.
    let _hold = shared.drain.hold();
    let svc = match shared.local.authorise(&peer, &service, None) {
        Ok(s) => s,
        Err(refusal) => {
            span.status(refusal.kind.http_code(), Some(refusal.wire()));
            shared.refuse(&mut send, &refusal).await;
            return;
        }
    };
    let _active = shared.telemetry.service(&service).active();
    let (parts, ()) = req.into_parts();
    let h2 = svc.protocol.is_h2();
    let uri = if h2 {
        // hyper-util's h2c client takes the target from an absolute URI.
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        format!("http://{}{path}", svc.target)
            .parse::<Uri>()
            .map_err(http::Error::from)
    } else {
        // HTTP/1.1 goes out in origin form; the request's own path is reused as it is.
        let mut origin = http::uri::Parts::default();
        origin.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(origin).map_err(http::Error::from)
    };
    let Ok(uri) = uri else {
        span.status(StatusCode::BAD_REQUEST, Some("malformed path"));
        respond_error(&mut send, StatusCode::BAD_REQUEST, "malformed path").await;
        return;
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    set_parent(&mut headers, &span);
    if let Ok(h) = HeaderValue::from_str(&service) {
        headers.insert(http::header::HOST, h);
    }
    // A body is announced by Content-Length; without one, the first read tells (a request
    // without a body ends at once), so body-less requests reach the target without chunking.
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body: Body = match declared {
        Some(0) => body::empty(),
        // HTTP/2 frames a body of unknown length itself; a gRPC stream may wait for the
        // response headers before its first message, so nothing is read ahead.
        Some(_) => body::ServerRecvBody::new(recv, None, None).boxed_unsync(),
        None if h2 => body::ServerRecvBody::new(recv, None, None).boxed_unsync(),
        None => match recv.recv_data().await {
            Ok(Some(mut first)) => {
                use bytes::Buf;
                let first = first.copy_to_bytes(first.remaining());
                body::ServerRecvBody::new(recv, Some(first), None).boxed_unsync()
            }
            Ok(None) => body::empty(),
            Err(_) => return,
        },
    };
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;
    // A gRPC call's own deadline (`grpc-timeout`) when it is the shorter.
    let timeout = match super::grpc::timeout(out.headers()) {
        Some(t) => t.min(svc.request_timeout()),
        None => svc.request_timeout(),
    };
    let request = tokio::time::timeout(timeout, shared.targets.request(svc.target, out, h2));
    let answer = tokio::select! {
        answer = request => answer,
        () = &mut gone => {
            tracing::debug!(%peer, %service, "caller let go before the answer: target request cancelled");
            return;
        }
    };
    let resp = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let reason = if e.is_connect() {
                Refusal::new(RefusalKind::TargetRefused, "")
                    .wire()
                    .to_string()
            } else {
                "target reset".to_string()
            };
            tracing::info!(%peer, %service, error = %e, "target failed");
            span.status(StatusCode::BAD_GATEWAY, Some(&reason));
            respond_error(&mut send, StatusCode::BAD_GATEWAY, &reason).await;
            return;
        }
        Err(_) => {
            tracing::info!(%peer, %service, timeout_ms = timeout.as_millis() as u64, "target timed out");
            let timed_out = Refusal::new(RefusalKind::TargetTimeout, "");
            span.status(StatusCode::GATEWAY_TIMEOUT, Some(timed_out.wire()));
            respond_error(&mut send, StatusCode::GATEWAY_TIMEOUT, timed_out.wire()).await;
            return;
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    span.status(parts.status, None);
    // The span ends at the answer's head, as the caller's does.
    span.end();
    let head = Response::from_parts(parts, ());
    if send.send_response(head).await.is_err() {
        return;
    }
    let let_go = tokio::select! {
        _ = body::send_server_body(&mut send, body) => false,
        () = &mut gone => true,
    };
    if let_go {
        // The target's body is dropped: its stream is reset (h2) or its connection closed.
        tracing::debug!(%peer, %service, "caller let go during the answer: target stream cancelled");
        send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    }
}

/// Serves one CONNECT request from `peer`.
async fn serve_connect(
    shared: Arc<H3Server>,
    peer: String,
    remote: Option<SocketAddr>,
    req: Request<()>,
    mut send: ServerSend,
    recv: ServerRecv,
) {
    let Some((service, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((a.host().to_ascii_lowercase(), a.port_u16()?)))
    else {
        respond_error(
            &mut send,
            StatusCode::BAD_REQUEST,
            "CONNECT needs service:port",
        )
        .await;
        return;
    };
    let mut span = server_span(&shared, &peer, remote, &service, &req, Some(port));
    // Before the draining check inside, so that a drain beginning now waits for this tunnel.
    let _hold = shared.drain.hold();
    let tcp = match shared
        .local
        .authorise_and_connect(&peer, &service, port, None)
        .await
    {
        Ok(t) => t,
        Err(refusal) => {
            span.status(refusal.kind.http_code(), Some(refusal.wire()));
            let code = refusal.kind.code().as_u16();
            tracing::info!(%peer, %service, port, code, reason = %refusal, "CONNECT refused");
            shared.refuse(&mut send, &refusal).await;
            return;
        }
    };
    let ok = Response::builder().status(StatusCode::OK).body(());
    let Ok(ok) = ok else { return };
    if send.send_response(ok).await.is_err() {
        return;
    }
    span.status(StatusCode::OK, None);
    let svc = shared.telemetry.service(&service);
    let _active = svc.active();
    let mut tcp = tcp;
    let _ = tcp.set_nodelay(true);
    let (mut send, mut recv) = (H3Send(send), H3Recv::new(recv));
    let outcome = splice_with(&mut tcp, &mut send, &mut recv, Bytes::new(), &svc.bytes).await;
    span.tunnel_closed(&outcome);
}
