//! The etcd supervisor task: one loop of sessions, each
//! lease (kept or granted) → keep-alive task → write our keys → list → watch, and back-off
//! between them.
//!
//! Every request goes through the [`Pool`], which tries the cluster's members in order of
//! health, so one dead or frozen member costs one short attempt and never a session. A
//! session only breaks when no member answers, or when etcd says the lease is gone. The
//! lease outlives sessions: a new session asks `TimeToLive` and keeps the lease while etcd
//! holds it, so the node's keys are never re-granted away by a reconnect.
//!
//! Every await that may take long goes through [`Supervisor::step`], which keeps serving
//! commands meanwhile: `register` is taken at once in any state, and `shutdown` interrupts
//! whatever is in flight. The published view is only ever replaced by a snapshot or by
//! watch events from a live session, never cleared on failure (static stability).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::keeper;
use super::lease::LeaseClock;
use super::members::Members;
use super::pool::{CallError, Pool};
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

/// Least time between two published views. A change after a quiet moment is published at
/// once; the batches of a burst that follow within this time are published together when it
/// ends. Every published view wakes the node's executor and is compared with the one before
/// (docs/registry.md, Watch and re-list): a 1,000-update burst published batch by batch made
/// ~230 views in a quarter of a second; 10 ms makes it 13-30, each at most 10 ms behind etcd,
/// against lease TTLs of seconds.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

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
    /// The lease `written` was written under; another lease starts from nothing.
    written_lease: Option<i64>,
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
    /// When a view was last published.
    published_at: Option<Instant>,
    /// `working` has changes not published yet (held back by [`PUBLISH_EVERY`]).
    unpublished: bool,
    own: Own,
    /// This node's lease: granted once, kept across sessions while etcd holds it.
    lease: Option<i64>,
    /// Health of each member, kept across sessions.
    members: Arc<Mutex<Members>>,
    /// Pool of the last session, kept for the revoke on shutdown.
    pool: Option<Pool>,
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
        let members = Arc::new(Mutex::new(Members::new(cfg.endpoints.len())));
        Supervisor {
            members,
            prefix: normalize_prefix(&cfg.prefix),
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
            cfg,
            commands: ends.commands,
            view_tx: ends.view,
            status_tx: ends.status,
            working: MeshView::new(),
            published_at: None,
            unpublished: false,
            own: Own::default(),
            lease: None,
            pool: None,
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
            // Whatever the session applied is published before the outage (static stability
            // keeps this view until the next session).
            self.flush();
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
        let pool = Pool::new(&self.cfg, self.members.clone()).map_err(End::Broken)?;
        self.pool = Some(pool.clone());
        let (lease, clock) = self.ensure_lease(&pool).await?;
        let keeper = keeper::spawn(pool.clone(), lease, clock);
        self.write_registration(&pool).await?;
        let (watch, member) = self.resync(&pool).await?;
        self.backoff.reset();
        self.failures = 0;
        self.update_status(|s| {
            s.state = RegistryState::Connected;
            s.last_error = None;
        });
        info!(lease = %format!("{lease:x}"), revision = self.working.revision, member = pool.url(member), "etcd session established");
        self.established(pool, keeper, watch, member).await
    }

    /// The lease to register under, with its clock: the current one if etcd still holds it
    /// (asked with `TimeToLive` on any member), else a new grant. A lease is remembered the
    /// moment it is granted, so an attempt that fails afterwards leaves no lease behind
    /// holding keys: the next attempt reuses it.
    async fn ensure_lease(&mut self, pool: &Pool) -> Result<(i64, LeaseClock), End> {
        let every = self.cfg.keepalive_every();
        let within = pool.attempt_timeout();
        if let Some(id) = self.lease {
            let asked = Instant::now();
            let answer = self
                .step(pool.run("lease time-to-live", |mut c| async move {
                    c.lease_time_to_live(id, None).await
                }))
                .await?;
            match answer {
                Ok((_, resp)) if resp.ttl() > 0 => {
                    debug!(lease = %format!("{id:x}"), ttl = resp.ttl(), "lease still held; keeping it");
                    let ttl = Duration::from_secs(resp.ttl().unsigned_abs());
                    return Ok((id, LeaseClock::new(asked, ttl, every, within)));
                }
                Ok(_) | Err(CallError::Refused(_)) => {
                    info!(lease = %format!("{id:x}"), "lease gone in etcd; granting a new one");
                    self.lease = None;
                }
                Err(e @ CallError::Unreachable(_)) => {
                    return Err(End::Broken(format!("lease time-to-live: {e}")))
                }
            }
        }
        let ttl = self.cfg.lease_ttl_secs() as i64;
        let asked = Instant::now();
        let (_, resp) = self
            .step(pool.run("lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            }))
            .await?
            .map_err(|e| End::Broken(format!("lease grant: {e}")))?;
        let id = resp.id();
        self.lease = Some(id);
        self.update_status(|s| {
            s.lease_id = Some(id);
            s.lease_grants += 1;
            s.registered = false;
        });
        info!(lease = %format!("{id:x}"), ttl = resp.ttl(), "lease granted");
        let granted = Duration::from_secs(resp.ttl().max(1).unsigned_abs());
        Ok((id, LeaseClock::new(asked, granted, every, within)))
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

    /// [`Self::step`] on a request through the pool; when no member answers (or etcd
    /// refuses), the session breaks. Returns the member that answered and its answer.
    async fn call<T, F, Fut>(&mut self, pool: &Pool, what: &str, op: F) -> Result<(usize, T), End>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match self.step(pool.run(what, op)).await? {
            Ok(v) => Ok(v),
            Err(e) => Err(End::Broken(format!("{what}: {e}"))),
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
    async fn write_registration(&mut self, pool: &Pool) -> Result<(), End> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        if self.own.written_lease != Some(lease) {
            self.own.written.clear();
            self.own.written_version = None;
            self.own.written_lease = Some(lease);
        }
        if !self.own.needs_write() {
            // Written under this lease in an earlier session (kept across reconnects).
            let registered = !self.own.written.is_empty();
            self.update_status(|s| s.registered = registered);
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
        // Puts and deletes are idempotent, so a write that timed out on one member and
        // is sent again to another leaves the same keys.
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn = Txn::new().and_then(chunk.to_vec());
            self.call(pool, "register", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
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
    async fn resync(&mut self, pool: &Pool) -> Result<(etcd_client::WatchStream, usize), End> {
        loop {
            let key = format!("{}/", self.prefix);
            let (_, resp) = self
                .call(pool, "list", |mut c| {
                    let key = key.clone();
                    async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
                })
                .await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            self.load_snapshot(resp.kvs(), revision);
            match self.open_watch(pool, revision + 1).await? {
                session::Opened::Watching(stream, member) => return Ok((*stream, member)),
                session::Opened::Compacted(compacted) => {
                    warn!(
                        revision,
                        compacted, "watch start revision compacted; listing again"
                    );
                }
            }
        }
    }

    /// Shutdown: revoke the lease (deleting our keys) within `timeout`.
    async fn revoke(&mut self, timeout: Duration) -> Result<(), RegistryError> {
        let (Some(pool), Some(lease)) = (self.pool.take(), self.lease.take()) else {
            return Ok(()); // never granted a lease: nothing of ours is in etcd
        };
        self.update_status(|s| {
            s.registered = false;
            s.lease_id = None;
        });
        let revoke = pool.run("lease revoke", |mut c| async move {
            c.lease_revoke(lease).await
        });
        match tokio::time::timeout(timeout, revoke).await {
            Ok(Ok(_)) => Ok(()),
            // Already expired (e.g. etcd was frozen past the TTL): our keys are gone.
            Ok(Err(CallError::Refused(e))) if e.to_string().contains("lease not found") => Ok(()),
            Ok(Err(e)) => Err(RegistryError::Etcd(format!("lease revoke: {e}"))),
            Err(_) => Err(RegistryError::ShutdownTimeout(timeout)),
        }
    }

    fn update_status(&self, f: impl FnOnce(&mut RegistryStatus)) {
        self.status_tx.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            if s.state != before.state {
                s.since = crate::handle::unix_now();
            }
            *s != before
        });
    }

    /// Publishes the working view (callers know it changed). The clone is a pointer copy:
    /// the published view shares every part of its maps with the working one until they
    /// change (docs/registry.md, Views).
    fn publish(&mut self) {
        self.view_tx.send_replace(Arc::new(self.working.clone()));
        self.published_at = Some(Instant::now());
        self.unpublished = false;
    }

    /// The working view changed: publishes it now, or when [`PUBLISH_EVERY`] since the last
    /// publication is over (the session loop waits for [`Self::publish_due`]).
    fn changed(&mut self) {
        self.unpublished = true;
        if self.publish_due().is_some_and(|due| due <= Instant::now()) {
            self.publish();
        }
    }

    /// When held-back changes are to be published; `None` when there are none.
    pub(super) fn publish_due(&self) -> Option<Instant> {
        if !self.unpublished {
            return None;
        }
        Some(
            self.published_at
                .map_or_else(Instant::now, |t| t + PUBLISH_EVERY),
        )
    }

    /// Publishes held-back changes now.
    pub(super) fn flush(&mut self) {
        if self.unpublished {
            self.publish();
        }
    }
}
