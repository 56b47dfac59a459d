//! The one table of peer health: whether each peer's connection is down, whether it said it is
//! draining, and its latest transport RTT sample. The transport's events and the reconnector
//! write it once; every service's [`Balancer`](super::Balancer) reads it (see
//! `Balancer::sync_peers`) instead of each being told separately.
//!
//! Pure data, like the rest of `balance/`: time arrives as `now`. A generation number, bumped on
//! every change, lets a balancer skip the table with one atomic load when nothing changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Balancer, Table};

/// What the node knows of one peer, whatever services it serves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerHealth {
    /// Its connection died or could not be dialled, and no new one succeeded since.
    pub down: bool,
    /// It announced it is going away.
    pub draining: bool,
    /// A connection to it was seen up (connected, answered, RTT sampled) and not lost since:
    /// what a last-resort endpoint needs (`routing::last_resort`).
    pub connected: bool,
    /// Down reports so far (each one is a fact a balancer applies once).
    pub downs: u64,
    /// Up reports so far.
    pub ups: u64,
    /// When `down` last changed or was reported again.
    pub changed_at: Option<Instant>,
    /// The latest smoothed transport RTT and when it was sampled.
    pub rtt: Option<(Duration, Instant)>,
    /// RTT samples so far.
    pub rtt_samples: u64,
}

/// Peer health of one node, shared by every balancer of that node.
#[derive(Debug, Default)]
pub struct PeerTable {
    generation: AtomicU64,
    peers: Mutex<HashMap<String, PeerHealth>>,
}

impl PeerTable {
    /// An empty table.
    pub fn new() -> PeerTable {
        PeerTable::default()
    }

    /// Changes so far; a reader that saw this number has nothing new to read.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn update<R>(&self, peer: &str, f: impl FnOnce(&mut PeerHealth) -> R) -> R {
        let mut peers = self.lock();
        let entry = match peers.get_mut(peer) {
            Some(e) => e,
            None => peers.entry(peer.to_owned()).or_default(),
        };
        let r = f(entry);
        self.generation.fetch_add(1, Ordering::Release);
        r
    }

    /// The peer is known dead (connection lost, dial failed, attempt could not connect).
    pub fn mark_down(&self, peer: &str, now: Instant) {
        self.update(peer, |p| {
            p.down = true;
            p.connected = false;
            p.downs += 1;
            p.changed_at = Some(now);
        });
    }

    /// A connection to the peer succeeded or an answer came over one: it is up again.
    /// Returns whether it was down.
    pub fn mark_up(&self, peer: &str, now: Instant) -> bool {
        if !self.lock().get(peer).is_some_and(|p| p.down) {
            return false;
        }
        self.update(peer, |p| {
            p.connected = true;
            let was = std::mem::take(&mut p.down);
            if was {
                p.ups += 1;
                p.changed_at = Some(now);
            }
            was
        })
    }

    /// A new connection to the peer: up, connected, and no longer draining.
    pub fn connected(&self, peer: &str, now: Instant) {
        self.set_draining(peer, false);
        self.mark_up(peer, now);
        if !self.lock().get(peer).is_some_and(|p| p.connected) {
            self.update(peer, |p| p.connected = true);
        }
    }

    /// The peer said it is going away (`true`) or came back (`false`).
    pub fn set_draining(&self, peer: &str, draining: bool) {
        // An unknown peer is not draining.
        if self.lock().get(peer).is_some_and(|p| p.draining) == draining {
            return;
        }
        self.update(peer, |p| p.draining = draining);
    }

    /// A smoothed transport RTT sample of the peer.
    pub fn observe_rtt(&self, peer: &str, rtt: Duration, now: Instant) {
        self.update(peer, |p| {
            // A sample comes from a live connection.
            p.connected = !p.down;
            p.rtt = Some((rtt, now));
            p.rtt_samples += 1;
        });
    }

    /// Peers marked down and not up since: what the reconnector dials.
    pub fn down_peers(&self) -> Vec<String> {
        let mut down: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, p)| p.down)
            .map(|(k, _)| k.clone())
            .collect();
        down.sort();
        down
    }

    /// What the table holds for `peer`.
    pub fn get(&self, peer: &str) -> Option<PeerHealth> {
        self.lock().get(peer).cloned()
    }

    /// Forgets peers for which `keep` is false (gone from the registry).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|k, _| keep(k));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Calls `f` for every peer, under the table's lock (keep `f` short, never re-enter).
    pub(super) fn for_each(&self, mut f: impl FnMut(&str, &PeerHealth)) {
        for (k, v) in self.lock().iter() {
            f(k, v);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, PeerHealth>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Balancer {
    /// Applies what the peer table learnt since the last look: a down peer is ejected (within
    /// the cap) as of the moment it went down, a peer up again returns, draining is copied, and
    /// the latest RTT sample feeds an estimate without fresh answers. One atomic load when
    /// nothing changed.
    pub(super) fn sync_peers(&self, table: &mut Table, force: bool) {
        let generation = self.peers.generation();
        if !force && table.peers_seen == generation {
            return;
        }
        table.peers_seen = generation;
        let cfg = &self.cfg;
        self.peers.for_each(|node, p| {
            let (downs, ups, rtts, draining, was_down) = match table.endpoints.get(node) {
                Some(ep) => (
                    ep.downs_seen,
                    ep.ups_seen,
                    ep.rtt_seen,
                    ep.draining,
                    ep.down,
                ),
                None => (0, 0, 0, false, false),
            };
            let down_news = p.downs != downs;
            let up_news = p.ups != ups;
            if !down_news && !up_news && p.rtt_samples == rtts && p.draining == draining {
                return;
            }
            let may_eject = down_news && table.may_eject(node, cfg.max_ejected_fraction);
            let ep = table.entry(node);
            ep.draining = p.draining;
            let at = p.changed_at;
            if let Some(at) = at.filter(|_| down_news) {
                ep.down = true;
                if let Some(backoff) = ep.health.on_down(at, may_eject, cfg) {
                    tracing::info!(
                        node,
                        backoff_ms = backoff.as_millis() as u64,
                        "endpoint ejected: peer down"
                    );
                }
            }
            if let Some(at) = at.filter(|_| !p.down && (was_down || down_news)) {
                ep.down = false;
                if ep.health.on_up(at) {
                    tracing::info!(node, "endpoint back: peer reachable again");
                }
            }
            if let Some((rtt, at)) = p.rtt.filter(|_| p.rtt_samples != rtts) {
                let answers_fresh = ep
                    .last_answer
                    .is_some_and(|a| at.saturating_duration_since(a) < cfg.rtt_fallback_after);
                if !answers_fresh {
                    ep.ewma.observe_smoothed(rtt, at, cfg.decay);
                }
            }
            ep.downs_seen = p.downs;
            ep.ups_seen = p.ups;
            ep.rtt_seen = p.rtt_samples;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_up_draining_and_generation() {
        let t = PeerTable::new();
        let now = Instant::now();
        let g0 = t.generation();
        t.mark_down("a", now);
        assert!(t.generation() > g0);
        assert_eq!(t.down_peers(), ["a"]);
        assert!(t.mark_up("a", now));
        assert!(!t.mark_up("a", now), "up twice is one change");
        assert!(t.down_peers().is_empty());
        let g1 = t.generation();
        t.set_draining("b", false);
        t.mark_up("zz", now);
        assert_eq!(t.generation(), g1, "no-op reports change nothing");
        t.set_draining("b", true);
        assert!(t.get("b").is_some_and(|p| p.draining));
        t.connected("b", now);
        assert!(t.get("b").is_some_and(|p| !p.draining && p.connected));
        t.mark_down("b", now);
        assert!(
            t.get("b").is_some_and(|p| !p.connected),
            "down is not connected"
        );
        t.observe_rtt("b", Duration::from_millis(1), now);
        assert!(
            t.get("b").is_some_and(|p| !p.connected),
            "a sample does not undo down"
        );
        assert!(t.mark_up("b", now));
        assert!(t.get("b").is_some_and(|p| p.connected));
        t.observe_rtt("c", Duration::from_millis(3), now);
        assert_eq!(
            t.get("c").and_then(|p| p.rtt).map(|r| r.0),
            Some(Duration::from_millis(3))
        );
        t.retain(|p| p != "c");
        assert!(t.get("c").is_none());
    }
}
