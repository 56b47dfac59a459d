//! SIGHUP reload: services, allow lists, outbounds and certificates change without dropping
//! established tunnels. Settings that shape the node itself need a restart and are reported.

use crate::config::Config;
use crate::exit::{self, Failure};
use crate::node::{lock, Node};
use crate::outbound_port::OutboundListener;

impl Node {
    /// Applies a new, already validated config. Tunnels in flight are untouched: inbound ones
    /// keep the target they connected to; outbound listeners that stay keep running.
    /// Returns a one-line summary of what changed.
    pub async fn reload(&self, new: Config) -> Result<String, Failure> {
        let old = &self.config;
        if new.node.name != old.node.name {
            return Err(Failure::config(
                "node.name cannot change on reload; restart the node",
            ));
        }
        let mut needs_restart = Vec::new();
        if new.node.listen != old.node.listen || new.node.advertise != old.node.advertise {
            needs_restart.push("node.listen/advertise");
        }
        if new.admin.listen != old.admin.listen {
            needs_restart.push("admin.listen");
        }
        if new.http_proxy.as_ref().map(|p| p.listen) != old.http_proxy.as_ref().map(|p| p.listen) {
            needs_restart.push("http_proxy");
        }
        if new.tls.ca != old.tls.ca {
            needs_restart.push("tls.ca");
        }
        if format!("{:?}", new.registry) != format!("{:?}", old.registry) {
            needs_restart.push("registry");
        }
        if format!("{:?}", new.tracing) != format!("{:?}", old.tracing) {
            needs_restart.push("tracing");
        }

        // Certificates first: a bad certificate fails the reload before anything changed.
        self.endpoint
            .identity()
            .reload_files(&new.tls.cert, &new.tls.key)
            .map_err(|e| Failure::config(format!("tls: {e}")))?;

        // Outbound listeners: stop removed (or changed) ones, start new ones; unchanged ones
        // keep running. A stopped one is waited for, so that its address is free again for a
        // listener of another mode or service there.
        let (mut kept, mut stopped) = (Vec::new(), Vec::new());
        {
            let mut current = lock(&self.outbounds);
            for o in current.drain(..) {
                if new.outbound.iter().any(|c| o.serves(c)) {
                    kept.push(o);
                } else {
                    o.task.abort();
                    stopped.push(o.task);
                }
            }
        }
        let removed = stopped.len();
        for task in stopped {
            let _ = task.await;
        }
        let mut added = 0usize;
        for config in &new.outbound {
            if kept.iter().any(|o| o.serves(config)) {
                continue;
            }
            match OutboundListener::start(&self.ports, &self.drain_watch, config).await {
                Ok(l) => {
                    kept.push(l);
                    added += 1;
                }
                Err(e) => {
                    *lock(&self.outbounds) = kept;
                    return Err(Failure::new(
                        exit::UNAVAILABLE,
                        format!(
                            "outbound {}: cannot bind {}: {e}",
                            config.service, config.listen
                        ),
                    ));
                }
            }
        }
        *lock(&self.outbounds) = kept;

        // Services and allow lists: swap the table new streams read, then re-register.
        let changed_services = self.local.replace(&new.service);
        if changed_services {
            self.registry
                .register(self.info.registration(&self.local))
                .await
                .map_err(|e| Failure::config(format!("registration refused: {e}")))?;
        }
        let mut summary = format!(
            "reloaded: {} service(s){}, outbounds +{added} -{removed}, certificate re-read",
            new.service.len(),
            if changed_services {
                " (changed, re-registered)"
            } else {
                ""
            },
        );
        if !needs_restart.is_empty() {
            summary.push_str(&format!(
                "; changes to {} take effect after a restart",
                needs_restart.join(", ")
            ));
        }
        Ok(summary)
    }
}
