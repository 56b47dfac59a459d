//! `[transport] max_peer_connections` with real QUIC connections on loopback: past the cap a
//! new peer connection is refused and counted (`at_capacity`), and a slot freed by a closing
//! connection is given to the next caller.

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{endpoint, endpoint_with, identity};
use meshnode_transport::admission::HandshakeResult;
use meshnode_transport::pki::Ca;
use meshnode_transport::{Alpn, ConnectError, MeshEndpoint, TransportConfig};

const CAP: u32 = 5;

/// Accepts connections and holds each until it closes, as a node's inbound side does.
fn serve(b: MeshEndpoint) {
    tokio::spawn(async move {
        while let Some(handshake) = b.accept().await {
            let b = b.clone();
            tokio::spawn(async move {
                if let Ok(inbound) = b.accept_connection(handshake).await {
                    while inbound.conn.accept_bi().await.is_ok() {}
                }
            });
        }
    });
}

async fn wait_until(what: &str, within: Duration, cond: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() > deadline {
            bail!("waited {within:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_peer_connections_a_handshake_is_refused_and_counted() -> Result<()> {
    let ca = Ca::generate("mesh.test", 30)?;
    let transport = TransportConfig {
        max_peer_connections: CAP,
        ..TransportConfig::default()
    };
    let b = endpoint_with(identity(&ca, "node-b")?, transport)?;
    serve(b.clone());
    let addr = b.local_addr()?;
    let c = endpoint(identity(&ca, "node-c")?)?;
    // A refused dial ends in milliseconds; the timeout only bounds a broken test.
    let dial = || c.connect_within("node-b", addr, Alpn::Meshnode, Duration::from_secs(5));

    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(dial().await?);
    }
    wait_until("the connections to be held", Duration::from_secs(5), || {
        b.inbound_connections() == CAP
    })
    .await?;

    let expect_refusal = |got: Result<_, ConnectError>| match got {
        Err(ConnectError::Handshake { reason, .. }) => {
            assert!(reason.contains("refused"), "{reason}")
        }
        other => panic!("a connection past the cap got {other:?}, expected a refusal"),
    };
    // c holds address-validation tokens from its earlier connections (QUIC NEW_TOKEN): it is
    // refused at once. A new caller d has none: it is sent a Retry first and refused once it
    // comes back with its address proven.
    expect_refusal(dial().await);
    let stats = b.handshake_stats();
    assert_eq!(stats.get(HandshakeResult::AtCapacity), 1);
    let d = endpoint(identity(&ca, "node-d")?)?;
    let retries = stats.get(HandshakeResult::Retry);
    expect_refusal(
        d.connect_within("node-b", addr, Alpn::Meshnode, Duration::from_secs(5))
            .await,
    );
    assert_eq!(stats.get(HandshakeResult::AtCapacity), 2);
    assert_eq!(stats.get(HandshakeResult::Retry), retries + 1);
    assert_eq!(stats.get(HandshakeResult::Accepted), u64::from(CAP));
    assert_eq!(b.inbound_connections(), CAP);

    // One leaves: its slot is free once its close reaches the node, and a new caller gets it.
    held.remove(0).close(0u32.into(), b"bye");
    wait_until(
        "the closed connection's slot",
        Duration::from_secs(5),
        || b.inbound_connections() == CAP - 1,
    )
    .await?;
    held.push(dial().await?);
    wait_until(
        "the new connection to be held",
        Duration::from_secs(5),
        || b.inbound_connections() == CAP,
    )
    .await?;
    assert_eq!(stats.get(HandshakeResult::Accepted), u64::from(CAP) + 1);
    assert!(held.iter().all(|c| c.close_reason().is_none()));
    println!("handshakes: {:?}", stats.snapshot());

    for conn in &held {
        conn.close(0u32.into(), b"done");
    }
    c.close(0, b"done");
    d.close(0, b"done");
    b.close(0, b"done");
    Ok(())
}
