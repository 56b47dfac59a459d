//! A registry burst: 200 node records and 1,000 service records under the prefix, then
//! 1,000 service-record updates written as fast as etcd takes them (a rolling deploy of a
//! large mesh). The view must converge, events must be applied in batches, views published at
//! most one per 10 ms, and no batch may take long.
//!
//! Figures are printed (`cargo test -p meshnode-registry --test etcd_burst -- --nocapture`).

mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};
use meshnode_registry::testing::{registration, test_config, wait_for_view, EtcdProcess};
use meshnode_registry::{etcd, node_key, service_key, NodeRecord, Protocol, ServiceRecord};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(90);
const NODES: usize = 200;
const SERVICES_PER_NODE: usize = 5;
const UPDATES: usize = 1_000;
/// Concurrent writers of the burst.
const WRITERS: usize = 8;
/// Longest acceptable batch (apply + publish), in this crate's unoptimised test build. A
/// batch that rebuilt the whole 1,200-record view per event would exceed it.
const MAX_BATCH: Duration = Duration::from_millis(100);

fn node(i: usize) -> String {
    format!("n{i:03}")
}

fn service(i: usize, s: usize, weight: u32) -> ServiceRecord {
    ServiceRecord {
        service: format!("svc-{s}"),
        node: node(i),
        protocol: Protocol::Tcp,
        port: 8000 + s as u16,
        weight,
        zone: String::new(),
    }
}

async fn seed(client: &mut Client) -> anyhow::Result<()> {
    let mut ops = Vec::new();
    for i in 0..NODES {
        let rec = NodeRecord {
            name: node(i),
            addr: format!("127.0.0.{}:{}", 1 + i / 250, 10_000 + i),
            zone: String::new(),
            version: "test".into(),
            started_at: 0,
        };
        ops.push(TxnOp::put(
            node_key(P, &rec.name),
            serde_json::to_vec(&rec)?,
            None,
        ));
        for s in 0..SERVICES_PER_NODE {
            let rec = service(i, s, 100);
            ops.push(TxnOp::put(
                service_key(P, &rec.service, &rec.node),
                serde_json::to_vec(&rec)?,
                None,
            ));
        }
    }
    for chunk in ops.chunks(100) {
        client.txn(Txn::new().and_then(chunk.to_vec())).await?;
    }
    Ok(())
}

#[tokio::test]
async fn thousand_updates_among_1200_records_apply_in_batches() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let mut client = etcd.client().await?;
        seed(&mut client).await?;
        let r = etcd::start(test_config(&etcd.endpoint, P));
        r.register(registration("observer", "127.0.0.1:4433", &[("echo", 7)]))
            .await?;
        let total = NODES * SERVICES_PER_NODE + 1;
        wait_for_view(&r, Duration::from_secs(20), "seeded view", |v| {
            v.nodes.len() == NODES + 1 && v.service_record_count() == total
        })
        .await?;
        let before = r.status().borrow().clone();

        // Count published views during the burst.
        let views = Arc::new(AtomicU64::new(0));
        let counter = views.clone();
        let mut rx = r.view();
        rx.borrow_and_update();
        let counting = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });

        let started = Instant::now();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut client = client.clone();
            writers.push(tokio::spawn(async move {
                for k in (w..UPDATES).step_by(WRITERS) {
                    let rec = service(k / SERVICES_PER_NODE, k % SERVICES_PER_NODE, 200);
                    let key = service_key(P, &rec.service, &rec.node);
                    client.put(key, serde_json::to_vec(&rec)?, None).await?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for w in writers {
            w.await??;
        }
        let written = started.elapsed();
        wait_for_view(&r, Duration::from_secs(20), "every update applied", |v| {
            v.services
                .values()
                .flat_map(|m| m.values())
                .filter(|s| s.weight == 200)
                .count()
                == UPDATES
        })
        .await?;
        let converged = started.elapsed();
        counting.abort();
        let after = r.status().borrow().clone();
        let batches = after.batches_total - before.batches_total;
        let published = views.load(Ordering::Relaxed);
        println!(
            "burst of {UPDATES} updates among {} records: written in {written:?}, view \
             converged after {converged:?}; {batches} batches ({:.1} events each), {published} \
             views published, longest batch {} µs (before the burst: {} µs), {} updates applied",
            total + NODES + 1,
            UPDATES as f64 / batches.max(1) as f64,
            after.batch_max_us,
            before.batch_max_us,
            after.updates_total - before.updates_total
        );
        assert_eq!(after.updates_total - before.updates_total, UPDATES as u64);
        assert!(
            batches < UPDATES as u64,
            "events were not batched: {batches} batches for {UPDATES} updates"
        );
        // At most one view per 10 ms (the supervisor's publication interval), plus the first
        // one of the burst and the last one after it.
        let most = converged.as_millis() as u64 / 10 + 2;
        assert!(
            published <= most,
            "{published} views published in {converged:?}: more than one per 10 ms"
        );
        assert!(
            Duration::from_micros(after.batch_max_us) <= MAX_BATCH,
            "a batch took {} µs",
            after.batch_max_us
        );
        Ok(())
    })
    .await
}
