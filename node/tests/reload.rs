//! SIGHUP reload with real processes: services, allow lists and outbounds change without
//! dropping established tunnels; an invalid config is rejected and the old one kept.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::cluster::*;
use common::process::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_services_and_keeps_tunnels() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), async {
        let cluster = Cluster::new(&["node-a", "node-b"]).await?;
        let echo = echo_server().await?;
        let out = free_tcp()?;
        let a = cluster.node("node-a", &outbound(out)).await?;
        let b = cluster
            .node(
                "node-b",
                &format!("{}allow = [\"node-a\"]\n", echo_service(echo)),
            )
            .await?;
        until("node-a to see echo", Duration::from_secs(10), async || {
            Ok(endpoints(&a).await? == ["node-b"])
        })
        .await?;

        // A tunnel established before the reload.
        let mut live = TcpStream::connect(out).await?;
        live.write_all(b"one").await?;
        let mut buf = [0u8; 3];
        live.read_exact(&mut buf).await?;

        // An invalid config is rejected; the node keeps serving.
        let good = std::fs::read_to_string(&b.config)?;
        std::fs::write(&b.config, format!("{good}\nbogus_key = 1\n"))?;
        b.signal(libc::SIGHUP)?;
        until(
            "the rejection to be logged",
            Duration::from_secs(10),
            async || Ok(b.log_text().contains("reload rejected")),
        )
        .await?;
        assert!(b.child.id() > 0 && b.get("/healthz").await?.0 == 200);

        // A valid change: echo now allows only node-x, and a second service appears.
        let changed = good.replace("allow = [\"node-a\"]", "allow = [\"node-x\"]")
            + &format!("[[service]]\nname = \"extra\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n");
        std::fs::write(&b.config, changed)?;
        b.signal(libc::SIGHUP)?;
        until(
            "the reload to be logged",
            Duration::from_secs(10),
            async || Ok(b.log_text().contains("reloaded:")),
        )
        .await?;
        until(
            "node-a to see the new service",
            Duration::from_secs(10),
            async || {
                let (_, body) = a.get("/status").await?;
                Ok(body.contains("\"extra\""))
            },
        )
        .await?;

        // The old tunnel still works.
        live.write_all(b"two").await?;
        live.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"two");

        // New tunnels to echo are now refused by node-b's allow list (403): the client is reset.
        // The refusal can be quick enough that the reset beats the end of `connect` itself.
        let r = match TcpStream::connect(out).await {
            Err(e) => Err(e),
            Ok(mut s) => {
                let _ = s.write_all(b"x").await;
                let mut one = [0u8; 1];
                tokio::time::timeout(Duration::from_secs(10), s.read(&mut one))
                    .await
                    .context("read")?
            }
        };
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "expected a reset after the allow list changed, got {r:?}"
        );
        let (_, metrics) = b.get("/metrics").await?;
        assert!(
            metrics.contains("meshnode_inbound_rejected_total{reason=\"forbidden\"}"),
            "{metrics}"
        );
        Ok(())
    })
    .await?
}
