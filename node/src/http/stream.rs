//! The one splice (`meshnode_transport::tunnel::splice_with`) for the HTTP side's tunnels: an
//! `h3` CONNECT stream on the callee, an upgraded proxy connection on the caller; and a
//! `meshnode/1` tunnel as a byte stream for the WebSocket handshake ([`TunnelIo`]).
//!
//! h3-quinn panics if `stop_sending` is called on a receive stream whose pending `recv_data`
//! was cancelled, and the splice cancels the other direction when one is reset: [`H3Recv`]
//! remembers an unfinished read and then leaves the stream alone.

use bytes::{Buf, Bytes};
use h3::error::Code;
use hyper_util::rt::TokioIo;
use meshnode_transport::tunnel::{LocalSide, MeshRecv, MeshSend, SpliceEnd};

use super::body::{ServerRecv, ServerSend};

/// The sending half of an `h3` request stream, as a splice's mesh side.
pub(crate) struct H3Send(pub ServerSend);

impl MeshSend for H3Send {
    async fn send_chunk(&mut self, chunk: Bytes) -> Result<(), SpliceEnd> {
        // Each DATA frame is copied once by h3: the splice's large reads make few of them.
        self.0
            .send_data(chunk)
            .await
            .map_err(|_| SpliceEnd::PeerReset)
    }

    async fn finish(&mut self) -> Result<(), SpliceEnd> {
        self.0
            .finish()
            .await
            .map_err(|e| SpliceEnd::Error(e.to_string()))
    }

    fn reset(&mut self) {
        self.0.stop_stream(Code::H3_REQUEST_CANCELLED);
    }
}

/// The receiving half of an `h3` request stream, as a splice's mesh side.
pub(crate) struct H3Recv {
    stream: ServerRecv,
    /// A `recv_data` began and has not completed (it may have been cancelled).
    reading: bool,
}

impl H3Recv {
    pub(crate) fn new(stream: ServerRecv) -> H3Recv {
        H3Recv {
            stream,
            reading: false,
        }
    }
}

impl MeshRecv for H3Recv {
    async fn recv_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, SpliceEnd> {
        self.reading = true;
        let got = self.stream.recv_data().await;
        self.reading = false;
        match got {
            Ok(Some(mut buf)) => {
                if let Some(slot) = bufs.first_mut() {
                    *slot = buf.copy_to_bytes(buf.remaining());
                }
                Ok(Some(1))
            }
            Ok(None) => Ok(None),
            Err(_) => Err(SpliceEnd::PeerReset),
        }
    }

    fn stop(&mut self) {
        if !self.reading {
            self.stream.stop_sending(Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// An upgraded client connection (the proxy's CONNECT), as a splice's local side.
pub(crate) struct Upgraded(pub TokioIo<hyper::upgrade::Upgraded>);

impl LocalSide for Upgraded {
    type Read<'a> = tokio::io::ReadHalf<&'a mut TokioIo<hyper::upgrade::Upgraded>>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut TokioIo<hyper::upgrade::Upgraded>>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(&mut self.0)
    }
}

/// A `meshnode/1` tunnel as one byte stream, for an HTTP/1.1 client speaking over it (the
/// WebSocket handshake): the bytes that came with the tunnel's status first, then the stream.
/// After the handshake it is taken apart again ([`TunnelIo::into_parts`]) for the splice.
pub(crate) struct TunnelIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    leftover: Bytes,
}

impl TunnelIo {
    pub(crate) fn new(t: meshnode_transport::tunnel::OpenTunnel) -> TunnelIo {
        TunnelIo {
            send: t.send,
            recv: t.recv,
            leftover: t.leftover,
        }
    }

    /// The streams, and what arrived from the far side but was not read yet.
    pub(crate) fn into_parts(self) -> (quinn::SendStream, quinn::RecvStream, Bytes) {
        (self.send, self.recv, self.leftover)
    }
}

impl tokio::io::AsyncRead for TunnelIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.leftover.is_empty() {
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.recv).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TunnelIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.get_mut().send), cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.get_mut().send), cx)
    }
}
