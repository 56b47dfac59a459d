//! The idle deadline of an HTTP client connection (the proxy's and `auto` outbound ports'): a
//! connection over which no byte has passed either way for `node.http_idle_timeout` is closed
//! gracefully — HTTP/2 gets GOAWAY and its streams in flight still finish; HTTP/1.1 ends after
//! the request in flight, if any. A silent HTTP/2 client would otherwise hold its connection
//! (and its slot under the connection caps) for ever (docs/behaviour.md, Limits).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When bytes last passed over one connection.
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last read or write that moved bytes.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the connection has been silent.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        last.elapsed()
    }
}

/// An I/O object that records in an [`Activity`] when bytes pass.
pub(crate) struct IdleIo<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> IdleIo<I> {
    /// Wraps `io`; returns it with the activity record its watcher reads.
    pub(crate) fn new(io: I) -> (IdleIo<I>, Arc<Activity>) {
        let activity = Activity::new();
        (
            IdleIo {
                io,
                activity: activity.clone(),
            },
            activity,
        )
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for IdleIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for IdleIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_either_way_reset_the_idle_time() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut io, activity) = IdleIo::new(a);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(activity.idle_for() >= Duration::from_millis(30));
        io.write_all(b"x").await.unwrap_or_else(|_| unreachable!());
        assert!(activity.idle_for() < Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(30)).await;
        b.write_all(b"y").await.unwrap_or_else(|_| unreachable!());
        let mut got = [0u8; 1];
        io.read_exact(&mut got)
            .await
            .unwrap_or_else(|_| unreachable!());
        assert!(activity.idle_for() < Duration::from_millis(20));
    }
}
