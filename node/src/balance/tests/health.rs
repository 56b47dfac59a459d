//! Health scenarios: ejection, back-off, probes, the ejection cap, draining, the fallback
//! when nothing is healthy, and the exclude list.

use super::*;

#[test]
fn ejection_backoff_and_probe_cycle() {
    let bal = Balancer::new(BalanceConfig::default());
    let ab = ["a", "b"];
    let t0 = Instant::now();
    known(&bal, &ab, t0);
    bal.record_failure("a", t0);
    bal.record_failure("a", t0);
    assert_eq!(bal.snapshot("a", t0).state, EndpointState::Healthy);
    bal.record_failure("a", t0);
    assert_eq!(bal.snapshot("a", t0).state, EndpointState::Ejected);
    assert!(picks(&bal, &ab, &[], t0 + ms(999), 100)
        .iter()
        .all(|n| n == "b"));

    // Back-off over: exactly one probe, then nothing more until it reports.
    let t1 = t0 + ms(1_000);
    assert_eq!(picks(&bal, &ab, &[], t1, 1), ["a"]);
    assert!(picks(&bal, &ab, &[], t1 + ms(500), 100)
        .iter()
        .all(|n| n == "b"));

    // The probe fails: ejected for twice as long, then probed again.
    bal.record_failure("a", t1 + ms(500));
    let t2 = t1 + ms(500) + ms(2_000);
    assert!(picks(&bal, &ab, &[], t2 - ms(1), 100)
        .iter()
        .all(|n| n == "b"));
    assert_eq!(picks(&bal, &ab, &[], t2, 1), ["a"]);

    // The probe succeeds: healthy again and back in the rotation.
    bal.record_success("a", ms(1), t2 + ms(1));
    let snap = bal.snapshot("a", t2 + ms(1));
    assert_eq!(
        (snap.state, snap.ejections_total, snap.failures_total),
        (EndpointState::Healthy, 2, 4)
    );
    let after = picks(&bal, &ab, &[], t2 + ms(2), 200);
    assert!(after.iter().filter(|n| *n == "a").count() > 50);
}

#[test]
fn repeated_probe_failures_double_the_backoff_up_to_the_cap() {
    let bal = Balancer::new(BalanceConfig::default());
    let ab = ["a", "b"];
    let mut now = Instant::now();
    known(&bal, &ab, now);
    for _ in 0..3 {
        bal.record_failure("a", now);
    }
    let mut seen = Vec::new();
    for expected in [1, 2, 4, 8, 16, 30, 30] {
        let until = now + Duration::from_secs(expected);
        assert!(picks(&bal, &ab, &[], until - ms(1), 20)
            .iter()
            .all(|n| n == "b"));
        assert_eq!(
            picks(&bal, &ab, &[], until, 1),
            ["a"],
            "probe due after {expected} s"
        );
        seen.push(expected);
        now = until;
        bal.record_failure("a", now);
    }
    assert_eq!(
        bal.snapshot("a", now).ejections_total,
        seen.len() as u64 + 1
    );
}

#[test]
fn never_more_than_half_ejected() {
    for (n, max_out) in [(2, 1), (3, 1), (4, 2), (5, 2)] {
        let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let nodes: Vec<&str> = names.iter().map(String::as_str).collect();
        let bal = Balancer::new(BalanceConfig::default());
        let t0 = Instant::now();
        known(&bal, &nodes, t0);
        for _ in 0..10 {
            for node in &nodes {
                bal.record_failure(node, t0);
            }
        }
        let out = nodes
            .iter()
            .filter(|n| bal.snapshot(n, t0).state == EndpointState::Ejected)
            .count();
        assert_eq!(out, max_out, "{n} endpoints all failing");
    }
}

#[test]
fn mark_down_ejects_at_once_within_the_cap() {
    let bal = Balancer::new(BalanceConfig::default());
    let ab = ["a", "b"];
    let t0 = Instant::now();
    known(&bal, &ab, t0);
    bal.mark_down("a", t0);
    bal.mark_down("b", t0);
    assert_eq!(bal.snapshot("a", t0).state, EndpointState::Ejected);
    assert_eq!(
        bal.snapshot("b", t0).state,
        EndpointState::Healthy,
        "the half rule still applies"
    );
    // a is not probed with a request while down, however long its back-off has run: b gets
    // everything until a new connection to a succeeds (`mark_up`).
    let t1 = t0 + ms(5_000);
    assert_eq!(picks(&bal, &ab, &[], t1, 20), vec!["b"; 20]);
    bal.mark_up("a", t1);
    assert_eq!(bal.snapshot("a", t1).state, EndpointState::Healthy);
    // b, still armed, goes at its very next failure.
    bal.record_failure("b", t1);
    assert_eq!(bal.snapshot("b", t1).state, EndpointState::Ejected);
}

#[test]
fn mark_up_returns_only_down_endpoints_and_an_answer_clears_down() {
    let bal = Balancer::new(BalanceConfig::default());
    let abc = ["a", "b", "c"];
    let t0 = Instant::now();
    known(&bal, &abc, t0);
    // Ejected for failed answers, not down: a new connection proves nothing about them.
    for _ in 0..3 {
        bal.record_failure("a", t0);
    }
    assert_eq!(bal.snapshot("a", t0).state, EndpointState::Ejected);
    bal.mark_up("a", t0);
    assert_eq!(bal.snapshot("a", t0).state, EndpointState::Ejected);
    // Down while the cap kept it in service: still picked, and an answer clears "down".
    bal.mark_down("b", t0);
    assert_eq!(bal.snapshot("b", t0).state, EndpointState::Healthy);
    assert_eq!(bal.down_nodes(), ["b"]);
    bal.record_success("b", ms(1), t0);
    assert!(bal.down_nodes().is_empty());
    // mark_up of an unknown node is harmless.
    bal.mark_up("zz", t0);
    assert_eq!(bal.snapshot("zz", t0).state, EndpointState::Healthy);
}

#[test]
fn all_out_falls_back_to_the_least_bad_and_exclude_is_honoured() {
    let bal = Balancer::new(BalanceConfig::default());
    let all = ["a", "b", "c", "d"];
    let t0 = Instant::now();
    known(&bal, &all, t0);
    bal.mark_down("b", t0);
    bal.mark_down("a", t0 + ms(10));
    bal.set_draining("c", true);
    bal.set_draining("d", true);
    let now = t0 + ms(20);
    assert_eq!(
        picks(&bal, &all, &[], now, 20),
        vec!["b"; 20],
        "ejected longest ago"
    );
    assert_eq!(picks(&bal, &all, &["b"], now, 20), vec!["a"; 20]);
    let last = picks(&bal, &all, &["a", "b"], now, 20);
    assert!(
        last.iter().all(|n| n == "c" || n == "d"),
        "draining only as a last resort"
    );
    assert_eq!(
        bal.pick(&cands(&all), &all, now, &mut StdRng::seed_from_u64(1)),
        None
    );
    assert_eq!(bal.pick(&[], &[], now, &mut StdRng::seed_from_u64(1)), None);
}

#[test]
fn exclude_list_is_honoured_among_healthy() {
    let bal = Balancer::new(BalanceConfig::default());
    let abc = ["a", "b", "c"];
    let got = picks(&bal, &abc, &["a"], Instant::now(), 500);
    assert!(got.iter().all(|n| n != "a"));
    assert!(got.iter().any(|n| n == "b") && got.iter().any(|n| n == "c"));
}

#[test]
fn draining_endpoints_are_skipped_while_others_exist() {
    let bal = Balancer::new(BalanceConfig::default());
    let abc = ["a", "b", "c"];
    let t0 = Instant::now();
    bal.set_draining("b", true);
    assert_eq!(bal.snapshot("b", t0).state, EndpointState::Draining);
    assert!(picks(&bal, &abc, &[], t0, 1_000).iter().all(|n| n != "b"));
    assert_eq!(
        picks(&bal, &["b"], &[], t0, 1),
        ["b"],
        "a draining endpoint beats none"
    );
    bal.set_draining("b", false);
    assert!(picks(&bal, &abc, &[], t0, 1_000).iter().any(|n| n == "b"));
}

#[test]
fn retain_drops_state_of_departed_endpoints() {
    let bal = Balancer::new(BalanceConfig::default());
    let t0 = Instant::now();
    known(&bal, &["a", "b"], t0);
    bal.mark_down("a", t0);
    bal.observe_rtt("a", ms(40), t0);
    bal.retain(|n| n != "a");
    let fresh = bal.snapshot("a", t0);
    assert_eq!(fresh.state, EndpointState::Healthy);
    assert_eq!((fresh.ewma_ms, fresh.ejections_total), (1.0, 0));
}

#[test]
fn cap_counts_the_service_endpoints_not_every_peer_seen() {
    let bal = Balancer::new(BalanceConfig::default());
    let ab = ["a", "b"];
    let t0 = Instant::now();
    // RTT samples arrive for every peer of the node, whatever service it serves.
    for peer in ["a", "b", "c", "d", "e", "f"] {
        bal.observe_rtt(peer, ms(1), t0);
    }
    known(&bal, &ab, t0);
    for _ in 0..5 {
        bal.record_failure("a", t0);
        bal.record_failure("b", t0);
    }
    let out = ab
        .iter()
        .filter(|n| bal.snapshot(n, t0).state == EndpointState::Ejected)
        .count();
    assert_eq!(out, 1);

    // The service grows to four endpoints: now a second one may go.
    let abcd = ["a", "b", "c", "d"];
    known(&bal, &abcd, t0);
    bal.record_failure("b", t0);
    assert_eq!(bal.snapshot("b", t0).state, EndpointState::Ejected);
    bal.record_failure("c", t0);
    bal.record_failure("c", t0);
    bal.record_failure("c", t0);
    assert_eq!(bal.snapshot("c", t0).state, EndpointState::Healthy);
}
