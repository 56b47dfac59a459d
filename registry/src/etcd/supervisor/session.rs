//! An established session: lease reports, watch events (moved to another member when
//! theirs fails), our own keys, conflicts.

use std::convert::Infallible;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions, WatchResponse, WatchStream};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{End, Supervisor};
use crate::etcd::keeper::{Keeper, LeaseReport};
use crate::etcd::pool::Pool;
use crate::etcd::Backoff;
use crate::view::{ApplyOutcome, MeshView, Update};

/// How often the watch's member health is looked at: a member that failed another request
/// (e.g. the lease keep-alive timed out on it) loses the watch too, before its HTTP/2
/// keep-alive notices.
const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// Pause between rounds of a watch or write that no member took, growing to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// What `WatchStream::message` yields.
type WatchMessage = Result<Option<WatchResponse>, etcd_client::Error>;

/// Polls `fut` once: its output if it is ready now, without waiting.
fn now_or_never<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Result of opening a watch.
pub(in crate::etcd) enum Opened {
    /// The watch is created and streaming on the member.
    Watching(Box<WatchStream>, usize),
    /// The start revision is compacted (carries etcd's compact revision): list again.
    Compacted(i64),
}

/// What a watch response means to the supervisor.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::etcd) enum WatchMsg {
    /// Events to apply (possibly none: creation, progress notification).
    Events,
    /// The watcher fell behind a compaction: list again and watch from the new snapshot.
    Compacted(i64),
    /// Cancelled for another reason: the session is broken.
    Canceled(String),
}

/// Watch options for the whole prefix from `from`, with progress notifications.
pub(in crate::etcd) fn watch_options(from: i64) -> WatchOptions {
    WatchOptions::new()
        .with_prefix()
        .with_start_revision(from)
        .with_progress_notify()
}

/// Classifies a watch response.
pub(in crate::etcd) fn classify(resp: &WatchResponse) -> WatchMsg {
    if !resp.canceled() {
        WatchMsg::Events
    } else if resp.compact_revision() > 0 {
        WatchMsg::Compacted(resp.compact_revision())
    } else {
        WatchMsg::Canceled(format!("watch cancelled: {:?}", resp.cancel_reason()))
    }
}

impl Supervisor {
    /// Opens the prefix watch from `from` on a member that answers, and waits for etcd to
    /// confirm it.
    pub(super) async fn open_watch(&mut self, pool: &Pool, from: i64) -> Result<Opened, End> {
        let key = format!("{}/", self.prefix);
        let (member, (stream, first)) = self
            .call(pool, "watch", |mut c| {
                let key = key.clone();
                async move {
                    let mut stream = c.watch(key, Some(watch_options(from))).await?;
                    let first = stream.message().await?;
                    Ok((stream, first))
                }
            })
            .await?;
        let Some(first) = first else {
            pool.failed(member, "watch stream closed at creation");
            return Err(End::Broken("watch stream closed at creation".into()));
        };
        match classify(&first) {
            WatchMsg::Compacted(rev) => Ok(Opened::Compacted(rev)),
            WatchMsg::Canceled(reason) => Err(End::Broken(reason)),
            WatchMsg::Events => {
                self.on_events(&first);
                Ok(Opened::Watching(Box::new(stream), member))
            }
        }
    }

    /// Moves the watch to another member, from the revision after the last one seen (no
    /// event is lost or applied twice); lists again if that revision is compacted. While
    /// the lease is kept, a round in which no member takes the watch (an election in
    /// progress) is retried for up to one lease TTL before the session breaks.
    async fn rewatch(&mut self, pool: &Pool) -> Result<(WatchStream, usize), End> {
        self.flush(); // what was applied is not held back while the watch moves
        let give_up = Instant::now() + self.cfg.lease_ttl.max(crate::etcd::MIN_LEASE_TTL);
        let mut retry = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            match self.rewatch_once(pool).await {
                Err(End::Broken(why)) if Instant::now() < give_up => {
                    debug!(error = %why, "watch: no member took it yet; retrying");
                    self.step(tokio::time::sleep(retry.next_delay())).await?;
                }
                other => return other,
            }
        }
    }

    async fn rewatch_once(&mut self, pool: &Pool) -> Result<(WatchStream, usize), End> {
        match self.open_watch(pool, self.working.revision + 1).await? {
            Opened::Watching(stream, member) => {
                info!(
                    member = pool.url(member),
                    revision = self.working.revision,
                    "watch moved to another etcd member"
                );
                Ok((*stream, member))
            }
            Opened::Compacted(compacted) => {
                warn!(
                    compacted,
                    revision = self.working.revision,
                    "watch compacted; listing again"
                );
                self.resync(pool).await
            }
        }
    }

    /// Runs until the session breaks or the supervisor is told to stop.
    pub(super) async fn established(
        &mut self,
        pool: Pool,
        keeper: Keeper,
        mut watch: WatchStream,
        mut member: usize,
    ) -> Result<Infallible, End> {
        let mut reports = keeper.reports.clone();
        let mut health = interval(HEALTH_CHECK);
        health.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // A write no member takes (an election in progress) is retried while the lease is
        // kept, for up to one TTL, instead of breaking the session.
        let mut write_retry = Backoff::new(RETRY_MIN, RETRY_MAX);
        let mut write_failing_since: Option<Instant> = None;
        loop {
            match self.write_registration(&pool).await {
                Ok(()) => {
                    write_failing_since = None;
                    write_retry.reset();
                }
                Err(End::Broken(why)) => {
                    let since = *write_failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.cfg.lease_ttl.max(crate::etcd::MIN_LEASE_TTL) {
                        return Err(End::Broken(why));
                    }
                    debug!(error = %why, "register: no member took the write yet; retrying");
                    self.step(tokio::time::sleep(write_retry.next_delay()))
                        .await?;
                    continue;
                }
                Err(stop) => return Err(stop),
            }
            let publish_due = self.publish_due();
            tokio::select! {
                biased;
                cmd = self.commands.recv() => self.on_command(cmd)?,
                changed = reports.changed() => {
                    if changed.is_err() {
                        return Err(End::Broken("lease keeper stopped".into()));
                    }
                    let report = reports.borrow_and_update().clone();
                    match report {
                        LeaseReport::Alive(_) => {}
                        LeaseReport::Lost => {
                            self.lease = None;
                            return Err(End::Broken("lease expired in etcd; granting a new one".into()));
                        }
                        LeaseReport::InDoubt(why) => return Err(End::Broken(why)),
                    }
                }
                // While a view is held back, the watch is not read: what etcd sends meanwhile
                // waits in the stream and is applied in one batch when the view is due, just
                // before it is published (a burst costs one wake-up per publication, not one
                // per watch response).
                _ = tokio::time::sleep_until(publish_due.unwrap_or_else(Instant::now)),
                    if publish_due.is_some() =>
                {
                    let queued = now_or_never(watch.message());
                    let leftover = queued.and_then(|msg| self.apply_batch(msg, &mut watch));
                    self.flush();
                    if let Some(msg) = leftover {
                        (watch, member) = self.on_leftover(&pool, msg, watch, member).await?;
                    }
                }
                msg = watch.message(), if publish_due.is_none() => {
                    if let Some(msg) = self.apply_batch(msg, &mut watch) {
                        (watch, member) = self.on_leftover(&pool, msg, watch, member).await?;
                    }
                }
                _ = health.tick() => {
                    if !pool.is_healthy(member) {
                        (watch, member) = self.rewatch(&pool).await?;
                    }
                }
            }
        }
    }

    /// Handles a watch message that is not events (what [`Self::apply_batch`] leaves): lists
    /// again after a compaction, moves the watch to another member when it failed. Returns
    /// the watch to go on with.
    async fn on_leftover(
        &mut self,
        pool: &Pool,
        msg: WatchMessage,
        watch: WatchStream,
        member: usize,
    ) -> Result<(WatchStream, usize), End> {
        let failure = match msg {
            Ok(Some(resp)) => match classify(&resp) {
                WatchMsg::Events => None, // taken by apply_batch
                WatchMsg::Compacted(compacted) => {
                    warn!(
                        compacted,
                        revision = self.working.revision,
                        "watch compacted; listing again"
                    );
                    return self.resync(pool).await;
                }
                WatchMsg::Canceled(reason) => Some(reason),
            },
            Ok(None) => Some("watch stream ended".to_string()),
            Err(e) => Some(format!("watch stream: {e}")),
        };
        match failure {
            Some(why) => {
                pool.failed(member, &why);
                self.rewatch(pool).await
            }
            None => Ok((watch, member)),
        }
    }

    /// Applies one watch response's events; publishes once if the records changed.
    fn on_events(&mut self, resp: &WatchResponse) {
        let started = Instant::now();
        let applied = self.apply_events(resp);
        self.finish_batch(applied, resp.events().len(), started);
    }

    /// Applies a batch: `first`, then every response already queued on `watch` (taken
    /// without waiting), into the working view; publishes once for the whole batch. Work is
    /// proportional to the events (and a view clone that shares untouched services). Returns
    /// the first message that is not events (an error, the end, a cancel), to be handled
    /// by the caller.
    fn apply_batch(
        &mut self,
        first: WatchMessage,
        watch: &mut WatchStream,
    ) -> Option<WatchMessage> {
        let started = Instant::now();
        let mut applied = 0;
        let mut events = 0;
        let mut msg = first;
        let leftover = loop {
            match msg {
                Ok(Some(resp)) if classify(&resp) == WatchMsg::Events => {
                    applied += self.apply_events(&resp);
                    events += resp.events().len();
                    match now_or_never(watch.message()) {
                        Some(next) => msg = next,
                        None => break None,
                    }
                }
                other => break Some(other),
            }
        };
        self.finish_batch(applied, events, started);
        leftover
    }

    /// Counts a batch of `applied` changes out of `events` events, then publishes it (now, or
    /// with the batches that follow within `PUBLISH_EVERY`).
    fn finish_batch(&mut self, applied: u64, events: usize, started: Instant) {
        let took = started.elapsed();
        if events > 0 {
            debug!(
                events,
                applied,
                revision = self.working.revision,
                ?took,
                "registry batch applied"
            );
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.update_status(|s| {
            s.updates_total += applied;
            if events > 0 {
                s.batches_total += 1;
                s.batch_max_us = s.batch_max_us.max(micros);
            }
        });
        // Counted before it is published: whoever sees the view sees its changes counted.
        if applied > 0 {
            self.changed();
        }
    }

    /// Applies one watch response's events to the working view; returns how many changed
    /// it. Progress notifications move the revision on.
    fn apply_events(&mut self, resp: &WatchResponse) -> u64 {
        let mut changed = 0;
        if resp.events().is_empty() && !resp.created() {
            // A progress notification: every event up to its header revision was sent.
            if let Some(h) = resp.header() {
                self.working.revision = self.working.revision.max(h.revision());
            }
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let deleted = matches!(event.event_type(), EventType::Delete);
            self.check_own_key(kv, deleted);
            let value = (!deleted).then(|| kv.value());
            let mut working = std::mem::take(&mut self.working);
            if self.ingest(&mut working, kv, value) == ApplyOutcome::Applied {
                changed += 1;
            }
            working.revision = working.revision.max(kv.mod_revision());
            self.working = working;
        }
        changed
    }

    /// Replaces the view with a snapshot taken at `revision`.
    pub(super) fn load_snapshot(&mut self, kvs: &[KeyValue], revision: i64) {
        let mut fresh = MeshView {
            revision,
            ..MeshView::default()
        };
        for kv in kvs {
            if let ApplyOutcome::Invalid(_) = self.ingest(&mut fresh, kv, Some(kv.value())) {
                // An earlier good value stays, as it does for a bad watch event.
                if let Ok(key) = std::str::from_utf8(kv.key()) {
                    fresh.keep_from(&self.prefix, key, &self.working);
                }
            }
            self.check_own_key(kv, false);
        }
        let missing: Vec<String> = self
            .own
            .written
            .keys()
            .filter(|key| !kvs.iter().any(|kv| kv.key() == key.as_bytes()))
            .cloned()
            .collect();
        for key in missing {
            warn!(key = %key, "our key is missing from the snapshot; writing it again");
            self.own.written.remove(&key);
            self.own.written_version = None;
        }
        self.invalid_seen
            .retain(|key, _| kvs.iter().any(|kv| kv.key() == key.as_bytes()));
        let changes = fresh.changes_from(&self.working);
        self.working = fresh;
        self.update_status(|s| s.updates_total += changes);
        debug!(
            revision,
            records = kvs.len(),
            changes,
            "registry snapshot loaded"
        );
        // The snapshot replaced the working view, held-back changes included.
        if changes > 0 || self.unpublished {
            self.publish();
        }
    }

    /// Applies one key to `view`, counting and logging an invalid value once per revision.
    fn ingest(&mut self, view: &mut MeshView, kv: &KeyValue, value: Option<&[u8]>) -> ApplyOutcome {
        let Ok(key) = std::str::from_utf8(kv.key()) else {
            return ApplyOutcome::Ignored;
        };
        let update = match value {
            Some(value) => Update::Put {
                key: key.to_string(),
                value: value.to_vec(),
            },
            None => Update::Delete {
                key: key.to_string(),
            },
        };
        let outcome = view.apply(&self.prefix, update);
        match &outcome {
            ApplyOutcome::Invalid(reason) => {
                if self.invalid_seen.insert(key.to_string(), kv.mod_revision())
                    != Some(kv.mod_revision())
                {
                    warn!(key, reason = %reason, "skipping invalid registry record");
                    self.update_status(|s| s.invalid_records_total += 1);
                }
            }
            _ => {
                self.invalid_seen.remove(key);
            }
        }
        outcome
    }

    /// Watches over our own keys: another lease writing them is a conflict (reported, not
    /// fought over); someone deleting them makes us write them again once.
    fn check_own_key(&mut self, kv: &KeyValue, deleted: bool) {
        let Ok(key) = std::str::from_utf8(kv.key()) else {
            return;
        };
        if !self.own.desired.contains_key(key) {
            return;
        }
        if deleted {
            self.conflicts.remove(key);
            if self.own.written.remove(key).is_some() {
                warn!(key, "our key was deleted by someone else; writing it again");
                self.own.written_version = None;
            }
        } else if Some(kv.lease()) == self.lease {
            self.conflicts.remove(key);
        } else if self.conflicts.insert(key.to_string(), kv.lease()) != Some(kv.lease()) {
            warn!(
                key,
                lease = %format!("{:x}", kv.lease()),
                "another process writes our key (same node name?); not overwriting it"
            );
        }
        let ours = self.lease.unwrap_or(0);
        let list: Vec<String> = self
            .conflicts
            .iter()
            .map(|(key, lease)| {
                format!(
                    "{key} is held by lease {lease:x}, not ours ({ours:x}): another process uses this node name"
                )
            })
            .collect();
        self.update_status(|s| s.conflicts = list);
    }
}
