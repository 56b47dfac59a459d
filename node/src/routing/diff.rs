//! What changed between two registry views, in endpoints: the work a view change costs is
//! proportional to what changed, not to the whole view (docs/behaviour.md, Registry bursts).
//!
//! Services are compared map by map and only the changed ones are walked; node records are
//! compared one by one, and only a changed node record makes its services be looked at. With
//! views whose service maps are shared copy-on-write between views, the per-service comparison
//! becomes a pointer comparison; the rest stays as it is.

use std::collections::BTreeSet;

use meshnode_registry::MeshView;

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

/// The routable endpoints of `service` in `view`, by node (registered port and weight).
fn has_endpoint(view: &MeshView, service: &str, node: &str) -> bool {
    view.services
        .get(service)
        .is_some_and(|by_node| by_node.contains_key(node))
        && view.nodes.contains_key(node)
}

/// The node names of `service` in `view`, sorted (a `BTreeMap`'s order).
fn service_keys<'v>(view: &'v MeshView, service: &str) -> Vec<&'v str> {
    view.services
        .get(service)
        .map(|by_node| by_node.keys().map(String::as_str).collect())
        .unwrap_or_default()
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

pub fn diff(old: &MeshView, new: &MeshView) -> ViewDiff {
    let mut out = ViewDiff::default();
    if std::ptr::eq(old, new) {
        return out;
    }
    // Node records that differ (added, removed or changed).
    let mut changed_nodes = BTreeSet::new();
    for (name, rec) in &old.nodes {
        match new.nodes.get(name) {
            None => {
                out.nodes_gone.push(name.clone());
                changed_nodes.insert(name.as_str());
            }
            Some(r) if r != rec => {
                changed_nodes.insert(name.as_str());
            }
            Some(_) => {}
        }
    }
    for name in new.nodes.keys() {
        if !old.nodes.contains_key(name) {
            changed_nodes.insert(name.as_str());
        }
    }
    // Services whose endpoint maps differ.
    let mut changed_services: BTreeSet<&str> = BTreeSet::new();
    for (name, by_node) in &old.services {
        if new.services.get(name) != Some(by_node) {
            changed_services.insert(name);
        }
    }
    for name in new.services.keys() {
        if !old.services.contains_key(name) {
            changed_services.insert(name);
        }
    }
    // A changed node record changes the endpoints of the services it serves.
    if !changed_nodes.is_empty() {
        for view in [old, new] {
            for (name, by_node) in &view.services {
                if changed_nodes.iter().any(|n| by_node.contains_key(*n)) {
                    changed_services.insert(name);
                }
            }
        }
    }
    // Only presence matters here (a record whose weight or port changed is not an endpoint
    // leaving or arriving), so each changed service costs a walk of its node names, and a
    // target is built only for an endpoint that left: a burst of record updates touches
    // nothing else.
    for service in changed_services {
        // Nodes whose presence may differ: those in one service map and not the other (a
        // merge of the two sorted key lists, no lookups), and the nodes whose own record
        // changed. A burst of weight or port updates yields none, and costs one ordered walk.
        let (before, after) = (service_keys(old, service), service_keys(new, service));
        let mut candidates: BTreeSet<&str> = changed_nodes
            .iter()
            .copied()
            .filter(|n| before.binary_search(n).is_ok() || after.binary_search(n).is_ok())
            .collect();
        let (mut i, mut j) = (0, 0);
        while i < before.len() || j < after.len() {
            match (before.get(i), after.get(j)) {
                (Some(x), Some(y)) if x == y => {
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x < y => {
                    candidates.insert(x);
                    i += 1;
                }
                (Some(_), Some(y)) => {
                    candidates.insert(y);
                    j += 1;
                }
                (Some(x), None) => {
                    candidates.insert(x);
                    i += 1;
                }
                (None, Some(y)) => {
                    candidates.insert(y);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        for node in candidates {
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
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshnode_registry::{NodeRecord, Protocol, ServiceRecord};
    use std::collections::BTreeMap;

    /// The endpoint map of `service` as a plain map, to edit and put back with [`put`]
    /// (written so as not to depend on how the view wraps its service maps).
    fn take(view: &MeshView, service: &str) -> BTreeMap<String, ServiceRecord> {
        view.services
            .get(service)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    #[allow(clippy::useless_conversion)] // identity today; `Arc` with shared service maps
    fn put(view: &mut MeshView, service: &str, map: BTreeMap<String, ServiceRecord>) {
        view.services.insert(service.to_string(), map.into());
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
}
