//! Naming rules shared by configuration, certificates, discovery and the wire.
//!
//! Node and service names are DNS-label-like so they fit in a SPIFFE path segment, an HTTP
//! `:authority`, a registry key and a metrics label without escaping. A node's identity is
//! the URI SAN `spiffe://{trust_domain}/node/{name}` of its certificate (docs/protocol.md,
//! "Certificates and identities").

/// Longest node or service name, in bytes (the DNS label limit).
pub const MAX_NAME_LEN: usize = 63;

/// Longest trust domain, in bytes (the SPIFFE limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SPIFFE_SCHEME: &str = "spiffe://";
const NODE_PATH: &str = "/node/";

/// Why a name was refused. Messages are phrased to follow a prefix naming the field, as in
/// `"node name: must not be empty"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than `max` bytes.
    #[error("must be at most {max} characters long")]
    TooLong {
        /// The limit that was exceeded.
        max: usize,
    },
    /// The name holds a character outside its allowed set; the value is the first such.
    #[error("invalid character {0:?}")]
    InvalidChar(char),
    /// The name starts or ends with `-`.
    #[error("must not start or end with '-'")]
    BadEdge,
}

/// Checks a node name: 1 to 63 characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn validate_node_name(name: &str) -> Result<(), NameError> {
    validate_label(name)
}

/// Checks a service name: the same rules as a node name (1 to 63 characters of `[a-z0-9-]`,
/// not starting or ending with `-`).
pub fn validate_service_name(name: &str) -> Result<(), NameError> {
    validate_label(name)
}

/// Checks a SPIFFE trust domain: 1 to 255 characters of `[a-z0-9.-_]`.
pub fn validate_trust_domain(td: &str) -> Result<(), NameError> {
    check_len(td, MAX_TRUST_DOMAIN_LEN)?;
    check_chars(td, |c| label_char(c) || c == '.' || c == '_')
}

/// The SPIFFE ID of a node, `spiffe://{trust_domain}/node/{node}`.
///
/// The parts are not checked; validate them first (configuration loading does) or the result
/// will not parse back with [`parse_node_spiffe_id`].
pub fn node_spiffe_id(trust_domain: &str, node: &str) -> String {
    format!("{SPIFFE_SCHEME}{trust_domain}{NODE_PATH}{node}")
}

/// Splits `spiffe://{td}/node/{name}` into `(td, name)`, both validated.
///
/// Returns `None` for anything else, including other paths, a trailing `/`, a query or
/// fragment, upper-case letters, or an invalid trust domain or node name.
pub fn parse_node_spiffe_id(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix(SPIFFE_SCHEME)?;
    let slash = rest.find('/')?;
    let (td, path) = rest.split_at(slash);
    let name = path.strip_prefix(NODE_PATH)?;
    validate_trust_domain(td).ok()?;
    validate_node_name(name).ok()?;
    Some((td.to_string(), name.to_string()))
}

fn validate_label(name: &str) -> Result<(), NameError> {
    check_len(name, MAX_NAME_LEN)?;
    check_chars(name, label_char)?;
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::BadEdge);
    }
    Ok(())
}

fn label_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

fn check_len(s: &str, max: usize) -> Result<(), NameError> {
    match s.len() {
        0 => Err(NameError::Empty),
        n if n > max => Err(NameError::TooLong { max }),
        _ => Ok(()),
    }
}

fn check_chars(s: &str, allowed: impl Fn(char) -> bool) -> Result<(), NameError> {
    match s.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(NameError::InvalidChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["a", "node-a", "n0", "0", "a-b-c", &"x".repeat(63)] {
            assert_eq!(validate_node_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_node_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_node_name(&"x".repeat(64)),
            Err(NameError::TooLong { max: 63 })
        );
        assert_eq!(validate_node_name("Node"), Err(NameError::InvalidChar('N')));
        assert_eq!(validate_node_name("a_b"), Err(NameError::InvalidChar('_')));
        assert_eq!(
            validate_node_name("caf\u{e9}"),
            Err(NameError::InvalidChar('\u{e9}'))
        );
        assert_eq!(validate_node_name("-a"), Err(NameError::BadEdge));
        assert_eq!(validate_node_name("a-"), Err(NameError::BadEdge));
        assert_eq!(validate_node_name("-"), Err(NameError::BadEdge));
    }

    #[test]
    fn service_names_follow_the_same_rules() {
        assert_eq!(validate_service_name("echo-tcp"), Ok(()));
        assert_eq!(
            validate_service_name("echo.tcp"),
            Err(NameError::InvalidChar('.'))
        );
        assert_eq!(validate_service_name("echo-"), Err(NameError::BadEdge));
    }

    #[test]
    fn trust_domains() {
        for ok in ["mesh.local", "example.org", "a_b-c.0", &"t".repeat(255)] {
            assert_eq!(validate_trust_domain(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_trust_domain(""), Err(NameError::Empty));
        assert_eq!(
            validate_trust_domain(&"t".repeat(256)),
            Err(NameError::TooLong { max: 255 })
        );
        assert_eq!(
            validate_trust_domain("Mesh.local"),
            Err(NameError::InvalidChar('M'))
        );
        assert_eq!(
            validate_trust_domain("mesh:443"),
            Err(NameError::InvalidChar(':'))
        );
    }

    #[test]
    fn messages_read_after_a_field_prefix() {
        let msg = |e: NameError| format!("node name: {e}");
        assert_eq!(msg(NameError::Empty), "node name: must not be empty");
        assert_eq!(
            msg(NameError::TooLong { max: 63 }),
            "node name: must be at most 63 characters long"
        );
        assert_eq!(
            msg(NameError::InvalidChar('A')),
            "node name: invalid character 'A'"
        );
        assert_eq!(
            msg(NameError::BadEdge),
            "node name: must not start or end with '-'"
        );
    }

    #[test]
    fn spiffe_id_round_trip() {
        let id = node_spiffe_id("mesh.local", "node-a");
        assert_eq!(id, "spiffe://mesh.local/node/node-a");
        assert_eq!(
            parse_node_spiffe_id(&id),
            Some(("mesh.local".to_string(), "node-a".to_string()))
        );
    }

    #[test]
    fn spiffe_id_rejects_anything_else() {
        for bad in [
            "",
            "spiffe://",
            "spiffe://mesh.local",
            "spiffe://mesh.local/",
            "spiffe://mesh.local/node/",
            "spiffe://mesh.local/node/node-a/",
            "spiffe://mesh.local/node/node-a/x",
            "spiffe://mesh.local/node/node-a?x=1",
            "spiffe://mesh.local/node/node-a#f",
            "spiffe://mesh.local/service/node-a",
            "spiffe://mesh.local//node/node-a",
            "spiffe:///node/node-a",
            "spiffe://Mesh.local/node/node-a",
            "spiffe://mesh.local/node/Node-a",
            "SPIFFE://mesh.local/node/node-a",
            "https://mesh.local/node/node-a",
            "spiffe://user@mesh.local/node/node-a",
            "spiffe://mesh.local:8443/node/node-a",
            " spiffe://mesh.local/node/node-a",
        ] {
            assert_eq!(parse_node_spiffe_id(bad), None, "{bad:?}");
        }
    }
}
