//! The TOML config file (docs/config.md): one struct per section, unknown keys rejected, durations
//! with units, and `validate()` whose errors name the field at fault.

mod duration;
mod tracing;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshnode_transport::files::read_text_bounded;
use serde::Deserialize;

pub use meshnode_registry::Protocol;

pub use tracing::TracingConfig;
pub use validate::ConfigError;
pub(crate) use validate::MAX_REGISTRY_PASSWORD as MAX_PASSWORD_BYTES;

/// The largest config file read: a config with thousands of services is a few hundred KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Default UDP address of the QUIC endpoint (docs/config.md, `[node]`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default admin API address: loopback, so nothing is exposed without a decision.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
/// Grace period for in-flight tunnels on SIGTERM: long enough for typical requests, short
/// enough for a rolling restart.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
/// Default `node.http_idle_timeout`.
pub const DEFAULT_HTTP_IDLE: Duration = Duration::from_secs(300);
/// Lease TTL: a silently dead node vanishes from every view within this time.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default relative weight of an endpoint (the registry record's default).
pub use meshnode_registry::DEFAULT_WEIGHT;

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`
    pub node: NodeConfig,
    /// `[tls]`
    pub tls: TlsConfig,
    /// `[registry]`
    #[serde(default)]
    pub registry: RegistryConfig,
    /// `[admin]`
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[transport]`: QUIC tuning, every key optional.
    #[serde(default)]
    pub transport: TransportTuning,
    /// `[[service]]`: services hosted here.
    #[serde(default)]
    pub service: Vec<ServiceConfig>,
    /// `[[outbound]]`: local TCP ports tunnelling to mesh services.
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    /// `[http_proxy]`
    pub http_proxy: Option<HttpProxyConfig>,
    /// `[tracing]`: span export; none without the section.
    pub tracing: Option<TracingConfig>,
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name; must equal the certificate's node name.
    pub name: String,
    /// UDP address of the QUIC endpoint.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// What other nodes dial: `"ip:port"`, or `"auto"` (the address the host routes from,
    /// followed when it changes); defaults to `listen` unless that is unspecified.
    pub advertise: Option<Advertise>,
    /// Locality label.
    #[serde(default)]
    pub zone: String,
    /// Persistent node state (endpoint keys).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Grace for in-flight tunnels on SIGTERM.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    /// Most application connections held at once by all front-ends (`[[outbound]]` ports and
    /// the HTTP proxy); default: half the file descriptors past a reserve.
    pub max_connections: Option<usize>,
    /// How long an HTTP client connection (the proxy's, an `auto` outbound port's) may pass no
    /// byte either way before it is closed gracefully.
    #[serde(default = "default_http_idle", with = "duration")]
    pub http_idle_timeout: Duration,
}

/// `node.advertise`: a fixed address, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertise {
    /// Always this address.
    Addr(SocketAddr),
    /// The local address the host uses towards the registry and peers, on the bound port;
    /// re-registered whenever it changes (connection migration).
    Auto,
}

impl<'de> Deserialize<'de> for Advertise {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "auto" {
            return Ok(Advertise::Auto);
        }
        s.parse().map(Advertise::Addr).map_err(|_| {
            serde::de::Error::custom(format!("{s:?} is neither \"auto\" nor an ip:port address"))
        })
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s), PEM.
    pub ca: PathBuf,
    /// This node's certificate, PEM.
    pub cert: PathBuf,
    /// This node's private key, PEM, mode 0600.
    pub key: PathBuf,
}

/// Which registry backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// etcd v3.
    #[default]
    Etcd,
    /// A fixed list of peers in this file.
    Static,
}

/// `[registry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Backend.
    #[serde(default)]
    pub backend: Backend,
    /// etcd endpoints.
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix: one mesh per prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Lease TTL (≥ 2 s).
    #[serde(default = "default_lease_ttl", with = "duration")]
    pub lease_ttl: Duration,
    /// etcd CA certificate (TLS).
    pub ca: Option<PathBuf>,
    /// etcd client certificate (TLS).
    pub cert: Option<PathBuf>,
    /// etcd client key (TLS).
    pub key: Option<PathBuf>,
    /// etcd user name.
    pub username: Option<String>,
    /// File holding the etcd password.
    pub password_file: Option<PathBuf>,
    /// `[[registry.peers]]` for the static backend.
    #[serde(default)]
    pub peers: Vec<StaticPeerConfig>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            backend: Backend::Etcd,
            endpoints: default_endpoints(),
            prefix: default_prefix(),
            lease_ttl: DEFAULT_LEASE_TTL,
            ca: None,
            cert: None,
            key: None,
            username: None,
            password_file: None,
            peers: Vec::new(),
        }
    }
}

/// `[[registry.peers]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeerConfig {
    /// Peer node name.
    pub name: String,
    /// Its advertised QUIC address.
    pub addr: SocketAddr,
    /// Its zone.
    #[serde(default)]
    pub zone: String,
    /// The services it hosts.
    #[serde(default)]
    pub services: Vec<StaticServiceConfig>,
}

/// A service of a static peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticServiceConfig {
    /// Service name.
    pub name: String,
    /// `tcp`, `http`, `http2` or `grpc` (docs/config.md).
    pub protocol: Protocol,
    /// Advertised port.
    pub port: u16,
    /// Relative weight.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin API address.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin(),
        }
    }
}

/// `[transport]`: QUIC tuning; every key has the default of `meshnode_transport::config`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportTuning {
    /// Keep-alive interval.
    #[serde(default, with = "duration::option")]
    pub keep_alive: Option<Duration>,
    /// Idle timeout: how long a silent peer goes unnoticed.
    #[serde(default, with = "duration::option")]
    pub idle_timeout: Option<Duration>,
    /// Dial deadline.
    #[serde(default, with = "duration::option")]
    pub connect_timeout: Option<Duration>,
    /// Concurrent streams a peer may open.
    pub max_concurrent_streams: Option<u32>,
    /// Congestion controller: "cubic", "bbr" or "newreno" (checked by `validate`).
    pub congestion: Option<String>,
    /// Requested SO_RCVBUF and SO_SNDBUF of the UDP socket, bytes.
    pub socket_buffer: Option<usize>,
    /// Unacknowledged bytes per connection before stream writes wait.
    pub send_window: Option<u64>,
    /// Per-stream receive (flow-control) window, bytes.
    pub stream_window: Option<u32>,
    /// Longest acknowledgement delay requested of peers (ACK frequency extension); `"25ms"`
    /// is RFC 9000's default, which peers also keep when this is `"off"`.
    #[serde(default)]
    pub max_ack_delay: Option<AckDelay>,
    /// Deadline for a tunnel open (header sent → status received).
    #[serde(default, with = "duration::option")]
    pub open_timeout: Option<Duration>,
    /// A peer's stream credit on a new connection, grown on demand up to
    /// `max_concurrent_streams` (an idle connection's memory is proportional to it).
    pub initial_concurrent_streams: Option<u32>,
    /// Handshakes in progress above which unvalidated sources must answer a QUIC Retry.
    pub handshake_retry_threshold: Option<u32>,
    /// Most handshakes in progress at once, in total.
    pub max_handshakes: Option<u32>,
    /// Most handshakes in progress at once from one source address.
    pub max_handshakes_per_source: Option<u32>,
    /// New handshakes admitted per second, in total.
    pub handshake_rate: Option<u32>,
    /// New handshakes admitted per second from one source address.
    pub handshake_rate_per_source: Option<u32>,
    /// Inbound peer connections held at once (handshakes in progress included); each can
    /// buffer up to its flow-control windows, so this bounds the node's buffered bytes.
    pub max_peer_connections: Option<u32>,
}

/// `transport.max_ack_delay`: a duration, or `"off"` to leave peers their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckDelay {
    /// Do not ask peers for a shorter delay.
    Off,
    /// Ask peers to acknowledge within this long.
    Requested(Duration),
}

impl<'de> Deserialize<'de> for AckDelay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "off" {
            return Ok(AckDelay::Off);
        }
        duration::parse(&text)
            .map(AckDelay::Requested)
            .map_err(|e| serde::de::Error::custom(format!("{e}, or \"off\"")))
    }
}

/// `[[service]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name.
    pub name: String,
    /// `tcp`, `http`, `http2` or `grpc` (docs/config.md).
    pub protocol: Protocol,
    /// Where the local application listens.
    pub target: SocketAddr,
    /// Advertised port; default: the target's port.
    pub port: Option<u16>,
    /// Relative share.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Only these nodes may call it.
    pub allow: Option<Vec<String>>,
    /// HTTP services: how long the target may take to send its response headers before the
    /// caller gets 504; default [`DEFAULT_REQUEST_TIMEOUT`] (30 s).
    #[serde(default, with = "duration::option")]
    pub request_timeout: Option<Duration>,
}

/// Default per-request timeout of HTTP services (`[[service]] request_timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl ServiceConfig {
    /// The advertised port.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(self.target.port())
    }

    /// The per-request timeout of an HTTP service.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }
}

/// `[[outbound]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Mesh service to reach.
    pub service: String,
    /// Local TCP address to listen on.
    pub listen: SocketAddr,
    /// `"auto"` (default) or `"tcp"`; checked by `validate`, read through
    /// [`OutboundConfig::mode`].
    pub mode: Option<String>,
    /// Most connections held at once on this port (within the node's `max_connections`).
    pub max_connections: Option<usize>,
}

impl OutboundConfig {
    /// The mode; `auto` when absent (an unknown name cannot get here through
    /// [`Config::parse`]).
    pub fn mode(&self) -> OutboundMode {
        self.mode
            .as_deref()
            .and_then(|m| m.parse().ok())
            .unwrap_or_default()
    }
}

/// `outbound.mode`: how an `[[outbound]]` port carries its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutboundMode {
    /// HTTP/1.1 and h2c connections to an HTTP-family service (`http`, `http2`, `grpc`) are
    /// terminated and each request balanced on its own; anything else is tunnelled.
    #[default]
    Auto,
    /// Every connection is one raw L4 tunnel, whatever the service's protocol.
    Tcp,
}

impl std::str::FromStr for OutboundMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(OutboundMode::Auto),
            "tcp" => Ok(OutboundMode::Tcp),
            other => Err(format!(
                "{other:?} is not a mode: \"auto\" (requests to HTTP-family services balanced \
                 one by one) or \"tcp\" (one raw tunnel per connection)"
            )),
        }
    }
}

impl std::fmt::Display for OutboundMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutboundMode::Auto => "auto",
            OutboundMode::Tcp => "tcp",
        })
    }
}

/// `[http_proxy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProxyConfig {
    /// Local address of the HTTP/1.1 proxy.
    pub listen: SocketAddr,
    /// Most client connections held at once (within the node's `max_connections`).
    pub max_connections: Option<usize>,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!())
}
fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN.parse().unwrap_or_else(|_| unreachable!())
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/meshnode")
}
fn default_drain() -> Duration {
    DEFAULT_DRAIN
}
fn default_http_idle() -> Duration {
    DEFAULT_HTTP_IDLE
}
fn default_lease_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}
fn default_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_prefix() -> String {
    "/meshnode".into()
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl Config {
    /// Parses and validates a config file. Relative paths in it are taken relative to the
    /// file's directory, so a config and its certificates can move together.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text_bounded(path, MAX_CONFIG_BYTES).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut cfg = Config::parse(&text).map_err(|e| e.in_file(path))?;
        if let Some(dir) = path.parent() {
            cfg.resolve_paths(dir);
        }
        cfg.check_registry_files().map_err(|e| e.in_file(path))?;
        cfg.check_state_dir().map_err(|e| e.in_file(path))?;
        Ok(cfg)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.node.state_dir);
        for p in [
            &mut self.registry.ca,
            &mut self.registry.cert,
            &mut self.registry.key,
            &mut self.registry.password_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// The address other nodes dial, when the config fixes it (`None` for `auto`).
    pub fn advertise(&self) -> Option<SocketAddr> {
        match self.node.advertise {
            Some(Advertise::Addr(a)) => Some(a),
            Some(Advertise::Auto) => None,
            None => Some(self.node.listen),
        }
    }

    /// Transport settings: defaults overridden by `[transport]`.
    pub fn transport(&self) -> meshnode_transport::TransportConfig {
        let mut t = meshnode_transport::TransportConfig::default();
        let tune = &self.transport;
        if let Some(v) = tune.keep_alive {
            t.keep_alive = v;
        }
        if let Some(v) = tune.idle_timeout {
            t.idle_timeout = v;
        }
        if let Some(v) = tune.connect_timeout {
            t.connect_timeout = v;
        }
        if let Some(v) = tune.max_concurrent_streams {
            t.max_concurrent_streams = v;
        }
        let admission = [
            (
                tune.initial_concurrent_streams,
                &mut t.initial_concurrent_streams,
            ),
            (
                tune.handshake_retry_threshold,
                &mut t.handshake_retry_threshold,
            ),
            (tune.max_handshakes, &mut t.max_handshakes),
            (
                tune.max_handshakes_per_source,
                &mut t.max_handshakes_per_source,
            ),
            (tune.handshake_rate, &mut t.handshake_rate),
            (
                tune.handshake_rate_per_source,
                &mut t.handshake_rate_per_source,
            ),
            (tune.max_peer_connections, &mut t.max_peer_connections),
        ];
        for (set, field) in admission {
            if let Some(v) = set {
                *field = v;
            }
        }
        // Checked by `validate`; an unparsable name cannot get here through `Config::parse`.
        if let Some(c) = tune.congestion.as_deref().and_then(|c| c.parse().ok()) {
            t.congestion = c;
        }
        if let Some(v) = tune.socket_buffer {
            t.socket_buffer = v;
        }
        if let Some(v) = tune.send_window {
            t.send_window = v;
        }
        if let Some(v) = tune.stream_window {
            t.stream_window = v;
        }
        match tune.max_ack_delay {
            Some(AckDelay::Off) => t.max_ack_delay = None,
            Some(AckDelay::Requested(d)) => t.max_ack_delay = Some(d),
            None => {}
        }
        t
    }
}
