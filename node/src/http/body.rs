//! Streaming bodies: HTTP/3 data frames to hyper bodies through a bounded channel, and hyper
//! bodies to HTTP/3 data frames. Every `recv_data` runs to completion (see the module notes
//! in `http.rs`): a pump stops only between reads.

use bytes::{Buf, Bytes};
use futures_util::stream;
use h3::error::Code;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every request and response the proxy builds.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Server side (callee) halves of an h3 request stream.
pub(crate) type ServerSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
/// Server side receive half.
pub(crate) type ServerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
/// Client side (caller) send half.
pub(crate) type ClientSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
/// Client side receive half.
pub(crate) type ClientRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

/// Frames in flight between a pump and its body: with ≤ 64 KiB frames, about 256 KiB.
const CHANNEL_FRAMES: usize = 4;

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// A body holding `bytes`.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// A body fed by the returned sender.
pub(crate) fn channel() -> (FrameTx, Body) {
    let (tx, mut rx) = mpsc::channel(CHANNEL_FRAMES);
    let s = stream::poll_fn(move |cx| rx.poll_recv(cx));
    (tx, StreamBody::new(s).boxed_unsync())
}

macro_rules! pump_h3_to_channel {
    ($name:ident, $recv:ty) => {
        /// Moves the data frames (then trailers) of `recv` into `tx`, `first` ahead of them.
        /// When the body's reader goes away the stream is stopped, between reads.
        pub(crate) async fn $name(mut recv: $recv, first: Option<Bytes>, tx: FrameTx) {
            if let Some(b) = first {
                if tx.send(Ok(Frame::data(b))).await.is_err() {
                    recv.stop_sending(Code::H3_REQUEST_CANCELLED);
                    return;
                }
            }
            loop {
                match recv.recv_data().await {
                    Ok(Some(mut buf)) => {
                        let b = buf.copy_to_bytes(buf.remaining());
                        if tx.send(Ok(Frame::data(b))).await.is_err() {
                            recv.stop_sending(Code::H3_REQUEST_CANCELLED);
                            return;
                        }
                    }
                    Ok(None) => {
                        if let Ok(Some(t)) = recv.recv_trailers().await {
                            let _ = tx.send(Ok(Frame::trailers(t))).await;
                        }
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Box::new(e))).await;
                        return;
                    }
                }
            }
        }
    };
}

pump_h3_to_channel!(pump_server_recv, ServerRecv);
pump_h3_to_channel!(pump_client_recv, ClientRecv);

/// How sending a body onto an h3 stream ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendOutcome {
    /// Every frame sent and the stream finished.
    Finished,
    /// The body failed (its client went away): the stream was reset.
    BodyFailed,
    /// The peer stopped or reset the stream.
    PeerGone,
}

macro_rules! send_body_to_h3 {
    ($name:ident, $send:ty) => {
        /// Streams `body` onto `send` (data, then trailers) and finishes it. A failing body
        /// resets the stream, so the far side never mistakes a cut body for a whole one.
        pub(crate) async fn $name<B>(send: &mut $send, mut body: B) -> SendOutcome
        where
            B: hyper::body::Body<Data = Bytes> + Unpin,
        {
            while let Some(frame) = body.frame().await {
                let frame = match frame {
                    Ok(f) => f,
                    Err(_) => {
                        send.stop_stream(Code::H3_REQUEST_CANCELLED);
                        return SendOutcome::BodyFailed;
                    }
                };
                let sent = match frame.into_data() {
                    Ok(d) if d.is_empty() => Ok(()),
                    Ok(d) => send.send_data(d).await,
                    Err(f) => match f.into_trailers() {
                        Ok(t) => send.send_trailers(t).await,
                        Err(_) => Ok(()),
                    },
                };
                if sent.is_err() {
                    return SendOutcome::PeerGone;
                }
            }
            match send.finish().await {
                Ok(()) => SendOutcome::Finished,
                Err(_) => SendOutcome::PeerGone,
            }
        }
    };
}

send_body_to_h3!(send_server_body, ServerSend);
send_body_to_h3!(send_client_body, ClientSend);
