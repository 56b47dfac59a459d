//! `[[outbound]]` ports in `auto` mode terminate HTTP: real clients (curl, h2load, a grpcio
//! channel) connect to an outbound port of an HTTP-family service on node-a, and each request
//! (each HTTP/2 stream) is balanced on its own over node-b and node-c. `mode = "tcp"`, a `tcp`
//! service and bytes that are not HTTP keep the raw tunnel, byte for byte.
//!
//! curl and h2load (Debian nghttp2-client) come from the system, grpcio from the test venv
//! (`common::test_python`); a missing one skips its test with a note, except in CI
//! (`CI=true`), where that fails it.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use common::*;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(150);

type TestBody = BoxBody<Bytes, hyper::Error>;

/// Requests an application answered.
#[derive(Default)]
struct Served(AtomicU64);

impl Served {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An application answering `tag` and the HTTP version it was spoken to in; `/slow` answers
/// the same after 20 ms; `/host` answers the `Host` and `x-forwarded-host` it got. HTTP/1.1,
/// or HTTP/2 only when `h2`.
async fn app(tag: &'static str, h2: bool) -> Result<(SocketAddr, Arc<Served>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let served = Arc::new(Served::default());
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    count.0.fetch_add(1, Ordering::Relaxed);
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string()
                    };
                    let text = match req.uri().path() {
                        "/host" => {
                            format!("host={} xfh={}", header("host"), header("x-forwarded-host"))
                        }
                        _ => format!("{tag} {:?}", req.version()),
                    };
                    let body: TestBody =
                        Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed();
                    let delay = match req.uri().path() {
                        "/slow" => Duration::from_millis(20),
                        _ => Duration::ZERO,
                    };
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                h2::serve_conn(tcp, h2, svc).await;
            });
        }
    });
    Ok((addr, served))
}

fn service(name: &str, protocol: &str, target: SocketAddr) -> String {
    format!("[[service]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntarget = \"{target}\"\nrequest_timeout = \"5s\"\n")
}

fn outbound(service: &str, mode: &str) -> String {
    format!("[[outbound]]\nservice = \"{service}\"\nlisten = \"127.0.0.1:0\"\nmode = \"{mode}\"\n")
}

/// node-b and node-c host, each with its own applications:
/// `web` (http), `web-raw` (http, the same application), `web2` (http2), `echo` and `echo2`
/// (tcp echo). node-a has the proxy and the outbound ports `web`, `web2`, `echo2` and
/// `nosuch` (auto), `web-raw` and `echo` (mode tcp).
struct Mesh {
    nodes: Vec<meshnode::Node>,
    _pki: Pki,
    /// Requests each node's HTTP/1.1 application answered: [node-b, node-c].
    web: [Arc<Served>; 2],
    /// Requests each node's HTTP/2 application answered.
    web2: [Arc<Served>; 2],
}

impl Mesh {
    async fn new() -> Result<Mesh> {
        let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
        let reg = memory_mesh();
        let echo = echo_server().await?;
        let mut nodes = Vec::new();
        let mut web = Vec::new();
        let mut web2 = Vec::new();
        for (name, tag) in [("node-b", "B"), ("node-c", "C")] {
            let (h1, h1_served) = app(tag, false).await?;
            let (h2, h2_served) = app(tag, true).await?;
            let conf = [
                service("web", "http", h1),
                service("web-raw", "http", h1),
                service("web2", "http2", h2),
                service("echo", "tcp", echo),
                service("echo2", "tcp", echo),
            ]
            .concat();
            nodes.push(start_node(&pki, name, &conf, reg.connect()).await?);
            web.push(h1_served);
            web2.push(h2_served);
        }
        let conf = [
            outbound("web", "auto"),
            outbound("web-raw", "tcp"),
            outbound("web2", "auto"),
            outbound("echo", "tcp"),
            outbound("echo2", "auto"),
            outbound("nosuch", "auto"),
            "[http_proxy]\nlisten = \"127.0.0.1:0\"\n".to_string(),
        ]
        .concat();
        let a = start_node(&pki, "node-a", &conf, reg.connect()).await?;
        for s in ["web", "web-raw", "web2", "echo", "echo2"] {
            wait_endpoints(&a, s, 2).await?;
        }
        nodes.push(a);
        let pair = |v: Vec<Arc<Served>>| -> Result<[Arc<Served>; 2]> {
            v.try_into()
                .map_err(|_| anyhow::anyhow!("two applications expected"))
        };
        Ok(Mesh {
            nodes,
            _pki: pki,
            web: pair(web)?,
            web2: pair(web2)?,
        })
    }

    fn a(&self) -> &meshnode::Node {
        &self.nodes[2]
    }

    fn port(&self, service: &str) -> Result<SocketAddr> {
        self.a()
            .outbound_addr(service)
            .with_context(|| format!("outbound {service} bound"))
    }
}

/// Whether `program` runs here; in CI a missing one fails the test.
async fn have(program: &str, arg: &str) -> Result<bool> {
    let ran = Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await;
    if ran.is_ok() {
        return Ok(true);
    }
    let fix = "run scripts/deps.sh --test";
    anyhow::ensure!(!in_ci(), "{program} is required in CI; {fix}");
    eprintln!("skipped: {program} not found; {fix}");
    Ok(false)
}

/// Runs curl with `args` over one connection (HTTP/1.1 keep-alive) and returns, per transfer,
/// (body, new connections made for it).
async fn curl_keep_alive(urls: &[String]) -> Result<Vec<(String, u32)>> {
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "60"])
        .args(["-w", "|%{num_connects}\\n"])
        .args(urls)
        .kill_on_drop(true)
        .output()
        .await
        .context("run curl")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "curl failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .lines()
        .map(|l| {
            let (body, n) = l.rsplit_once('|').context("a transfer line")?;
            Ok((body.to_string(), n.parse()?))
        })
        .collect()
}

fn tally(transfers: &[(String, u32)]) -> (usize, usize, u32) {
    let b = transfers
        .iter()
        .filter(|(t, _)| t.starts_with("B "))
        .count();
    let c = transfers
        .iter()
        .filter(|(t, _)| t.starts_with("C "))
        .count();
    (b, c, transfers.iter().map(|(_, n)| n).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keep_alive_requests_through_an_auto_outbound_are_balanced_one_by_one() -> Result<()> {
    if !have("curl", "--version").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let mesh = Mesh::new().await?;
        let port = mesh.port("web")?;
        // Four curl processes at once, each with its own keep-alive connection. The
        // application takes 20 ms per request, so that requests overlap however busy the
        // machine is and the balancer weighs the requests in flight (between equal endpoints
        // and one request at a time, the one measured faster keeps winning).
        const CLIENTS: usize = 4;
        const N: usize = 50;
        let urls: Vec<String> = (0..N).map(|_| format!("http://{port}/slow")).collect();
        let runs =
            futures_util::future::join_all((0..CLIENTS).map(|_| curl_keep_alive(&urls))).await;
        let (mut total_b, mut total_c, mut split) = (0, 0, 0);
        for transfers in runs {
            let transfers = transfers?;
            let (b, c, connects) = tally(&transfers);
            eprintln!(
                "auto outbound, one keep-alive connection: B {b}, C {c}, connections {connects}"
            );
            assert_eq!(transfers.len(), N);
            assert_eq!(b + c, N, "{transfers:?}");
            assert_eq!(connects, 1, "curl kept one connection");
            assert!(transfers.iter().all(|(t, _)| t.ends_with(" HTTP/1.1")));
            total_b += b;
            total_c += c;
            split += usize::from(b > 0 && c > 0);
        }
        eprintln!("auto outbound, {CLIENTS} connections: B {total_b}, C {total_c}");
        // Per request, not per connection: a connection's requests reach both endpoints
        // (one connection in four may be unlucky: the balancer keeps no per-connection share).
        assert!(
            split >= CLIENTS - 1,
            "only {split} connections reached both endpoints"
        );
        assert!(
            total_b >= CLIENTS * N / 5 && total_c >= CLIENTS * N / 5,
            "each endpoint ≥ 20 %: B {total_b}, C {total_c}"
        );

        // Host need not name the service; it reaches the target as x-forwarded-host.
        let transfers = curl_keep_alive(&[format!("http://{port}/host")]).await?;
        assert_eq!(
            transfers[0].0,
            format!("host=web xfh=127.0.0.1:{}", port.port())
        );

        // An outbound of a service nobody hosts: HTTP gets the mesh's 404.
        let nosuch = mesh.port("nosuch")?;
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-D", "-"])
            .arg(format!("http://{nosuch}/"))
            .kill_on_drop(true)
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 404"), "{text}");
        assert!(
            text.contains("meshnode-error: unknown service nosuch"),
            "{text}"
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_tcp_keeps_a_keep_alive_connection_on_one_endpoint() -> Result<()> {
    if !have("curl", "--version").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let mesh = Mesh::new().await?;
        let port = mesh.port("web-raw")?;
        let mut seen = (0, 0);
        // Two connections (each pinned to its endpoint) to show each is whole on one.
        for _ in 0..2 {
            let urls: Vec<String> = (0..30).map(|_| format!("http://{port}/")).collect();
            let transfers = curl_keep_alive(&urls).await?;
            let (b, c, connects) = tally(&transfers);
            eprintln!("mode tcp, one keep-alive connection: B {b}, C {c}, connections {connects}");
            assert_eq!(connects, 1);
            assert!((b, c) == (30, 0) || (b, c) == (0, 30), "B {b}, C {c}");
            seen = (seen.0 + b, seen.1 + c);
        }
        // Through a raw tunnel the application sees the client's own Host.
        let transfers = curl_keep_alive(&[format!("http://{port}/host")]).await?;
        assert_eq!(
            transfers[0].0,
            format!("host=127.0.0.1:{} xfh=-", port.port())
        );
        eprintln!("mode tcp totals: B {}, C {}", seen.0, seen.1);
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// Runs h2load and returns (succeeded, failed) from its `requests:` line.
async fn h2load(args: &[String]) -> Result<(u64, u64)> {
    let out = Command::new("h2load")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("run h2load")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "h2load failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .with_context(|| format!("no requests line in {stdout}"))?;
    let num_before = |key: &str| -> Result<u64> {
        let i = line.find(key).with_context(|| format!("{key} in {line}"))?;
        Ok(line[..i]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or_default()
            .parse()?)
    };
    eprintln!(
        "h2load {}:\n{}",
        args.join(" "),
        stdout
            .lines()
            .filter(|l| l.starts_with("finished in")
                || l.starts_with("requests:")
                || l.starts_with("status codes:")
                || l.starts_with("time for request:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok((num_before("succeeded")?, num_before("failed")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_through_the_proxy_and_an_auto_outbound_spreads_streams() -> Result<()> {
    if !have("h2load", "--version").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let mesh = Mesh::new().await?;
        let n = 2000u64;
        let load = ["-n", "2000", "-c", "4", "-m", "10"].map(String::from);

        // The proxy: `:authority` names the service (HTTP/1.1 applications behind).
        let proxy = mesh.a().http_proxy_addr().context("proxy bound")?;
        let mut args = load.to_vec();
        args.push(format!("--connect-to={proxy}"));
        args.push("http://web/".into());
        let (ok, failed) = h2load(&args).await?;
        let (b, c) = (mesh.web[0].get(), mesh.web[1].get());
        eprintln!("proxy: applications served B {b}, C {c}");
        assert_eq!((ok, failed), (n, 0));
        assert_eq!(b + c, n);
        assert!(
            b >= n / 5 && c >= n / 5,
            "each endpoint ≥ 20 %: B {b}, C {c}"
        );

        // An auto outbound of an `http2` service: the port is the service.
        let port = mesh.port("web2")?;
        let mut args = load.to_vec();
        args.push(format!("http://{port}/"));
        let (ok, failed) = h2load(&args).await?;
        let (b, c) = (mesh.web2[0].get(), mesh.web2[1].get());
        eprintln!("outbound: applications served B {b}, C {c}");
        assert_eq!((ok, failed), (n, 0));
        assert_eq!(b + c, n);
        assert!(
            b >= n / 5 && c >= n / 5,
            "each endpoint ≥ 20 %: B {b}, C {c}"
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// The HTTP/2 connection preface and an empty SETTINGS frame, as an h2c client opens.
fn h2_opening() -> Vec<u8> {
    let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    v.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_served_as_http_cross_byte_for_byte() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let mesh = Mesh::new().await?;
        let h2 = h2_opening();
        // h2 on a `mode = "tcp"` port of a tcp service, and on an auto port of one: the
        // service's protocol says tunnel, so the echo sends the very bytes back.
        for s in ["echo", "echo2"] {
            let back = roundtrip(mesh.port(s)?, &h2).await?;
            assert_eq!(back, h2, "through {s}");
        }
        // Bytes that are not HTTP to an auto port of an http service: a tunnel to the
        // application, which answers its HTTP/1.1 400 to them.
        let junk = b"\x16\x03\x01 not http\r\n\r\n";
        let back = roundtrip(mesh.port("web")?, junk).await?;
        let text = String::from_utf8_lossy(&back);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        // A client that sends nothing and half-closes: an empty tunnel, closed in order.
        let back = roundtrip(mesh.port("web")?, b"").await?;
        assert!(back.is_empty());
        // ... while HTTP on the same port is served per request.
        let mut s = TcpStream::connect(mesh.port("web")?).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // CONNECT on an outbound port would reach other services: refused.
        let mut s = TcpStream::connect(mesh.port("web")?).await?;
        s.write_all(b"CONNECT echo:7 HTTP/1.1\r\nHost: echo:7\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        assert_eq!(&head, b"HTTP/1.1 405");
        // Not HTTP, no endpoint: the connection is reset.
        let r = roundtrip(mesh.port("nosuch")?, b"hello").await;
        assert!(r.as_ref().map_or(true, |b| b.is_empty()), "{r:?}");
        Ok(())
    })
    .await
    .context("test timed out")?
}

/// A grpcio server answering `tag`; killed when dropped.
async fn grpc_server(tag: &str) -> Result<(Child, SocketAddr)> {
    python_peer("grpc_peer.py", &["server", tag]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_channel_on_an_outbound_port_is_balanced_per_call() -> Result<()> {
    let python = test_python();
    let probe = Command::new(&python)
        .args(["-c", "import grpc"])
        .kill_on_drop(true)
        .output()
        .await;
    if !probe.is_ok_and(|o| o.status.success()) {
        let why = format!("{} cannot import grpc", python.display());
        let fix = "run scripts/deps.sh --test (or set MESHNODE_TEST_PYTHON)";
        anyhow::ensure!(!in_ci(), "grpcio is required in CI: {why}; {fix}");
        eprintln!("skipped: {why}; {fix}");
        return Ok(());
    }
    const CALLS: u64 = 300;
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
        let reg = memory_mesh();
        let (_sb, tb) = grpc_server("B").await?;
        let (_sc, tc) = grpc_server("C").await?;
        let _b = start_node(
            &pki,
            "node-b",
            &service("greeter", "grpc", tb),
            reg.connect(),
        )
        .await?;
        let _c = start_node(
            &pki,
            "node-c",
            &service("greeter", "grpc", tc),
            reg.connect(),
        )
        .await?;
        // No proxy on node-a: only the outbound port (mode left at its default, auto).
        let conf = "[[outbound]]\nservice = \"greeter\"\nlisten = \"127.0.0.1:0\"\n";
        let a = start_node(&pki, "node-a", conf, reg.connect()).await?;
        wait_endpoints(&a, "greeter", 2).await?;
        let port = a.outbound_addr("greeter").context("outbound bound")?;

        let v = python_json(
            "grpc_peer.py",
            ["unary", &port.to_string(), &CALLS.to_string()],
        )
        .await?;
        eprintln!("grpc client through the outbound port: {v}");
        assert_eq!(v["unary_failures"], 0, "{v}");
        let (nb, nc) = (
            v["unary"]["B"].as_u64().unwrap_or(0),
            v["unary"]["C"].as_u64().unwrap_or(0),
        );
        assert_eq!(nb + nc, CALLS, "{v}");
        assert!(
            nb >= CALLS / 5 && nc >= CALLS / 5,
            "each endpoint ≥ 20 %: B {nb}, C {nc}"
        );
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[test]
fn an_unknown_outbound_mode_is_a_config_error_naming_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("meshnode.toml");
    std::fs::write(
        &config,
        "[node]\nname = \"node-a\"\nlisten = \"127.0.0.1:4433\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"node-a.pem\"\nkey = \"node-a.key\"\n\
         [[outbound]]\nservice = \"web\"\nlisten = \"127.0.0.1:15001\"\nmode = \"http\"\n",
    )?;
    let path = config.display().to_string();
    let (code, _out, err) = process::meshnode(&["validate", "-c", &path])?;
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!("{path}: outbound[0].mode: \"http\" is not a mode")),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_a_port_between_modes_on_the_same_address() -> Result<()> {
    if !have("curl", "--version").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let reg = memory_mesh();
        let (h1, _) = app("B", false).await?;
        let _b = start_node(&pki, "node-b", &service("web", "http", h1), reg.connect()).await?;
        let listen = process::free_tcp()?;
        let conf = |mode: &str| {
            format!("[[outbound]]\nservice = \"web\"\nlisten = \"{listen}\"\nmode = \"{mode}\"\n")
        };
        let a = start_node(&pki, "node-a", &conf("auto"), reg.connect()).await?;
        wait_endpoints(&a, "web", 1).await?;
        let host = || async {
            let t = curl_keep_alive(&[format!("http://{listen}/host")]).await?;
            Ok::<_, anyhow::Error>(t[0].0.clone())
        };
        // Served per request: the target sees the service as Host.
        assert_eq!(host().await?, format!("host=web xfh={listen}"));
        for (mode, expected) in [
            ("tcp", format!("host={listen} xfh=-")),
            ("auto", format!("host=web xfh={listen}")),
        ] {
            let text = format!("{}{}", pki.base_config("node-a"), conf(mode));
            let config = meshnode::config::Config::parse(&text)?;
            let summary = a
                .reload(config)
                .await
                .map_err(|f| anyhow::anyhow!("reload: {f}"))?;
            assert!(summary.contains("outbounds +1 -1"), "{summary}");
            assert_eq!(a.outbound_addr("web"), Some(listen));
            assert_eq!(host().await?, expected, "after the reload to mode {mode}");
        }
        Ok(())
    })
    .await
    .context("test timed out")?
}
