//! `meshnode demo`: a whole mesh in one process with no set-up (docs/README.md).
//!
//! Three real nodes (real QUIC on loopback, a throw-away CA in a temp dir, the in-process
//! registry); a TCP echo service and an HTTP service on node-b and node-c. Two clients on
//! node-a's `[[outbound]]` ports: one opens a new TCP connection every 10 ms (balanced per
//! connection), the other sends an HTTP request every 10 ms over kept-alive connections
//! (balanced per request). Part-way through node-b is killed (no drain) and later revived, to
//! show failover and recovery; a line a second per client shows the split and the latency.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use meshnode_registry::memory::MemoryMesh;
use meshnode_transport::pki::Ca;
use meshnode_transport::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::exit::{self, Failure};
use crate::node::{Node, NodeParts};

/// How often each client starts a request.
const INTERVAL: Duration = Duration::from_millis(10);
/// How long one request may take before it counts as failed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const PAYLOAD: &[u8; 32] = b"meshnode demo payload 0123456789";

/// One client's results.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

impl Tally {
    fn record(&self, ok: bool, took: Duration) {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.ok.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.latencies.lock() {
            l.push(took);
        }
    }

    fn sorted_latencies(&self) -> Vec<Duration> {
        let mut l = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort();
        l
    }

    /// `ok N failed F` and the latency percentiles so far, for a report line.
    fn line(&self, served: (f64, f64), label: &str) -> String {
        let lat = self.sorted_latencies();
        let total = (served.0 + served.1).max(1.0);
        format!(
            "{label} ok {:>6}  failed {:>3}  this second: node-b {:>3.0}% node-c {:>3.0}%  p50 {:.2} ms  p99 {:.2} ms",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            100.0 * served.0 / total,
            100.0 * served.1 / total,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        )
    }

    /// The final line: `requests N ok, F failed; served by node-b X, node-c Y; latency ...`.
    fn summary(&self, served: (f64, f64)) -> String {
        let lat = self.sorted_latencies();
        format!(
            "requests {} ok, {} failed; served by node-b {:.0}, node-c {:.0}; latency p50 {:.2} ms, p99 {:.2} ms",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            served.0,
            served.1,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        )
    }
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::SOFTWARE, format!("demo: {e}"))
}

struct Demo {
    dir: tempfile::TempDir,
    mesh: MemoryMesh,
    echo: SocketAddr,
    /// The HTTP application of node-b and of node-c.
    web: [SocketAddr; 2],
}

impl Demo {
    fn config(&self, name: &str, extra: &str) -> Result<Config, Failure> {
        let d = self.dir.path();
        let text = format!(
            "[node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{state}\"\ndrain_timeout = \"1s\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{extra}",
            state = d.join(format!("state-{name}")).display(),
            ca = d.join("ca.pem").display(),
            cert = d.join(format!("{name}.pem")).display(),
            key = d.join(format!("{name}.key")).display(),
        );
        Config::parse(&text).map_err(fail)
    }

    async fn start(&self, name: &str, extra: &str) -> Result<Node, Failure> {
        let config = self.config(name, extra)?;
        let d = self.dir.path();
        let identity = Identity::load(
            &d.join("ca.pem"),
            &d.join(format!("{name}.pem")),
            &d.join(format!("{name}.key")),
        )
        .map_err(fail)?;
        Node::start(NodeParts {
            config,
            identity,
            registry: self.mesh.connect(),
        })
        .await
    }

    /// node-b or node-c: the echo service and this node's HTTP application.
    async fn start_host(&self, name: &str) -> Result<Node, Failure> {
        let web = if name == "node-b" {
            self.web[0]
        } else {
            self.web[1]
        };
        let services = format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{}\"\n\
             [[service]]\nname = \"web\"\nprotocol = \"http\"\ntarget = \"{web}\"\n",
            self.echo
        );
        self.start(name, &services).await
    }
}

async fn echo_server() -> Result<SocketAddr, Failure> {
    let l = TcpListener::bind("127.0.0.1:0").await.map_err(fail)?;
    let addr = l.local_addr().map_err(fail)?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// An HTTP/1.1 application answering `hello from NAME` to every request.
async fn web_server(name: &'static str) -> Result<SocketAddr, Failure> {
    let l = TcpListener::bind("127.0.0.1:0").await.map_err(fail)?;
    let addr = l.local_addr().map_err(fail)?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let body = Full::new(Bytes::from(format!("hello from {name}\n")));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn echo_request(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(PAYLOAD).await?;
    let mut back = [0u8; 32];
    s.read_exact(&mut back).await?;
    if &back != PAYLOAD {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

async fn http_request(client: HttpClient, uri: http::Uri) -> std::io::Result<()> {
    let resp = client.get(uri).await.map_err(std::io::Error::other)?;
    let ok = resp.status() == http::StatusCode::OK;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    if !ok || !body.starts_with(b"hello from node-") {
        return Err(std::io::Error::other("unexpected answer"));
    }
    Ok(())
}

/// Starts `call` every [`INTERVAL`], each bounded by [`REQUEST_DEADLINE`], counted in `tally`.
fn steady<F, Fut>(tally: Arc<Tally>, call: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        loop {
            tick.tick().await;
            let (tally, request) = (tally.clone(), call());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = matches!(
                    tokio::time::timeout(REQUEST_DEADLINE, request).await,
                    Ok(Ok(()))
                );
                tally.record(ok, t0.elapsed());
            });
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// Connections node-a tunnelled to node-b and node-c.
fn tcp_split(a: &Node) -> (f64, f64) {
    let m = a.metrics();
    (
        m.get("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]),
        m.get("meshnode_tunnels_opened_total", &["echo", "node-c", "ok"]),
    )
}

/// HTTP requests node-a had answered by node-b and node-c.
fn http_split(a: &Node) -> (f64, f64) {
    let m = a.metrics();
    (
        m.get("meshnode_http_requests_total", &["web", "node-b", "200"]),
        m.get("meshnode_http_requests_total", &["web", "node-c", "200"]),
    )
}

/// Runs the demo for `duration` (or until Ctrl-C).
pub async fn run(duration: Duration) -> Result<(), Failure> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let ca = Ca::generate("demo.mesh", 1).map_err(fail)?;
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).map_err(fail)?;
    for n in ["node-a", "node-b", "node-c"] {
        ca.issue(n, 1)
            .and_then(|c| c.write(dir.path(), n))
            .map_err(fail)?;
    }
    let demo = Demo {
        dir,
        mesh: MemoryMesh::new(),
        echo: echo_server().await?,
        web: [web_server("node-b").await?, web_server("node-c").await?],
    };
    let mut b = Some(demo.start_host("node-b").await?);
    let c = demo.start_host("node-c").await?;
    let a = demo
        .start(
            "node-a",
            "[[outbound]]\nservice = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
             [[outbound]]\nservice = \"web\"\nlisten = \"127.0.0.1:0\"\n",
        )
        .await?;
    let echo_port = a
        .outbound_addr("echo")
        .ok_or_else(|| fail("node-a has no echo outbound listener"))?;
    let web_port = a
        .outbound_addr("web")
        .ok_or_else(|| fail("node-a has no web outbound listener"))?;
    println!(
        "meshnode demo: node-a {} → echo (tcp) and web (http) on node-b and node-c; client ports: echo {echo_port}, web http://{web_port}/; admin of node-a http://{}/status",
        a.quic_addr(),
        a.admin_addr()
    );
    println!(
        "every {} ms a new TCP connection to echo (balanced per connection) and an HTTP request to web on kept-alive connections (balanced per request), for {} s; node-b is killed at {:.0} s and revived at {:.0} s\n",
        INTERVAL.as_millis(),
        duration.as_secs(),
        duration.as_secs_f64() * 0.35,
        duration.as_secs_f64() * 0.65
    );

    let tcp = Arc::new(Tally::default());
    let web = Arc::new(Tally::default());
    let web_uri: http::Uri = format!("http://{web_port}/").parse().map_err(fail)?;
    let http_client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let clients = [
        steady(tcp.clone(), move || echo_request(echo_port)),
        steady(web.clone(), move || {
            http_request(http_client.clone(), web_uri.clone())
        }),
    ];

    let start = Instant::now();
    let mut killed = false;
    let mut revived = false;
    let (mut last_tcp, mut last_http) = ((0.0, 0.0), (0.0, 0.0));
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.tick().await;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while start.elapsed() < duration {
        tokio::select! {
            _ = second.tick() => {}
            _ = &mut ctrl_c => break,
        }
        let t = start.elapsed().as_secs_f64();
        if !killed && t >= duration.as_secs_f64() * 0.35 {
            if let Some(node) = b.take() {
                node.kill();
                println!("  ── node-b killed (no drain) ──");
            }
            killed = true;
        }
        if killed && !revived && t >= duration.as_secs_f64() * 0.65 {
            b = Some(demo.start_host("node-b").await?);
            println!("  ── node-b revived ──");
            revived = true;
        }
        let (now_tcp, now_http) = (tcp_split(&a), http_split(&a));
        let this_second = |now: (f64, f64), last: (f64, f64)| (now.0 - last.0, now.1 - last.1);
        println!(
            "  t={t:>4.0}s  {}\n          {}",
            tcp.line(this_second(now_tcp, last_tcp), "tcp "),
            web.line(this_second(now_http, last_http), "http"),
        );
        (last_tcp, last_http) = (now_tcp, now_http);
    }
    for c in &clients {
        c.abort();
    }
    // Let the last requests finish before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("\n{}", crate::status_cmd::render(&a.status(), false));
    println!("summary tcp:  {}", tcp.summary(tcp_split(&a)));
    println!("summary http: {}", web.summary(http_split(&a)));
    a.drain().await;
    c.drain().await;
    if let Some(b) = b {
        b.drain().await;
    }
    Ok(())
}
