//! SPIFFE node identities in certificates: `spiffe://{trust_domain}/node/{name}`.
//!
//! The naming rules themselves are `meshnode_proto::identity`'s (docs/protocol.md,
//! "Certificates and identities"); this module adapts them to the messages of this crate and
//! reads SPIFFE IDs out of X.509 certificates.

use meshnode_proto::identity;
use x509_parser::extensions::GeneralName;

/// The URI scheme prefix of every SPIFFE ID.
pub(crate) const SCHEME: &str = "spiffe://";

/// Checks a node name (1..=63 of `[a-z0-9-]`, no `-` at either end); the error says why.
pub(crate) fn validate_node_name(name: &str) -> Result<(), String> {
    identity::validate_node_name(name).map_err(|e| e.to_string())
}

/// Checks a SPIFFE trust domain (1..=255 of `[a-z0-9._-]`); the error says why.
pub(crate) fn validate_trust_domain(td: &str) -> Result<(), String> {
    identity::validate_trust_domain(td).map_err(|e| e.to_string())
}

/// The SPIFFE ID of a node: `spiffe://{trust_domain}/node/{name}`.
pub(crate) fn node_spiffe_id(trust_domain: &str, name: &str) -> String {
    identity::node_spiffe_id(trust_domain, name)
}

/// The SPIFFE ID of a trust domain itself (carried by the CA certificate).
pub(crate) fn trust_domain_id(trust_domain: &str) -> String {
    format!("{SCHEME}{trust_domain}")
}

/// Splits `spiffe://{td}/node/{name}` into `(td, name)`, both validated.
pub(crate) fn parse_node_spiffe_id(uri: &str) -> Result<(String, String), String> {
    identity::parse_node_spiffe_id(uri).ok_or_else(|| {
        "expected spiffe://TRUST_DOMAIN/node/NAME, NAME 1-63 of [a-z0-9-] \
         not starting or ending with '-'"
            .to_string()
    })
}

/// Parses a trust domain ID `spiffe://{td}` (no path), as carried by a mesh CA certificate.
pub(crate) fn parse_trust_domain_id(uri: &str) -> Option<&str> {
    let td = uri.strip_prefix(SCHEME)?;
    validate_trust_domain(td).ok().map(|()| td)
}

/// All `spiffe://` URIs in a certificate's subject alternative names.
pub(crate) fn spiffe_uris<'a>(
    cert: &'a x509_parser::certificate::X509Certificate<'_>,
) -> Vec<&'a str> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(SCHEME) => Some(*u),
            _ => None,
        })
        .collect()
}

/// The node name of a parsed certificate whose only SPIFFE URI SAN is
/// `spiffe://{trust_domain}/node/{name}`. A certificate with several SPIFFE IDs is ambiguous
/// and names nobody (an X.509-SVID carries exactly one).
pub(crate) fn node_name_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    trust_domain: &str,
) -> Option<String> {
    let uris = spiffe_uris(cert);
    let [uri] = uris.as_slice() else {
        return None;
    };
    match parse_node_spiffe_id(uri) {
        Ok((td, name)) if td == trust_domain => Some(name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let id = node_spiffe_id("mesh.test", "node-a");
        assert_eq!(id, "spiffe://mesh.test/node/node-a");
        let parsed = parse_node_spiffe_id(&id).unwrap();
        assert_eq!(parsed, ("mesh.test".to_string(), "node-a".to_string()));
        assert!(parse_node_spiffe_id("spiffe://mesh.test/workload/x").is_err());
        assert!(parse_node_spiffe_id("spiffe://mesh.test/node/a/b").is_err());
        assert!(validate_node_name("a/b").unwrap_err().contains('/'));
        assert!(validate_trust_domain("a:1").is_err());
        assert_eq!(
            parse_trust_domain_id("spiffe://mesh.test"),
            Some("mesh.test")
        );
        assert_eq!(parse_trust_domain_id("spiffe://mesh.test/x"), None);
        assert_eq!(trust_domain_id("td"), "spiffe://td");
    }
}
