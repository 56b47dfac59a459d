//! Test helpers (cargo feature `testing`): a real etcd process, a TCP proxy that can cut the
//! path to it, registration builders and condition waits with deadlines.
//!
//! Used by this crate's tests and meant for the node crate's tests too:
//! `meshnode-registry = { workspace = true, features = ["testing"] }` in `[dev-dependencies]`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

use crate::etcd::EtcdConfig;
use crate::handle::{Registration, Registry, RegistryStatus};
use crate::records::{NodeRecord, Protocol, ServiceRecord, DEFAULT_WEIGHT};
use crate::view::MeshView;

mod etcd_cluster;
mod etcd_process;
mod proxy;

pub use etcd_cluster::EtcdCluster;
pub use etcd_process::{EtcdProcess, Frozen};
pub use proxy::TcpProxy;

/// A registration for node `name` at `addr` hosting `services` as `(name, port)` TCP services.
pub fn registration(name: &str, addr: &str, services: &[(&str, u16)]) -> Registration {
    Registration {
        node: NodeRecord {
            name: name.to_string(),
            addr: addr.to_string(),
            zone: String::new(),
            version: "test".to_string(),
            started_at: 0,
        },
        services: services
            .iter()
            .map(|(service, port)| ServiceRecord {
                service: service.to_string(),
                node: name.to_string(),
                protocol: Protocol::Tcp,
                port: *port,
                weight: DEFAULT_WEIGHT,
                zone: String::new(),
            })
            .collect(),
    }
}

/// An etcd backend config for tests: 2 s lease, fast requests and reconnects.
pub fn test_config(endpoint: &str, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        prefix: prefix.to_string(),
        lease_ttl: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..EtcdConfig::default()
    }
}

/// Waits until `pred` holds for `registry`'s view, at most `within`. Wakes on view changes
/// only (no polling); the error names `what` and shows the last view.
pub async fn wait_for_view(
    registry: &Registry,
    within: Duration,
    what: &str,
    pred: impl Fn(&MeshView) -> bool,
) -> anyhow::Result<Arc<MeshView>> {
    let deadline = Instant::now() + within;
    let mut rx = registry.view();
    loop {
        let current = rx.borrow_and_update().clone();
        if pred(&current) {
            return Ok(current);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("{what}: registry stopped; last view {current:?}"),
            Err(_) => bail!("{what}: not within {within:?}; last view {current:?}"),
        }
    }
}

/// Waits until `pred` holds for `registry`'s status, at most `within`.
pub async fn wait_for_status(
    registry: &Registry,
    within: Duration,
    what: &str,
    pred: impl Fn(&RegistryStatus) -> bool,
) -> anyhow::Result<RegistryStatus> {
    let deadline = Instant::now() + within;
    let mut rx = registry.status();
    loop {
        let current = rx.borrow_and_update().clone();
        if pred(&current) {
            return Ok(current);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("{what}: registry stopped; last status {current:?}"),
            Err(_) => bail!("{what}: not within {within:?}; last status {current:?}"),
        }
    }
}

/// Whether `view` holds node `name` and, for each of `services`, an endpoint on it.
pub fn has_node(view: &MeshView, name: &str, services: &[&str]) -> bool {
    view.nodes.contains_key(name)
        && services
            .iter()
            .all(|s| view.endpoints(s).any(|(svc, _)| svc.node == name))
}

/// Sends `signal` to process `pid` (a process the test started).
#[allow(unsafe_code)]
pub fn signal_pid(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        bail!("pid {pid} out of range");
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid is that of
    // a child this test started and has not reaped.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}
