//! TCP targets (`sink`, `echo`) and the bulk-throughput client.
//!
//! **Sink protocol.** A transfer is an 8-byte big-endian length `N`, then `N` bytes; the sink
//! discards them and answers with `N` as 8 bytes once it has read them all, so the client's clock
//! stops when the data has really arrived, not when it left a socket buffer. A connection may carry
//! several transfers; the sink closes at end of input. No half-close is needed, so it works
//! through relays that close both ways on the first FIN.
//!
//! **Echo.** Plain echo: every byte read is written back. Against it the bulk client writes and
//! reads back concurrently and compares every byte with what it sent.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Size of every write and read buffer of the bulk client and the servers.
pub const CHUNK: usize = 256 * 1024;
/// Period of the payload pattern.
const PATTERN_PERIOD: usize = 1 << 20;

/// A deterministic pseudo-random byte stream: byte `i` is `pattern[i % PERIOD]`.
///
/// The buffer holds one extra [`CHUNK`] that repeats the start, so any window of up to `CHUNK`
/// bytes starting anywhere in the stream is one contiguous slice.
#[derive(Clone)]
pub struct Pattern(Arc<Vec<u8>>);

impl Pattern {
    /// Builds the pattern (xorshift64 from a fixed seed).
    pub fn new() -> Self {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut bytes = Vec::with_capacity(PATTERN_PERIOD + CHUNK);
        while bytes.len() < PATTERN_PERIOD {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        let head = bytes[..CHUNK].to_vec();
        bytes.extend_from_slice(&head);
        Pattern(Arc::new(bytes))
    }

    /// The `len` (≤ [`CHUNK`]) stream bytes starting at stream offset `offset`.
    pub fn window(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset % PATTERN_PERIOD as u64) as usize;
        &self.0[start..start + len.min(CHUNK)]
    }
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves the sink protocol on every connection accepted from `listener`, forever.
pub async fn run_sink(listener: TcpListener) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = sink_connection(stream).await {
                eprintln!("meshbench sink: {peer}: {e}");
            }
        });
    }
}

async fn sink_connection(mut stream: tokio::net::TcpStream) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut header = [0u8; 8];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let want = u64::from_be_bytes(header);
        let mut got = 0u64;
        while got < want {
            let max = usize::try_from(want - got).unwrap_or(usize::MAX).min(CHUNK);
            let n = stream.read(&mut buf[..max]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("transfer ended after {got} of {want} bytes"),
                ));
            }
            got += n as u64;
        }
        stream.write_all(&got.to_be_bytes()).await?;
    }
}

/// Echoes every connection accepted from `listener`, forever.
pub async fn run_echo(listener: TcpListener) -> io::Result<()> {
    loop {
        let (mut stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut buf = vec![0u8; CHUNK];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        if let Err(e) = stream.write_all(&buf[..n]).await {
                            eprintln!("meshbench echo: {peer}: {e}");
                            return;
                        }
                    }
                    Err(e) => {
                        eprintln!("meshbench echo: {peer}: {e}");
                        return;
                    }
                }
            }
        });
    }
}

/// What the bulk client talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BulkTarget {
    /// A `meshbench sink`: send only, wait for the byte-count acknowledgement.
    Sink,
    /// A `meshbench echo`: send and read back concurrently, verifying every byte.
    Echo,
}

/// One timed bulk transfer over one or more connections.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BulkRun {
    /// Payload bytes sent, summed over connections (each also read back against an echo).
    pub bytes: u64,
    /// Wall time from the common start to the last connection finishing.
    pub seconds: f64,
    /// `bytes * 8 / seconds / 1e9`.
    pub gbps: f64,
}

impl BulkRun {
    /// Computes the rate of `bytes` moved in `elapsed`.
    pub fn new(bytes: u64, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        BulkRun {
            bytes,
            seconds,
            gbps: bytes as f64 * 8.0 / seconds / 1e9,
        }
    }
}

/// Moves `bytes` in total, split evenly over `conns` connections to `addr`, and times it.
///
/// Connections are opened (and TCP_NODELAY set) before the clock starts.
pub fn bulk(
    addr: SocketAddr,
    bytes: u64,
    conns: usize,
    target: BulkTarget,
) -> anyhow::Result<BulkRun> {
    ensure!(conns > 0, "at least one connection is needed");
    let pattern = Pattern::new();
    let streams = (0..conns)
        .map(|_| {
            let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let per_conn = bytes / conns as u64;
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let share = if i == 0 {
                bytes - per_conn * (conns as u64 - 1)
            } else {
                per_conn
            };
            let (barrier, pattern) = (barrier.clone(), pattern.clone());
            thread::spawn(move || {
                barrier.wait();
                match target {
                    BulkTarget::Sink => send_to_sink(stream, share, &pattern),
                    BulkTarget::Echo => echo_round_trip(stream, share, &pattern),
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for worker in workers {
        match worker.join() {
            Ok(result) => result?,
            Err(_) => bail!("a bulk worker thread panicked"),
        }
    }
    Ok(BulkRun::new(bytes, start.elapsed()))
}

fn write_pattern(stream: &mut TcpStream, bytes: u64, pattern: &Pattern) -> io::Result<()> {
    let mut sent = 0u64;
    while sent < bytes {
        let len = usize::try_from(bytes - sent)
            .unwrap_or(usize::MAX)
            .min(CHUNK);
        stream.write_all(pattern.window(sent, len))?;
        sent += len as u64;
    }
    Ok(())
}

fn send_to_sink(mut stream: TcpStream, bytes: u64, pattern: &Pattern) -> anyhow::Result<()> {
    stream.write_all(&bytes.to_be_bytes())?;
    write_pattern(&mut stream, bytes, pattern).context("sending to the sink")?;
    let mut ack = [0u8; 8];
    stream
        .read_exact(&mut ack)
        .context("waiting for the sink's acknowledgement")?;
    let acked = u64::from_be_bytes(ack);
    ensure!(
        acked == bytes,
        "the sink acknowledged {acked} bytes, {bytes} were sent"
    );
    Ok(())
}

fn echo_round_trip(stream: TcpStream, bytes: u64, pattern: &Pattern) -> anyhow::Result<()> {
    let mut writer = stream.try_clone()?;
    let write_pattern_copy = pattern.clone();
    let sender = thread::spawn(move || write_pattern(&mut writer, bytes, &write_pattern_copy));
    let mut reader = stream;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        let max = usize::try_from(bytes - got)
            .unwrap_or(usize::MAX)
            .min(CHUNK);
        let n = reader.read(&mut buf[..max]).context("reading the echo")?;
        ensure!(n > 0, "the echo closed after {got} of {bytes} bytes");
        ensure!(
            buf[..n] == *pattern.window(got, n),
            "echoed bytes differ near offset {got}"
        );
        got += n as u64;
    }
    match sender.join() {
        Ok(result) => result.context("sending to the echo")?,
        Err(_) => bail!("the echo writer thread panicked"),
    }
    Ok(())
}

/// The median of `values` (the mean of the middle two for an even count); NaN if empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
