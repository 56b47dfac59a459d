//! A throw-away multi-member etcd cluster on loopback: distinct client and peer ports and
//! data directories, one `--initial-cluster`.

use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;

use super::etcd_process::{free_port, EtcdProcess};

/// How long a cluster may take to elect a leader.
const ELECTION_DEADLINE: Duration = Duration::from_secs(20);
/// Raft timing of the cluster members (ms): heartbeat, election timeout. Shorter than
/// etcd's 100/1000 so that a failover test is quick, long enough for a loaded 2-core host
/// not to trigger spurious elections.
const TIMING: (u32, u32) = (50, 500);

/// A real etcd cluster of several member processes. Every member is killed on drop.
pub struct EtcdCluster {
    /// The members; `members[i].endpoint` is its client URL.
    pub members: Vec<EtcdProcess>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each reports healthy (a leader is elected).
    pub async fn start(n: usize) -> anyhow::Result<EtcdCluster> {
        let mut ports = Vec::new();
        while ports.len() < 2 * n {
            let p = free_port()?;
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("m{i}");
            members.push(EtcdProcess::new(
                &name,
                ports[2 * i],
                ports[2 * i + 1],
                initial.clone(),
                TIMING,
            )?);
        }
        let mut cluster = EtcdCluster { members };
        for m in &mut cluster.members {
            m.spawn()?;
        }
        for m in &mut cluster.members {
            m.wait_ready().await?;
        }
        Ok(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint.clone()).collect()
    }

    /// Index of the current leader, as the running members report it (each asked over
    /// the maintenance `Status` call), waiting up to 20 s for an election.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + ELECTION_DEADLINE;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if !m.is_running() {
                    continue;
                }
                if let Ok((id, leader)) = member_status(&m.endpoint).await {
                    if leader != 0 && id == leader {
                        return Ok(i);
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("no etcd leader within {ELECTION_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of the running members other than `except` (for reads during a fault).
    pub async fn client_except(&self, except: &[usize]) -> anyhow::Result<Client> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, m)| !except.contains(i) && m.is_running())
            .map(|(_, m)| m.endpoint.clone())
            .collect();
        if endpoints.is_empty() {
            bail!("no member left to ask");
        }
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
        let connect = Client::connect(endpoints, Some(opts));
        Ok(tokio::time::timeout(Duration::from_secs(5), connect).await??)
    }
}

/// `(member id, leader id)` as the member at `endpoint` reports them.
async fn member_status(endpoint: &str) -> anyhow::Result<(u64, u64)> {
    let work = async {
        let mut client = Client::connect([endpoint], None).await?;
        let status = client.status().await?;
        let id = status.header().map_or(0, |h| h.member_id());
        Ok::<_, etcd_client::Error>((id, status.leader()))
    };
    tokio::time::timeout(Duration::from_millis(500), work)
        .await
        .context("status: no answer")?
        .map_err(Into::into)
}
