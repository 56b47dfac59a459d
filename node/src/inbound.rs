//! Inbound: QUIC connections from peers. `h3` connections go to the h3 server; on
//! `meshnode/1` each stream is a tunnel, checked by the one authoriser (header, service, port,
//! `allow`) before the local target is dialled, then spliced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_proto::{Status, StatusCode, StreamHeader};
use meshnode_transport::tunnel::{self, ReadMessageError};
use meshnode_transport::{Alpn, InboundConnection, MeshEndpoint, PeerPool, StreamLimit};

use crate::drain;
use crate::http::server::H3Server;
use crate::local::LocalServices;
use crate::refusal::{Refusal, RefusalKind};
use crate::telemetry::Telemetry;
use crate::trace::{Caller, Span, Start};

/// A caller must send its whole header within this time; slow headers are refused so they
/// cannot hold streams open.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the inbound side uses.
pub struct Inbound {
    /// Accepts connections.
    pub endpoint: MeshEndpoint,
    /// Follows inbound connections' paths (migrations).
    pub pool: PeerPool,
    /// The hosted services and the authoriser.
    pub local: Arc<LocalServices>,
    /// Metric handles.
    pub telemetry: Arc<Telemetry>,
    /// Drain signal and holds.
    pub drain: drain::Watch,
    /// The h3 server, for `h3` connections.
    pub(crate) h3: Arc<H3Server>,
}

/// Accepts peers' connections until the endpoint closes.
pub async fn accept_loop(inbound: Arc<Inbound>) {
    while let Some(incoming) = inbound.endpoint.accept().await {
        let inbound = inbound.clone();
        tokio::spawn(async move {
            match inbound.endpoint.accept_connection(incoming).await {
                Ok(conn) => serve_connection(inbound, conn).await,
                Err(reason) => {
                    // Logged by transport at a bounded rate (a flood must not flood the log).
                    inbound.telemetry.rejected(RefusalKind::Handshake);
                    tracing::debug!(%reason, "inbound connection refused");
                }
            }
        });
    }
}

async fn serve_connection(inbound: Arc<Inbound>, conn: InboundConnection) {
    let InboundConnection { conn, peer, alpn } = conn;
    // The peer's stream credit starts small and grows as its streams open (an idle
    // connection then costs tens of KiB, not megabytes): every accepted stream holds a permit.
    let limit = StreamLimit::new(&conn, inbound.endpoint.transport());
    inbound.pool.watch_inbound(peer.clone(), alpn, conn.clone());
    if alpn == Alpn::H3 {
        inbound.h3.clone().serve(peer, conn, limit).await;
        return;
    }
    tracing::debug!(%peer, remote = %conn.remote_address(), "peer connected");
    let peer: Arc<str> = peer.into();
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (inbound, peer) = (inbound.clone(), peer.clone());
                let permit = limit.on_accept();
                // For the tunnel's span only (it takes the connection's lock).
                let remote = inbound.telemetry.tracer().map(|_| conn.remote_address());
                tokio::spawn(async move {
                    serve_stream(inbound, peer, remote, send, recv).await;
                    drop(permit);
                });
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

/// Answers a refused stream: counted, status written, the caller's side stopped.
async fn refuse(
    inbound: &Inbound,
    send: &mut meshnode_transport::quinn::SendStream,
    recv: &mut meshnode_transport::quinn::RecvStream,
    refusal: &Refusal,
) {
    inbound.telemetry.rejected(refusal.kind);
    let code = refusal.kind.code();
    let _ = tunnel::write_status(send, &Status::new(code, &refusal.detail)).await;
    let _ = recv.stop(quinn_code(code));
}

async fn serve_stream(
    inbound: Arc<Inbound>,
    peer: Arc<str>,
    remote: Option<std::net::SocketAddr>,
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
                let refusal = Refusal::new(RefusalKind::Malformed, e.to_string());
                refuse(&inbound, &mut send, &mut recv, &refusal).await;
                return;
            }
            Err(_) => {
                let refusal = Refusal::new(RefusalKind::SlowHeader, "header timeout");
                refuse(&inbound, &mut send, &mut recv, &refusal).await;
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
    let mut span = match (inbound.telemetry.tracer(), remote) {
        (Some(tracer), Some(addr)) => {
            let start = Start {
                service,
                traceparent: traceparent.as_deref(),
                port: Some(*port),
                http: None,
            };
            Span::server(Some(tracer), start, Caller { node: &peer, addr })
        }
        _ => Span::OFF,
    };
    // Before the draining check inside, so that a drain beginning now waits for this tunnel.
    let _hold = inbound.drain.hold();
    let result = inbound
        .local
        .authorise_and_connect(&peer, service, *port, *deadline_ms)
        .await;
    let tcp = match result {
        Ok(tcp) => tcp,
        Err(refusal) => {
            span.fail(&refusal);
            let code = refusal.kind.code().as_u16();
            tracing::info!(%peer, %service, code, reason = %refusal, "tunnel refused");
            refuse(&inbound, &mut send, &mut recv, &refusal).await;
            return;
        }
    };
    if tunnel::write_status(&mut send, &Status::open())
        .await
        .is_err()
    {
        return;
    }
    let svc = inbound.telemetry.service(service);
    let _active = svc.active();
    let outcome = tunnel::splice(tcp, send, recv, leftover, &svc.bytes).await;
    span.tunnel_closed(&outcome);
    span.end();
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
