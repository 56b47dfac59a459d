//! Caller side of `CONNECT service:port` on the local proxy: an L4 tunnel over `meshnode/1`
//! to an endpoint chosen and retried as for `[[outbound]]` listeners, then the upgraded
//! client connection is spliced with it.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::body::{self, Body};
use super::headers::host_of;
use super::mesh_error;

use crate::node::Shared;
use crate::outbound::{
    open, open_deadline, open_result, pick_endpoint, targets, AttemptError, MAX_ATTEMPTS,
};

/// Answers a CONNECT request: 200 once a tunnel is open, else a mesh error.
pub(crate) async fn connect(shared: Arc<Shared>, mut req: Request<Incoming>) -> Response<Body> {
    let Some((service, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((host_of(a.host()), a.port_u16()?)))
    else {
        return mesh_error(StatusCode::BAD_REQUEST, "CONNECT needs service:port");
    };
    if targets(&shared, &service).is_empty() {
        return mesh_error(StatusCode::NOT_FOUND, &format!("unknown service {service}"));
    }
    let balancer = shared.balancer(&service);
    let budget = shared.budget(&service);
    budget.record_request(Instant::now());
    let trace_id = format!("{:032x}", rand::random::<u128>());
    let mut tried: Vec<String> = Vec::new();
    let mut last = (
        StatusCode::SERVICE_UNAVAILABLE,
        "no healthy endpoint".to_string(),
    );
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 && !budget.try_retry(Instant::now()) {
            break;
        }
        let mut all = targets(&shared, &service);
        // CONNECT names the port: the tunnel asks for it, and the far node checks it.
        for t in &mut all {
            t.port = port;
        }
        let picked = pick_endpoint(&balancer, &all, &tried);
        let Some(node) = picked else { break };
        let Some(target) = all.iter().find(|t| t.node == node) else {
            break;
        };
        let inflight = balancer.start(&node);
        let mut open_started = Instant::now();
        let traceparent = format!("00-{trace_id}-{:016x}-01", rand::random::<u64>());
        let deadline = open_deadline(
            balancer.snapshot(&node, Instant::now()).ewma_ms,
            shared.open_timeout,
        );
        match open(
            &shared,
            &service,
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
                    .inc("meshnode_tunnels_opened_total", &[&service, &node, "ok"]);
                let upgrade = hyper::upgrade::on(&mut req);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let _active = shared.track(&service);
                    splice(TokioIo::new(upgraded), t).await;
                    drop(inflight);
                });
                let mut ok = Response::new(body::empty());
                *ok.status_mut() = StatusCode::OK;
                return ok;
            }
            Err(e) => {
                drop(inflight);
                let (result, retry, status) = match &e {
                    AttemptError::Connect(r) => {
                        balancer.mark_down(&node, Instant::now());
                        (
                            "unreachable",
                            true,
                            (StatusCode::BAD_GATEWAY, format!("peer unreachable: {r}")),
                        )
                    }
                    AttemptError::Open(o) => {
                        if o.is_retryable() {
                            balancer.record_failure(&node, Instant::now());
                        } else {
                            balancer.record_success(&node, open_started.elapsed(), Instant::now());
                        }
                        let code = match o {
                            meshnode_transport::tunnel::OpenError::Refused(s) => {
                                StatusCode::from_u16(s.code.as_u16())
                                    .unwrap_or(StatusCode::BAD_GATEWAY)
                            }
                            meshnode_transport::tunnel::OpenError::Timeout(_) => {
                                StatusCode::GATEWAY_TIMEOUT
                            }
                            _ => StatusCode::BAD_GATEWAY,
                        };
                        (open_result(o), o.is_retryable(), (code, o.to_string()))
                    }
                };
                shared
                    .metrics
                    .inc("meshnode_tunnels_opened_total", &[&service, &node, result]);
                last = status;
                if !retry {
                    break;
                }
                shared
                    .metrics
                    .inc("meshnode_retries_total", &[&service, result]);
                tried.push(node);
            }
        }
    }
    mesh_error(last.0, &last.1)
}

/// Copies between the upgraded client connection and the tunnel until both directions end.
async fn splice(io: TokioIo<hyper::upgrade::Upgraded>, t: meshnode_transport::tunnel::OpenTunnel) {
    let meshnode_transport::tunnel::OpenTunnel {
        mut send,
        mut recv,
        leftover,
    } = t;
    let (mut r, mut w) = tokio::io::split(io);
    let up = async move {
        if tokio::io::copy(&mut r, &mut send).await.is_ok() {
            let _ = send.finish();
        } else {
            let _ = send.reset(meshnode_transport::quinn::VarInt::from_u32(
                meshnode_transport::tunnel::CODE_TCP_RESET,
            ));
        }
    };
    let down = async move {
        if !leftover.is_empty() && w.write_all(&leftover).await.is_err() {
            return;
        }
        let _ = tokio::io::copy(&mut recv, &mut w).await;
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
}
