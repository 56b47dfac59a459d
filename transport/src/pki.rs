//! The mesh CA: creating it (`meshnode ca init`), loading it, and issuing node certificates
//! (`meshnode cert issue`): docs/cli.md, "`meshnode ca init`" and "`meshnode cert issue`", and
//! docs/protocol.md, "Certificates and identities". Also used in memory by the demo and the tests.
//!
//! A CA certificate carries the URI SAN `spiffe://{trust_domain}` so that the trust domain can
//! be read back from `ca.pem`. A node certificate carries exactly one SPIFFE ID,
//! `spiffe://{trust_domain}/node/{name}`, a DNS SAN `{name}`, and both the serverAuth and
//! clientAuth usages (every node both dials and accepts). Keys are ECDSA P-256. Key files are
//! written with mode 0600 and a key file readable by group or others is refused.

mod error;
mod files;

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub use error::PkiError;

use crate::tls::spiffe;

/// The largest validity accepted, in days (about 100 years).
pub const MAX_DAYS: u32 = 36_500;

/// File name of the CA certificate in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const PEM_END: &str = "-----END CERTIFICATE-----";

/// A mesh CA in memory: its signing key, its certificate and its trust domain.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    trust_domain: String,
    not_after: OffsetDateTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a CA for `trust_domain`, valid from an hour ago (clock skew) for `days` days:
    /// CN "meshnode CA {trust_domain}", basicConstraints CA (no intermediates below it),
    /// keyCertSign and cRLSign, URI SAN `spiffe://{trust_domain}`, ECDSA P-256 key.
    pub fn generate(trust_domain: &str, days: u32) -> Result<Ca, PkiError> {
        spiffe::validate_trust_domain(trust_domain).map_err(|reason| {
            PkiError::InvalidTrustDomain {
                value: trust_domain.into(),
                reason,
            }
        })?;
        check_days(days)?;
        let what = || format!("the CA for trust domain {trust_domain}");
        let gen = |source| PkiError::Generate {
            what: what(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let now = now_secs();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("meshnode CA {trust_domain}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "meshnode");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let uri = spiffe::trust_domain_id(trust_domain);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(gen)?)];
        params.serial_number = Some(random_serial());
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(days));
        let not_after = params.not_after;
        let cert = params.self_signed(&key).map_err(gen)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.into(),
            not_after,
        })
    }

    /// Loads the CA from `dir/ca.pem` and `dir/ca.key`. `ca.pem` may hold several CA
    /// certificates (a rotation bundle): the one matching `ca.key` is the signing CA. The key
    /// file must not be readable by group or others.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let bad = |path: &Path, reason: String| PkiError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let key_pem = files::read_key(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad(&key_path, format!("not a usable PEM private key ({e})")))?;
        let text = files::read(&cert_path)?;
        let blocks = cert_blocks(&text);
        if blocks.is_empty() {
            return Err(bad(&cert_path, "holds no PEM certificate".into()));
        }
        let spki = key.subject_public_key_info();
        for block in blocks {
            let der = rustls_pemfile::certs(&mut block.as_bytes())
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| bad(&cert_path, "holds a malformed PEM certificate".into()))?;
            let (_, x509) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| bad(&cert_path, format!("holds a malformed certificate ({e})")))?;
            if x509.public_key().raw != spki.as_slice() {
                continue;
            }
            if !x509.is_ca() {
                return Err(bad(
                    &cert_path,
                    "the certificate of ca.key is not a CA".into(),
                ));
            }
            let trust_domain = spiffe::spiffe_uris(&x509)
                .into_iter()
                .find_map(spiffe::parse_trust_domain_id)
                .ok_or_else(|| {
                    bad(
                        &cert_path,
                        "the CA certificate has no URI SAN spiffe://TRUST_DOMAIN".into(),
                    )
                })?
                .to_string();
            let not_after = x509.validity().not_after.to_datetime();
            let issuer = Issuer::from_ca_cert_der(&der, key)
                .map_err(|e| bad(&cert_path, format!("unusable CA certificate ({e})")))?;
            return Ok(Ca {
                issuer,
                cert_pem: format!("{block}\n"),
                key_pem,
                trust_domain,
                not_after,
            });
        }
        Err(bad(
            &cert_path,
            format!("no certificate matches the key in {}", key_path.display()),
        ))
    }

    /// Writes `dir/ca.pem` (0644) and `dir/ca.key` (0600), creating `dir` (0755) if needed.
    /// An existing `ca.key` is never overwritten: that is an error, and nothing is written.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        files::ensure_dir(dir)?;
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.symlink_metadata().is_ok() {
            return Err(PkiError::KeyExists { path: key_path });
        }
        files::write_new(&key_path, self.key_pem.as_bytes(), files::KEY_MODE)?;
        let cert_path = dir.join(CA_CERT_FILE);
        if let Err(e) = files::write_replace(&cert_path, self.cert_pem.as_bytes(), files::CERT_MODE)
        {
            let _ = std::fs::remove_file(&key_path);
            return Err(e);
        }
        Ok(())
    }

    /// The trust domain this CA certifies nodes for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM: what nodes put in their `tls.ca` bundle.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a node certificate for `node_name`, valid from an hour ago (clock skew) for
    /// `days` days, but not beyond the CA's own expiry: a fresh ECDSA P-256 key, CN and DNS
    /// SAN `{node_name}`, URI SAN `spiffe://{trust_domain}/node/{node_name}`, digitalSignature,
    /// serverAuth and clientAuth, basicConstraints CA:FALSE.
    pub fn issue(&self, node_name: &str, days: u32) -> Result<IssuedCert, PkiError> {
        validate_node(node_name)?;
        check_days(days)?;
        let now = now_secs();
        if now >= self.not_after {
            return Err(PkiError::CaExpired {
                trust_domain: self.trust_domain.clone(),
                not_after: self.not_after.to_string(),
            });
        }
        let gen = |source| PkiError::Generate {
            what: format!("a certificate for node {node_name}"),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, node_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let uri = spiffe::node_spiffe_id(&self.trust_domain, node_name);
        params.subject_alt_names = vec![
            SanType::URI(uri.try_into().map_err(gen)?),
            SanType::DnsName(node_name.try_into().map_err(gen)?),
        ];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - Duration::hours(1);
        params.not_after = (now + Duration::days(i64::from(days))).min(self.not_after);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A node certificate and its private key, PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM. Secret.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

impl IssuedCert {
    /// Writes `out_dir/{node_name}.pem` (0644) and `out_dir/{node_name}.key` (0600), creating
    /// `out_dir` (0755) if needed, and returns their paths (certificate, key). Existing files
    /// are replaced atomically (a reader sees the old or the new file, never half of one),
    /// so re-issuing a node's certificate works; `node_name` must be a valid node name.
    pub fn write(&self, out_dir: &Path, node_name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        validate_node(node_name)?;
        files::ensure_dir(out_dir)?;
        let key_path = out_dir.join(format!("{node_name}.key"));
        let cert_path = out_dir.join(format!("{node_name}.pem"));
        files::write_replace(&key_path, self.key_pem.as_bytes(), files::KEY_MODE)?;
        files::write_replace(&cert_path, self.cert_pem.as_bytes(), files::CERT_MODE)?;
        Ok((cert_path, key_path))
    }
}

fn validate_node(node_name: &str) -> Result<(), PkiError> {
    spiffe::validate_node_name(node_name).map_err(|reason| PkiError::InvalidNodeName {
        value: node_name.into(),
        reason,
    })
}

fn check_days(days: u32) -> Result<(), PkiError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(PkiError::InvalidDays {
            value: days,
            max: MAX_DAYS,
        })
    }
}

/// Now, whole seconds (certificates carry no fractions; keeps `not_after` comparable).
fn now_secs() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// A random positive 128-bit serial number (RFC 5280: unique per CA, at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The `CERTIFICATE` PEM blocks of a text, verbatim.
fn cert_blocks(text: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(PEM_BEGIN) {
        let tail = &rest[start..];
        let Some(end) = tail.find(PEM_END) else { break };
        let end = end + PEM_END.len();
        blocks.push(&tail[..end]);
        rest = &tail[end..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certificates_have_the_promised_fields() {
        let ca = Ca::generate("mesh.test", 10).unwrap();
        let der = rustls_pemfile::certs(&mut ca.cert_pem().as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x.is_ca());
        assert_eq!(spiffe::spiffe_uris(&x), ["spiffe://mesh.test"]);
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());

        let node = ca.issue("node-a", 5).unwrap();
        let der = rustls_pemfile::certs(&mut node.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x.is_ca());
        assert_eq!(spiffe::spiffe_uris(&x), ["spiffe://mesh.test/node/node-a"]);
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(x.key_usage().unwrap().unwrap().value.digital_signature());
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(life, 5 * 86_400 + 3_600);
        assert!(!format!("{node:?}").contains("PRIVATE"));
    }

    #[test]
    fn node_validity_is_capped_by_the_ca() {
        let ca = Ca::generate("mesh.test", 2).unwrap();
        let node = ca.issue("node-a", 365).unwrap();
        let der = rustls_pemfile::certs(&mut node.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(x.validity().not_after.to_datetime(), ca.not_after);
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = Ca::generate("Bad Domain", 1).unwrap_err();
        assert!(e.to_string().contains("trust domain"), "{e}");
        let e = Ca::generate("mesh.test", 0).unwrap_err();
        assert!(e.to_string().contains("days"), "{e}");
        let ca = Ca::generate("mesh.test", 1).unwrap();
        let e = ca.issue("../etc", 1).unwrap_err();
        assert!(e.to_string().contains("node name"), "{e}");
    }

    #[test]
    fn pem_blocks_are_split_verbatim() {
        let a = Ca::generate("a.test", 1).unwrap();
        let b = Ca::generate("b.test", 1).unwrap();
        let text = format!("junk\n{}{}", a.cert_pem(), b.cert_pem());
        let blocks = cert_blocks(&text);
        assert_eq!(blocks.len(), 2);
        assert_eq!(format!("{}\n", blocks[1]), b.cert_pem());
    }
}
