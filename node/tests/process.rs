//! Multi-process tests with the real `meshnode` binary: PKI made by its own commands, a
//! static two-node mesh, bulk and concurrent transfers checked by SHA-256.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::process::*;
use common::*;
use rand::RngCore;
use sha2::{Digest, Sha256};

struct Mesh {
    _dir: tempfile::TempDir,
    a: NodeProcess,
    b: NodeProcess,
    outbound: std::net::SocketAddr,
}

async fn start_mesh(echo: std::net::SocketAddr) -> Result<Mesh> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || pki(&path, &["node-a", "node-b"])).await??;
    let (qa, qb) = (free_udp()?, free_udp()?);
    let (aa, ab, out) = (free_tcp()?, free_tcp()?, free_tcp()?);
    let b_cfg = node_config(
        dir.path(),
        "node-b",
        qb,
        ab,
        &format!(
            "[registry]\nbackend = \"static\"\n[[registry.peers]]\nname = \"node-a\"\naddr = \"{qa}\"\n\
             [[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n"
        ),
    );
    let a_cfg = node_config(
        dir.path(),
        "node-a",
        qa,
        aa,
        &format!(
            "[registry]\nbackend = \"static\"\n[[registry.peers]]\nname = \"node-b\"\naddr = \"{qb}\"\n\
             services = [{{ name = \"echo\", protocol = \"tcp\", port = {port} }}]\n\
             [[outbound]]\nservice = \"echo\"\nlisten = \"{out}\"\n",
            port = echo.port()
        ),
    );
    std::fs::write(dir.path().join("a.toml"), a_cfg)?;
    std::fs::write(dir.path().join("b.toml"), b_cfg)?;
    for f in ["a.toml", "b.toml"] {
        let (code, outp, err) = meshnode_async(&[
            "validate",
            "-c",
            dir.path().join(f).to_str().context("utf8")?,
        ])
        .await?;
        assert_eq!(code, 0, "validate {f}: {outp}{err}");
    }
    let mut b = NodeProcess::start(&dir.path().join("b.toml"), ab, &dir.path().join("b.log"))?;
    let mut a = NodeProcess::start(&dir.path().join("a.toml"), aa, &dir.path().join("a.log"))?;
    b.wait_ready(Duration::from_secs(20)).await?;
    a.wait_ready(Duration::from_secs(20)).await?;
    Ok(Mesh {
        _dir: dir,
        a,
        b,
        outbound: out,
    })
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_processes_carry_64_mib_and_100_concurrent_connections() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(240), async {
        let echo = echo_server().await?;
        let mut mesh = start_mesh(echo).await?;

        let result = transfers(&mut mesh).await;
        if result.is_err() {
            eprintln!(
                "--- node-a log ---\n{}\n--- node-b log ---\n{}",
                mesh.a.log_text(),
                mesh.b.log_text()
            );
        }
        result
    })
    .await?
}

async fn transfers(mesh: &mut Mesh) -> Result<()> {
    {
        let data = random(64 << 20);
        let back = roundtrip(mesh.outbound, &data)
            .await
            .context("64 MiB round trip")?;
        assert_eq!(back.len(), data.len(), "length of the echo");
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&data),
            "SHA-256 of 64 MiB"
        );

        let mut tasks = Vec::new();
        for _ in 0..100 {
            let addr = mesh.outbound;
            tasks.push(tokio::spawn(async move {
                let data = random(1 << 20);
                let back = roundtrip(addr, &data).await.context("1 MiB round trip")?;
                anyhow::ensure!(
                    Sha256::digest(&back) == Sha256::digest(&data),
                    "1 MiB echo differs"
                );
                Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }

        let (code, metrics) = mesh.a.get("/metrics").await?;
        assert_eq!(code, 200);
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(
                    "meshnode_tunnels_opened_total{service=\"echo\",peer=\"node-b\",result=\"ok\"}",
                )
            })
            .context("tunnel counter missing")?;
        assert!(line.ends_with(" 101"), "{line}");

        // SIGTERM drains and exits 0.
        mesh.a.signal(libc::SIGTERM)?;
        mesh.b.signal(libc::SIGTERM)?;
        assert_eq!(mesh.a.wait_exit(Duration::from_secs(15)).await?, Some(0));
        assert_eq!(mesh.b.wait_exit(Duration::from_secs(15)).await?, Some(0));
        Ok(())
    }
}
