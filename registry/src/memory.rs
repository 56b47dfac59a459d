//! An in-process registry shared by several nodes in one process (`meshnode demo`, tests).
//!
//! Every member sees the same view. A member's records vanish when it shuts down, and also
//! when every clone of its [`Registry`] handle is dropped: that is this backend's lease
//! expiry, so a "crashed" in-process node disappears from the others' views.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{mpsc, watch};

use crate::handle::{
    Command, Registration, Registry, RegistryError, RegistryState, RegistryStatus,
};
use crate::view::MeshView;

/// A mesh living in this process. Cheap to clone; clones are the same mesh.
#[derive(Clone, Debug)]
pub struct MemoryMesh {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug)]
struct Shared {
    view: MeshView,
    view_tx: watch::Sender<Arc<MeshView>>,
    members: HashMap<u64, Member>,
    next_id: u64,
}

#[derive(Debug)]
struct Member {
    status: watch::Sender<RegistryStatus>,
    registration: Option<Registration>,
}

impl Default for MemoryMesh {
    fn default() -> MemoryMesh {
        MemoryMesh::new()
    }
}

impl MemoryMesh {
    /// An empty mesh.
    pub fn new() -> MemoryMesh {
        let (view_tx, _) = watch::channel(Arc::new(MeshView::new()));
        MemoryMesh {
            shared: Arc::new(Mutex::new(Shared {
                view: MeshView::new(),
                view_tx,
                members: HashMap::new(),
                next_id: 0,
            })),
        }
    }

    /// A new member: a registry handle whose view is the whole mesh. Must be called within
    /// a Tokio runtime (the member's task is spawned on it).
    pub fn connect(&self) -> Registry {
        let status = RegistryStatus::new("memory", RegistryState::Connected);
        let mut shared = self.lock();
        let id = shared.next_id;
        shared.next_id += 1;
        let (handle, commands, status_tx) = Registry::with_view(shared.view_tx.subscribe(), status);
        shared.members.insert(
            id,
            Member {
                status: status_tx,
                registration: None,
            },
        );
        drop(shared);
        tokio::spawn(self.clone().member_task(id, commands));
        handle
    }

    /// The current view of the whole mesh.
    pub fn view(&self) -> Arc<MeshView> {
        self.lock().view_tx.borrow().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing panics while holding the lock; recover rather than propagate a poison.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn member_task(self, id: u64, mut commands: mpsc::Receiver<Command>) {
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Register { reg, reply } => {
                    let _ = reply.send(self.lock().register(id, reg));
                }
                Command::Shutdown { reply, .. } => {
                    self.lock().leave(id);
                    let _ = reply.send(Ok(()));
                    return;
                }
            }
        }
        // Every handle dropped without shutdown: the in-process "lease" expires now.
        self.lock().leave(id);
    }
}

impl Shared {
    fn register(&mut self, id: u64, reg: Registration) -> Result<(), RegistryError> {
        let name = &reg.node.name;
        let taken = self.members.iter().any(|(other, m)| {
            *other != id
                && m.registration
                    .as_ref()
                    .is_some_and(|r| &r.node.name == name)
        });
        if taken {
            return Err(RegistryError::NameTaken(name.clone()));
        }
        let Some(member) = self.members.get_mut(&id) else {
            return Err(RegistryError::Stopped);
        };
        let old = member.registration.replace(reg);
        member.status.send_modify(|s| s.registered = true);
        let new = member.registration.clone();
        self.replace(old.as_ref(), new.as_ref());
        Ok(())
    }

    fn leave(&mut self, id: u64) {
        if let Some(member) = self.members.remove(&id) {
            member.status.send_modify(|s| {
                s.registered = false;
                s.state = RegistryState::Disconnected;
            });
            self.replace(member.registration.as_ref(), None);
        }
    }

    /// Swaps one member's records, publishes the view and counts the change for everyone.
    fn replace(&mut self, old: Option<&Registration>, new: Option<&Registration>) {
        let before = self.view.clone();
        if let Some(old) = old {
            self.view.nodes.remove(&old.node.name);
            for svc in &old.services {
                if let Some(by_node) = self.view.services.get_mut(&svc.service) {
                    by_node.remove(&svc.node);
                    if by_node.is_empty() {
                        self.view.services.remove(&svc.service);
                    }
                }
            }
        }
        if let Some(new) = new {
            self.view
                .nodes
                .insert(new.node.name.clone(), new.node.clone());
            for svc in &new.services {
                self.view
                    .services
                    .entry(svc.service.clone())
                    .or_default()
                    .insert(svc.node.clone(), svc.clone());
            }
        }
        let changes = self.view.changes_from(&before);
        if changes == 0 {
            return;
        }
        self.view_tx.send_replace(Arc::new(self.view.clone()));
        for member in self.members.values() {
            member.status.send_modify(|s| s.updates_total += changes);
        }
    }
}

#[cfg(test)]
mod tests;
