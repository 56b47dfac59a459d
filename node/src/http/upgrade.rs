//! WebSocket through the mesh: the dispatch engine's upgrade adapter. [`websocket`] takes the
//! client's request (and, through hyper, its connection) and answers it; any front-end that
//! serves with upgrades can call it. A client asks with HTTP/1.1 `Upgrade` (RFC 6455 §4,
//! answered `101`) or with HTTP/2 extended CONNECT (RFC 8441, answered `200`); the target is
//! always asked with HTTP/1.1 `Upgrade`, this node checking its `Sec-WebSocket-Accept` for an
//! HTTP/2 client (which has no key of its own to check it with).
//!
//! Carried between nodes as a `meshnode/1` tunnel to the service's advertised port: the
//! caller opens the tunnel, speaks HTTP/1.1 over it to the target (the upgrade request, with
//! the proxy's header rules), reads the answer's head, and after a `101` splices the two
//! switched connections with the one splice. The far node only connects and splices, as for
//! any tunnel. Why not RFC 9220 (extended CONNECT over HTTP/3): the h3 stack knows no
//! `:protocol` but `webtransport` and `connect-udp`, and a tunnel keeps the far node's part
//! the one it has for every TCP connection (docs/protocol.md, WebSocket).
//!
//! Each attempt is one endpoint: the tunnel open and the handshake are retried on another
//! endpoint, as the engine decides, until a `101` comes back; after the `101` nothing is
//! retried. A non-`101` answer is passed on as a normal response.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use meshnode_transport::tunnel::splice_with;

use super::body::{self, Body, Guarded};
use super::headers::{
    add_forwarded_for, ensure_traceparent, set_parent, strip_hop_by_hop, traceparent,
};
use super::proxy::retry_reason;
use super::stream::{TunnelIo, Upgraded};
use super::tunnel::open_failure_status;
use super::{is_idempotent, mesh_error, MAX_HEADER_BYTES};

use crate::balance::InflightGuard;
use crate::dispatch::{self, Decision, Dispatch, Outcome};
use crate::drain;
use crate::outbound::Outbound;
use crate::routing::Target;
use crate::telemetry::{AttemptResult, EndpointTelemetry, ServiceTelemetry};
use crate::trace::{Span, Start};

/// How long a target may take to answer the upgrade request once the tunnel is open (504,
/// retried elsewhere, above it). As Envoy's default route timeout, which also bounds an
/// upgrade until its answer; nothing bounds the connection after the `101`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// The GUID of RFC 6455 §1.3, hashed with the key into `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// How a client asks for a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// HTTP/1.1 `Connection: upgrade` + `Upgrade: websocket`; answered `101`.
    Upgrade,
    /// HTTP/2 extended CONNECT with `:protocol` = `websocket` (RFC 8441); answered `200`.
    ExtendedConnect,
}

/// Whether `req` asks for a WebSocket, and how.
pub(crate) fn websocket_ask<B>(req: &Request<B>) -> Option<Ask> {
    match extended_connect(req) {
        Some(p) => p
            .eq_ignore_ascii_case("websocket")
            .then_some(Ask::ExtendedConnect),
        None => is_websocket(req.headers()).then_some(Ask::Upgrade),
    }
}

/// The `:protocol` of an HTTP/2 extended CONNECT (RFC 8441), if `req` is one.
pub(crate) fn extended_connect<B>(req: &Request<B>) -> Option<&str> {
    if req.method() != Method::CONNECT {
        return None;
    }
    req.extensions()
        .get::<hyper::ext::Protocol>()
        .map(hyper::ext::Protocol::as_str)
}

/// Whether `headers` ask to switch to WebSocket: `Connection` names `upgrade` and `Upgrade`
/// names `websocket` (case-insensitive tokens). Other upgrades (`h2c`, ...) are not carried:
/// their `Upgrade` is dropped as hop-by-hop and the request forwarded as a plain one.
pub(crate) fn is_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, http::header::CONNECTION, "upgrade")
        && has_token(headers, http::header::UPGRADE, "websocket")
}

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The upgrade request as each attempt sends it to the target.
struct Handshake {
    ask: Ask,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The `Sec-WebSocket-Accept` the target must answer, when this node made the key (an
    /// HTTP/2 client's request has none).
    accept: Option<String>,
}

impl Handshake {
    /// The client's request under the proxy's header rules (hop-by-hop headers dropped,
    /// `x-forwarded-for`, `traceparent`), `Host` = the service as on every mesh request,
    /// and `Connection: upgrade` + `Upgrade` kept: this is the one request they pass. An
    /// extended CONNECT becomes the HTTP/1.1 `GET` of RFC 8441 §5, with a key made here.
    fn new(
        req: &Request<Incoming>,
        ask: Ask,
        service: &str,
        client: SocketAddr,
    ) -> Option<Handshake> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = path.parse().ok()?;
        let mut headers = req.headers().clone();
        let (method, upgrade, accept) = match ask {
            Ask::Upgrade => {
                let upgrade = headers.get(http::header::UPGRADE).cloned()?;
                (req.method().clone(), upgrade, None)
            }
            Ask::ExtendedConnect => {
                use base64::Engine as _;
                let key =
                    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
                let accept = accept_for(&key);
                headers.insert(
                    http::header::SEC_WEBSOCKET_KEY,
                    HeaderValue::from_str(&key).ok()?,
                );
                let upgrade = HeaderValue::from_static("websocket");
                (Method::GET, upgrade, Some(accept))
            }
        };
        strip_hop_by_hop(&mut headers);
        keep_upgrade(&mut headers, upgrade);
        headers.insert(http::header::HOST, HeaderValue::from_str(service).ok()?);
        add_forwarded_for(&mut headers, client.ip());
        ensure_traceparent(&mut headers);
        Some(Handshake {
            ask,
            method,
            uri,
            headers,
            accept,
        })
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// The trace id the request carries (set by [`Handshake::new`]).
    fn trace_id(&self) -> &str {
        self.headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.split('-').nth(1))
            .unwrap_or_default()
    }
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2).
fn accept_for(key: &str) -> String {
    use base64::Engine as _;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

fn keep_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    headers.insert(http::header::UPGRADE, upgrade);
}

/// What an attempt brought back.
enum Answer {
    /// `101`: the head for the client, and the target's side of the switched connection.
    Switched(Response<Body>, hyper::upgrade::OnUpgrade, InflightGuard),
    /// Any other answer (the target's, or a mesh error), passed on as it is.
    Plain(Response<Body>),
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Answer::Switched(r, ..) | Answer::Plain(r) => r.status(),
        }
    }
}

/// Answers `req`, a WebSocket request for `service` from `client` asked as `ask` says
/// ([`websocket_ask`]): the target's switch (`101`, or `200` to an extended CONNECT) and then
/// bytes both ways until either side closes, or the target's other answer, or a mesh error.
/// `service` must have endpoints (the caller answered 404 otherwise). Counted in the HTTP
/// metrics as one request; its tunnel attempts as tunnels (docs/metrics.md).
pub(crate) async fn websocket(
    outbound: &Outbound,
    drain: drain::Watch,
    client: SocketAddr,
    service: &str,
    ask: Ask,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let svc = outbound.telemetry.service(service);
    let refuse = |code: StatusCode, reason: &str| {
        finish(&svc.endpoint(""), started, mesh_error(code, reason))
    };
    if ask == Ask::Upgrade && req.version() != Version::HTTP_11 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "WebSocket needs an HTTP/1.1 Upgrade",
        );
    }
    if let Some(p) = outbound.routing.protocol(service).filter(|p| p.is_h2()) {
        let reason = format!("service {service} is {p} (HTTP/2): WebSocket needs an http service");
        return refuse(StatusCode::BAD_REQUEST, &reason);
    }
    // An extended CONNECT's body is the WebSocket's bytes, sent after the switch.
    if ask == Ask::Upgrade && !req.body().is_end_stream() {
        return refuse(StatusCode::BAD_REQUEST, "an Upgrade request with a body");
    }
    let start = Start {
        service,
        traceparent: traceparent(req.headers()),
        port: None,
        http: Some((req.method(), req.uri().path())),
    };
    let mut span = Span::client(outbound.telemetry.tracer(), start);
    let Some(mut handshake) = Handshake::new(&req, ask, service, client) else {
        return refuse(StatusCode::BAD_REQUEST, "malformed request target");
    };
    set_parent(&mut handshake.headers, &span);
    // Before the first attempt: a drain beginning now waits for this connection.
    let hold = drain.hold();
    let on_client = hyper::upgrade::on(&mut req);
    drop(req);
    let request = dispatch::Request {
        replayable: true,
        idempotent: is_idempotent(&handshake.method),
    };
    let route = outbound.routing.route(service);
    let mut dispatch = Dispatch::new(&route, request, Instant::now());
    loop {
        let all = outbound.routing.targets(service, None);
        let target = match dispatch.pick(&all, Instant::now(), &mut rand::thread_rng()) {
            Ok(t) => t,
            Err(_) => {
                span.status(StatusCode::SERVICE_UNAVAILABLE, Some("no healthy endpoint"));
                return refuse(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint");
            }
        };
        let node = target.node.clone();
        let inflight = dispatch.start(&node);
        let traced = span.traceparent();
        let (outcome, answer, reason) = attempt(
            outbound, &svc, &dispatch, target, &handshake, traced, inflight,
        )
        .await;
        match dispatch.report(&node, outcome, Instant::now()) {
            Decision::Retry => {
                svc.retry(reason);
                span.attempt_failed(&node, target.addr, reason.label(), true);
                tracing::debug!(%service, peer = %node, trace_id = handshake.trace_id(), attempt = dispatch.attempts() - 1, reason = reason.label(), "upgrade retried on another endpoint");
            }
            Decision::Deliver | Decision::OutOfBudget => {
                svc.endpoint(&node)
                    .http(answer.status(), started.elapsed().as_secs_f64());
                span.peer(&node, target.addr);
                span.status(answer.status(), None);
                // Ends at the answer's head, as every HTTP span does.
                span.end();
                return match answer {
                    Answer::Plain(resp) => resp,
                    Answer::Switched(resp, target_side, inflight) => {
                        let svc = svc.clone();
                        let trace_id = handshake.trace_id().to_string();
                        tokio::spawn(async move {
                            let _hold = hold;
                            splice(&svc, &node, &trace_id, on_client, target_side).await;
                            drop(inflight);
                        });
                        resp
                    }
                };
            }
        }
    }
}

/// One attempt on `target`: a tunnel, then the handshake over it. Returns the outcome, the
/// answer, and the `meshnode_retries_total` reason should the engine retry. The tunnel
/// carries `traced` (the request's span, when tracing) as its parent.
async fn attempt(
    outbound: &Outbound,
    svc: &ServiceTelemetry,
    dispatch: &Dispatch<'_>,
    target: &Target,
    handshake: &Handshake,
    traced: Option<&str>,
    inflight: InflightGuard,
) -> (Outcome, Answer, AttemptResult) {
    let node = &target.node;
    let endpoint = svc.endpoint(node);
    let deadline = dispatch.deadline(node, outbound.routing.open_timeout, Instant::now());
    let traceparent = match traced {
        Some(tp) => tp.to_string(),
        None => format!(
            "00-{}-{:016x}-01",
            handshake.trace_id(),
            rand::random::<u64>()
        ),
    };
    let mut open_started = Instant::now();
    let tunnel = match outbound
        .attempt(
            svc.name(),
            target,
            &traceparent,
            deadline,
            &mut open_started,
        )
        .await
    {
        Ok(t) => {
            endpoint.opened(AttemptResult::Ok);
            t
        }
        Err(e) => {
            endpoint.opened(e.result());
            tracing::info!(service = svc.name(), peer = %node, reason = %e, "upgrade: tunnel open failed");
            let answer = mesh_error(open_failure_status(&e), &e.to_string());
            let outcome = e.outcome(open_started.elapsed());
            return (outcome, Answer::Plain(answer), e.result());
        }
    };
    let t0 = Instant::now();
    // The connection's task runs until the switch, or the end of a non-101 answer's body;
    // an attempt given up (no answer, a broken one) ends it with the tunnel.
    let mut conn_task = None;
    let sent = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEADER_BYTES)
            .handshake(TokioIo::new(TunnelIo::new(tunnel)))
            .await?;
        conn_task = Some(AbortOnDrop(Some(tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade: target connection ended");
            }
        }))));
        sender.send_request(handshake.request()).await
    })
    .await;
    let mut resp = match sent {
        Ok(Ok(resp)) => {
            if let Some(mut t) = conn_task.take() {
                t.detach();
            }
            resp
        }
        Ok(Err(e)) => {
            tracing::info!(service = svc.name(), peer = %node, error = %e, "upgrade: no answer from the target");
            return if e.is_parse() {
                let answer = mesh_error(StatusCode::BAD_GATEWAY, "target answered no HTTP/1.1");
                let outcome = Outcome::Protocol {
                    latency: t0.elapsed(),
                };
                (outcome, Answer::Plain(answer), AttemptResult::ProtocolError)
            } else {
                let answer = mesh_error(StatusCode::BAD_GATEWAY, "target closed the upgrade");
                let reason = AttemptResult::StreamError;
                (Outcome::ResetAfterSend, Answer::Plain(answer), reason)
            };
        }
        Err(_) => {
            let reason = format!(
                "target did not answer the upgrade within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            );
            tracing::info!(service = svc.name(), peer = %node, "upgrade: {reason}");
            let answer = mesh_error(StatusCode::GATEWAY_TIMEOUT, &reason);
            return (
                Outcome::Timeout,
                Answer::Plain(answer),
                AttemptResult::Timeout,
            );
        }
    };
    let latency = t0.elapsed();
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let target_side = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        let upgrade = parts.headers.get(http::header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        match handshake.ask {
            Ask::Upgrade => keep_upgrade(
                &mut parts.headers,
                upgrade.unwrap_or(HeaderValue::from_static("websocket")),
            ),
            Ask::ExtendedConnect => {
                // This node is the HTTP/1.1 client: it checks the key's answer (RFC 6455
                // §4.1), which the HTTP/2 client cannot, and answers `200` (RFC 8441 §5).
                let accept = parts.headers.remove(http::header::SEC_WEBSOCKET_ACCEPT);
                let expected = handshake.accept.as_deref().unwrap_or_default();
                if accept.as_ref().and_then(|v| v.to_str().ok()) != Some(expected) {
                    tracing::info!(service = svc.name(), peer = %node, "upgrade: wrong Sec-WebSocket-Accept from the target");
                    let reason = "target answered a wrong Sec-WebSocket-Accept";
                    let answer = mesh_error(StatusCode::BAD_GATEWAY, reason);
                    return (
                        Outcome::Protocol { latency },
                        Answer::Plain(answer),
                        AttemptResult::ProtocolError,
                    );
                }
                parts.status = StatusCode::OK;
            }
        }
        parts.version = Version::HTTP_11;
        let head = Response::from_parts(parts, body::empty());
        let answer = Answer::Switched(head, target_side, inflight);
        return (Outcome::Ok { latency }, answer, AttemptResult::Ok);
    }
    // Any other answer is the target's: like a GET's, a 502/503 may go elsewhere.
    let outcome = if matches!(status.as_u16(), 502..=504) {
        Outcome::Refused {
            status: status.as_u16(),
            mesh: false,
            unreached: false,
            latency,
        }
    } else {
        Outcome::Ok { latency }
    };
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let rbody = incoming
        .map_err(|e| Box::new(e) as body::BoxError)
        .boxed_unsync();
    let rbody = Guarded::boxed(rbody, Box::new(inflight));
    let answer = Answer::Plain(Response::from_parts(parts, rbody));
    (outcome, answer, retry_reason(outcome))
}

/// A task aborted when dropped, unless detached.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Lets the task run on its own (dropping a `JoinHandle` detaches its task).
    fn detach(&mut self) {
        self.0.take();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// Once both sides have switched: the client's connection and the tunnel, spliced until
/// both directions end (a FIN passed on as a half-close, a reset as a reset).
async fn splice(
    svc: &std::sync::Arc<ServiceTelemetry>,
    node: &str,
    trace_id: &str,
    on_client: hyper::upgrade::OnUpgrade,
    target_side: hyper::upgrade::OnUpgrade,
) {
    let service = svc.name();
    let (client_io, target_io) = tokio::join!(on_client, target_side);
    let (client_io, target_io) = match (client_io, target_io) {
        (Ok(c), Ok(t)) => (c, t),
        (c, t) => {
            let error = c.err().or(t.err()).map(|e| e.to_string());
            tracing::info!(%service, peer = %node, ?error, "upgrade: a side went away before the switch");
            return;
        }
    };
    let Ok(parts) = target_io.downcast::<TokioIo<TunnelIo>>() else {
        // The target side was built over a `TunnelIo` above: this cannot miss.
        tracing::warn!(%service, "upgrade: the target side is not a tunnel");
        return;
    };
    let (mut send, mut recv, unread) = parts.io.into_inner().into_parts();
    // What hyper read past the `101`, then what it did not read at all.
    let leftover = if unread.is_empty() {
        parts.read_buf
    } else {
        let mut b = BytesMut::from(&parts.read_buf[..]);
        b.extend_from_slice(&unread);
        b.freeze()
    };
    let _active = svc.active();
    let started = Instant::now();
    let mut local = Upgraded(TokioIo::new(client_io));
    let outcome = splice_with(&mut local, &mut send, &mut recv, leftover, &svc.bytes).await;
    tracing::info!(
        target: "meshnode::access",
        direction = "websocket",
        %service,
        peer = %node,
        %trace_id,
        to_peer = outcome.to_peer,
        from_peer = outcome.from_peer,
        clean = outcome.is_clean(),
        duration_ms = started.elapsed().as_millis() as u64,
        "websocket closed"
    );
}

/// Counts an answer given before any attempt and returns it.
fn finish(endpoint: &EndpointTelemetry, started: Instant, resp: Response<Body>) -> Response<Body> {
    endpoint.http(resp.status(), started.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_a_websocket_upgrade_is_one() {
        assert!(is_websocket(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ])));
        assert!(!is_websocket(&headers(&[("upgrade", "websocket")])));
        assert!(!is_websocket(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c"),
        ])));
        assert!(!is_websocket(&headers(&[("connection", "upgrade")])));
    }

    #[test]
    fn an_extended_connect_for_websocket_is_one_and_others_are_not() {
        let connect = |protocol: &'static str| {
            let mut r = Request::new(());
            *r.method_mut() = Method::CONNECT;
            r.extensions_mut()
                .insert(hyper::ext::Protocol::from_static(protocol));
            r
        };
        assert_eq!(
            websocket_ask(&connect("websocket")),
            Some(Ask::ExtendedConnect)
        );
        assert_eq!(websocket_ask(&connect("connect-udp")), None);
        assert_eq!(
            extended_connect(&connect("connect-udp")),
            Some("connect-udp")
        );
        let mut plain = Request::new(());
        *plain.method_mut() = Method::CONNECT;
        assert_eq!(extended_connect(&plain), None);
    }

    #[test]
    fn the_accept_is_rfc_6455s() {
        // RFC 6455 §1.3's worked example.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn the_upgrade_survives_the_hop_by_hop_rules_and_nothing_else_does() {
        let mut h = headers(&[
            ("connection", "Upgrade, x-private"),
            ("upgrade", "websocket"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let upgrade = h
            .get("upgrade")
            .cloned()
            .unwrap_or(HeaderValue::from_static("?"));
        strip_hop_by_hop(&mut h);
        keep_upgrade(&mut h, upgrade);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(h.contains_key("sec-websocket-key"));
    }
}
