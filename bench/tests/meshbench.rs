//! The meshbench engines and binary on loopback: sink, echo, bulk, latency, raw quinn.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use meshnode_bench::latency::{self, LatencyOptions};
use meshnode_bench::relay::Relay;
use meshnode_bench::tcp::{self, BulkTarget};
use meshnode_bench::{h2tunnel, quic};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

async fn sink() -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(tcp::run_sink(l));
    addr
}

async fn echo() -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(tcp::run_echo(l));
    addr
}

async fn bulk(
    addr: SocketAddr,
    bytes: u64,
    conns: usize,
    target: BulkTarget,
) -> anyhow::Result<tcp::BulkRun> {
    let job = tokio::task::spawn_blocking(move || tcp::bulk(addr, bytes, conns, target));
    timeout(LIMIT, job)
        .await
        .expect("bulk in time")
        .expect("join")
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_against_sink_and_echo() {
    let (sink, echo) = (sink().await, echo().await);
    for conns in [1, 3] {
        let run = bulk(sink, 8 << 20, conns, BulkTarget::Sink)
            .await
            .expect("bulk to sink");
        assert_eq!(run.bytes, 8 << 20);
        assert!(run.gbps > 0.0 && run.seconds > 0.0);
        // An odd size exercises the uneven split and the pattern's wrap-around.
        let run = bulk(echo, (3 << 20) + 12_345, conns, BulkTarget::Echo)
            .await
            .expect("bulk echo");
        assert_eq!(run.bytes, (3 << 20) + 12_345);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_detects_corruption_and_short_transfers() {
    // An "echo" that flips one byte.
    let (l, bad_echo) = listener().await;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let mut first = true;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if std::mem::take(&mut first) {
                buf[n / 2] ^= 1;
            }
            if s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let err = bulk(bad_echo, 1 << 20, 1, BulkTarget::Echo)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("differ"), "{err:#}");

    // A "sink" that acknowledges the wrong count.
    let (l, bad_sink) = listener().await;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut header = [0u8; 8];
        s.read_exact(&mut header).await.unwrap();
        let mut left = u64::from_be_bytes(header);
        let mut buf = vec![0u8; 65536];
        while left > 0 {
            left -= s.read(&mut buf).await.unwrap() as u64;
        }
        s.write_all(&1u64.to_be_bytes()).await.unwrap();
    });
    let err = bulk(bad_sink, 1 << 20, 1, BulkTarget::Sink)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("acknowledged"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn latency_open_loop_against_echo() {
    let addr = echo().await;
    let opts = LatencyOptions {
        addr,
        rate: 500.0,
        duration: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        size: 1024,
        conns: 3,
        spin: Duration::from_micros(100),
        drain: Duration::from_secs(5),
    };
    let job = tokio::task::spawn_blocking(move || latency::run(&opts));
    let report = timeout(LIMIT, job)
        .await
        .unwrap()
        .unwrap()
        .expect("latency run");
    assert_eq!(report.missing, 0);
    // 400 ms at 500/s = 200 recorded requests (±1 for the boundary).
    assert!((199..=201).contains(&report.requests), "{report:?}");
    let c = report.corrected_us;
    assert!(c.p50 > 0.0 && c.p50 <= c.p90 && c.p90 <= c.p99 && c.p99 <= c.p999 && c.p999 <= c.max);
    // Measured from the scheduled time, so never below the uncorrected latency.
    assert!(c.p50 >= report.uncorrected_us.p50);
}

#[tokio::test(flavor = "multi_thread")]
async fn latency_charges_a_stall_to_every_request_it_delays() {
    // An echo that stalls 300 ms once, after its 20th response: with the coordinated-omission
    // correction, requests scheduled during the stall all see (part of) it.
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 64];
        let mut answered = 0;
        while s.read_exact(&mut buf).await.is_ok() {
            s.write_all(&buf).await.unwrap();
            answered += 1;
            if answered == 20 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let opts = LatencyOptions {
        addr,
        rate: 200.0,
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        size: 64,
        conns: 1,
        spin: Duration::from_micros(100),
        drain: Duration::from_secs(5),
    };
    let job = tokio::task::spawn_blocking(move || latency::run(&opts));
    let report = timeout(LIMIT, job)
        .await
        .unwrap()
        .unwrap()
        .expect("latency run");
    assert_eq!(report.missing, 0);
    // About 60 of 200 requests were scheduled inside the stall: p90 must show it.
    assert!(report.corrected_us.max >= 250_000.0, "{report:?}");
    assert!(report.corrected_us.p90 >= 50_000.0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_quinn_bulk_direct_and_through_the_relay() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(quic::serve("127.0.0.1:0".parse().unwrap(), move |addr| {
        let _ = tx.send(addr);
    }));
    let server = rx.await.unwrap();
    let (endpoint, conn) = timeout(LIMIT, quic::connect(server))
        .await
        .unwrap()
        .unwrap();
    let run = timeout(LIMIT, quic::bulk(&conn, 4 << 20, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.bytes, 4 << 20);
    // Eight concurrent streams, a count that does not divide evenly: every stream's count
    // must match what it was given.
    let run = timeout(LIMIT, quic::bulk(&conn, (4 << 20) + 3, 8))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.bytes, (4 << 20) + 3);
    assert!(timeout(LIMIT, quic::bulk(&conn, 1 << 20, 0))
        .await
        .unwrap()
        .is_err());
    conn.close(0u32.into(), b"");
    endpoint.wait_idle().await;

    // Through the relay with a NAT rebinding in the middle: QUIC migrates and carries on.
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), server).unwrap();
    let (endpoint, conn) = timeout(LIMIT, quic::connect(relay.local_addr()))
        .await
        .unwrap()
        .unwrap();
    timeout(LIMIT, quic::bulk(&conn, 1 << 20, 1))
        .await
        .unwrap()
        .unwrap();
    relay.rebind().unwrap();
    timeout(LIMIT, quic::bulk(&conn, 1 << 20, 1))
        .await
        .unwrap()
        .unwrap();
    let stats = relay.stats();
    assert_eq!(stats.rebinds, 1);
    assert!(
        stats.forwarded_up > 0 && stats.forwarded_down > 0,
        "{stats:?}"
    );
    conn.close(0u32.into(), b"");
    endpoint.wait_idle().await;
    relay.shutdown();
}

#[tokio::test(flavor = "multi_thread")]
async fn hbone_shaped_pair_carries_concurrent_tunnels_on_one_connection() {
    let (sink, echo) = (sink().await, echo().await);
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(h2tunnel::run_exit(
        "127.0.0.1:0".parse().unwrap(),
        move |addr| {
            let _ = tx.send(addr);
        },
    ));
    let exit = rx.await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let forwards = vec![(any, sink.to_string()), (any, echo.to_string())];
    tokio::spawn(async move {
        h2tunnel::run_entry(exit, &forwards, move |bound| {
            let _ = tx.send(bound.to_vec());
        })
        .await
    });
    let bound = timeout(LIMIT, rx).await.unwrap().unwrap();
    let (to_sink, to_echo) = (bound[0], bound[1]);
    // Three tunnels at once, every byte checked on the way back, and a bulk beside them.
    let echoed = bulk(to_echo, (3 << 20) + 777, 3, BulkTarget::Echo);
    let sunk = bulk(to_sink, 16 << 20, 1, BulkTarget::Sink);
    let (echoed, sunk) = tokio::join!(echoed, sunk);
    assert_eq!(
        echoed.expect("echo through the pair").bytes,
        (3 << 20) + 777
    );
    assert_eq!(sunk.expect("sink through the pair").bytes, 16 << 20);
    // Small requests on the same connection.
    let opts = LatencyOptions {
        addr: to_echo,
        rate: 200.0,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(100),
        size: 512,
        conns: 2,
        spin: Duration::from_micros(100),
        drain: Duration::from_secs(5),
    };
    let job = tokio::task::spawn_blocking(move || latency::run(&opts));
    let report = timeout(LIMIT, job)
        .await
        .unwrap()
        .unwrap()
        .expect("latency through the pair");
    assert_eq!(report.missing, 0);
    assert!((99..=101).contains(&report.requests), "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn meshbench_binary_sink_and_bulk_json() {
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbench"))
        .args(["sink", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = server.stdout.take().unwrap();
    timeout(LIMIT, BufReader::new(stdout).read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    let v = meshbench_json(&[
        "bulk",
        "--connect",
        &addr,
        "--bytes",
        "4MiB",
        "--repeat",
        "3",
        "--json",
    ])
    .await;
    assert_eq!(v["runs"].as_array().unwrap().len(), 3);
    assert!(v["median_gbps"].as_f64().unwrap() > 0.0);
    server.start_kill().unwrap();
    let _ = server.wait().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn meshbench_binary_latency_ping_pong_closed_loop() {
    let addr = echo().await.to_string();
    let v = meshbench_json(&[
        "latency",
        "--connect",
        &addr,
        "--concurrency",
        "1",
        "--size",
        "1024",
        "--duration",
        "300ms",
        "--warmup",
        "50ms",
        "--json",
    ])
    .await;
    // Closed loop: no schedule, one request outstanding on the one connection.
    assert_eq!(v["concurrency"].as_u64(), Some(1), "{v}");
    assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
    assert!(v["requests"].as_u64().unwrap() > 10, "{v}");
    let p50 = v["uncorrected_us"]["p50"].as_f64().unwrap();
    let p99 = v["uncorrected_us"]["p99"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p99, "{v}");
}

/// Runs the `meshbench` binary with `args` to success and parses its JSON output.
async fn meshbench_json(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbench"))
        .args(args)
        .output();
    let out = timeout(LIMIT, out).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
