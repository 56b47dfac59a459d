//! The etcd supervisor task: one loop of sessions, each
//! connect → grant → keep-alive → write our keys → list → watch, and back-off between them.
//!
//! Every await that may take long goes through [`Supervisor::step`], which keeps serving
//! commands meanwhile: `register` is taken at once in any state, and `shutdown` interrupts
//! whatever is in flight. The published view is only ever replaced by a snapshot or by
//! watch events from a live session, never cleared on failure (static stability).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{Backoff, EtcdConfig};
use crate::handle::{
    Command, Registration, RegistryError, RegistryState, RegistryStatus, TaskEnds,
};
use crate::records::normalize_prefix;
use crate::view::MeshView;

pub(super) mod session;

/// etcd's default `--max-txn-ops` is 128; registrations larger than this are written in
/// several transactions.
const MAX_TXN_OPS: usize = 100;

/// Why the supervisor stops.
pub(super) enum Stop {
    /// `Registry::shutdown`: revoke the lease, then answer.
    Shutdown {
        timeout: Duration,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
    /// Every handle was dropped: stop without revoking (the lease expires, as for a crash).
    Dropped,
}

/// Why a session ended.
pub(super) enum End {
    Stop(Stop),
    /// Anything etcd or the network did; reconnect after back-off.
    Broken(String),
}

impl From<Stop> for End {
    fn from(stop: Stop) -> End {
        End::Stop(stop)
    }
}

/// This node's own keys: what the registration wants and what is written under the lease.
#[derive(Default)]
struct Own {
    /// Key → JSON value from the latest registration.
    desired: BTreeMap<String, Vec<u8>>,
    /// Bumped at every `register`.
    version: u64,
    /// What the current lease holds, as last written.
    written: BTreeMap<String, Vec<u8>>,
    /// `version` that `written` reflects; `None` forces a write.
    written_version: Option<u64>,
}

impl Own {
    fn needs_write(&self) -> bool {
        self.written_version != Some(self.version)
    }
}

pub(crate) struct Supervisor {
    cfg: EtcdConfig,
    /// Normalised prefix (no trailing `/`).
    prefix: String,
    commands: mpsc::Receiver<Command>,
    view_tx: watch::Sender<Arc<MeshView>>,
    status_tx: watch::Sender<RegistryStatus>,
    /// The view as of the last snapshot or event; published when its records change.
    working: MeshView,
    own: Own,
    /// Current lease (granted in the last session that got that far).
    lease: Option<i64>,
    /// Client of the last session, kept for the revoke on shutdown.
    client: Option<Client>,
    /// Invalid keys already counted and logged, with the mod revision seen.
    invalid_seen: HashMap<String, i64>,
    /// Our keys currently held under someone else's lease.
    conflicts: BTreeMap<String, i64>,
    backoff: Backoff,
    /// Consecutive failed or broken sessions (for log volume).
    failures: u64,
}

impl Supervisor {
    pub(super) fn new(cfg: EtcdConfig, ends: TaskEnds) -> Supervisor {
        Supervisor {
            prefix: normalize_prefix(&cfg.prefix),
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
            cfg,
            commands: ends.commands,
            view_tx: ends.view,
            status_tx: ends.status,
            working: MeshView::new(),
            own: Own::default(),
            lease: None,
            client: None,
            invalid_seen: HashMap::new(),
            conflicts: BTreeMap::new(),
            failures: 0,
        }
    }

    pub(super) async fn run(mut self) {
        info!(endpoints = ?self.cfg.endpoints, prefix = %self.prefix, "etcd registry starting");
        let stop = loop {
            let reason = match self.session().await {
                End::Stop(stop) => break stop,
                End::Broken(reason) => reason,
            };
            self.failures += 1;
            // Loud once per outage (and now and then while it lasts), quiet in between.
            if self.failures % 20 == 1 {
                warn!(error = %reason, failures = self.failures, "etcd session broken; keeping the last view and reconnecting");
            } else {
                debug!(error = %reason, failures = self.failures, "etcd reconnect failed");
            }
            self.update_status(|s| {
                s.state = RegistryState::Disconnected;
                s.registered = false;
                s.last_error = Some(reason);
            });
            let delay = self.backoff.next_delay();
            debug!(?delay, "etcd reconnect back-off");
            if let Err(stop) = self.step(tokio::time::sleep(delay)).await {
                break stop;
            }
        };
        match stop {
            Stop::Shutdown { timeout, reply } => {
                let result = self.revoke(timeout).await;
                match &result {
                    Ok(()) => info!("etcd registry stopped; lease revoked"),
                    Err(e) => {
                        warn!(error = %e, "etcd registry stopped; keys expire with the lease")
                    }
                }
                let _ = reply.send(result);
            }
            Stop::Dropped => {
                info!("registry handles dropped; stopping without revoke (keys expire with the lease)")
            }
        }
        self.update_status(|s| {
            s.registered = false;
            s.state = RegistryState::Disconnected;
        });
    }

    async fn session(&mut self) -> End {
        match self.try_session().await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    async fn try_session(&mut self) -> Result<Infallible, End> {
        let opts = self.cfg.connect_options().map_err(End::Broken)?;
        let endpoints = self.cfg.endpoints.clone();
        let mut client = self
            .call("connect", Client::connect(endpoints, Some(opts)))
            .await?;
        self.client = Some(client.clone());

        // Always a fresh lease: simpler than probing the old one, and moving our keys to it
        // before revoking the old lease deletes nothing that is still wanted.
        let ttl = self.cfg.lease_ttl_secs() as i64;
        let lease = self
            .call("lease grant", client.lease_grant(ttl, None))
            .await?
            .id();
        let previous = self.lease.replace(lease);
        self.own.written.clear();
        self.own.written_version = None;
        self.update_status(|s| {
            s.lease_id = Some(lease);
            s.registered = false;
        });
        let (keeper, keepalive) = self
            .call("lease keep-alive", client.lease_keep_alive(lease))
            .await?;
        self.write_registration(&mut client).await?;
        if let Some(old) = previous {
            self.revoke_in_background(&client, old);
        }
        let watch = self.resync(&mut client).await?;
        self.backoff.reset();
        self.failures = 0;
        self.update_status(|s| {
            s.state = RegistryState::Connected;
            s.last_error = None;
        });
        info!(lease = %format!("{lease:x}"), revision = self.working.revision, "etcd session established");
        self.established(client, keeper, keepalive, watch).await
    }

    /// Awaits `fut` while serving commands; a shutdown or dropped handles interrupt it.
    async fn step<F: Future>(&mut self, fut: F) -> Result<F::Output, Stop> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                cmd = self.commands.recv() => self.on_command(cmd)?,
                out = &mut fut => return Ok(out),
            }
        }
    }

    /// [`Self::step`] with the request deadline; any failure breaks the session.
    async fn call<T, E: Display>(
        &mut self,
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, End> {
        let limit = self.cfg.request_timeout;
        match self.step(tokio::time::timeout(limit, fut)).await? {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(End::Broken(format!("{what}: {e}"))),
            Err(_) => Err(End::Broken(format!("{what}: no answer within {limit:?}"))),
        }
    }

    fn on_command(&mut self, cmd: Option<Command>) -> Result<(), Stop> {
        match cmd {
            None => Err(Stop::Dropped),
            Some(Command::Shutdown { timeout, reply }) => Err(Stop::Shutdown { timeout, reply }),
            Some(Command::Register { reg, reply }) => {
                let _ = reply.send(self.set_registration(&reg));
                Ok(())
            }
        }
    }

    fn set_registration(&mut self, reg: &Registration) -> Result<(), RegistryError> {
        let desired: BTreeMap<_, _> = reg.to_kvs(&self.prefix)?.into_iter().collect();
        if desired != self.own.desired {
            info!(node = %reg.node.name, addr = %reg.node.addr, services = reg.services.len(), "registration updated");
            self.conflicts.retain(|key, _| desired.contains_key(key));
            self.own.desired = desired;
            self.own.version += 1;
        }
        Ok(())
    }

    /// Writes the registration under the current lease if it changed or was never written:
    /// puts every wanted key, deletes keys no longer wanted, in one transaction per 100 keys.
    async fn write_registration(&mut self, client: &mut Client) -> Result<(), End> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        if !self.own.needs_write() {
            return Ok(());
        }
        let version = self.own.version;
        let desired = self.own.desired.clone();
        // Only what differs from the current lease's contents: an unchanged record is not
        // rewritten, so peers see no event for it.
        let mut ops: Vec<TxnOp> = desired
            .iter()
            .filter(|(k, v)| self.own.written.get(*k) != Some(*v))
            .map(|(k, v)| {
                TxnOp::put(
                    k.as_str(),
                    v.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        ops.extend(
            self.own
                .written
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .map(|k| TxnOp::delete(k.as_str(), None)),
        );
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = Txn::new().and_then(chunk.to_vec());
            self.call("register", client.txn(txn)).await?;
        }
        debug!(keys = desired.len(), lease = %format!("{lease:x}"), "registration written");
        let registered = !desired.is_empty();
        self.own.written = desired;
        self.own.written_version = Some(version);
        self.update_status(|s| s.registered = registered);
        Ok(())
    }

    /// Lists the prefix, replaces the view with the snapshot, and opens a watch from the
    /// snapshot's revision + 1; a watch that finds that revision compacted re-lists.
    async fn resync(&mut self, client: &mut Client) -> Result<etcd_client::WatchStream, End> {
        loop {
            let list = GetOptions::new().with_prefix();
            let resp = self
                .call("list", client.get(format!("{}/", self.prefix), Some(list)))
                .await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            self.load_snapshot(resp.kvs(), revision);
            match self.open_watch(client, revision + 1).await? {
                session::Opened::Watching(stream) => return Ok(*stream),
                session::Opened::Compacted(compacted) => {
                    warn!(
                        revision,
                        compacted, "watch start revision compacted; listing again"
                    );
                }
            }
        }
    }

    /// Best-effort, bounded revoke of a lease we no longer use (its keys were moved).
    fn revoke_in_background(&self, client: &Client, lease: i64) {
        let mut client = client.clone();
        let limit = self.cfg.request_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(limit, client.lease_revoke(lease)).await {
                Ok(Ok(_)) => debug!(lease = %format!("{lease:x}"), "old lease revoked"),
                Ok(Err(e)) => {
                    debug!(lease = %format!("{lease:x}"), error = %e, "old lease not revoked")
                }
                Err(_) => debug!(lease = %format!("{lease:x}"), "old lease revoke timed out"),
            }
        });
    }

    /// Shutdown: revoke the lease (deleting our keys) within `timeout`.
    async fn revoke(&mut self, timeout: Duration) -> Result<(), RegistryError> {
        let (Some(mut client), Some(lease)) = (self.client.take(), self.lease.take()) else {
            return Ok(()); // never granted a lease: nothing of ours is in etcd
        };
        self.update_status(|s| {
            s.registered = false;
            s.lease_id = None;
        });
        match tokio::time::timeout(timeout, client.lease_revoke(lease)).await {
            Ok(Ok(_)) => Ok(()),
            // Already expired (e.g. etcd was frozen past the TTL): our keys are gone.
            Ok(Err(e)) if e.to_string().contains("lease not found") => Ok(()),
            Ok(Err(e)) => Err(RegistryError::Etcd(format!("lease revoke: {e}"))),
            Err(_) => Err(RegistryError::ShutdownTimeout(timeout)),
        }
    }

    fn update_status(&self, f: impl FnOnce(&mut RegistryStatus)) {
        self.status_tx.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    /// Publishes the working view if its records differ from the published one.
    fn publish(&self) {
        self.view_tx.send_if_modified(|current| {
            if current.same_records(&self.working) {
                false
            } else {
                *current = Arc::new(self.working.clone());
                true
            }
        });
    }
}
