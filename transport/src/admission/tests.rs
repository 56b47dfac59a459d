use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::*;

fn limits() -> Limits {
    Limits {
        retry_threshold: 4,
        max_total: 6,
        max_per_source: 3,
        rate: 10,
        rate_per_source: 5,
        max_connections: 1000,
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

#[test]
fn bucket_refills_at_its_rate_and_keeps_partial_tokens() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(2, 10, Duration::from_secs(1)).full_at(t0);
    assert!(b.take(t0) && b.take(t0));
    assert!(!b.take(t0));
    // 150 ms earns one token (100 ms each) and keeps 50 ms towards the next.
    assert!(b.take(t0 + Duration::from_millis(150)));
    assert!(!b.take(t0 + Duration::from_millis(190)));
    assert!(b.take(t0 + Duration::from_millis(200)));
    // A long pause fills it to capacity, no more.
    let later = t0 + Duration::from_secs(60);
    assert!(b.is_full(later));
    assert!(b.take(later) && b.take(later) && !b.take(later));
    let mut never = TokenBucket::new(1, 0, Duration::from_secs(1)).full_at(t0);
    assert!(never.take(t0));
    assert!(!never.take(t0 + Duration::from_secs(3600)));
}

#[test]
fn below_the_threshold_attempts_are_admitted_and_permits_release_on_drop() {
    let t0 = Instant::now();
    let a = Admission::new(limits(), t0);
    let (d, p1) = a.decide(t0, ip(1), false);
    assert_eq!(d, Decision::Accept);
    let (_, p2) = a.decide(t0, ip(2), false);
    assert_eq!(a.in_progress(), 2);
    drop(p1);
    drop(p2);
    assert_eq!(a.in_progress(), 0);
}

#[test]
fn under_load_unvalidated_attempts_get_retry_and_validated_ones_proceed() {
    let t0 = Instant::now();
    let a = Admission::new(limits(), t0);
    let held: Vec<_> = (1..=4).map(|i| a.decide(t0, ip(i), false).1).collect();
    assert_eq!(a.in_progress(), 4);
    assert_eq!(a.decide(t0, ip(9), false).0, Decision::Retry);
    let (d, p) = a.decide(t0, ip(9), true);
    assert_eq!(d, Decision::Accept);
    assert!(p.is_some());
    drop(held);
}

#[test]
fn retries_have_their_own_budget_then_are_ignored() {
    let t0 = Instant::now();
    let a = Admission::new(limits(), t0);
    let _held: Vec<_> = (1..=4).map(|i| a.decide(t0, ip(i), false).1).collect();
    let budget = limits().rate * RETRY_RATE_FACTOR;
    for _ in 0..budget {
        assert_eq!(a.decide(t0, ip(50), false).0, Decision::Retry);
    }
    assert_eq!(a.decide(t0, ip(50), false).0, Decision::Ignore);
    // The budget comes back with time.
    let later = t0 + Duration::from_secs(1);
    assert_eq!(a.decide(later, ip(50), false).0, Decision::Retry);
}

#[test]
fn total_concurrency_bound_refuses_validated_and_ignores_unvalidated() {
    let t0 = Instant::now();
    let mut l = limits();
    l.retry_threshold = 100;
    let a = Admission::new(l, t0);
    let held: Vec<_> = (1..=6).map(|i| a.decide(t0, ip(i), false)).collect();
    assert!(held.iter().all(|(d, _)| *d == Decision::Accept));
    assert_eq!(a.decide(t0, ip(7), true).0, Decision::Refuse);
    assert_eq!(a.decide(t0, ip(7), false).0, Decision::Ignore);
    drop(held);
    assert_eq!(a.decide(t0, ip(7), true).0, Decision::Accept);
}

#[test]
fn per_source_concurrency_and_rate_bound_one_source_only() {
    let t0 = Instant::now();
    let mut l = limits();
    l.retry_threshold = 100;
    l.max_total = 100;
    l.rate = 100;
    let a = Admission::new(l, t0);
    let held: Vec<_> = (0..3).map(|_| a.decide(t0, ip(1), true)).collect();
    assert!(held.iter().all(|(d, _)| *d == Decision::Accept));
    assert_eq!(a.decide(t0, ip(1), true).0, Decision::Refuse);
    assert_eq!(a.decide(t0, ip(2), true).0, Decision::Accept);
    drop(held);
    // Two of its five tokens are left this second, then it is out.
    assert_eq!(a.decide(t0, ip(1), true).0, Decision::Accept);
    assert_eq!(a.decide(t0, ip(1), true).0, Decision::Accept);
    assert_eq!(a.decide(t0, ip(1), false).0, Decision::Ignore);
    // 200 ms later it has earned one more (5 per second).
    let later = t0 + Duration::from_millis(200);
    assert_eq!(a.decide(later, ip(1), true).0, Decision::Accept);
    assert_eq!(a.decide(later, ip(1), true).0, Decision::Refuse);
}

#[test]
fn total_rate_bounds_every_source_together_and_does_not_spend_source_tokens() {
    let t0 = Instant::now();
    let mut l = limits();
    l.retry_threshold = 1000;
    l.max_total = 1000;
    l.rate = 3;
    let a = Admission::new(l, t0);
    for i in 1..=3 {
        let (d, p) = a.decide(t0, ip(i), true);
        assert_eq!(d, Decision::Accept);
        drop(p);
    }
    assert_eq!(a.decide(t0, ip(4), true).0, Decision::Refuse);
    // Source 4's refused attempts did not use its own tokens: it has all five a second later.
    let later = t0 + Duration::from_secs(1);
    for _ in 0..3 {
        assert_eq!(a.decide(later, ip(4), true).0, Decision::Accept);
    }
}

#[test]
fn ipv6_sources_are_limited_by_their_64_prefix() {
    let a: IpAddr = "2001:db8:1:2:aaaa::1"
        .parse()
        .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
    let b: IpAddr = "2001:db8:1:2:bbbb::7"
        .parse()
        .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
    let c: IpAddr = "2001:db8:1:3::1"
        .parse()
        .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(source_key(a), source_key(b));
    assert_ne!(source_key(a), source_key(c));
    let mapped: IpAddr = "::ffff:10.0.0.1"
        .parse()
        .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(source_key(mapped), ip(1));
}

#[test]
fn the_source_table_is_bounded_and_swept() {
    let t0 = Instant::now();
    let mut l = limits();
    l.retry_threshold = u32::MAX;
    l.max_total = u32::MAX;
    l.rate = u32::MAX;
    let a = Admission::new(l, t0);
    for i in 0..MAX_TRACKED_SOURCES as u32 {
        let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let (d, p) = a.decide(t0, src, false);
        assert_eq!(d, Decision::Accept);
        drop(p);
    }
    assert_eq!(a.tracked_sources(), MAX_TRACKED_SOURCES);
    let new = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    // Full and not yet refilled: a new unvalidated source is ignored, a validated one admitted.
    assert_eq!(a.decide(t0, new, false).0, Decision::Ignore);
    assert_eq!(a.decide(t0, new, true).0, Decision::Accept);
    // A second later every entry's bucket is full again: the sweep frees the table.
    let later = t0 + Duration::from_secs(1);
    assert_eq!(a.decide(later, new, false).0, Decision::Accept);
    assert_eq!(a.tracked_sources(), 1);
}

#[test]
fn connections_held_are_capped_and_handshakes_count_towards_the_cap() {
    let t0 = Instant::now();
    let mut l = limits();
    l.retry_threshold = 100;
    l.max_total = 100;
    l.rate = 100;
    l.rate_per_source = 100;
    l.max_per_source = 100;
    l.max_connections = 3;
    let a = Admission::new(l, t0);
    let slots: Vec<_> = (1..=2)
        .map(|i| {
            a.decide(t0, ip(i), true)
                .1
                .map(HandshakePermit::into_connection)
        })
        .collect();
    assert_eq!((a.connections(), a.in_progress()), (2, 0));
    let (d, handshake) = a.decide(t0, ip(3), true);
    assert_eq!(d, Decision::Accept);
    // Two connections and a handshake: full. A validated caller is told, an unvalidated one
    // is asked to validate first (it comes back validated and is told then).
    assert_eq!(a.decide(t0, ip(4), true).0, Decision::Full);
    assert_eq!(a.decide(t0, ip(4), false).0, Decision::Retry);
    drop(handshake);
    assert_eq!(a.decide(t0, ip(4), true).0, Decision::Accept);
    drop(slots);
    assert_eq!(a.connections(), 0);
    assert_eq!(a.decide(t0, ip(5), true).0, Decision::Accept);
}

#[test]
fn a_trim_is_due_once_most_of_a_large_wave_has_gone_and_not_too_often() {
    let t0 = Instant::now();
    let mut l = limits();
    l.retry_threshold = u32::MAX;
    l.max_total = u32::MAX;
    l.rate = u32::MAX;
    l.rate_per_source = u32::MAX;
    l.max_per_source = u32::MAX;
    l.max_connections = u32::MAX;
    let a = Admission::new(l, t0);
    let open = |n: u32| -> Vec<ConnectionSlot> {
        (0..n)
            .filter_map(|_| a.decide(t0, ip(1), true).1)
            .map(HandshakePermit::into_connection)
            .collect()
    };
    // A small wave never trims.
    drop(open(TRIM_MIN_PEAK - 1));
    assert_eq!(a.trim_due(t0), None);
    let mut wave = open(2 * TRIM_MIN_PEAK);
    assert_eq!(a.trim_due(t0), None, "nothing has gone yet");
    wave.truncate(TRIM_MIN_PEAK as usize + 1);
    assert_eq!(a.trim_due(t0), None, "more than half still held");
    wave.truncate(TRIM_MIN_PEAK as usize);
    assert_eq!(a.trim_due(t0), Some(t0));
    wave.clear();
    assert_eq!(a.trim_due(t0), None, "one pending at a time");
    a.trim_done(t0);
    assert_eq!(a.trim_due(t0), None, "the wave was trimmed");
    // The next wave is trimmed too, but not within the interval of the last trim.
    wave.extend(open(2 * TRIM_MIN_PEAK));
    wave.clear();
    let soon = t0 + TRIM_INTERVAL / 2;
    assert_eq!(a.trim_due(soon), Some(t0 + TRIM_INTERVAL));
    a.trim_done(t0 + TRIM_INTERVAL);
    // A trim while half a wave is still held: the rest of it is a wave of its own.
    wave.extend(open(4 * TRIM_MIN_PEAK));
    wave.truncate(2 * TRIM_MIN_PEAK as usize);
    let later = t0 + 10 * TRIM_INTERVAL;
    assert_eq!(a.trim_due(later), Some(later));
    a.trim_done(later);
    wave.truncate(TRIM_MIN_PEAK as usize);
    assert_eq!(a.trim_due(later), Some(later + TRIM_INTERVAL));
}

#[test]
fn rate_limited_log_writes_a_burst_then_reports_what_it_suppressed() {
    let t0 = Instant::now();
    let log = RateLimitedLog::new(2, Duration::from_secs(10));
    assert_eq!(log.allow(t0), Some(0));
    assert_eq!(log.allow(t0), Some(0));
    for _ in 0..1000 {
        assert_eq!(log.allow(t0), None);
    }
    assert_eq!(log.allow(t0 + Duration::from_secs(5)), Some(1000));
    assert_eq!(log.allow(t0 + Duration::from_secs(5)), None);
}

#[test]
fn stats_count_each_result_once() {
    let s = HandshakeStats::default();
    s.record(HandshakeResult::Retry);
    s.record(HandshakeResult::Retry);
    s.record(HandshakeResult::Failed);
    assert_eq!(s.get(HandshakeResult::Retry), 2);
    let snap = s.snapshot();
    assert_eq!(snap[1], (HandshakeResult::Retry, 2));
    assert_eq!(snap[4], (HandshakeResult::Failed, 1));
    assert_eq!(HandshakeResult::AtCapacity.as_str(), "at_capacity");
    assert_eq!(HandshakeResult::Accepted.as_str(), "accepted");
}
