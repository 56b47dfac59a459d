//! Caller side of `CONNECT service:port` on the local proxy: an L4 tunnel over `meshnode/1`
//! opened by the dispatch engine's L4 adapter, as for `[[outbound]]` listeners, to one of the
//! endpoints that advertise that port, then the upgraded client connection is spliced with it.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{self, Body};
use super::headers::host_of;
use super::mesh_error;
use super::stream::Upgraded;

use crate::drain;
use crate::outbound::{AttemptError, NoTunnel, Opened, Outbound};
use crate::trace::TunnelTrace;
use meshnode_transport::tunnel::{splice_with, OpenError, OpenTunnel};

/// Answers a CONNECT request: 200 once a tunnel is open, else a mesh error.
pub(crate) async fn connect(
    outbound: &std::sync::Arc<Outbound>,
    drain: drain::Watch,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let Some((service, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((host_of(a.host()), a.port_u16()?)))
    else {
        return mesh_error(StatusCode::BAD_REQUEST, "CONNECT needs service:port");
    };
    if outbound.routing.targets(&service, None).is_empty() {
        return mesh_error(StatusCode::NOT_FOUND, &format!("unknown service {service}"));
    }
    // Only endpoints that advertise the port are candidates (docs/behaviour.md, CONNECT).
    if outbound.routing.targets(&service, Some(port)).is_empty() {
        return mesh_error(
            StatusCode::NOT_FOUND,
            &format!("service {service} does not advertise port {port}"),
        );
    }
    let svc = outbound.telemetry.service(&service);
    let mut trace = TunnelTrace::start(outbound.telemetry.tracer(), &service, Some(port));
    // CONNECT names the port: the tunnel asks for it, and the far node checks it.
    match outbound.open(&svc, Some(port), &mut trace).await {
        Ok(Opened {
            tunnel: t,
            inflight,
            ..
        }) => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let _hold = drain.hold();
                let _active = svc.active();
                let mut io = Upgraded(TokioIo::new(upgraded));
                let OpenTunnel {
                    mut send,
                    mut recv,
                    leftover,
                } = t;
                let outcome =
                    splice_with(&mut io, &mut send, &mut recv, leftover, &svc.bytes).await;
                drop(inflight);
                trace.span.tunnel_closed(&outcome);
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
                NoTunnel::Failed(e) => open_failure_status(e),
            };
            trace.span.fail(&failure);
            mesh_error(code, &failure.to_string())
        }
    }
}

/// The status a proxy client gets when the last tunnel open failed: the far node's own
/// refusal, else 502 (504 for a timeout).
pub(super) fn open_failure_status(e: &AttemptError) -> StatusCode {
    match e {
        AttemptError::Connect(_) => StatusCode::BAD_GATEWAY,
        AttemptError::Open(OpenError::Refused(s)) => {
            StatusCode::from_u16(s.code.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY)
        }
        AttemptError::Open(OpenError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
        AttemptError::Open(_) => StatusCode::BAD_GATEWAY,
    }
}
