//! The peer's stream credit grows on demand (quinn-proto pre-allocates per credited stream, so a
//! connection starts low): 10,000 concurrent tunnels on one connection between two
//! `MeshEndpoint`s on real loopback sockets, then the credit back at its initial value.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{endpoint, identity};
use meshnode_transport::pki::Ca;
use meshnode_transport::{Alpn, StreamLimit, TransportConfig};

const TD: &str = "mesh.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_credit_grows_to_ten_thousand_tunnels_and_resets_when_idle() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let a = endpoint(identity(&ca, "node-a")?)?;
    let b = endpoint(identity(&ca, "node-b")?)?;
    let b_addr = b.local_addr()?;
    let accept = async {
        let handshake = b.accept().await.context("endpoint closed")?;
        anyhow::Ok(b.accept_connection(handshake).await?)
    };
    let (conn, inbound) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(a.connect("node-b", b_addr, Alpn::Meshnode), accept)
    })
    .await?;
    let (conn, inbound) = (conn?, inbound?);
    let limit = StreamLimit::new(&inbound.conn, b.transport());
    assert_eq!(limit.limit(), TransportConfig::default().initial_streams());

    const TUNNELS: usize = 10_000;
    let server_conn = inbound.conn.clone();
    let server_limit = limit.clone();
    let accepted = tokio::spawn(async move {
        let mut held = HashMap::new();
        while held.len() < TUNNELS {
            let (send, recv) = server_conn.accept_bi().await?;
            let permit = server_limit.on_accept();
            held.insert(recv.id(), (send, recv, permit));
        }
        anyhow::Ok(held)
    });
    let t0 = Instant::now();
    let mut opened = Vec::with_capacity(TUNNELS);
    for _ in 0..TUNNELS {
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(5), conn.open_bi())
            .await
            .context("open_bi waited 5 s for stream credit")??;
        // A stream is invisible to the peer until written to.
        send.write_all(b"h").await?;
        opened.push((send, recv));
    }
    let held = tokio::time::timeout(Duration::from_secs(30), accepted).await???;
    println!(
        "{TUNNELS} concurrent streams open in {:?}; credit {} (started at {})",
        t0.elapsed(),
        limit.limit(),
        TransportConfig::default().initial_streams()
    );
    assert_eq!(limit.open() as usize, TUNNELS);
    assert!(
        limit.limit() as usize >= TUNNELS,
        "credit {}",
        limit.limit()
    );
    assert!(limit.limit() <= TransportConfig::default().max_concurrent_streams);
    drop(held);
    drop(opened);
    assert_eq!(limit.open(), 0);
    assert_eq!(limit.limit(), TransportConfig::default().initial_streams());
    // The connection still carries new streams after the reset.
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(b"again").await?;
    let (_s, mut r) =
        tokio::time::timeout(Duration::from_secs(5), inbound.conn.accept_bi()).await??;
    let mut buf = [0u8; 5];
    r.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"again");
    Ok(())
}
