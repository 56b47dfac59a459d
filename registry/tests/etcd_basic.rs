//! The etcd backend against a real etcd: registration, leases, bad records, conflicts.

mod common;

use common::*;
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, Txn, TxnOp};
use meshnode_registry::testing::{
    has_node, registration, test_config, wait_for_status, wait_for_view, EtcdProcess,
};
use meshnode_registry::{etcd, RegistryState};

/// Bound of every test; the conditions inside have their own, tighter deadlines.
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn two_nodes_see_each_other() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7)]).await?;
        let b = node(&etcd.endpoint, "node-b", &[("echo", 7), ("web", 80)]).await?;
        for r in [&a, &b] {
            let view = wait_for_view(r, SOON, "both nodes", |v| {
                has_node(v, "node-a", &["echo"]) && has_node(v, "node-b", &["echo", "web"])
            })
            .await?;
            assert_eq!(view.endpoints("echo").count(), 2);
            assert!(view.revision > 0);
            let s = wait_for_status(r, SOON, "connected", |s| {
                s.state == RegistryState::Connected && s.registered
            })
            .await?;
            assert_eq!((s.backend, s.lease_ttl_s), ("etcd", 2));
            assert!(s.lease_id.is_some() && s.conflicts.is_empty(), "{s:?}");
        }
        // The records carry the lease, so a silent node would vanish.
        let mut client = etcd.client().await?;
        let resp = client
            .get(format!("{P}/"), Some(GetOptions::new().with_prefix()))
            .await?;
        assert_eq!(resp.kvs().len(), 5);
        assert!(resp.kvs().iter().all(|kv| kv.lease() != 0));
        a.shutdown(SOON).await?;
        b.shutdown(SOON).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn shutdown_vanishes_at_once_and_crash_within_ttl() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7)]).await?;
        let b = node(&etcd.endpoint, "node-b", &[("echo", 7)]).await?;
        let c = node(&etcd.endpoint, "node-c", &[("echo", 7)]).await?;
        wait_for_view(&a, SOON, "all three", |v| v.nodes.len() == 3).await?;

        // Graceful: the revoke deletes b's keys; a sees it well before the 2 s TTL.
        let t = Instant::now();
        b.shutdown(SOON).await?;
        b.shutdown(SOON).await?; // idempotent
        wait_for_view(&a, Duration::from_millis(1000), "b gone at once", |v| {
            !v.nodes.contains_key("node-b") && v.endpoints("echo").count() == 2
        })
        .await?;
        println!("graceful shutdown seen by a peer after {:?}", t.elapsed());

        // Crash: every handle dropped, no revoke; keys go when the 2 s lease expires.
        wait_for_status(&c, SOON, "c registered", |s| s.registered).await?;
        let t = Instant::now();
        drop(c);
        wait_for_view(&a, Duration::from_secs(3), "c gone within ttl + 1 s", |v| {
            !v.nodes.contains_key("node-c")
        })
        .await?;
        let took = t.elapsed();
        println!("crashed node vanished after {took:?}");
        assert!(
            took >= Duration::from_millis(900),
            "vanished too early ({took:?}): revoked?"
        );
        assert!(has_node(&a.view().borrow(), "node-a", &["echo"]));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn garbage_is_skipped_and_counted() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let mut client = etcd.client().await?;
        client
            .put(format!("{P}/nodes/bad"), "not json", None)
            .await?;
        client
            .put(
                format!("{P}/services/echo/bad"),
                r#"{"service":"echo"}"#,
                None,
            )
            .await?;
        client
            .put(format!("{P}/unknown/shape"), "whatever", None)
            .await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7)]).await?;
        let b = node(&etcd.endpoint, "node-b", &[("echo", 7)]).await?;
        wait_for_view(&b, SOON, "good records", |v| {
            v.endpoints("echo").count() == 2
        })
        .await?;
        wait_for_status(&b, SOON, "two invalid", |s| s.invalid_records_total == 2).await?;

        // A bad value over a good one: skipped, counted, the good one stays.
        let good = r#"{"name":"node-x","addr":"10.0.0.9:1"}"#;
        client.put(format!("{P}/nodes/node-x"), good, None).await?;
        wait_for_view(&b, SOON, "node-x", |v| v.nodes.contains_key("node-x")).await?;
        client.put(format!("{P}/nodes/node-x"), "{", None).await?;
        wait_for_status(&b, SOON, "three invalid", |s| s.invalid_records_total == 3).await?;
        assert_eq!(b.view().borrow().nodes["node-x"].addr, "10.0.0.9:1");
        // The garbage key fixed: applied like any other record.
        client
            .put(
                format!("{P}/nodes/bad"),
                r#"{"name":"bad","addr":"10.0.0.8:1"}"#,
                None,
            )
            .await?;
        wait_for_view(&b, SOON, "bad fixed", |v| v.nodes.contains_key("bad")).await?;
        assert_eq!(a.status().borrow().state, RegistryState::Connected);
        assert_eq!(b.status().borrow().invalid_records_total, 3);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn re_register_rewrites_and_removes() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7), ("web", 80)]).await?;
        let b = node(&etcd.endpoint, "node-b", &[]).await?;
        wait_for_view(&b, SOON, "a", |v| has_node(v, "node-a", &["echo", "web"])).await?;
        let lease = a.status().borrow().lease_id;
        // Connection migration: new address; and one service dropped.
        a.register(registration("node-a", "127.0.0.2:5555", &[("echo", 7)]))
            .await?;
        wait_for_view(&b, SOON, "a moved", |v| {
            v.nodes
                .get("node-a")
                .is_some_and(|n| n.addr == "127.0.0.2:5555")
                && !v.services.contains_key("web")
                && v.endpoints("echo").count() == 1
        })
        .await?;
        assert_eq!(
            a.status().borrow().lease_id,
            lease,
            "same lease, rewritten in place"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn start_never_blocks_and_reports_disconnected() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        // Nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let t = Instant::now();
        let r = etcd::start(test_config(&format!("http://127.0.0.1:{port}"), P));
        r.register(registration("node-a", "127.0.0.1:1", &[]))
            .await?;
        assert!(t.elapsed() < Duration::from_millis(500));
        let s = wait_for_status(&r, SOON, "disconnected", |s| {
            s.state == RegistryState::Disconnected && s.last_error.is_some()
        })
        .await?;
        assert!(!s.registered);
        assert!(r.view().borrow().nodes.is_empty());
        r.shutdown(Duration::from_secs(1)).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn two_processes_claiming_one_name_is_a_conflict() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let first = node(&etcd.endpoint, "node-a", &[]).await?;
        wait_for_status(&first, SOON, "registered", |s| s.registered).await?;
        let second = etcd::start(test_config(&etcd.endpoint, P));
        second
            .register(registration("node-a", "127.0.0.9:1", &[]))
            .await?;
        let s = wait_for_status(&first, SOON, "conflict reported", |s| {
            !s.conflicts.is_empty()
        })
        .await?;
        assert!(s.conflicts[0].contains("/mesh/nodes/node-a"), "{s:?}");
        // No fight: the key is written once by each and then left alone.
        let mut client = etcd.client().await?;
        let rev = |resp: etcd_client::GetResponse| resp.kvs().first().map(|kv| kv.mod_revision());
        let before = rev(client.get(format!("{P}/nodes/node-a"), None).await?);
        tokio::time::sleep(Duration::from_secs(1)).await; // observation window, not a sync
        let after = rev(client.get(format!("{P}/nodes/node-a"), None).await?);
        assert_eq!(
            before, after,
            "the two processes keep overwriting each other"
        );
        // The other process leaves gracefully: its revoke deletes the key; we write ours back.
        second.shutdown(SOON).await?;
        wait_for_view(&first, SOON, "ours again", |v| {
            v.nodes
                .get("node-a")
                .is_some_and(|n| n.addr == "127.0.0.1:4433")
        })
        .await?;
        wait_for_status(&first, SOON, "conflict cleared", |s| s.conflicts.is_empty()).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn thousand_records_load_from_etcd() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let mut client = etcd.client().await?;
        let mut ops = Vec::new();
        for n in 0..100 {
            let services: Vec<String> = (0..10).map(|s| format!("svc-{s}")).collect();
            let services: Vec<(&str, u16)> = services.iter().map(|s| (s.as_str(), 80)).collect();
            let reg = registration(&format!("node-{n}"), "10.0.0.1:4433", &services);
            for (key, value) in reg.to_kvs(P)? {
                ops.push(TxnOp::put(key, value, None));
            }
        }
        for chunk in ops.chunks(100) {
            client.txn(Txn::new().and_then(chunk.to_vec())).await?;
        }
        let t = Instant::now();
        let r = etcd::start(test_config(&etcd.endpoint, P));
        let view = wait_for_view(&r, SOON, "1000 endpoints", |v| {
            v.service_record_count() == 1000
        })
        .await?;
        println!(
            "cold start with 1,100 keys (debug build): {:?}",
            t.elapsed()
        );
        assert_eq!(view.nodes.len(), 100);
        assert_eq!(view.endpoints("svc-9").count(), 100);
        assert_eq!(r.status().borrow().updates_total, 1100);
        Ok(())
    })
    .await
}
