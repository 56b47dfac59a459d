//! Connection migration: tunnels survive a NAT rebinding (bench relay switching its source
//! port) and a renumbered host (a network namespace whose address changes mid-transfer).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::cluster::*;
use common::process::*;
use common::*;
use meshnode_bench::relay::Relay;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1 << 20;

/// Sends `total` random bytes through `addr` to an echo service, calling `during(mib)` after
/// each MiB echoed back. Returns (bytes intact?, longest gap between echoed chunks).
async fn transfer<F: FnMut(usize)>(
    addr: SocketAddr,
    total: usize,
    mut during: F,
) -> Result<(bool, Duration)> {
    let mut data = vec![0u8; total];
    rand::thread_rng().fill_bytes(&mut data);
    let want = Sha256::digest(&data);
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut hasher = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut last = Instant::now();
    let mut worst = Duration::ZERO;
    let mut next_mib = MIB;
    loop {
        let n = r.read(&mut buf).await.context("reading the echo")?;
        if n == 0 {
            break;
        }
        worst = worst.max(last.elapsed());
        last = Instant::now();
        hasher.update(&buf[..n]);
        got += n;
        while got >= next_mib {
            during(next_mib / MIB);
            next_mib += MIB;
        }
    }
    writer.await??;
    Ok((got == total && hasher.finalize() == want, worst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_survives_two_nat_rebindings() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let mesh = memory_mesh();
        let echo = echo_server().await?;
        let quic_b = free_udp()?;
        let relay = Relay::start("127.0.0.1:0".parse()?, quic_b)?;
        let b_cfg = format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n"
        );
        let b_text = pki
            .base_config("node-b")
            .replace("listen = \"127.0.0.1:0\"\nstate_dir", &format!("listen = \"{quic_b}\"\nadvertise = \"{}\"\nstate_dir", relay.local_addr()));
        let b = {
            let config = meshnode::config::Config::parse(&format!("{b_text}{b_cfg}"))?;
            meshnode::Node::start(meshnode::NodeParts { config, identity: pki.identity("node-b")?, registry: mesh.connect() })
                .await
                .map_err(|f| anyhow::anyhow!("{f}"))?
        };
        let a = start_node(&pki, "node-a", "[[outbound]]\nservice = \"echo\"\nlisten = \"127.0.0.1:0\"\n", mesh.connect()).await?;
        wait_endpoints(&a, "echo", 1).await?;
        let out = a.outbound_addr("echo").context("outbound")?;
        let r = relay.clone();
        let (intact, stall) = transfer(out, 32 * MIB, move |mib| {
            if mib == 8 || mib == 20 {
                let _ = r.rebind();
            }
        })
        .await?;
        assert!(intact, "the transfer was not intact");
        assert_eq!(relay.stats().rebinds, 2);
        eventually("node-b to count two migrations", Duration::from_secs(5), || {
            b.metrics().get("meshnode_quic_migrations_total", &[]) >= 2.0
        })
        .await?;
        let status = b.status();
        let peer = status.peers.iter().find(|p| p.name == "node-a").context("node-a in node-b's peers")?;
        assert!(peer.migrations >= 2, "{peer:?}");
        eprintln!("NAT rebinding x2 during 32 MiB: intact, longest stall {stall:?}, node-b saw {} migrations", peer.migrations);
        Ok(())
    })
    .await?
}

/// Network namespaces and veth pairs made for one test, removed on drop.
struct Netns {
    ns: String,
    links: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renumbered_host_keeps_its_tunnels_and_re_registers() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), async {
        let id = std::process::id() % 200 + 20; // 10.{id}.x.y, unique per test process
        let ns = format!("mn-mig-{}", std::process::id());
        let (mesh_root, client_root) = (format!("mnm{id}r"), format!("mnc{id}r"));
        let guard = Netns { ns: ns.clone(), links: vec![mesh_root.clone(), client_root.clone()] };
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", &mesh_root, "type", "veth", "peer", "name", "mesh0", "netns", &ns])?;
        ip(&["link", "add", &client_root, "type", "veth", "peer", "name", "client0", "netns", &ns])?;
        let (root_mesh_ip, a_ip1, a_ip2) = (format!("10.{id}.1.1"), format!("10.{id}.1.2"), format!("10.{id}.1.3"));
        let (root_client_ip, a_client_ip) = (format!("10.{id}.2.1"), format!("10.{id}.2.2"));
        ip(&["addr", "add", &format!("{root_mesh_ip}/24"), "dev", &mesh_root])?;
        ip(&["addr", "add", &format!("{root_client_ip}/24"), "dev", &client_root])?;
        ip(&["link", "set", &mesh_root, "up"])?;
        ip(&["link", "set", &client_root, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{a_ip1}/24"), "dev", "mesh0"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{a_client_ip}/24"), "dev", "client0"])?;
        ip(&["-n", &ns, "link", "set", "mesh0", "up"])?;
        ip(&["-n", &ns, "link", "set", "client0", "up"])?;
        // Removing the primary address must promote the new one instead of deleting it.
        ip(&["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.conf.mesh0.promote_secondaries=1"])?;

        // etcd and node-b live in the root namespace; node-a reaches etcd through a forwarder
        // on the veth address.
        let cluster = Cluster::new(&["node-a", "node-b"]).await?;
        let etcd_fwd: SocketAddr = format!("{root_mesh_ip}:0").parse()?;
        let fwd = tokio::net::TcpListener::bind(etcd_fwd).await?;
        let fwd_addr = fwd.local_addr()?;
        let etcd_target = cluster.etcd.endpoint.trim_start_matches("http://").to_string();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = fwd.accept().await {
                let t = etcd_target.clone();
                tokio::spawn(async move {
                    if let Ok(mut u) = TcpStream::connect(t).await {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                });
            }
        });
        let echo = echo_server().await?;
        let quic_b: SocketAddr = format!("0.0.0.0:{}", free_udp()?.port()).parse()?;
        let b = cluster.node_at(
            "node-b",
            &echo_service(echo),
            quic_b,
            &format!("advertise = \"{root_mesh_ip}:{}\"", quic_b.port()),
        )
        .await?;

        // node-a inside the namespace: listens everywhere, advertises "auto".
        let dir = cluster.dir.path();
        let a_admin: SocketAddr = format!("{a_client_ip}:15000").parse()?;
        let a_out: SocketAddr = format!("{a_client_ip}:15001").parse()?;
        let a_cfg = node_config(
            dir,
            "node-a",
            "0.0.0.0:4433".parse()?,
            "0.0.0.0:15000".parse()?,
            &format!(
                "[registry]\nendpoints = [\"http://{fwd_addr}\"]\nprefix = \"/test\"\nlease_ttl = \"{TTL_S}s\"\n\
                 [[outbound]]\nservice = \"echo\"\nlisten = \"0.0.0.0:15001\"\n"
            ),
        )
        .replacen("[tls]", "advertise = \"auto\"\n[tls]", 1);
        let a_path = dir.join("a.toml");
        std::fs::write(&a_path, a_cfg)?;
        let log = std::fs::File::create(dir.join("a.log"))?;
        let mut a_child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(meshnode_bin())
            .args(["run", "-c"])
            .arg(&a_path)
            .env("MESHNODE_LOG", "info")
            .stderr(log)
            .spawn()?;
        let a_log = || std::fs::read_to_string(dir.join("a.log")).unwrap_or_default();
        let result = async {
            until("node-a ready", Duration::from_secs(20), async || Ok(http_get(a_admin, "/readyz").await?.0 == 200))
                .await
                .with_context(a_log)?;
            until("node-a to see node-b", Duration::from_secs(10), async || {
                Ok(http_get(a_admin, "/status").await?.1.contains("\"node-b\""))
            })
            .await?;
            let etcd = &cluster.etcd;
            let mut client = etcd.client().await?;
            let rec = |kvs: &[etcd_client::KeyValue]| kvs.first().and_then(|k| k.value_str().ok().map(String::from)).unwrap_or_default();
            let before = rec(client.get("/test/nodes/node-a", None).await?.kvs());
            assert!(before.contains(&a_ip1), "registered {before}");

            let ns2 = ns.clone();
            let (ip1, ip2) = (a_ip1.clone(), a_ip2.clone());
            let mut renumbered = false;
            let (intact, stall) = transfer(a_out, 32 * MIB, move |mib| {
                if mib == 8 && !renumbered {
                    renumbered = true;
                    // The host is renumbered: a new address, the old one removed.
                    let _ = ip(&["-n", &ns2, "addr", "add", &format!("{ip2}/24"), "dev", "mesh0"]);
                    let _ = ip(&["-n", &ns2, "addr", "del", &format!("{ip1}/24"), "dev", "mesh0"]);
                }
            })
            .await
            .with_context(a_log)?;
            assert!(intact, "transfer not intact");
            eprintln!("renumbering during 32 MiB: intact, longest stall {stall:?}");
            assert!(stall < Duration::from_secs(1), "stall {stall:?}");
            until("node-b to show node-a's new address", Duration::from_secs(10), async || {
                Ok(b.get("/status").await?.1.contains(&format!("{a_ip2}:4433")))
            })
            .await?;
            let t0 = Instant::now();
            loop {
                let now = rec(client.get("/test/nodes/node-a", None).await?.kvs());
                if now.contains(&a_ip2) {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("registry still holds {now}\n{}", a_log());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(a_log().contains("local address changed"), "{}", a_log());

            // A crash right after the migration loses nothing: the restarted node registers
            // the address it has now.
            let _ = a_child.kill();
            let _ = a_child.wait();
            let log = std::fs::OpenOptions::new().append(true).open(dir.join("a.log"))?;
            a_child = Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(meshnode_bin())
                .args(["run", "-c"])
                .arg(&a_path)
                .env("MESHNODE_LOG", "info")
                .stderr(log)
                .spawn()?;
            until("the restarted node-a ready", Duration::from_secs(20), async || {
                Ok(http_get(a_admin, "/readyz").await?.0 == 200)
            })
            .await
            .with_context(a_log)?;
            let now = rec(client.get("/test/nodes/node-a", None).await?.kvs());
            assert!(now.contains(&a_ip2), "after the restart the registry holds {now}");
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let _ = a_child.kill();
        let _ = a_child.wait();
        drop(guard);
        result
    })
    .await?
}
