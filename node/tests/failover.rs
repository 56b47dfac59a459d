//! Failover with real processes on a real etcd (SPEC §8): a node killed, blackholed, slowed,
//! restarted, or rolled, under a client that opens a new connection every 10 ms.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
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
    let a = cluster.node("node-a", &outbound(out))?;
    let (b, relay) = if relay_b {
        let quic = free_udp()?;
        let relay = Relay::start("127.0.0.1:0".parse()?, quic)?;
        let adv = format!("advertise = \"{}\"", relay.local_addr());
        (
            cluster.node_at("node-b", &echo_service(tb), quic, &adv)?,
            Some(relay),
        )
    } else {
        (cluster.node("node-b", &echo_service(tb))?, None)
    };
    let c = cluster.node("node-c", &echo_service(tc))?;
    until(
        "node-a to see both endpoints",
        Duration::from_secs(10),
        || Ok(endpoints(&a)? == ["node-b", "node-c"]),
    )?;
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

/// Starts the client and waits until both B and C have served it.
fn traffic_on_both(out: std::net::SocketAddr) -> Result<Traffic> {
    let t = Traffic::start(out, INTERVAL);
    until("traffic on both", Duration::from_secs(10), || {
        Ok(t.tagged(b'B') > 0 && t.tagged(b'C') > 0)
    })?;
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_endpoint_fails_no_connection() -> Result<()> {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let (mut m, _) = three(false).await?;
        let t = traffic_on_both(m.out)?;
        m.b.signal(libc::SIGKILL)?;
        let killed = Instant::now();
        m.b.wait_exit(Duration::from_secs(5))?;
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
        assert!(t.worst() < Duration::from_millis(1500), "worst {:?}", t.worst());
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
        let t = traffic_on_both(m.out)?;
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
        let back = until("B to serve again", Duration::from_secs(10), || Ok(t.tagged(b'B') > b_mark))?;
        eprintln!("blackhole lifted: B served again after {back:?}");
        assert!(lifted.elapsed() >= back);
        assert!(back < Duration::from_secs(5), "B back only after {back:?}");
        let (_ok, _failed) = t.stop().await;
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
        // Let the balancer see the delay (RTT samples every 500 ms).
        let t0 = Traffic::start(m.out, INTERVAL);
        tokio::time::sleep(Duration::from_secs(2)).await;
        t0.stop().await;
        let t = Traffic::start(m.out, INTERVAL);
        until("600 requests", Duration::from_secs(30), || {
            Ok(t.ok.load(std::sync::atomic::Ordering::Relaxed) >= 600)
        })?;
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
        // SPEC §8: traffic returns "within seconds". B, not picked for 2 s, is measured again
        // (`remeasure_after`) and that answer replaces its old estimate, whatever the ratio
        // of B's old latency to C's.
        let back = until("B to get traffic again", Duration::from_secs(15), || {
            Ok(t.tagged(b'B') >= 20)
        })?;
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
        let t = traffic_on_both(m.out)?;
        m.b.signal(libc::SIGKILL)?;
        m.b.wait_exit(Duration::from_secs(5))?;
        let mut b2 = m.b.restart()?;
        b2.wait_ready(Duration::from_secs(10))?;
        let ready = Instant::now();
        let mark = t.tagged(b'B');
        let back = until("the restarted B to serve", Duration::from_secs(10), || Ok(t.tagged(b'B') > mark))?;
        let (ok, failed) = t.stop().await;
        eprintln!("restart (same port and state dir): B served again {back:?} after it was ready; {ok} ok, {failed} failed");
        assert!(ready.elapsed() >= back);
        if std::env::var_os("FAILOVER_LOG").is_some() {
            eprintln!("{}", m.a.log_text());
        }
        // SPEC §8: within a second. The old connection dies of a stateless reset from the new
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
        let t = traffic_on_both(m.out)?;
        let mut procs = [m.b, m.c];
        for p in procs.iter_mut() {
            p.signal(libc::SIGTERM)?;
            assert_eq!(p.wait_exit(Duration::from_secs(15))?, Some(0));
            let mut fresh = p.restart()?;
            fresh.wait_ready(Duration::from_secs(10))?;
            until("both endpoints again", Duration::from_secs(10), || {
                Ok(endpoints(&m.a)? == ["node-b", "node-c"])
            })?;
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
