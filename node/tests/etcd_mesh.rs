//! Discovery on a real etcd with real `meshnode` processes: registration, lease expiry after
//! SIGKILL, deregistration on SIGTERM, and traffic that never stops while etcd restarts or
//! freezes (static stability).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::process::*;
use common::*;
use meshnode_registry::testing::EtcdProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TTL_S: u64 = 2;

struct Cluster {
    dir: tempfile::TempDir,
    etcd: EtcdProcess,
}

impl Cluster {
    async fn new(names: &[&str]) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        pki(dir.path(), names)?;
        let etcd = EtcdProcess::start().await?;
        Ok(Cluster { dir, etcd })
    }

    /// Starts a node; `body` adds services and outbounds.
    fn node(&self, name: &str, body: &str) -> Result<NodeProcess> {
        let (quic, admin) = (free_udp()?, free_tcp()?);
        let registry = format!(
            "[registry]\nendpoints = [\"{}\"]\nprefix = \"/test\"\nlease_ttl = \"{TTL_S}s\"\n",
            self.etcd.endpoint
        );
        let cfg = node_config(
            self.dir.path(),
            name,
            quic,
            admin,
            &format!("{registry}{body}"),
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, cfg)?;
        let mut p = NodeProcess::start(&path, admin, &self.dir.path().join(format!("{name}.log")))?;
        p.wait_ready(Duration::from_secs(20))?;
        Ok(p)
    }
}

fn echo_service(echo: SocketAddr) -> String {
    format!("[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n")
}

fn outbound(addr: SocketAddr) -> String {
    format!("[[outbound]]\nservice = \"echo\"\nlisten = \"{addr}\"\n")
}

/// The endpoints of `echo` that `node` currently knows, from its /status.
fn endpoints(node: &NodeProcess) -> Result<Vec<String>> {
    let (_, body) = node.get("/status")?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    let mut out = Vec::new();
    for s in doc["services"].as_array().context("services")? {
        if s["name"] == "echo" {
            for e in s["endpoints"].as_array().context("endpoints")? {
                out.push(e["node"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn registry_state(node: &NodeProcess) -> Result<String> {
    let (_, body) = node.get("/status")?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    Ok(doc["registry"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Polls until `f` holds; returns how long it took.
fn until(what: &str, deadline: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if f().unwrap_or(false) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_and_vanish_by_lease_or_at_once() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), async {
        let cluster = Cluster::new(&["node-a", "node-b", "node-c"]).await?;
        let echo = echo_server().await?;
        let a = cluster.node("node-a", &outbound(free_tcp()?))?;
        let b = cluster.node("node-b", &echo_service(echo))?;
        until("node-a to see node-b", Duration::from_secs(10), || {
            Ok(endpoints(&a)? == ["node-b"])
        })?;
        // A node started later is discovered.
        let mut c = cluster.node("node-c", &echo_service(echo))?;
        until("node-a to see node-c", Duration::from_secs(10), || {
            Ok(endpoints(&a)? == ["node-b", "node-c"])
        })?;

        // SIGKILL: nothing is deregistered; the lease expires.
        c.signal(libc::SIGKILL)?;
        c.wait_exit(Duration::from_secs(5))?;
        let gone = until(
            "node-c's lease to expire",
            Duration::from_secs(TTL_S + 5),
            || Ok(endpoints(&a)? == ["node-b"]),
        )?;
        eprintln!("SIGKILL: node-c left node-a's view after {gone:?} (lease_ttl {TTL_S}s)");
        assert!(
            gone <= Duration::from_millis(TTL_S * 1000 + 1500),
            "took {gone:?}"
        );

        // SIGTERM: the lease is revoked first, so the node vanishes at once.
        let mut b = b;
        b.signal(libc::SIGTERM)?;
        let gone = until("node-b to deregister", Duration::from_secs(5), || {
            Ok(endpoints(&a)?.is_empty())
        })?;
        eprintln!("SIGTERM: node-b left node-a's view after {gone:?}");
        assert!(gone < Duration::from_secs(1), "took {gone:?}");
        assert_eq!(b.wait_exit(Duration::from_secs(10))?, Some(0));
        Ok(())
    })
    .await?
}

/// Opens a connection every 20 ms through `addr` and counts failures.
fn traffic(addr: SocketAddr) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (o, f) = (ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let (o, f) = (o.clone(), f.clone());
            tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut s = tokio::net::TcpStream::connect(addr).await?;
                    s.write_all(b"ping").await?;
                    let mut b = [0u8; 4];
                    s.read_exact(&mut b).await?;
                    Ok::<_, std::io::Error>(b == *b"ping")
                })
                .await;
                if matches!(r, Ok(Ok(true))) {
                    o.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (ok, failed, task)
}

async fn etcd_has(etcd: &EtcdProcess, key: &str) -> Result<bool> {
    let mut c = etcd.client().await?;
    Ok(c.get(key, None).await?.kvs().len() == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_never_stops_while_etcd_restarts_or_freezes() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(150), async {
        let mut cluster = Cluster::new(&["node-a", "node-b"]).await?;
        let echo = echo_server().await?;
        let out = free_tcp()?;
        let a = cluster.node("node-a", &outbound(out))?;
        let b = cluster.node("node-b", &echo_service(echo))?;
        until("node-a to see node-b", Duration::from_secs(10), || {
            Ok(endpoints(&a)? == ["node-b"])
        })?;
        let (ok, failed, task) = traffic(out);

        // etcd killed, down for a second, restarted.
        cluster.etcd.kill();
        until(
            "node-a to report the registry disconnected",
            Duration::from_secs(10),
            || Ok(registry_state(&a)? == "disconnected"),
        )?;
        tokio::time::sleep(Duration::from_secs(1)).await; // etcd stays down for a while
        cluster.etcd.restart().await?;
        let back = Instant::now();
        loop {
            let both = etcd_has(&cluster.etcd, "/test/nodes/node-a")
                .await
                .unwrap_or(false)
                && etcd_has(&cluster.etcd, "/test/services/echo/node-b")
                    .await
                    .unwrap_or(false);
            if both && registry_state(&a)? == "connected" && registry_state(&b)? == "connected" {
                break;
            }
            if back.elapsed() > Duration::from_secs(5) {
                bail!("nodes not registered again within 5 s of etcd's return");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "etcd restart: both nodes registered again {:?} after etcd returned",
            back.elapsed()
        );

        // etcd frozen for longer than the lease TTL.
        cluster.etcd.pause()?;
        until(
            "node-a to report the registry disconnected",
            Duration::from_secs(10),
            || Ok(registry_state(&a)? == "disconnected"),
        )?;
        tokio::time::sleep(Duration::from_secs(TTL_S + 1)).await; // frozen past the TTL
        assert_eq!(
            endpoints(&a)?,
            ["node-b"],
            "routes kept while etcd is frozen"
        );
        cluster.etcd.resume()?;
        let took = until(
            "the registry to be consistent again",
            Duration::from_secs(10),
            || {
                Ok(registry_state(&a)? == "connected"
                    && registry_state(&b)? == "connected"
                    && endpoints(&a)? == ["node-b"])
            },
        )?;
        eprintln!("etcd freeze: consistent {took:?} after SIGCONT");
        tokio::time::sleep(Duration::from_millis(500)).await;
        task.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        eprintln!("traffic during etcd faults: {ok} ok, {failed} failed");
        assert!(ok > 100, "too little traffic: {ok}");
        assert_eq!(
            failed,
            0,
            "connections failed while etcd was unwell; logs:\n{}\n{}",
            a.log_text(),
            b.log_text()
        );
        Ok(())
    })
    .await?
}
