//! A connection whose first bytes were read to decide how to serve it, handed on with those
//! bytes in front again: HTTP is served over it, and a tunnel sends them to the peer first.
//! Until then they are only held, so a tunnel's retries still replay nothing.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use meshnode_transport::tunnel::LocalSide;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// `inner`, read as `prefix` followed by what `inner` yields.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `inner` with `prefix` (bytes already read from it) put back in front.
    pub fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Whether bytes read before are still held in front.
    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The local side of a tunnel: the held bytes go to the peer before anything read later.
impl LocalSide for Prefixed<TcpStream> {
    type Read<'a> = Prefixed<ReadHalf<'a>>;
    type Write<'a> = WriteHalf<'a>;

    fn halves(&mut self) -> (Prefixed<ReadHalf<'_>>, WriteHalf<'_>) {
        let prefix = std::mem::take(&mut self.prefix);
        // Borrowed halves, as for a bare TcpStream: an owned write half would send FIN when
        // dropped, ahead of a relayed reset.
        let (r, w) = self.inner.split();
        (Prefixed::new(prefix, r), w)
    }

    fn abort(&self) {
        // Linger zero makes close send RST; it does not block, unlike a non-zero linger.
        let _ = socket2::SockRef::from(&self.inner).set_linger(Some(Duration::ZERO));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_prefix_is_read_before_the_rest_even_in_small_reads() {
        let rest: &[u8] = b" world";
        let mut p = Prefixed::new(Bytes::from_static(b"hello"), rest);
        let mut two = [0u8; 2];
        p.read_exact(&mut two).await.expect("read");
        assert_eq!(&two, b"he");
        let mut all = Vec::new();
        p.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"llo world");
    }
}
