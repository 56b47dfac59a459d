//! Caller side: the local HTTP/1.1 proxy on `[http_proxy] listen`. Requests are routed by the
//! absolute-form URI's host (`HTTP_PROXY` clients) or by `Host`; each is sent as an HTTP/3
//! request to one endpoint chosen per request, and retried elsewhere per SPEC §8.
//!
//! One h3 client per peer connection: the QUIC connection comes from the node's pool (ALPN
//! `h3`, dialled by this node); the h3 client on it is built once, its driver polled in a task
//! of its own, and its `SendRequest` cloned per request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshnode_transport::Alpn;
use tokio::net::TcpListener;

use super::body::{self, Body};
use super::headers::{add_forwarded_for, ensure_traceparent, host_of, strip_hop_by_hop};
use super::{is_idempotent, mesh_error, MAX_HEADER_BYTES};

use crate::node::{lock, Shared};
use crate::outbound::{pick_endpoint, targets, MAX_ATTEMPTS};

/// Accepts proxy clients until the task is stopped.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                let shared = shared.clone();
                tokio::spawn(serve_client(shared, tcp, client));
            }
            Err(e) => {
                tracing::warn!(error = %e, "http proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_client(shared: Arc<Shared>, tcp: tokio::net::TcpStream, client: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let smuggled = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(super::sniff::Sniffer::new(tcp, smuggled.clone()));
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let smuggled = smuggled.clone();
        async move {
            let resp = if smuggled.load(Ordering::SeqCst) {
                shared
                    .metrics
                    .inc("meshnode_inbound_rejected_total", &["smuggling"]);
                let mut r = mesh_error(
                    StatusCode::BAD_REQUEST,
                    "conflicting Content-Length and Transfer-Encoding",
                );
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                r
            } else {
                handle(shared, client, req).await
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%client, error = %e, "proxy client connection ended");
    }
}

/// The service a request names: the absolute-form URI's host, else the `Host` header.
fn route(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(host_of(a.as_str()));
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_of)
}

async fn handle(shared: Arc<Shared>, client: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    if req.method() == http::Method::CONNECT {
        return super::tunnel::connect(shared, req).await;
    }
    let Some(service) = route(&req) else {
        return mesh_error(
            StatusCode::BAD_REQUEST,
            "no Host header and no absolute URI",
        );
    };
    if targets(&shared, &service).is_empty() {
        shared
            .metrics
            .inc("meshnode_http_requests_total", &[&service, "", "404"]);
        return mesh_error(StatusCode::NOT_FOUND, &format!("unknown service {service}"));
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let started = Instant::now();
    let resp = forward(shared, client, service.clone(), req).await;
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
        mesh_error = resp.headers().contains_key(super::MESH_ERROR),
        head_ms = started.elapsed().as_millis() as u64,
        "http request answered"
    );
    resp
}

/// The outcome of one attempt that did not produce the final answer.
enum Attempt {
    /// Nothing reached the far node's target: retry anywhere.
    Unsent(&'static str),
    /// The answer, which may be a retryable 502/503.
    Answer(Response<Body>),
}

async fn forward(
    shared: Arc<Shared>,
    client: SocketAddr,
    service: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let (parts, incoming) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    add_forwarded_for(&mut headers, client.ip());
    let trace_id = ensure_traceparent(&mut headers);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = format!("https://{service}{path}").parse::<Uri>() else {
        return mesh_error(StatusCode::BAD_REQUEST, "malformed request target");
    };
    let body_empty = incoming.is_end_stream();
    let idempotent = is_idempotent(&parts.method);
    let mut incoming = Some(incoming);
    let balancer = shared.balancer(&service);
    let budget = shared.budget(&service);
    budget.record_request(Instant::now());
    let mut tried: Vec<String> = Vec::new();
    for attempt in 0..MAX_ATTEMPTS {
        let all = targets(&shared, &service);
        let picked = pick_endpoint(&balancer, &all, &tried);
        let Some(node) = picked else {
            return finish(
                &shared,
                &service,
                "",
                started,
                mesh_error(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint"),
            );
        };
        let Some(target) = all.iter().find(|t| t.node == node) else {
            break;
        };
        let inflight = balancer.start(&node);
        let last = attempt + 1 == MAX_ATTEMPTS;
        let mut h3req = Request::new(());
        *h3req.method_mut() = parts.method.clone();
        *h3req.uri_mut() = uri.clone();
        *h3req.headers_mut() = headers.clone();
        let outcome = match shared.http.peers.get(&shared, &node, target.addr).await {
            Err(reason) => {
                balancer.mark_down(&node, Instant::now());
                tracing::info!(%service, peer = %node, %reason, "h3 connection failed");
                Attempt::Unsent("unreachable")
            }
            Ok(mut sr) => {
                let t0 = Instant::now();
                match sr.send_request(h3req).await {
                    Err(e) => {
                        balancer.record_failure(&node, Instant::now());
                        tracing::info!(%service, peer = %node, error = %e, "h3 request failed");
                        Attempt::Unsent("stream_error")
                    }
                    Ok(stream) => {
                        let (mut send, mut recv) = stream.split();
                        if body_empty {
                            let _ = send.finish().await;
                        } else if let Some(b) = incoming.take() {
                            tokio::spawn(async move {
                                let _ = body::send_client_body(&mut send, b).await;
                            });
                        }
                        match recv.recv_response().await {
                            Err(e) => {
                                balancer.record_failure(&node, Instant::now());
                                tracing::info!(%service, peer = %node, error = %e, "no response");
                                if body_empty {
                                    Attempt::Unsent("stream_error")
                                } else {
                                    return finish(
                                        &shared,
                                        &service,
                                        &node,
                                        started,
                                        mesh_error(
                                            StatusCode::BAD_GATEWAY,
                                            "peer reset the request",
                                        ),
                                    );
                                }
                            }
                            Ok(head) => {
                                let mesh = head.headers().contains_key(super::MESH_ERROR);
                                let code = head.status();
                                if mesh
                                    && (code == StatusCode::BAD_GATEWAY
                                        || code == StatusCode::SERVICE_UNAVAILABLE
                                        || code == StatusCode::GATEWAY_TIMEOUT)
                                {
                                    balancer.record_failure(&node, Instant::now());
                                } else {
                                    balancer.record_success(&node, t0.elapsed(), Instant::now());
                                }
                                let (mut rparts, ()) = head.into_parts();
                                strip_hop_by_hop(&mut rparts.headers);
                                rparts.version = http::Version::HTTP_11;
                                let rbody =
                                    body::ClientRecvBody::new(recv, None, Some(Box::new(inflight)))
                                        .boxed_unsync();
                                Attempt::Answer(Response::from_parts(rparts, rbody))
                            }
                        }
                    }
                }
            }
        };
        let retry_reason = match &outcome {
            Attempt::Unsent(r) => Some(*r),
            Attempt::Answer(r) => {
                let code = r.status();
                let refused =
                    code == StatusCode::BAD_GATEWAY || code == StatusCode::SERVICE_UNAVAILABLE;
                // The far node says the target never saw the request: any method may go
                // elsewhere, as long as there is no body to replay.
                let unreached = r
                    .headers()
                    .get(super::MESH_ERROR)
                    .is_some_and(|v| v == "node draining" || v == "target refused");
                (refused && body_empty && (idempotent || unreached)).then_some(
                    if code == StatusCode::BAD_GATEWAY {
                        "status_502"
                    } else {
                        "status_503"
                    },
                )
            }
        };
        let retry = retry_reason.is_some() && !last && budget.try_retry(Instant::now());
        if let (true, Some(reason)) = (retry, retry_reason) {
            shared
                .metrics
                .inc("meshnode_retries_total", &[&service, reason]);
            tracing::debug!(%service, peer = %node, %trace_id, attempt, reason, "retrying on another endpoint");
            tried.push(node);
            continue;
        }
        return match outcome {
            Attempt::Answer(r) => finish(&shared, &service, &node, started, r),
            Attempt::Unsent(reason) => finish(
                &shared,
                &service,
                &node,
                started,
                mesh_error(StatusCode::BAD_GATEWAY, &format!("peer {reason}")),
            ),
        };
    }
    finish(
        &shared,
        &service,
        "",
        started,
        mesh_error(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint"),
    )
}

/// Counts the answer in the HTTP metrics and returns it.
fn finish(
    shared: &Shared,
    service: &str,
    peer: &str,
    started: Instant,
    resp: Response<Body>,
) -> Response<Body> {
    let code = resp.status();
    shared.metrics.inc(
        "meshnode_http_requests_total",
        &[service, peer, code.as_str()],
    );
    shared.metrics.observe(
        "meshnode_http_request_duration_seconds",
        &[service, peer],
        started.elapsed().as_secs_f64(),
    );
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
        shared: &Shared,
        node: &str,
        addr: SocketAddr,
    ) -> Result<SendRequest, String> {
        let conn = shared
            .pool
            .connection(node, addr, Alpn::H3)
            .await
            .map_err(|e| e.to_string())?;
        let id = conn.stable_id();
        let slot = lock(&self.slots)
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
        lock(&self.slots).retain(|k, _| keep(k));
    }
}
