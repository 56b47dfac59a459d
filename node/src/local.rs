//! The services this node hosts, and the one authoriser every inbound protocol asks: is the
//! node taking work, is the service hosted here (on that port), may this caller use it; then
//! the connect to the service's target.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ServiceConfig;
use crate::drain;
use crate::refusal::{Refusal, RefusalKind};

/// Deadline for connecting to a local target when the caller sent none (and the ceiling of
/// one it sent); also the HTTP client's connect timeout.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The hosted services (swapped whole on reload) and the authoriser.
pub struct LocalServices {
    node: String,
    services: RwLock<Arc<HashMap<String, Arc<ServiceConfig>>>>,
    drain: drain::Watch,
}

impl LocalServices {
    /// The services of `node` from its config.
    pub fn new(node: &str, services: &[ServiceConfig], drain: drain::Watch) -> LocalServices {
        LocalServices {
            node: node.to_string(),
            services: RwLock::new(Arc::new(table(services))),
            drain,
        }
    }

    /// The current table.
    pub fn get(&self) -> Arc<HashMap<String, Arc<ServiceConfig>>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the table (reload); tunnels in flight keep the target they connected to.
    /// Returns whether anything changed.
    pub fn replace(&self, services: &[ServiceConfig]) -> bool {
        let new = table(services);
        let changed = sorted_debug(&self.get()) != sorted_debug(&new);
        *self.services.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        changed
    }

    /// Whether `peer` may use `service` now (on `port` when the protocol names one). Call it
    /// with a [`drain::Hold`] taken, so a drain beginning after the check waits for the work.
    pub fn authorise(
        &self,
        peer: &str,
        service: &str,
        port: Option<u16>,
    ) -> Result<Arc<ServiceConfig>, Refusal> {
        if self.drain.is_draining() {
            return Err(Refusal::new(RefusalKind::Draining, "node draining"));
        }
        let local = self.get();
        let Some(svc) = local.get(service) else {
            return Err(Refusal::new(
                RefusalKind::UnknownService,
                format!("service {service} is not hosted on {}", self.node),
            ));
        };
        if let Some(port) = port.filter(|p| *p != svc.port()) {
            return Err(Refusal::new(
                RefusalKind::UnknownPort,
                format!("service {service} does not advertise port {port}"),
            ));
        }
        if let Some(allow) = &svc.allow {
            if !allow.iter().any(|a| a == peer) {
                return Err(Refusal::new(
                    RefusalKind::Forbidden,
                    format!("node {peer} may not call {service}"),
                ));
            }
        }
        Ok(svc.clone())
    }

    /// [`LocalServices::authorise`], then a TCP connect to the service's target within the
    /// caller's deadline (at most [`TARGET_CONNECT_TIMEOUT`]).
    pub async fn authorise_and_connect(
        &self,
        peer: &str,
        service: &str,
        port: u16,
        deadline_ms: Option<u32>,
    ) -> Result<TcpStream, Refusal> {
        let svc = self.authorise(peer, service, Some(port))?;
        let timeout = deadline_ms
            .map(|ms| Duration::from_millis(u64::from(ms)))
            .unwrap_or(TARGET_CONNECT_TIMEOUT)
            .min(TARGET_CONNECT_TIMEOUT);
        match tokio::time::timeout(timeout, TcpStream::connect(svc.target)).await {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(e)) => Err(Refusal::new(
                RefusalKind::TargetRefused,
                format!("target {} refused: {e}", svc.target),
            )),
            Err(_) => Err(Refusal::new(
                RefusalKind::TargetTimeout,
                format!(
                    "target {} did not answer within {} ms",
                    svc.target,
                    timeout.as_millis()
                ),
            )),
        }
    }
}

fn table(services: &[ServiceConfig]) -> HashMap<String, Arc<ServiceConfig>> {
    services
        .iter()
        .map(|s| (s.name.clone(), Arc::new(s.clone())))
        .collect()
}

fn sorted_debug(m: &HashMap<String, Arc<ServiceConfig>>) -> Vec<String> {
    let mut v: Vec<String> = m.values().map(|s| format!("{s:?}")).collect();
    v.sort();
    v
}
