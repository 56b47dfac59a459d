//! HTTP/2 bad input on the `[http_proxy]` port of a real `meshnode` process (node-a, with
//! `web` on node-b, on a real etcd), from clients written frame by frame
//! (`common::h2`): more streams than advertised, header lists past the 64 KiB limit, a
//! CONTINUATION flood (CVE-2024-27316), protocol errors and a bad preface. Each gets its
//! RST_STREAM, 431 or GOAWAY, GOAWAYs are counted in `meshnode_http_rejected_total`, and a
//! well-behaved h2c client whose stream is in flight throughout (another connection, or
//! another stream of the same one) is served without noticing (docs/behaviour.md, HTTP proxy).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use common::cluster::{service_endpoints, until, Cluster};
use common::h2::{self, app, text, Frame, Frames, Next, TestBody};
use common::process::{free_tcp, NodeProcess};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame as BodyFrame;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);
/// How long the node has to answer a bad frame (it answers in milliseconds).
const ANSWER: Duration = Duration::from_secs(5);

/// These tests measure time and memory on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Mesh {
    _cluster: Cluster,
    a: NodeProcess,
    _b: NodeProcess,
    proxy: SocketAddr,
}

/// node-a (the proxy) and node-b (`web`, an HTTP/1.1 application answering "B HTTP/1.1" and
/// echoing POST /echo), real processes on a real etcd.
async fn mesh() -> Result<Mesh> {
    let cluster = Cluster::new(&["node-a", "node-b"]).await?;
    let web = app("B", false).await?;
    let b = cluster
        .node(
            "node-b",
            &format!("[[service]]\nname = \"web\"\nprotocol = \"http\"\ntarget = \"{web}\"\n"),
        )
        .await?;
    let proxy = free_tcp()?;
    let a = cluster
        .node("node-a", &format!("[http_proxy]\nlisten = \"{proxy}\"\n"))
        .await?;
    until(
        "node-a to route web to node-b",
        Duration::from_secs(20),
        async || Ok(service_endpoints(&a, "web").await? == ["node-b"]),
    )
    .await?;
    Ok(Mesh {
        _cluster: cluster,
        a,
        _b: b,
        proxy,
    })
}

type BodySender = tokio::sync::mpsc::Sender<Result<BodyFrame<Bytes>, hyper::Error>>;

/// A well-behaved h2c client (hyper) on a connection of its own, with a POST /echo in flight:
/// started before the bad input, finished after it.
struct Good {
    sender: hyper::client::conn::http2::SendRequest<TestBody>,
    tx: BodySender,
    body: hyper::body::Incoming,
}

impl Good {
    /// Opens the connection and the echo stream, and waits until its first bytes came back.
    async fn start(proxy: SocketAddr) -> Result<Good> {
        let tcp = TcpStream::connect(proxy).await?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let frames =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let req = Request::post("http://web/echo").body(StreamBody::new(frames).boxed())?;
        tx.send(Ok(BodyFrame::data(Bytes::from_static(b"before "))))
            .await
            .ok()
            .context("body channel")?;
        let resp = tokio::time::timeout(ANSWER, sender.send_request(req)).await??;
        ensure!(
            resp.status() == StatusCode::OK,
            "echo answered {}",
            resp.status()
        );
        let mut body = resp.into_body();
        let first = tokio::time::timeout(ANSWER, body.frame())
            .await?
            .context("echo body ended")??;
        ensure!(
            first.data_ref().map(|d| &d[..]) == Some(&b"before "[..]),
            "echo sent {first:?}"
        );
        Ok(Good { sender, tx, body })
    }

    /// Ends the echo stream and checks the rest came back; then a new request on the same
    /// connection. Returns how long the new request took.
    async fn finish(mut self) -> Result<Duration> {
        self.tx
            .send(Ok(BodyFrame::data(Bytes::from_static(b"after"))))
            .await
            .ok()
            .context("body channel")?;
        drop(self.tx);
        let rest = tokio::time::timeout(ANSWER, self.body.collect()).await??;
        ensure!(
            rest.to_bytes() == "after",
            "the in-flight echo was disturbed"
        );
        get(&mut self.sender).await
    }
}

/// GET http://web/ on `sender`: 200 "B HTTP/1.1"; how long it took.
async fn get(sender: &mut hyper::client::conn::http2::SendRequest<TestBody>) -> Result<Duration> {
    let t = Instant::now();
    let req = Request::get("http://web/").body(text(Bytes::new()))?;
    let resp = tokio::time::timeout(ANSWER, sender.send_request(req)).await??;
    ensure!(
        resp.status() == StatusCode::OK,
        "GET answered {}",
        resp.status()
    );
    let body = tokio::time::timeout(ANSWER, resp.into_body().collect()).await??;
    ensure!(body.to_bytes() == "B HTTP/1.1", "GET body");
    Ok(t.elapsed())
}

/// A fresh well-behaved connection: one GET.
async fn fresh_get(proxy: SocketAddr) -> Result<Duration> {
    let tcp = TcpStream::connect(proxy).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    get(&mut sender).await
}

/// A raw connection that has sent the preface and an empty SETTINGS.
async fn raw(
    proxy: SocketAddr,
) -> Result<(
    Frames<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let (r, mut w) = tcp.into_split();
    w.write_all(&h2::client_start()).await?;
    Ok((Frames::new(r), w))
}

/// The value of `meshnode_http_rejected_total{reason}` on `node`.
async fn rejected(node: &NodeProcess, reason: &str) -> Result<f64> {
    let (code, text) = node.get("/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    let want = format!("meshnode_http_rejected_total{{reason=\"{reason}\"}}");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&want))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits until `meshnode_http_rejected_total{reason}` is `want` (a refusal is counted when the
/// connection's task ends, just after the client saw it close); fails if it passes it.
async fn counted(node: &NodeProcess, reason: &str, want: f64) -> Result<()> {
    let mut now = 0.0;
    let end = Instant::now() + ANSWER;
    while Instant::now() < end {
        now = rejected(node, reason).await?;
        if now >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        now == want,
        "meshnode_http_rejected_total{{reason=\"{reason}\"}} is {now}, not {want}"
    );
    Ok(())
}

/// Resident memory of a process, KiB (VmRSS).
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The SETTINGS the server sent first, as (id, value) pairs.
async fn server_settings<R: tokio::io::AsyncRead + Unpin>(
    frames: &mut Frames<R>,
) -> Result<Vec<(u16, u32)>> {
    loop {
        match frames.next(ANSWER).await {
            Next::Frame(f) if f.kind == h2::SETTINGS && f.flags & h2::ACK == 0 => {
                return Ok(f
                    .payload
                    .chunks_exact(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect());
            }
            Next::Frame(_) => continue,
            other => bail!("no SETTINGS from the server: {other:?}"),
        }
    }
}

/// Frames on `stream` until one ends it (END_STREAM or RST_STREAM), within `wait`.
async fn stream_frames<R: tokio::io::AsyncRead + Unpin>(
    frames: &mut Frames<R>,
    stream: u32,
    wait: Duration,
    others: &mut Vec<Frame>,
) -> Result<Vec<Frame>> {
    let end = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        match frames.next(left).await {
            Next::Frame(f) if f.stream == stream => {
                let done = f.kind == h2::RST_STREAM
                    || (matches!(f.kind, h2::DATA | h2::HEADERS) && f.flags & h2::END_STREAM != 0);
                out.push(f);
                if done {
                    return Ok(out);
                }
            }
            Next::Frame(f) => others.push(f),
            other => bail!("stream {stream} not ended: {other:?}; its frames {out:?}"),
        }
    }
}

/// The DATA bytes among `frames`.
fn data(frames: &[Frame]) -> Vec<u8> {
    frames
        .iter()
        .filter(|f| f.kind == h2::DATA)
        .flat_map(|f| f.payload.iter().copied())
        .collect()
}

/// Opens streams `ids` (POST /echo, body not ended: each stays open) and reads until
/// `refusals` RST_STREAM(REFUSED_STREAM) came, or a GOAWAY, or nothing more for 300 ms.
/// Returns the refused streams, any other reset, and the GOAWAY's code.
async fn open_streams<R: tokio::io::AsyncRead + Unpin>(
    frames: &mut Frames<R>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    ids: impl Iterator<Item = u32>,
) -> Result<(Vec<u32>, Vec<Frame>, Option<u32>)> {
    let block = h2::request_block("POST", "/echo", "web");
    let mut out = Vec::new();
    for id in ids {
        out.extend(h2::frame(h2::HEADERS, h2::END_HEADERS, id, &block));
    }
    w.write_all(&out).await?;
    let (mut refused, mut other, mut goaway) = (Vec::new(), Vec::new(), None);
    loop {
        match frames.next(Duration::from_millis(300)).await {
            Next::Frame(f) if f.reset_code() == Some(h2::REFUSED_STREAM) => refused.push(f.stream),
            Next::Frame(f) if f.kind == h2::RST_STREAM => other.push(f),
            Next::Frame(f) if f.kind == h2::GOAWAY => {
                goaway = f.goaway_code();
                break;
            }
            Next::Frame(_) => {}
            Next::TimedOut => break,
            Next::Closed => bail!("closed without GOAWAY after {} refusals", refused.len()),
        }
    }
    Ok((refused, other, goaway))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_max_concurrent_streams_are_refused_and_the_rest_served() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(LIMIT, async {
        let m = mesh().await?;
        let good = Good::start(m.proxy).await?;
        let calm_before = rejected(&m.a, "h2_enhance_your_calm").await?;
        let (mut frames, mut w) = raw(m.proxy).await?;
        // The proxy advertises its limit: SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 256.
        let settings = server_settings(&mut frames).await?;
        let limit = settings
            .iter()
            .find(|(id, _)| *id == 0x3)
            .map(|(_, v)| *v)
            .context("no SETTINGS_MAX_CONCURRENT_STREAMS")?;
        assert_eq!(limit, 256, "{settings:?}");

        // 276 streams opened at once: the 20 past the 256th (ids 513..551) are refused with
        // REFUSED_STREAM (not processed: a client may send them again); the connection goes on.
        let (refused, other, goaway) =
            open_streams(&mut frames, &mut w, (0..276u32).map(|i| 2 * i + 1)).await?;
        eprintln!("276 streams on a limit of 256: refused {refused:?}, other resets {other:?}, GOAWAY {goaway:?}");
        assert_eq!(refused, (256..276u32).map(|i| 2 * i + 1).collect::<Vec<_>>());
        assert!(other.is_empty() && goaway.is_none());

        // The open streams are served: stream 1's body ends and its echo comes back whole.
        w.write_all(&h2::frame(h2::DATA, h2::END_STREAM, 1, b"one")).await?;
        let mut others: Vec<Frame> = Vec::new();
        let one = stream_frames(&mut frames, 1, ANSWER, &mut others).await?;
        assert_eq!(data(&one), b"one", "{one:?}");
        // With stream 1 closed there is room for one more: a GET on a new stream is served.
        let get = h2::request_block("GET", "/", "web");
        w.write_all(&h2::frame(h2::HEADERS, h2::END_HEADERS | h2::END_STREAM, 553, &get))
            .await?;
        let new = stream_frames(&mut frames, 553, ANSWER, &mut others).await?;
        assert_eq!(data(&new), b"B HTTP/1.1", "{new:?}");
        assert!(
            others.iter().all(|f| f.kind != h2::GOAWAY && f.kind != h2::RST_STREAM),
            "{others:?}"
        );

        // 20 more: the first takes the room stream 553 left; a connection has 32 refusals
        // (and resets for its errors) in all, so 12 are refused and the next one closes the
        // connection with GOAWAY ENHANCE_YOUR_CALM, counted.
        let (refused, other, goaway) =
            open_streams(&mut frames, &mut w, (277..297u32).map(|i| 2 * i + 1)).await?;
        eprintln!("20 more: refused {refused:?}, other resets {other:?}, GOAWAY {goaway:?}");
        assert_eq!(refused.len(), 12, "{refused:?}");
        assert_eq!(goaway, Some(h2::ENHANCE_YOUR_CALM));
        assert!(frames.closed_within(ANSWER).await, "connection left open after GOAWAY");
        counted(&m.a, "h2_enhance_your_calm", calm_before + 1.0).await?;

        // Another connection's stream in flight throughout is unaffected.
        let took = good.finish().await?;
        eprintln!("well-behaved connection: GET after the refusals took {took:?}");
        drop(w);
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_lists_past_the_limit_get_431_or_goaway() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(LIMIT, async {
        let m = mesh().await?;
        let good = Good::start(m.proxy).await?;
        let calm_before = rejected(&m.a, "h2_enhance_your_calm").await?;

        // (1) 80 KB of headers (five 16,000-byte fields, in HEADERS and four CONTINUATION
        // frames), beside a POST /echo in flight on the same connection.
        let (mut frames, mut w) = raw(m.proxy).await?;
        let echo = h2::request_block("POST", "/echo", "web");
        w.write_all(&h2::frame(h2::HEADERS, h2::END_HEADERS, 1, &echo))
            .await?;
        w.write_all(&h2::frame(h2::DATA, 0, 1, b"in ")).await?;
        let big = |i: usize| h2::literal(format!("x-big{i}").as_bytes(), &[b'a'; 16_000]);
        let mut first = h2::request_block("GET", "/", "web");
        first.extend(big(0));
        let mut out = h2::frame(h2::HEADERS, h2::END_STREAM, 3, &first);
        for i in 1..5 {
            let flags = if i == 4 { h2::END_HEADERS } else { 0 };
            out.extend(h2::frame(h2::CONTINUATION, flags, 3, &big(i)));
        }
        w.write_all(&out).await?;
        let mut others = Vec::new();
        let three = stream_frames(&mut frames, 3, ANSWER, &mut others).await?;
        // A 431 response that ends the stream.
        let head = three
            .iter()
            .find(|f| f.kind == h2::HEADERS)
            .context("no answer on stream 3")?;
        assert_eq!(head.status(), Some(431), "{three:?}");
        assert!(head.flags & h2::END_STREAM != 0, "{three:?}");
        // The other stream of the connection goes on.
        w.write_all(&h2::frame(h2::DATA, h2::END_STREAM, 1, b"out"))
            .await?;
        let mut one: Vec<Frame> = others.iter().filter(|f| f.stream == 1).cloned().collect();
        one.extend(stream_frames(&mut frames, 1, ANSWER, &mut others).await?);
        assert_eq!(data(&one), b"in out", "{one:?}");
        assert!(others.iter().all(|f| f.kind != h2::GOAWAY), "{others:?}");
        eprintln!("80 KB header list: stream answered 431, the connection's other stream served");

        // (2) An HPACK bomb: one 4,000-byte field put in the dynamic table, then referenced
        // 100 times (one byte each): 400 KB of headers from 4 KB on the wire. Past 4 × the
        // limit h2 stops decoding and closes the connection.
        let (mut frames, mut w) = raw(m.proxy).await?;
        let mut block = h2::request_block("GET", "/", "web");
        block.extend(h2::indexed_literal(b"x-bomb", &[b'b'; 4000]));
        block.extend(std::iter::repeat_n(0xbe, 100)); // indexed field 62: the newest entry
        let t = Instant::now();
        w.write_all(&h2::frame(
            h2::HEADERS,
            h2::END_HEADERS | h2::END_STREAM,
            1,
            &block,
        ))
        .await?;
        let mut seen = Vec::new();
        let goaway = match frames.until_goaway(ANSWER, &mut seen).await {
            Next::Frame(f) => f.goaway_code(),
            other => bail!("no GOAWAY: {other:?}, {seen:?}"),
        };
        let closed = frames.closed_within(ANSWER).await;
        eprintln!(
            "HPACK bomb ({} bytes for 400 KB): GOAWAY {goaway:?} after {:?}, closed {closed}",
            block.len(),
            t.elapsed()
        );
        assert_eq!(goaway, Some(h2::ENHANCE_YOUR_CALM));
        assert!(closed, "connection left open after GOAWAY");

        let took = good.finish().await?;
        eprintln!("well-behaved connection: GET afterwards took {took:?}");
        // The bomb, counted once.
        counted(&m.a, "h2_enhance_your_calm", calm_before + 1.0).await?;
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// The most a flood writes: more than loopback socket buffers hold (here 32 MiB receive,
/// 4 MiB send at most), so only a node that keeps reading takes it all.
const FLOOD: usize = 64 << 20;

/// Writes `chunk` (whole frames) until the connection fails or `max` bytes are written;
/// returns the bytes written and how long the writes went on.
async fn flood(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    chunk: Vec<u8>,
    max: usize,
) -> (usize, Duration) {
    let t = Instant::now();
    let mut written = 0;
    while written < max {
        match tokio::time::timeout(Duration::from_secs(10), w.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            _ => break,
        }
    }
    (written, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off_in_bounded_memory_and_time() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(LIMIT, async {
        let m = mesh().await?;
        let good = Good::start(m.proxy).await?;
        let pid = m.a.child.id();
        let calm_before = rejected(&m.a, "h2_enhance_your_calm").await?;
        let protocol_before = rejected(&m.a, "h2_protocol_error").await?;
        let rss_before = rss_kib(pid)?;
        let mut worst_rss = rss_before;
        // Floods, each a HEADERS frame without END_HEADERS and then CONTINUATION frames that
        // never end the block (64 MiB of them if the node read them all): (a) empty ones;
        // (b) 16 KiB ones, the bytes of one header value declared 200 MB long; (c) 16 KiB
        // ones, each a whole 16,000-byte header; (d) as (b) with the value declared 1 GiB
        // long, a length past what HPACK decoding takes (an integer of more than 5 bytes):
        // a protocol error at the first frame.
        let empty = h2::frame(h2::CONTINUATION, 0, 1, &[]);
        let raw_bytes = h2::frame(h2::CONTINUATION, 0, 1, &[b'x'; 16_384]);
        let whole = h2::frame(h2::CONTINUATION, 0, 1, &h2::literal(b"x-flood", &[b'x'; 16_000]));
        let mut long = h2::request_block("GET", "/", "web");
        long.push(0x00);
        long.extend(h2::hpack_string(b"x-flood"));
        let mut longest = long.clone();
        long.extend(h2::hpack_int(0x00, 7, 200 << 20));
        longest.extend(h2::hpack_int(0x00, 7, 1 << 30));
        let get = h2::request_block("GET", "/", "web");
        for (name, start, frame, want) in [
            ("empty", get.clone(), empty, h2::ENHANCE_YOUR_CALM),
            ("16 KiB of one 200 MB value", long, raw_bytes.clone(), h2::ENHANCE_YOUR_CALM),
            ("16 KiB, a whole header each", get, whole, h2::ENHANCE_YOUR_CALM),
            ("16 KiB of one 1 GiB value", longest, raw_bytes.clone(), h2::PROTOCOL_ERROR),
        ] {
            let (mut frames, mut w) = raw(m.proxy).await?;
            w.write_all(&h2::frame(h2::HEADERS, h2::END_STREAM, 1, &start)).await?;
            let t = Instant::now();
            let chunk: Vec<u8> = std::iter::repeat_n(frame, 64).flatten().collect();
            let writer = tokio::spawn(flood(w, chunk, FLOOD));
            let mut seen = Vec::new();
            let goaway = frames.until_goaway(ANSWER, &mut seen).await;
            let at = t.elapsed();
            let closed = frames.closed_within(ANSWER).await;
            let (written, writing) = writer.await?;
            worst_rss = worst_rss.max(rss_kib(pid)?);
            let code = match goaway {
                Next::Frame(f) => f.goaway_code(),
                other => bail!("{name}: no GOAWAY: {other:?}"),
            };
            eprintln!("CONTINUATION flood ({name} frames): GOAWAY {code:?} after {at:?}, closed {closed}; client wrote {written} bytes in {writing:?} before its writes failed");
            assert_eq!(code, Some(want), "{name}");
            assert!(at < Duration::from_secs(2), "{name}: GOAWAY only after {at:?}");
            assert!(closed, "{name}: connection left open after GOAWAY");
            // The node stopped reading: what the client got written is socket buffers, not a
            // node holding the flood.
            assert!(written < FLOOD, "{name}: the node read the whole flood ({written} bytes)");
        }
        let grew = worst_rss.saturating_sub(rss_before);
        eprintln!("node-a resident memory: {rss_before} KiB before, at most {worst_rss} KiB during (+{grew} KiB)");
        assert!(grew < 32 * 1024, "node-a grew by {grew} KiB");
        let took = good.finish().await?;
        eprintln!("well-behaved connection: GET afterwards took {took:?}");
        assert!(fresh_get(m.proxy).await? < ANSWER);
        // Each flood, counted once.
        counted(&m.a, "h2_enhance_your_calm", calm_before + 3.0).await?;
        counted(&m.a, "h2_protocol_error", protocol_before + 1.0).await?;
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_and_bad_prefaces_get_goaway_and_are_counted() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(LIMIT, async {
        let m = mesh().await?;
        let good = Good::start(m.proxy).await?;
        let before = rejected(&m.a, "h2_protocol_error").await?;
        let get = h2::request_block("GET", "/", "web");
        let after_settings = |bytes: Vec<u8>| {
            let mut out = h2::client_start();
            out.extend(bytes);
            out
        };
        // (what, bytes from the connection's start, the GOAWAY code sent). Each is the one RFC
        // 9113 asks for, but for a SETTINGS ACK with a payload and a PING of 7 bytes (§6.5,
        // §6.7: FRAME_SIZE_ERROR), where hyper's h2 says PROTOCOL_ERROR: a GOAWAY all the same.
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            (
                "DATA on stream 0",
                after_settings(h2::frame(h2::DATA, 0, 0, b"x")),
                h2::PROTOCOL_ERROR,
            ),
            (
                "HEADERS on stream 0",
                after_settings(h2::frame(
                    h2::HEADERS,
                    h2::END_HEADERS | h2::END_STREAM,
                    0,
                    &get,
                )),
                h2::PROTOCOL_ERROR,
            ),
            (
                "SETTINGS on stream 1",
                after_settings(h2::frame(h2::SETTINGS, 0, 1, &[])),
                h2::PROTOCOL_ERROR,
            ),
            (
                "PING on stream 1",
                after_settings(h2::frame(h2::PING, 0, 1, &[0; 8])),
                h2::PROTOCOL_ERROR,
            ),
            (
                "WINDOW_UPDATE of 0 on stream 0",
                after_settings(h2::frame(h2::WINDOW_UPDATE, 0, 0, &[0; 4])),
                h2::PROTOCOL_ERROR,
            ),
            (
                "CONTINUATION without HEADERS",
                after_settings(h2::frame(h2::CONTINUATION, h2::END_HEADERS, 1, &get)),
                h2::PROTOCOL_ERROR,
            ),
            (
                "HEADERS on an even (server) stream",
                after_settings(h2::frame(
                    h2::HEADERS,
                    h2::END_HEADERS | h2::END_STREAM,
                    2,
                    &get,
                )),
                h2::PROTOCOL_ERROR,
            ),
            (
                "SETTINGS ACK with a payload",
                after_settings(h2::frame(h2::SETTINGS, h2::ACK, 0, &[0; 6])),
                h2::PROTOCOL_ERROR,
            ),
            (
                "PING of 7 bytes",
                after_settings(h2::frame(h2::PING, 0, 0, &[0; 7])),
                h2::PROTOCOL_ERROR,
            ),
            (
                "DATA over SETTINGS_MAX_FRAME_SIZE",
                after_settings(h2::frame(h2::DATA, 0, 1, &[0; 20_000])),
                h2::FRAME_SIZE_ERROR,
            ),
            (
                "preface: magic, then PING instead of SETTINGS",
                [h2::PREFACE, &h2::frame(h2::PING, 0, 0, &[0; 8])].concat(),
                h2::PROTOCOL_ERROR,
            ),
            (
                "preface: magic, then bytes that are no frame",
                [h2::PREFACE, b"hello, this is not a frame at all"].concat(),
                h2::PROTOCOL_ERROR,
            ),
        ];
        let mut outcomes = Vec::new();
        for (what, bytes, want) in &cases {
            let mut tcp = TcpStream::connect(m.proxy).await?;
            let t = Instant::now();
            tcp.write_all(bytes).await?;
            let mut frames = Frames::new(tcp);
            let mut seen = Vec::new();
            let got = match frames.until_goaway(ANSWER, &mut seen).await {
                Next::Frame(f) => f.goaway_code(),
                _ => None,
            };
            let closed = frames.closed_within(ANSWER).await;
            eprintln!(
                "{what}: GOAWAY {got:?} (expected {want}) after {:?}, closed {closed}",
                t.elapsed()
            );
            outcomes.push((what, got, *want, closed));
        }
        for (what, got, want, closed) in &outcomes {
            assert_eq!(*got, Some(*want), "{what}");
            assert!(closed, "{what}: connection left open after GOAWAY");
        }
        let counted_goaways = outcomes.len() as f64;
        // The magic itself broken: not HTTP/2, so HTTP/1.1 that hyper cannot parse: 400,
        // counted as malformed.
        let malformed = rejected(&m.a, "malformed").await?;
        let mut tcp = TcpStream::connect(m.proxy).await?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").await?;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            ANSWER,
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer),
        )
        .await?;
        let answer = String::from_utf8_lossy(&answer);
        eprintln!("broken magic: {:?}", answer.lines().next());
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        counted(&m.a, "malformed", malformed + 1.0).await?;

        let took = good.finish().await?;
        eprintln!("well-behaved connection: GET afterwards took {took:?}");
        // Every GOAWAY, counted once.
        counted(&m.a, "h2_protocol_error", before + counted_goaways).await?;
        Ok(())
    })
    .await
    .context("test timed out")?
}
