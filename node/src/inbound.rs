//! Inbound: QUIC connections from peers, one stream per tunnel, each checked (header,
//! service, port, `allow`) before the local target is dialled.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_proto::{Status, StatusCode, StreamHeader};
use meshnode_transport::tunnel::{self, ReadMessageError};
use meshnode_transport::{Alpn, InboundConnection};
use tokio::net::TcpStream;

use crate::node::Shared;

/// A caller must send its whole header within this time; slow headers are refused so they
/// cannot hold streams open.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for connecting to the local target when the caller sent none.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts peers' connections until the endpoint closes.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            match shared.endpoint.accept_connection(incoming).await {
                Ok(conn) => serve_connection(shared, conn).await,
                Err(reason) => {
                    shared
                        .metrics
                        .inc("meshnode_inbound_rejected_total", &["handshake"]);
                    tracing::info!(%reason, "inbound connection refused");
                }
            }
        });
    }
}

async fn serve_connection(shared: Arc<Shared>, inbound: InboundConnection) {
    let InboundConnection { conn, peer, alpn } = inbound;
    if alpn == Alpn::H3 {
        crate::http::server::serve(shared, peer, conn).await;
        return;
    }
    tracing::debug!(%peer, remote = %conn.remote_address(), "peer connected");
    tokio::spawn(crate::migrate::follow_peer_address(
        shared.clone(),
        peer.clone(),
        conn.clone(),
    ));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let shared = shared.clone();
                let peer = peer.clone();
                tokio::spawn(async move { serve_stream(shared, peer, send, recv).await });
            }
            Err(e) => {
                tracing::debug!(%peer, reason = %e, "peer connection ended");
                return;
            }
        }
    }
}

fn quinn_code(code: StatusCode) -> meshnode_transport::quinn::VarInt {
    meshnode_transport::quinn::VarInt::from_u32(u32::from(code.as_u16()))
}

async fn refuse(
    shared: &Shared,
    send: &mut meshnode_transport::quinn::SendStream,
    code: StatusCode,
    reason: &str,
    counted_as: &str,
) {
    shared
        .metrics
        .inc("meshnode_inbound_rejected_total", &[counted_as]);
    let _ = tunnel::write_status(send, &Status::new(code, reason)).await;
}

async fn serve_stream(
    shared: Arc<Shared>,
    peer: String,
    mut send: meshnode_transport::quinn::SendStream,
    mut recv: meshnode_transport::quinn::RecvStream,
) {
    let (header, leftover) =
        match tokio::time::timeout(HEADER_TIMEOUT, tunnel::read_header(&mut recv)).await {
            Ok(Ok(h)) => h,
            Ok(Err(ReadMessageError::Closed(reason))) => {
                tracing::debug!(%peer, %reason, "stream closed before its header");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "malformed tunnel header");
                refuse(
                    &shared,
                    &mut send,
                    StatusCode::BadRequest,
                    &e.to_string(),
                    "malformed",
                )
                .await;
                let _ = recv.stop(quinn_code(StatusCode::BadRequest));
                return;
            }
            Err(_) => {
                refuse(
                    &shared,
                    &mut send,
                    StatusCode::BadRequest,
                    "header timeout",
                    "slow_header",
                )
                .await;
                let _ = recv.stop(quinn_code(StatusCode::BadRequest));
                return;
            }
        };
    let StreamHeader {
        service,
        port,
        deadline_ms,
        traceparent,
    } = &header;
    // The trace id of the caller's W3C traceparent, for the access log.
    let trace_id = traceparent
        .as_deref()
        .and_then(|t| t.split('-').nth(1))
        .unwrap_or("");
    let started = Instant::now();
    // Before the draining check inside, so that a drain beginning now waits for this tunnel.
    let _hold = shared.hold();
    let result = authorise_and_connect(&shared, &peer, service, *port, *deadline_ms).await;
    let tcp = match result {
        Ok(tcp) => tcp,
        Err((code, reason, counted_as)) => {
            tracing::info!(%peer, %service, code = code.as_u16(), %reason, "tunnel refused");
            refuse(&shared, &mut send, code, &reason, counted_as).await;
            let _ = recv.stop(quinn_code(code));
            return;
        }
    };
    if tunnel::write_status(&mut send, &Status::open())
        .await
        .is_err()
    {
        return;
    }
    let _active = shared.track(service);
    let counters = shared.bytes(service);
    let outcome = tunnel::splice(tcp, send, recv, leftover, &counters).await;
    tracing::info!(
        target: "meshnode::access",
        direction = "inbound",
        %peer,
        %service,
        %trace_id,
        to_peer = outcome.to_peer,
        from_peer = outcome.from_peer,
        clean = outcome.is_clean(),
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
}

/// A refused tunnel: status, reason, and the `meshnode_inbound_rejected_total` label.
pub(crate) type Refusal = (StatusCode, String, &'static str);

/// Checks a tunnel request (draining, service, port, `allow`) and connects to the target.
pub(crate) async fn authorise_and_connect(
    shared: &Shared,
    peer: &str,
    service: &str,
    port: u16,
    deadline_ms: Option<u32>,
) -> Result<TcpStream, Refusal> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err((StatusCode::Unavailable, "node draining".into(), "draining"));
    }
    let local = shared.local_services();
    let Some(svc) = local.get(service) else {
        return Err((
            StatusCode::NotFound,
            format!("service {service} is not hosted on {}", shared.name),
            "unknown_service",
        ));
    };
    if svc.port() != port {
        return Err((
            StatusCode::NotFound,
            format!("service {service} does not advertise port {port}"),
            "unknown_port",
        ));
    }
    if let Some(allow) = &svc.allow {
        if !allow.iter().any(|a| a == peer) {
            return Err((
                StatusCode::Forbidden,
                format!("node {peer} may not call {service}"),
                "forbidden",
            ));
        }
    }
    let timeout = deadline_ms
        .map(|ms| Duration::from_millis(u64::from(ms)))
        .unwrap_or(TARGET_CONNECT_TIMEOUT)
        .min(TARGET_CONNECT_TIMEOUT);
    match tokio::time::timeout(timeout, TcpStream::connect(svc.target)).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) => Err((
            StatusCode::BadGateway,
            format!("target {} refused: {e}", svc.target),
            "target_refused",
        )),
        Err(_) => Err((
            StatusCode::GatewayTimeout,
            format!(
                "target {} did not answer within {} ms",
                svc.target,
                timeout.as_millis()
            ),
            "target_timeout",
        )),
    }
}
