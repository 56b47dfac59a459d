//! The lease keep-alive logic as a pure state machine on explicit time.
//!
//! The lease is the node's identity: it is kept while its TTL lasts, whichever member
//! answers. A keep-alive answered late is not a lost lease: after `answer_within` the
//! keep-alive moves to another member and is sent again. Only when no answer has been seen
//! for a whole TTL is the lease in doubt, and then etcd is asked (`TimeToLive`); only an
//! answer of TTL ≤ 0 (etcd's "gone") makes [`Answer::Lost`].

use std::time::Duration;

use tokio::time::Instant;

/// What the keep-alive loop should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// Send a keep-alive now.
    Send,
    /// The pending keep-alive is unanswered past `answer_within`: move to another member
    /// and send again.
    Failover,
    /// No answer for a whole TTL: ask etcd whether the lease still exists.
    AskTtl,
    /// Nothing until then (or until an answer arrives).
    Wait(Instant),
}

/// What an answer from etcd means for the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The lease lives at least until the carried instant.
    Kept(Instant),
    /// etcd says the lease is gone (TTL ≤ 0 or not found): grant a new one.
    Lost,
}

/// Keep-alive timing of one lease.
#[derive(Clone, Debug)]
pub(crate) struct LeaseClock {
    /// Interval between keep-alives (`ttl / 3`).
    every: Duration,
    /// How long one keep-alive may go unanswered before moving to another member.
    answer_within: Duration,
    /// Lower bound of the lease's expiry: send time of the last answered request + the TTL
    /// it reported (etcd counts from later, so the real expiry is no earlier).
    expires: Instant,
    /// Send time of the oldest unanswered keep-alive.
    pending: Option<Instant>,
    /// When the next keep-alive is due.
    next_send: Instant,
}

impl LeaseClock {
    /// A lease that etcd, asked at `asked` (a grant or `TimeToLive` sent then), reported
    /// with `ttl` remaining. The first keep-alive is due at once.
    pub(crate) fn new(
        asked: Instant,
        ttl: Duration,
        every: Duration,
        answer_within: Duration,
    ) -> Self {
        LeaseClock {
            every,
            answer_within: answer_within.min(every).max(Duration::from_millis(1)),
            expires: asked + ttl,
            pending: None,
            next_send: asked,
        }
    }

    /// The lower bound of the lease's expiry.
    pub(crate) fn expires(&self) -> Instant {
        self.expires
    }

    /// What to do at `now`.
    pub(crate) fn poll(&self, now: Instant) -> Due {
        if now >= self.expires {
            return Due::AskTtl;
        }
        match self.pending {
            Some(sent) if now >= sent + self.answer_within => Due::Failover,
            Some(sent) => Due::Wait((sent + self.answer_within).min(self.expires)),
            None if now >= self.next_send => Due::Send,
            None => Due::Wait(self.next_send.min(self.expires)),
        }
    }

    /// A keep-alive was sent at `now` (the oldest unanswered one counts).
    pub(crate) fn sent(&mut self, now: Instant) {
        self.pending.get_or_insert(now);
    }

    /// The member carrying the keep-alive failed (no answer in time, stream broken): the
    /// pending keep-alive is forgotten and the next one, on another member, is due at once.
    pub(crate) fn failed_over(&mut self, now: Instant) {
        self.pending = None;
        self.next_send = now;
    }

    /// A keep-alive answer reporting `ttl_s` seconds, received at `now`.
    pub(crate) fn answered(&mut self, ttl_s: i64, now: Instant) -> Answer {
        let sent = self.pending.take().unwrap_or(now);
        self.next_send = now + self.every;
        self.confirm(ttl_s, sent)
    }

    /// A `TimeToLive` answer reporting `ttl_s` seconds, for a request sent at `asked`.
    pub(crate) fn confirm(&mut self, ttl_s: i64, asked: Instant) -> Answer {
        if ttl_s <= 0 {
            return Answer::Lost;
        }
        let ttl = Duration::from_secs(ttl_s.unsigned_abs());
        self.expires = self.expires.max(asked + ttl);
        Answer::Kept(self.expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    /// A 3 s lease: keep-alive every 1 s, answers expected within 1 s.
    fn clock(t: Instant) -> LeaseClock {
        LeaseClock::new(t, 3 * S, S, S)
    }

    #[test]
    fn kept_alive_every_third_of_the_ttl() {
        let t = Instant::now();
        let mut c = clock(t);
        assert_eq!(c.poll(t), Due::Send);
        c.sent(t);
        assert_eq!(c.poll(t + 10 * MS), Due::Wait(t + S));
        assert_eq!(c.answered(3, t + 10 * MS), Answer::Kept(t + 3 * S));
        assert_eq!(c.poll(t + 500 * MS), Due::Wait(t + 1010 * MS));
        assert_eq!(c.poll(t + 1010 * MS), Due::Send);
        c.sent(t + 1010 * MS);
        assert_eq!(
            c.answered(3, t + 1020 * MS),
            Answer::Kept(t + 4010 * MS),
            "expiry counted from the send, not the answer"
        );
    }

    #[test]
    fn a_late_answer_moves_to_another_member_and_keeps_the_lease() {
        let t = Instant::now();
        let mut c = clock(t);
        c.sent(t);
        // Unanswered for 1 s: not a lost lease, only a member to leave.
        assert_eq!(c.poll(t + S), Due::Failover);
        c.failed_over(t + S);
        assert_eq!(c.poll(t + S), Due::Send);
        c.sent(t + S);
        assert_eq!(c.answered(3, t + 1100 * MS), Answer::Kept(t + 4 * S));
        assert_eq!(c.poll(t + 1200 * MS), Due::Wait(t + 2100 * MS));
    }

    #[test]
    fn an_answer_after_a_stall_still_counts() {
        let t = Instant::now();
        let mut c = clock(t);
        c.sent(t);
        // The answer comes after 1.5 s on the same member (the loop was busy): kept.
        assert_eq!(c.answered(3, t + 1500 * MS), Answer::Kept(t + 3 * S));
        assert_eq!(c.poll(t + 1600 * MS), Due::Wait(t + 2500 * MS));
    }

    #[test]
    fn no_answer_for_a_ttl_asks_etcd_and_only_gone_is_lost() {
        let t = Instant::now();
        let mut c = clock(t);
        c.sent(t);
        c.failed_over(t + S);
        c.sent(t + S);
        c.failed_over(t + 2 * S);
        c.sent(t + 2 * S);
        assert_eq!(c.poll(t + 3 * S - MS), Due::Wait(t + 3 * S));
        assert_eq!(c.poll(t + 3 * S), Due::AskTtl);
        // etcd extended it (a new leader renews every lease): kept, keep-alives go on.
        assert_eq!(c.confirm(2, t + 3 * S), Answer::Kept(t + 5 * S));
        assert_eq!(c.poll(t + 3 * S), Due::Failover);
        c.failed_over(t + 3 * S);
        assert_eq!(c.poll(t + 3 * S), Due::Send);
        // Asked again later, etcd says gone.
        assert_eq!(c.confirm(-1, t + 6 * S), Answer::Lost);
        assert_eq!(c.answered(0, t + 6 * S), Answer::Lost);
    }

    #[test]
    fn a_reused_lease_starts_from_its_remaining_ttl() {
        let t = Instant::now();
        // TimeToLive said 1 s left: the first keep-alive is due at once.
        let mut c = LeaseClock::new(t, S, S, S);
        assert_eq!(c.poll(t), Due::Send);
        c.sent(t);
        assert_eq!(c.poll(t + 900 * MS), Due::Wait(t + S));
        assert_eq!(c.poll(t + S), Due::AskTtl);
        // A stale answer never shortens the known expiry.
        assert_eq!(c.confirm(3, t + 2 * S), Answer::Kept(t + 5 * S));
        assert_eq!(c.confirm(1, t + 2 * S), Answer::Kept(t + 5 * S));
    }
}
