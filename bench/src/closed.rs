//! Closed-loop request/response throughput over a [`Protocol`]: `concurrency` connections, each
//! with exactly one request outstanding, the next sent as soon as the previous answer is in. The
//! achieved rate is the path's capacity at that concurrency (what `wrk` or `h2load -c N`
//! report); latency is from the actual send (there is no schedule to correct against).
//!
//! The open-loop engine in [`crate::latency`] answers "how long at this rate"; this one answers
//! "how many per second at this concurrency". Both report a [`LatencyReport`]; a closed-loop
//! one has `rate` 0 and `concurrency` set, and equal corrected and uncorrected histograms.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;

use crate::latency::{histogram, nanos, LatencyOptions, LatencyReport, Percentiles, Protocol};

/// What one connection's thread measured.
struct Worker {
    latency: Histogram<u64>,
    errors: u64,
}

/// Runs `concurrency` connections to `opts.addr` for `opts.warmup + opts.duration`, each sending
/// a request as soon as the previous one is answered. `opts.rate`, `opts.conns` and `opts.spin`
/// are not used; `opts.size` is only reported.
pub fn run_closed<P: Protocol>(
    opts: &LatencyOptions,
    concurrency: usize,
    protocol: P,
) -> anyhow::Result<LatencyReport> {
    ensure!(concurrency > 0, "--concurrency must be at least 1");
    let protocol = Arc::new(protocol);
    // Connect all first, so a refused connection fails the run before any timing starts.
    let mut streams = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let s = TcpStream::connect(opts.addr)
            .with_context(|| format!("connecting to {}", opts.addr))?;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + opts.warmup;
    let end = measure_from + opts.duration;
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(k, stream)| {
            let protocol = protocol.clone();
            thread::spawn(move || worker(k as u64, stream, &*protocol, start, measure_from, end))
        })
        .collect();
    let mut latency = histogram()?;
    let mut errors = 0;
    for w in workers {
        let w = match w.join() {
            Ok(result) => result?,
            Err(_) => bail!("a worker thread panicked"),
        };
        latency.add(&w.latency).context("merging histograms")?;
        errors += w.errors;
    }
    let seconds = opts.duration.as_secs_f64();
    let p = Percentiles::of(&latency);
    Ok(LatencyReport {
        rate: 0.0,
        concurrency: Some(concurrency),
        size: opts.size,
        conns: concurrency,
        seconds,
        requests: latency.len(),
        missing: 0,
        errors,
        achieved_rps: latency.len() as f64 / seconds.max(1e-9),
        corrected_us: p,
        uncorrected_us: p,
        send_lateness_us: Percentiles::of(&histogram()?),
    })
}

/// One connection's loop. Sequence numbers are `k`, `k + 2^32`, ... so that answers carrying one
/// (`x-seq`) are checked per connection.
fn worker<P: Protocol>(
    k: u64,
    stream: TcpStream,
    protocol: &P,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Worker> {
    let mut out = Worker {
        latency: histogram()?,
        errors: 0,
    };
    let mut input = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut writer = stream;
    let mut request = Vec::new();
    let now = Instant::now();
    if start > now {
        thread::sleep(start - now);
    }
    for n in 0u64.. {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let seq = (n << 32) | k;
        request.clear();
        protocol.encode(seq, &mut request);
        writer.write_all(&request).context("sending a request")?;
        let answer = protocol.decode(&mut input).context("reading a response")?;
        let done = Instant::now();
        if let Some(got) = answer.seq {
            ensure!(
                got == seq,
                "response out of order (expected #{seq}, got #{got})"
            );
        }
        if sent >= measure_from {
            if answer.ok {
                out.latency.saturating_record(nanos(done - sent));
            } else {
                out.errors += 1;
            }
        }
    }
    Ok(out)
}
