//! A mesh of real `meshnode` processes on a real etcd, and a client that measures it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meshnode_registry::testing::EtcdProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process::*;

pub const TTL_S: u64 = 2;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub etcd: EtcdProcess,
}

impl Cluster {
    pub async fn new(names: &[&str]) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        // `meshnode ca init` / `cert issue` run to completion: off the runtime's workers.
        let (path, owned): (std::path::PathBuf, Vec<String>) = (
            dir.path().to_path_buf(),
            names.iter().map(|n| n.to_string()).collect(),
        );
        tokio::task::spawn_blocking(move || {
            let names: Vec<&str> = owned.iter().map(String::as_str).collect();
            pki(&path, &names)
        })
        .await??;
        let etcd = EtcdProcess::start().await?;
        Ok(Cluster { dir, etcd })
    }

    /// Starts a node; `body` adds services and outbounds.
    pub async fn node(&self, name: &str, body: &str) -> Result<NodeProcess> {
        self.node_at(name, body, free_udp()?, "").await
    }

    /// Starts a node on a given QUIC address; `extra_node` adds keys to `[node]`.
    pub async fn node_at(
        &self,
        name: &str,
        body: &str,
        quic: SocketAddr,
        extra_node: &str,
    ) -> Result<NodeProcess> {
        let admin = free_tcp()?;
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
        )
        .replacen("[tls]", &format!("{extra_node}\n[tls]"), 1);
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, cfg)?;
        let mut p = NodeProcess::start(&path, admin, &self.dir.path().join(format!("{name}.log")))?;
        p.wait_ready(Duration::from_secs(20)).await?;
        Ok(p)
    }
}

pub fn echo_service(echo: SocketAddr) -> String {
    format!("[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n")
}

pub fn outbound(addr: SocketAddr) -> String {
    format!("[[outbound]]\nservice = \"echo\"\nlisten = \"{addr}\"\n")
}

/// The endpoints of `echo` that `node` currently knows, from its /status.
pub async fn endpoints(node: &NodeProcess) -> Result<Vec<String>> {
    service_endpoints(node, "echo").await
}

/// The endpoints of `service` that `node` currently knows, from its /status.
pub async fn service_endpoints(node: &NodeProcess, service: &str) -> Result<Vec<String>> {
    let (_, body) = node.get("/status").await?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    let mut out = Vec::new();
    for s in doc["services"].as_array().context("services")? {
        if s["name"] == service {
            for e in s["endpoints"].as_array().context("endpoints")? {
                out.push(e["node"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

pub async fn registry_state(node: &NodeProcess) -> Result<String> {
    let (_, body) = node.get("/status").await?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    Ok(doc["registry"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Polls `f` (every 20 ms, on the runtime's timer) until it holds; returns how long it took.
/// An error from `f` counts as "not yet".
pub async fn until(
    what: &str,
    deadline: Duration,
    mut f: impl AsyncFnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if f().await.unwrap_or(false) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long `Traffic::stop` waits for the connections under way (each is bounded by
/// `CONNECTION_LIMIT`) before it calls the client stuck.
const STOP_LIMIT: Duration = Duration::from_secs(10);
const CONNECTION_LIMIT: Duration = Duration::from_secs(5);

/// A client opening a new connection every `interval`: writes "ping", expects a one-byte tag
/// of the serving node (see `tagged_server`) and the echo. Counts outcomes and the slowest.
pub struct Traffic {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    /// Successful connections by tag byte.
    pub by_tag: Arc<Mutex<std::collections::BTreeMap<u8, u64>>>,
    /// The slowest successful connection, microseconds.
    pub worst_us: Arc<AtomicU64>,
    /// When each failed connection started.
    pub failures: Arc<Mutex<Vec<Instant>>>,
    /// When each successful connection got its answer, with the tag of the node that served it.
    pub served: Arc<Mutex<Vec<(u8, Instant)>>>,
    stop: Arc<tokio::sync::Notify>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Traffic {
    pub fn start(addr: SocketAddr, interval: Duration) -> Traffic {
        let t = Traffic {
            ok: Arc::default(),
            failed: Arc::default(),
            by_tag: Arc::default(),
            worst_us: Arc::default(),
            failures: Arc::default(),
            served: Arc::default(),
            stop: Arc::default(),
            task: Mutex::new(None),
        };
        let (ok, failed, by_tag, worst, failures, served, stop) = (
            t.ok.clone(),
            t.failed.clone(),
            t.by_tag.clone(),
            t.worst_us.clone(),
            t.failures.clone(),
            t.served.clone(),
            t.stop.clone(),
        );
        let task = tokio::spawn(async move {
            // Every connection under way, so that `stop` can wait for the last of them.
            let mut running = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.notified() => break,
                    _ = tick.tick() => {}
                }
                while running.try_join_next().is_some() {}
                let (ok, failed, by_tag, worst, failures, served) = (
                    ok.clone(),
                    failed.clone(),
                    by_tag.clone(),
                    worst.clone(),
                    failures.clone(),
                    served.clone(),
                );
                running.spawn(async move {
                    let start = Instant::now();
                    let r = tokio::time::timeout(CONNECTION_LIMIT, async {
                        let mut s = tokio::net::TcpStream::connect(addr).await?;
                        s.write_all(b"ping").await?;
                        let mut b = [0u8; 5];
                        s.read_exact(&mut b).await?;
                        Ok::<_, std::io::Error>(b)
                    })
                    .await;
                    let done = Instant::now();
                    match r {
                        Ok(Ok(b)) if &b[1..] == b"ping" => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            worst.fetch_max((done - start).as_micros() as u64, Ordering::Relaxed);
                            if let Ok(mut m) = by_tag.lock() {
                                *m.entry(b[0]).or_default() += 1;
                            }
                            if let Ok(mut v) = served.lock() {
                                v.push((b[0], done));
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut f) = failures.lock() {
                                f.push(start);
                            }
                        }
                    }
                });
            }
            while running.join_next().await.is_some() {}
        });
        if let Ok(mut slot) = t.task.lock() {
            *slot = Some(task);
        }
        t
    }

    /// Stops opening connections and waits until every connection under way has finished
    /// (each ends within `CONNECTION_LIMIT`); returns (ok, failed), final from then on.
    /// Panics if the client is still busy after `STOP_LIMIT`.
    pub async fn stop(&self) -> (u64, u64) {
        self.stop.notify_one();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(mut task) = task {
            if tokio::time::timeout(STOP_LIMIT, &mut task).await.is_err() {
                task.abort();
                panic!(
                    "the traffic client's connections did not finish within {STOP_LIMIT:?} of stop"
                );
            }
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Failed connections that started at or after `t`.
    pub fn failed_since(&self, t: Instant) -> usize {
        self.failures
            .lock()
            .map(|f| f.iter().filter(|s| **s >= t).count())
            .unwrap_or(0)
    }

    /// When the first connection served by `tag` got its answer at or after `t`, if any.
    pub fn first_served_since(&self, tag: u8, t: Instant) -> Option<Instant> {
        self.served
            .lock()
            .ok()?
            .iter()
            .filter(|(g, done)| *g == tag && *done >= t)
            .map(|(_, done)| *done)
            .min()
    }

    pub fn tagged(&self, tag: u8) -> u64 {
        self.by_tag
            .lock()
            .map(|m| m.get(&tag).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn worst(&self) -> Duration {
        Duration::from_micros(self.worst_us.load(Ordering::Relaxed))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        if let Ok(mut t) = self.task.lock() {
            if let Some(t) = t.take() {
                t.abort();
            }
        }
    }
}
