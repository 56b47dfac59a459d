//! Discovery on a real etcd with real `meshnode` processes: registration, lease expiry after
//! SIGKILL, deregistration on SIGTERM, and traffic that never stops while etcd restarts or
//! freezes (static stability).

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::cluster::*;
use common::process::*;
use common::*;
use meshnode_registry::testing::EtcdProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_and_vanish_by_lease_or_at_once() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), async {
        let cluster = Cluster::new(&["node-a", "node-b", "node-c"]).await?;
        let echo = tagged_server("B").await?;
        let a = cluster.node("node-a", &outbound(free_tcp()?)).await?;
        let b = cluster.node("node-b", &echo_service(echo)).await?;
        until(
            "node-a to see node-b",
            Duration::from_secs(10),
            async || Ok(endpoints(&a).await? == ["node-b"]),
        )
        .await?;
        // A node started later is discovered.
        let mut c = cluster.node("node-c", &echo_service(echo)).await?;
        until(
            "node-a to see node-c",
            Duration::from_secs(10),
            async || Ok(endpoints(&a).await? == ["node-b", "node-c"]),
        )
        .await?;

        // SIGKILL: nothing is deregistered; the lease expires.
        c.signal(libc::SIGKILL)?;
        c.wait_exit(Duration::from_secs(5)).await?;
        let gone = until(
            "node-c's lease to expire",
            Duration::from_secs(TTL_S + 5),
            async || Ok(endpoints(&a).await? == ["node-b"]),
        )
        .await?;
        eprintln!("SIGKILL: node-c left node-a's view after {gone:?} (lease_ttl {TTL_S}s)");
        assert!(
            gone <= Duration::from_millis(TTL_S * 1000 + 1500),
            "took {gone:?}"
        );

        // SIGTERM: the lease is revoked first, so the node vanishes at once.
        let mut b = b;
        b.signal(libc::SIGTERM)?;
        let gone = until("node-b to deregister", Duration::from_secs(5), async || {
            Ok(endpoints(&a).await?.is_empty())
        })
        .await?;
        eprintln!("SIGTERM: node-b left node-a's view after {gone:?}");
        assert!(gone < Duration::from_secs(1), "took {gone:?}");
        assert_eq!(b.wait_exit(Duration::from_secs(10)).await?, Some(0));
        Ok(())
    })
    .await?
}

async fn etcd_has(etcd: &EtcdProcess, key: &str) -> Result<bool> {
    let mut c = etcd.client().await?;
    Ok(c.get(key, None).await?.kvs().len() == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_never_stops_while_etcd_restarts_or_freezes() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(150), async {
        let mut cluster = Cluster::new(&["node-a", "node-b"]).await?;
        let echo = tagged_server("B").await?;
        let out = free_tcp()?;
        let a = cluster.node("node-a", &outbound(out)).await?;
        let b = cluster.node("node-b", &echo_service(echo)).await?;
        until(
            "node-a to see node-b",
            Duration::from_secs(10),
            async || Ok(endpoints(&a).await? == ["node-b"]),
        )
        .await?;
        let traffic = Traffic::start(out, Duration::from_millis(20));

        // etcd killed, down for a second, restarted.
        cluster.etcd.kill();
        until(
            "node-a to report the registry disconnected",
            Duration::from_secs(10),
            async || Ok(registry_state(&a).await? == "disconnected"),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await; // etcd stays down for a while
        cluster.etcd.restart().await?;
        let back = Instant::now();
        loop {
            let both = etcd_has(&cluster.etcd, "/test/nodes/node-a")
                .await
                .unwrap_or(false)
                && etcd_has(&cluster.etcd, "/test/services/echo/node-b")
                    .await
                    .unwrap_or(false);
            if both
                && registry_state(&a).await? == "connected"
                && registry_state(&b).await? == "connected"
            {
                break;
            }
            if back.elapsed() > Duration::from_secs(5) {
                bail!("nodes not registered again within 5 s of etcd's return");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "etcd restart: both nodes registered again {:?} after etcd returned",
            back.elapsed()
        );

        // etcd frozen for longer than the lease TTL.
        cluster.etcd.pause()?;
        until(
            "node-a to report the registry disconnected",
            Duration::from_secs(10),
            async || Ok(registry_state(&a).await? == "disconnected"),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(TTL_S + 1)).await; // frozen past the TTL
        assert_eq!(
            endpoints(&a).await?,
            ["node-b"],
            "routes kept while etcd is frozen"
        );
        cluster.etcd.resume()?;
        let took = until(
            "the registry to be consistent again",
            Duration::from_secs(10),
            async || {
                Ok(registry_state(&a).await? == "connected"
                    && registry_state(&b).await? == "connected"
                    && endpoints(&a).await? == ["node-b"])
            },
        )
        .await?;
        eprintln!("etcd freeze: consistent {took:?} after SIGCONT");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ok, failed) = traffic.stop().await;
        eprintln!("traffic during etcd faults: {ok} ok, {failed} failed");
        assert!(ok > 100, "too little traffic: {ok}");
        assert_eq!(
            failed,
            0,
            "connections failed while etcd was unwell; logs:\n{}\n{}",
            a.log_text(),
            b.log_text()
        );
        Ok(())
    })
    .await?
}
