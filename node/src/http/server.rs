//! Callee side: the h3 server on inbound `h3` connections. Each request names a local
//! service by `:authority`; it is checked (known, `allow`, not draining) and forwarded to the
//! service's target over pooled HTTP/1.1, the body streaming both ways. CONNECT requests are
//! served here too (RFC 9114 §4.4): `:authority` = `service:port` opens a TCP connection to
//! the service's target, answered 200, then bytes both ways; a FIN on either side is passed
//! on as a FIN, a TCP reset resets the stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use h3::error::Code;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::{self, Body, ServerRecv, ServerSend};
use super::headers::{host_of, strip_hop_by_hop};
use super::{mesh_error, MAX_HEADER_BYTES};
use crate::config::ServiceConfig;
use crate::node::Shared;

/// Serves HTTP/3 requests on one inbound connection until it closes. `peer` is the caller's
/// node name, taken from its certificate.
pub(crate) async fn serve(shared: Arc<Shared>, peer: String, conn: quinn::Connection) {
    let built = h3::server::builder()
        .max_field_section_size(MAX_HEADER_BYTES as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
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
                tokio::spawn(async move {
                    match resolver.resolve_request().await {
                        Ok((req, stream)) => {
                            let (send, recv) = stream.split();
                            handle(shared, peer, req, send, recv).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "bad h3 request"),
                    }
                });
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

/// Checks that `service` is hosted here, callable by `peer`, and that the node takes work.
pub(crate) fn authorise(
    shared: &Shared,
    peer: &str,
    service: &str,
) -> Result<ServiceConfig, (StatusCode, String)> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "node draining".into()));
    }
    let local = shared.local_services();
    let Some(svc) = local.get(service) else {
        return Err((StatusCode::NOT_FOUND, "unknown service".into()));
    };
    if let Some(allow) = &svc.allow {
        if !allow.iter().any(|a| a == peer) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("node {peer} may not call {service}"),
            ));
        }
    }
    Ok(svc.clone())
}

async fn handle(
    shared: Arc<Shared>,
    peer: String,
    req: Request<()>,
    mut send: ServerSend,
    mut recv: ServerRecv,
) {
    if req.method() == Method::CONNECT {
        serve_connect(shared, peer, req, send, recv).await;
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
    // Before the draining check inside, so that a drain beginning now waits for this request.
    let _hold = shared.hold();
    let svc = match authorise(&shared, &peer, &service) {
        Ok(s) => s,
        Err((code, reason)) => {
            shared
                .metrics
                .inc("meshnode_inbound_rejected_total", &[code.as_str()]);
            respond_error(&mut send, code, &reason).await;
            return;
        }
    };
    let _active = shared.track(&service);
    let (parts, ()) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: Uri = match format!("http://{}{path}", svc.target).parse() {
        Ok(u) => u,
        Err(_) => {
            respond_error(&mut send, StatusCode::BAD_REQUEST, "malformed path").await;
            return;
        }
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
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
        Some(_) => body::ServerRecvBody::new(recv, None, None).boxed_unsync(),
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
    let timeout = svc.request_timeout();
    let answer = tokio::time::timeout(timeout, shared.http.targets.request(out)).await;
    let resp = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let reason = if e.is_connect() {
                "target refused"
            } else {
                "target reset"
            };
            tracing::info!(%peer, %service, error = %e, "target failed");
            respond_error(&mut send, StatusCode::BAD_GATEWAY, reason).await;
            return;
        }
        Err(_) => {
            tracing::info!(%peer, %service, timeout_ms = timeout.as_millis() as u64, "target timed out");
            respond_error(&mut send, StatusCode::GATEWAY_TIMEOUT, "target timed out").await;
            return;
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let head = Response::from_parts(parts, ());
    if send.send_response(head).await.is_err() {
        return;
    }
    let _ = body::send_server_body(&mut send, body).await;
}

/// Largest DATA frame sent: each frame is copied once by h3, so few large ones are best.
const FRAME: usize = 64 * 1024;

/// Serves one CONNECT request from `peer`.
async fn serve_connect(
    shared: Arc<Shared>,
    peer: String,
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
    // Before the draining check inside, so that a drain beginning now waits for this tunnel.
    let _hold = shared.hold();
    let tcp = match crate::inbound::authorise_and_connect(&shared, &peer, &service, port, None)
        .await
    {
        Ok(t) => t,
        Err((code, reason, counted_as)) => {
            shared
                .metrics
                .inc("meshnode_inbound_rejected_total", &[counted_as]);
            let code =
                StatusCode::from_u16(code.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = match code {
                StatusCode::NOT_FOUND => "unknown service",
                StatusCode::BAD_GATEWAY => "target refused",
                StatusCode::GATEWAY_TIMEOUT => "target timed out",
                _ => reason.as_str(),
            };
            tracing::info!(%peer, %service, port, code = code.as_u16(), %reason, "CONNECT refused");
            respond_error(&mut send, code, reason).await;
            return;
        }
    };
    let ok = Response::builder().status(StatusCode::OK).body(());
    let Ok(ok) = ok else { return };
    if send.send_response(ok).await.is_err() {
        return;
    }
    let _active = shared.track(&service);
    splice(tcp, send, recv).await;
}

/// Copies between the request stream and `tcp` until both directions end.
async fn splice(tcp: TcpStream, mut send: ServerSend, mut recv: ServerRecv) {
    let _ = tcp.set_nodelay(true);
    let (mut tr, mut tw) = tcp.into_split();
    let to_target = async move {
        loop {
            // Never cancelled: the loop ends only when a read has completed.
            match recv.recv_data().await {
                Ok(Some(mut buf)) => {
                    if tw.write_all_buf(&mut buf).await.is_err() {
                        recv.stop_sending(Code::H3_REQUEST_CANCELLED);
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tw.shutdown().await;
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let from_target = async move {
        let mut buf = BytesMut::with_capacity(FRAME);
        loop {
            buf.reserve(FRAME);
            match tr.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish().await;
                    return;
                }
                Ok(_) => {
                    if send.send_data(buf.split().freeze()).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    send.stop_stream(Code::H3_REQUEST_CANCELLED);
                    return;
                }
            }
        }
    };
    tokio::join!(to_target, from_target);
}
