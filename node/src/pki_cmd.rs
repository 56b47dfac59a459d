//! `meshnode ca init` and `meshnode cert issue`.

use std::path::Path;

use meshnode_proto::identity::{validate_node_name, validate_trust_domain};
use meshnode_transport::pki::{Ca, PkiError};

use crate::exit::{self, Failure};

/// Default trust domain of a new mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "meshnode.local";
/// Default CA lifetime: ten years; rotation is by adding a new CA to `tls.ca`.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default node certificate lifetime: one year.
pub const DEFAULT_CERT_DAYS: u32 = 365;

fn pki_failure(e: PkiError) -> Failure {
    // Nearly every PKI failure is a file that cannot be read or written.
    Failure::new(exit::IO, e.to_string())
}

/// Creates the mesh CA in `dir`.
pub fn ca_init(dir: &Path, trust_domain: &str, days: u32) -> Result<String, Failure> {
    validate_trust_domain(trust_domain)
        .map_err(|e| Failure::new(exit::USAGE, format!("--trust-domain: {e}")))?;
    if days == 0 {
        return Err(Failure::new(exit::USAGE, "--days must be at least 1"));
    }
    let ca = Ca::generate(trust_domain, days).map_err(pki_failure)?;
    ca.write(dir).map_err(pki_failure)?;
    Ok(format!(
        "created CA for trust domain {trust_domain} in {} (ca.pem, ca.key with mode 0600)",
        dir.display()
    ))
}

/// Issues a node certificate signed by the CA in `ca_dir`.
pub fn cert_issue(ca_dir: &Path, name: &str, out: &Path, days: u32) -> Result<String, Failure> {
    validate_node_name(name).map_err(|e| Failure::new(exit::USAGE, format!("--name: {e}")))?;
    if days == 0 {
        return Err(Failure::new(exit::USAGE, "--days must be at least 1"));
    }
    let ca = Ca::load(ca_dir).map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?;
    let issued = ca.issue(name, days).map_err(pki_failure)?;
    let (cert, key) = issued.write(out, name).map_err(pki_failure)?;
    Ok(format!(
        "issued {} and {} for spiffe://{}/node/{name}",
        cert.display(),
        key.display(),
        ca.trust_domain()
    ))
}
