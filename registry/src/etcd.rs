//! The etcd backend (docs/registry.md): a supervisor task that keeps this node registered under a
//! lease, keeps a [`MeshView`] of the prefix current, and survives everything etcd does
//! (restart, freeze, compaction, lease expiry) without ever dropping the last known view.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::handle::{Registry, RegistryState, RegistryStatus};
use crate::view::MeshView;

mod backoff;
mod keeper;
mod lease;
mod members;
mod pool;
mod supervisor;
#[cfg(test)]
mod tests;

pub(crate) use backoff::Backoff;

/// Default lease TTL (docs/config.md, `[registry]`): a silent node vanishes within 10 s.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Smallest TTL accepted (docs/config.md, `lease_ttl ≥ 2s`); shorter configured values are raised.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// gRPC (HTTP/2) keep-alive ping interval: without it a frozen etcd stalls a watch silently
/// while the lease expires (measured with etcd 3.4); with 2 s/1 s the failure surfaced in about 2.5 s.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long an HTTP/2 keep-alive ping may go unanswered before the connection is dropped.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// TCP connect timeout per attempt; etcd on a LAN answers in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of each unary request (grant, put, list, revoke); below the default TTL / 3 so
/// a hung request is noticed before the lease is in danger.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// First reconnect delay; doubles (with jitter) up to [`DEFAULT_BACKOFF_MAX`].
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay: a returning etcd is noticed within about this long.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// TLS towards etcd (endpoints must then be `https://`). Files are read at every connect, so
/// rotated certificates are picked up by the next session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA bundle (PEM) that signed etcd's server certificate; system roots are not used.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for etcd's `--client-cert-auth`; needs `key`.
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); needs `cert`.
    pub key: Option<PathBuf>,
}

/// Settings of the etcd backend. Start from [`EtcdConfig::default`].
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of the mesh (a trailing `/` is ignored).
    pub prefix: String,
    /// TTL of this node's lease; kept alive every `lease_ttl / 3`.
    pub lease_ttl: Duration,
    /// TCP connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Deadline of each unary request.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive ping interval (sent while idle too).
    pub keepalive_interval: Duration,
    /// HTTP/2 keep-alive ping answer timeout.
    pub keepalive_timeout: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// TLS, if etcd serves `https://`.
    pub tls: Option<EtcdTls>,
    /// etcd user name and password (auth enabled on etcd).
    pub user: Option<(String, String)>,
}

impl Default for EtcdConfig {
    fn default() -> EtcdConfig {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: "/meshnode".to_string(),
            lease_ttl: DEFAULT_LEASE_TTL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            tls: None,
            user: None,
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("tls", &self.tls)
            .field(
                "user",
                &self.user.as_ref().map(|(name, _)| (name, "<redacted>")),
            )
            .finish()
    }
}

impl EtcdConfig {
    /// Lease TTL in whole seconds as granted: rounded up, at least [`MIN_LEASE_TTL`].
    pub fn lease_ttl_secs(&self) -> u64 {
        let ttl = self.lease_ttl.max(MIN_LEASE_TTL);
        ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)
    }

    /// Interval of lease keep-alives, `ttl / 3` (docs/registry.md); an unanswered keep-alive older
    /// than this breaks the session.
    pub fn keepalive_every(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs()) / 3
    }

    /// Deadline of one request on one member before the next member is tried:
    /// `request_timeout`, but at most `ttl / 3` so a frozen member never holds a lease
    /// keep-alive past its next due time.
    pub fn attempt_timeout(&self) -> Duration {
        self.request_timeout.min(self.keepalive_every())
    }

    /// etcd-client options: HTTP/2 keep-alive (also while idle), timeouts, auth and TLS.
    /// Reads the TLS files, hence the `Result`.
    pub fn connect_options(&self) -> Result<ConnectOptions, String> {
        let mut opts = ConnectOptions::new()
            .with_keep_alive(self.keepalive_interval, self.keepalive_timeout)
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(self.connect_timeout);
        if let Some((name, password)) = &self.user {
            opts = opts
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.options()?);
        }
        Ok(opts)
    }
}

impl EtcdTls {
    fn options(&self) -> Result<TlsOptions, String> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| format!("etcd TLS {what} {}: {e}", path.display()))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca, "ca")?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read(cert, "cert")?, read(key, "key")?));
            }
            (None, None) => {}
            _ => return Err("etcd TLS needs both cert and key, or neither".to_string()),
        }
        Ok(tls)
    }
}

/// Starts the supervisor task and returns at once (never blocks on etcd being up). Must be
/// called within a Tokio runtime. The view starts empty and the state `connecting`.
pub fn start(cfg: EtcdConfig) -> Registry {
    let mut status = RegistryStatus::new("etcd", RegistryState::Connecting);
    status.lease_ttl_s = cfg.lease_ttl_secs();
    let (handle, ends) = Registry::channel(MeshView::new(), status);
    let supervisor = supervisor::Supervisor::new(cfg, ends);
    // The registry runs on a thread and runtime of its own: applying a burst of watch events,
    // TLS handshakes with etcd and JSON decoding never take a turn from the executor that
    // carries tunnels (on 1-2 CPU hosts the node's runtime is one thread), and at a lower
    // priority, so the kernel runs the data plane first when both want a CPU. The data plane
    // only sees the published view. It ends with the supervisor (shutdown, or every handle
    // dropped).
    let spawned = std::thread::Builder::new()
        .name("meshnode-registry".into())
        .spawn(move || {
            lower_priority();
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(supervisor.run()),
                Err(e) => tracing::error!(error = %e, "cannot start the registry's runtime"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the registry thread");
    }
    handle
}

/// How many nice levels below the process the registry thread runs. Against a busy thread at
/// the process's priority it still gets about a tenth of a CPU (the kernel's weights for 10
/// levels apart), far more than keep-alives and a burst's decoding need, and it no longer
/// takes the CPU from the data plane in a burst: on a 2-core host shared with other work,
/// new-connection p99 during a registry burst 0.7-1.6 × its control instead of 0.9-3.2 × in
/// four interleaved runs (bench/RESULTS.md, Session 5).
const NICE_BELOW_PROCESS: i32 = 10;

/// Lowers the calling thread's priority by [`NICE_BELOW_PROCESS`] (Linux, where nice is per
/// thread; the runtime's helper threads, started from it, inherit it). Best effort: a refusal
/// leaves the priority as it was.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let tid = rustix::thread::gettid();
        let lowered = getpriority_process(Some(tid))
            .and_then(|nice| setpriority_process(Some(tid), (nice + NICE_BELOW_PROCESS).min(19)));
        if let Err(e) = lowered {
            tracing::debug!(error = %e, "registry thread: priority left as it was");
        }
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_registry_thread_runs_ten_nice_levels_below_the_process() {
        use rustix::process::getpriority_process;
        let (before, after) = std::thread::spawn(|| {
            let tid = rustix::thread::gettid();
            let before = getpriority_process(Some(tid)).expect("getpriority");
            lower_priority();
            (before, getpriority_process(Some(tid)).expect("getpriority"))
        })
        .join()
        .expect("thread");
        assert_eq!(after, (before + NICE_BELOW_PROCESS).min(19));
        // Only that thread: this one is as it was.
        let here = getpriority_process(Some(rustix::thread::gettid())).expect("getpriority");
        assert_eq!(here, before);
    }

    #[test]
    fn ttl_rounds_up_and_has_a_floor() {
        let mut cfg = EtcdConfig::default();
        assert_eq!(cfg.lease_ttl_secs(), 10);
        cfg.lease_ttl = Duration::from_millis(2500);
        assert_eq!(cfg.lease_ttl_secs(), 3);
        assert_eq!(cfg.keepalive_every(), Duration::from_secs(1));
        cfg.lease_ttl = Duration::from_millis(500);
        assert_eq!(cfg.lease_ttl_secs(), 2);
    }

    #[test]
    fn debug_hides_the_password() {
        let cfg = EtcdConfig {
            user: Some(("root".into(), "hunter2".into())),
            ..EtcdConfig::default()
        };
        let text = format!("{cfg:?}");
        assert!(text.contains("root") && !text.contains("hunter2"), "{text}");
    }

    #[test]
    fn tls_needs_cert_and_key_together() {
        let tls = EtcdTls {
            cert: Some("/nonexistent.pem".into()),
            ..EtcdTls::default()
        };
        assert!(tls.options().is_err());
        let tls = EtcdTls {
            ca: Some("/nonexistent/ca.pem".into()),
            ..EtcdTls::default()
        };
        let err = tls.options().err().unwrap_or_default();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
