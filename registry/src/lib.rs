//! meshnode discovery: how nodes find each other and each other's services.
//!
//! Every backend is a task behind a cheap-to-clone [`Registry`] handle: it takes this node's
//! [`Registration`], publishes a [`MeshView`] of the mesh on a `watch` channel, and reports
//! [`RegistryStatus`]. The state update itself, [`MeshView::apply`], is pure and holds every
//! rule about what a record must look like; the backends only feed it.
//!
//! - [`etcd`]: the real registry (docs/registry.md): records under a lease kept alive at ttl/3,
//!   snapshot + watch, reconnect with back-off, and static stability: the last view stays in
//!   use while etcd is unreachable.
//! - [`static_peers`]: a hand-written list of peers, no etcd.
//! - [`memory`]: an in-process mesh shared by several nodes in one process (demo, tests).
//!
//! With the `testing` feature, the `testing` module offers a real etcd process and a
//! cuttable proxy.

#![warn(missing_docs)]

mod handle;
mod records;
mod view;

pub mod etcd;
pub mod memory;
pub mod static_peers;
#[cfg(feature = "testing")]
pub mod testing;

pub use handle::{Registration, Registry, RegistryError, RegistryState, RegistryStatus};
pub use records::{
    is_valid_name, node_key, normalize_prefix, parse_key, service_key, KeyKind, NodeRecord,
    Protocol, ServiceRecord, DEFAULT_WEIGHT, MAX_NAME_LEN,
};
pub use view::{ApplyOutcome, MeshView, NodeMap, RecordChange, ServiceMap, Update};
