//! An established session: lease keep-alives, watch events, our own keys, conflicts.

use std::convert::Infallible;

use etcd_client::{
    Client, EventType, KeyValue, LeaseKeepAliveStream, LeaseKeeper, WatchOptions, WatchResponse,
    WatchStream,
};
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::{End, Supervisor};
use crate::view::{ApplyOutcome, MeshView, Update};

/// Result of opening a watch.
pub(in crate::etcd) enum Opened {
    /// The watch is created and streaming.
    Watching(Box<WatchStream>),
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
    /// Opens the prefix watch from `from` and waits for etcd to confirm it.
    pub(super) async fn open_watch(
        &mut self,
        client: &mut Client,
        from: i64,
    ) -> Result<Opened, End> {
        let key = format!("{}/", self.prefix);
        let mut stream = self
            .call("watch", client.watch(key, Some(watch_options(from))))
            .await?;
        let Some(first) = self.call("watch create", stream.message()).await? else {
            return Err(End::Broken("watch stream closed at creation".into()));
        };
        match classify(&first) {
            WatchMsg::Compacted(rev) => Ok(Opened::Compacted(rev)),
            WatchMsg::Canceled(reason) => Err(End::Broken(reason)),
            WatchMsg::Events => {
                self.on_events(&first);
                Ok(Opened::Watching(Box::new(stream)))
            }
        }
    }

    /// Runs until the session breaks or the supervisor is told to stop.
    pub(super) async fn established(
        &mut self,
        mut client: Client,
        mut keeper: LeaseKeeper,
        mut keepalive: LeaseKeepAliveStream,
        mut watch: WatchStream,
    ) -> Result<Infallible, End> {
        let every = self.cfg.keepalive_every();
        let mut tick = interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // When the oldest unanswered keep-alive was sent. Answers are polled before the tick
        // so an answer that is already there never counts as missing.
        let mut unanswered: Option<Instant> = None;
        loop {
            self.write_registration(&mut client).await?;
            tokio::select! {
                biased;
                cmd = self.commands.recv() => self.on_command(cmd)?,
                msg = keepalive.message() => match msg {
                    Ok(Some(resp)) if resp.ttl() > 0 => unanswered = None,
                    Ok(Some(_)) => {
                        return Err(End::Broken("lease expired; granting a new one".into()))
                    }
                    Ok(None) => return Err(End::Broken("lease keep-alive stream ended".into())),
                    Err(e) => return Err(End::Broken(format!("lease keep-alive stream: {e}"))),
                },
                _ = tick.tick() => {
                    if let Some(sent) = unanswered {
                        if sent.elapsed() >= every {
                            return Err(End::Broken(format!(
                                "lease keep-alive unanswered for {:?}", sent.elapsed()
                            )));
                        }
                    }
                    keeper
                        .keep_alive()
                        .await
                        .map_err(|e| End::Broken(format!("lease keep-alive: {e}")))?;
                    unanswered.get_or_insert_with(Instant::now);
                }
                msg = watch.message() => match msg {
                    Ok(Some(resp)) => match classify(&resp) {
                        WatchMsg::Events => self.on_events(&resp),
                        WatchMsg::Compacted(compacted) => {
                            warn!(compacted, revision = self.working.revision, "watch compacted; listing again");
                            watch = self.resync(&mut client).await?;
                        }
                        WatchMsg::Canceled(reason) => return Err(End::Broken(reason)),
                    },
                    Ok(None) => return Err(End::Broken("watch stream ended".into())),
                    Err(e) => return Err(End::Broken(format!("watch stream: {e}"))),
                },
            }
        }
    }

    /// Applies one watch response's events; publishes once if the records changed.
    fn on_events(&mut self, resp: &WatchResponse) {
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let deleted = matches!(event.event_type(), EventType::Delete);
            self.check_own_key(kv, deleted);
            let value = (!deleted).then(|| kv.value());
            let mut working = std::mem::take(&mut self.working);
            if self.ingest(&mut working, kv, value) == ApplyOutcome::Applied {
                changed = true;
                self.update_status(|s| s.updates_total += 1);
            }
            working.revision = working.revision.max(kv.mod_revision());
            self.working = working;
        }
        if changed {
            debug!(revision = self.working.revision, "registry view changed");
            self.publish();
        }
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
        self.publish();
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
