//! quinn on tokio, with two fewer system calls per packet exchange than `quinn::TokioRuntime`.
//!
//! **Write readiness nobody waits for.** `quinn::TokioRuntime` wraps the socket in a
//! `tokio::net::UdpSocket`, which asks epoll for both read and write readiness. A UDP socket
//! reports write readiness every time the kernel frees one of its sent datagrams (`sock_wfree` →
//! `sk_write_space`), so every `sendmsg` comes back as one more `epoll_wait` return and one more
//! pass of the runtime, although nobody waits to write: send buffers are large and the
//! congestion controller keeps them far from full. Here the socket is registered for reading
//! only; datagrams are sent straight on the non-blocking socket. quinn asks
//! [`UdpPoller::poll_writable`] before every send, so that answer must be free: it is "ready"
//! unless the socket's latest send met a full buffer (`WouldBlock`). Only then does the waiting
//! task register a duplicate of the descriptor for write readiness, and that registration is
//! dropped as soon as the socket is writable again. Registering reports the current state, so a
//! buffer that drained between the failed send and the registration wakes the task at once.
//!
//! **A receive that can only fail.** quinn reads until `recvmmsg` says WouldBlock. A batch that
//! comes back short has already emptied the queue (`recvmmsg` stops at the first would-block),
//! so here its readiness is cleared at once, as tokio does after a short TCP read.
//!
//! Measured with `strace -c` on both nodes of a meshnode pair carrying 1,000 requests/s of
//! 1 KiB: per request and node, `epoll_wait` returns went from 2.65 to 2.0 (0.65 of them had
//! carried nothing but that EPOLLOUT) and `recvmmsg` calls from 2.0 to 1.0
//! (bench/RESULTS.md, "Run 7").

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// quinn's tokio runtime with a read-only readiness registration for the UDP socket.
#[derive(Debug, Default, Clone, Copy)]
pub struct MeshRuntime;

impl Runtime for MeshRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn AsyncTimer>> {
        quinn::TokioRuntime.new_timer(t)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(ReadRegisteredUdp::new(sock)?))
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

/// Registers `socket` with the runtime's reactor for `interest` only.
// The one unsafe call of the workspace: tokio made registration `unsafe` because an `AsyncFd`
// over a borrowed descriptor could outlive it (tokio PR 8587). Here the `AsyncFd` owns the
// socket, so the descriptor stays open, and the same, until the registration is dropped.
#[allow(unsafe_code)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: `socket` is moved into the `AsyncFd`, which owns it until drop: its descriptor is
    // valid, open, and what `as_raw_fd` returns for the whole life of the registration.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(io::Error::from)
}

/// A UDP socket whose epoll registration asks for read readiness only.
struct ReadRegisteredUdp {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// The latest send met a full buffer: senders must wait for write readiness.
    send_blocked: AtomicBool,
}

impl ReadRegisteredUdp {
    fn new(sock: std::net::UdpSocket) -> io::Result<ReadRegisteredUdp> {
        // Sets the socket non-blocking and enables GSO/GRO and ECN where the kernel has them.
        let state = UdpSocketState::new((&sock).into())?;
        Ok(ReadRegisteredUdp {
            io: register(sock, Interest::READABLE)?,
            state,
            send_blocked: AtomicBool::new(false),
        })
    }
}

impl fmt::Debug for ReadRegisteredUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadRegisteredUdp")
            .field("local", &self.io.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for ReadRegisteredUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // Only WouldBlock comes back; other send errors are logged by quinn-udp and dropped,
        // as UDP loss would be.
        let result = self.state.send(self.io.get_ref().into(), transmit);
        if result.is_err() {
            self.send_blocked.store(true, Ordering::Relaxed);
        }
        result
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let batch = bufs.len().min(meta.len()).min(quinn::udp::BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            // `try_io` clears the readiness on WouldBlock, so the next poll waits for epoll.
            if let Ok(result) = guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta))
            {
                // A short batch emptied the queue. The readiness carries a tick, so a datagram
                // that arrived after this read set it anew and is not lost.
                if matches!(result, Ok(n) if n < batch) {
                    guard.clear_ready();
                }
                return Poll::Ready(result);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Waits for write readiness through a registration that exists only while someone waits.
struct WritablePoller {
    socket: Arc<ReadRegisteredUdp>,
    /// A duplicate descriptor registered for write readiness, while a send is waiting.
    waiting: Option<AsyncFd<std::net::UdpSocket>>,
}

impl fmt::Debug for WritablePoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritablePoller")
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl UdpPoller for WritablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.waiting.is_none() && !this.socket.send_blocked.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        if this.waiting.is_none() {
            let dup = this.socket.io.get_ref().try_clone()?;
            this.waiting = Some(register(dup, Interest::WRITABLE)?);
        }
        let Some(waiting) = this.waiting.as_ref() else {
            return Poll::Pending;
        };
        let result = ready!(waiting.poll_write_ready(cx)).map(drop);
        // Ready (or failed): deregister, so that sends stop producing wake-ups again. If the
        // buffer is still full for another sender, its send fails and sets the flag again.
        this.waiting = None;
        this.socket.send_blocked.store(false, Ordering::Relaxed);
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(to: SocketAddr, contents: &[u8]) -> Transmit<'_> {
        Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        }
    }

    fn bound() -> Arc<ReadRegisteredUdp> {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        Arc::new(ReadRegisteredUdp::new(sock).expect("wrap"))
    }

    #[tokio::test]
    async fn sends_and_receives_datagrams() {
        let (a, b) = (bound(), bound());
        let to = b.local_addr().expect("addr");
        for i in 0..3u8 {
            a.try_send(&transmit(to, &[i; 100])).expect("send");
        }
        let mut got = Vec::new();
        let mut storage = vec![0u8; 64 * 1024];
        while got.len() < 3 {
            let mut bufs = [IoSliceMut::new(&mut storage)];
            let mut meta = [RecvMeta::default()];
            let n = std::future::poll_fn(|cx| b.poll_recv(cx, &mut bufs, &mut meta))
                .await
                .expect("recv");
            assert_eq!(n, 1);
            // GRO may hand several equal-sized datagrams over as one buffer.
            for seg in storage[..meta[0].len].chunks(meta[0].stride) {
                got.push(seg.to_vec());
            }
        }
        assert_eq!(got, vec![vec![0u8; 100], vec![1u8; 100], vec![2u8; 100]]);
    }

    async fn wait_writable(poller: &mut Pin<Box<dyn UdpPoller>>) {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
        )
        .await
        .expect("writable within 5 s")
        .expect("poll_writable");
    }

    #[tokio::test]
    async fn write_readiness_is_free_until_a_send_meets_a_full_buffer() {
        let a = bound();
        let mut poller = a.clone().create_io_poller();
        // Nothing failed: ready without registering anything.
        wait_writable(&mut poller).await;
        assert!(
            format!("{poller:?}").contains("waiting: false"),
            "{poller:?}"
        );
        // As after a send that met a full buffer (loopback never fills one; the namespace test
        // in tests/udp_backpressure.rs does): the wait registers, and this empty buffer is
        // writable at once. Twice, because a poller is reused after each wait.
        for _ in 0..2 {
            a.send_blocked.store(true, Ordering::Relaxed);
            wait_writable(&mut poller).await;
            assert!(!a.send_blocked.load(Ordering::Relaxed));
            assert!(
                format!("{poller:?}").contains("waiting: false"),
                "{poller:?}"
            );
        }
    }
}
