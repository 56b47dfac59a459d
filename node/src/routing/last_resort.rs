//! Last-resort endpoints (docs/behaviour.md, Last-resort endpoints): static stability on the
//! consumer side. An endpoint whose registry record disappears while its node's QUIC connection
//! is up and the node has not said it is draining is kept for a grace (2 × the lease TTL), and
//! used only when its service has no endpoint in the view: a registrar's trouble never becomes
//! "no endpoint" while the nodes serve. A draining or down node is dropped at once; an expired
//! grace drops it too.
//!
//! Pure decision logic: what stays and until when. Time arrives as `now`; peer facts arrive as
//! a [`Liveness`] per node (the caller reads them from the peer table).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Target;

/// What the node knows of a peer's connection, as far as a last-resort endpoint cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// A connection is up and the peer has not said it is going away.
    Connected,
    /// The peer announced it is draining.
    Draining,
    /// Its connection was lost or could not be dialled.
    Down,
    /// No connection was ever seen.
    Unknown,
}

/// One held endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The endpoint as it was in the view (its registered port).
    pub target: Target,
    /// End of its grace.
    pub until: Instant,
}

/// Endpoints gone from the view but kept as a last resort, per service and node.
#[derive(Debug, Default)]
pub struct LastResort {
    grace: Duration,
    held: HashMap<String, HashMap<String, Held>>,
}

impl LastResort {
    /// Holds departed endpoints for `grace` (zero: never; the static backend).
    pub fn new(grace: Duration) -> LastResort {
        LastResort {
            grace,
            held: HashMap::new(),
        }
    }

    /// The grace.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// `target` of `service` left the view at `now`. It is held when its peer is connected and
    /// not draining; an endpoint already held keeps its first deadline (a record that flaps does
    /// not extend the grace). Returns whether it is held.
    pub fn left(&mut self, service: &str, target: Target, peer: Liveness, now: Instant) -> bool {
        if self.grace.is_zero() || peer != Liveness::Connected {
            return false;
        }
        let until = now + self.grace;
        let by_node = self.held.entry(service.to_string()).or_default();
        by_node
            .entry(target.node.clone())
            .or_insert(Held { target, until });
        true
    }

    /// `node` serves `service` in the view again: no longer a last resort.
    pub fn back(&mut self, service: &str, node: &str) {
        if let Some(by_node) = self.held.get_mut(service) {
            by_node.remove(node);
            if by_node.is_empty() {
                self.held.remove(service);
            }
        }
    }

    /// The held endpoints of `service` usable at `now`: grace not over, peer still connected
    /// and not draining.
    pub fn targets(
        &self,
        service: &str,
        now: Instant,
        peer: impl Fn(&str) -> Liveness,
    ) -> Vec<Target> {
        let Some(by_node) = self.held.get(service) else {
            return Vec::new();
        };
        let mut out: Vec<Target> = by_node
            .values()
            .filter(|h| now < h.until && peer(&h.target.node) == Liveness::Connected)
            .map(|h| h.target.clone())
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    /// Drops endpoints whose grace is over at `now` or whose peer is draining or down; returns
    /// the nodes no longer held for any service (their connections may be forgotten).
    pub fn expire(&mut self, now: Instant, peer: impl Fn(&str) -> Liveness) -> Vec<String> {
        let mut dropped = Vec::new();
        self.held.retain(|_, by_node| {
            by_node.retain(|node, h| {
                let keep = now < h.until && peer(node) == Liveness::Connected;
                if !keep {
                    dropped.push(node.clone());
                }
                keep
            });
            !by_node.is_empty()
        });
        dropped.sort();
        dropped.dedup();
        dropped.retain(|n| !self.holds_node(n));
        dropped
    }

    /// Whether `node` is held for some service.
    pub fn holds_node(&self, node: &str) -> bool {
        self.held.values().any(|by_node| by_node.contains_key(node))
    }

    /// The earliest end of a grace, if anything is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held
            .values()
            .flat_map(|by_node| by_node.values().map(|h| h.until))
            .min()
    }

    /// Every held endpoint as (service, held), sorted (for `/status`).
    pub fn all(&self) -> Vec<(String, Held)> {
        let mut out: Vec<(String, Held)> = self
            .held
            .iter()
            .flat_map(|(svc, by_node)| by_node.values().map(move |h| (svc.clone(), h.clone())))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1.target.node).cmp(&(&b.0, &b.1.target.node)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(node: &str) -> Target {
        Target {
            node: node.to_string(),
            addr: "127.0.0.1:7000".parse().unwrap_or_else(|_| unreachable!()),
            port: 8080,
            weight: 100,
        }
    }

    const GRACE: Duration = Duration::from_secs(6);

    fn all_connected(_: &str) -> Liveness {
        Liveness::Connected
    }

    #[test]
    fn connected_endpoint_is_held_for_the_grace_then_dropped() {
        let t0 = Instant::now();
        let mut lr = LastResort::new(GRACE);
        assert!(lr.left("echo", target("b"), Liveness::Connected, t0));
        assert_eq!(lr.next_expiry(), Some(t0 + GRACE));
        let just_before = t0 + GRACE - Duration::from_millis(1);
        assert_eq!(
            lr.targets("echo", just_before, all_connected),
            [target("b")]
        );
        assert!(lr.expire(just_before, all_connected).is_empty());
        assert!(lr.holds_node("b"));
        // The grace is over: gone from the targets at once, and dropped on expiry.
        assert!(lr.targets("echo", t0 + GRACE, all_connected).is_empty());
        assert_eq!(lr.expire(t0 + GRACE, all_connected), ["b"]);
        assert!(!lr.holds_node("b"));
        assert_eq!(lr.next_expiry(), None);
    }

    #[test]
    fn draining_down_or_unknown_peers_are_never_held() {
        let t0 = Instant::now();
        let mut lr = LastResort::new(GRACE);
        for p in [Liveness::Draining, Liveness::Down, Liveness::Unknown] {
            assert!(!lr.left("echo", target("b"), p, t0), "{p:?}");
        }
        assert!(lr.all().is_empty());
        // The static backend: no grace at all.
        let mut none = LastResort::new(Duration::ZERO);
        assert!(!none.left("echo", target("b"), Liveness::Connected, t0));
    }

    #[test]
    fn a_held_peer_that_drains_or_dies_vanishes_at_once() {
        let t0 = Instant::now();
        let mut lr = LastResort::new(GRACE);
        lr.left("echo", target("b"), Liveness::Connected, t0);
        lr.left("echo", target("c"), Liveness::Connected, t0);
        lr.left("other", target("c"), Liveness::Connected, t0);
        let t1 = t0 + Duration::from_secs(1);
        let peer = |n: &str| match n {
            "b" => Liveness::Draining,
            "c" => Liveness::Down,
            _ => Liveness::Connected,
        };
        assert!(lr.targets("echo", t1, peer).is_empty());
        assert!(lr.targets("other", t1, peer).is_empty());
        assert_eq!(lr.expire(t1, peer), ["b", "c"]);
        assert!(lr.all().is_empty());
    }

    #[test]
    fn back_in_the_view_ends_the_hold_and_flapping_keeps_the_first_deadline() {
        let t0 = Instant::now();
        let mut lr = LastResort::new(GRACE);
        lr.left("echo", target("b"), Liveness::Connected, t0);
        let t1 = t0 + Duration::from_secs(2);
        // Left again while held (the record flapped): the deadline stays.
        lr.left("echo", target("b"), Liveness::Connected, t1);
        assert_eq!(lr.next_expiry(), Some(t0 + GRACE));
        lr.back("echo", "b");
        assert!(lr.targets("echo", t1, all_connected).is_empty());
        assert!(!lr.holds_node("b"));
        // Left again after coming back: a fresh grace.
        lr.left("echo", target("b"), Liveness::Connected, t1);
        assert_eq!(lr.next_expiry(), Some(t1 + GRACE));
    }

    #[test]
    fn a_node_held_for_two_services_is_released_only_when_both_end() {
        let t0 = Instant::now();
        let mut lr = LastResort::new(GRACE);
        lr.left("echo", target("b"), Liveness::Connected, t0);
        let t1 = t0 + Duration::from_secs(3);
        lr.left("web", target("b"), Liveness::Connected, t1);
        assert!(
            lr.expire(t0 + GRACE, all_connected).is_empty(),
            "web still holds b"
        );
        assert!(lr.targets("echo", t0 + GRACE, all_connected).is_empty());
        assert_eq!(lr.targets("web", t0 + GRACE, all_connected), [target("b")]);
        assert_eq!(lr.expire(t1 + GRACE, all_connected), ["b"]);
    }
}
