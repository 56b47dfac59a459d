//! Admission of application connections at the node's front-ends (`[[outbound]]` ports and the
//! `[http_proxy]`): a node-wide cap and an optional cap per listener, checked at accept, so the
//! node refuses the excess cleanly (closed at once, counted) before the file-descriptor limit
//! is reached and accepts start failing for everyone, the admin API included. Accept errors
//! back off and are logged at a bounded rate. (docs/behaviour.md, Limits.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::metrics::{Counter, Gauge};
use meshnode_transport::admission::RateLimitedLog;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::Telemetry;

/// File descriptors kept out of the default node-wide cap: peers' UDP socket, etcd, the admin
/// API, logs, the callee's target connections beyond half the limit.
pub const FD_RESERVE: u64 = 256;
/// The smallest default node-wide cap, whatever the fd limit says.
pub const MIN_DEFAULT_CAP: u64 = 64;

/// The default node-wide cap for a soft fd limit of `nofile`: half of what is left after the
/// reserve (each application connection is one descriptor here, and this node may hold as many
/// target connections for its peers), at least [`MIN_DEFAULT_CAP`].
pub fn default_node_cap(nofile: u64) -> usize {
    let cap = (nofile.saturating_sub(FD_RESERVE) / 2).max(MIN_DEFAULT_CAP);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// The node-wide cap, shared by every front-end listener of a node.
pub struct NodeAdmission {
    slots: Arc<Semaphore>,
    cap: usize,
    held: Gauge,
    telemetry: Arc<Telemetry>,
}

impl NodeAdmission {
    /// At most `cap` application connections at once on this node.
    pub fn new(cap: usize, telemetry: Arc<Telemetry>) -> Arc<NodeAdmission> {
        let cap = cap.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(NodeAdmission {
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            held: telemetry.metrics().gauge("meshnode_app_connections", &[]),
            telemetry,
        })
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The admission of one listener, at `listen`, with its own cap if any.
    pub fn listener(self: &Arc<Self>, listen: SocketAddr, cap: Option<usize>) -> ListenerAdmission {
        let label = listen.to_string();
        let metrics = self.telemetry.metrics();
        ListenerAdmission {
            node: self.clone(),
            own: cap.map(|c| Arc::new(Semaphore::new(c.clamp(1, Semaphore::MAX_PERMITS)))),
            refused_node: metrics.counter(
                "meshnode_connections_refused_total",
                &[("listener", &label), ("reason", "node_limit")],
            ),
            refused_listener: metrics.counter(
                "meshnode_connections_refused_total",
                &[("listener", &label), ("reason", "listener_limit")],
            ),
            log: RateLimitedLog::default(),
            listen,
        }
    }
}

/// One listener's admission: its own cap (if any), then the node's.
pub struct ListenerAdmission {
    node: Arc<NodeAdmission>,
    own: Option<Arc<Semaphore>>,
    refused_node: Counter,
    refused_listener: Counter,
    log: RateLimitedLog,
    listen: SocketAddr,
}

/// Held by an admitted connection until it ends.
pub struct Admitted {
    _own: Option<OwnedSemaphorePermit>,
    _node: OwnedSemaphorePermit,
    held: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.held.decrement(1.0);
    }
}

impl ListenerAdmission {
    /// Admits `tcp`, or refuses it: closed at once with a reset, counted, logged at a bounded
    /// rate.
    pub fn admit(&self, tcp: TcpStream, client: SocketAddr) -> Option<(TcpStream, Admitted)> {
        let own = match &self.own {
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.refuse(tcp, client, &self.refused_listener, "listener_limit");
                    return None;
                }
            },
            None => None,
        };
        let Ok(node) = self.node.slots.clone().try_acquire_owned() else {
            self.refuse(tcp, client, &self.refused_node, "node_limit");
            return None;
        };
        self.node.held.increment(1.0);
        Some((
            tcp,
            Admitted {
                _own: own,
                _node: node,
                held: self.node.held.clone(),
            },
        ))
    }

    fn refuse(&self, tcp: TcpStream, client: SocketAddr, counter: &Counter, why: &str) {
        counter.increment(1);
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            tracing::warn!(listen = %self.listen, %client, reason = why, node_cap = self.node.cap, suppressed, "application connection refused: at the connection limit");
        }
        reset(tcp);
    }
}

/// Closes `tcp` with RST: the client sees a refusal at once, and no TIME_WAIT is left here.
pub fn reset(tcp: TcpStream) {
    // Linger zero makes close send RST; it does not block, unlike a non-zero linger.
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Accepts connections on `listener` until a drain begins: each one `admission` lets in is
/// served on a task of its own by the future `serve` makes of it, holding its slot until that
/// ends; accept errors pause the loop ([`AcceptBackoff`], logged as `what`). The accept loop of
/// every front-end (the HTTP proxy, each `[[outbound]]` port).
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    drain: &crate::drain::Watch,
    admission: &ListenerAdmission,
    what: &str,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.signalled() => return,
        };
        match accepted {
            Ok((tcp, client)) => {
                backoff.succeeded();
                let Some((tcp, admitted)) = admission.admit(tcp, client) else {
                    continue;
                };
                let served = serve(tcp, client);
                tokio::spawn(async move {
                    served.await;
                    drop(admitted);
                });
            }
            Err(e) => {
                let pause = backoff.failed(what, &e);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The pause after a failed accept (EMFILE, ENFILE, ENOBUFS...): doubling from 5 ms to 1 s
/// while accepts keep failing, back to nothing after one succeeds; the failure is logged at a
/// bounded rate (a full fd table made one line per failed accept, 85 a second).
pub struct AcceptBackoff {
    delay: Duration,
    log: RateLimitedLog,
}

/// First pause after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            delay: Duration::ZERO,
            log: RateLimitedLog::default(),
        }
    }
}

impl AcceptBackoff {
    /// An accept succeeded.
    pub fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// An accept failed with `e` on `listen`: returns how long to wait before the next.
    pub fn failed(&mut self, listen: &str, e: &std::io::Error) -> Duration {
        self.delay = (self.delay * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            tracing::warn!(listen, error = %e, pause_ms = self.delay.as_millis() as u64, suppressed, "accept failed");
        }
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_is_half_the_descriptors_past_the_reserve() {
        assert_eq!(default_node_cap(1024), 384);
        assert_eq!(default_node_cap(1_048_576), 524_160);
        assert_eq!(default_node_cap(100), MIN_DEFAULT_CAP as usize);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::other("EMFILE");
        assert_eq!(b.failed("x", &e), Duration::from_millis(5));
        assert_eq!(b.failed("x", &e), Duration::from_millis(10));
        for _ in 0..20 {
            b.failed("x", &e);
        }
        assert_eq!(b.failed("x", &e), ACCEPT_BACKOFF_MAX);
        b.succeeded();
        assert_eq!(b.failed("x", &e), Duration::from_millis(5));
    }
}
