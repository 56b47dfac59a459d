//! gRPC-shaped unary calls over h2c (HTTP/2 with prior knowledge, cleartext), for
//! `meshbench grpc-echo` and `meshbench grpc`.
//!
//! **Wire shape** (what a gRPC stack sends, without protobuf): `POST /meshbench.Echo/Unary` with
//! `content-type: application/grpc` and `te: trailers`; the body is one length-prefixed message
//! (1 byte compressed flag = 0, 4 bytes big-endian length, the bytes). The answer is `200`,
//! `content-type: application/grpc`, the same message framed the same way, and the trailers
//! `grpc-status: 0`. A request that is not gRPC gets `415`; a malformed message gets
//! `grpc-status: 13` (INTERNAL) and no message.
//!
//! **Client** ([`run`]): calls over `conns` h2c connections (default one, as a gRPC channel),
//! each call its own stream. The message is `size` bytes and starts with the call's sequence
//! number; an answer counts as a success only if it is `200` + `grpc-status: 0` and echoes the
//! message exactly. Two loads:
//! - [`Load::Closed`]: N calls outstanding at all times, a new one as each finishes: req/s at a
//!   fixed concurrency, latency from the actual send.
//! - [`Load::Open`]: calls scheduled at a fixed rate whatever happens to earlier ones (the
//!   schedule runs on its own OS thread, sleeping then spinning, as in [`crate::latency`]);
//!   latency from the scheduled send, corrected for coordinated omission.
//!
//! Both report a [`LatencyReport`], the JSON shape of `meshbench latency` and `meshbench http`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::RecvStream;
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::latency::{histogram, nanos, wait_until, LatencyReport, Percentiles};

/// The method path of the echo call.
pub const PATH: &str = "/meshbench.Echo/Unary";
/// Largest message either side accepts (gRPC's default receive limit).
pub const MAX_MESSAGE: usize = 4 << 20;
const CONTENT_TYPE: &str = "application/grpc";

/// `message` with the 5-byte gRPC frame header (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// The one uncompressed message of a unary body, or why the body is not one.
pub fn unframe(body: &[u8]) -> Result<&[u8], &'static str> {
    let (head, rest) = body
        .split_at_checked(5)
        .ok_or("shorter than a message header")?;
    if head[0] != 0 {
        return Err("compressed or unknown flag");
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if rest.len() != len {
        return Err("length prefix does not match the body");
    }
    Ok(rest)
}

/// Reads a whole body (returning flow-control credit as it goes), up to `5 + MAX_MESSAGE` bytes.
async fn read_body(body: &mut RecvStream) -> anyhow::Result<BytesMut> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        ensure!(
            buf.len() + chunk.len() <= 5 + MAX_MESSAGE,
            "body over the message limit"
        );
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Serves the echo call on every h2c connection accepted from `listener`, forever.
pub async fn serve_echo(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            if let Err(e) = serve_connection(tcp).await {
                eprintln!("meshbench grpc-echo: {peer}: {e:#}");
            }
        });
    }
}

async fn serve_connection(tcp: TcpStream) -> anyhow::Result<()> {
    let mut conn = h2::server::handshake(tcp).await?;
    while let Some(request) = conn.accept().await {
        let (request, respond) = request?;
        tokio::spawn(async move {
            // A stream reset by the peer is its business, not the server's.
            let _ = answer(request, respond).await;
        });
    }
    Ok(())
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == CONTENT_TYPE || v.starts_with("application/grpc+"))
}

async fn answer(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> anyhow::Result<()> {
    if request.method() != Method::POST || !is_grpc(request.headers()) {
        let answer = Response::builder()
            .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .body(())?;
        respond.send_response(answer, true)?;
        return Ok(());
    }
    let mut body = request.into_body();
    let data = read_body(&mut body).await?;
    let head = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(())?;
    let mut send = respond.send_response(head, false)?;
    let mut trailers = HeaderMap::new();
    match unframe(&data) {
        Ok(message) => {
            send.send_data(frame(message), false)?;
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
        }
        Err(why) => {
            trailers.insert("grpc-status", HeaderValue::from_static("13"));
            trailers.insert("grpc-message", HeaderValue::from_static(why));
        }
    }
    send.send_trailers(trailers)?;
    Ok(())
}

/// The load of a client run.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// This many calls outstanding at all times.
    Closed(usize),
    /// Calls scheduled at this many per second.
    Open(f64),
}

/// Parameters of one client run.
#[derive(Clone, Debug)]
pub struct GrpcOptions {
    /// The echo server, or a proxy in front of one.
    pub addr: SocketAddr,
    /// `:authority` of the calls; the address when `None`.
    pub authority: Option<String>,
    /// Message size in bytes (at least 8: the sequence number).
    pub size: usize,
    /// h2c connections; calls go round-robin over them.
    pub conns: usize,
    pub load: Load,
    /// Measured duration (after the warm-up).
    pub duration: Duration,
    /// Leading period whose calls are made but not recorded.
    pub warmup: Duration,
    /// Open loop: how long before each scheduled send the scheduler stops sleeping and spins.
    pub spin: Duration,
    /// How long to wait for outstanding calls after the last send.
    pub drain: Duration,
}

/// The message of call `seq`: its sequence number, then filler.
pub fn message(seq: u64, size: usize) -> Bytes {
    let mut m = BytesMut::with_capacity(size.max(8));
    m.put_u64(seq);
    m.resize(size.max(8), 0x5A);
    m.freeze()
}

/// Opens one h2c connection (prior knowledge) and drives it in the background.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = h2::client::handshake(tcp).await.context("h2c handshake")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("meshbench grpc: connection: {e}");
        }
    });
    Ok(sender)
}

/// The URI of the echo call at `authority`.
pub fn uri(authority: &str) -> anyhow::Result<Uri> {
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(PATH)
        .build()
        .context("building the call's URI")
}

/// One unary call: `Ok(true)` for a correct echo with `grpc-status: 0`, `Ok(false)` for any other
/// answer (HTTP status, gRPC status, wrong message), `Err` if the stream or connection failed.
pub async fn call(sender: &SendRequest<Bytes>, uri: &Uri, msg: &[u8]) -> anyhow::Result<bool> {
    let mut sender = sender.clone().ready().await?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
        .header(http::header::TE, "trailers")
        .body(())?;
    let (response, mut send) = sender.send_request(request, false)?;
    // A server may answer (trailers-only, say) and close the stream before the message is
    // sent; then sending fails ("inactive stream") but the answer is what counts.
    let sent = send.send_data(frame(msg), true);
    let (head, mut body) = match response.await {
        Ok(answer) => answer.into_parts(),
        Err(e) => {
            sent?;
            return Err(e.into());
        }
    };
    let data = read_body(&mut body).await?;
    let trailers = body.trailers().await?;
    // A trailers-only answer carries grpc-status in the head; any such answer to this call is
    // a failure (it has no message).
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| head.headers.get("grpc-status"));
    Ok(head.status == StatusCode::OK
        && status.is_some_and(|s| s == "0")
        && unframe(&data) == Ok(msg))
}

/// What a run measured.
struct Stats {
    corrected: Histogram<u64>,
    uncorrected: Histogram<u64>,
    lateness: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        Ok(Stats {
            corrected: histogram()?,
            uncorrected: histogram()?,
            lateness: histogram()?,
            errors: 0,
            first_error: None,
        })
    }

    /// Records call outcome `r` scheduled at `scheduled`, sent at `sent`, answered at `done`.
    fn record(
        &mut self,
        r: anyhow::Result<bool>,
        scheduled: Instant,
        sent: Instant,
        done: Instant,
    ) {
        match r {
            Ok(true) => {
                self.corrected.saturating_record(nanos(done - scheduled));
                self.uncorrected.saturating_record(nanos(done - sent));
            }
            Ok(false) => self.errors += 1,
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

type Shared = Arc<Mutex<Stats>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs one measurement (see the module docs).
pub async fn run(opts: &GrpcOptions) -> anyhow::Result<LatencyReport> {
    ensure!(opts.conns > 0, "--conns must be at least 1");
    ensure!(opts.size >= 8, "--size must be at least 8 bytes");
    let authority = opts
        .authority
        .clone()
        .unwrap_or_else(|| opts.addr.to_string());
    let uri = uri(&authority)?;
    let mut senders = Vec::with_capacity(opts.conns);
    for _ in 0..opts.conns {
        senders.push(connect(opts.addr).await?);
    }
    let stats: Shared = Arc::new(Mutex::new(Stats::new()?));
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + opts.warmup;
    let end = measure_from + opts.duration;
    let mut tasks = JoinSet::new();
    let (rate, concurrency) = match opts.load {
        Load::Closed(n) => {
            ensure!(n > 0, "--concurrency must be at least 1");
            for k in 0..n {
                let (sender, uri, stats) =
                    (senders[k % opts.conns].clone(), uri.clone(), stats.clone());
                let size = opts.size;
                tasks.spawn(async move {
                    tokio::time::sleep_until(start.into()).await;
                    for seq in (k as u64..).step_by(n) {
                        let sent = Instant::now();
                        if sent >= end {
                            break;
                        }
                        let r = call(&sender, &uri, &message(seq, size)).await;
                        if sent >= measure_from {
                            lock(&stats).record(r, sent, sent, Instant::now());
                        }
                    }
                });
            }
            (0.0, Some(n))
        }
        Load::Open(rate) => {
            ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
            let spin = opts.spin;
            // Async timers tick in milliseconds: the schedule runs on an OS thread.
            let scheduler = std::thread::spawn(move || {
                for i in 0u64.. {
                    let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
                    if scheduled >= end {
                        break;
                    }
                    wait_until(scheduled, spin);
                    if tx.send((i, scheduled)).is_err() {
                        break;
                    }
                }
            });
            while let Some((i, scheduled)) = rx.recv().await {
                let sender = senders[(i % opts.conns as u64) as usize].clone();
                let (uri, stats, size) = (uri.clone(), stats.clone(), opts.size);
                tasks.spawn(async move {
                    let sent = Instant::now();
                    let r = call(&sender, &uri, &message(i, size)).await;
                    let done = Instant::now();
                    if scheduled >= measure_from {
                        let mut s = lock(&stats);
                        s.lateness.saturating_record(nanos(sent - scheduled));
                        s.record(r, scheduled, sent, done);
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            if scheduler.join().is_err() {
                anyhow::bail!("the scheduler thread panicked");
            }
            (rate, None)
        }
    };
    let drained = tokio::time::timeout_at((Instant::now().max(end) + opts.drain).into(), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let missing = if drained.is_ok() {
        0
    } else {
        tasks.len() as u64
    };
    tasks.abort_all();
    let s = lock(&stats);
    if let Some(e) = &s.first_error {
        eprintln!("meshbench grpc: {} failed call(s); first: {e}", s.errors);
    }
    let seconds = opts.duration.as_secs_f64();
    Ok(LatencyReport {
        rate,
        concurrency,
        size: opts.size,
        conns: opts.conns,
        seconds,
        requests: s.corrected.len(),
        missing,
        errors: s.errors,
        achieved_rps: s.corrected.len() as f64 / seconds.max(1e-9),
        corrected_us: Percentiles::of(&s.corrected),
        uncorrected_us: Percentiles::of(&s.uncorrected),
        send_lateness_us: Percentiles::of(&s.lateness),
    })
}
