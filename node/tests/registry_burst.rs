//! A registry burst must never stall the data plane: three real `meshnode` processes on a real
//! etcd, 200 node and 1,000 service records beside them under the mesh prefix (and the same
//! under another prefix), then 1,000 service-record updates — a rolling deploy of a large mesh —
//! written once under another prefix (the control: the same etcd load, nothing for the nodes to
//! apply) and once under the mesh prefix, while node-a opens a new application connection every
//! 5 ms. Before session 4 such a burst took new connections from p99 4-19 ms to 1.3-2.2 s.
//!
//! What is asserted, over five rounds of both bursts (the order alternating so that neither
//! always runs on a warmer machine): no burst's p99 is a stall (`STALL`), and in a majority of
//! rounds (3 of 5) the p99 of the connections made during the mesh burst is at most 2 × the
//! p99 during the round's control burst, or the control's + 2 ms when that is more (`FLOOR`).
//! A majority, not every round: the machine is shared with other builds, and a round whose
//! bursts meet a load spike from outside the test (its mesh burst then takes 2-4 × as long to
//! write) says nothing about the node. Measured (debug builds, bench/RESULTS.md "Session 5"):
//! the bound held in 57 of 60 rounds (12 runs, all passing) with this branch's registry, and
//! in 1 of 20 (4 runs, all failing) with the one before it.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::cluster::*;
use common::process::*;
use common::*;
use etcd_client::{Client, Txn, TxnOp};
use meshnode_registry::{node_key, service_key, NodeRecord, Protocol, ServiceRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NODES: usize = 200;
const SERVICES_PER_NODE: usize = 5;
const UPDATES: usize = 1_000;
const WRITERS: usize = 8;
/// The mesh's prefix (the harness's) and the control's.
const MESH: &str = "/test";
const CONTROL: &str = "/control";
/// A p99 above this during the burst is a stalled data plane (issue 14 measured 1.3-2.2 s).
const STALL: Duration = Duration::from_millis(500);
/// Rounds of (control, mesh) bursts; the bound must hold in a majority of them.
const ROUNDS: u32 = 5;
/// Between two new connections of the probe (one at a time: a slow one delays the next).
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// The least p99 increase the mesh burst may cause over the control's: the three nodes apply
/// 3,000 updates on the same 2 cores as the probe, etcd and the echo servers, so a
/// sub-millisecond control (an idle machine) leaves no room for 2 × to hold; a burst that
/// stalls the data plane costs tens of milliseconds and more (10-17 ms p99 before views were
/// persistent maps, 1.3-2.2 s before session 4).
const FLOOR: Duration = Duration::from_millis(2);

fn service(i: usize, s: usize, weight: u32) -> ServiceRecord {
    ServiceRecord {
        service: format!("filler-{s}"),
        node: format!("filler-{i:03}"),
        protocol: Protocol::Tcp,
        port: 8000 + s as u16,
        weight,
        zone: String::new(),
    }
}

async fn seed(client: &mut Client, prefix: &str) -> Result<()> {
    let mut ops = Vec::new();
    for i in 0..NODES {
        let rec = NodeRecord {
            name: format!("filler-{i:03}"),
            // Never dialled: no service of these nodes is used.
            addr: format!("127.0.0.1:{}", 10_000 + i),
            zone: String::new(),
            version: "test".into(),
            started_at: 0,
        };
        ops.push(TxnOp::put(
            node_key(prefix, &rec.name),
            serde_json::to_vec(&rec)?,
            None,
        ));
        for s in 0..SERVICES_PER_NODE {
            let rec = service(i, s, 100);
            ops.push(TxnOp::put(
                service_key(prefix, &rec.service, &rec.node),
                serde_json::to_vec(&rec)?,
                None,
            ));
        }
    }
    for chunk in ops.chunks(100) {
        client.txn(Txn::new().and_then(chunk.to_vec())).await?;
    }
    Ok(())
}

/// Writes the burst: every service record once more with `weight`.
async fn burst(client: &Client, prefix: &'static str, weight: u32) -> Result<Duration> {
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = client.clone();
        writers.push(tokio::spawn(async move {
            for k in (w..UPDATES).step_by(WRITERS) {
                let rec = service(k / SERVICES_PER_NODE, k % SERVICES_PER_NODE, weight);
                let key = service_key(prefix, &rec.service, &rec.node);
                client.put(key, serde_json::to_vec(&rec)?, None).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for w in writers {
        w.await??;
    }
    Ok(started.elapsed())
}

/// New connections through `out` every `PROBE_EVERY` until `stop`; each one's time to its echo.
fn probe(
    out: SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<Duration>>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut times = Vec::new();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = tick.tick() => {}
            }
            let start = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let mut s = tokio::net::TcpStream::connect(out).await?;
                s.write_all(b"ping").await?;
                let mut b = [0u8; 5];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(())
            })
            .await;
            // A failure counts as the worst time there is.
            times.push(match r {
                Ok(Ok(())) => start.elapsed(),
                _ => Duration::from_secs(5),
            });
        }
        times
    });
    (stop, task)
}

/// The `q` quantile of `v` (nearest rank below).
fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(((v.len().saturating_sub(1)) as f64 * q) as usize)
        .copied()
        .unwrap_or_default()
}

/// The times of the new connections made while `prefix`'s burst is written, and how long the
/// burst took to write.
async fn during_burst(
    client: &Client,
    out: SocketAddr,
    prefix: &'static str,
    weight: u32,
) -> Result<(Vec<Duration>, Duration)> {
    let (stop, task) = probe(out);
    tokio::time::sleep(Duration::from_millis(100)).await; // probes already running when it starts
    let written = burst(client, prefix, weight).await?;
    let _ = stop.send(());
    Ok((task.await?, written))
}

fn summary(times: &[Duration]) -> String {
    format!(
        "p50 {:?} p99 {:?} max {:?} ({} connections)",
        quantile(times, 0.5),
        quantile(times, 0.99),
        quantile(times, 1.0),
        times.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_burst_does_not_stall_new_connections() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(180), async {
        let cluster = Cluster::new(&["node-a", "node-b", "node-c"]).await?;
        let mut client = cluster.etcd.client().await?;
        seed(&mut client, MESH).await?;
        seed(&mut client, CONTROL).await?;
        let out = free_tcp()?;
        let echo_b = tagged_server("B").await?;
        let echo_c = tagged_server("C").await?;
        let a = cluster.node("node-a", &outbound(out)).await?;
        let _b = cluster.node("node-b", &echo_service(echo_b)).await?;
        let _c = cluster.node("node-c", &echo_service(echo_c)).await?;
        until(
            "node-a to see both endpoints",
            Duration::from_secs(20),
            async || Ok(endpoints(&a).await? == ["node-b", "node-c"]),
        )
        .await?;
        // Warm: connections to both peers, balancer estimates.
        let (stop, task) = probe(out);
        tokio::time::sleep(Duration::from_secs(1)).await; // warm-up traffic
        let _ = stop.send(());
        task.await?;

        let (mut control, mut mesh) = (Vec::new(), Vec::new());
        let mut held = 0;
        for round in 0..ROUNDS {
            // Every write of a round changes a record: each round writes a new weight.
            let weight = 200 + round;
            let mut order = [CONTROL, MESH];
            if round % 2 == 1 {
                order.reverse();
            }
            let mut p99 = [Duration::ZERO; 2];
            for prefix in order {
                let (times, written) = during_burst(&client, out, prefix, weight).await?;
                let what = if prefix == MESH { "mesh" } else { "control" };
                eprintln!(
                    "round {round} {what:7}: {}, burst written in {written:?}",
                    summary(&times)
                );
                assert!(
                    quantile(&times, 0.99) < STALL,
                    "new-connection p99 during the {what} burst of round {round}: {}: the data \
                     plane stalled",
                    summary(&times)
                );
                p99[usize::from(prefix == MESH)] = quantile(&times, 0.99);
                if prefix == MESH {
                    &mut mesh
                } else {
                    &mut control
                }
                .extend(times);
            }
            let [c, m] = p99;
            let allowed = (c * 2).max(c + FLOOR);
            held += u32::from(m <= allowed);
            eprintln!(
                "round {round}: mesh / control p99 {:.2}x; {}",
                m.as_secs_f64() / c.as_secs_f64().max(1e-6),
                if m <= allowed {
                    "within the bound"
                } else {
                    "above the bound"
                }
            );
        }
        let updates = {
            let (_, body) = a.get("/metrics").await?;
            body.lines()
                .find(|l| l.starts_with("meshnode_registry_updates_total "))
                .map(str::to_string)
                .unwrap_or_default()
        };
        eprintln!("node-a: {updates}");
        eprintln!(
            "all rounds: control {}; mesh {}; the bound held in {held} of {ROUNDS} rounds",
            summary(&control),
            summary(&mesh)
        );
        assert!(
            held > ROUNDS / 2,
            "new-connection p99 during the mesh burst above 2 × the control's (at least {FLOOR:?} \
             above it) in {} of {ROUNDS} rounds: registry work slows the data plane",
            ROUNDS - held
        );
        Ok(())
    })
    .await?
}
