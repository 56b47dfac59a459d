//! The pure mesh state: what a node knows about the other nodes and their services.
//!
//! [`MeshView::apply`] is the only way the backends change it, one key-level [`Update`] at a
//! time, so every rule about what a record must look like lives here and is tested without
//! etcd, sockets or a clock.

use std::collections::BTreeMap;
use std::sync::Arc;

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

/// Everything a node knows about the mesh at one moment. Cheap to share as `Arc<MeshView>`,
/// and cheap to clone: each service's endpoints sit behind their own `Arc`, so a new view
/// after a change copies the service names and shares every endpoint map it did not touch
/// (copy-on-write through `Arc::make_mut`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshView {
    /// Node name → record.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Service name → node name → record (shared between views until changed).
    pub services: BTreeMap<String, Arc<BTreeMap<String, ServiceRecord>>>,
    /// etcd revision of the last change this view reflects (or of the snapshot it was built
    /// from); 0 for the static and in-process backends.
    pub revision: i64,
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
        fn diff<V: PartialEq>(a: &BTreeMap<String, V>, b: &BTreeMap<String, V>) -> u64 {
            let changed_or_added = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count();
            let removed = b.keys().filter(|k| !a.contains_key(*k)).count();
            (changed_or_added + removed) as u64
        }
        let empty = BTreeMap::new();
        let mut n = diff(&self.nodes, &old.nodes);
        for (svc, by_node) in &self.services {
            match old.services.get(svc) {
                Some(old_by_node) if Arc::ptr_eq(by_node, old_by_node) => {}
                Some(old_by_node) => n += diff(by_node, old_by_node),
                None => n += diff(by_node, &empty),
            }
        }
        for (svc, by_node) in &old.services {
            if !self.services.contains_key(svc) {
                n += by_node.len() as u64;
            }
        }
        n
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
                    let by_node = self.services.entry(service.to_string()).or_default();
                    Arc::make_mut(by_node).insert(node.to_string(), record.clone());
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
                let by_node = self.services.entry(service.to_string()).or_default();
                if by_node.get(node) == Some(&record) {
                    return ApplyOutcome::Unchanged;
                }
                Arc::make_mut(by_node).insert(node.to_string(), record);
                ApplyOutcome::Applied
            }
        }
    }

    fn apply_delete(&mut self, prefix: &str, key: &str) -> ApplyOutcome {
        match parse_key(prefix, key) {
            None => ApplyOutcome::Ignored,
            Some(KeyKind::Node { node }) => match self.nodes.remove(node) {
                Some(_) => ApplyOutcome::Applied,
                None => ApplyOutcome::Unchanged,
            },
            Some(KeyKind::Service { service, node }) => {
                let Some(by_node) = self.services.get_mut(service) else {
                    return ApplyOutcome::Unchanged;
                };
                if !by_node.contains_key(node) {
                    return ApplyOutcome::Unchanged;
                }
                let by_node = Arc::make_mut(by_node);
                let removed = by_node.remove(node).is_some();
                if by_node.is_empty() {
                    self.services.remove(service);
                }
                if removed {
                    ApplyOutcome::Applied
                } else {
                    ApplyOutcome::Unchanged
                }
            }
        }
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
