//! Callee side of standard CONNECT (RFC 9114 §4.4): `:authority` = `service:port` opens a
//! TCP connection to the service's target, answered 200, then bytes both ways. A FIN on
//! either side is passed on as a FIN; a TCP reset resets the stream.

use std::sync::Arc;

use bytes::BytesMut;
use h3::error::Code;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::{ServerRecv, ServerSend};
use super::server::respond_error;
use crate::node::Shared;

/// Largest DATA frame sent: each frame is copied once by h3, so few large ones are best.
const FRAME: usize = 64 * 1024;

/// Serves one CONNECT request from `peer`.
pub(crate) async fn serve(
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
