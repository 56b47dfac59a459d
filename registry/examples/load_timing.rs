//! Timing of a 1,000-endpoint mesh (100 nodes × 10 services): pure `MeshView::apply`, and a
//! cold start of the etcd backend against a real etcd (list + build + publish).
//!
//! `cargo run --release -p meshnode-registry --features testing --example load_timing`

use std::time::{Duration, Instant};

use etcd_client::{GetOptions, Txn, TxnOp};
use meshnode_registry::testing::{registration, test_config, wait_for_view, EtcdProcess};
use meshnode_registry::{etcd, MeshView, Update};

const NODES: usize = 100;
const SERVICES_PER_NODE: usize = 10;
const PREFIX: &str = "/timing";
const RUNS: usize = 20;

fn updates() -> anyhow::Result<Vec<Update>> {
    let mut out = Vec::new();
    for n in 0..NODES {
        let services: Vec<(String, u16)> = (0..SERVICES_PER_NODE)
            .map(|s| (format!("svc-{s}"), 8000 + s as u16))
            .collect();
        let services: Vec<(&str, u16)> = services.iter().map(|(s, p)| (s.as_str(), *p)).collect();
        let reg = registration(&format!("node-{n:03}"), "10.0.0.1:4433", &services);
        for (key, value) in reg.to_kvs(PREFIX)? {
            out.push(Update::Put { key, value });
        }
    }
    Ok(out)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let updates = updates()?;
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let batch = updates.clone();
        let start = Instant::now();
        let mut view = MeshView::new();
        for u in batch {
            view.apply(PREFIX, u);
        }
        runs.push(start.elapsed());
        assert_eq!(view.service_record_count(), NODES * SERVICES_PER_NODE);
    }
    println!(
        "pure apply: {} keys ({} nodes, {} service records): median {:?}, min {:?} over {RUNS} runs",
        updates.len(),
        NODES,
        NODES * SERVICES_PER_NODE,
        median(runs.clone()),
        runs.iter().min().copied().unwrap_or_default()
    );

    let etcd = EtcdProcess::start().await?;
    let mut client = etcd.client().await?;
    let ops: Vec<TxnOp> = updates
        .iter()
        .filter_map(|u| match u {
            Update::Put { key, value } => Some(TxnOp::put(key.as_str(), value.clone(), None)),
            Update::Delete { .. } => None,
        })
        .collect();
    for chunk in ops.chunks(100) {
        client.txn(Txn::new().and_then(chunk.to_vec())).await?;
    }

    let start = Instant::now();
    let resp = client
        .get(format!("{PREFIX}/"), Some(GetOptions::new().with_prefix()))
        .await?;
    let listed = start.elapsed();
    let mut view = MeshView::new();
    for kv in resp.kvs() {
        view.apply(
            PREFIX,
            Update::Put {
                key: kv.key_str()?.to_string(),
                value: kv.value().to_vec(),
            },
        );
    }
    println!(
        "etcd list of {} keys: {listed:?}; list + apply: {:?}",
        resp.kvs().len(),
        start.elapsed()
    );

    let start = Instant::now();
    let registry = etcd::start(test_config(&etcd.endpoint, PREFIX));
    wait_for_view(&registry, Duration::from_secs(10), "1000 endpoints", |v| {
        v.service_record_count() == NODES * SERVICES_PER_NODE
    })
    .await?;
    println!(
        "etcd backend cold start (connect, lease, list, build, publish, watch): {:?}",
        start.elapsed()
    );
    registry.shutdown(Duration::from_secs(2)).await?;
    Ok(())
}
