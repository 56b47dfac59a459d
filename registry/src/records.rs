//! The JSON records stored under the registry prefix (docs/registry.md) and the key layout.
//!
//! Records are parsed leniently: unknown fields are ignored (a newer node may add some) and
//! optional fields have defaults. What a record must satisfy to be routable is checked by
//! [`NodeRecord::validate`] and [`ServiceRecord::validate`].

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Longest node or service name (a DNS label).
pub const MAX_NAME_LEN: usize = meshnode_proto::identity::MAX_NAME_LEN;

/// Weight a service record gets when it does not carry one (docs/config.md, `[[service]]`).
pub const DEFAULT_WEIGHT: u32 = 100;

/// `{prefix}/nodes/{node}`: one per running node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name; equals the last key segment and the certificate's node name.
    pub name: String,
    /// Address other nodes dial, `ip:port` (UDP, QUIC).
    pub addr: String,
    /// Locality label; empty when unset.
    #[serde(default)]
    pub zone: String,
    /// meshnode version of the writer.
    #[serde(default)]
    pub version: String,
    /// When the node process started, Unix seconds.
    #[serde(default)]
    pub started_at: u64,
}

/// How a service is carried: raw TCP tunnels or HTTP requests (the callee speaks HTTP/1.1 to
/// an `http` target, h2c with prior knowledge to an `http2` or `grpc` target). Records name it
/// in lower case; records of older nodes carry only `tcp` and `http`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// L4: each TCP connection is one tunnel.
    Tcp,
    /// L7: each HTTP request is forwarded on its own; the target speaks HTTP/1.1.
    Http,
    /// L7: each request is forwarded on its own; the target speaks HTTP/2 (h2c).
    Http2,
    /// L7 like `http2`; callers are answered mesh errors as gRPC statuses.
    Grpc,
}

impl Protocol {
    /// Whether each request is forwarded on its own (every protocol but `tcp`).
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    /// Whether the target speaks HTTP/2 (h2c, prior knowledge).
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        })
    }
}

/// `{prefix}/services/{service}/{node}`: one per endpoint (service × node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Service name; equals the second-to-last key segment.
    pub service: String,
    /// Hosting node; equals the last key segment.
    pub node: String,
    /// `tcp`, `http`, `http2` or `grpc`.
    pub protocol: Protocol,
    /// Advertised port (what `CONNECT service:port` names).
    pub port: u16,
    /// Relative share of traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Locality label of the hosting node; empty when unset.
    #[serde(default)]
    pub zone: String,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// Whether `name` is a valid node or service name: the one rule of configuration,
/// certificates and the wire (`meshnode_proto::identity`): 1-63 of `[a-z0-9-]`, not
/// starting or ending with `-`.
pub fn is_valid_name(name: &str) -> bool {
    meshnode_proto::identity::validate_node_name(name).is_ok()
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let checked = if what.starts_with("service") {
        meshnode_proto::identity::validate_service_name(name)
    } else {
        meshnode_proto::identity::validate_node_name(name)
    };
    checked.map_err(|e| format!("{what} {name:?}: {e}"))
}

impl NodeRecord {
    /// Checks the name and that `addr` parses as `ip:port`.
    pub fn validate(&self) -> Result<(), String> {
        check_name("node name", &self.name)?;
        self.addr
            .parse::<SocketAddr>()
            .map_err(|_| format!("node addr {:?} is not ip:port", self.addr))?;
        Ok(())
    }

    /// The parsed `addr` (`None` if it does not parse; validated records always parse).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.addr.parse().ok()
    }
}

impl ServiceRecord {
    /// Checks both names and that the port is not 0.
    pub fn validate(&self) -> Result<(), String> {
        check_name("service name", &self.service)?;
        check_name("node name", &self.node)?;
        if self.port == 0 {
            return Err(format!("service {:?} has port 0", self.service));
        }
        Ok(())
    }
}

/// Normalises a configured prefix: no trailing `/` (so `/meshnode/` and `/meshnode` are one mesh).
pub fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_end_matches('/').to_string()
}

/// `{prefix}/nodes/{node}`.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{}/nodes/{node}", normalize_prefix(prefix))
}

/// `{prefix}/services/{service}/{node}`.
pub fn service_key(prefix: &str, service: &str, node: &str) -> String {
    format!("{}/services/{service}/{node}", normalize_prefix(prefix))
}

/// What a key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// `{prefix}/nodes/{node}`.
    Node {
        /// The node name segment (not yet validated).
        node: &'a str,
    },
    /// `{prefix}/services/{service}/{node}`.
    Service {
        /// The service name segment (not yet validated).
        service: &'a str,
        /// The node name segment (not yet validated).
        node: &'a str,
    },
}

/// Parses a key under `prefix`; `None` for keys outside the prefix or of an unknown shape.
pub fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<KeyKind<'a>> {
    let prefix = normalize_prefix(prefix);
    let rest = key.strip_prefix(prefix.as_str())?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("nodes"), Some(node), None, None) => Some(KeyKind::Node { node }),
        (Some("services"), Some(service), Some(node), None) => {
            Some(KeyKind::Service { service, node })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("node-a"));
        assert!(is_valid_name(&"a".repeat(63)));
        assert!(!is_valid_name(&"a".repeat(64)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("Node"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("a.b"));
        // The proto rule: no leading or trailing '-' (a certificate could not carry it).
        assert!(!is_valid_name("-a"));
        assert!(!is_valid_name("a-"));
        let svc = ServiceRecord {
            service: "-web".into(),
            node: "a".into(),
            protocol: Protocol::Tcp,
            port: 80,
            weight: DEFAULT_WEIGHT,
            zone: String::new(),
        };
        let err = svc.validate().err().unwrap_or_default();
        assert!(err.contains("service name") && err.contains("'-'"), "{err}");
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(node_key("/m/", "a"), "/m/nodes/a");
        assert_eq!(service_key("/m", "s", "a"), "/m/services/s/a");
        assert_eq!(
            parse_key("/m", "/m/nodes/a"),
            Some(KeyKind::Node { node: "a" })
        );
        assert_eq!(
            parse_key("/m/", "/m/services/s/a"),
            Some(KeyKind::Service {
                service: "s",
                node: "a"
            })
        );
        assert_eq!(parse_key("/m", "/m2/nodes/a"), None);
        assert_eq!(parse_key("/m", "/m/nodes/a/b"), None);
        assert_eq!(parse_key("/m", "/m/services/s"), None);
        assert_eq!(parse_key("/m", "/m/other/x"), None);
    }

    #[test]
    fn records_parse_leniently() {
        let node: NodeRecord =
            serde_json::from_str(r#"{"name":"a","addr":"127.0.0.1:1","future":true}"#)
                .expect("lenient node record");
        assert_eq!(node.zone, "");
        assert!(node.validate().is_ok());
        let svc: ServiceRecord =
            serde_json::from_str(r#"{"service":"s","node":"a","protocol":"http","port":80}"#)
                .expect("service record without weight");
        assert_eq!(svc.weight, DEFAULT_WEIGHT);
        assert_eq!(svc.protocol.to_string(), "http");
        assert!(serde_json::from_str::<ServiceRecord>(
            r#"{"service":"s","node":"a","protocol":"udp","port":80}"#
        )
        .is_err());
    }

    #[test]
    fn every_protocol_round_trips_and_old_records_parse() {
        for (name, p) in [
            ("tcp", Protocol::Tcp),
            ("http", Protocol::Http),
            ("http2", Protocol::Http2),
            ("grpc", Protocol::Grpc),
        ] {
            let json = format!(r#"{{"service":"s","node":"a","protocol":"{name}","port":80}}"#);
            let svc: ServiceRecord = serde_json::from_str(&json).expect("record parses");
            assert_eq!(svc.protocol, p);
            assert_eq!(p.to_string(), name);
            let back = serde_json::to_string(&svc).expect("serialises");
            assert!(back.contains(&format!(r#""protocol":"{name}""#)), "{back}");
        }
        assert!(Protocol::Grpc.is_h2() && Protocol::Http2.is_h2());
        assert!(!Protocol::Http.is_h2() && Protocol::Http.is_http());
        assert!(!Protocol::Tcp.is_http());
    }
}
