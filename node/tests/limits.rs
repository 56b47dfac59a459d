//! Connection caps at the front-ends (docs/behaviour.md, Limits), with real processes on a real
//! etcd: a flood of idle connections on one `[[outbound]]` port is held to that port's cap
//! while a steady client on another port never fails and the admin API keeps answering; past
//! the node-wide cap new connections are refused at once and counted; held slots come back
//! when connections close.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::cluster::*;
use common::process::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);

/// A metric's value from the node's /metrics (0 when absent).
async fn metric(node: &NodeProcess, series: &str) -> Result<f64> {
    let (_, body) = node.get("/metrics").await?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Opens `n` connections to `addr` that send one byte of a ping and then wait; returns the
/// ones the node kept and how many it refused (reset or closed within a second).
async fn hold(addr: SocketAddr, n: usize) -> Result<(Vec<TcpStream>, usize)> {
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        // On loopback the reset can arrive before connect returns: a refusal too.
        let Ok(mut s) = TcpStream::connect(addr).await else {
            refused += 1;
            continue;
        };
        let mut b = [0u8; 1];
        // A refused connection is reset at accept: the read fails or ends at once. A held one
        // reads the serving node's tag byte, or nothing yet.
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => refused += 1,
            Ok(Ok(_)) | Err(_) => held.push(s),
        }
    }
    Ok((held, refused))
}

/// One full ping through `addr`.
async fn ping(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await??;
    anyhow::ensure!(&b[1..] == b"ping", "echo answered {b:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_port_is_held_to_its_cap_and_the_node_to_its_own() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let cluster = Cluster::new(&["node-a", "node-b"]).await?;
        let echo = tagged_server("B").await?;
        let _b = cluster.node("node-b", &echo_service(echo)).await?;
        let (flood, steady) = (free_tcp()?, free_tcp()?);
        let body = format!(
            "[[outbound]]\nservice = \"echo\"\nlisten = \"{flood}\"\nmax_connections = 40\n\
             [[outbound]]\nservice = \"echo\"\nlisten = \"{steady}\"\n"
        );
        let a = cluster
            .node_at("node-a", &body, free_udp()?, "max_connections = 60")
            .await?;
        until(
            "node-a to see node-b",
            Duration::from_secs(10),
            async || Ok(endpoints(&a).await? == ["node-b"]),
        )
        .await?;
        ping(steady).await?;

        // 60 connections on the flood port: 40 held, 20 refused by the port's cap.
        let started = Instant::now();
        let (held, refused) = hold(flood, 60).await?;
        eprintln!(
            "flood port: {} held, {refused} refused in {:?}",
            held.len(),
            started.elapsed()
        );
        assert_eq!(held.len(), 40, "the port's cap");
        assert_eq!(refused, 20);
        let flood_label = format!(
            "meshnode_connections_refused_total{{listener=\"{flood}\",reason=\"listener_limit\"}}"
        );
        assert_eq!(metric(&a, &flood_label).await?, 20.0);

        // The steady port still has the node's other 20 slots: every ping succeeds, and the
        // admin API answers.
        for _ in 0..30 {
            ping(steady).await?;
        }
        assert_eq!(a.get("/healthz").await?.0, 200);
        // Each ping's tunnel ends when node-b's side has closed too: a moment after the client.
        until(
            "the pings' slots to come back",
            Duration::from_secs(10),
            async || Ok(metric(&a, "meshnode_app_connections").await? == 40.0),
        )
        .await?;

        // 30 more on the steady port: the node's cap (60) holds 20 of them.
        let (steady_held, steady_refused) = hold(steady, 30).await?;
        assert_eq!(
            (steady_held.len(), steady_refused),
            (20, 10),
            "the node's cap"
        );
        let node_label = format!(
            "meshnode_connections_refused_total{{listener=\"{steady}\",reason=\"node_limit\"}}"
        );
        assert_eq!(metric(&a, &node_label).await?, 10.0);
        assert_eq!(a.get("/healthz").await?.0, 200);

        // Closing the flood frees its slots.
        drop(held);
        until("slots to come back", Duration::from_secs(10), async || {
            Ok(metric(&a, "meshnode_app_connections").await? == 20.0)
        })
        .await?;
        for _ in 0..10 {
            ping(steady).await?;
        }
        drop(steady_held);
        Ok(())
    })
    .await?
}

/// A client that leaves while its tunnel is still being opened (the endpoint's node is frozen,
/// so the open waits for its deadline) is let go at once: its slot and socket are not held
/// through the open and its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_a_pending_open_is_let_go_at_once() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let cluster = Cluster::new(&["node-a", "node-b"]).await?;
        let echo = tagged_server("B").await?;
        let b = cluster.node("node-b", &echo_service(echo)).await?;
        let port = free_tcp()?;
        let a = cluster
            .node(
                "node-a",
                &format!("[[outbound]]\nservice = \"echo\"\nlisten = \"{port}\"\n"),
            )
            .await?;
        until(
            "node-a to see node-b",
            Duration::from_secs(10),
            async || Ok(endpoints(&a).await? == ["node-b"]),
        )
        .await?;
        ping(port).await?;
        // The ping's tunnel closes once node-b has closed its side: before node-b is frozen,
        // or it would hold its slot until the peer connection times out.
        until(
            "the ping's slot to come back",
            Duration::from_secs(10),
            async || Ok(metric(&a, "meshnode_app_connections").await? == 0.0),
        )
        .await?;
        b.signal(libc::SIGSTOP)?;
        // 20 clients connect and leave at once; each tunnel open would wait 500 ms or more.
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(TcpStream::connect(port).await?);
        }
        until("all 20 to be held", Duration::from_secs(5), async || {
            Ok(metric(&a, "meshnode_app_connections").await? == 20.0)
        })
        .await?;
        let left = Instant::now();
        drop(clients);
        until(
            "the node to let them go",
            Duration::from_secs(5),
            async || Ok(metric(&a, "meshnode_app_connections").await? == 0.0),
        )
        .await?;
        let took = left.elapsed();
        b.signal(libc::SIGCONT)?;
        eprintln!("20 clients left during their opens: slots back in {took:?}");
        assert!(
            took < Duration::from_millis(400),
            "held through the open: {took:?}\n{}",
            a.log_text()
        );
        Ok(())
    })
    .await?
}
