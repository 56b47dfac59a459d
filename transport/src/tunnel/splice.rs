//! Byte splicing between a TCP socket and a QUIC stream pair, keeping half-close and reset
//! semantics and never holding more than one bounded buffer per direction.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::CODE_TCP_RESET;

/// Bytes read from TCP per QUIC write. Large writes amortise per-call work; STACK.md measured
/// 2.3x throughput from batching at this size. 256 KiB (with [`WRITE_BATCH`] 128) was measured
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

/// Splices `tcp` with the stream pair until both directions have ended. `leftover` is payload
/// already received from the peer, written to TCP first.
pub async fn splice(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    leftover: Bytes,
    counters: &TunnelCounters,
) -> SpliceOutcome {
    let mut tcp = tcp;
    let _ = tcp.set_nodelay(true);
    // Borrowed halves: an owned write half would send FIN when dropped, and a FIN ahead of
    // the RST would turn a relayed reset into an orderly end.
    let (mut tcp_r, mut tcp_w) = tcp.split();
    let mut to_peer = 0u64;
    let mut from_peer = 0u64;
    let (up, down) = {
        let up = tcp_to_quic(&mut tcp_r, &mut send, counters, &mut to_peer);
        let down = quic_to_tcp(&mut recv, &mut tcp_w, leftover, counters, &mut from_peer);
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
        let code = quinn::VarInt::from_u32(CODE_TCP_RESET);
        let _ = send.reset(code);
        let _ = recv.stop(code);
        reset_tcp(&tcp);
    }
    let cancelled = SpliceEnd::Error("cancelled by the other direction".into());
    SpliceOutcome {
        to_peer,
        from_peer,
        upstream: up.unwrap_or_else(|| cancelled.clone()),
        downstream: down.unwrap_or(cancelled),
    }
}

/// Makes the close of this socket send RST instead of FIN.
fn reset_tcp(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_linger(Some(Duration::ZERO));
}

async fn tcp_to_quic(
    tcp: &mut ReadHalf<'_>,
    send: &mut quinn::SendStream,
    counters: &TunnelCounters,
    total: &mut u64,
) -> SpliceEnd {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if buf.capacity() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) => {
                return match send.finish() {
                    Ok(()) => SpliceEnd::Finished,
                    Err(e) => SpliceEnd::Error(e.to_string()),
                };
            }
            Ok(n) => {
                let chunk = buf.split().freeze();
                if let Err(e) = send.write_chunk(chunk).await {
                    return match e {
                        quinn::WriteError::Stopped(_) => SpliceEnd::PeerReset,
                        other => SpliceEnd::Error(other.to_string()),
                    };
                }
                *total += n as u64;
                counters.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return SpliceEnd::TcpReset,
        }
    }
}

async fn quic_to_tcp(
    recv: &mut quinn::RecvStream,
    tcp: &mut WriteHalf<'_>,
    leftover: Bytes,
    counters: &TunnelCounters,
    total: &mut u64,
) -> SpliceEnd {
    let mut bufs: Vec<Bytes> = vec![Bytes::new(); WRITE_BATCH];
    if !leftover.is_empty() {
        let n = leftover.len() as u64;
        bufs[0] = leftover;
        if write_all_vectored(tcp, &mut bufs[..1]).await.is_err() {
            return SpliceEnd::TcpReset;
        }
        *total += n;
        counters.received.fetch_add(n, Ordering::Relaxed);
    }
    loop {
        match recv.read_chunks(&mut bufs).await {
            Ok(Some(count)) => {
                let n: u64 = bufs[..count].iter().map(|b| b.len() as u64).sum();
                if write_all_vectored(tcp, &mut bufs[..count]).await.is_err() {
                    return SpliceEnd::TcpReset;
                }
                *total += n;
                counters.received.fetch_add(n, Ordering::Relaxed);
            }
            Ok(None) => {
                return match tcp.shutdown().await {
                    Ok(()) => SpliceEnd::Finished,
                    Err(_) => SpliceEnd::TcpReset,
                };
            }
            Err(quinn::ReadError::Reset(_)) => return SpliceEnd::PeerReset,
            Err(e) => return SpliceEnd::Error(e.to_string()),
        }
    }
}

/// Writes every buffer with as few `writev` calls as the socket allows.
async fn write_all_vectored(tcp: &mut WriteHalf<'_>, bufs: &mut [Bytes]) -> std::io::Result<()> {
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
