//! HTTP between nodes: the local HTTP/1.1 proxy on node-a, HTTP/3 between nodes, real
//! HTTP/1.1 servers behind node-b and node-c. Every test is bounded by a timeout.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use common::*;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshnode::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(90);

/// Requests that reached a test application's `/sink` (its head arrived, the body may not have).
static SINK_STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Request bodies the test applications saw cut short (`/sink`).
static SINK_CUT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type TestBody = BoxBody<Bytes, hyper::Error>;

fn text(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

/// A tiny HTTP/1.1 application: answers with `tag`, echoes POST /echo, sleeps on /slow and
/// answers 503 on /status503 when `fail503`.
async fn app(tag: &'static str, fail503: bool) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let resp: Response<TestBody> = match req.uri().path() {
                        "/echo" => Response::new(req.into_body().boxed()),
                        "/sink" => {
                            SINK_STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if req.into_body().collect().await.is_err() {
                                SINK_CUT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Response::new(text(tag))
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            Response::new(text(tag))
                        }
                        "/trailers-in" => {
                            // Answers "<body>|x-sum=<trailer>" from what arrived.
                            let collected = match req.into_body().collect().await {
                                Ok(c) => c,
                                Err(_) => return Ok(Response::new(text("cut"))),
                            };
                            let sum = collected
                                .trailers()
                                .and_then(|t| t.get("x-sum"))
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("none")
                                .to_string();
                            let body = collected.to_bytes();
                            let answer = format!("{}|x-sum={sum}", String::from_utf8_lossy(&body));
                            Response::new(text(answer))
                        }
                        "/trailers-out" => {
                            let mut trailers = hyper::HeaderMap::new();
                            trailers.insert("x-sum", hyper::header::HeaderValue::from_static("42"));
                            let frames: Vec<Result<hyper::body::Frame<Bytes>, hyper::Error>> = vec![
                                Ok(hyper::body::Frame::data(Bytes::from_static(b"hello"))),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ];
                            let body =
                                http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                            let mut r = Response::new(BodyExt::boxed(body));
                            r.headers_mut().insert(
                                "trailer",
                                hyper::header::HeaderValue::from_static("x-sum"),
                            );
                            r
                        }
                        p if p.starts_with("/path/") => Response::new(text(format!("{tag}{p}"))),
                        "/status503" if fail503 => {
                            let mut r = Response::new(text(tag));
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            r
                        }
                        _ => Response::new(text(tag)),
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn http_service(name: &str, target: SocketAddr, extra: &str) -> String {
    format!("[[service]]\nname = \"{name}\"\nprotocol = \"http\"\ntarget = \"{target}\"\n{extra}\n")
}

const PROXY: &str = "[http_proxy]\nlisten = \"127.0.0.1:0\"\n";

/// node-a with the proxy, node-b and node-c serving `web` (B answers 503 on /status503).
struct Mesh {
    a: Node,
    _b: Node,
    _c: Node,
    proxy: SocketAddr,
    _pki: Pki,
}

async fn mesh(extra_b: &str) -> Result<Mesh> {
    let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
    let reg = memory_mesh();
    let tb = app("B", true).await?;
    let tc = app("C", false).await?;
    let svc = "request_timeout = \"1s\"";
    let b_conf = format!("{}{extra_b}", http_service("web", tb, svc));
    let b = start_node(&pki, "node-b", &b_conf, reg.connect()).await?;
    let c = start_node(&pki, "node-c", &http_service("web", tc, svc), reg.connect()).await?;
    let a = start_node(&pki, "node-a", PROXY, reg.connect()).await?;
    wait_endpoints(&a, "web", 2).await?;
    let proxy = a.http_proxy_addr().context("proxy bound")?;
    Ok(Mesh {
        a,
        _b: b,
        _c: c,
        proxy,
        _pki: pki,
    })
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    TestBody,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `method path` for `host` through the proxy; returns status, headers and body.
async fn call(
    c: &Client,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    body: Bytes,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes)> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(text(body))?;
    let resp = c.request(req).await?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

/// Writes `raw` to the proxy and reads the answer until the connection closes or `limit`.
async fn raw(proxy: SocketAddr, raw: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(raw).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_requests_hundred_concurrent_reach_both_nodes() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let m = mesh("").await?;
        let c = client();
        let sem = Arc::new(tokio::sync::Semaphore::new(100));
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let permit = sem.clone().acquire_owned().await?;
            let c = c.clone();
            let proxy = m.proxy;
            tasks.push(tokio::spawn(async move {
                let r = call(&c, proxy, "GET", "web", "/", Bytes::new()).await;
                drop(permit);
                r
            }));
        }
        let (mut nb, mut nc) = (0, 0);
        for t in tasks {
            let (status, _, body) = t.await??;
            assert_eq!(status, StatusCode::OK);
            match &body[..] {
                b"B" => nb += 1,
                b"C" => nc += 1,
                other => bail!("unexpected body {other:?}"),
            }
        }
        assert_eq!(nb + nc, 1000);
        assert!(nb > 0 && nc > 0, "both nodes must serve: B={nb} C={nc}");
        let ok =
            m.a.metrics()
                .get("meshnode_http_requests_total", &["web", "node-b", "200"])
                + m.a
                    .metrics()
                    .get("meshnode_http_requests_total", &["web", "node-c", "200"]);
        assert_eq!(ok, 1000.0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_mib_post_is_echoed_intact() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let m = mesh("").await?;
        let data: Vec<u8> = (0..5 * 1024 * 1024u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let data = Bytes::from(data);
        let (status, _, body) =
            call(&client(), m.proxy, "POST", "web", "/echo", data.clone()).await?;
        assert_eq!(status, StatusCode::OK);
        assert!(body == data, "echo differs: {} bytes back", body.len());
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_is_retried_after_503_and_post_is_not() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        // `solo` lives on node-b alone, whose application answers 503 on /status503.
        let solo = app("B", true).await?;
        let m = mesh(&http_service("solo", solo, "")).await?;
        wait_endpoints(&m.a, "solo", 1).await?;
        let c = client();
        // GET: every answer is 200 from node-c, and some were first answered 503 by node-b
        // (which node the balancer tries first is its choice, so send until one was).
        let mut n = 0;
        while m
            .a
            .metrics()
            .get("meshnode_retries_total", &["web", "status_503"])
            == 0.0
        {
            n += 1;
            assert!(n <= 2000, "node-b was never tried first in {n} GETs");
            let (status, _, body) =
                call(&c, m.proxy, "GET", "web", "/status503", Bytes::new()).await?;
            assert_eq!(status, StatusCode::OK, "GET must be retried on node-c");
            assert_eq!(&body[..], b"C");
        }
        // POST with a body, answered 503 by the application: passed on, never retried.
        for _ in 0..5 {
            let (status, _, body) = call(
                &c,
                m.proxy,
                "POST",
                "solo",
                "/status503",
                Bytes::from_static(b"x"),
            )
            .await?;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(&body[..], b"B");
        }
        let solo_retries =
            m.a.metrics()
                .get("meshnode_retries_total", &["solo", "status_503"]);
        assert_eq!(solo_retries, 0.0, "POST must not be retried");
        // The same answer to a GET is retried (here on node-b again: it is the only endpoint).
        let (status, _, _) = call(&c, m.proxy, "GET", "solo", "/status503", Bytes::new()).await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let solo_retries =
            m.a.metrics()
                .get("meshnode_retries_total", &["solo", "status_503"]);
        assert!(solo_retries >= 1.0, "GET must be retried");
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_and_mesh_errors_get_clear_statuses() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let down = closed_port().await?;
        let m = mesh(&http_service("down", down, "")).await?;
        wait_endpoints(&m.a, "down", 1).await?;
        let c = client();
        // Unknown service: 404 with a body that says so.
        let (status, h, body) = call(&c, m.proxy, "GET", "nope", "/", Bytes::new()).await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&body).contains("unknown service nope"));
        assert!(h.contains_key("meshnode-error"));
        // Target down: 502 fast.
        let t = Instant::now();
        let (status, h, _) = call(&c, m.proxy, "GET", "down", "/", Bytes::new()).await?;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(h["meshnode-error"], "target refused");
        assert!(t.elapsed() < Duration::from_secs(1), "502 took {:?}", t.elapsed());
        // Target hangs: 504 at the configured 1 s.
        let t = Instant::now();
        let (status, h, _) = call(&c, m.proxy, "GET", "web", "/slow", Bytes::new()).await?;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(h["meshnode-error"], "target timed out");
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "504 after {took:?}");
        // Smuggling: both Content-Length and Transfer-Encoding.
        let answer = raw(
            m.proxy,
            b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await?;
        assert!(answer.starts_with("HTTP/1.1 400"), "smuggling answered {answer:?}");
        // A header block over the limit.
        let mut big = b"GET / HTTP/1.1\r\nHost: web\r\n".to_vec();
        for i in 0..100 {
            big.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
        }
        big.extend_from_slice(b"\r\n");
        let answer = raw(m.proxy, &big).await?;
        assert!(answer.starts_with("HTTP/1.1 431"), "huge header answered {answer:?}");
        // Absolute-form, as HTTP_PROXY clients send, on a kept-alive connection.
        let answer = raw(
            m.proxy,
            b"GET http://web/ HTTP/1.1\r\nHost: web\r\n\r\nGET http://web/ HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "absolute-form answered {answer:?}");
        // The proxy still works after all of that.
        let (status, _, _) = call(&c, m.proxy, "GET", "web", "/", Bytes::new()).await?;
        assert_eq!(status, StatusCode::OK);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_gone_mid_body_cancels_the_far_side_without_harm() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let m = mesh("").await?;
        let started = SINK_STARTED.load(std::sync::atomic::Ordering::SeqCst);
        for i in 1..=5 {
            let mut s = TcpStream::connect(m.proxy).await?;
            s.write_all(b"POST /sink HTTP/1.1\r\nHost: web\r\nContent-Length: 10000000\r\n\r\n")
                .await?;
            s.write_all(&vec![b'x'; 1 << 20]).await?;
            // The client goes away only once the far side's application has the request.
            eventually(
                "the request to reach the target",
                Duration::from_secs(5),
                || SINK_STARTED.load(std::sync::atomic::Ordering::SeqCst) >= started + i,
            )
            .await?;
            drop(s);
        }
        // The far side's target sees its request body cut short, not completed.
        eventually(
            "targets to see the cut bodies",
            Duration::from_secs(5),
            || SINK_CUT.load(std::sync::atomic::Ordering::SeqCst) >= 5,
        )
        .await?;
        let (status, _, _) = call(&client(), m.proxy, "GET", "web", "/", Bytes::new()).await?;
        assert_eq!(status, StatusCode::OK);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_through_the_proxy_reaches_a_tcp_service() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let echo = echo_server().await?;
        let tcp = format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\nport = 7\n"
        );
        let m = mesh(&tcp).await?;
        wait_endpoints(&m.a, "echo", 1).await?;
        let mut s = TcpStream::connect(m.proxy).await?;
        s.write_all(b"CONNECT echo:7 HTTP/1.1\r\nHost: echo:7\r\n\r\n")
            .await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                bail!("proxy closed after {:?}", String::from_utf8_lossy(&head));
            }
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
        let data = vec![42u8; 256 * 1024];
        let (mut r, mut w) = s.split();
        let mut back = Vec::new();
        let (wr, rr) = tokio::join!(
            async {
                w.write_all(&data).await?;
                w.shutdown().await
            },
            r.read_to_end(&mut back)
        );
        wr?;
        rr?;
        assert!(back == data, "echo differs: {} bytes", back.len());
        // A port the service does not advertise is refused.
        let answer = raw(m.proxy, b"CONNECT echo:8 HTTP/1.1\r\nHost: echo:8\r\n\r\n").await?;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer:?}");
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_lists_are_enforced_by_the_far_node() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let private = app("P", false).await?;
        let m = mesh(&http_service("private", private, "allow = [\"node-c\"]")).await?;
        wait_endpoints(&m.a, "private", 1).await?;
        let (status, h, _) = call(&client(), m.proxy, "GET", "private", "/", Bytes::new()).await?;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(h.contains_key("meshnode-error"));
        let forbidden = m.a.metrics().get(
            "meshnode_http_requests_total",
            &["private", "node-b", "403"],
        );
        assert_eq!(forbidden, 1.0);
        Ok(())
    })
    .await?
}

/// Reads from `s` until `done` holds for what arrived (or fails after 10 s).
async fn read_until(s: &mut TcpStream, done: impl Fn(&str) -> bool) -> Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if done(&text) {
            return Ok(text);
        }
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) => bail!("connection closed; got {text:?}"),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => bail!("read failed: {e}; got {text:?}"),
            Err(_) => bail!("timed out; got {text:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_are_answered_in_order() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let m = mesh("").await?;
        let mut s = TcpStream::connect(m.proxy).await?;
        // Three requests in one write; each may go to a different node.
        s.write_all(
            b"GET /path/one HTTP/1.1\r\nHost: web\r\n\r\n\
              GET /path/two HTTP/1.1\r\nHost: web\r\n\r\n\
              GET /path/three HTTP/1.1\r\nHost: web\r\n\r\n",
        )
        .await?;
        let got = read_until(&mut s, |t| t.contains("/path/three")).await?;
        let pos = |p: &str| {
            got.find(p)
                .with_context(|| format!("{p} missing in {got:?}"))
        };
        let (one, two, three) = (pos("/path/one")?, pos("/path/two")?, pos("/path/three")?);
        assert!(one < two && two < three, "out of order: {got:?}");
        assert_eq!(got.matches("HTTP/1.1 200").count(), 3, "{got:?}");
        // The connection stays usable after the pipeline.
        s.write_all(b"GET /path/four HTTP/1.1\r\nHost: web\r\n\r\n")
            .await?;
        read_until(&mut s, |t| t.contains("/path/four")).await?;
        drop(m.a);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expect_100_continue_gets_an_interim_answer_before_the_body() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let m = mesh("").await?;
        let mut s = TcpStream::connect(m.proxy).await?;
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .await?;
        // The body is withheld until the proxy answers, as curl does (for up to 1 s). The
        // answer is 100 Continue, or already the final head when the application (which
        // echoes as it reads) answered first: RFC 9110 §10.1.1 lets a server skip the 100,
        // and the client then sends the body anyway.
        let head = read_until(&mut s, |t| t.contains("\r\n\r\n")).await?;
        assert!(
            head.starts_with("HTTP/1.1 100 Continue\r\n") || head.starts_with("HTTP/1.1 200"),
            "{head:?}"
        );
        s.write_all(b"hello world").await?;
        let got = head + &read_until(&mut s, |t| t.contains("hello world")).await?;
        assert!(got.contains("HTTP/1.1 200"), "{got:?}");
        drop(m.a);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunked_bodies_and_trailers_cross_the_mesh_both_ways() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let m = mesh("").await?;
        // Request: a chunked body with a trailer reaches the application whole.
        let mut s = TcpStream::connect(m.proxy).await?;
        s.write_all(
            b"POST /trailers-in HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\
              Trailer: x-sum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
        )
        .await?;
        let got = read_until(&mut s, |t| t.contains("|x-sum=")).await?;
        assert!(got.contains("hello world|x-sum=42"), "{got:?}");

        // Response: a client that accepts trailers gets the application's trailers.
        let mut s = TcpStream::connect(m.proxy).await?;
        s.write_all(b"GET /trailers-out HTTP/1.1\r\nHost: web\r\nTE: trailers\r\n\r\n")
            .await?;
        let got = read_until(&mut s, |t| {
            t.contains("\r\n0\r\n") && t.ends_with("\r\n\r\n")
        })
        .await?;
        assert!(got.contains("hello"), "{got:?}");
        assert!(got.to_ascii_lowercase().contains("x-sum: 42"), "{got:?}");
        drop(m.a);
        Ok(())
    })
    .await?
}

/// Request shapes the proxy refuses before routing (RFC 9112 §3.2, §6.1): each answered 400
/// with the connection closed where framing is in doubt, and counted on the caller by reason;
/// a client that never finishes its head is closed at the header deadline and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ambiguous_requests_are_refused_and_slow_heads_closed_and_counted() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let m = mesh("").await?;
        // The slow client starts first: its deadline runs while the other cases are tried.
        let mut slow = TcpStream::connect(m.proxy).await?;
        slow.write_all(b"GET / HTTP/1.1\r\nHo").await?;
        let slow_started = std::time::Instant::now();

        let cases: &[(&[u8], &str)] = &[
            (
                b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: web\r\n\r\n",
                "transfer_encoding",
            ),
            (
                b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\n\r\n",
                "malformed",
            ),
            (
                b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "transfer_encoding",
            ),
            (b"GET / HTTP/1.1\r\nHost: web\r\nHost: nosuch\r\n\r\n", "duplicate_host"),
            (b"GET http://web/ HTTP/1.1\r\nHost: nosuch\r\n\r\n", "host_mismatch"),
        ];
        for (request, reason) in cases {
            let answer = raw(m.proxy, request).await?;
            assert!(answer.starts_with("HTTP/1.1 400"), "{reason}: answered {answer:?}");
            assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{reason}: a hidden request was answered: {answer:?}");
        }
        // A malformed or overflowing chunk size: the client's fault, 400, never a 502 blaming
        // the peer.
        for body in [&b"zz\r\nhello\r\n0\r\n\r\n"[..], b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"] {
            let mut request = b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            request.extend_from_slice(body);
            let answer = raw(m.proxy, &request).await?;
            assert!(answer.starts_with("HTTP/1.1 400"), "bad chunk answered {answer:?}");
            assert!(answer.contains("request body malformed"), "{answer:?}");
        }
        let metrics = m.a.metrics();
        assert_eq!(metrics.get("meshnode_http_rejected_total", &["bad_body"]), 2.0);
        // `gzip` alone is refused by hyper's own parser (a request body must end chunked).
        assert_eq!(metrics.get("meshnode_http_rejected_total", &["transfer_encoding"]), 2.0);
        assert!(metrics.get("meshnode_http_rejected_total", &["malformed"]) >= 1.0);
        assert_eq!(metrics.get("meshnode_http_rejected_total", &["duplicate_host"]), 1.0);
        assert_eq!(metrics.get("meshnode_http_rejected_total", &["host_mismatch"]), 1.0);

        // The slow head: closed at the deadline (30 s), counted.
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(45), slow.read_to_end(&mut out)).await;
        let waited = slow_started.elapsed();
        assert!(closed.is_ok(), "a slow request head was held past {waited:?}");
        assert!(waited >= Duration::from_secs(25), "closed before the deadline: {waited:?}");
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while m.a.metrics().get("meshnode_http_rejected_total", &["header_timeout"]) < 1.0 {
            assert!(std::time::Instant::now() < until, "header timeout not counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The proxy still serves.
        let (status, _, _) = call(&client(), m.proxy, "GET", "web", "/", Bytes::new()).await?;
        assert_eq!(status, StatusCode::OK);
        Ok(())
    })
    .await?
}
