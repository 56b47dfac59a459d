//! Semantic checks of a parsed config. Every error names the field at fault.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `transport.keep_alive`: at least 10 ms (a zero interval spins a core on an idle node).
const KEEP_ALIVE_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(600));
/// `transport.idle_timeout`: long enough for a keep-alive and its answer, at most 10 minutes.
const IDLE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(600));
/// `transport.connect_timeout` and `open_timeout`: a zero deadline never lets a tunnel open.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(600));

use meshnode_proto::identity::{validate_node_name, validate_service_name};

use super::{Advertise, Backend, Config};

/// A config that cannot be used. Always exit code 78 (EX_CONFIG).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type.
    #[error("{}{message}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Parse {
        /// The file, when known.
        path: Option<PathBuf>,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{}{field}: {reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, when known.
        path: Option<PathBuf>,
        /// Dotted field name, e.g. `service[1].name`.
        field: String,
        /// What is wrong and what would be right.
        reason: String,
    },
}

impl ConfigError {
    /// Attaches the file name to an error from [`Config::parse`].
    pub fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(file.to_path_buf()),
                message,
            },
            ConfigError::Invalid { field, reason, .. } => ConfigError::Invalid {
                path: Some(file.to_path_buf()),
                field,
                reason,
            },
            other => other,
        }
    }
}

/// Largest `max_connections` (node, outbound port, proxy): past any file-descriptor limit.
const MAX_CONNECTIONS: usize = 10_000_000;

/// Largest `[registry]` CA, certificate or key file: a PEM bundle is a few KiB.
const MAX_REGISTRY_PEM: u64 = 1 << 20;
/// Largest `registry.password_file`.
pub(crate) const MAX_REGISTRY_PASSWORD: u64 = 4 << 10;

/// Smallest `transport.socket_buffer` and `transport.send_window`: below 64 KiB a single GSO
/// batch no longer fits.
const MIN_TRANSPORT_BUFFER: u64 = 64 << 10;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: None,
        field: field.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Checks every rule the types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_node_name(&self.node.name).map_err(|e| invalid("node.name", e.to_string()))?;
        match self.node.advertise {
            Some(Advertise::Auto) => {}
            Some(Advertise::Addr(a)) if a.ip().is_unspecified() || a.port() == 0 => {
                return Err(invalid(
                    "node.advertise",
                    format!(
                        "{a} cannot be dialled; give the address other nodes reach this node at"
                    ),
                ))
            }
            // Port 0 is allowed (tests, the demo): the node then advertises the bound port.
            None if self.node.listen.ip().is_unspecified() => {
                return Err(invalid(
                    "node.advertise",
                    format!(
                        "required because node.listen ({}) is not an address other nodes can dial",
                        self.node.listen
                    ),
                ))
            }
            _ => {}
        }
        if self.node.drain_timeout > Duration::from_secs(3600) {
            return Err(invalid("node.drain_timeout", "must be at most 1h"));
        }
        let idle = self.node.http_idle_timeout;
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&idle) {
            return Err(invalid(
                "node.http_idle_timeout",
                format!("must be between 1s and 24h (got {idle:?})"),
            ));
        }
        self.validate_registry()?;
        self.validate_services()?;
        let caps = std::iter::once((
            "node.max_connections".to_string(),
            self.node.max_connections,
        ))
        .chain(
            self.outbound
                .iter()
                .enumerate()
                .map(|(i, o)| (format!("outbound[{i}].max_connections"), o.max_connections)),
        )
        .chain(
            self.http_proxy
                .iter()
                .map(|p| ("http_proxy.max_connections".to_string(), p.max_connections)),
        );
        for (field, cap) in caps {
            if cap.is_some_and(|c| !(1..=MAX_CONNECTIONS).contains(&c)) {
                return Err(invalid(field, format!("must be 1-{MAX_CONNECTIONS}")));
            }
        }
        if let Some(t) = &self.tracing {
            t.validate()?;
        }
        let mut listeners = HashSet::new();
        listeners.insert(self.admin.listen);
        for (i, o) in self.outbound.iter().enumerate() {
            validate_service_name(&o.service)
                .map_err(|e| invalid(format!("outbound[{i}].service"), e.to_string()))?;
            if let Some(mode) = &o.mode {
                mode.parse::<super::OutboundMode>()
                    .map_err(|e| invalid(format!("outbound[{i}].mode"), e))?;
            }
            // Port 0 (tests, demo) lets the kernel choose, so it never collides.
            if o.listen.port() != 0 && !listeners.insert(o.listen) {
                return Err(invalid(
                    format!("outbound[{i}].listen"),
                    format!("{} is already used by another listener", o.listen),
                ));
            }
        }
        if let Some(p) = &self.http_proxy {
            if p.listen.port() != 0 && !listeners.insert(p.listen) {
                return Err(invalid(
                    "http_proxy.listen",
                    format!("{} is already used by another listener", p.listen),
                ));
            }
        }
        let t = &self.transport;
        // Durations that validate but break the node: a zero keep-alive spins a core, a zero
        // connect or open timeout never lets a tunnel open.
        for (field, value, (min, max)) in [
            ("transport.keep_alive", t.keep_alive, KEEP_ALIVE_RANGE),
            ("transport.idle_timeout", t.idle_timeout, IDLE_TIMEOUT_RANGE),
            (
                "transport.connect_timeout",
                t.connect_timeout,
                TIMEOUT_RANGE,
            ),
            ("transport.open_timeout", t.open_timeout, TIMEOUT_RANGE),
        ] {
            if let Some(v) = value {
                if v < min || v > max {
                    return Err(invalid(
                        field,
                        format!(
                            "must be between {} and {} (got {})",
                            humantime::format_duration(min),
                            humantime::format_duration(max),
                            humantime::format_duration(v)
                        ),
                    ));
                }
            }
        }
        // Against the effective values: one key set and the other left at its default counts.
        let effective = self.transport();
        if (t.keep_alive.is_some() || t.idle_timeout.is_some())
            && effective.keep_alive >= effective.idle_timeout
        {
            return Err(invalid(
                "transport.keep_alive",
                format!(
                    "must be shorter than transport.idle_timeout ({})",
                    humantime::format_duration(effective.idle_timeout)
                ),
            ));
        }
        for (field, value) in [
            ("transport.max_concurrent_streams", t.max_concurrent_streams),
            (
                "transport.initial_concurrent_streams",
                t.initial_concurrent_streams,
            ),
            (
                "transport.handshake_retry_threshold",
                t.handshake_retry_threshold,
            ),
            ("transport.max_handshakes", t.max_handshakes),
            (
                "transport.max_handshakes_per_source",
                t.max_handshakes_per_source,
            ),
            ("transport.handshake_rate", t.handshake_rate),
            (
                "transport.handshake_rate_per_source",
                t.handshake_rate_per_source,
            ),
            ("transport.max_peer_connections", t.max_peer_connections),
        ] {
            if value == Some(0) {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if let Some(c) = &t.congestion {
            if let Err(e) = c.parse::<meshnode_transport::config::Congestion>() {
                return Err(invalid("transport.congestion", e.to_string()));
            }
        }
        if t.socket_buffer
            .is_some_and(|b| b < MIN_TRANSPORT_BUFFER as usize)
        {
            return Err(invalid(
                "transport.socket_buffer",
                format!("must be at least {MIN_TRANSPORT_BUFFER} bytes"),
            ));
        }
        if t.stream_window
            .is_some_and(|b| u64::from(b) < MIN_TRANSPORT_BUFFER)
        {
            return Err(invalid(
                "transport.stream_window",
                format!("must be at least {MIN_TRANSPORT_BUFFER} bytes"),
            ));
        }
        if let Some(crate::config::AckDelay::Requested(d)) = t.max_ack_delay {
            let (min, max) = (
                meshnode_transport::config::MIN_MAX_ACK_DELAY,
                Duration::from_millis(25),
            );
            if d < min || d > max {
                return Err(invalid(
                    "transport.max_ack_delay",
                    format!("must be between {min:?} and {max:?}, or \"off\""),
                ));
            }
        }
        if t.send_window.is_some_and(|b| b < MIN_TRANSPORT_BUFFER) {
            return Err(invalid(
                "transport.send_window",
                format!("must be at least {MIN_TRANSPORT_BUFFER} bytes"),
            ));
        }
        Ok(())
    }

    fn validate_registry(&self) -> Result<(), ConfigError> {
        let r = &self.registry;
        if r.lease_ttl < Duration::from_secs(2) {
            return Err(invalid("registry.lease_ttl", "must be at least 2s"));
        }
        if !r.prefix.starts_with('/') || r.prefix.len() < 2 || r.prefix.ends_with('/') {
            return Err(invalid(
                "registry.prefix",
                format!(
                    "{:?} must start with '/', not end with '/', e.g. \"/meshnode\"",
                    r.prefix
                ),
            ));
        }
        match r.backend {
            Backend::Etcd => {
                if r.endpoints.is_empty() {
                    return Err(invalid(
                        "registry.endpoints",
                        "needs at least one etcd endpoint",
                    ));
                }
                for (i, e) in r.endpoints.iter().enumerate() {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(invalid(
                            format!("registry.endpoints[{i}]"),
                            format!("{e:?} must be a URL such as \"http://127.0.0.1:2379\""),
                        ));
                    }
                }
                if r.cert.is_some() != r.key.is_some() {
                    return Err(invalid(
                        if r.cert.is_some() {
                            "registry.key"
                        } else {
                            "registry.cert"
                        },
                        "cert and key go together (etcd client certificate)",
                    ));
                }
                let tls = r.ca.is_some() || r.cert.is_some();
                if let Some(i) = r
                    .endpoints
                    .iter()
                    .position(|e| tls && !e.starts_with("https://"))
                {
                    return Err(invalid(
                        format!("registry.endpoints[{i}]"),
                        "must be https:// when registry.ca or registry.cert is set",
                    ));
                }
                if r.username.is_some() != r.password_file.is_some() {
                    return Err(invalid(
                        "registry.password_file",
                        "username and password_file go together",
                    ));
                }
                if !r.peers.is_empty() {
                    return Err(invalid(
                        "registry.peers",
                        "only used with backend = \"static\"",
                    ));
                }
            }
            Backend::Static => {
                let mut names = HashSet::new();
                for (i, p) in r.peers.iter().enumerate() {
                    validate_node_name(&p.name)
                        .map_err(|e| invalid(format!("registry.peers[{i}].name"), e.to_string()))?;
                    if p.name == self.node.name || !names.insert(&p.name) {
                        return Err(invalid(
                            format!("registry.peers[{i}].name"),
                            format!("{:?} is listed twice (or is this node)", p.name),
                        ));
                    }
                    for (j, s) in p.services.iter().enumerate() {
                        validate_service_name(&s.name).map_err(|e| {
                            invalid(
                                format!("registry.peers[{i}].services[{j}].name"),
                                e.to_string(),
                            )
                        })?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks the `[registry]` files as `[tls]`'s are checked, before anything starts: each
    /// exists, is a regular file of bounded size and readable; the key and the password
    /// file are not readable by group or others. Paths must already be resolved.
    pub(super) fn check_registry_files(&self) -> Result<(), ConfigError> {
        let r = &self.registry;
        if r.backend != Backend::Etcd {
            return Ok(());
        }
        let files = [
            ("registry.ca", &r.ca, false, MAX_REGISTRY_PEM),
            ("registry.cert", &r.cert, false, MAX_REGISTRY_PEM),
            ("registry.key", &r.key, true, MAX_REGISTRY_PEM),
            (
                "registry.password_file",
                &r.password_file,
                true,
                MAX_REGISTRY_PASSWORD,
            ),
        ];
        for (field, path, secret, max) in files {
            if let Some(path) = path {
                check_file(field, path, secret, max)?;
            }
        }
        Ok(())
    }

    /// Checks `node.state_dir` as `run` will use it: a directory, or a path whose nearest
    /// existing ancestor is a directory (`run` creates the rest). Paths must already be resolved.
    pub(super) fn check_state_dir(&self) -> Result<(), ConfigError> {
        let dir = &self.node.state_dir;
        let shown = dir.display();
        let mut at = dir.as_path();
        loop {
            match std::fs::metadata(at) {
                Ok(m) if m.is_dir() => return Ok(()),
                Ok(_) if at == dir.as_path() => {
                    return Err(invalid(
                        "node.state_dir",
                        format!("{shown} exists and is not a directory"),
                    ))
                }
                Ok(_) => {
                    return Err(invalid(
                        "node.state_dir",
                        format!(
                            "{shown} cannot be created: {} is not a directory",
                            at.display()
                        ),
                    ))
                }
                // Not there, or below a file: look at the parent.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    match at.parent() {
                        Some(parent) if !parent.as_os_str().is_empty() => at = parent,
                        // A relative path with no existing component: created in the working directory.
                        _ => return Ok(()),
                    }
                }
                Err(e) => return Err(invalid("node.state_dir", format!("{shown}: {e}"))),
            }
        }
    }

    fn validate_services(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, s) in self.service.iter().enumerate() {
            validate_service_name(&s.name)
                .map_err(|e| invalid(format!("service[{i}].name"), e.to_string()))?;
            if !names.insert(&s.name) {
                return Err(invalid(
                    format!("service[{i}].name"),
                    format!("service {:?} is defined twice", s.name),
                ));
            }
            if s.target.port() == 0 {
                return Err(invalid(format!("service[{i}].target"), "needs a port"));
            }
            if s.port() == 0 {
                return Err(invalid(format!("service[{i}].port"), "must be 1-65535"));
            }
            if s.weight == 0 || s.weight > 10_000 {
                return Err(invalid(format!("service[{i}].weight"), "must be 1-10000"));
            }
            for (j, n) in s.allow.iter().flatten().enumerate() {
                validate_node_name(n)
                    .map_err(|e| invalid(format!("service[{i}].allow[{j}]"), e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// One `[registry]` file: see [`Config::check_registry_files`].
fn check_file(field: &str, path: &Path, secret: bool, max: u64) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| invalid(field, format!("{shown}: {e}")))?;
    if !meta.is_file() {
        return Err(invalid(field, format!("{shown} is not a regular file")));
    }
    if meta.len() > max {
        return Err(invalid(
            field,
            format!("{shown} is {} bytes; at most {max} expected", meta.len()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if secret && mode & 0o077 != 0 {
        return Err(invalid(
            field,
            format!(
                "{shown} is readable by group or others (mode {mode:04o}); run `chmod 600 {shown}`"
            ),
        ));
    }
    std::fs::File::open(path).map_err(|e| invalid(field, format!("{shown}: {e}")))?;
    if meta.len() == 0 {
        return Err(invalid(field, format!("{shown} is empty")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[node]
name = "node-a"
listen = "127.0.0.1:4433"
state_dir = "/tmp/x"
[tls]
ca = "ca.pem"
cert = "node-a.pem"
key = "node-a.key"
"#;

    fn err(extra: &str) -> String {
        match Config::parse(&format!("{BASE}{extra}")) {
            Ok(_) => panic!("config with {extra:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let cfg = Config::parse(BASE).expect("valid");
        assert_eq!(
            cfg.advertise(),
            Some("127.0.0.1:4433".parse().expect("addr"))
        );
        assert_eq!(cfg.registry.backend, Backend::Etcd);
        assert_eq!(cfg.node.drain_timeout, Duration::from_secs(10));
        assert_eq!(cfg.admin.listen.to_string(), "127.0.0.1:15000");
    }

    #[test]
    fn durations_that_break_the_node_are_refused_with_the_range() {
        for (extra, field) in [
            ("keep_alive = \"0s\"", "transport.keep_alive"),
            ("connect_timeout = \"0s\"", "transport.connect_timeout"),
            ("open_timeout = \"0ms\"", "transport.open_timeout"),
            ("idle_timeout = \"1ms\"", "transport.idle_timeout"),
        ] {
            let e = err(&format!("[transport]\n{extra}\n"));
            assert!(
                e.contains(field) && e.contains("must be between"),
                "{extra}: {e}"
            );
        }
        // keep_alive alone, against the default idle timeout.
        let e = err("[transport]\nkeep_alive = \"5m\"\n");
        assert!(e.contains("shorter than transport.idle_timeout"), "{e}");
        for key in [
            "max_handshakes",
            "handshake_rate",
            "initial_concurrent_streams",
            "max_peer_connections",
        ] {
            let e = err(&format!("[transport]\n{key} = 0\n"));
            assert!(
                e.contains(&format!("transport.{key}: must be at least 1")),
                "{e}"
            );
        }
        let t = Config::parse(&format!(
            "{BASE}[transport]\nmax_handshakes = 64\ninitial_concurrent_streams = 512\n\
             max_peer_connections = 10\n"
        ))
        .expect("valid")
        .transport();
        assert_eq!(
            (
                t.max_handshakes,
                t.initial_concurrent_streams,
                t.max_peer_connections
            ),
            (64, 512, 10)
        );
    }

    #[test]
    fn transport_tuning_keys_apply_and_bad_values_are_named() {
        let cfg = Config::parse(&format!(
            "{BASE}[transport]\ncongestion = \"bbr\"\nstream_window = 524288\n\
             send_window = 2097152\nsocket_buffer = 1048576\n"
        ))
        .expect("valid");
        let t = cfg.transport();
        assert_eq!(t.congestion, meshnode_transport::config::Congestion::Bbr);
        assert_eq!(t.stream_window, 524_288);
        assert_eq!(t.send_window, 2_097_152);
        assert_eq!(t.socket_buffer, 1_048_576);
        let d = Config::parse(BASE).expect("valid").transport();
        assert_eq!(d, meshnode_transport::TransportConfig::default());

        let e = err("[transport]\ncongestion = \"vegas\"\n");
        assert!(e.contains("transport.congestion"), "{e}");
        assert!(e.contains("vegas") && e.contains("cubic"), "{e}");
        for bad in ["\"500us\"", "\"26ms\""] {
            let e = err(&format!("[transport]\nmax_ack_delay = {bad}\n"));
            assert!(e.contains("transport.max_ack_delay"), "{e}");
        }
        let e = err("[transport]\nmax_ack_delay = \"soon\"\n");
        assert!(e.contains("max_ack_delay") && e.contains("off"), "{e}");
        for (value, want) in [
            ("\"off\"", None),
            ("\"5ms\"", Some(Duration::from_millis(5))),
        ] {
            let cfg = Config::parse(&format!("{BASE}[transport]\nmax_ack_delay = {value}\n"))
                .expect("valid");
            assert_eq!(cfg.transport().max_ack_delay, want, "{value}");
        }
        for key in ["stream_window", "send_window", "socket_buffer"] {
            let e = err(&format!("[transport]\n{key} = 1000\n"));
            assert!(e.contains(&format!("transport.{key}")), "{e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = err("[registry]\nlease_ttl = \"10\"\n");
        assert!(e.contains("lease_ttl") || e.contains("duration"), "{e}");
        assert!(e.contains("unit"), "{e}");
    }

    #[test]
    fn short_lease_is_refused() {
        let e = err("[registry]\nlease_ttl = \"1s\"\n");
        assert!(e.contains("registry.lease_ttl"), "{e}");
    }

    #[test]
    fn advertise_auto_is_accepted_with_an_unspecified_listen() {
        let text = BASE.replace("127.0.0.1:4433\"", "0.0.0.0:4433\"\nadvertise = \"auto\"");
        let cfg = Config::parse(&text).expect("valid");
        assert_eq!(cfg.node.advertise, Some(Advertise::Auto));
        let bad = BASE.replace(
            "127.0.0.1:4433\"",
            "127.0.0.1:4433\"\nadvertise = \"somewhere\"",
        );
        let e = Config::parse(&bad).expect_err("must fail").to_string();
        assert!(e.contains("auto"), "{e}");
    }

    #[test]
    fn unspecified_listen_needs_advertise() {
        let text = BASE.replace("127.0.0.1:4433", "0.0.0.0:4433");
        let e = Config::parse(&text).expect_err("must fail").to_string();
        assert!(e.contains("node.advertise"), "{e}");
    }

    #[test]
    fn service_errors_name_the_index() {
        let e = err(
            "[[service]]\nname = \"Bad_Name\"\nprotocol = \"tcp\"\ntarget = \"127.0.0.1:80\"\n",
        );
        assert!(e.contains("service[0].name"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\nprotocol = \"tcp\"\ntarget = \"127.0.0.1:80\"\nallow = [\"X\"]\n",
        );
        assert!(e.contains("service[0].allow[0]"), "{e}");
    }

    #[test]
    fn duplicate_listeners_are_refused() {
        let e = err(
            "[[outbound]]\nservice = \"a\"\nlisten = \"127.0.0.1:9\"\n[[outbound]]\nservice = \"b\"\nlisten = \"127.0.0.1:9\"\n",
        );
        assert!(e.contains("outbound[1].listen"), "{e}");
    }

    #[test]
    fn outbound_mode_defaults_to_auto_and_unknown_modes_name_the_field() {
        use crate::config::OutboundMode;
        let two = "[[outbound]]\nservice = \"a\"\nlisten = \"127.0.0.1:9\"\n\
                   [[outbound]]\nservice = \"b\"\nlisten = \"127.0.0.1:10\"\nmode = \"tcp\"\n";
        let cfg = Config::parse(&format!("{BASE}{two}")).expect("valid");
        assert_eq!(cfg.outbound[0].mode(), OutboundMode::Auto);
        assert_eq!(cfg.outbound[1].mode(), OutboundMode::Tcp);
        let e = err("[[outbound]]\nservice = \"a\"\nlisten = \"127.0.0.1:9\"\n\
             [[outbound]]\nservice = \"b\"\nlisten = \"127.0.0.1:10\"\nmode = \"http\"\n");
        assert!(
            e.starts_with("outbound[1].mode: \"http\" is not a mode"),
            "{e}"
        );
        assert!(e.contains("\"auto\"") && e.contains("\"tcp\""), "{e}");
        let e = err("[[outbound]]\nservice = \"a\"\nlisten = \"127.0.0.1:9\"\nmode = 1\n");
        assert!(e.contains("mode"), "{e}");
    }
}
