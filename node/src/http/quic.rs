//! The callee's h3 connections over quinn, with what h3-quinn does not give: each request
//! stream's "the caller let go" signal ([`CallerGone`]).
//!
//! A gRPC caller cancels a call with RST_STREAM; the caller node then stops its h3 stream
//! (STOP_SENDING on the response). A unary request has long been sent whole by then, so the
//! callee learns of it only from its send half, and h3-quinn hides the quinn stream that
//! would tell (`quinn::SendStream::stopped`). So the request streams are accepted here, from
//! quinn, and each one's `stopped` is kept by stream id for [`Watches::take`]; the server
//! races its target request (and the response body) against it and drops the request to the
//! target when the caller has gone, which resets the target's h2 stream (docs/behaviour.md,
//! gRPC). Unidirectional streams (control, QPACK) stay h3-quinn's.
//!
//! The receive half reads with quinn's cancel-safe `read_chunk`, polled afresh each time, so
//! `stop_sending` is safe whatever read was pending (h3-quinn's panics then, see `http.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;

/// Resolves when the caller has let a request stream go: stopped the response (cancelled),
/// or the connection is lost. Never resolves for a response the caller read to its end.
pub(crate) type CallerGone = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// The [`CallerGone`] of each open request stream of one connection, by stream id.
#[derive(Clone, Default)]
pub(crate) struct Watches(Arc<Mutex<HashMap<u64, CallerGone>>>);

impl Watches {
    fn insert(&self, id: u64, gone: CallerGone) {
        self.lock().insert(id, gone);
    }

    /// The signal of the request stream whose send half is `id` (once); a signal that never
    /// fires if there is none.
    pub(crate) fn take(&self, id: StreamId) -> CallerGone {
        self.lock()
            .remove(&id.into_inner())
            .unwrap_or_else(|| Box::pin(std::future::pending()))
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, CallerGone>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Accepting = Pin<
    Box<
        dyn Future<Output = Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>
            + Send
            + Sync,
    >,
>;

/// One inbound `h3` connection as the h3 server sees it.
pub(crate) struct Connection {
    quic: quinn::Connection,
    /// Unidirectional streams, accepted and opened by h3-quinn.
    uni: h3_quinn::Connection,
    accepting: Option<Accepting>,
    watches: Watches,
}

impl Connection {
    /// `conn`, whose request streams' signals go to `watches`.
    pub(crate) fn new(conn: quinn::Connection, watches: Watches) -> Connection {
        Connection {
            uni: h3_quinn::Connection::new(conn.clone()),
            quic: conn,
            accepting: None,
            watches,
        }
    }
}

impl<B: Buf> quic::Connection<B> for Connection {
    type RecvStream = h3_quinn::RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<B>::poll_accept_recv(&mut self.uni, cx)
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let quic = &self.quic;
        let accepting = self.accepting.get_or_insert_with(|| {
            let conn = quic.clone();
            Box::pin(async move { conn.accept_bi().await })
        });
        let accepted = ready!(accepting.as_mut().poll(cx));
        self.accepting = None;
        let (send, recv) = accepted.map_err(connection_error)?;
        let id = stream_id(send.id())?;
        let stopped = send.stopped();
        self.watches.insert(
            id.into_inner(),
            Box::pin(async move {
                // `Ok(None)`: the response was sent whole and acknowledged; nobody let go.
                if let Ok(None) = stopped.await {
                    std::future::pending::<()>().await;
                }
            }),
        );
        Poll::Ready(Ok(BidiStream {
            send: SendStream {
                stream: send,
                id,
                writing: None,
                watches: self.watches.clone(),
            },
            recv: RecvStream {
                stream: recv,
                // A bidirectional stream's two halves share its id.
                id,
            },
        }))
    }

    fn opener(&self) -> Opener {
        Opener(quic::Connection::<B>::opener(&self.uni))
    }
}

impl<B: Buf> quic::OpenStreams<B> for Connection {
    type BidiStream = BidiStream<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        Poll::Ready(Err(no_requests_from_the_server()))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.uni, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.uni, code, reason)
    }
}

/// Opens the server's unidirectional streams (h3-quinn's).
pub(crate) struct Opener(h3_quinn::OpenStreams);

impl<B: Buf> quic::OpenStreams<B> for Opener {
    type BidiStream = BidiStream<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        Poll::Ready(Err(no_requests_from_the_server()))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.0, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.0, code, reason)
    }
}

/// An HTTP/3 server never opens a request stream.
fn no_requests_from_the_server() -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: ConnectionErrorIncoming::InternalError(
            "the h3 server opens no request streams".to_string(),
        ),
    }
}

/// An accepted request stream.
pub(crate) struct BidiStream<B: Buf> {
    send: SendStream<B>,
    recv: RecvStream,
}

impl<B: Buf> quic::BidiStream<B> for BidiStream<B> {
    type SendStream = SendStream<B>;
    type RecvStream = RecvStream;

    fn split(self) -> (SendStream<B>, RecvStream) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for BidiStream<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for BidiStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

/// The response half of a request stream. Its signal is forgotten when it is dropped.
pub(crate) struct SendStream<B: Buf> {
    stream: quinn::SendStream,
    id: StreamId,
    /// The frame being written (h3 hands over one at a time).
    writing: Option<WriteBuf<B>>,
    watches: Watches,
}

impl<B: Buf> quic::SendStream<B> for SendStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(data) = self.writing.as_mut() {
            while data.has_remaining() {
                let written = ready!(Pin::new(&mut self.stream).poll_write(cx, data.chunk()))
                    .map_err(write_error)?;
                data.advance(written);
            }
        }
        self.writing = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            // h3 waits for `poll_ready` before handing over the next frame.
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "send_data before the previous frame was written".to_string(),
                ),
            });
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        let _ = self
            .stream
            .reset(VarInt::from_u64(reset_code).unwrap_or(VarInt::MAX));
    }

    fn send_id(&self) -> StreamId {
        self.id
    }
}

impl<B: Buf> Drop for SendStream<B> {
    fn drop(&mut self) {
        self.watches.forget(self.id.into_inner());
    }
}

/// The request half of a request stream.
pub(crate) struct RecvStream {
    stream: quinn::RecvStream,
    id: StreamId,
}

impl quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        // Cancel-safe (quinn): a fresh future per poll registers the waker and keeps nothing.
        let read = self.stream.read_chunk(usize::MAX, true);
        let read = std::pin::pin!(read);
        match ready!(read.poll(cx)) {
            Ok(chunk) => Poll::Ready(Ok(chunk.map(|c| c.bytes))),
            Err(e) => Poll::Ready(Err(read_error(e))),
        }
    }

    fn stop_sending(&mut self, error_code: u64) {
        let _ = self
            .stream
            .stop(VarInt::from_u64(error_code).unwrap_or(VarInt::MAX));
    }

    fn recv_id(&self) -> StreamId {
        self.id
    }
}

fn stream_id(id: quinn::StreamId) -> Result<StreamId, ConnectionErrorIncoming> {
    StreamId::try_from(u64::from(id))
        .map_err(|e| ConnectionErrorIncoming::InternalError(format!("stream id: {e}")))
}

fn connection_error(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose {
                error_code: close.error_code.into_inner(),
            }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        e => ConnectionErrorIncoming::Undefined(Arc::new(e)),
    }
}

fn read_error(e: quinn::ReadError) -> StreamErrorIncoming {
    match e {
        quinn::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(e) => StreamErrorIncoming::ConnectionErrorIncoming {
            connection_error: connection_error(e),
        },
        e => StreamErrorIncoming::Unknown(Box::new(e)),
    }
}

fn write_error(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(e) => StreamErrorIncoming::ConnectionErrorIncoming {
            connection_error: connection_error(e),
        },
        e => StreamErrorIncoming::Unknown(Box::new(e)),
    }
}
