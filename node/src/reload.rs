//! SIGHUP reload: services, allow lists, outbounds and certificates change without dropping
//! established tunnels. Settings that shape the node itself need a restart and are reported.

use crate::config::Config;
use crate::exit::{self, Failure};
use crate::node::{lock, Node};
use crate::outbound::OutboundListener;

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

        // Outbound listeners: stop removed ones, start new ones; unchanged ones keep running.
        let wanted: Vec<(String, std::net::SocketAddr)> = new
            .outbound
            .iter()
            .map(|o| (o.service.clone(), o.listen))
            .collect();
        let (mut kept, mut removed) = (Vec::new(), 0usize);
        {
            let mut current = lock(&self.outbounds);
            for o in current.drain(..) {
                if wanted
                    .iter()
                    .any(|(s, l)| *s == o.service && *l == o.configured)
                {
                    kept.push(o);
                } else {
                    o.task.abort();
                    removed += 1;
                }
            }
        }
        let mut added = 0usize;
        for (service, listen) in &wanted {
            if kept
                .iter()
                .any(|o| &o.service == service && o.configured == *listen)
            {
                continue;
            }
            match OutboundListener::start(&self.outbound, &self.drain_watch, service, *listen).await
            {
                Ok(l) => {
                    kept.push(l);
                    added += 1;
                }
                Err(e) => {
                    *lock(&self.outbounds) = kept;
                    return Err(Failure::new(
                        exit::UNAVAILABLE,
                        format!("outbound {service}: cannot bind {listen}: {e}"),
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
