//! Last-resort endpoints (docs/behaviour.md): node-b's records vanish from node-a's registry
//! while node-b serves and node-a is connected to it. Real QUIC on loopback, real nodes in
//! process. node-a's registry is one in-memory mesh in which a separate registrar handle writes
//! node-b's records (copied from node-b's own registration), so the test can delete them while
//! node-b keeps running: what a registrar's trouble (an expired lease) looks like to node-a.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::cluster::Traffic;
use common::*;
use meshnode::Node;
use meshnode_registry::memory::MemoryMesh;
use meshnode_registry::{Registration, Registry};

const LIMIT: Duration = Duration::from_secs(60);

/// node-b serving `echo` (tag B) on its own mesh, node-a on another with node-b's records
/// written by `registrar`, traffic flowing from node-a to node-b.
struct Setup {
    a: Node,
    b: Node,
    registrar: Registry,
    traffic: Traffic,
    _meshes: (MemoryMesh, MemoryMesh),
    _pki: Pki,
}

async fn setup(lease_ttl: &str) -> Result<Setup> {
    let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
    let (mesh_a, mesh_b) = (memory_mesh(), memory_mesh());
    let tb = tagged_server("B").await?;
    let svc = format!("[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{tb}\"\n");
    let b = start_node(&pki, "node-b", &svc, mesh_b.connect()).await?;
    let own = mesh_b.view();
    let reg = Registration {
        node: own.nodes.get("node-b").context("node-b record")?.clone(),
        services: own
            .services
            .get("echo")
            .and_then(|m| m.get("node-b"))
            .cloned()
            .into_iter()
            .collect(),
    };
    let registrar = mesh_a.connect();
    registrar.register(reg).await?;
    let extra = format!(
        "[registry]\nlease_ttl = \"{lease_ttl}\"\n\
         [[outbound]]\nservice = \"echo\"\nlisten = \"127.0.0.1:0\"\n"
    );
    let a = start_node(&pki, "node-a", &extra, mesh_a.connect()).await?;
    wait_endpoints(&a, "echo", 1).await?;
    let traffic = Traffic::start(
        a.outbound_addr("echo").context("outbound")?,
        Duration::from_millis(10),
    );
    eventually("traffic served by node-b", Duration::from_secs(10), || {
        traffic.tagged(b'B') >= 20
    })
    .await?;
    Ok(Setup {
        a,
        b,
        registrar,
        traffic,
        _meshes: (mesh_a, mesh_b),
        _pki: pki,
    })
}

/// node-a's endpoints of `echo` as (node, state).
fn echo_endpoints(a: &Node) -> Vec<(String, String)> {
    a.status()
        .services
        .iter()
        .filter(|s| s.name == "echo")
        .flat_map(|s| {
            s.endpoints
                .iter()
                .map(|e| (e.node.clone(), e.state.clone()))
        })
        .collect()
}

fn peer_connected(a: &Node, peer: &str) -> bool {
    a.status().peers.iter().any(|p| p.name == peer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_gone_while_connected_serves_for_the_grace_then_stops() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        // Grace: 2 × 2 s.
        let grace = Duration::from_secs(4);
        let s = setup("2s").await?;
        assert_eq!(
            s.traffic.failed.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        s.registrar.shutdown(Duration::from_secs(2)).await?;
        let removed = Instant::now();
        eventually("node-b a last resort", Duration::from_secs(2), || {
            echo_endpoints(&s.a) == [("node-b".to_string(), "last_resort".to_string())]
        })
        .await?;
        // Most of the grace: every connection still succeeds, served by node-b, whose
        // connection stays open.
        let watch_until = removed + grace - Duration::from_millis(500);
        while Instant::now() < watch_until {
            assert!(peer_connected(&s.a, "node-b"), "connection kept in grace");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let served_in_grace = s
            .traffic
            .served
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(t, at)| *t == b'B' && *at > removed && *at < watch_until)
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(
            s.traffic.failed_since(removed),
            0,
            "no failed connection during the grace"
        );
        assert!(
            served_in_grace > 100,
            "node-b served during the grace: {served_in_grace}"
        );
        // The grace ends: node-b is no endpoint any more, and its connection is forgotten.
        eventually("node-b dropped", Duration::from_secs(3), || {
            echo_endpoints(&s.a).is_empty()
        })
        .await?;
        let dropped = Instant::now();
        let held = dropped - removed;
        assert!(
            held >= grace - Duration::from_millis(50),
            "held only {held:?}"
        );
        assert!(held < grace + Duration::from_secs(2), "held {held:?}");
        eprintln!(
            "last resort: held {held:?} (grace {grace:?}), {served_in_grace} connections served \
             by node-b and 0 failed in the grace"
        );
        eventually("node-b's connection closed", Duration::from_secs(3), || {
            !peer_connected(&s.a, "node-b")
        })
        .await?;
        // New connections are no longer sent to node-b.
        let after = dropped + Duration::from_millis(200);
        eventually(
            "connections failing without endpoint",
            Duration::from_secs(5),
            || s.traffic.failed_since(after) >= 10,
        )
        .await?;
        assert_eq!(s.traffic.first_served_since(b'B', after), None);
        s.traffic.stop().await;
        s.a.drain().await;
        s.b.drain().await;
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_last_resort_is_dropped_at_once() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        // Grace: 2 × 8 s; draining must end it long before.
        let s = setup("8s").await?;
        s.registrar.shutdown(Duration::from_secs(2)).await?;
        eventually("node-b a last resort", Duration::from_secs(2), || {
            echo_endpoints(&s.a) == [("node-b".to_string(), "last_resort".to_string())]
        })
        .await?;
        s.traffic.stop().await;
        let t0 = Instant::now();
        let drain = tokio::spawn(s.b.drain());
        eventually("node-b dropped", Duration::from_secs(4), || {
            echo_endpoints(&s.a).is_empty()
        })
        .await?;
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(4), "dropped after {took:?}");
        eprintln!("draining last resort dropped {took:?} after the drain began (grace 16s)");
        drain.await?;
        s.a.drain().await;
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_last_resort_is_dropped_at_once() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let s = setup("8s").await?;
        s.registrar.shutdown(Duration::from_secs(2)).await?;
        eventually("node-b a last resort", Duration::from_secs(2), || {
            echo_endpoints(&s.a) == [("node-b".to_string(), "last_resort".to_string())]
        })
        .await?;
        let t0 = Instant::now();
        s.b.kill();
        eventually("node-b dropped", Duration::from_secs(4), || {
            echo_endpoints(&s.a).is_empty()
        })
        .await?;
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(4), "dropped after {took:?}");
        eprintln!("killed last resort dropped {took:?} after the kill (grace 16s)");
        s.traffic.stop().await;
        s.a.drain().await;
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_resort_is_not_used_while_the_view_has_an_endpoint() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let s = setup("4s").await?;
        let tc = tagged_server("C").await?;
        let svc = format!("[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{tc}\"\n");
        let c = start_node(&s._pki, "node-c", &svc, s._meshes.0.connect()).await?;
        wait_endpoints(&s.a, "echo", 2).await?;
        s.registrar.shutdown(Duration::from_secs(2)).await?;
        let removed = Instant::now();
        eventually("node-c the only endpoint", Duration::from_secs(2), || {
            echo_endpoints(&s.a) == [("node-c".to_string(), "healthy".to_string())]
        })
        .await?;
        let settled = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(s.traffic.failed_since(removed), 0);
        assert_eq!(
            s.traffic
                .first_served_since(b'B', settled + Duration::from_millis(100)),
            None,
            "node-b is only a last resort while node-c is in the view"
        );
        assert!(s.traffic.first_served_since(b'C', settled).is_some());
        // Still held: its connection stays up during the grace.
        assert!(peer_connected(&s.a, "node-b"));
        s.traffic.stop().await;
        s.a.drain().await;
        s.b.drain().await;
        c.drain().await;
        Ok(())
    })
    .await?
}
