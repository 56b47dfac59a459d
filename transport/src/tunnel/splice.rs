//! Byte splicing between a local byte stream (a TCP socket, an upgraded HTTP connection) and a
//! mesh stream pair (raw QUIC streams, an `h3` request stream), keeping half-close and reset
//! semantics and never holding more than one bounded buffer per direction. The one copy loop
//! of the project: every tunnel, whatever its protocol, goes through [`splice_with`].

use std::future::Future;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::CODE_TCP_RESET;

/// Bytes read from TCP per QUIC write. Large writes amortise per-call work: batching at this size was measured at
/// 2.3x the throughput of small writes. 256 KiB (with [`WRITE_BATCH`] 128) was measured
/// against it in 5 same-run A/B pairs: single-stream bulk +3–6 %, latency and CPU per request
/// unchanged within noise, but idle-tunnel memory +3 KiB per tunnel per node (11.1 against
/// 8.1 KiB), so it stays. bench/RESULTS.md, "Throughput and CPU: what each change bought".
const READ_CHUNK: usize = 64 * 1024;
/// QUIC chunks gathered into one `writev` towards TCP (see [`READ_CHUNK`] for 128).
const WRITE_BATCH: usize = 32;

/// Live byte counters for one or many tunnels (shared with metrics).
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Bytes read from TCP and sent to the peer.
    pub sent: AtomicU64,
    /// Bytes received from the peer and written to TCP.
    pub received: AtomicU64,
}

/// How one direction of a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Orderly end: FIN relayed as a half-close (or the reverse).
    Finished,
    /// The TCP side reset; relayed as RESET_STREAM/STOP_SENDING.
    TcpReset,
    /// The peer reset or stopped the stream; relayed as a TCP reset.
    PeerReset,
    /// The QUIC connection was lost, or another I/O failure.
    Error(String),
}

/// The result of a finished splice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceOutcome {
    /// Bytes moved from TCP to the peer.
    pub to_peer: u64,
    /// Bytes moved from the peer to TCP.
    pub from_peer: u64,
    /// How the TCP → peer direction ended.
    pub upstream: SpliceEnd,
    /// How the peer → TCP direction ended.
    pub downstream: SpliceEnd,
}

impl SpliceOutcome {
    /// Whether either direction ended in a reset or an error.
    pub fn is_clean(&self) -> bool {
        self.upstream == SpliceEnd::Finished && self.downstream == SpliceEnd::Finished
    }
}

/// The sending half of the mesh side of a splice: a QUIC stream, or a protocol's stream on
/// one (an `h3` request stream). Implemented here for quinn; a front-end implements it for its
/// own stream type and reuses this splice.
pub trait MeshSend: Send {
    /// Sends one chunk; [`SpliceEnd::PeerReset`] when the peer stopped the stream.
    fn send_chunk(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), SpliceEnd>> + Send;
    /// Ends the stream in order (FIN).
    fn finish(&mut self) -> impl Future<Output = Result<(), SpliceEnd>> + Send;
    /// Resets the stream: the local side reset its connection.
    fn reset(&mut self);
}

/// The receiving half of the mesh side of a splice.
pub trait MeshRecv: Send {
    /// Receives into `bufs` (at least one slot); `Ok(None)` at the peer's FIN.
    fn recv_chunks(
        &mut self,
        bufs: &mut [Bytes],
    ) -> impl Future<Output = Result<Option<usize>, SpliceEnd>> + Send;
    /// Asks the peer to stop sending: the local side reset its connection.
    fn stop(&mut self);
}

/// The local side of a splice: a byte stream split into halves for the two directions.
pub trait LocalSide: Send {
    /// The reading half.
    type Read<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    /// The writing half.
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    /// Splits the stream for the two directions.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    /// Makes the stream's close abortive (a TCP reset), after a reset in either direction.
    fn abort(&self) {}
}

impl LocalSide for TcpStream {
    type Read<'a> = ReadHalf<'a>;
    type Write<'a> = WriteHalf<'a>;

    fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        // Borrowed halves: an owned write half would send FIN when dropped, and a FIN ahead of
        // the RST would turn a relayed reset into an orderly end.
        self.split()
    }

    fn abort(&self) {
        let sock = socket2::SockRef::from(self);
        let _ = sock.set_linger(Some(Duration::ZERO));
    }
}

impl MeshSend for quinn::SendStream {
    async fn send_chunk(&mut self, chunk: Bytes) -> Result<(), SpliceEnd> {
        self.write_chunk(chunk).await.map_err(|e| match e {
            quinn::WriteError::Stopped(_) => SpliceEnd::PeerReset,
            other => SpliceEnd::Error(other.to_string()),
        })
    }

    async fn finish(&mut self) -> Result<(), SpliceEnd> {
        quinn::SendStream::finish(self).map_err(|e| SpliceEnd::Error(e.to_string()))
    }

    fn reset(&mut self) {
        let _ = quinn::SendStream::reset(self, quinn::VarInt::from_u32(CODE_TCP_RESET));
    }
}

impl MeshRecv for quinn::RecvStream {
    async fn recv_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, SpliceEnd> {
        self.read_chunks(bufs).await.map_err(|e| match e {
            quinn::ReadError::Reset(_) => SpliceEnd::PeerReset,
            other => SpliceEnd::Error(other.to_string()),
        })
    }

    fn stop(&mut self) {
        let _ = quinn::RecvStream::stop(self, quinn::VarInt::from_u32(CODE_TCP_RESET));
    }
}

/// Splices `tcp` with a QUIC stream pair until both directions have ended. `leftover` is
/// payload already received from the peer, written to TCP first.
pub async fn splice(
    mut tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    leftover: Bytes,
    counters: &TunnelCounters,
) -> SpliceOutcome {
    let _ = tcp.set_nodelay(true);
    splice_with(&mut tcp, &mut send, &mut recv, leftover, counters).await
}

/// The splice behind [`splice`], for any local side and any mesh stream pair: large reads,
/// zero-copy chunk sends, vectored writes, FIN relayed as a half-close, and a reset or failure
/// in one direction aborting both.
pub async fn splice_with<L: LocalSide, S: MeshSend, R: MeshRecv>(
    local: &mut L,
    send: &mut S,
    recv: &mut R,
    leftover: Bytes,
    counters: &TunnelCounters,
) -> SpliceOutcome {
    let mut to_peer = 0u64;
    let mut from_peer = 0u64;
    let (up, down) = {
        let (mut local_r, mut local_w) = local.halves();
        let up = local_to_mesh(&mut local_r, &mut *send, counters, &mut to_peer);
        let down = mesh_to_local(&mut *recv, &mut local_w, leftover, counters, &mut from_peer);
        tokio::pin!(up, down);
        let mut up_end: Option<SpliceEnd> = None;
        let mut down_end: Option<SpliceEnd> = None;
        while up_end.is_none() || down_end.is_none() {
            tokio::select! {
                end = &mut up, if up_end.is_none() => {
                    let abort = end != SpliceEnd::Finished;
                    up_end = Some(end);
                    if abort { break; }
                }
                end = &mut down, if down_end.is_none() => {
                    let abort = end != SpliceEnd::Finished;
                    down_end = Some(end);
                    if abort { break; }
                }
            }
        }
        (up_end, down_end)
    };
    // A reset or failure in one direction aborts the other: the application must see a
    // reset, not a connection that silently stays half-open.
    let aborted = up.as_ref().is_some_and(|e| *e != SpliceEnd::Finished)
        || down.as_ref().is_some_and(|e| *e != SpliceEnd::Finished);
    if aborted {
        send.reset();
        recv.stop();
        local.abort();
    }
    let cancelled = SpliceEnd::Error("cancelled by the other direction".into());
    SpliceOutcome {
        to_peer,
        from_peer,
        upstream: up.unwrap_or_else(|| cancelled.clone()),
        downstream: down.unwrap_or(cancelled),
    }
}

async fn local_to_mesh<Rd: AsyncRead + Unpin, S: MeshSend>(
    local: &mut Rd,
    send: &mut S,
    counters: &TunnelCounters,
    total: &mut u64,
) -> SpliceEnd {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if buf.capacity() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match local.read_buf(&mut buf).await {
            Ok(0) => {
                return match send.finish().await {
                    Ok(()) => SpliceEnd::Finished,
                    Err(e) => e,
                };
            }
            Ok(n) => {
                let chunk = buf.split().freeze();
                if let Err(e) = send.send_chunk(chunk).await {
                    return e;
                }
                *total += n as u64;
                counters.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return SpliceEnd::TcpReset,
        }
    }
}

async fn mesh_to_local<R: MeshRecv, W: AsyncWrite + Unpin>(
    recv: &mut R,
    local: &mut W,
    leftover: Bytes,
    counters: &TunnelCounters,
    total: &mut u64,
) -> SpliceEnd {
    let mut bufs: Vec<Bytes> = vec![Bytes::new(); WRITE_BATCH];
    if !leftover.is_empty() {
        let n = leftover.len() as u64;
        bufs[0] = leftover;
        if write_all_vectored(local, &mut bufs[..1]).await.is_err() {
            return SpliceEnd::TcpReset;
        }
        *total += n;
        counters.received.fetch_add(n, Ordering::Relaxed);
    }
    loop {
        match recv.recv_chunks(&mut bufs).await {
            Ok(Some(count)) => {
                let n: u64 = bufs[..count].iter().map(|b| b.len() as u64).sum();
                if write_all_vectored(local, &mut bufs[..count]).await.is_err() {
                    return SpliceEnd::TcpReset;
                }
                *total += n;
                counters.received.fetch_add(n, Ordering::Relaxed);
            }
            Ok(None) => {
                return match local.shutdown().await {
                    Ok(()) => SpliceEnd::Finished,
                    Err(_) => SpliceEnd::TcpReset,
                };
            }
            Err(e) => return e,
        }
    }
}

/// Writes every buffer with as few `writev` calls as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    tcp: &mut W,
    bufs: &mut [Bytes],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < bufs.len() {
        let slices: Vec<IoSlice<'_>> = bufs[first..].iter().map(|b| IoSlice::new(b)).collect();
        let mut written = tcp.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while first < bufs.len() && written >= bufs[first].len() {
            written -= bufs[first].len();
            bufs[first] = Bytes::new();
            first += 1;
        }
        if written > 0 {
            bufs[first].advance(written);
        }
    }
    Ok(())
}
