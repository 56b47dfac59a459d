//! Memory per idle peer connection, and its return to the OS once the connections have left, on
//! real loopback sockets (alone in its test binary, so that no other test's memory moves the
//! figures).
//!
//! The server (this process) is a `MeshEndpoint` with the default memory settings; the
//! clients, with valid mesh certificates, live in a child process (this test binary again) so
//! that their own memory does not count. RSS (VmRSS) is read from /proc/self/status.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{endpoint_with, identity};
use meshnode_transport::pki::Ca;
use meshnode_transport::{Identity, MeshEndpoint, StreamLimit, TransportConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

// The allocator meshnode's binary runs with, so that the figures are the node's.
#[global_allocator]
static GLOBAL: meshnode_transport::memory::Allocator = meshnode_transport::memory::Allocator;

const TD: &str = "mesh.test";
const CHILD_ENV: &str = "MESHNODE_IDLE_TARGET";
/// Idle connections measured (issue 19's test: 1,000 valid-certificate connections).
const CONNECTIONS: usize = 1_000;
/// Longest wait, after the last connection closed, for the endpoint's memory trim (it waits for
/// the closed connections to drain first, at most 10 s, and a trim interval after the last).
const TRIM_WAIT: Duration = Duration::from_secs(20);
/// Connections opened and closed first, so that one-off allocations (thread caches, rustls and
/// quinn statics, the accept path's first use) land in the baseline.
const WARM_UP: usize = 40;
/// Client source addresses (127.0.0.2 …): one host would be held to the per-source handshake
/// bounds, which are not what this test measures.
const SOURCES: usize = 50;
const BOUND_PER_CONNECTION: u64 = 256 * 1024;
/// Dials in flight at once from the client process.
const DIAL_CONCURRENCY: usize = 32;

fn vm_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kib * 1024)
}

/// Accepts and holds connections as a node does (a task per connection with its stream limit);
/// `live` counts the ones open.
fn serve(b: MeshEndpoint, live: Arc<AtomicU32>) {
    tokio::spawn(async move {
        while let Some(handshake) = b.accept().await {
            let (b, live) = (b.clone(), live.clone());
            tokio::spawn(async move {
                let Ok(inbound) = b.accept_connection(handshake).await else {
                    return;
                };
                live.fetch_add(1, Ordering::SeqCst);
                let limit = StreamLimit::new(&inbound.conn, b.transport());
                while let Ok((_send, _recv)) = inbound.conn.accept_bi().await {
                    let _permit = limit.on_accept();
                }
                live.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
}

async fn wait_for(live: &AtomicU32, n: usize, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while live.load(Ordering::SeqCst) as usize != n {
        if Instant::now() > deadline {
            bail!(
                "{} connections open, waited for {n}",
                live.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// RSS once it has stopped moving (two reads 300 ms apart within 64 KiB), at most 5 s later.
async fn settled_rss() -> Result<u64> {
    let mut last = vm_rss()?;
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = vm_rss()?;
        if now.abs_diff(last) < 64 * 1024 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

struct Child {
    proc: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn say(&mut self, word: &str) -> Result<()> {
        self.stdin.write_all(format!("{word}\n").as_bytes()).await?;
        Ok(self.stdin.flush().await?)
    }

    async fn expect(&mut self, prefix: &str) -> Result<String> {
        let wait = async {
            while let Some(line) = self.lines.next_line().await? {
                // libtest's "test … " may share the line.
                if let Some(at) = line.find(prefix) {
                    return Ok(line[at..].to_string());
                }
                eprintln!("client process: {line}");
            }
            bail!("client process ended before {prefix:?}")
        };
        tokio::time::timeout(Duration::from_secs(40), wait)
            .await
            .with_context(|| format!("no {prefix:?} from the client process"))?
    }
}

const TEST_NAME: &str = "idle_peer_connections_cost_at_most_256_kib_and_their_memory_returns";

#[test]
fn idle_peer_connections_cost_at_most_256_kib_and_their_memory_returns() -> Result<()> {
    // Two worker threads, with the node's park hook: each returns its own heap's free pages
    // after a trim (node/src/runtime.rs builds the node's runtime the same way).
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_park(meshnode_transport::memory::on_thread_park)
        .build()?
        .block_on(idle_connections())
}

async fn idle_connections() -> Result<()> {
    if let Ok(target) = std::env::var(CHILD_ENV) {
        return clients::run(target.parse()?).await;
    }
    let ca = Ca::generate(TD, 30)?;
    // Admission's handshake rate (100/s by default) would make opening 1,000 connections take
    // 10 s a round; what this test measures does not depend on it.
    let transport = TransportConfig {
        handshake_rate: 1_000,
        ..TransportConfig::default()
    };
    let b = endpoint_with(identity(&ca, "node-b")?, transport)?;
    let live = Arc::new(AtomicU32::new(0));
    serve(b.clone(), live.clone());
    let issued = ca.issue("node-c", 1)?;
    let mut proc = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", TEST_NAME])
        .args(["--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, b.local_addr()?.to_string())
        .env("MESHNODE_IDLE_CA", ca.cert_pem())
        .env("MESHNODE_IDLE_CERT", &issued.cert_pem)
        .env("MESHNODE_IDLE_KEY", &issued.key_pem)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut child = Child {
        stdin: proc.stdin.take().context("stdin")?,
        lines: tokio::io::BufReader::new(proc.stdout.take().context("stdout")?).lines(),
        proc,
    };

    // The warm-up wave is below the trim threshold: it leaves the allocator's arenas as they
    // are, so the baseline includes what a first wave leaves behind anyway.
    child.say(&format!("open {WARM_UP}")).await?;
    child.expect("UP").await?;
    wait_for(&live, WARM_UP, Duration::from_secs(20)).await?;
    child.say("close").await?;
    child.expect("CLOSED").await?;
    wait_for(&live, 0, Duration::from_secs(20)).await?;
    let base = settled_rss().await?;

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut rounds = Vec::new();
    for round in 1..=2 {
        let started = Instant::now();
        child.say(&format!("open {CONNECTIONS}")).await?;
        child.expect("UP").await?;
        wait_for(&live, CONNECTIONS, Duration::from_secs(30)).await?;
        let opened_in = started.elapsed();
        let loaded = settled_rss().await?;
        let trims = b.memory_trims();
        child.say("close").await?;
        child.expect("CLOSED").await?;
        wait_for(&live, 0, Duration::from_secs(20)).await?;
        // Before the endpoint's trim (it first waits for the closed connections to drain):
        // what glibc keeps on its own. For the figures only; the race with the trim is benign.
        let at_close = vm_rss()?;
        let t = Instant::now();
        while b.memory_trims() == trims && t.elapsed() < TRIM_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let trimmed_in = t.elapsed();
        let after = settled_rss().await?;
        println!(
            "round {round}: {CONNECTIONS} idle connections up in {opened_in:?}: RSS {:.1} → \
             {:.1} MiB, {:.1} KiB per connection; when the last closed {:.1} MiB; trimmed \
             {trimmed_in:?} later ({} trims), then {:.1} MiB (quinn connections open: {})",
            mib(base),
            mib(loaded),
            loaded.saturating_sub(base) as f64 / CONNECTIONS as f64 / 1024.0,
            mib(at_close),
            b.memory_trims(),
            mib(after),
            b.quinn().open_connections(),
        );
        rounds.push((loaded, b.memory_trims() > trims, after));
    }
    child.say("exit").await?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.proc.wait()).await??;
    println!("handshakes: {:?}", b.handshake_stats().snapshot());
    assert!(status.success(), "client process: {status}");

    for (round, (loaded, trimmed, after)) in rounds.into_iter().enumerate() {
        let growth = loaded.saturating_sub(base);
        let per_conn = growth / CONNECTIONS as u64;
        assert!(
            per_conn <= BOUND_PER_CONNECTION,
            "round {}: {per_conn} bytes per idle connection",
            round + 1
        );
        assert!(
            trimmed,
            "round {}: no memory trim within {TRIM_WAIT:?}",
            round + 1
        );
        // Measured: back within 1–2 MiB of the baseline out of ~55 MiB grown.
        assert!(
            after.saturating_sub(base) <= growth / 4,
            "round {}: RSS {after} after the connections left, baseline {base}, loaded {loaded}",
            round + 1
        );
    }
    Ok(())
}

/// The client side, run in the child process: opens and closes batches of connections on
/// command (`open N`, `close`, `exit` on stdin).
mod clients {
    use super::*;

    fn source(i: usize) -> SocketAddr {
        let last = u8::try_from(2 + i % SOURCES).unwrap_or(2);
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
    }

    async fn dial(ep: quinn::Endpoint, target: SocketAddr) -> Result<quinn::Connection> {
        // Admission may refuse a burst: try again, as a node's dialler does.
        let mut last = String::new();
        for _ in 0..50 {
            let connecting = ep.connect(target, "node-b")?;
            match tokio::time::timeout(Duration::from_secs(2), connecting).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("no connection after 50 tries: {last}")
    }

    pub(super) async fn run(target: SocketAddr) -> Result<()> {
        let id = Identity::from_pem(
            &std::env::var("MESHNODE_IDLE_CA")?,
            &std::env::var("MESHNODE_IDLE_CERT")?,
            &std::env::var("MESHNODE_IDLE_KEY")?,
        )?;
        let mut config = quinn::ClientConfig::new(id.client_config(&[b"meshnode/1"])?);
        config.transport_config(TransportConfig::default().to_quinn());
        let endpoints = (0..SOURCES)
            .map(|i| {
                let mut ep = quinn::Endpoint::client(source(i))?;
                ep.set_default_client_config(config.clone());
                Ok(ep)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut held: Vec<quinn::Connection> = Vec::new();
        // Commands arrive on stdin, read on a plain thread (tokio's stdin is not enabled here).
        let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(line) = commands.recv().await {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("open") => {
                    let n: usize = words.next().context("open N")?.parse()?;
                    let target_len = held.len() + n;
                    let deadline = Instant::now() + Duration::from_secs(30);
                    // A client can finish its side of the handshake before the server gives
                    // up on its own (TLS 1.3): count only connections still up a moment later.
                    while held.len() < target_len && Instant::now() < deadline {
                        let gate = Arc::new(tokio::sync::Semaphore::new(DIAL_CONCURRENCY));
                        let mut tasks = tokio::task::JoinSet::new();
                        for i in held.len()..target_len {
                            let (ep, gate) = (endpoints[i % SOURCES].clone(), gate.clone());
                            tasks.spawn(async move {
                                let _turn = gate.acquire_owned().await?;
                                dial(ep, target).await
                            });
                        }
                        while let Some(c) = tasks.join_next().await {
                            held.push(c??);
                        }
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        held.retain(|c| c.close_reason().is_none());
                    }
                    println!("UP {}", held.len());
                }
                Some("close") => {
                    for c in held.drain(..) {
                        c.close(0u32.into(), b"bye");
                    }
                    println!("CLOSED");
                }
                _ => break,
            }
        }
        for ep in &endpoints {
            ep.close(0u32.into(), b"bye");
        }
        Ok(())
    }
}
