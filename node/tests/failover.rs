//! Failover with real processes on a real etcd (docs/behaviour.md): a node killed, blackholed, slowed,
//! restarted, or rolled, under a client that opens a new connection every 10 ms.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::cluster::*;
use common::process::*;
use common::*;
use meshnode_bench::relay::Relay;

/// These tests measure timing on 2 cores: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const INTERVAL: Duration = Duration::from_millis(10);

struct Three {
    cluster: Cluster,
    a: NodeProcess,
    b: NodeProcess,
    c: NodeProcess,
    out: std::net::SocketAddr,
}

/// A (outbound), B and C (tagged echo services "B" and "C"). With `relay_b`, B advertises a
/// relay's address and A reaches B only through it.
async fn three(relay_b: bool) -> Result<(Three, Option<meshnode_bench::relay::RelayHandle>)> {
    let cluster = Cluster::new(&["node-a", "node-b", "node-c"]).await?;
    let (tb, tc) = (tagged_server("B").await?, tagged_server("C").await?);
    let out = free_tcp()?;
    let a = cluster.node("node-a", &outbound(out)).await?;
    let (b, relay) = if relay_b {
        let quic = free_udp()?;
        let relay = Relay::start("127.0.0.1:0".parse()?, quic)?;
        let adv = format!("advertise = \"{}\"", relay.local_addr());
        (
            cluster
                .node_at("node-b", &echo_service(tb), quic, &adv)
                .await?,
            Some(relay),
        )
    } else {
        (cluster.node("node-b", &echo_service(tb)).await?, None)
    };
    let c = cluster.node("node-c", &echo_service(tc)).await?;
    until(
        "node-a to see both endpoints",
        Duration::from_secs(10),
        async || Ok(endpoints(&a).await? == ["node-b", "node-c"]),
    )
    .await?;
    Ok((
        Three {
            cluster,
            a,
            b,
            c,
            out,
        },
        relay,
    ))
}

/// node-a's latency estimate (peak EWMA, ms) of each endpoint of `echo`, from its /status.
async fn estimates_ms(a: &NodeProcess) -> Result<std::collections::BTreeMap<String, f64>> {
    let (_, body) = a.get("/status").await?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    let mut out = std::collections::BTreeMap::new();
    for s in doc["services"].as_array().context("services")? {
        if s["name"] == "echo" {
            for e in s["endpoints"].as_array().context("endpoints")? {
                if let (Some(n), Some(ms)) = (e["node"].as_str(), e["ewma_ms"].as_f64()) {
                    out.insert(n.to_string(), ms);
                }
            }
        }
    }
    Ok(out)
}

/// Starts the client and waits until both B and C have served it.
async fn traffic_on_both(out: std::net::SocketAddr) -> Result<Traffic> {
    let t = Traffic::start(out, INTERVAL);
    until("traffic on both", Duration::from_secs(10), async || {
        Ok(t.tagged(b'B') > 0 && t.tagged(b'C') > 0)
    })
    .await?;
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_endpoint_fails_no_connection() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let (mut m, _) = three(false).await?;
        let t = traffic_on_both(m.out).await?;
        m.b.signal(libc::SIGKILL)?;
        let killed = Instant::now();
        m.b.wait_exit(Duration::from_secs(5)).await?;
        let b_at_kill = t.tagged(b'B');
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (ok, failed) = t.stop().await;
        eprintln!(
            "SIGKILL: {ok} ok, {failed} failed, worst connection {:?}, B served {} after the kill ({:?} ago)",
            t.worst(),
            t.tagged(b'B') - b_at_kill,
            killed.elapsed()
        );
        // A connection whose bytes already reached B when it died cannot be saved by anyone;
        // every connection that started after the kill must succeed.
        assert_eq!(t.failed_since(killed), 0, "connections opened after the kill failed\n{}", m.a.log_text());
        assert!(failed <= 2, "more failures than connections in flight at the kill: {failed}");
        assert!(
            t.worst() < Duration::from_millis(1500),
            "worst {:?}\n{}",
            t.worst(),
            m.a.log_text()
        );
        assert_eq!(t.tagged(b'B'), b_at_kill, "B served after it was killed");
        drop(m.c);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_endpoint_is_left_within_a_second_and_returns() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let (m, relay) = three(true).await?;
        let relay = relay.expect("relay");
        let t = traffic_on_both(m.out).await?;
        relay.set_blackhole(true);
        let start = Instant::now();
        let failed_before = t.failed.load(std::sync::atomic::Ordering::Relaxed);
        // Failures are allowed only within the first second.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let failed_first_second = t.failed.load(std::sync::atomic::Ordering::Relaxed) - failed_before;
        let b_mark = t.tagged(b'B');
        let ok_mark = t.ok.load(std::sync::atomic::Ordering::Relaxed);
        let failed_mark = t.failed.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let failed_later = t.failed.load(std::sync::atomic::Ordering::Relaxed) - failed_mark;
        let ok_later = t.ok.load(std::sync::atomic::Ordering::Relaxed) - ok_mark;
        eprintln!(
            "blackhole: {failed_first_second} failed in the first second, then {failed_later} failed and {ok_later} ok; B served {} after 1 s ({:?})",
            t.tagged(b'B') - b_mark,
            start.elapsed()
        );
        // Counted by when a connection *started*: one already on B when the blackhole began
        // fails when B's connection times out (~1 s later), but it belongs to the first second.
        let late = t.failed_since(start + Duration::from_secs(1));
        assert_eq!(late, 0, "connections started after the first second failed ({failed_later} failures after 1 s in all)");
        assert_eq!(t.tagged(b'B'), b_mark, "B still served after 1 s of blackhole");
        relay.set_blackhole(false);
        let lifted = Instant::now();
        // The connection to B died of its idle timeout, so B is down and the reconnector
        // dials it; the first handshake that gets through brings B back.
        until("B to serve again", Duration::from_secs(10), async || {
            Ok(t.first_served_since(b'B', lifted).is_some())
        })
        .await?;
        let (ok, failed) = t.stop().await;
        // From the lift to the answer of the first connection B served again, on the client's
        // own clock (not when the poll above noticed).
        let first = t.first_served_since(b'B', lifted).context("B's answer not recorded")?;
        let back = first - lifted;
        eprintln!("blackhole lifted: B served again after {back:?}; {ok} ok, {failed} failed in all");
        assert!(back < Duration::from_secs(5), "B back only after {back:?}");
        // Failures are allowed only within the first second, through B's return as well:
        // `stop` has waited for every connection, so this counts all of them.
        let late = t.failed_since(start + Duration::from_secs(1));
        assert_eq!(late, 0, "connections started after the first second failed (blackhole, then B's return)");
        drop((m.b, m.c, m.a));
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slower_endpoint_gets_little_traffic_and_recovers() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let (m, relay) = three(true).await?;
        let relay = relay.expect("relay");
        relay.set_delay(Duration::from_millis(10));
        // Traffic until node-a's estimate of B shows the delay (its /status, what the
        // balancer picks by).
        let t0 = Traffic::start(m.out, INTERVAL);
        let seen = until(
            "node-a to see B slower than C",
            Duration::from_secs(10),
            async || {
                let e = estimates_ms(&m.a).await?;
                Ok(e.get("node-b").copied().unwrap_or(0.0)
                    > e.get("node-c").copied().unwrap_or(f64::MAX) + 5.0)
            },
        )
        .await?;
        t0.stop().await;
        eprintln!(
            "node-a saw B's delay after {seen:?}: {:?}",
            estimates_ms(&m.a).await?
        );
        let t = Traffic::start(m.out, INTERVAL);
        until("600 requests", Duration::from_secs(30), async || {
            Ok(t.ok.load(std::sync::atomic::Ordering::Relaxed) >= 600)
        })
        .await?;
        let (b, c) = (t.tagged(b'B'), t.tagged(b'C'));
        let (_, failed) = t.stop().await;
        let share_c = c as f64 / (b + c) as f64;
        eprintln!(
            "B +10 ms one way: B {b}, C {c} → {:.1} % to C, {failed} failed",
            share_c * 100.0
        );
        assert!(share_c >= 0.85, "C share {share_c}");
        relay.set_delay(Duration::ZERO);
        let t = Traffic::start(m.out, INTERVAL);
        // docs/behaviour.md, Balancing: traffic returns "within seconds". B, not picked for 2 s, is measured again
        // (`remeasure_after`) and that answer replaces its old estimate, whatever the ratio
        // of B's old latency to C's.
        let back = until(
            "B to get traffic again",
            Duration::from_secs(15),
            async || Ok(t.tagged(b'B') >= 20),
        )
        .await?;
        eprintln!("delay removed: B back to 20 connections after {back:?}");
        // Measured 0.2–3.6 s; B sits behind the relay, an extra user-space hop, so once
        // measured again it still competes as a slightly slower path.
        assert!(back < Duration::from_secs(8), "B back only after {back:?}");
        t.stop().await;
        drop((m.a, m.b, m.c));
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_endpoint_serves_again_within_a_second() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let (mut m, _) = three(false).await?;
        let t = traffic_on_both(m.out).await?;
        m.b.signal(libc::SIGKILL)?;
        m.b.wait_exit(Duration::from_secs(5)).await?;
        let mut b2 = m.b.restart()?;
        b2.wait_ready(Duration::from_secs(10)).await?;
        let ready = Instant::now();
        until("the restarted B to serve", Duration::from_secs(10), async || {
            Ok(t.first_served_since(b'B', ready).is_some())
        })
        .await?;
        let (ok, failed) = t.stop().await;
        // Measured from `ready` to the answer of the first connection B served after it (the
        // client's own clock, not when the poll above noticed).
        let first = t.first_served_since(b'B', ready).context("B's answer not recorded")?;
        let back = first - ready;
        eprintln!("restart (same port and state dir): B served again {back:?} after it was ready; {ok} ok, {failed} failed");
        // B's return is invisible to the client: a failed open to B (the dead process, or the
        // new one before its handshake) is retried elsewhere, so every connection opened once
        // the new B was ready succeeded (`stop` has waited for all of them).
        assert_eq!(t.failed_since(ready), 0, "connections opened after the restarted B was ready failed\n{}", m.a.log_text());
        if std::env::var_os("FAILOVER_LOG").is_some() {
            eprintln!("{}", m.a.log_text());
        }
        // docs/behaviour.md, dead and restarted peers: within a second. The old connection dies of a stateless reset from the new
        // process (or of its idle timeout), which marks B down; the reconnector's handshake
        // then brings it back whatever back-off its failed opens had earned.
        assert!(back < Duration::from_secs(1), "took {back:?}");
        drop((m.a, m.c, b2));
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_fails_no_connection() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let (m, _) = three(false).await?;
        let t = traffic_on_both(m.out).await?;
        let mut procs = [m.b, m.c];
        for p in procs.iter_mut() {
            p.signal(libc::SIGTERM)?;
            assert_eq!(p.wait_exit(Duration::from_secs(15)).await?, Some(0));
            let mut fresh = p.restart()?;
            fresh.wait_ready(Duration::from_secs(10)).await?;
            until(
                "both endpoints again",
                Duration::from_secs(10),
                async || Ok(endpoints(&m.a).await? == ["node-b", "node-c"]),
            )
            .await?;
            std::mem::swap(p, &mut fresh);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ok, failed) = t.stop().await;
        eprintln!("rolling restart: {ok} ok, {failed} failed");
        assert_eq!(
            failed,
            0,
            "failed connections during the rolling restart\nnode-a:\n{}\nnode-b:\n{}\nnode-c:\n{}",
            m.a.log_text(),
            procs[0].log_text(),
            procs[1].log_text()
        );
        let _ = &m.cluster;
        Ok(())
    })
    .await?
}
