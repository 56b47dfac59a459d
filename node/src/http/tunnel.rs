//! Caller side of `CONNECT service:port` on the local proxy: an L4 tunnel over `meshnode/1`
//! to an endpoint chosen and retried as for `[[outbound]]` listeners, then the upgraded
//! client connection is spliced with it.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::body::{self, Body};
use super::headers::host_of;
use super::mesh_error;

use crate::node::Shared;
use crate::outbound::{open_with_retries, targets, AttemptError, NoTunnel, Opened};
use meshnode_transport::tunnel::OpenError;

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
    let trace_id = format!("{:032x}", rand::random::<u128>());
    // CONNECT names the port: the tunnel asks for it, and the far node checks it.
    match open_with_retries(&shared, &service, Some(port), &trace_id).await {
        Ok(Opened {
            tunnel: t,
            inflight,
            ..
        }) => {
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
            ok
        }
        Err(failure) => {
            let code = match &failure {
                NoTunnel::NoEndpoint { .. } | NoTunnel::BudgetExhausted => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                NoTunnel::Failed(AttemptError::Connect(_)) => StatusCode::BAD_GATEWAY,
                NoTunnel::Failed(AttemptError::Open(OpenError::Refused(s))) => {
                    StatusCode::from_u16(s.code.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                NoTunnel::Failed(AttemptError::Open(OpenError::Timeout(_))) => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                NoTunnel::Failed(AttemptError::Open(_)) => StatusCode::BAD_GATEWAY,
            };
            mesh_error(code, &failure.to_string())
        }
    }
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
