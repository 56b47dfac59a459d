//! The data plane across a 3-member etcd cluster's faults, with real `meshnode` processes: every
//! node is given all three members; a new application connection every 10 ms from node-a to
//! `echo` on node-b and node-c. The leader is SIGKILLed and restarted, a follower is frozen
//! (SIGSTOP) for 10 s, and a node is started while the leader is down. Nothing may be seen by the
//! application: no failed connection, every node's registration in every linearizable read,
//! `/readyz` 200 throughout on every node (each keeps a quorum), and no lease re-granted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use common::cluster::*;
use common::process::*;
use common::*;
use meshnode_registry::testing::EtcdCluster;

const TTL: &str = "3s";
const PREFIX: &str = "/ha";

struct Mesh {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
}

impl Mesh {
    async fn node(&self, name: &str, body: &str) -> Result<NodeProcess> {
        let admin = free_tcp()?;
        let endpoints: Vec<String> = self
            .etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let registry = format!(
            "[registry]\nendpoints = [{}]\nprefix = \"{PREFIX}\"\nlease_ttl = \"{TTL}\"\n",
            endpoints.join(", ")
        );
        let cfg = node_config(
            self.dir.path(),
            name,
            free_udp()?,
            admin,
            &format!("{registry}{body}"),
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, cfg)?;
        let mut p = NodeProcess::start(&path, admin, &self.dir.path().join(format!("{name}.log")))?;
        p.wait_ready(Duration::from_secs(20)).await?;
        Ok(p)
    }
}

/// The registry's lease id a node reports in /status.
async fn lease_id(node: &NodeProcess) -> Result<u64> {
    let (_, body) = node.get("/status").await?;
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    doc["registry"]["lease_id"].as_u64().context("lease_id")
}

/// Watches, until stopped, what the faults must not show: a node's /readyz other than 200, a
/// registration missing from a linearizable read (asked of the members not at fault).
struct Watchers {
    stop: Arc<AtomicBool>,
    not_ready: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    missing: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watchers {
    fn start(admins: Vec<std::net::SocketAddr>, members: Vec<String>, keys: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let not_ready = Arc::new(AtomicU64::new(0));
        let (reads, missing) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        {
            let (stop, not_ready) = (stop.clone(), not_ready.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for a in &admins {
                        match http_get(*a, "/readyz").await {
                            Ok((200, _)) => {}
                            other => {
                                eprintln!("not ready: {a}: {other:?}");
                                not_ready.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        {
            let (stop, reads, missing) = (stop.clone(), reads.clone(), missing.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // One member at a time, each read with a short deadline: a dead or frozen
                    // member costs a read, not the check (etcd reads are linearizable by default).
                    for m in &members {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let read = async {
                            let opts = etcd_client::ConnectOptions::new()
                                .with_connect_timeout(Duration::from_millis(300));
                            let mut c =
                                etcd_client::Client::connect([m.as_str()], Some(opts)).await?;
                            let opts = etcd_client::GetOptions::new().with_prefix();
                            let kvs = c.get(PREFIX, Some(opts)).await?;
                            let present: Vec<String> = kvs
                                .kvs()
                                .iter()
                                .filter_map(|kv| kv.key_str().ok().map(str::to_string))
                                .collect();
                            Ok::<_, etcd_client::Error>(present)
                        };
                        if let Ok(Ok(present)) =
                            tokio::time::timeout(Duration::from_millis(700), read).await
                        {
                            reads.fetch_add(1, Ordering::Relaxed);
                            for k in &keys {
                                if !present.contains(k) {
                                    eprintln!("missing from a read via {m}: {k}");
                                    missing.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        Watchers {
            stop,
            not_ready,
            reads,
            missing,
            tasks,
        }
    }

    async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        (
            self.not_ready.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
            self.missing.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_faults_change_nothing_for_the_data_plane() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(180), async {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || pki(&path, &["node-a", "node-b", "node-c", "node-d"]))
            .await??;
        let mut mesh = Mesh {
            dir,
            etcd: EtcdCluster::start(3).await?,
        };
        let echo_b = tagged_server("B").await?;
        let echo_c = tagged_server("C").await?;
        let out = free_tcp()?;
        let a = mesh.node("node-a", &outbound(out)).await?;
        let b = mesh.node("node-b", &echo_service(echo_b)).await?;
        let c = mesh.node("node-c", &echo_service(echo_c)).await?;
        until("node-a to see both endpoints", Duration::from_secs(10), async || {
            Ok(endpoints(&a).await? == ["node-b", "node-c"])
        })
        .await?;
        let leases = [lease_id(&a).await?, lease_id(&b).await?, lease_id(&c).await?];
        let keys: Vec<String> = ["nodes/node-a", "nodes/node-b", "nodes/node-c"]
            .iter()
            .map(|k| format!("{PREFIX}/{k}"))
            .chain(["echo/node-b", "echo/node-c"].iter().map(|k| format!("{PREFIX}/services/{k}")))
            .collect();
        let traffic = Traffic::start(out, Duration::from_millis(10));
        let watch = Watchers::start(
            vec![a.admin, b.admin, c.admin],
            mesh.etcd.endpoints(),
            keys,
        );

        // 1. The leader SIGKILLed; down for 3 s (a new leader is elected meanwhile), restarted.
        let leader = mesh.etcd.leader().await?;
        eprintln!("killing etcd leader m{leader}");
        mesh.etcd.members[leader].kill();
        let new_leader = mesh.etcd.leader().await?;
        eprintln!("new leader m{new_leader}");
        // 2. A node started while the leader is down.
        let d = mesh.node("node-d", "").await?;
        tokio::time::sleep(Duration::from_secs(2)).await; // the leader stays down a while
        mesh.etcd.members[leader].restart().await?;
        eprintln!("m{leader} restarted");

        // 3. A follower frozen for 10 s (thawed on drop, also if the test fails).
        let leader = mesh.etcd.leader().await?;
        let follower = (leader + 1) % 3;
        eprintln!("freezing follower m{follower} for 10 s");
        let frozen = mesh.etcd.members[follower].freeze()?;
        tokio::time::sleep(Duration::from_secs(10)).await; // the fault under test lasts 10 s
        drop(frozen);
        tokio::time::sleep(Duration::from_secs(2)).await; // and its aftermath

        traffic.stop().await;
        let (not_ready, reads, missing) = watch.stop().await;
        let (ok, failed) = (traffic.ok.load(Ordering::Relaxed), traffic.failed.load(Ordering::Relaxed));
        let after = [lease_id(&a).await?, lease_id(&b).await?, lease_id(&c).await?];
        eprintln!(
            "connections ok {ok} failed {failed}; reads {reads}, registrations missing {missing}; \
             /readyz not 200: {not_ready}; leases before {leases:?} after {after:?}; node-d lease {}",
            lease_id(&d).await?
        );
        assert!(ok > 1000, "traffic ran: {ok}");
        assert_eq!(failed, 0, "failed application connections");
        assert!(reads > 20, "linearizable reads made: {reads}");
        assert_eq!(missing, 0, "registrations missing from linearizable reads");
        assert_eq!(not_ready, 0, "/readyz answers other than 200");
        assert_eq!(leases, after, "a lease was re-granted");
        Ok(())
    })
    .await?
}
