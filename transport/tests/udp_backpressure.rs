//! A UDP send that meets a full socket buffer waits for write readiness, then goes on: the
//! rare path of `meshnode_transport::runtime`, whose socket is registered for reading only.
//!
//! Loopback never fills a UDP send buffer (a datagram is handed over within `sendmsg`), so the
//! datagrams cross a veth pair into a network namespace, and the root end has a token-bucket
//! qdisc slow enough to hold them: the queued datagrams keep the sender's buffer full. Needs
//! root and iproute2 (`ip`, `tc`), as the migration tests do.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meshnode_transport::quinn::udp::Transmit;
use meshnode_transport::quinn::Runtime;
use meshnode_transport::runtime::MeshRuntime;

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (apt-get install iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A namespace and the root end of its veth pair, removed on drop.
struct Netns {
    ns: String,
    link: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test]
async fn a_full_send_buffer_waits_for_write_readiness_then_resumes() -> Result<()> {
    let id = std::process::id() % 200 + 20;
    let ns = format!("mn-udpbp-{}", std::process::id());
    let link = format!("mnu{id}r");
    let _guard = Netns {
        ns: ns.clone(),
        link: link.clone(),
    };
    let (root_ip, ns_ip) = (format!("10.{id}.9.1"), format!("10.{id}.9.2"));
    run("ip", &["netns", "add", &ns])?;
    run(
        "ip",
        &[
            "link", "add", &link, "type", "veth", "peer", "name", "bp0", "netns", &ns,
        ],
    )?;
    run(
        "ip",
        &["addr", "add", &format!("{root_ip}/24"), "dev", &link],
    )?;
    run("ip", &["link", "set", &link, "up"])?;
    run(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            "bp0",
        ],
    )?;
    run("ip", &["-n", &ns, "link", "set", "bp0", "up"])?;
    // 20 Mbit/s with room for 50 ms of queue (125 KB): far more than the sender's buffer, so
    // the buffer fills before the qdisc drops anything.
    run(
        "tc",
        &[
            "qdisc", "add", "dev", &link, "root", "tbf", "rate", "20mbit", "burst", "16kb",
            "latency", "50ms",
        ],
    )?;

    let from: SocketAddr = format!("{root_ip}:0").parse()?;
    let to: SocketAddr = format!("{ns_ip}:9").parse()?;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    sock.set_send_buffer_size(16 * 1024)?;
    sock.bind(&from.into())?;
    let socket = MeshRuntime.wrap_udp_socket(sock.into())?;
    let mut poller = socket.clone().create_io_poller();

    const DATAGRAMS: usize = 2_000;
    let payload = [0x5a_u8; 1_200];
    let transmit = Transmit {
        destination: to,
        ecn: None,
        contents: &payload,
        segment_size: None,
        src_ip: None,
    };
    let started = Instant::now();
    let (mut sent, mut waits) = (0, 0);
    while sent < DATAGRAMS {
        match socket.try_send(&transmit) {
            Ok(()) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                waits += 1;
                tokio::time::timeout(
                    Duration::from_secs(5),
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
                )
                .await
                .context("no write readiness within 5 s of a full buffer")??;
            }
            Err(e) => bail!("send failed: {e}"),
        }
    }
    let took = started.elapsed();
    eprintln!("{DATAGRAMS} datagrams in {took:?}, {waits} waits for a full buffer");
    assert!(
        waits > 0,
        "the send buffer never filled: the path was not exercised"
    );
    // 2.4 MB at 20 Mbit/s is about 1 s; the waits end as the qdisc drains, not on a timer.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    Ok(())
}
