//! `meshnode demo`: a whole mesh in one process with no set-up (docs/README.md).
//!
//! Three real nodes (real QUIC on loopback, a throw-away CA in a temp dir, the in-process
//! registry), a TCP echo service on node-b and node-c, and a client opening a new connection
//! through node-a every 10 ms. Part-way through node-b is killed (no drain) and later revived,
//! to show failover and recovery; a line a second shows the split and the latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshnode_registry::memory::MemoryMesh;
use meshnode_transport::pki::Ca;
use meshnode_transport::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::exit::{self, Failure};
use crate::node::{Node, NodeParts};

/// How often the client opens a new connection.
const INTERVAL: Duration = Duration::from_millis(10);
const PAYLOAD: &[u8; 32] = b"meshnode demo payload 0123456789";

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

fn fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::SOFTWARE, format!("demo: {e}"))
}

struct Demo {
    dir: tempfile::TempDir,
    mesh: MemoryMesh,
    echo: std::net::SocketAddr,
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

    fn echo_service(&self) -> String {
        format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{}\"\n",
            self.echo
        )
    }
}

async fn echo_server() -> Result<std::net::SocketAddr, Failure> {
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

async fn one_request(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(PAYLOAD).await?;
    let mut back = [0u8; 32];
    s.read_exact(&mut back).await?;
    if &back != PAYLOAD {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn split(a: &Node) -> (f64, f64) {
    let m = a.metrics();
    (
        m.get("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]),
        m.get("meshnode_tunnels_opened_total", &["echo", "node-c", "ok"]),
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
    };
    let mut b = Some(demo.start("node-b", &demo.echo_service()).await?);
    let c = demo.start("node-c", &demo.echo_service()).await?;
    let a = demo
        .start(
            "node-a",
            "[[outbound]]\nservice = \"echo\"\nlisten = \"127.0.0.1:0\"\n",
        )
        .await?;
    let outbound = a
        .outbound_addr("echo")
        .ok_or_else(|| fail("node-a has no outbound listener"))?;
    println!(
        "meshnode demo: node-a {} → echo on node-b and node-c; client port {outbound}; admin of node-a http://{}/status",
        a.quic_addr(),
        a.admin_addr()
    );
    println!("a new connection every {} ms for {} s; node-b is killed at {:.0} s and revived at {:.0} s\n",
        INTERVAL.as_millis(), duration.as_secs(), duration.as_secs_f64() * 0.35, duration.as_secs_f64() * 0.65);

    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let client = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            loop {
                tick.tick().await;
                let tally = tally.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(5), one_request(outbound)).await
                    {
                        Ok(Ok(())) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut l) = tally.latencies.lock() {
                                l.push(t0.elapsed());
                            }
                        }
                        _ => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        })
    };

    let mut killed = false;
    let mut revived = false;
    let mut last = (0.0, 0.0);
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
            b = Some(demo.start("node-b", &demo.echo_service()).await?);
            println!("  ── node-b revived ──");
            revived = true;
        }
        let now = split(&a);
        let (db, dc) = (now.0 - last.0, now.1 - last.1);
        last = now;
        let lat = {
            let mut l = tally
                .latencies
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            l.sort();
            l
        };
        let total = (db + dc).max(1.0);
        println!(
            "  t={t:>4.0}s  ok {:>6}  failed {:>3}  this second: node-b {:>3.0}% node-c {:>3.0}%  p50 {:.2} ms  p99 {:.2} ms",
            tally.ok.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
            100.0 * db / total,
            100.0 * dc / total,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        );
    }
    client.abort();
    // Let the last requests finish before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("\n{}", crate::status_cmd::render(&a.status(), false));
    let (nb, nc) = split(&a);
    let mut lat = tally
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort();
    println!(
        "summary: requests {} ok, {} failed; served by node-b {nb:.0}, node-c {nc:.0}; latency p50 {:.2} ms, p99 {:.2} ms",
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    );
    a.drain().await;
    c.drain().await;
    if let Some(b) = b {
        b.drain().await;
    }
    Ok(())
}
