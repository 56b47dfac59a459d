//! A handshake flood beside an established mutual-TLS connection, on real loopback sockets.
//!
//! Node B is a `MeshEndpoint` with the default handshake bounds; node A holds one connection to
//! it and ping-pongs 1 KiB on one stream. A child process (this test binary again, at the lowest
//! CPU priority so that it stands in for an attacker on another host rather than competing for
//! B's cores) floods B from many loopback sources: real quinn clients with no client certificate
//! or a foreign CA's, and forged Initials from a plain UDP socket; beside it a pool of aioquic
//! clients (a third-party QUIC stack, `aioquic_flood.py`, also at the lowest priority) does the
//! same from other sources. The ping-pong's p99 during the flood must stay within 3× its p99
//! before, no round trip may reach 250 ms, and B's handshake counters must show the flood
//! refused.

#[path = "common/aioquic.rs"]
mod aioquic;
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{endpoint, identity};
use meshnode_transport::admission::HandshakeResult;
use meshnode_transport::pki::Ca;
use meshnode_transport::{Alpn, Identity, MeshEndpoint};
use tokio::io::AsyncBufReadExt;

const TD: &str = "mesh.test";
const CHILD_ENV: &str = "MESHNODE_FLOOD_TARGET";
const CA_ENV: &str = "MESHNODE_FLOOD_CA";
const FLOOD: Duration = Duration::from_secs(8);
const PING_LEN: usize = 1024;
/// Pause between pings: ~400 samples a second, each a real round trip.
const PING_GAP: Duration = Duration::from_micros(2_500);

/// The least p99 increase the flood may cause before the test calls it a stall (µs).
const P99_FLOOR_US: u64 = 2_000;

/// B's accept loop: echo every stream of every admitted, authenticated connection.
fn serve(b: MeshEndpoint) {
    tokio::spawn(async move {
        while let Some(handshake) = b.accept().await {
            let b = b.clone();
            tokio::spawn(async move {
                let Ok(inbound) = b.accept_connection(handshake).await else {
                    return;
                };
                let limit = meshnode_transport::StreamLimit::new(&inbound.conn, b.transport());
                while let Ok((mut send, mut recv)) = inbound.conn.accept_bi().await {
                    let permit = limit.on_accept();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _ = tokio::io::copy(&mut recv, &mut send).await;
                    });
                }
            });
        }
    });
}

/// Round trips of `PING_LEN` bytes on one stream until `until`, in microseconds.
async fn ping_pong(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    until: Instant,
) -> Result<Vec<u64>> {
    let msg = vec![7u8; PING_LEN];
    let mut back = vec![0u8; PING_LEN];
    let mut rtts = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        send.write_all(&msg).await?;
        tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut back))
            .await
            .context("echo within 5 s")??;
        rtts.push(u64::try_from(t.elapsed().as_micros())?);
        tokio::time::sleep(PING_GAP).await;
    }
    Ok(rtts)
}

/// How late a plain thread's 1 ms sleeps wake, in microseconds, until `until`: the stalls the
/// machine imposes on any thread of this process.
fn stall_probe(until: Instant) -> Vec<u64> {
    let mut late = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(1));
        let over = t.elapsed().saturating_sub(Duration::from_millis(1));
        late.push(u64::try_from(over.as_micros()).unwrap_or(u64::MAX));
    }
    late
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_does_not_stall_an_established_connection() -> Result<()> {
    if let Ok(target) = std::env::var(CHILD_ENV) {
        return flood::run(target.parse()?, FLOOD).await;
    }
    let ca = Ca::generate(TD, 30)?;
    let a = endpoint(identity(&ca, "node-a")?)?;
    let b = endpoint(identity(&ca, "node-b")?)?;
    let b_addr = b.local_addr()?;
    serve(b.clone());
    let conn = a.connect("node-b", b_addr, Alpn::Meshnode).await?;
    let (mut send, mut recv) = conn.open_bi().await?;

    // Warm up, then the baseline.
    ping_pong(
        &mut send,
        &mut recv,
        Instant::now() + Duration::from_millis(500),
    )
    .await?;
    let mut before = ping_pong(
        &mut send,
        &mut recv,
        Instant::now() + Duration::from_secs(4),
    )
    .await?;

    // The aioquic pool first (Python takes a moment to start), for the whole flood.
    let rogue = tempfile::tempdir()?;
    let mut pool = aioquic::start(rogue.path(), b_addr, FLOOD + Duration::from_secs(3)).await?;

    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new("nice")
        .arg("-n")
        .arg("19")
        .arg(exe)
        .args([
            "--exact",
            "handshake_flood_does_not_stall_an_established_connection",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, b_addr.to_string())
        .env(CA_ENV, ca.cert_pem())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("spawn the flood child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // The child says when its flood starts.
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            // libtest's "test … " may share the line.
            if line.contains("FLOOD started") {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await
    .context("flood child did not start within 20 s")??;
    if !started {
        bail!("flood child exited before starting");
    }
    let flood_start = Instant::now();
    let until = flood_start + FLOOD - Duration::from_millis(500);
    let probe = std::thread::spawn(move || stall_probe(until));
    let mut during = ping_pong(&mut send, &mut recv, until).await?;
    let mut stalls = probe
        .join()
        .map_err(|_| anyhow::anyhow!("stall probe panicked"))?;
    stalls.sort_unstable();
    let (stall_p99, stall_max) = (
        percentile(&stalls, 0.99),
        stalls.last().copied().unwrap_or(0),
    );
    let mut report = String::new();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(at) = line.find("FLOOD done") {
                report = line[at..].to_string();
            }
        }
        child.wait().await
    })
    .await
    .context("flood child did not finish")??;

    let pool_report = match pool.as_mut() {
        Some(p) => Some(p.finish().await?),
        None => None,
    };

    before.sort_unstable();
    during.sort_unstable();
    let stats = b.handshake_stats().snapshot();
    let (p50b, p99b) = (percentile(&before, 0.5), percentile(&before, 0.99));
    let (p50d, p99d) = (percentile(&during, 0.5), percentile(&during, 0.99));
    let worst = *during.last().context("no ping during the flood")?;
    println!(
        "ping-pong before: n={} p50={p50b} µs p99={p99b} µs max={} µs",
        before.len(),
        before.last().copied().unwrap_or(0)
    );
    println!(
        "ping-pong during: n={} p50={p50d} µs p99={p99d} µs max={worst} µs",
        during.len()
    );
    println!("child: {report}");
    if let Some(r) = &pool_report {
        println!("aioquic pool: {}", r.line);
    }
    println!(
        "machine: a plain thread's 1 ms sleeps overslept p99={stall_p99} µs max={stall_max} µs \
         during the flood (load from outside this test)"
    );
    println!("node-b handshakes: {stats:?}");
    assert!(status.success(), "flood child failed: {status}");

    let count = |r| b.handshake_stats().get(r);
    assert!(
        count(HandshakeResult::Failed) > 0,
        "no failed handshake: {stats:?}"
    );
    assert!(
        count(HandshakeResult::Retry) > 0,
        "no Retry sent: {stats:?}"
    );
    assert!(
        count(HandshakeResult::Ignored) + count(HandshakeResult::Refused) > 0,
        "nothing refused or ignored: {stats:?}"
    );
    assert_eq!(
        count(HandshakeResult::Accepted),
        1,
        "only node-a is a peer: {stats:?}"
    );
    if let Some(r) = &pool_report {
        // None of its clients became a peer (asserted above: B accepted only node-a). A client
        // that finished its side may see no close: B drops a handshake it never completes
        // (the client's flight lost in the flood) silently at its idle timeout.
        assert!(r.get("attempts") > 0, "aioquic pool: {}", r.line);
    }
    // The bounds are on what the node adds. A 2-core machine shared with other work can stall
    // any thread of this process; the probe thread, which does nothing but sleep, measures that
    // and it is allowed for, so the test fails on the node's stalls, not on the machine's.
    assert!(
        worst < 250_000 + stall_max,
        "worst round trip {worst} µs during the flood (machine stalls up to {stall_max} µs)"
    );
    // 3 × the p99 before, but never less than 2 ms above it: on a quiet machine the loopback
    // baseline is ~0.3 ms, and a flood that the 2 cores must also carry (the flooding child
    // runs on them) adds about a millisecond of plain CPU sharing (measured 0.30 → 1.44 ms).
    // The stall this guards against was 40-63 ms p99 and seconds at worst.
    let allowed = (3 * p99b).max(p99b + P99_FLOOR_US) + stall_p99;
    assert!(
        p99d <= allowed,
        "p99 during the flood {p99d} µs > {allowed} µs (3 × {p99b} µs before, at least \
         {P99_FLOOR_US} µs above it, + machine p99 {stall_p99} µs)"
    );
    // The established connection is still the same and usable.
    assert!(conn.close_reason().is_none());
    Ok(())
}

/// The flood, run in the child process.
mod flood {
    use super::*;
    use quinn::crypto::rustls::QuicClientConfig;
    use quinn::rustls;

    /// Loopback source addresses the clients bind (127.0.0.2 …), so that the total bounds are
    /// exercised, not only the per-source ones.
    const SOURCES: usize = 200;
    /// Concurrent handshaking clients.
    const CLIENTS: usize = 300;
    /// Forged Initials sent in one burst, as in the incident (20,000 in 0.9 s).
    const FORGED: usize = 20_000;
    const FORGED_SPREAD: Duration = Duration::from_millis(900);

    fn source(i: usize) -> SocketAddr {
        let last = u8::try_from(2 + i % SOURCES).unwrap_or(2);
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
    }

    /// Client configs that B must refuse: a foreign CA's certificate, and no certificate.
    fn bad_configs(mesh_ca: &str) -> Result<Vec<quinn::ClientConfig>> {
        let rogue = Ca::generate(TD, 30)?;
        let issued = rogue.issue("node-x", 1)?;
        let bundle = format!("{mesh_ca}{}", rogue.cert_pem());
        let foreign = Identity::from_pem(&bundle, &issued.cert_pem, &issued.key_pem)?;
        let mut configs = vec![quinn::ClientConfig::new(
            foreign.client_config(&[b"meshnode/1"])?,
        )];
        // A standard TLS client trusting the mesh CA, with no certificate of its own.
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls_pemfile::certs(&mut mesh_ca.as_bytes()) {
            roots.add(der?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"meshnode/1".to_vec()];
        configs.push(quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls)?,
        )));
        Ok(configs)
    }

    /// A 1,200-byte datagram that parses as a QUIC v1 Initial with random connection IDs and a
    /// random (undecryptable) payload.
    fn forged_initial(seed: &mut u64) -> Vec<u8> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let mut p = vec![0xc3u8, 0, 0, 0, 1, 8];
        p.extend_from_slice(&next().to_le_bytes());
        p.push(8);
        p.extend_from_slice(&next().to_le_bytes());
        p.push(0); // token length
        let rest = 1200 - p.len() - 2;
        p.push(0x40 | u8::try_from(rest >> 8).unwrap_or(0));
        p.push(u8::try_from(rest & 0xff).unwrap_or(0));
        while p.len() < 1200 {
            p.extend_from_slice(&next().to_le_bytes());
        }
        p.truncate(1200);
        p
    }

    fn send_forged() -> Result<usize> {
        let target: SocketAddr = std::env::var(CHILD_ENV)?.parse()?;
        let sockets: Vec<std::net::UdpSocket> = (0..10)
            .map(|i| std::net::UdpSocket::bind(source(SOURCES - 1 - i)))
            .collect::<std::io::Result<_>>()?;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let start = Instant::now();
        let mut sent = 0;
        for i in 0..FORGED {
            let pkt = forged_initial(&mut seed);
            if sockets[i % sockets.len()].send_to(&pkt, target).is_ok() {
                sent += 1;
            }
            // Pace to the incident's rate.
            let due = FORGED_SPREAD.mul_f64(i as f64 / FORGED as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(sent)
    }

    pub(super) async fn run(target: SocketAddr, length: Duration) -> Result<()> {
        let ca = std::env::var(CA_ENV)?;
        let configs = bad_configs(&ca)?;
        let attempts = Arc::new(AtomicU64::new(0));
        let completed = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + length;
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            let mut ep = quinn::Endpoint::client(source(i))?;
            ep.set_default_client_config(configs[i % configs.len()].clone());
            let (attempts, completed) = (attempts.clone(), completed.clone());
            clients.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let Ok(connecting) = ep.connect(target, "node-b") else {
                        break;
                    };
                    let done = tokio::time::timeout(Duration::from_secs(2), connecting).await;
                    if let Ok(Ok(conn)) = done {
                        // TLS 1.3: the client may finish before the server refuses it.
                        completed.fetch_add(1, Ordering::Relaxed);
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    }
                }
                ep.close(0u32.into(), b"");
            }));
        }
        println!("FLOOD started");
        tokio::time::sleep(length / 3).await;
        let forged = tokio::task::spawn_blocking(send_forged).await??;
        for c in clients {
            c.await?;
        }
        println!(
            "FLOOD done handshake_attempts={} client_side_completed={} forged_initials={forged} \
             sources={SOURCES} clients={CLIENTS}",
            attempts.load(Ordering::Relaxed),
            completed.load(Ordering::Relaxed),
        );
        Ok(())
    }
}
