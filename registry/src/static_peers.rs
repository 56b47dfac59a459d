//! The static backend: the mesh is listed by hand (`[[registry.peers]]`), no etcd.
//!
//! The view is the listed peers plus this node's own registration; the state is always
//! `connected`. A peer entry that breaks a record rule is skipped with a warning and counted,
//! like an invalid record in etcd.

use std::sync::Arc;

use serde::Deserialize;
use tracing::warn;

use crate::handle::{Command, Registration, Registry, RegistryState, RegistryStatus, TaskEnds};
use crate::records::{NodeRecord, Protocol, ServiceRecord, DEFAULT_WEIGHT};
use crate::view::MeshView;

/// One peer node listed in the config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    /// Node name (must match its certificate).
    pub name: String,
    /// Address to dial, `ip:port`.
    pub addr: String,
    /// Locality label; empty by default.
    #[serde(default)]
    pub zone: String,
    /// Services the peer hosts.
    #[serde(default)]
    pub services: Vec<StaticService>,
}

/// A service hosted by a [`StaticPeer`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticService {
    /// Service name.
    pub name: String,
    /// `tcp` or `http`.
    pub protocol: Protocol,
    /// Advertised port.
    pub port: u16,
    /// Relative share of traffic (default 100).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl StaticPeer {
    fn records(&self) -> Result<(NodeRecord, Vec<ServiceRecord>), String> {
        let node = NodeRecord {
            name: self.name.clone(),
            addr: self.addr.clone(),
            zone: self.zone.clone(),
            version: String::new(),
            started_at: 0,
        };
        node.validate()?;
        let services = self
            .services
            .iter()
            .map(|s| {
                let record = ServiceRecord {
                    service: s.name.clone(),
                    node: self.name.clone(),
                    protocol: s.protocol,
                    port: s.port,
                    weight: s.weight,
                    zone: self.zone.clone(),
                };
                record.validate().map(|()| record)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((node, services))
    }
}

fn insert(view: &mut MeshView, node: NodeRecord, services: Vec<ServiceRecord>) {
    for svc in services {
        view.services
            .entry(svc.service.clone())
            .or_default()
            .insert(svc.node.clone(), svc);
    }
    view.nodes.insert(node.name.clone(), node);
}

/// Builds the peers' view; returns it with the number of skipped (invalid) peers.
fn base_view(peers: &[StaticPeer]) -> (MeshView, u64) {
    let mut view = MeshView::new();
    let mut invalid = 0;
    for peer in peers {
        if view.nodes.contains_key(&peer.name) {
            warn!(peer = %peer.name, "static peer listed twice; skipping the later entry");
            invalid += 1;
            continue;
        }
        match peer.records() {
            Ok((node, services)) => insert(&mut view, node, services),
            Err(reason) => {
                warn!(peer = %peer.name, reason = %reason, "skipping invalid static peer");
                invalid += 1;
            }
        }
    }
    (view, invalid)
}

/// Starts the static backend. Must be called within a Tokio runtime.
pub fn start(peers: Vec<StaticPeer>) -> Registry {
    let (base, invalid) = base_view(&peers);
    let mut status = RegistryStatus::new("static", RegistryState::Connected);
    status.invalid_records_total = invalid;
    status.updates_total = base.changes_from(&MeshView::new());
    let (handle, ends) = Registry::channel(base.clone(), status);
    tokio::spawn(run(base, ends));
    handle
}

fn with_own(base: &MeshView, own: &Registration) -> MeshView {
    let mut view = base.clone();
    insert(&mut view, own.node.clone(), own.services.clone());
    view
}

async fn run(base: MeshView, mut ends: TaskEnds) {
    while let Some(cmd) = ends.commands.recv().await {
        match cmd {
            Command::Register { reg, reply } => {
                let conflict = base
                    .nodes
                    .contains_key(&reg.node.name)
                    .then(|| format!("node name {:?} is also a static peer", reg.node.name));
                if let Some(conflict) = &conflict {
                    warn!(node = %reg.node.name, "{conflict}; our own registration wins");
                }
                let view = with_own(&base, &reg);
                let mut changes = 0;
                ends.view.send_if_modified(|current| {
                    changes = view.changes_from(current);
                    if changes == 0 {
                        return false;
                    }
                    *current = Arc::new(view);
                    true
                });
                ends.status.send_modify(|s| {
                    s.registered = true;
                    s.updates_total += changes;
                    s.conflicts = conflict.into_iter().collect();
                });
                let _ = reply.send(Ok(()));
            }
            Command::Shutdown { reply, .. } => {
                ends.status.send_modify(|s| s.registered = false);
                let _ = reply.send(Ok(()));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
