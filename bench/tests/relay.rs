//! The fault relay, driven with plain UDP sockets on loopback (library API and `meshrelay`).

use std::net::SocketAddr;
use std::time::Duration;

use meshnode_bench::relay::{Relay, RelayHandle, RelayStats};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, Instant};

/// Upper bound for anything that should happen "promptly" on loopback.
const PROMPT: Duration = Duration::from_secs(5);

async fn udp() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind udp")
}

/// A client socket, an upstream socket and a relay between them.
async fn setup() -> (UdpSocket, UdpSocket, RelayHandle) {
    let upstream = udp().await;
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        upstream.local_addr().unwrap(),
    )
    .expect("start relay");
    let client = udp().await;
    client.connect(relay.local_addr()).await.unwrap();
    (client, upstream, relay)
}

async fn recv_from(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = timeout(PROMPT, socket.recv_from(&mut buf))
        .await
        .expect("datagram did not arrive in time")
        .expect("recv_from");
    buf.truncate(n);
    (buf, from)
}

async fn recv(socket: &UdpSocket) -> Vec<u8> {
    recv_from(socket).await.0
}

/// Polls the relay's counters until `done` holds (or fails the test after [`PROMPT`]).
async fn wait_stats(relay: &RelayHandle, done: impl Fn(&RelayStats) -> bool) -> RelayStats {
    let deadline = Instant::now() + PROMPT;
    loop {
        let stats = relay.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "relay stats never got there: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn forwards_both_ways() {
    let (client, upstream, relay) = setup().await;
    client.send(b"ping").await.unwrap();
    let (data, seen) = recv_from(&upstream).await;
    assert_eq!(data, b"ping");
    assert_ne!(
        seen,
        client.local_addr().unwrap(),
        "upstream sees the relay, not the client"
    );
    upstream.send_to(b"pong", seen).await.unwrap();
    assert_eq!(recv(&client).await, b"pong");

    // A second client gets its own upstream socket (its own NAT mapping).
    let other = udp().await;
    other.send_to(b"hi", relay.local_addr()).await.unwrap();
    let (data, seen2) = recv_from(&upstream).await;
    assert_eq!(data, b"hi");
    assert_ne!(seen, seen2);
    upstream.send_to(b"yo", seen2).await.unwrap();
    assert_eq!(recv(&other).await, b"yo");

    let stats = relay.stats();
    assert_eq!(
        (stats.forwarded_up, stats.forwarded_down, stats.dropped),
        (2, 2, 0)
    );
    relay.shutdown();
}

#[tokio::test]
async fn delay_is_applied_per_direction_without_serialising_packets() {
    let (client, upstream, relay) = setup().await;
    client.send(b"warm").await.unwrap();
    let (_, seen) = recv_from(&upstream).await;

    let delay = Duration::from_millis(20);
    let slack = Duration::from_millis(250);
    relay.set_delay(delay);
    for _ in 0..3 {
        let start = Instant::now();
        client.send(b"one-way").await.unwrap();
        recv(&upstream).await;
        let up = start.elapsed();
        assert!(up >= delay && up < delay + slack, "one-way took {up:?}");
        upstream.send_to(b"back", seen).await.unwrap();
        recv(&client).await;
        let rtt = start.elapsed();
        assert!(
            rtt >= 2 * delay && rtt < 2 * delay + slack,
            "round trip took {rtt:?}"
        );
    }

    // 200 datagrams sent back to back all arrive about one delay later, in order: the delay
    // queue does not hold a packet back behind the previous one's delay.
    let start = Instant::now();
    for i in 0u32..200 {
        client.send(&i.to_be_bytes()).await.unwrap();
    }
    for i in 0u32..200 {
        assert_eq!(
            recv(&upstream).await,
            i.to_be_bytes(),
            "reordered without jitter"
        );
    }
    let all = start.elapsed();
    assert!(
        all >= delay && all < delay + slack,
        "200 delayed datagrams took {all:?}"
    );
    relay.shutdown();
}

#[tokio::test]
async fn jitter_spreads_the_delay() {
    let (client, upstream, relay) = setup().await;
    relay.set_delay(Duration::from_millis(10));
    relay.set_jitter(Duration::from_millis(5));
    for _ in 0..5 {
        let start = Instant::now();
        client.send(b"j").await.unwrap();
        recv(&upstream).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(5),
            "below delay - jitter: {took:?}"
        );
        assert!(
            took < Duration::from_millis(15) + Duration::from_millis(250),
            "{took:?}"
        );
    }
    relay.shutdown();
}

#[tokio::test]
async fn loss_drops_about_half() {
    let (client, upstream, relay) = setup().await;
    relay.set_loss(0.5);
    const N: u64 = 2_000;
    // Count arrivals upstream as they come, so no socket buffer fills up.
    let (count_tx, count_rx) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        let mut n = 0;
        while upstream.recv(&mut buf).await.is_ok() {
            n += 1;
            count_tx.send_replace(n);
        }
    });
    let mut sent = 0u64;
    while sent < N {
        // Keep at most 100 datagrams in flight so no kernel buffer ever overflows.
        if sent - (*count_rx.borrow() + relay.stats().dropped) < 100 {
            client.send(&sent.to_be_bytes()).await.unwrap();
            sent += 1;
        } else {
            tokio::task::yield_now().await;
        }
    }
    let stats = wait_stats(&relay, |s| s.forwarded_up + s.dropped == N).await;
    // Binomial(2000, 0.5): sd ≈ 22; ±300 is more than 13 sd, so this never flakes.
    assert!((700..=1300).contains(&stats.dropped), "{stats:?}");
    let deadline = Instant::now() + PROMPT;
    while *count_rx.borrow() < stats.forwarded_up {
        assert!(
            Instant::now() < deadline,
            "only {} of {stats:?} arrived",
            *count_rx.borrow()
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(*count_rx.borrow(), stats.forwarded_up);
    reader.abort();
    relay.shutdown();
}

#[tokio::test]
async fn blackhole_drops_everything_then_recovers() {
    let (client, upstream, relay) = setup().await;
    client.send(b"before").await.unwrap();
    let (_, seen) = recv_from(&upstream).await;

    relay.set_blackhole(true);
    for _ in 0..10 {
        client.send(b"lost").await.unwrap();
        upstream.send_to(b"lost", seen).await.unwrap();
    }
    wait_stats(&relay, |s| s.dropped == 20).await;
    let mut buf = [0u8; 64];
    assert!(
        upstream.try_recv_from(&mut buf).is_err(),
        "blackholed datagram reached upstream"
    );
    assert!(
        client.try_recv(&mut buf).is_err(),
        "blackholed datagram reached the client"
    );

    relay.set_blackhole(false);
    client.send(b"after").await.unwrap();
    assert_eq!(recv_from(&upstream).await, (b"after".to_vec(), seen));
    upstream.send_to(b"back", seen).await.unwrap();
    assert_eq!(recv(&client).await, b"back");
    relay.shutdown();
}

#[tokio::test]
async fn rebind_changes_the_source_port_and_replies_still_arrive() {
    let (client, upstream, relay) = setup().await;
    client.send(b"one").await.unwrap();
    let (_, first) = recv_from(&upstream).await;
    upstream.send_to(b"r1", first).await.unwrap();
    assert_eq!(recv(&client).await, b"r1");

    relay.rebind().expect("rebind");
    client.send(b"two").await.unwrap();
    let (data, second) = recv_from(&upstream).await;
    assert_eq!(data, b"two");
    assert_eq!(first.ip(), second.ip());
    assert_ne!(
        first.port(),
        second.port(),
        "rebind must change the source port"
    );
    upstream.send_to(b"r2", second).await.unwrap();
    assert_eq!(recv(&client).await, b"r2");
    // The same client keeps the new mapping.
    client.send(b"three").await.unwrap();
    assert_eq!(recv_from(&upstream).await.1, second);
    assert_eq!(relay.stats().rebinds, 1);
    relay.shutdown();
}

/// Sends one control line and reads the answer.
async fn command(
    lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    line: &str,
) -> String {
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    timeout(PROMPT, lines.read_line(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    answer.trim_end().to_string()
}

#[tokio::test]
async fn meshrelay_control_port() {
    let upstream = udp().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshrelay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--upstream",
        ])
        .arg(upstream.local_addr().unwrap().to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn meshrelay");
    let mut banner = String::new();
    let stdout = child.stdout.take().unwrap();
    timeout(PROMPT, BufReader::new(stdout).read_line(&mut banner))
        .await
        .unwrap()
        .unwrap();
    let field = |name: &str| -> SocketAddr {
        let prefix = format!("{name}=");
        let word = banner
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()));
        word.unwrap_or_else(|| panic!("no {name} in {banner:?}"))
            .parse()
            .unwrap()
    };
    let (listen, control) = (field("listen"), field("control"));

    let (read, mut write) = TcpStream::connect(control).await.unwrap().into_split();
    let mut lines = BufReader::new(read);
    for ok in [
        "delay 10ms",
        "delay up 5ms",
        "jitter 0",
        "loss down 0",
        "loss 0",
    ] {
        assert_eq!(command(&mut lines, &mut write, ok).await, "ok", "{ok}");
    }
    assert!(command(&mut lines, &mut write, "delay 10 parsecs")
        .await
        .starts_with("error: "));
    assert!(command(&mut lines, &mut write, "loss 1.5")
        .await
        .starts_with("error: "));
    assert!(command(&mut lines, &mut write, "frobnicate")
        .await
        .starts_with("error: "));
    let settings = command(&mut lines, &mut write, "settings").await;
    let settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    assert_eq!(settings["up"]["delay_us"], 5_000);
    assert_eq!(settings["down"]["delay_us"], 10_000);

    let client = udp().await;
    client.send_to(b"x", listen).await.unwrap();
    let (_, first) = recv_from(&upstream).await;
    assert_eq!(command(&mut lines, &mut write, "blackhole on").await, "ok");
    client.send_to(b"x", listen).await.unwrap();
    let deadline = Instant::now() + PROMPT;
    let stats = loop {
        let s: serde_json::Value =
            serde_json::from_str(&command(&mut lines, &mut write, "stats").await).unwrap();
        if s["dropped"] == 1 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the blackholed datagram was never counted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(stats["forwarded_up"], 1);
    assert_eq!(command(&mut lines, &mut write, "blackhole off").await, "ok");
    assert_eq!(command(&mut lines, &mut write, "rebind").await, "ok");
    client.send_to(b"y", listen).await.unwrap();
    let (data, second) = recv_from(&upstream).await;
    assert_eq!(data, b"y");
    assert_ne!(first.port(), second.port());
    let stats: serde_json::Value =
        serde_json::from_str(&command(&mut lines, &mut write, "stats").await).unwrap();
    assert_eq!(stats["rebinds"], 1);
    assert_eq!(command(&mut lines, &mut write, "quit").await, "ok");
    child.start_kill().unwrap();
    let _ = child.wait().await;
}
