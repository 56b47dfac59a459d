//! `meshbench`: load generator and targets for comparing meshnode with other tunnels.
//!
//! ```text
//! meshbench sink --listen 127.0.0.1:9000            # target for `bulk`
//! meshbench echo --listen 127.0.0.1:9001            # target for `latency` and `bulk --target echo`
//! meshbench bulk --connect 127.0.0.1:9000 --bytes 2GiB --repeat 3
//! meshbench latency --connect 127.0.0.1:9001 --rate 1000 --duration 10s --size 1024 --json
//! meshbench http-echo --listen 127.0.0.1:9080 --size 1024     # HTTP/1.1 target for `http`
//! meshbench http --connect 127.0.0.1:9080 --host web --rate 1000 --duration 10s --json
//! meshbench http --connect 127.0.0.1:9080 --concurrency 16 --duration 10s  # closed loop: req/s
//! meshbench grpc-echo --listen 127.0.0.1:9090                  # h2c gRPC-shaped unary echo
//! meshbench grpc --connect 127.0.0.1:9090 --rate 1000 --duration 10s --json
//! meshbench grpc --connect 127.0.0.1:9090 --concurrency 32 --duration 10s --json
//! meshbench quic-bulk-server --listen 127.0.0.1:9443
//! meshbench quic-bulk --connect 127.0.0.1:9443 --bytes 2GiB --repeat 3
//! meshbench h2-exit --listen 127.0.0.1:15008                  # HBONE-shaped pair (ztunnel's design)
//! meshbench h2-entry --exit 127.0.0.1:15008 --forward 127.0.0.1:9100=127.0.0.1:9000
//! ```
//! Servers print `meshbench <what> listening on ADDR` once bound, then run until SIGINT/SIGTERM.
//! Clients print a human summary, or one JSON object with `--json`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshnode_bench::closed;
use meshnode_bench::grpc::{self, GrpcOptions, Load};
use meshnode_bench::http::{self, HttpGet};
use meshnode_bench::latency::{self, LatencyOptions, LatencyReport};
use meshnode_bench::relay::control::parse_duration;
use meshnode_bench::tcp::{self, median, BulkRun, BulkTarget};
use meshnode_bench::{h2tunnel, quic};
use serde_json::json;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "meshbench",
    version,
    about = "meshnode benchmarks: load generator and targets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// TCP sink: reads length-prefixed transfers and acknowledges each with its byte count.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// TCP echo server.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// TCP bulk throughput against a sink (or an echo, verifying every byte read back).
    Bulk {
        #[arg(long)]
        connect: SocketAddr,
        /// Total bytes per run, split over the connections (suffixes K/M/G/KiB/MiB/GiB).
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        /// Parallel connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, value_enum, default_value_t = BulkTarget::Sink)]
        target: BulkTarget,
        /// Runs (fresh connections each); the median is reported.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[arg(long)]
        json: bool,
    },
    /// Open-loop request/response latency against an echo server at a fixed rate.
    Latency {
        /// Request (and response) size in bytes, at least 8.
        #[arg(long, value_parser = parse_size, default_value = "1024")]
        size: u64,
        /// Closed loop instead: this many connections, each sending its next request as soon
        /// as the previous answer is in (`--concurrency 1`: ping-pong on one connection;
        /// `--rate` and `--conns` are then ignored).
        #[arg(long)]
        concurrency: Option<usize>,
        #[command(flatten)]
        run: OpenLoop,
    },
    /// HTTP/1.1 server (keep-alive) answering every request with `200` and a fixed-size body.
    HttpEcho {
        #[arg(long)]
        listen: SocketAddr,
        /// Response body size in bytes.
        #[arg(long, value_parser = parse_size, default_value = "1024")]
        size: u64,
    },
    /// Open-loop HTTP/1.1 GETs at a fixed rate over a pool of keep-alive connections, to an
    /// `http-echo` directly or through an HTTP proxy (origin-form, routed by `Host`).
    Http {
        /// `Host` header: the mesh service name when `--connect` is meshnode's HTTP proxy.
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Origin-form request target.
        #[arg(long, default_value = "/")]
        path: String,
        /// Expected response body size: a 2xx with another length counts as an error.
        #[arg(long, value_parser = parse_size)]
        expect_size: Option<u64>,
        /// Closed loop instead: this many keep-alive connections, each sending its next request
        /// as soon as the previous answer is in (`--rate` and `--conns` are then ignored).
        #[arg(long)]
        concurrency: Option<usize>,
        #[command(flatten)]
        run: OpenLoop,
    },
    /// gRPC-shaped unary echo over h2c (prior knowledge): answers each `application/grpc` POST
    /// with its own message and `grpc-status: 0` trailers.
    GrpcEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// gRPC-shaped unary calls over h2c: closed loop at `--concurrency` (req/s) or open loop at
    /// `--rate` (latency from the scheduled send).
    Grpc {
        #[arg(long)]
        connect: SocketAddr,
        /// `:authority` of the calls [the --connect address].
        #[arg(long)]
        authority: Option<String>,
        /// Message bytes (request and answer), at least 8.
        #[arg(long, value_parser = parse_size, default_value = "1024")]
        size: u64,
        /// h2c connections, calls round-robin over them (streams multiplexed on each).
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Closed loop: calls outstanding at once.
        #[arg(long, conflicts_with = "rate", required_unless_present = "rate")]
        concurrency: Option<usize>,
        /// Open loop: calls per second.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        warmup: Duration,
        /// Open loop: spin (instead of sleeping) for this long before each send.
        #[arg(long, value_parser = parse_duration, default_value = "100us")]
        spin: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Opens N connections to an echo target (one byte each way, so every tunnel is really
    /// open), prints "idle N open" and holds them until SIGINT/SIGTERM: memory per tunnel.
    Idle {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
    },
    /// Raw quinn bulk receiver (self-signed certificate): the QUIC throughput ceiling.
    QuicBulkServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Raw quinn bulk sender: one connection; per run, `--bytes` split over `--streams`
    /// concurrent streams (meshnode carries N tunnels as N streams of one peer connection).
    QuicBulk {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[arg(long)]
        json: bool,
    },
    /// Exit of an HBONE-shaped tunnel pair (TLS 1.3 + HTTP/2 CONNECT, as ztunnel between nodes):
    /// each CONNECT opens a TCP connection to its authority.
    H2Exit {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Entry of the HBONE-shaped pair: one TLS + HTTP/2 connection to the exit, and a CONNECT
    /// stream on it for each connection to a `--forward LISTEN=TARGET` listener.
    H2Entry {
        #[arg(long)]
        exit: SocketAddr,
        /// `LISTEN=TARGET`, e.g. `127.0.0.1:9000=127.0.0.1:7000`; repeatable.
        #[arg(long = "forward", value_parser = parse_forward, required = true)]
        forwards: Vec<(SocketAddr, String)>,
    },
}

/// Parses `LISTEN=TARGET` (a socket address, then any `host:port`).
fn parse_forward(text: &str) -> Result<(SocketAddr, String), String> {
    let (listen, target) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected LISTEN=TARGET"))?;
    let listen = listen
        .parse()
        .map_err(|e| format!("{listen:?}: not a socket address: {e}"))?;
    if !target.contains(':') {
        return Err(format!("{target:?}: expected host:port"));
    }
    Ok((listen, target.to_owned()))
}

/// Parses `1024`, `64K`, `2GiB`, ... (K/M/G are decimal, KiB/MiB/GiB binary).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("bad size {text:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Prints bulk runs as text or JSON, with their median.
fn report_bulk(what: &str, conns: usize, runs: &[BulkRun], json: bool) {
    let rates: Vec<f64> = runs.iter().map(|r| r.gbps).collect();
    let med = median(&rates);
    if json {
        let out = json!({ "what": what, "conns": conns, "runs": runs, "median_gbps": med });
        println!("{out}");
    } else {
        for (i, r) in runs.iter().enumerate() {
            println!(
                "{what} run {}: {} bytes in {:.3} s = {:.2} Gbit/s",
                i + 1,
                r.bytes,
                r.seconds,
                r.gbps
            );
        }
        println!(
            "{what} median over {} run(s), {conns} connection(s): {med:.2} Gbit/s",
            runs.len()
        );
    }
}

/// Prints a latency report as text or one JSON object.
fn print_latency(report: &LatencyReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    if let Some(n) = report.concurrency {
        println!(
            "{} requests in {:.1} s at concurrency {n} over {} connection(s): {:.1} req/s, {} B, {} errors, {} missing",
            report.requests, report.seconds, report.conns, report.achieved_rps, report.size,
            report.errors, report.missing
        );
        let p = &report.uncorrected_us;
        println!(
            "latency      p50 {:>8.1}  p90 {:>8.1}  p99 {:>8.1}  p99.9 {:>8.1}  max {:>9.1} µs",
            p.p50, p.p90, p.p99, p.p999, p.max
        );
        return Ok(());
    }
    let row = |name: &str, p: &latency::Percentiles| {
        println!(
            "{name:<12} p50 {:>8.1}  p90 {:>8.1}  p99 {:>8.1}  p99.9 {:>8.1}  max {:>9.1} µs",
            p.p50, p.p90, p.p99, p.p999, p.max
        )
    };
    println!(
        "{} requests at {} req/s ({:.1} achieved), {} B, {} connection(s), {} errors, {} missing",
        report.requests,
        report.rate,
        report.achieved_rps,
        report.size,
        report.conns,
        report.errors,
        report.missing
    );
    row("corrected", &report.corrected_us);
    row("uncorrected", &report.uncorrected_us);
    row("send late", &report.send_lateness_us);
    Ok(())
}

async fn serve_tcp(what: &str, listen: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("meshbench {what} listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// Resolves when the process is asked to stop.
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// The flags of an open-loop latency run, shared by `latency` and `http`.
#[derive(clap::Args, Debug)]
struct OpenLoop {
    #[arg(long)]
    connect: SocketAddr,
    /// Requests per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured duration, e.g. `10s`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unrecorded lead-in, e.g. `1s`.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Connections in the pool (keep-alive for `http`); requests go round-robin and are
    /// pipelined.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Spin (instead of sleeping) for this long before each send, for timer accuracy.
    #[arg(long, value_parser = parse_duration, default_value = "100us")]
    spin: Duration,
    #[arg(long)]
    json: bool,
}

impl OpenLoop {
    /// The run's options, with `size` bytes per request (or expected per answer).
    fn options(&self, size: usize) -> LatencyOptions {
        LatencyOptions {
            addr: self.connect,
            rate: self.rate,
            duration: self.duration,
            warmup: self.warmup,
            size,
            conns: self.conns,
            spin: self.spin,
            drain: Duration::from_secs(10),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Idle { connect, conns } => {
            let mut held = Vec::with_capacity(conns);
            for i in 0..conns {
                let mut s = tokio::net::TcpStream::connect(connect)
                    .await
                    .with_context(|| format!("connection {i}"))?;
                tokio::io::AsyncWriteExt::write_all(&mut s, b"x").await?;
                let mut b = [0u8; 1];
                tokio::io::AsyncReadExt::read_exact(&mut s, &mut b)
                    .await
                    .with_context(|| format!("echo on connection {i}"))?;
                held.push(s);
            }
            println!("idle {} open", held.len());
            stop_signal().await?;
        }
        Command::Sink { listen } => {
            let listener = serve_tcp("sink", listen).await?;
            tokio::select! { r = tcp::run_sink(listener) => r?, r = stop_signal() => r? }
        }
        Command::Echo { listen } => {
            let listener = serve_tcp("echo", listen).await?;
            tokio::select! { r = tcp::run_echo(listener) => r?, r = stop_signal() => r? }
        }
        Command::Bulk {
            connect,
            bytes,
            conns,
            target,
            repeat,
            json,
        } => {
            let runs = tokio::task::spawn_blocking(move || {
                (0..repeat.max(1))
                    .map(|_| tcp::bulk(connect, bytes, conns, target))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .await??;
            report_bulk("bulk", conns, &runs, json);
        }
        Command::Latency {
            size,
            concurrency,
            run,
        } => {
            let size = usize::try_from(size).context("--size is too large")?;
            anyhow::ensure!(size >= 8, "--size must be at least 8 bytes");
            let opts = run.options(size);
            let report = tokio::task::spawn_blocking(move || match concurrency {
                Some(n) => closed::run_closed(&opts, n, latency::Echo { size }),
                None => latency::run(&opts),
            })
            .await??;
            print_latency(&report, run.json)?;
        }
        Command::HttpEcho { listen, size } => {
            let size = usize::try_from(size).context("--size is too large")?;
            let listener = serve_tcp("http-echo", listen).await?;
            let body = bytes::Bytes::from(vec![b'x'; size]);
            tokio::select! { r = http::serve_echo(listener, body) => r?, r = stop_signal() => r? }
        }
        Command::Http {
            host,
            path,
            expect_size,
            concurrency,
            run,
        } => {
            anyhow::ensure!(path.starts_with('/'), "--path must start with /");
            let opts = run.options(usize::try_from(expect_size.unwrap_or(0)).unwrap_or(usize::MAX));
            let protocol = HttpGet {
                host,
                path,
                expect_size,
            };
            let report = tokio::task::spawn_blocking(move || match concurrency {
                Some(n) => closed::run_closed(&opts, n, protocol),
                None => latency::run_with(&opts, protocol),
            })
            .await??;
            print_latency(&report, run.json)?;
        }
        Command::GrpcEcho { listen } => {
            let listener = serve_tcp("grpc-echo", listen).await?;
            tokio::select! { r = grpc::serve_echo(listener) => r?, r = stop_signal() => r? }
        }
        Command::Grpc {
            connect,
            authority,
            size,
            conns,
            concurrency,
            rate,
            duration,
            warmup,
            spin,
            json,
        } => {
            let load = match (concurrency, rate) {
                (Some(n), _) => Load::Closed(n),
                (None, Some(r)) => Load::Open(r),
                (None, None) => anyhow::bail!("give --concurrency or --rate"),
            };
            let opts = GrpcOptions {
                addr: connect,
                authority,
                size: usize::try_from(size).context("--size is too large")?,
                conns,
                load,
                duration,
                warmup,
                spin,
                drain: Duration::from_secs(10),
            };
            let report = grpc::run(&opts).await?;
            print_latency(&report, json)?;
        }
        Command::QuicBulkServer { listen } => {
            let server = quic::serve(listen, |addr| {
                println!("meshbench quic-bulk-server listening on {addr}");
            });
            tokio::select! { r = server => r?, r = stop_signal() => r? }
        }
        Command::H2Exit { listen } => {
            let exit = h2tunnel::run_exit(listen, |addr| {
                println!("meshbench h2-exit listening on {addr}");
            });
            tokio::select! { r = exit => r?, r = stop_signal() => r? }
        }
        Command::H2Entry { exit, forwards } => {
            let entry = h2tunnel::run_entry(exit, &forwards, |bound| {
                for (listen, (_, target)) in bound.iter().zip(&forwards) {
                    println!("meshbench h2-entry listening on {listen} for {target}");
                }
            });
            tokio::select! { r = entry => r?, r = stop_signal() => r? }
        }
        Command::QuicBulk {
            connect,
            bytes,
            streams,
            repeat,
            json,
        } => {
            let (endpoint, connection) = quic::connect(connect).await?;
            let mut runs = Vec::new();
            for _ in 0..repeat.max(1) {
                runs.push(quic::bulk(&connection, bytes, streams).await?);
            }
            connection.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            report_bulk("quic-bulk", streams, &runs, json);
        }
    }
    Ok(())
}
