//! In-process multi-node tests: real QUIC sockets on loopback, real certificates, an
//! in-memory registry.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);

fn service(name: &str, target: std::net::SocketAddr, extra: &str) -> String {
    format!("[[service]]\nname = \"{name}\"\nprotocol = \"tcp\"\ntarget = \"{target}\"\n{extra}\n")
}

fn outbound(name: &str) -> String {
    format!("[[outbound]]\nservice = \"{name}\"\nlisten = \"127.0.0.1:0\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_carry_a_tunnel_both_ways() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let mesh = memory_mesh();
        let echo = echo_server().await?;
        let b = start_node(&pki, "node-b", &service("echo", echo, ""), mesh.connect()).await?;
        let a = start_node(&pki, "node-a", &outbound("echo"), mesh.connect()).await?;
        wait_endpoints(&a, "echo", 1).await?;
        let addr = a.outbound_addr("echo").expect("outbound bound");
        let mut data = vec![0u8; 1 << 20];
        rand::thread_rng().fill_bytes(&mut data);
        let back = roundtrip(addr, &data).await?;
        assert!(back == data, "echoed bytes differ");
        let opened = a
            .metrics()
            .get("meshnode_tunnels_opened_total", &["echo", "node-b", "ok"]);
        assert_eq!(opened, 1.0);
        a.drain().await;
        b.drain().await;
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_spread_connections_over_both_endpoints() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b", "node-c"])?;
        let mesh = memory_mesh();
        let tb = tagged_server("B").await?;
        let tc = tagged_server("C").await?;
        let _b = start_node(&pki, "node-b", &service("svc", tb, ""), mesh.connect()).await?;
        let _c = start_node(&pki, "node-c", &service("svc", tc, ""), mesh.connect()).await?;
        let a = start_node(&pki, "node-a", &outbound("svc"), mesh.connect()).await?;
        wait_endpoints(&a, "svc", 2).await?;
        let addr = a.outbound_addr("svc").expect("outbound");
        let (mut nb, mut nc) = (0, 0);
        for _ in 0..60 {
            let mut s = TcpStream::connect(addr).await?;
            let mut tag = [0u8; 1];
            s.read_exact(&mut tag).await?;
            match &tag {
                b"B" => nb += 1,
                b"C" => nc += 1,
                other => panic!("unexpected tag {other:?}"),
            }
        }
        assert!(nb > 0 && nc > 0, "both endpoints must serve: B={nb} C={nc}");
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_delivers_the_rest() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let mesh = memory_mesh();
        // A target that reads everything until EOF, then answers with its length.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    if s.read_to_end(&mut buf).await.is_ok() {
                        let _ = s.write_all(format!("got {}", buf.len()).as_bytes()).await;
                    }
                });
            }
        });
        let _b = start_node(
            &pki,
            "node-b",
            &service("count", target, ""),
            mesh.connect(),
        )
        .await?;
        let a = start_node(&pki, "node-a", &outbound("count"), mesh.connect()).await?;
        wait_endpoints(&a, "count", 1).await?;
        let mut s = TcpStream::connect(a.outbound_addr("count").expect("outbound")).await?;
        s.write_all(&[7u8; 100_000]).await?;
        s.shutdown().await?; // our write side is closed; we still read
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        assert_eq!(answer, "got 100000");
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_reaches_the_client_as_a_reset() -> Result<()> {
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let mesh = memory_mesh();
        // A target that resets every connection after reading a little.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 4];
                let _ = s.read_exact(&mut b).await;
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            }
        });
        let _b = start_node(&pki, "node-b", &service("rst", target, ""), mesh.connect()).await?;
        let a = start_node(&pki, "node-a", &outbound("rst"), mesh.connect()).await?;
        wait_endpoints(&a, "rst", 1).await?;
        let mut s = TcpStream::connect(a.outbound_addr("rst").expect("outbound")).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await?;
        match r {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("expected a reset, read {n} bytes (0 = orderly EOF)"),
        }
        Ok(())
    })
    .await?
}
