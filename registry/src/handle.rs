//! The handle every backend hands out: [`Registry`], and what goes in and out of it.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::records::{node_key, service_key, NodeRecord, ServiceRecord};
use crate::view::MeshView;

/// Extra time [`Registry::shutdown`] waits for the task beyond the caller's timeout, so the
/// task's own bounded revoke can report its result instead of the caller timing out first.
const SHUTDOWN_SLACK: Duration = Duration::from_millis(200);

/// Commands are rare (start, reload, migration, stop); a small queue is plenty.
const COMMAND_QUEUE: usize = 16;

/// What this node publishes: its node record and the services it hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// This node's record (`{prefix}/nodes/{name}`).
    pub node: NodeRecord,
    /// One record per hosted service; each must name `node.name` as its node.
    pub services: Vec<ServiceRecord>,
}

impl Registration {
    /// Checks the records as other nodes will ([`MeshView::apply`]'s rules), that every
    /// service names this node, and that no service is listed twice.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let bad = RegistryError::InvalidRegistration;
        self.node.validate().map_err(bad)?;
        let mut seen = BTreeSet::new();
        for svc in &self.services {
            svc.validate().map_err(bad)?;
            if svc.node != self.node.name {
                return Err(bad(format!(
                    "service {:?} names node {:?}, this node is {:?}",
                    svc.service, svc.node, self.node.name
                )));
            }
            if !seen.insert(svc.service.as_str()) {
                return Err(bad(format!("service {:?} listed twice", svc.service)));
            }
        }
        Ok(())
    }

    /// The keys and JSON values to write under `prefix`: the node record first.
    pub fn to_kvs(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, RegistryError> {
        let json = |e: serde_json::Error| RegistryError::InvalidRegistration(e.to_string());
        let mut kvs = vec![(
            node_key(prefix, &self.node.name),
            serde_json::to_vec(&self.node).map_err(json)?,
        )];
        for svc in &self.services {
            kvs.push((
                service_key(prefix, &svc.service, &svc.node),
                serde_json::to_vec(svc).map_err(json)?,
            ));
        }
        Ok(kvs)
    }
}

/// Connection state of the registry backend, as `/status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryState {
    /// Starting: no session with the backend has been established yet.
    Connecting,
    /// A session is up: lease kept alive (when registered), view current.
    Connected,
    /// The session broke; reconnecting. The last view stays in use (static stability).
    Disconnected,
}

impl fmt::Display for RegistryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegistryState::Connecting => "connecting",
            RegistryState::Connected => "connected",
            RegistryState::Disconnected => "disconnected",
        })
    }
}

/// Health and counters of a registry backend, for `/status` and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegistryStatus {
    /// `"etcd"`, `"static"` or `"memory"`.
    pub backend: &'static str,
    /// Connection state.
    pub state: RegistryState,
    /// Current etcd lease, if one is granted.
    pub lease_id: Option<i64>,
    /// Lease TTL in seconds (0 for backends without leases).
    pub lease_ttl_s: u64,
    /// Our keys are written under a live lease (or the backend holds them).
    pub registered: bool,
    /// Record changes applied to the view (meshnode_registry_updates_total).
    pub updates_total: u64,
    /// Records under the prefix that did not parse or match their key, each counted once.
    pub invalid_records_total: u64,
    /// Human-readable conflicts, e.g. another process writing our node name.
    pub conflicts: Vec<String>,
    /// The last error that broke or prevented a session, for operators.
    pub last_error: Option<String>,
    /// When `state` last changed, Unix seconds.
    pub since: u64,
    /// Leases granted by this backend so far: 1 after the first session; each more is a
    /// lease etcd reported gone (the node's keys were re-written under a new one).
    pub lease_grants: u64,
    /// Batches of watch events applied (each published as one new view).
    pub batches_total: u64,
    /// Longest time one batch took to apply and publish, microseconds.
    pub batch_max_us: u64,
}

impl RegistryStatus {
    pub(crate) fn new(backend: &'static str, state: RegistryState) -> RegistryStatus {
        RegistryStatus {
            backend,
            state,
            lease_id: None,
            lease_ttl_s: 0,
            registered: false,
            updates_total: 0,
            invalid_records_total: 0,
            conflicts: Vec::new(),
            last_error: None,
            since: unix_now(),
            lease_grants: 0,
            batches_total: 0,
            batch_max_us: 0,
        }
    }
}

/// Now, in Unix seconds (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Errors of [`Registry`] operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registration breaks a record rule; nothing was taken.
    #[error("invalid registration: {0}")]
    InvalidRegistration(String),
    /// Another live member of an in-process mesh already uses this node name.
    #[error("node name {0:?} is already registered in this mesh")]
    NameTaken(String),
    /// The backend task has stopped (after shutdown); nothing was taken.
    #[error("the registry has been shut down")]
    Stopped,
    /// Shutdown did not finish within its timeout; keys expire with the lease instead.
    #[error("registry shutdown did not finish within {0:?}")]
    ShutdownTimeout(Duration),
    /// etcd refused or failed a request that the caller waits for (e.g. the revoke on shutdown).
    #[error("etcd: {0}")]
    Etcd(String),
}

/// A message from a [`Registry`] handle to its backend task.
#[derive(Debug)]
pub(crate) enum Command {
    Register {
        reg: Registration,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
    Shutdown {
        timeout: Duration,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
}

/// The task side of a [`Registry`]: where a backend reads commands and publishes state.
pub(crate) struct TaskEnds {
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) view: watch::Sender<Arc<MeshView>>,
    pub(crate) status: watch::Sender<RegistryStatus>,
}

/// Cheap to clone handle to a running backend task.
///
/// Dropping every clone without [`Registry::shutdown`] stops the task without deleting
/// anything: etcd keys expire with the lease, as for a crashed process (the in-process
/// backend removes them at once, which is its lease expiry).
#[derive(Clone)]
pub struct Registry {
    commands: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<MeshView>>,
    status: watch::Receiver<RegistryStatus>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A handle and the task ends for a backend; the view starts as `initial`.
    pub(crate) fn channel(initial: MeshView, status: RegistryStatus) -> (Registry, TaskEnds) {
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (view_tx, view_rx) = watch::channel(Arc::new(initial));
        let (status_tx, status_rx) = watch::channel(status);
        let handle = Registry {
            commands: cmd_tx,
            view: view_rx,
            status: status_rx,
        };
        let ends = TaskEnds {
            commands: cmd_rx,
            view: view_tx,
            status: status_tx,
        };
        (handle, ends)
    }

    /// A handle whose view comes from a channel shared with other handles (in-process mesh).
    pub(crate) fn with_view(
        view: watch::Receiver<Arc<MeshView>>,
        status: RegistryStatus,
    ) -> (
        Registry,
        mpsc::Receiver<Command>,
        watch::Sender<RegistryStatus>,
    ) {
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (status_tx, status_rx) = watch::channel(status);
        let handle = Registry {
            commands: cmd_tx,
            view,
            status: status_rx,
        };
        (handle, cmd_rx, status_tx)
    }

    /// The mesh as this node sees it. Always holds a value (empty at first) and is only
    /// replaced when the records change; while the backend is unreachable it keeps the last
    /// known view.
    pub fn view(&self) -> watch::Receiver<Arc<MeshView>> {
        self.view.clone()
    }

    /// Backend health and counters.
    pub fn status(&self) -> watch::Receiver<RegistryStatus> {
        self.status.clone()
    }

    /// Sets (or replaces) this node's registration. Returns once the backend has taken it;
    /// the backend writes it as soon as it can and again after every re-grant. Calling again
    /// with a changed `node.addr` rewrites the node record (connection migration).
    pub async fn register(&self, reg: Registration) -> Result<(), RegistryError> {
        reg.validate()?;
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Register { reg, reply })
            .await
            .map_err(|_| RegistryError::Stopped)?;
        rx.await.map_err(|_| RegistryError::Stopped)?
    }

    /// Graceful shutdown: deletes our keys (etcd: revokes the lease) within `timeout`, then
    /// stops the task. Idempotent: later calls return `Ok(())`.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), RegistryError> {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown { timeout, reply })
            .await
            .is_err()
        {
            return Ok(()); // the task is gone: already shut down
        }
        match tokio::time::timeout(timeout + SHUTDOWN_SLACK, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Ok(()), // the task stopped before reading our request
            Err(_) => Err(RegistryError::ShutdownTimeout(timeout)),
        }
    }
}
