//! h2c (HTTP/2 with prior knowledge) on the `[http_proxy]` port, beside HTTP/1.1: curl and
//! hyper's HTTP/2 client name the service by `:authority`, each stream is balanced on its own
//! and reaches HTTP/1.1 applications behind node-b and node-c; an `http2` service is spoken
//! to in h2c by the callee; a rapid-reset client is sent GOAWAY while others are served.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use common::h2::{self, app, text, Frames, Next};
use common::*;
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(90);

fn service(name: &str, protocol: &str, target: SocketAddr) -> String {
    format!("[[service]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntarget = \"{target}\"\nrequest_timeout = \"2s\"\n")
}

/// node-a with the proxy; `web` (HTTP/1.1) and `web2` (h2c) on node-b and node-c.
async fn mesh() -> Result<(Vec<meshnode::Node>, SocketAddr, Pki)> {
    let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
    let reg = memory_mesh();
    let mut nodes = Vec::new();
    for (name, tag) in [("node-b", "B"), ("node-c", "C")] {
        let tag: &'static str = tag;
        let conf = format!(
            "{}{}",
            service("web", "http", app(tag, false).await?),
            service("web2", "http2", app(tag, true).await?)
        );
        nodes.push(start_node(&pki, name, &conf, reg.connect()).await?);
    }
    let proxy = "[http_proxy]\nlisten = \"127.0.0.1:0\"\n";
    let a = start_node(&pki, "node-a", proxy, reg.connect()).await?;
    wait_endpoints(&a, "web", 2).await?;
    wait_endpoints(&a, "web2", 2).await?;
    let addr = a.http_proxy_addr().context("proxy bound")?;
    nodes.push(a);
    Ok((nodes, addr, pki))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_prior_knowledge_reaches_an_http1_service() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let (_nodes, proxy, _pki) = mesh().await?;
        let connect_to = format!("web:80:{}:{}", proxy.ip(), proxy.port());
        // One connection per curl run (curl 7.88 fails reusing a prior-knowledge connection
        // for a second URL); streams of one connection are balanced in the next test.
        for _ in 0..6 {
            let out = tokio::process::Command::new("curl")
                .args([
                    "-sS",
                    "--http2-prior-knowledge",
                    "--max-time",
                    "20",
                    "--connect-to",
                    &connect_to,
                    "-w",
                    " v%{http_version} s%{http_code}",
                    "http://web/",
                ])
                .kill_on_drop(true)
                .output()
                .await
                .context("run curl")?;
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "curl failed: {line}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Spoken to in HTTP/2 by curl, in HTTP/1.1 by the callee to the application.
            assert!(line.ends_with(" v2 s200"), "{line}");
            assert!(
                line.starts_with("B HTTP/1.1") || line.starts_with("C HTTP/1.1"),
                "{line}"
            );
        }

        // A body both ways, and an unknown service answered 404 by the mesh.
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "--max-time",
                "20",
                "--connect-to",
                &connect_to,
                "--data-binary",
                "hello over h2c",
                "http://web/echo",
            ])
            .kill_on_drop(true)
            .output()
            .await?;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over h2c");
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "--max-time",
                "20",
                "--connect-to",
                &format!("nosuch:80:{}:{}", proxy.ip(), proxy.port()),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://nosuch/",
            ])
            .kill_on_drop(true)
            .output()
            .await?;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_are_balanced_each_and_http2_targets_get_h2c() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let (_nodes, proxy, _pki) = mesh().await?;
        let tcp = TcpStream::connect(proxy).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        // 100 concurrent streams on one connection, each its own request.
        let mut tasks = Vec::new();
        for i in 0..100 {
            let mut s = sender.clone();
            let host = if i % 2 == 0 { "web" } else { "web2" };
            tasks.push(tokio::spawn(async move {
                let req = Request::builder()
                    .uri(format!("http://{host}:8080/"))
                    .body(text(Bytes::new()))?;
                let resp = s.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                anyhow::Ok((host, status, String::from_utf8_lossy(&body).into_owned()))
            }));
        }
        let (mut b, mut c) = (0, 0);
        for t in tasks {
            let (host, status, body) = t.await??;
            assert_eq!(status, StatusCode::OK, "{body}");
            // `web` is HTTP/1.1 behind the callee, `web2` HTTP/2 (h2c).
            let version = if host == "web" {
                "HTTP/1.1"
            } else {
                "HTTP/2.0"
            };
            assert!(body.ends_with(version), "{host}: {body}");
            if body.starts_with('B') {
                b += 1;
            } else if body.starts_with('C') {
                c += 1;
            }
        }
        assert_eq!(b + c, 100);
        assert!(
            b >= 20 && c >= 20,
            "streams of one connection spread: B {b}, C {c}"
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_other_clients_are_served() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(LIMIT, async {
        let (_nodes, proxy, _pki) = mesh().await?;
        // The 2023 "rapid reset" pattern: streams opened and cancelled at once, 200 of them.
        let mut out = h2::client_start();
        let block = h2::request_block("GET", "/", "web");
        for i in 0..200u32 {
            let id = 2 * i + 1;
            out.extend(h2::frame(
                h2::HEADERS,
                h2::END_STREAM | h2::END_HEADERS,
                id,
                &block,
            ));
            out.extend(h2::frame(h2::RST_STREAM, 0, id, &h2::CANCEL.to_be_bytes()));
        }
        let mut tcp = TcpStream::connect(proxy).await?;
        tcp.write_all(&out).await?;
        let mut frames = Frames::new(tcp);
        let mut seen = Vec::new();
        let goaway = match frames
            .until_goaway(Duration::from_secs(10), &mut seen)
            .await
        {
            Next::Frame(f) => f.goaway_code(),
            _ => None,
        };
        // GOAWAY with ENHANCE_YOUR_CALM.
        assert_eq!(
            goaway,
            Some(h2::ENHANCE_YOUR_CALM),
            "{} frames read",
            seen.len()
        );

        // Another client on the same port does not notice.
        let tcp = TcpStream::connect(proxy).await?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("http://web/")
            .body(text(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        assert_eq!(resp.status(), StatusCode::OK);
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// `node.http_idle_timeout`: an h2c connection over which nothing passes is sent GOAWAY and
/// closed once the timeout has passed (not before); one with a request every 300 ms is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_h2c_connection_is_closed_after_the_idle_timeout_and_a_busy_one_kept() -> Result<()>
{
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let reg = memory_mesh();
        let b = start_node(
            &pki,
            "node-b",
            &service("web", "http", app("B", false).await?),
            reg.connect(),
        )
        .await?;
        let a = start_node_with(
            &pki,
            "node-a",
            "http_idle_timeout = \"1s\"\n",
            "[http_proxy]\nlisten = \"127.0.0.1:0\"\n",
            reg.connect(),
        )
        .await?;
        wait_endpoints(&a, "web", 1).await?;
        let proxy = a.http_proxy_addr().context("proxy bound")?;

        // Silent: the preface and SETTINGS, then nothing.
        let started = std::time::Instant::now();
        let tcp = TcpStream::connect(proxy).await?;
        let (r, mut w) = tcp.into_split();
        tokio::io::AsyncWriteExt::write_all(&mut w, &h2::client_start()).await?;
        let mut frames = Frames::new(r);
        let mut seen = Vec::new();
        let goaway = frames.until_goaway(Duration::from_secs(5), &mut seen).await;
        let took = started.elapsed();
        assert!(
            matches!(goaway, Next::Frame(_)),
            "no GOAWAY within 5 s: {goaway:?}"
        );
        assert!(
            took >= Duration::from_millis(900),
            "closed before its idle timeout: {took:?}"
        );
        // As any client does, it answers the PING of the graceful shutdown; then the server
        // closes.
        let end = tokio::time::Instant::now() + Duration::from_secs(3);
        let closed = loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match frames.next(left).await {
                Next::Frame(f) if f.kind == h2::PING && f.flags & h2::ACK == 0 => {
                    let ack = h2::frame(h2::PING, h2::ACK, 0, &f.payload);
                    tokio::io::AsyncWriteExt::write_all(&mut w, &ack).await?;
                }
                Next::Frame(_) => {}
                Next::Closed => break true,
                Next::TimedOut => break false,
            }
        };
        assert!(closed, "still open 3 s after GOAWAY");
        eprintln!("silent h2c connection: GOAWAY after {took:?}");

        // Busy: a request every 300 ms for 2.5 s, all on one connection.
        let tcp = TcpStream::connect(proxy).await?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        for _ in 0..8 {
            let req = Request::builder()
                .uri("http://web/")
                .body(text(Bytes::new()))?;
            let resp = sender.send_request(req).await?;
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(b);
        Ok(())
    })
    .await
    .context("test timed out")?
}
