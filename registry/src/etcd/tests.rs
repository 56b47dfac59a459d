//! What the supervisor relies on in etcd's behaviour, checked against a real etcd (3.4 here).

use std::time::Duration;

use anyhow::bail;

use super::supervisor::session::{classify, watch_options, WatchMsg};
use crate::testing::EtcdProcess;

const LIMIT: Duration = Duration::from_secs(20);

/// A watch from a compacted revision is created, then cancelled with `compact_revision`:
/// the supervisor's cue to list again (docs/registry.md, Watch and re-list).
#[tokio::test]
async fn watch_from_a_compacted_revision_reports_compaction() -> anyhow::Result<()> {
    tokio::time::timeout(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let mut client = etcd.client().await?;
        for i in 0..3 {
            client.put(format!("/m/nodes/n{i}"), "x", None).await?;
        }
        let compacted = etcd.compact().await?;
        let mut stream = client.watch("/m/", Some(watch_options(2))).await?;
        loop {
            let Some(resp) = stream.message().await? else {
                bail!("watch stream ended before the compaction notice");
            };
            match classify(&resp) {
                WatchMsg::Events => assert!(resp.events().is_empty(), "{resp:?}"),
                WatchMsg::Compacted(rev) => {
                    assert_eq!(rev, compacted);
                    return Ok(());
                }
                WatchMsg::Canceled(reason) => bail!("cancelled for another reason: {reason}"),
            }
        }
    })
    .await?
}

/// A keep-alive for a lease that is gone answers TTL 0 (the cue to re-grant), and revoking
/// it again says "lease not found" (treated as success on shutdown).
#[tokio::test]
async fn revoked_lease_keepalive_answers_ttl_zero() -> anyhow::Result<()> {
    tokio::time::timeout(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let mut client = etcd.client().await?;
        let lease = client.lease_grant(5, None).await?.id();
        let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
        client.lease_revoke(lease).await?;
        keeper.keep_alive().await?;
        let Some(resp) = stream.message().await? else {
            bail!("keep-alive stream ended");
        };
        assert_eq!(resp.ttl(), 0);
        let err = client.lease_revoke(lease).await.err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("lease not found"), "{text}");
        Ok(())
    })
    .await?
}
