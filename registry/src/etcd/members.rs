//! Per-member health of the etcd cluster, and the order to try members in.
//!
//! Pure (no I/O, time passed in), after etcd's Go client balancer: requests stick to one
//! member while it answers; a member that fails a request (refused connect, deadline, broken
//! stream) is set aside for a quarantine that doubles with each consecutive failure, and the
//! next request goes to a healthy member. When every member is set aside they are still
//! tried, soonest-to-return first, so a cluster that comes back is used at once.

use std::time::Duration;

use tokio::time::Instant;

/// First quarantine of a failing member; doubles per consecutive failure.
pub(crate) const QUARANTINE_MIN: Duration = Duration::from_secs(1);
/// Longest quarantine: a member that returns is tried again within about this long.
pub(crate) const QUARANTINE_MAX: Duration = Duration::from_secs(16);

#[derive(Clone, Copy, Debug, Default)]
struct Health {
    /// Consecutive failures since the last success.
    failures: u32,
    /// Set aside until then.
    bad_until: Option<Instant>,
}

/// Health of each configured member (by index into the endpoint list).
#[derive(Clone, Debug)]
pub(crate) struct Members {
    health: Vec<Health>,
    /// The member requests stick to while it answers.
    pinned: usize,
}

impl Members {
    /// `n` members, all healthy; the first one pinned.
    pub(crate) fn new(n: usize) -> Members {
        Members {
            health: vec![Health::default(); n.max(1)],
            pinned: 0,
        }
    }

    /// Whether member `i` is not set aside at `now`.
    pub(crate) fn is_healthy(&self, i: usize, now: Instant) -> bool {
        self.health
            .get(i)
            .is_some_and(|h| h.bad_until.is_none_or(|t| now >= t))
    }

    /// Every member once, in the order to try them: the pinned member if healthy, then the
    /// other healthy members (round from the pinned one), then the set-aside members,
    /// soonest-to-return first.
    pub(crate) fn order(&self, now: Instant) -> Vec<usize> {
        let n = self.health.len();
        let ring = (0..n).map(|k| (self.pinned + k) % n);
        let mut order: Vec<usize> = ring.clone().filter(|&i| self.is_healthy(i, now)).collect();
        let mut bad: Vec<usize> = ring.filter(|&i| !self.is_healthy(i, now)).collect();
        bad.sort_by_key(|&i| self.health[i].bad_until);
        order.extend(bad);
        order
    }

    /// Member `i` answered: healthy again, and requests stick to it.
    pub(crate) fn succeeded(&mut self, i: usize) {
        if let Some(h) = self.health.get_mut(i) {
            *h = Health::default();
            self.pinned = i;
        }
    }

    /// Member `i` failed at `now`: set aside for a quarantine that doubles per consecutive
    /// failure (bounded), and requests move to the next healthy member.
    pub(crate) fn failed(&mut self, i: usize, now: Instant) {
        let Some(h) = self.health.get_mut(i) else {
            return;
        };
        h.failures = h.failures.saturating_add(1);
        let doublings = h.failures.saturating_sub(1).min(16);
        let quarantine = QUARANTINE_MIN
            .saturating_mul(1 << doublings)
            .min(QUARANTINE_MAX);
        h.bad_until = Some(now + quarantine);
        if self.pinned == i {
            if let Some(&next) = self.order(now).first() {
                self.pinned = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn sticks_to_the_member_that_answers() {
        let t = Instant::now();
        let mut m = Members::new(3);
        assert_eq!(m.order(t), vec![0, 1, 2]);
        m.succeeded(2);
        assert_eq!(m.order(t), vec![2, 0, 1]);
    }

    #[test]
    fn a_failed_member_is_set_aside_then_tried_last() {
        let t = Instant::now();
        let mut m = Members::new(3);
        m.failed(0, t);
        assert!(!m.is_healthy(0, t + 999 * MS));
        assert_eq!(
            m.order(t),
            vec![1, 2, 0],
            "healthy first, the failed one last"
        );
        // Quarantine over: healthy again, but requests stay on the member that answers.
        m.succeeded(1);
        assert!(m.is_healthy(0, t + QUARANTINE_MIN));
        assert_eq!(m.order(t + QUARANTINE_MIN), vec![1, 2, 0]);
    }

    #[test]
    fn quarantine_doubles_up_to_the_cap_and_resets_on_success() {
        let t = Instant::now();
        let mut m = Members::new(2);
        for k in 0..10u32 {
            m.failed(0, t);
            let q = (QUARANTINE_MIN * 2u32.pow(k)).min(QUARANTINE_MAX);
            assert!(!m.is_healthy(0, t + q - MS), "failure {k}");
            assert!(m.is_healthy(0, t + q), "failure {k}");
        }
        m.succeeded(0);
        m.failed(0, t);
        assert!(m.is_healthy(0, t + QUARANTINE_MIN));
    }

    #[test]
    fn all_set_aside_are_tried_soonest_back_first() {
        let t = Instant::now();
        let mut m = Members::new(3);
        m.failed(1, t);
        m.failed(1, t); // 2 s
        m.failed(0, t + 500 * MS); // back at 1.5 s
        m.failed(2, t + 100 * MS); // back at 1.1 s
        assert_eq!(m.order(t + 200 * MS), vec![2, 0, 1]);
        assert_eq!(m.order(t + 1200 * MS), vec![2, 0, 1], "2 is healthy again");
    }

    #[test]
    fn unknown_indexes_are_ignored() {
        let t = Instant::now();
        let mut m = Members::new(1);
        m.failed(7, t);
        m.succeeded(7);
        assert_eq!(m.order(t), vec![0]);
        assert!(!m.is_healthy(7, t));
    }
}
