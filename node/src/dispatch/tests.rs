//! The engine on constructed time and a seeded RNG: no sockets, no sleeps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::balance::{BalanceConfig, Balancer, EndpointState, RetryBudget};

fn route(budget_per_sec: u32) -> Route {
    Route {
        service: "svc".into(),
        balancer: Arc::new(Balancer::new(BalanceConfig::default())),
        budget: RetryBudget::new(0.0, budget_per_sec, Duration::from_secs(10)),
    }
}

fn targets(nodes: &[&str]) -> Vec<Target> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Target {
            node: n.to_string(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 4000 + i as u16)),
            port: 80,
            weight: 100,
        })
        .collect()
}

const MS: Duration = Duration::from_millis(1);

fn refused(status: u16, mesh: bool, unreached: bool) -> Outcome {
    Outcome::Refused {
        status,
        mesh,
        unreached,
        latency: MS,
    }
}

const GET: Request = Request {
    replayable: true,
    idempotent: true,
};
const POST_BODY: Request = Request {
    replayable: false,
    idempotent: false,
};
const POST_EMPTY: Request = Request {
    replayable: true,
    idempotent: false,
};

#[test]
fn unreachable_marks_the_peer_down_and_the_retry_goes_elsewhere() {
    let r = route(10);
    let ts = targets(&["a", "b"]);
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(7);
    let mut d = Dispatch::new(&r, Request::TUNNEL, now);
    let first = d
        .pick(&ts, now, &mut rng)
        .expect("an endpoint")
        .node
        .clone();
    assert_eq!(d.report(&first, Outcome::Unreachable, now), Decision::Retry);
    assert_eq!(r.balancer.down_nodes(), std::slice::from_ref(&first));
    let second = d.pick(&ts, now, &mut rng).expect("another").node.clone();
    assert_ne!(first, second);
    assert_eq!(
        d.report(&second, Outcome::Ok { latency: MS }, now),
        Decision::Deliver
    );
    assert_eq!(d.attempts(), 2);
}

#[test]
fn refusals_that_are_answers_are_delivered_and_do_not_eject() {
    let r = route(10);
    let ts = targets(&["a"]);
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    for status in [403, 404, 400] {
        let mut d = Dispatch::new(&r, Request::TUNNEL, now);
        let t = d.pick(&ts, now, &mut rng).expect("a").node.clone();
        assert_eq!(
            d.report(&t, refused(status, true, false), now),
            Decision::Deliver
        );
    }
    assert_eq!(r.balancer.snapshot("a", now).state, EndpointState::Healthy);
    assert_eq!(r.balancer.snapshot("a", now).failures_total, 0);
}

#[test]
fn tunnel_refusals_by_the_far_node_are_retried() {
    for status in [502, 503, 504] {
        let r = route(10);
        let ts = targets(&["a", "b"]);
        let now = Instant::now();
        let mut d = Dispatch::new(&r, Request::TUNNEL, now);
        let t = d
            .pick(&ts, now, &mut StdRng::seed_from_u64(2))
            .expect("a")
            .node
            .clone();
        assert_eq!(
            d.report(&t, refused(status, true, true), now),
            Decision::Retry,
            "{status}"
        );
        assert_eq!(r.balancer.snapshot(&t, now).failures_total, 1);
    }
}

#[test]
fn http_retry_follows_idempotency_body_and_what_the_far_node_says() {
    let now = Instant::now();
    let cases = [
        // (request, outcome, expected)
        (GET, refused(503, false, false), Decision::Retry),
        (GET, refused(502, false, false), Decision::Retry),
        (GET, refused(504, true, false), Decision::Deliver),
        (GET, refused(500, false, false), Decision::Deliver),
        (POST_EMPTY, refused(503, false, false), Decision::Deliver),
        (POST_EMPTY, refused(503, true, true), Decision::Retry),
        (POST_EMPTY, refused(502, true, true), Decision::Retry),
        (POST_BODY, refused(503, true, true), Decision::Deliver),
        (POST_BODY, refused(503, false, false), Decision::Deliver),
        (POST_BODY, Outcome::ResetBeforeSend, Decision::Retry),
        (POST_BODY, Outcome::ResetAfterSend, Decision::Deliver),
        (POST_EMPTY, Outcome::ResetAfterSend, Decision::Retry),
        (POST_EMPTY, Outcome::Timeout, Decision::Deliver),
        (GET, Outcome::Protocol { latency: MS }, Decision::Deliver),
    ];
    for (req, outcome, want) in cases {
        let r = route(10);
        let ts = targets(&["a", "b"]);
        let mut d = Dispatch::new(&r, req, now);
        let t = d
            .pick(&ts, now, &mut StdRng::seed_from_u64(3))
            .expect("a")
            .node
            .clone();
        assert_eq!(d.report(&t, outcome, now), want, "{req:?} {outcome:?}");
    }
}

#[test]
fn application_errors_do_not_count_against_the_endpoint() {
    let r = route(10);
    let ts = targets(&["a"]);
    let now = Instant::now();
    let mut d = Dispatch::new(&r, GET, now);
    let t = d
        .pick(&ts, now, &mut StdRng::seed_from_u64(4))
        .expect("a")
        .node
        .clone();
    d.report(&t, refused(503, false, false), now);
    assert_eq!(r.balancer.snapshot("a", now).failures_total, 0);
    let mut d = Dispatch::new(&r, GET, now);
    d.pick(&ts, now, &mut StdRng::seed_from_u64(4)).expect("a");
    d.report("a", refused(503, true, true), now);
    assert_eq!(r.balancer.snapshot("a", now).failures_total, 1);
}

#[test]
fn attempts_stop_at_the_maximum_and_revisit_tried_endpoints_when_all_were() {
    let r = route(100);
    let ts = targets(&["a", "b"]);
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(5);
    let mut d = Dispatch::new(&r, Request::TUNNEL, now);
    let mut seen = Vec::new();
    let mut last = Decision::Retry;
    while last == Decision::Retry {
        let t = d
            .pick(&ts, now, &mut rng)
            .expect("an endpoint")
            .node
            .clone();
        seen.push(t.clone());
        last = d.report(&t, Outcome::Timeout, now);
    }
    assert_eq!(last, Decision::Deliver);
    assert_eq!(seen.len(), MAX_ATTEMPTS);
    assert_ne!(
        seen[0], seen[1],
        "the retry goes to the other endpoint first"
    );
}

#[test]
fn the_budget_stops_retries() {
    let r = route(0);
    let ts = targets(&["a", "b"]);
    let now = Instant::now();
    let mut d = Dispatch::new(&r, Request::TUNNEL, now);
    let t = d
        .pick(&ts, now, &mut StdRng::seed_from_u64(6))
        .expect("a")
        .node
        .clone();
    assert_eq!(d.report(&t, Outcome::Timeout, now), Decision::OutOfBudget);
}

#[test]
fn no_endpoint_says_what_was_tried() {
    let r = route(10);
    let now = Instant::now();
    let mut d = Dispatch::new(&r, Request::TUNNEL, now);
    let none = d
        .pick(&[], now, &mut StdRng::seed_from_u64(8))
        .expect_err("none");
    assert!(none.tried.is_empty());
}

#[test]
fn open_deadline_follows_measured_latency_within_bounds() {
    let ceiling = Duration::from_secs(3);
    assert_eq!(open_deadline(0.0, ceiling), MIN_OPEN_DEADLINE);
    assert_eq!(open_deadline(1.0, ceiling), MIN_OPEN_DEADLINE);
    assert_eq!(open_deadline(80.0, ceiling), Duration::from_millis(800));
    assert_eq!(open_deadline(1_000.0, ceiling), ceiling);
    assert_eq!(open_deadline(f64::NAN, ceiling), MIN_OPEN_DEADLINE);
}

#[test]
fn an_endpoint_that_does_not_serve_the_port_is_left_for_one_that_does() {
    let r = route(10);
    let ts = targets(&["a", "b"]);
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(9);
    let mut d = Dispatch::new(&r, Request::TUNNEL, now);
    let first = d.pick(&ts, now, &mut rng).expect("a").node.clone();
    assert_eq!(d.report(&first, Outcome::NotServed, now), Decision::Retry);
    // The node is alive (not marked down) but this service is not served there.
    assert!(r.balancer.down_nodes().is_empty());
    assert_eq!(r.balancer.snapshot(&first, now).failures_total, 1);
    let second = d.pick(&ts, now, &mut rng).expect("b").node.clone();
    assert_ne!(first, second);
    // A request whose body is gone cannot follow it.
    let mut d = Dispatch::new(&r, POST_BODY, now);
    let t = d.pick(&ts, now, &mut rng).expect("a").node.clone();
    assert_eq!(d.report(&t, Outcome::NotServed, now), Decision::Deliver);
}
