//! Pure tests of [`MeshView::apply`]: no etcd, no runtime.

use super::*;
use crate::records::{node_key, service_key, Protocol};

const P: &str = "/mesh";

fn node(name: &str, addr: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        addr: addr.into(),
        zone: "z1".into(),
        version: "0.1.0".into(),
        started_at: 1,
    }
}

fn svc(service: &str, node: &str, port: u16) -> ServiceRecord {
    ServiceRecord {
        service: service.into(),
        node: node.into(),
        protocol: Protocol::Tcp,
        port,
        weight: 100,
        zone: String::new(),
    }
}

fn put_node(view: &mut MeshView, rec: &NodeRecord) -> ApplyOutcome {
    let value = serde_json::to_vec(rec).expect("serialise");
    view.apply(
        P,
        Update::Put {
            key: node_key(P, &rec.name),
            value,
        },
    )
}

fn put_svc(view: &mut MeshView, rec: &ServiceRecord) -> ApplyOutcome {
    let value = serde_json::to_vec(rec).expect("serialise");
    view.apply(
        P,
        Update::Put {
            key: service_key(P, &rec.service, &rec.node),
            value,
        },
    )
}

fn put_raw(view: &mut MeshView, key: &str, value: &str) -> ApplyOutcome {
    view.apply(
        P,
        Update::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        },
    )
}

fn del(view: &mut MeshView, key: &str) -> ApplyOutcome {
    view.apply(P, Update::Delete { key: key.into() })
}

fn endpoint_nodes(view: &MeshView, service: &str) -> Vec<String> {
    view.endpoints(service)
        .map(|(s, n)| format!("{}@{}", s.node, n.addr))
        .collect()
}

#[test]
fn node_and_service_make_an_endpoint() {
    let mut v = MeshView::new();
    assert_eq!(
        put_node(&mut v, &node("a", "10.0.0.1:4433")),
        ApplyOutcome::Applied
    );
    assert_eq!(
        put_svc(&mut v, &svc("orders", "a", 80)),
        ApplyOutcome::Applied
    );
    assert_eq!(endpoint_nodes(&v, "orders"), ["a@10.0.0.1:4433"]);
    assert_eq!(endpoint_nodes(&v, "missing"), Vec::<String>::new());
    assert_eq!(v.service_record_count(), 1);
}

#[test]
fn endpoint_without_node_record_is_not_routable() {
    let mut v = MeshView::new();
    assert_eq!(
        put_svc(&mut v, &svc("orders", "b", 80)),
        ApplyOutcome::Applied
    );
    assert!(endpoint_nodes(&v, "orders").is_empty());
    put_node(&mut v, &node("b", "[::1]:4433"));
    assert_eq!(endpoint_nodes(&v, "orders"), ["b@[::1]:4433"]);
}

#[test]
fn same_value_again_is_unchanged() {
    let mut v = MeshView::new();
    put_node(&mut v, &node("a", "10.0.0.1:1"));
    put_svc(&mut v, &svc("s", "a", 1));
    assert_eq!(
        put_node(&mut v, &node("a", "10.0.0.1:1")),
        ApplyOutcome::Unchanged
    );
    assert_eq!(put_svc(&mut v, &svc("s", "a", 1)), ApplyOutcome::Unchanged);
    assert_eq!(
        put_node(&mut v, &node("a", "10.0.0.2:1")),
        ApplyOutcome::Applied
    );
    assert_eq!(v.nodes["a"].addr, "10.0.0.2:1");
}

#[test]
fn garbage_is_invalid_and_keeps_the_earlier_value() {
    let mut v = MeshView::new();
    put_node(&mut v, &node("a", "10.0.0.1:1"));
    put_svc(&mut v, &svc("s", "a", 1));
    let before = v.clone();
    let cases = [
        (node_key(P, "a"), "not json"),
        (node_key(P, "a"), r#"{"name":"a"}"#),
        (node_key(P, "a"), r#"{"name":"a","addr":"nowhere"}"#),
        (node_key(P, "a"), r#"{"name":"b","addr":"10.0.0.1:1"}"#),
        (node_key(P, "A"), r#"{"name":"A","addr":"10.0.0.1:1"}"#),
        (
            service_key(P, "s", "a"),
            r#"{"service":"t","node":"a","protocol":"tcp","port":1}"#,
        ),
        (
            service_key(P, "s", "a"),
            r#"{"service":"s","node":"b","protocol":"tcp","port":1}"#,
        ),
        (
            service_key(P, "s", "a"),
            r#"{"service":"s","node":"a","protocol":"udp","port":1}"#,
        ),
        (
            service_key(P, "s", "a"),
            r#"{"service":"s","node":"a","protocol":"tcp","port":0}"#,
        ),
        (
            service_key(P, "s", "a"),
            r#"{"service":"s","node":"a","protocol":"tcp","port":70000}"#,
        ),
        (
            service_key(P, "s_x", "a"),
            r#"{"service":"s_x","node":"a","protocol":"tcp","port":1}"#,
        ),
    ];
    for (key, value) in cases {
        let out = put_raw(&mut v, &key, value);
        assert!(
            matches!(&out, ApplyOutcome::Invalid(reason) if reason.contains(&key)),
            "{key} = {value}: {out:?}"
        );
        assert_eq!(v, before, "{key} = {value} changed the view");
    }
}

#[test]
fn unknown_shapes_and_foreign_keys_are_ignored() {
    let mut v = MeshView::new();
    for key in [
        "/mesh/config/x",
        "/mesh/nodes/a/extra",
        "/mesh/services/s",
        "/mesh/services/s/a/b",
        "/mesh2/nodes/a",
        "/other/nodes/a",
        "/mesh",
    ] {
        assert_eq!(put_raw(&mut v, key, "{}"), ApplyOutcome::Ignored, "{key}");
        assert_eq!(del(&mut v, key), ApplyOutcome::Ignored, "{key}");
    }
    assert_eq!(v, MeshView::new());
}

#[test]
fn deletes() {
    let mut v = MeshView::new();
    put_node(&mut v, &node("a", "10.0.0.1:1"));
    put_svc(&mut v, &svc("s", "a", 1));
    put_svc(&mut v, &svc("s", "b", 1));
    assert_eq!(
        del(&mut v, &service_key(P, "s", "a")),
        ApplyOutcome::Applied
    );
    assert_eq!(
        del(&mut v, &service_key(P, "s", "a")),
        ApplyOutcome::Unchanged
    );
    assert!(v.services.contains_key("s"));
    assert_eq!(
        del(&mut v, &service_key(P, "s", "b")),
        ApplyOutcome::Applied
    );
    assert!(!v.services.contains_key("s"), "empty service entry removed");
    assert_eq!(
        del(&mut v, &service_key(P, "t", "b")),
        ApplyOutcome::Unchanged
    );
    assert_eq!(del(&mut v, &node_key(P, "a")), ApplyOutcome::Applied);
    assert_eq!(del(&mut v, &node_key(P, "a")), ApplyOutcome::Unchanged);
    assert_eq!(v, MeshView::new());
}

#[test]
fn prefix_with_trailing_slash_is_the_same_mesh() {
    let mut v = MeshView::new();
    let value = serde_json::to_vec(&node("a", "10.0.0.1:1")).expect("serialise");
    let out = v.apply(
        "/mesh/",
        Update::Put {
            key: "/mesh/nodes/a".into(),
            value,
        },
    );
    assert_eq!(out, ApplyOutcome::Applied);
}

#[test]
fn changes_between_views_are_counted() {
    let mut a = MeshView::new();
    put_node(&mut a, &node("a", "10.0.0.1:1"));
    put_svc(&mut a, &svc("s", "a", 1));
    put_svc(&mut a, &svc("t", "a", 1));
    let mut b = a.clone();
    b.revision = 99;
    assert!(a.same_records(&b));
    assert_eq!(b.changes_from(&a), 0);
    put_node(&mut b, &node("a", "10.0.0.9:1")); // changed
    put_node(&mut b, &node("c", "10.0.0.3:1")); // added
    del(&mut b, &service_key(P, "t", "a")); // removed (whole service)
    put_svc(&mut b, &svc("s", "c", 1)); // added
    assert!(!a.same_records(&b));
    assert_eq!(b.changes_from(&a), 4);
    assert_eq!(a.changes_from(&b), 4);
}

#[test]
fn thousand_records_apply_quickly() {
    // Correctness of a bulk load; the timing itself is in examples/load_timing.rs.
    let mut v = MeshView::new();
    for n in 0..100 {
        put_node(&mut v, &node(&format!("node-{n}"), "10.0.0.1:4433"));
        for s in 0..10 {
            put_svc(&mut v, &svc(&format!("svc-{s}"), &format!("node-{n}"), 80));
        }
    }
    assert_eq!(v.nodes.len(), 100);
    assert_eq!(v.service_record_count(), 1000);
    assert_eq!(v.endpoints("svc-3").count(), 100);
}

#[test]
fn keep_from_carries_an_earlier_good_record() {
    let mut old = MeshView::new();
    put_node(&mut old, &node("a", "10.0.0.1:1"));
    put_svc(&mut old, &svc("s", "a", 1));
    let mut fresh = MeshView::new();
    fresh.keep_from(P, &node_key(P, "a"), &old);
    fresh.keep_from(P, &service_key(P, "s", "a"), &old);
    fresh.keep_from(P, &node_key(P, "zz"), &old);
    fresh.keep_from(P, "/mesh/unknown", &old);
    assert!(fresh.same_records(&old));
}

/// Each change's (kind, service or "", node, before?, after?), for comparing lists.
fn described<'a>(changes: impl Iterator<Item = RecordChange<'a>>) -> Vec<String> {
    changes
        .map(|c| match c {
            RecordChange::Node { node, old, new } => {
                format!(
                    "node {node} {:?}->{:?}",
                    old.map(|r| &r.addr),
                    new.map(|r| &r.addr)
                )
            }
            RecordChange::Service {
                service,
                node,
                old,
                new,
            } => format!(
                "service {service}/{node} {:?}->{:?}",
                old.map(|r| r.port),
                new.map(|r| r.port)
            ),
        })
        .collect()
}

#[test]
fn changes_since_lists_each_changed_record_once() {
    let mut a = MeshView::new();
    put_node(&mut a, &node("a", "10.0.0.1:1"));
    put_node(&mut a, &node("b", "10.0.0.2:1"));
    put_svc(&mut a, &svc("web", "a", 80));
    put_svc(&mut a, &svc("web", "b", 80));
    put_svc(&mut a, &svc("db", "a", 5432));
    assert!(a.changes_since(&a.clone()).next().is_none());

    let mut b = a.clone();
    put_svc(&mut b, &svc("web", "b", 81)); // changed
    del(&mut b, &service_key(P, "db", "a")); // removed, and with it the service
    put_svc(&mut b, &svc("cache", "b", 6379)); // a new service
    put_node(&mut b, &node("a", "10.0.0.9:1")); // a node's address
    del(&mut b, &node_key(P, "b")); // a node gone (its service records stay)
    put_node(&mut b, &node("c", "10.0.0.3:1")); // a new node
    assert_eq!(
        described(b.changes_since(&a)),
        [
            r#"node a Some("10.0.0.1:1")->Some("10.0.0.9:1")"#,
            r#"node b Some("10.0.0.2:1")->None"#,
            r#"node c None->Some("10.0.0.3:1")"#,
            "service cache/b None->Some(6379)",
            "service db/a Some(5432)->None",
            "service web/b Some(80)->Some(81)",
        ]
    );
    assert_eq!(b.changes_from(&a), 6);
    // The untouched service is the very same tree in both views, not a copy.
    let (web_a, web_b) = (
        a.services.get("web").unwrap(),
        b.services.get("web").unwrap(),
    );
    assert!(!web_a.ptr_eq(web_b));
    let mut c = b.clone();
    put_svc(&mut c, &svc("cache", "c", 6379));
    assert!(c.services.get("web").unwrap().ptr_eq(web_b));
    // Backwards, every change is the other way round.
    assert_eq!(
        described(a.changes_since(&b)),
        [
            r#"node a Some("10.0.0.9:1")->Some("10.0.0.1:1")"#,
            r#"node b None->Some("10.0.0.2:1")"#,
            r#"node c Some("10.0.0.3:1")->None"#,
            "service cache/b Some(6379)->None",
            "service db/a None->Some(5432)",
            "service web/b Some(81)->Some(80)",
        ]
    );
}

/// Every record of a view as key → JSON, to compare views the slow way.
fn flat(view: &MeshView) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for (name, rec) in &view.nodes {
        out.insert(format!("n/{name}"), serde_json::to_string(rec).unwrap());
    }
    for (service, by_node) in &view.services {
        for (node, rec) in by_node {
            out.insert(
                format!("s/{service}/{node}"),
                serde_json::to_string(rec).unwrap(),
            );
        }
    }
    out
}

#[test]
fn changes_since_agrees_with_a_full_comparison_across_random_bursts() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut view = MeshView::new();
    for i in 0..120 {
        put_node(&mut view, &node(&format!("n{i}"), "10.0.0.1:1"));
        for s in 0..4 {
            put_svc(&mut view, &svc(&format!("s{s}"), &format!("n{i}"), 80));
        }
    }
    for round in 0..60 {
        let before = view.clone();
        // Bursts of 0-40 updates, deletes and node changes between two compared views.
        for _ in 0..rng.gen_range(0..40) {
            let (n, s) = (
                format!("n{}", rng.gen_range(0..130)),
                format!("s{}", rng.gen_range(0..5)),
            );
            match rng.gen_range(0..10) {
                0 => del(&mut view, &node_key(P, &n)),
                1 => put_node(
                    &mut view,
                    &node(&n, &format!("10.0.0.{}:1", rng.gen_range(1..4))),
                ),
                2 | 3 => del(&mut view, &service_key(P, &s, &n)),
                _ => put_svc(&mut view, &svc(&s, &n, rng.gen_range(80..84))),
            };
        }
        let (old, new) = (flat(&before), flat(&view));
        let mut expected: Vec<&String> = old
            .iter()
            .filter(|(k, v)| new.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(new.keys().filter(|k| !old.contains_key(*k)))
            .collect();
        expected.sort();
        let mut got: Vec<String> = view
            .changes_since(&before)
            .map(|c| match c {
                RecordChange::Node { node, old, new } => {
                    assert_eq!(before.nodes.get(node), old);
                    assert_eq!(view.nodes.get(node), new);
                    format!("n/{node}")
                }
                RecordChange::Service {
                    service,
                    node,
                    old,
                    new,
                } => {
                    assert_eq!(before.services.get(service).and_then(|m| m.get(node)), old);
                    assert_eq!(view.services.get(service).and_then(|m| m.get(node)), new);
                    assert_ne!(old, new);
                    format!("s/{service}/{node}")
                }
            })
            .collect();
        got.sort();
        assert_eq!(got.iter().collect::<Vec<_>>(), expected, "round {round}");
        assert_eq!(view.same_records(&before), expected.is_empty());
    }
}
