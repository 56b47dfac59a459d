//! Certificate checks: a node's own identity at load time, and the dialling side's check of
//! the peer it reached (chain to the mesh CA, then the SPIFFE ID of the node it meant).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::certificate::X509Certificate;

use super::{load, spiffe, IdentityError};

/// The CA bundle a node trusts: one or more CA certificates (several during a rotation).
pub(crate) struct Trust {
    pub(crate) roots: Arc<RootCertStore>,
    /// Trust domains named by the CA certificates' `spiffe://TD` URI SANs (may be empty for
    /// CAs not made by meshnode).
    pub(crate) trust_domains: Vec<String>,
    /// The bundle as messages name it: "CA file PATH" or "the CA PEM".
    pub(crate) label: String,
}

impl Trust {
    /// Parses a CA bundle.
    pub(crate) fn from_pem(pem: &[u8], label: &str) -> Result<Trust, IdentityError> {
        let certs = load::parse_certs(pem, label)?;
        let mut roots = RootCertStore::empty();
        let mut trust_domains = Vec::new();
        for (i, der) in certs.into_iter().enumerate() {
            let x509 = parse_x509(&der, label)?;
            if !x509.is_ca() {
                return Err(IdentityError::NotCa {
                    ca: label.into(),
                    index: i + 1,
                    subject: x509.subject().to_string(),
                });
            }
            let tds = spiffe::spiffe_uris(&x509)
                .into_iter()
                .filter_map(spiffe::parse_trust_domain_id)
                .map(String::from);
            trust_domains.extend(tds);
            roots.add(der).map_err(|e| IdentityError::Malformed {
                what: label.into(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        trust_domains.sort();
        trust_domains.dedup();
        Ok(Trust {
            roots: Arc::new(roots),
            trust_domains,
            label: label.into(),
        })
    }
}

/// A node certificate and key that passed every check.
pub(crate) struct Checked {
    pub(crate) node_name: String,
    pub(crate) trust_domain: String,
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) not_after: SystemTime,
}

/// Checks a node certificate chain and key against the trust bundle: SPIFFE node ID,
/// validity now, both extended key usages, the chain to a CA (for server and client use),
/// and that the key belongs to the certificate.
pub(crate) fn check_identity(
    trust: &Trust,
    provider: &Arc<CryptoProvider>,
    cert_pem: &[u8],
    cert_label: &str,
    key_pem: &[u8],
    key_label: &str,
) -> Result<Checked, IdentityError> {
    let chain = load::parse_certs(cert_pem, cert_label)?;
    let key_der = load::parse_key(key_pem, key_label)?;
    let (trust_domain, node_name, not_after_s) = check_leaf(&chain[0], cert_label)?;

    // The chain, as a peer will check it: as a server (dialled) and as a client (dialling).
    let not_signed = |e: rustls::Error| IdentityError::NotSignedByCa {
        cert: cert_label.into(),
        ca: trust.label.clone(),
        reason: chain_reason(&e),
    };
    let unix_now = UnixTime::now();
    let parsed = ParsedCertificate::try_from(&chain[0]).map_err(not_signed)?;
    let algs = provider.signature_verification_algorithms;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &trust.roots,
        &chain[1..],
        unix_now,
        algs.all,
    )
    .map_err(not_signed)?;
    WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
        .build()
        .map_err(|e| IdentityError::Config {
            reason: e.to_string(),
        })?
        .verify_client_cert(&chain[0], &chain[1..], unix_now)
        .map_err(not_signed)?;
    if !trust.trust_domains.is_empty() && !trust.trust_domains.contains(&trust_domain) {
        return Err(IdentityError::TrustDomainMismatch {
            cert: cert_label.into(),
            ca: trust.label.clone(),
            found: trust_domain,
            expected: trust.trust_domains.join(", "),
        });
    }

    let signer = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| IdentityError::UnsupportedKey {
            key: key_label.into(),
            reason: e.to_string(),
        })?;
    let key = CertifiedKey::new(chain, signer);
    match key.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(IdentityError::KeyMismatch {
                cert: cert_label.into(),
                key: key_label.into(),
            })
        }
    }
    let not_after = UNIX_EPOCH + Duration::from_secs(not_after_s.max(0) as u64);
    Ok(Checked {
        node_name,
        trust_domain,
        key: Arc::new(key),
        not_after,
    })
}

/// Checks the leaf alone: one valid SPIFFE node ID, not a CA, valid now, serverAuth and
/// clientAuth. Returns its trust domain, node name and expiry (Unix seconds).
fn check_leaf(
    der: &CertificateDer<'_>,
    cert_label: &str,
) -> Result<(String, String, i64), IdentityError> {
    let cert = cert_label.to_string();
    let x509 = parse_x509(der, cert_label)?;

    let (trust_domain, node_name) = node_identity(&x509, cert_label)?;
    if x509.is_ca() {
        return Err(IdentityError::IsCa { cert });
    }
    let now = SystemTime::now();
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = x509.validity();
    if now_s < validity.not_before.timestamp() {
        let not_before = validity.not_before.to_string();
        return Err(IdentityError::NotYetValid { cert, not_before });
    }
    if now_s > validity.not_after.timestamp() {
        let not_after = validity.not_after.to_string();
        return Err(IdentityError::Expired { cert, not_after });
    }
    let eku = x509.extended_key_usage().ok().flatten().map(|e| e.value);
    for (usage, present) in [
        ("serverAuth", eku.is_some_and(|e| e.server_auth)),
        ("clientAuth", eku.is_some_and(|e| e.client_auth)),
    ] {
        if !present {
            return Err(IdentityError::MissingKeyUsage { cert, usage });
        }
    }
    Ok((trust_domain, node_name, validity.not_after.timestamp()))
}

/// Says why a chain check failed, in words for an operator.
fn chain_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "its signature does not verify with any of their keys (a CA of the same name?)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "none of them is its issuer".into()
        }
        other => other.to_string(),
    }
}

/// The `(trust_domain, node_name)` of a certificate's single SPIFFE node ID.
fn node_identity(
    x509: &X509Certificate<'_>,
    label: &str,
) -> Result<(String, String), IdentityError> {
    let uris = spiffe::spiffe_uris(x509);
    let invalid = |uri: String, reason: String| IdentityError::InvalidSpiffeId {
        cert: label.into(),
        uri,
        reason,
    };
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId { cert: label.into() }),
        [uri] => {
            spiffe::parse_node_spiffe_id(uri).map_err(|reason| invalid(uri.to_string(), reason))
        }
        many => Err(invalid(
            many.join(" "),
            "a node certificate carries exactly one SPIFFE ID".into(),
        )),
    }
}

/// Parses a DER certificate, refusing trailing bytes.
pub(crate) fn parse_x509<'a>(
    der: &'a CertificateDer<'_>,
    label: &str,
) -> Result<X509Certificate<'a>, IdentityError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(IdentityError::Malformed {
            what: label.into(),
            reason: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(IdentityError::Malformed {
            what: label.into(),
            reason: e.to_string(),
        }),
    }
}

/// The dialling side's check of the node it reached: the chain must lead to a mesh CA, and
/// the leaf's SPIFFE ID must be `spiffe://{trust_domain}/node/{server_name}`, where
/// `server_name` is the name given to `quinn::Endpoint::connect` (the node dialled).
pub(crate) struct MeshServerVerifier {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
    pub(crate) trust_domain: String,
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )
        .inspect_err(
            |e| tracing::debug!(peer = ?server_name, error = %e, "peer certificate refused"),
        )?;

        let expected = match server_name {
            ServerName::DnsName(d) if spiffe::validate_node_name(d.as_ref()).is_ok() => {
                spiffe::node_spiffe_id(&self.trust_domain, d.as_ref())
            }
            _ => {
                tracing::debug!(peer = ?server_name, "dialled name is not a node name");
                return Err(CertificateError::NotValidForName.into());
            }
        };
        let x509 = parse_x509(end_entity, "peer certificate")
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let presented = spiffe::spiffe_uris(&x509);
        if presented.as_slice() == [expected.as_str()] {
            return Ok(ServerCertVerified::assertion());
        }
        tracing::debug!(%expected, ?presented, "peer is not the node dialled");
        Err(CertificateError::NotValidForNameContext {
            expected: server_name.to_owned(),
            presented: presented.into_iter().map(String::from).collect(),
        }
        .into())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
