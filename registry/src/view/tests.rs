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
