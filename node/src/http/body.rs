//! Streaming bodies: HTTP/3 data frames as hyper bodies (read in place as hyper polls), and
//! hyper bodies to HTTP/3 data frames. A stream is stopped only between reads (see the module
//! notes in `http.rs`).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::Code;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every request and response the proxy builds.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Server side (callee) halves of an h3 request stream.
pub(crate) type ServerSend = h3::server::RequestStream<super::quic::SendStream<Bytes>, Bytes>;
/// Server side receive half.
pub(crate) type ServerRecv = h3::server::RequestStream<super::quic::RecvStream, Bytes>;
/// Client side (caller) send half.
pub(crate) type ClientSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
/// Client side receive half.
pub(crate) type ClientRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

/// A body holding `bytes`.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// Most data merged into one frame from what has already arrived on an h3 stream (one h2 frame
/// is 16 KiB by default; a few of them per batch).
const COALESCE: usize = 64 * 1024;

/// Something held until an h3 body has been read to its end (or given up): the balancer's
/// in-flight count of the endpoint, for a response body.
pub(crate) type Guard = Box<dyn Send>;

macro_rules! h3_recv_body {
    ($name:ident, $recv:ty) => {
        /// The data frames (then trailers) of an h3 request stream as a hyper body, read in
        /// place when hyper polls it: no task and no channel per request. `first` goes ahead
        /// of the stream's frames.
        ///
        /// After each data frame the body looks ahead once, so a stream whose end came with
        /// its data is finished at once (hyper stops polling a body once it has its
        /// `Content-Length`). A body dropped before its stream ended (its reader went away:
        /// a client's RST_STREAM, a target that answered early) stops the stream at once, so
        /// the far side learns of it whether or not it has more to send: with
        /// `H3_REQUEST_CANCELLED` when no read is pending, else by dropping the stream (quinn
        /// then stops it with code 0), since h3-quinn panics when a stream with a pending
        /// read is stopped (see the module notes in `http.rs`).
        pub(crate) struct $name {
            recv: Option<$recv>,
            /// Frames already read, returned before the stream is polled again.
            queued: Option<Result<Frame<Bytes>, BoxError>>,
            /// The data frames have ended; trailers (if any) are next.
            data_done: bool,
            /// The last poll of the stream was pending: a read may be under way inside it.
            reading: bool,
            guard: Option<Guard>,
        }

        impl $name {
            pub(crate) fn new(recv: $recv, first: Option<Bytes>, guard: Option<Guard>) -> Self {
                $name {
                    recv: Some(recv),
                    queued: first.map(|b| Ok(Frame::data(b))),
                    data_done: false,
                    reading: false,
                    guard,
                }
            }

            /// The stream has been read to its end (or failed): let it and the guard go.
            fn end(&mut self) {
                self.recv = None;
                self.guard = None;
            }

            /// Polls the stream for its next frame.
            fn poll_stream(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                let Some(recv) = self.recv.as_mut() else {
                    return Poll::Ready(None);
                };
                if !self.data_done {
                    let polled = recv.poll_recv_data(cx);
                    self.reading = polled.is_pending();
                    match ready!(polled) {
                        Ok(Some(mut buf)) => {
                            let b = buf.copy_to_bytes(buf.remaining());
                            return Poll::Ready(Some(Ok(Frame::data(b))));
                        }
                        Ok(None) => self.data_done = true,
                        Err(e) => {
                            self.end();
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    }
                }
                let polled = recv.poll_recv_trailers(cx);
                self.reading = polled.is_pending();
                let trailers = ready!(polled);
                self.end();
                match trailers {
                    Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    _ => Poll::Ready(None),
                }
            }
        }

        impl hyper::body::Body for $name {
            type Data = Bytes;
            type Error = BoxError;

            fn poll_frame(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                let this = self.get_mut();
                if let Some(f) = this.queued.take() {
                    return Poll::Ready(Some(f));
                }
                let first = match ready!(this.poll_stream(cx)) {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => d,
                        Err(f) => return Poll::Ready(Some(Ok(f))),
                    },
                    other => return Poll::Ready(other),
                };
                // Look ahead: the end, or more data, is often there already. QUIC hands a
                // stream over as each packet carried it (about 1.2 KiB); data already here is
                // merged, up to COALESCE bytes, so the next hop writes one frame (and the
                // proxy makes one pass) per batch instead of one per packet.
                let mut merged: Option<bytes::BytesMut> = None;
                while merged.as_ref().map_or(first.len(), |m| m.len()) < COALESCE {
                    let Poll::Ready(Some(next)) = this.poll_stream(cx) else {
                        break;
                    };
                    match next.map(|f| f.into_data()) {
                        Ok(Ok(d)) => merged
                            .get_or_insert_with(|| bytes::BytesMut::from(&first[..]))
                            .extend_from_slice(&d),
                        Ok(Err(f)) => {
                            this.queued = Some(Ok(f));
                            break;
                        }
                        Err(e) => {
                            this.queued = Some(Err(e));
                            break;
                        }
                    }
                }
                let data = merged.map_or(first, |m| m.freeze());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }

            fn is_end_stream(&self) -> bool {
                self.recv.is_none() && self.queued.is_none()
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                let Some(mut recv) = self.recv.take() else {
                    return;
                };
                if !self.reading {
                    recv.stop_sending(Code::H3_REQUEST_CANCELLED);
                }
                // Else dropped with a read pending: quinn stops the stream itself.
            }
        }
    };
}

h3_recv_body!(ServerRecvBody, ServerRecv);
h3_recv_body!(ClientRecvBody, ClientRecv);

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

/// A body that holds `guard` until it is dropped: the endpoint's in-flight count while a
/// response streams from a target reached over a tunnel (the WebSocket handshake's non-101
/// answers).
pub(crate) struct Guarded {
    body: Body,
    _guard: Guard,
}

impl Guarded {
    /// `body`, holding `guard` until it is dropped.
    pub(crate) fn boxed(body: Body, guard: Guard) -> Body {
        Guarded {
            body,
            _guard: guard,
        }
        .boxed_unsync()
    }
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
