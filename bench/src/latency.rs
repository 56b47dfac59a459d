//! Open-loop request/response latency against an echo server, corrected for coordinated omission.
//!
//! Request `i` is *scheduled* at `start + i / rate`, whatever happened to earlier requests, and
//! sent on connection `i mod conns` of a pool (requests are pipelined, so a slow response never
//! delays the next send). Its latency is measured from the scheduled time to the arrival of the
//! last byte of its echo, so a stall is charged to every request it delayed (the correction for
//! coordinated omission). The uncorrected latency (from the actual send) and the sender's own
//! lateness are reported beside it, so the load generator's timer error is visible.
//!
//! Timing runs on plain OS threads: the sender sleeps until shortly before each scheduled time and
//! spins the rest (`spin`), because async timers have millisecond granularity.
//!
//! What a request and a response look like on the wire is a [`Protocol`]: [`Echo`] (fixed-size
//! messages carrying the sequence number, against `meshbench echo`) here, HTTP/1.1 in
//! [`crate::http`]. The schedule, the pool and the histograms are shared.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Parameters of one latency run.
#[derive(Clone, Debug)]
pub struct LatencyOptions {
    /// Echo server (or the tunnel entry in front of one).
    pub addr: SocketAddr,
    /// Requests per second, over the whole pool.
    pub rate: f64,
    /// Measured duration (after the warm-up).
    pub duration: Duration,
    /// Leading period whose requests are sent but not recorded.
    pub warmup: Duration,
    /// Request and response size in bytes (at least 8: the sequence number).
    pub size: usize,
    /// Connections in the pool.
    pub conns: usize,
    /// How long before each scheduled send the sender stops sleeping and spins.
    pub spin: Duration,
    /// How long to wait for outstanding responses after the last send.
    pub drain: Duration,
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Percentiles {
    /// The percentiles of `h` (recorded in nanoseconds).
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// The outcome of a latency run.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyReport {
    /// Target rate (requests/s); 0 for a closed-loop run.
    pub rate: f64,
    /// Closed loop only: requests kept outstanding at once (a new one as each answer arrives).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Request size in bytes.
    pub size: usize,
    /// Connections in the pool.
    pub conns: usize,
    /// Measured seconds (excluding warm-up).
    pub seconds: f64,
    /// Requests recorded (scheduled after the warm-up and answered).
    pub requests: u64,
    /// Requests sent but never answered within the drain time.
    pub missing: u64,
    /// Requests answered with a failure (HTTP: a status other than 2xx); not in the histograms.
    pub errors: u64,
    /// Successful answers per second over the measured time.
    pub achieved_rps: f64,
    /// Latency from the scheduled send time (corrected for coordinated omission).
    pub corrected_us: Percentiles,
    /// Latency from the actual send time.
    pub uncorrected_us: Percentiles,
    /// How late the sender was against the schedule.
    pub send_lateness_us: Percentiles,
}

/// One decoded response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The sequence number the response carries, if the protocol echoes one (checked against
    /// the request it must answer: responses come back in order on each connection).
    pub seq: Option<u64>,
    /// Whether it is a success (recorded in the histograms) or an error (counted).
    pub ok: bool,
}

/// The wire format of one request/response exchange.
pub trait Protocol: Send + Sync + 'static {
    /// Appends request number `seq` to `out`.
    fn encode(&self, seq: u64, out: &mut Vec<u8>);
    /// Reads one whole response. End of input before its first byte is
    /// `ErrorKind::UnexpectedEof`; a malformed response is `ErrorKind::InvalidData`.
    fn decode(&self, input: &mut BufReader<TcpStream>) -> io::Result<Answer>;
}

/// Fixed-size messages whose first 8 bytes are the big-endian sequence number, echoed back.
#[derive(Clone, Copy, Debug)]
pub struct Echo {
    /// Request (and response) size, at least 8.
    pub size: usize,
}

impl Protocol for Echo {
    fn encode(&self, seq: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&seq.to_be_bytes());
        out.resize(out.len() + self.size.saturating_sub(8), 0xA5);
    }

    fn decode(&self, input: &mut BufReader<TcpStream>) -> io::Result<Answer> {
        let mut buf = vec![0u8; self.size];
        input.read_exact(&mut buf)?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&buf[..8]);
        Ok(Answer {
            seq: Some(u64::from_be_bytes(seq)),
            ok: true,
        })
    }
}

/// A request in flight: its sequence number, scheduled and actual send times, and whether it
/// counts (sent after the warm-up).
type Pending = (u64, Instant, Instant, bool);

struct Conn {
    stream: TcpStream,
    pending: Arc<Mutex<VecDeque<Pending>>>,
    sent: u64,
    received: Arc<AtomicU64>,
}

/// A histogram of nanoseconds, 1 ns to 600 s, three significant digits.
pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).context("creating a histogram")
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sleeps until `deadline`, spinning for the last `spin`.
pub(crate) fn wait_until(deadline: Instant, spin: Duration) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > spin {
            thread::sleep(left - spin);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// What one reader thread measured.
struct ReaderResult {
    corrected: Histogram<u64>,
    uncorrected: Histogram<u64>,
    errors: u64,
}

/// Reads responses on one connection and records their latencies.
fn read_responses<P: Protocol>(
    stream: TcpStream,
    protocol: Arc<P>,
    pending: Arc<Mutex<VecDeque<Pending>>>,
    received: Arc<AtomicU64>,
) -> anyhow::Result<ReaderResult> {
    let mut out = ReaderResult {
        corrected: histogram()?,
        uncorrected: histogram()?,
        errors: 0,
    };
    let mut input = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let answer = match protocol.decode(&mut input) {
            Ok(a) => a,
            // The pool is shut down once every response is in (or the drain time is over).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof || received_all(&pending) => {
                return Ok(out)
            }
            Err(e) => return Err(e).context("reading a response"),
        };
        let now = Instant::now();
        let front = pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        let Some((seq, scheduled, sent, record)) = front else {
            bail!("a response arrived for no request");
        };
        if let Some(got) = answer.seq {
            ensure!(
                got == seq,
                "response out of order (expected #{seq}, got #{got})"
            );
        }
        if record {
            if answer.ok {
                out.corrected.saturating_record(nanos(now - scheduled));
                out.uncorrected.saturating_record(nanos(now - sent));
            } else {
                out.errors += 1;
            }
        }
        received.fetch_add(1, Ordering::Release);
    }
}

fn received_all(pending: &Mutex<VecDeque<Pending>>) -> bool {
    pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_empty()
}

/// Runs one open-loop latency measurement against an echo server.
pub fn run(opts: &LatencyOptions) -> anyhow::Result<LatencyReport> {
    ensure!(opts.size >= 8, "--size must be at least 8 bytes");
    run_with(opts, Echo { size: opts.size })
}

/// Runs one open-loop latency measurement speaking `protocol`. `opts.size` is only reported.
pub fn run_with<P: Protocol>(opts: &LatencyOptions, protocol: P) -> anyhow::Result<LatencyReport> {
    ensure!(
        opts.rate > 0.0 && opts.rate.is_finite(),
        "--rate must be positive"
    );
    ensure!(opts.conns > 0, "--conns must be at least 1");
    let protocol = Arc::new(protocol);
    let mut conns = Vec::with_capacity(opts.conns);
    let mut readers = Vec::with_capacity(opts.conns);
    for _ in 0..opts.conns {
        let stream = TcpStream::connect(opts.addr)
            .with_context(|| format!("connecting to {}", opts.addr))?;
        stream.set_nodelay(true)?;
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let received = Arc::new(AtomicU64::new(0));
        let (read, proto, p, r) = (
            stream.try_clone()?,
            protocol.clone(),
            pending.clone(),
            received.clone(),
        );
        readers.push(thread::spawn(move || read_responses(read, proto, p, r)));
        conns.push(Conn {
            stream,
            pending,
            sent: 0,
            received,
        });
    }

    let mut request = Vec::new();
    let mut lateness = histogram()?;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + opts.warmup;
    let end = measure_from + opts.duration;
    let mut send_error = None;
    for i in 0u64.. {
        let scheduled = start + Duration::from_secs_f64(i as f64 / opts.rate);
        if scheduled >= end {
            break;
        }
        wait_until(scheduled, opts.spin);
        let conn = &mut conns[(i % opts.conns as u64) as usize];
        request.clear();
        protocol.encode(i, &mut request);
        let sent = Instant::now();
        let record = scheduled >= measure_from;
        if record {
            lateness.saturating_record(nanos(sent - scheduled));
        }
        conn.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back((i, scheduled, sent, record));
        if let Err(e) = conn.stream.write_all(&request) {
            send_error = Some(e);
            break;
        }
        conn.sent += 1;
    }

    // Wait for the outstanding responses, then close the pool so the readers return.
    let drain_until = Instant::now() + opts.drain;
    while Instant::now() < drain_until
        && conns
            .iter()
            .any(|c| c.received.load(Ordering::Acquire) < c.sent)
    {
        thread::sleep(Duration::from_millis(1));
    }
    let mut missing = 0;
    for conn in &conns {
        missing += conn
            .sent
            .saturating_sub(conn.received.load(Ordering::Acquire));
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
    let (mut corrected, mut uncorrected, mut errors) = (histogram()?, histogram()?, 0);
    for reader in readers {
        let r = match reader.join() {
            Ok(result) => result?,
            Err(_) => bail!("a reader thread panicked"),
        };
        corrected.add(&r.corrected).context("merging histograms")?;
        uncorrected
            .add(&r.uncorrected)
            .context("merging histograms")?;
        errors += r.errors;
    }
    if let Some(e) = send_error {
        return Err(e).context("sending a request");
    }
    Ok(LatencyReport {
        rate: opts.rate,
        concurrency: None,
        size: opts.size,
        conns: opts.conns,
        seconds: opts.duration.as_secs_f64(),
        requests: corrected.len(),
        missing,
        errors,
        achieved_rps: corrected.len() as f64 / opts.duration.as_secs_f64().max(1e-9),
        corrected_us: Percentiles::of(&corrected),
        uncorrected_us: Percentiles::of(&uncorrected),
        send_lateness_us: Percentiles::of(&lateness),
    })
}
