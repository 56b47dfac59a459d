//! What changed between two registry views, in endpoints: the work a view change costs is
//! proportional to what changed, not to the whole view (docs/behaviour.md, Registry bursts).
//!
//! The records that differ come from [`MeshView::changes_since`], which skips every part of
//! the two views that they share (a view made from another by `k` changes shares all but about
//! `k` paths of its trees with it). Only a record's presence matters here: a service record
//! whose weight or port changed is not an endpoint leaving or arriving, so a burst of such
//! updates yields no per-endpoint work at all.

use std::collections::BTreeSet;

use meshnode_registry::{MeshView, RecordChange};

use super::Target;

/// The endpoint changes from one view to the next.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ViewDiff {
    /// Endpoints routable in the old view and not in the new one, as they were.
    pub left: Vec<(String, Target)>,
    /// Endpoints routable in the new view and not in the old one: (service, node).
    pub arrived: Vec<(String, String)>,
    /// Nodes with a record in the old view and none in the new one.
    pub nodes_gone: Vec<String>,
}

impl ViewDiff {
    /// Nothing changed in endpoints or nodes.
    pub fn is_empty(&self) -> bool {
        self.left.is_empty() && self.arrived.is_empty() && self.nodes_gone.is_empty()
    }
}

/// Whether `service` has a routable endpoint on `node` in `view` (a service record and a node
/// record).
fn has_endpoint(view: &MeshView, service: &str, node: &str) -> bool {
    view.services
        .get(service)
        .is_some_and(|by_node| by_node.contains_key(node))
        && view.nodes.contains_key(node)
}

/// The target of `node` for `service` in `view`, if it has a routable one.
fn target(view: &MeshView, service: &str, node: &str) -> Option<Target> {
    let svc = view.services.get(service)?.get(node)?;
    let rec = view.nodes.get(node)?;
    Some(Target {
        node: rec.name.clone(),
        addr: rec.addr.parse().ok()?,
        port: svc.port,
        weight: svc.weight,
    })
}

/// The endpoint changes from `old` to `new`, in service then node order.
pub fn diff(old: &MeshView, new: &MeshView) -> ViewDiff {
    diff_within(old, new, usize::MAX).unwrap_or_default()
}

/// [`diff`], or `None` as soon as more than `limit` records turn out to differ: the caller
/// compares small changes where it is and hands larger ones elsewhere, in one pass.
pub fn diff_within<'v>(old: &'v MeshView, new: &'v MeshView, limit: usize) -> Option<ViewDiff> {
    let mut out = ViewDiff::default();
    // (service, node) pairs whose routability may differ.
    let mut candidates: BTreeSet<(&'v str, &'v str)> = BTreeSet::new();
    let mut changed_nodes: Vec<&'v str> = Vec::new();
    for (n, change) in new.changes_since(old).enumerate() {
        if n >= limit {
            return None;
        }
        match change {
            RecordChange::Node { node, new, .. } => {
                if new.is_none() {
                    out.nodes_gone.push(node.to_string());
                }
                changed_nodes.push(node);
            }
            RecordChange::Service {
                service,
                node,
                old,
                new,
            } => {
                if old.is_some() != new.is_some() {
                    candidates.insert((service, node));
                }
            }
        }
    }
    // A node record that came, went or changed changes the endpoints of the services it
    // serves, in either view. Node records change rarely (a node joins, leaves or moves), so
    // this walk of the service names is paid per changed node, never per service update.
    if !changed_nodes.is_empty() {
        for view in [old, new] {
            for (service, by_node) in &view.services {
                for node in &changed_nodes {
                    if by_node.contains_key(*node) {
                        candidates.insert((service.as_str(), node));
                    }
                }
            }
        }
    }
    for (service, node) in candidates {
        let (was, is) = (
            has_endpoint(old, service, node),
            has_endpoint(new, service, node),
        );
        if was && !is {
            if let Some(t) = target(old, service, node) {
                out.left.push((service.to_string(), t));
            }
        } else if is && !was {
            out.arrived.push((service.to_string(), node.to_string()));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshnode_registry::{NodeRecord, Protocol, ServiceMap, ServiceRecord};

    /// The endpoint map of `service` (a cheap handle), to edit and put back with [`put`].
    fn take(view: &MeshView, service: &str) -> ServiceMap {
        view.services.get(service).cloned().unwrap_or_default()
    }

    /// Puts `service`'s map back; an empty map removes the service, as the registry does.
    fn put(view: &mut MeshView, service: &str, map: ServiceMap) {
        if map.is_empty() {
            view.services.remove(service);
        } else {
            view.services.insert(service.to_string(), map);
        }
    }

    fn add(view: &mut MeshView, node: &str, port: u16, services: &[&str]) {
        view.nodes.insert(
            node.to_string(),
            NodeRecord {
                name: node.to_string(),
                addr: format!("127.0.0.1:{port}"),
                zone: String::new(),
                version: "test".into(),
                started_at: 0,
            },
        );
        for s in services {
            let mut m = take(view, s);
            m.insert(
                node.to_string(),
                ServiceRecord {
                    service: s.to_string(),
                    node: node.to_string(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    weight: 100,
                    zone: String::new(),
                },
            );
            put(view, s, m);
        }
    }

    #[test]
    fn same_view_is_no_change() {
        let mut v = MeshView::new();
        add(&mut v, "b", 7001, &["echo"]);
        assert!(diff(&v, &v.clone()).is_empty());
    }

    #[test]
    fn service_record_removed_is_an_endpoint_that_left() {
        let mut old = MeshView::new();
        add(&mut old, "b", 7001, &["echo", "web"]);
        add(&mut old, "c", 7002, &["echo"]);
        let mut new = old.clone();
        let mut m = take(&new, "echo");
        m.remove("b");
        put(&mut new, "echo", m);
        let d = diff(&old, &new);
        assert_eq!(d.left.len(), 1);
        assert_eq!(
            (d.left[0].0.as_str(), d.left[0].1.node.as_str()),
            ("echo", "b")
        );
        assert_eq!(d.left[0].1.addr.port(), 7001);
        assert!(d.arrived.is_empty() && d.nodes_gone.is_empty());
        // And back again.
        let back = diff(&new, &old);
        assert_eq!(back.arrived, [("echo".to_string(), "b".to_string())]);
        assert!(back.left.is_empty());
    }

    #[test]
    fn node_record_removed_takes_its_endpoints_even_when_service_records_stay() {
        let mut old = MeshView::new();
        add(&mut old, "b", 7001, &["echo", "web"]);
        add(&mut old, "c", 7002, &["echo"]);
        let mut new = old.clone();
        new.nodes.remove("b");
        let d = diff(&old, &new);
        let left: Vec<(&str, &str)> = d
            .left
            .iter()
            .map(|(s, t)| (s.as_str(), t.node.as_str()))
            .collect();
        assert_eq!(left, [("echo", "b"), ("web", "b")]);
        assert_eq!(d.nodes_gone, ["b"]);
    }

    #[test]
    fn unrelated_changes_touch_nothing_else() {
        let mut old = MeshView::new();
        add(&mut old, "b", 7001, &["echo"]);
        let mut new = old.clone();
        add(&mut new, "d", 7004, &["other"]);
        let d = diff(&old, &new);
        assert_eq!(d.arrived, [("other".to_string(), "d".to_string())]);
        assert!(d.left.is_empty() && d.nodes_gone.is_empty());
    }

    #[test]
    fn a_burst_of_weight_and_port_updates_changes_no_endpoint() {
        let mut old = MeshView::new();
        for i in 0..50 {
            add(&mut old, &format!("n{i}"), 7000 + i, &["a", "b", "c"]);
        }
        let mut new = old.clone();
        for i in 0..50 {
            for s in ["a", "c"] {
                let mut m = take(&new, s);
                if let Some(rec) = m.get_mut(&format!("n{i}")) {
                    rec.weight = 7;
                    rec.port = 81;
                }
                put(&mut new, s, m);
            }
        }
        assert_eq!(new.changes_from(&old), 100);
        assert!(diff(&old, &new).is_empty());
    }

    #[test]
    fn diff_within_gives_up_past_its_limit_only() {
        let mut old = MeshView::new();
        add(&mut old, "b", 7001, &["echo"]);
        let mut new = old.clone();
        add(&mut new, "c", 7002, &["echo", "web"]); // three records
        assert_eq!(diff_within(&old, &new, 2), None);
        assert_eq!(diff_within(&old, &new, 3), Some(diff(&old, &new)));
        assert_eq!(diff(&old, &new).arrived.len(), 2);
    }

    #[test]
    fn a_node_that_moves_keeps_its_endpoints() {
        let mut old = MeshView::new();
        add(&mut old, "b", 7001, &["echo"]);
        let mut new = old.clone();
        add(&mut new, "b", 7009, &["echo"]);
        assert!(diff(&old, &new).is_empty());
    }

    #[test]
    fn a_service_whose_last_endpoint_goes_and_a_node_that_comes_back() {
        let mut old = MeshView::new();
        add(&mut old, "b", 7001, &["echo", "web"]);
        add(&mut old, "c", 7002, &["echo"]);
        let mut new = old.clone();
        put(&mut new, "web", ServiceMap::new());
        new.nodes.remove("c");
        let d = diff(&old, &new);
        let left: Vec<(&str, &str)> = d
            .left
            .iter()
            .map(|(s, t)| (s.as_str(), t.node.as_str()))
            .collect();
        assert_eq!(left, [("echo", "c"), ("web", "b")]);
        assert_eq!(d.nodes_gone, ["c"]);
        // The node record back: its service record never left, so its endpoint arrives.
        let back = diff(&new, &old);
        assert_eq!(
            back.arrived,
            [
                ("echo".to_string(), "c".to_string()),
                ("web".to_string(), "b".to_string())
            ]
        );
        assert!(back.left.is_empty() && back.nodes_gone.is_empty());
    }

    #[test]
    fn views_several_changes_apart_compare_as_one_change() {
        // A consumer that skipped views (the watch channel keeps the latest) compares the
        // view it applied last with the newest one: the changes in between net out.
        let mut v0 = MeshView::new();
        add(&mut v0, "b", 7001, &["echo"]);
        add(&mut v0, "c", 7002, &["echo"]);
        let mut v1 = v0.clone();
        let mut m = take(&v1, "echo");
        m.remove("b");
        put(&mut v1, "echo", m);
        let mut v2 = v1.clone();
        add(&mut v2, "b", 7001, &["echo"]); // back as it was
        add(&mut v2, "d", 7004, &["echo"]);
        let d = diff(&v0, &v2);
        assert_eq!(d.arrived, [("echo".to_string(), "d".to_string())]);
        assert!(d.left.is_empty() && d.nodes_gone.is_empty());
    }
}
