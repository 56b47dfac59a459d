//! The pure mesh state: what a node knows about the other nodes and their services.
//!
//! [`MeshView::apply`] is the only way the backends change it, one key-level [`Update`] at a
//! time, so every rule about what a record must look like lives here and is tested without
//! etcd, sockets or a clock.

use imbl::ordmap::DiffItem;
use imbl::OrdMap;

use crate::records::{parse_key, KeyKind, NodeRecord, ServiceRecord};

/// One key-level change under the registry prefix, as etcd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The key now holds `value`.
    Put {
        /// Full key, prefix included.
        key: String,
        /// Raw value (JSON record).
        value: Vec<u8>,
    },
    /// The key was deleted (or its lease expired).
    Delete {
        /// Full key, prefix included.
        key: String,
    },
}

/// What [`MeshView::apply`] did with an update, so the caller can count and log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The view changed.
    Applied,
    /// A valid update that left the view as it was (same record re-written, unknown key deleted).
    Unchanged,
    /// The key is outside the prefix or of a shape this version does not know; not an error.
    Ignored,
    /// The value does not parse or does not match its key; the view is unchanged (an earlier
    /// good value stays). Carries the reason.
    Invalid(String),
}

/// The nodes of a view: node name → record.
pub type NodeMap = OrdMap<String, NodeRecord>;

/// The endpoints of one service: node name → record.
pub type ServiceMap = OrdMap<String, ServiceRecord>;

/// Everything a node knows about the mesh at one moment. Cheap to share as `Arc<MeshView>`,
/// and cheap to clone and to compare: its maps are persistent B-trees (`imbl::OrdMap`), so a
/// clone is a pointer copy, a change copies only the path to the record it touches, and a view
/// made from another by a few changes shares every other tree node with it. Publishing a view,
/// [`MeshView::changes_since`] and dropping the old view then cost what changed, not the size
/// of the mesh (docs/registry.md, "Views").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshView {
    /// Node name → record.
    pub nodes: NodeMap,
    /// Service name → its endpoints.
    pub services: OrdMap<String, ServiceMap>,
    /// etcd revision of the last change this view reflects (or of the snapshot it was built
    /// from); 0 for the static and in-process backends.
    pub revision: i64,
}

/// One record that differs between two views ([`MeshView::changes_since`]): what it was in
/// the old view and what it is in the new one (`None`: absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordChange<'a> {
    /// A node record.
    Node {
        /// The node's name.
        node: &'a str,
        /// Before.
        old: Option<&'a NodeRecord>,
        /// After.
        new: Option<&'a NodeRecord>,
    },
    /// A service record.
    Service {
        /// The service's name.
        service: &'a str,
        /// The node it is on.
        node: &'a str,
        /// Before.
        old: Option<&'a ServiceRecord>,
        /// After.
        new: Option<&'a ServiceRecord>,
    },
}

impl MeshView {
    /// An empty view.
    pub fn new() -> MeshView {
        MeshView::default()
    }

    /// Endpoints of a service whose node is also present in `nodes` (an endpoint without a
    /// node record is not routable: there is no address to dial).
    pub fn endpoints<'a>(
        &'a self,
        service: &str,
    ) -> impl Iterator<Item = (&'a ServiceRecord, &'a NodeRecord)> + 'a {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|by_node| by_node.values())
            .filter_map(move |svc| self.nodes.get(&svc.node).map(|node| (svc, node)))
    }

    /// Number of service records (endpoints, routable or not).
    pub fn service_record_count(&self) -> usize {
        self.services.values().map(|m| m.len()).sum()
    }

    /// Whether both views hold the same records, ignoring the revision.
    pub fn same_records(&self, other: &MeshView) -> bool {
        self.nodes == other.nodes && self.services == other.services
    }

    /// How many records differ between `self` and `old` (added, removed or changed).
    pub fn changes_from(&self, old: &MeshView) -> u64 {
        self.changes_since(old).count() as u64
    }

    /// Every record that differs from `old` to `self`: node records in name order, then
    /// service records by service and node. Subtrees the two views share are skipped without
    /// being looked at, so for a view made from `old` by `k` changes this costs about
    /// `k · log(records)`, however large the mesh.
    pub fn changes_since<'a>(
        &'a self,
        old: &'a MeshView,
    ) -> impl Iterator<Item = RecordChange<'a>> + 'a {
        let nodes = old.nodes.diff(&self.nodes).map(|item| {
            let (node, old, new) = split(item);
            RecordChange::Node {
                node: node.as_str(),
                old,
                new,
            }
        });
        let services = old.services.diff(&self.services).flat_map(|item| {
            let (service, before, after) = split(item);
            // A service present on both sides is compared tree to tree; one present on one
            // side only is all added or all removed.
            let (both, only_before, only_after) = match (before, after) {
                (Some(b), Some(a)) => (Some(b.diff(a)), None, None),
                (Some(b), None) => (None, Some(b.iter()), None),
                (None, Some(a)) => (None, None, Some(a.iter())),
                (None, None) => (None, None, None),
            };
            let both = both.into_iter().flatten().map(split);
            let gone = only_before
                .into_iter()
                .flatten()
                .map(|(k, v)| (k, Some(v), None));
            let arrived = only_after
                .into_iter()
                .flatten()
                .map(|(k, v)| (k, None, Some(v)));
            both.chain(gone)
                .chain(arrived)
                .map(move |(node, old, new)| RecordChange::Service {
                    service: service.as_str(),
                    node: node.as_str(),
                    old,
                    new,
                })
        });
        nodes.chain(services)
    }

    /// Copies the record `key` names from `old`, if `old` has one. A snapshot that holds an
    /// invalid value for a key keeps the earlier good record, as [`MeshView::apply`] does.
    pub fn keep_from(&mut self, prefix: &str, key: &str, old: &MeshView) {
        match parse_key(prefix, key) {
            Some(KeyKind::Node { node }) => {
                if let Some(record) = old.nodes.get(node) {
                    self.nodes.insert(node.to_string(), record.clone());
                }
            }
            Some(KeyKind::Service { service, node }) => {
                if let Some(record) = old.services.get(service).and_then(|m| m.get(node)) {
                    self.services
                        .entry(service.to_string())
                        .or_default()
                        .insert(node.to_string(), record.clone());
                }
            }
            None => {}
        }
    }

    /// Applies one key-level change under `prefix`. Pure: no I/O, no clock, no logging.
    ///
    /// `{prefix}/nodes/{node}` must carry a [`NodeRecord`] named `{node}`;
    /// `{prefix}/services/{svc}/{node}` a [`ServiceRecord`] for `{svc}` on `{node}`. Names are
    /// 1-63 of `[a-z0-9-]`, not starting or ending with `-` (`meshnode_proto::identity`), and
    /// `addr` is `ip:port`. Anything else under the prefix is
    /// [`ApplyOutcome::Ignored`]; a bad value is [`ApplyOutcome::Invalid`] and changes nothing.
    pub fn apply(&mut self, prefix: &str, update: Update) -> ApplyOutcome {
        match update {
            Update::Put { key, value } => self.apply_put(prefix, &key, &value),
            Update::Delete { key } => self.apply_delete(prefix, &key),
        }
    }

    fn apply_put(&mut self, prefix: &str, key: &str, value: &[u8]) -> ApplyOutcome {
        match parse_key(prefix, key) {
            None => ApplyOutcome::Ignored,
            Some(KeyKind::Node { node }) => {
                let record = match parse_node(node, value) {
                    Ok(r) => r,
                    Err(reason) => return ApplyOutcome::Invalid(format!("{key}: {reason}")),
                };
                if self.nodes.get(node) == Some(&record) {
                    return ApplyOutcome::Unchanged;
                }
                self.nodes.insert(node.to_string(), record);
                ApplyOutcome::Applied
            }
            Some(KeyKind::Service { service, node }) => {
                let record = match parse_service(service, node, value) {
                    Ok(r) => r,
                    Err(reason) => return ApplyOutcome::Invalid(format!("{key}: {reason}")),
                };
                // Looked up before any `&mut`: a record written again unchanged (a
                // re-registration) copies no tree node.
                if self.services.get(service).and_then(|m| m.get(node)) == Some(&record) {
                    return ApplyOutcome::Unchanged;
                }
                self.services
                    .entry(service.to_string())
                    .or_default()
                    .insert(node.to_string(), record);
                ApplyOutcome::Applied
            }
        }
    }

    fn apply_delete(&mut self, prefix: &str, key: &str) -> ApplyOutcome {
        match parse_key(prefix, key) {
            None => ApplyOutcome::Ignored,
            Some(KeyKind::Node { node }) => {
                if !self.nodes.contains_key(node) {
                    return ApplyOutcome::Unchanged;
                }
                self.nodes.remove(node);
                ApplyOutcome::Applied
            }
            Some(KeyKind::Service { service, node }) => {
                if !self
                    .services
                    .get(service)
                    .is_some_and(|m| m.contains_key(node))
                {
                    return ApplyOutcome::Unchanged;
                }
                let Some(by_node) = self.services.get_mut(service) else {
                    return ApplyOutcome::Unchanged;
                };
                by_node.remove(node);
                if by_node.is_empty() {
                    self.services.remove(service);
                }
                ApplyOutcome::Applied
            }
        }
    }
}

/// A diff item as (key, before, after).
fn split<'a, K, V>(item: DiffItem<'a, 'a, K, V>) -> (&'a K, Option<&'a V>, Option<&'a V>) {
    match item {
        DiffItem::Add(k, v) => (k, None, Some(v)),
        DiffItem::Update { old, new } => (new.0, Some(old.1), Some(new.1)),
        DiffItem::Remove(k, v) => (k, Some(v), None),
    }
}

fn parse_node(node: &str, value: &[u8]) -> Result<NodeRecord, String> {
    let record: NodeRecord =
        serde_json::from_slice(value).map_err(|e| format!("not a node record: {e}"))?;
    record.validate()?;
    if record.name != node {
        return Err(format!(
            "record names node {:?}, key names {node:?}",
            record.name
        ));
    }
    Ok(record)
}

fn parse_service(service: &str, node: &str, value: &[u8]) -> Result<ServiceRecord, String> {
    let record: ServiceRecord =
        serde_json::from_slice(value).map_err(|e| format!("not a service record: {e}"))?;
    record.validate()?;
    if record.service != service || record.node != node {
        return Err(format!(
            "record names {}/{}, key names {service}/{node}",
            record.service, record.node
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests;
