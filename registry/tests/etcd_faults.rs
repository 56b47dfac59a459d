//! The etcd backend under faults: etcd killed and restarted, frozen past the TTL,
//! compacted, and partitioned from one node. The view must never be emptied meanwhile.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_registry::testing::{
    has_node, registration, wait_for_status, wait_for_view, EtcdProcess, TcpProxy,
};
use meshnode_registry::{MeshView, Registry, RegistryState};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(40);

fn both(v: &MeshView) -> bool {
    has_node(v, "node-a", &["echo"]) && has_node(v, "node-b", &["echo"])
}

/// Records whether a registry's published view ever lost a node while armed: static
/// stability says an unreachable etcd never empties or shrinks the view.
struct ViewGuard {
    shrank: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl ViewGuard {
    fn arm(r: &Registry, must_hold: &'static [&'static str]) -> ViewGuard {
        let shrank = Arc::new(AtomicBool::new(false));
        let flag = shrank.clone();
        let mut rx = r.view();
        let task = tokio::spawn(async move {
            loop {
                let view = rx.borrow_and_update().clone();
                if must_hold.iter().any(|n| !view.nodes.contains_key(*n)) {
                    flag.store(true, Ordering::SeqCst);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        ViewGuard { shrank, task }
    }

    fn held(self) -> bool {
        self.task.abort();
        !self.shrank.load(Ordering::SeqCst)
    }
}

async fn disconnected(r: &Registry, within: Duration) -> anyhow::Result<()> {
    wait_for_status(r, within, "disconnected", |s| {
        s.state == RegistryState::Disconnected
    })
    .await
    .map(|_| ())
}

async fn recovered(r: &Registry, within: Duration) -> anyhow::Result<()> {
    wait_for_status(r, within, "connected and registered", |s| {
        s.state == RegistryState::Connected && s.registered
    })
    .await?;
    wait_for_view(r, within, "both nodes", both)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn etcd_killed_and_restarted() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let mut etcd = EtcdProcess::start().await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7)]).await?;
        let b = node(&etcd.endpoint, "node-b", &[("echo", 7)]).await?;
        for r in [&a, &b] {
            recovered(r, SOON).await?;
        }
        let guards = [&a, &b].map(|r| ViewGuard::arm(r, &["node-a", "node-b"]));

        etcd.kill();
        for r in [&a, &b] {
            disconnected(r, SOON).await?;
            assert!(both(&r.view().borrow()), "static stability: last view kept");
        }
        etcd.restart().await?;
        let back = Instant::now();
        for r in [&a, &b] {
            recovered(r, SOON).await?;
        }
        println!(
            "both re-registered and consistent {:?} after etcd returned",
            back.elapsed()
        );
        for g in guards {
            assert!(g.held(), "a view lost a node while etcd restarted");
        }
        // The new watch works: a change still propagates.
        a.register(registration("node-a", "127.0.0.1:9999", &[("echo", 7)]))
            .await?;
        wait_for_view(&b, SOON, "a's new addr", |v| {
            v.nodes
                .get("node-a")
                .is_some_and(|n| n.addr == "127.0.0.1:9999")
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn etcd_frozen_past_the_ttl() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7)]).await?;
        let b = node(&etcd.endpoint, "node-b", &[("echo", 7)]).await?;
        for r in [&a, &b] {
            recovered(r, SOON).await?;
        }
        let guards = [&a, &b].map(|r| ViewGuard::arm(r, &["node-a", "node-b"]));

        etcd.pause()?;
        let frozen = Instant::now();
        for r in [&a, &b] {
            disconnected(r, SOON).await?;
        }
        println!("frozen etcd noticed after {:?}", frozen.elapsed());
        // Stay frozen past the 2 s TTL (the fault's length, not a synchronisation).
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(frozen.elapsed())).await;
        for r in [&a, &b] {
            assert!(both(&r.view().borrow()), "static stability: last view kept");
            assert_eq!(r.status().borrow().state, RegistryState::Disconnected);
        }
        for g in guards {
            assert!(g.held(), "a view lost a node while etcd was frozen");
        }

        etcd.resume()?;
        let thawed = Instant::now();
        for r in [&a, &b] {
            recovered(r, Duration::from_secs(8)).await?;
        }
        println!("consistent again {:?} after SIGCONT", thawed.elapsed());
        b.register(registration("node-b", "127.0.0.1:7777", &[("echo", 7)]))
            .await?;
        wait_for_view(&a, SOON, "b's new addr", |v| {
            v.nodes
                .get("node-b")
                .is_some_and(|n| n.addr == "127.0.0.1:7777")
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn compaction_while_watching() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7)]).await?;
        let b = node(&etcd.endpoint, "node-b", &[("echo", 7)]).await?;
        wait_for_view(&b, SOON, "both", both).await?;
        for port in 1..=5u16 {
            a.register(registration(
                "node-a",
                &format!("127.0.0.1:{port}"),
                &[("echo", 7)],
            ))
            .await?;
        }
        wait_for_view(&b, SOON, "5th addr", |v| {
            v.nodes["node-a"].addr == "127.0.0.1:5"
        })
        .await?;
        etcd.compact().await?;
        a.register(registration(
            "node-a",
            "127.0.0.1:6",
            &[("echo", 7), ("web", 80)],
        ))
        .await?;
        wait_for_view(&b, SOON, "update after compaction", |v| {
            v.nodes["node-a"].addr == "127.0.0.1:6" && has_node(v, "node-a", &["web"])
        })
        .await?;
        assert_eq!(b.status().borrow().state, RegistryState::Connected);
        Ok(())
    })
    .await
}

/// b loses etcd (a proxy cut) while the mesh changes and etcd compacts past b's last
/// revision; b keeps its view meanwhile, then re-lists and ends up exactly current.
#[tokio::test]
async fn partition_during_changes_and_compaction() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let proxy = TcpProxy::start(&etcd.endpoint).await?;
        let a = node(&etcd.endpoint, "node-a", &[("echo", 7)]).await?;
        let c = node(&etcd.endpoint, "node-c", &[("echo", 7)]).await?;
        let b = node(&proxy.endpoint, "node-b", &[("echo", 7)]).await?;
        for r in [&a, &b, &c] {
            wait_for_status(r, SOON, "connected", |s| {
                s.state == RegistryState::Connected
            })
            .await?;
        }
        wait_for_view(&b, SOON, "all three", |v| v.nodes.len() == 3).await?;
        let before = b.view().borrow().clone();

        proxy.cut();
        disconnected(&b, SOON).await?;
        a.register(registration(
            "node-a",
            "127.0.0.1:4433",
            &[("echo", 7), ("web", 80)],
        ))
        .await?;
        wait_for_view(&a, SOON, "a's web", |v| has_node(v, "node-a", &["web"])).await?;
        c.shutdown(SOON).await?;
        wait_for_view(&a, SOON, "c gone", |v| !v.nodes.contains_key("node-c")).await?;
        etcd.compact().await?;
        assert!(
            b.view().borrow().same_records(&before),
            "b's view kept while cut off"
        );

        proxy.restore();
        recovered(&b, SOON).await?;
        let view = wait_for_view(&b, SOON, "current after re-list", |v| {
            has_node(v, "node-a", &["echo", "web"]) && !v.nodes.contains_key("node-c")
        })
        .await?;
        assert!(view.revision > before.revision);
        // a sees b again (b re-granted if its lease expired during the cut).
        wait_for_view(&a, SOON, "b back", both).await?;
        Ok(())
    })
    .await
}
