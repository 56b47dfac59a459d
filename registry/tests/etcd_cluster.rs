//! The etcd backend on a 3-member cluster under member faults: the leader SIGKILLed and
//! restarted, a follower SIGSTOPped for 10 s, a registry started while the leader is down,
//! and a registry that dies without revoking. What etcd survives, the registry survives:
//! every registration stays in every linearizable read, no lease is re-granted, the state
//! stays `connected`, and watches keep delivering.
//!
//! Figures are printed (`cargo test -p meshnode-registry --test etcd_cluster -- --nocapture
//! --test-threads=1`).

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use etcd_client::GetOptions;
use meshnode_registry::etcd::{self, EtcdConfig};
use meshnode_registry::testing::{
    has_node, registration, wait_for_status, wait_for_view, EtcdCluster,
};
use meshnode_registry::{node_key, service_key, Registry, RegistryState};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(90);
const TTL: Duration = Duration::from_secs(3);
/// Longest time a registry on a cluster that keeps its quorum may be anything but
/// `connected`. A session only breaks when no member answers for a whole lease TTL, which a
/// quorum never allows; 1 s leaves room for one failed round on a loaded host and is a
/// third of the TTL, so it never hides an expired lease.
const MAX_NOT_CONNECTED: Duration = Duration::from_secs(1);
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// The cluster tests start three etcd members each; one at a time on a 2-core host.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(endpoints: Vec<String>) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        prefix: P.to_string(),
        lease_ttl: TTL,
        connect_timeout: Duration::from_secs(1),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..EtcdConfig::default()
    }
}

async fn start_node(endpoints: Vec<String>, name: &str, port: u16) -> anyhow::Result<Registry> {
    let r = etcd::start(config(endpoints));
    r.register(registration(
        name,
        &format!("127.0.0.1:{port}"),
        &[("echo", 7)],
    ))
    .await?;
    Ok(r)
}

/// `endpoints` reordered so that member `first` comes first: the registries' requests
/// start on it, so the fault hits them rather than an idle member.
fn first(endpoints: &[String], first: usize) -> Vec<String> {
    let mut out = vec![endpoints[first].clone()];
    out.extend(
        endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != first)
            .map(|(_, e)| e.clone()),
    );
    out
}

async fn all_connected(rs: &[&Registry], names: &[&'static str]) -> anyhow::Result<()> {
    for r in rs {
        wait_for_status(r, Duration::from_secs(10), "connected", |s| {
            s.state == RegistryState::Connected && s.registered
        })
        .await?;
        wait_for_view(r, Duration::from_secs(10), "every node", |v| {
            names.iter().all(|n| has_node(v, n, &["echo"]))
        })
        .await?;
    }
    Ok(())
}

/// Linearizable reads of the prefix every 100 ms through the given members, counting
/// reads that failed and reads that lacked a registration.
struct Reads {
    stop: Arc<AtomicBool>,
    task: JoinHandle<anyhow::Result<ReadFigures>>,
}

#[derive(Debug, Default)]
struct ReadFigures {
    total: u64,
    failed: u64,
    missing: u64,
    first_missing: Option<String>,
}

impl Reads {
    fn start(cluster: &EtcdCluster, except: Vec<usize>, names: Vec<&'static str>) -> Reads {
        let endpoints: Vec<String> = cluster
            .endpoints()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !except.contains(i))
            .map(|(_, e)| e)
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let opts =
                etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
            let mut client = etcd_client::Client::connect(endpoints, Some(opts)).await?;
            let mut f = ReadFigures::default();
            while !flag.load(Ordering::SeqCst) {
                let next = Instant::now() + Duration::from_millis(100);
                f.total += 1;
                let read = client.get(format!("{P}/"), Some(GetOptions::new().with_prefix()));
                match tokio::time::timeout(Duration::from_secs(1), read).await {
                    Ok(Ok(resp)) => {
                        let keys: Vec<&[u8]> = resp.kvs().iter().map(|kv| kv.key()).collect();
                        let lacking = names.iter().find(|n| {
                            !keys.contains(&node_key(P, n).as_bytes())
                                || !keys.contains(&service_key(P, "echo", n).as_bytes())
                        });
                        if let Some(n) = lacking {
                            f.missing += 1;
                            f.first_missing.get_or_insert_with(|| n.to_string());
                        }
                    }
                    _ => f.failed += 1,
                }
                tokio::time::sleep_until(next).await;
            }
            Ok(f)
        });
        Reads { stop, task }
    }

    async fn finish(self) -> anyhow::Result<ReadFigures> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await?
    }
}

/// Follows a registry's status: time spent in any state but `connected`, and leases seen.
struct StatusLog {
    figures: Arc<Mutex<StatusFigures>>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default, Clone)]
struct StatusFigures {
    not_connected: Duration,
    longest: Duration,
    leases: Vec<i64>,
    grants: u64,
}

impl StatusLog {
    fn start(r: &Registry) -> StatusLog {
        let figures = Arc::new(Mutex::new(StatusFigures::default()));
        let shared = figures.clone();
        let mut rx = r.status();
        let task = tokio::spawn(async move {
            let mut down_since: Option<Instant> = None;
            loop {
                let s = rx.borrow_and_update().clone();
                let now = Instant::now();
                if let Ok(mut f) = shared.lock() {
                    if let Some(id) = s.lease_id {
                        if !f.leases.contains(&id) {
                            f.leases.push(id);
                        }
                    }
                    f.grants = s.lease_grants;
                    match (s.state == RegistryState::Connected, down_since) {
                        (false, None) => down_since = Some(now),
                        (true, Some(since)) => {
                            let d = now - since;
                            f.not_connected += d;
                            f.longest = f.longest.max(d);
                            down_since = None;
                        }
                        _ => {}
                    }
                    if let Some(since) = down_since {
                        // Counted so far, in case the log stops while down.
                        f.longest = f.longest.max(now - since);
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        StatusLog { figures, task }
    }

    fn finish(self) -> StatusFigures {
        self.task.abort();
        self.figures.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// Node `name` changes its address; every other registry must see the change.
async fn watches_deliver(rs: &[(&str, &Registry)], name: &str, port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    let Some((_, writer)) = rs.iter().find(|(n, _)| *n == name) else {
        bail!("no registry named {name}");
    };
    let addr = format!("127.0.0.1:{port}");
    writer
        .register(registration(name, &addr, &[("echo", 7)]))
        .await?;
    for (n, r) in rs {
        wait_for_view(r, SOON, &format!("{n} sees {name} at {addr}"), |v| {
            v.nodes.get(name).is_some_and(|rec| rec.addr == addr)
        })
        .await?;
    }
    println!(
        "  change by {name} seen by all within {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Checks and prints what the fault did.
fn verdict(
    fault: &str,
    reads: &ReadFigures,
    logs: Vec<(&str, StatusFigures)>,
    leases_before: &[Option<i64>],
) -> anyhow::Result<()> {
    println!(
        "{fault}: reads {} failed {} missing-a-registration {}",
        reads.total, reads.failed, reads.missing
    );
    for (i, (name, f)) in logs.iter().enumerate() {
        println!(
            "  {name}: not connected {:?} (longest {:?}), leases {:x?}, grants {}",
            f.not_connected, f.longest, f.leases, f.grants
        );
        if f.leases.len() != 1 || Some(f.leases[0]) != leases_before[i] || f.grants != 1 {
            bail!("{fault}: {name} re-granted its lease: {f:?}");
        }
        if f.longest > MAX_NOT_CONNECTED {
            bail!("{fault}: {name} was not connected for {:?}", f.longest);
        }
    }
    if reads.missing > 0 {
        bail!(
            "{fault}: {} of {} reads lacked a registration (first: {:?})",
            reads.missing,
            reads.total,
            reads.first_missing
        );
    }
    if reads.total < 20 || reads.failed * 2 > reads.total {
        bail!("{fault}: too few successful reads to judge: {reads:?}");
    }
    Ok(())
}

fn lease_ids(rs: &[&Registry]) -> Vec<Option<i64>> {
    rs.iter().map(|r| r.status().borrow().lease_id).collect()
}

#[tokio::test]
async fn leader_killed_and_restarted() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    bounded(LIMIT, async {
        let mut cluster = EtcdCluster::start(3).await?;
        let leader = cluster.leader().await?;
        let eps = first(&cluster.endpoints(), leader);
        let a = start_node(eps.clone(), "node-a", 4001).await?;
        let b = start_node(eps.clone(), "node-b", 4002).await?;
        let c = start_node(eps, "node-c", 4003).await?;
        all_connected(&[&a, &b, &c], &NODES).await?;
        let before = lease_ids(&[&a, &b, &c]);
        let logs = [&a, &b, &c].map(StatusLog::start);
        let reads = Reads::start(&cluster, vec![leader], NODES.to_vec());

        cluster.members[leader].kill();
        let killed = Instant::now();
        let new_leader = cluster.leader().await?;
        println!(
            "leader m{leader} killed; m{new_leader} elected after {:?}",
            killed.elapsed()
        );
        let named = [("node-a", &a), ("node-b", &b), ("node-c", &c)];
        watches_deliver(&named, "node-a", 4101).await?;
        // The fault lasts past the lease TTL: keep-alives must reach the other members.
        tokio::time::sleep_until(killed + TTL + Duration::from_secs(2)).await;
        cluster.members[leader].restart().await?;
        println!("m{leader} restarted {:?} after the kill", killed.elapsed());
        watches_deliver(&named, "node-b", 4102).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        let reads = reads.finish().await?;
        let logs: Vec<_> = NODES.into_iter().zip(logs.map(StatusLog::finish)).collect();
        verdict("leader SIGKILL + restart", &reads, logs, &before)
    })
    .await
}

#[tokio::test]
async fn follower_frozen_for_ten_seconds() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    bounded(LIMIT, async {
        let cluster = EtcdCluster::start(3).await?;
        let leader = cluster.leader().await?;
        let follower = (leader + 1) % 3;
        let eps = first(&cluster.endpoints(), follower);
        let a = start_node(eps.clone(), "node-a", 4001).await?;
        let b = start_node(eps.clone(), "node-b", 4002).await?;
        let c = start_node(eps, "node-c", 4003).await?;
        all_connected(&[&a, &b, &c], &NODES).await?;
        let before = lease_ids(&[&a, &b, &c]);
        let logs = [&a, &b, &c].map(StatusLog::start);
        let reads = Reads::start(&cluster, vec![follower], NODES.to_vec());

        let frozen = cluster.members[follower].freeze()?;
        let since = Instant::now();
        println!("follower m{follower} frozen (leader m{leader})");
        let named = [("node-a", &a), ("node-b", &b), ("node-c", &c)];
        watches_deliver(&named, "node-c", 4103).await?;
        tokio::time::sleep_until(since + Duration::from_secs(10)).await;
        drop(frozen);
        println!("m{follower} thawed after {:?}", since.elapsed());
        watches_deliver(&named, "node-a", 4104).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        let reads = reads.finish().await?;
        let logs: Vec<_> = NODES.into_iter().zip(logs.map(StatusLog::finish)).collect();
        verdict("follower SIGSTOP 10 s", &reads, logs, &before)
    })
    .await
}

/// A registry started while the leader is down (and listed first) registers through the
/// others; when it is dropped without revoking, as a killed process would be, its keys
/// vanish from the others' views within the lease TTL + 1 s.
#[tokio::test]
async fn started_while_the_leader_is_down_and_killed_later() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    bounded(LIMIT, async {
        let mut cluster = EtcdCluster::start(3).await?;
        let leader = cluster.leader().await?;
        let eps = first(&cluster.endpoints(), leader);
        let a = start_node(eps.clone(), "node-a", 4001).await?;
        all_connected(&[&a], &["node-a"]).await?;

        cluster.members[leader].kill();
        cluster.leader().await?;
        let started = Instant::now();
        let d = start_node(eps.clone(), "node-d", 4004).await?;
        all_connected(&[&d, &a], &["node-a", "node-d"]).await?;
        println!(
            "registry started with the leader down: connected and seen {:?} after start",
            started.elapsed()
        );
        let before = lease_ids(&[&d]);
        let log = StatusLog::start(&d);
        let reads = Reads::start(&cluster, vec![leader], vec!["node-a", "node-d"]);
        tokio::time::sleep(TTL + Duration::from_secs(1)).await;
        cluster.members[leader].restart().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let reads = reads.finish().await?;
        verdict(
            "started while the leader is down",
            &reads,
            vec![("node-d", log.finish())],
            &before,
        )?;

        drop(d);
        let dropped = Instant::now();
        wait_for_view(&a, TTL + Duration::from_secs(1), "node-d gone", |v| {
            !v.nodes.contains_key("node-d") && v.endpoints("echo").all(|(s, _)| s.node != "node-d")
        })
        .await?;
        println!(
            "dropped registry gone from the view {:?} after",
            dropped.elapsed()
        );
        Ok(())
    })
    .await
}
