//! Why a TLS identity could not be loaded, reloaded or turned into a TLS configuration.
//!
//! Every message names the file at fault: the `ca`, `cert` and `key` fields below read
//! "CA file PATH", "certificate PATH" and "key file PATH". Identities built from memory
//! ([`Identity::from_pem`], [`Identity::reload`]) name the PEM instead: "the CA PEM",
//! "the certificate PEM", "the key PEM" (or "the new ..." for a reload).
//!
//! [`Identity::from_pem`]: super::Identity::from_pem
//! [`Identity::reload`]: super::Identity::reload

use std::path::PathBuf;

/// Errors of [`Identity`](super::Identity): loading, reloading, building configs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file is missing or cannot be read.
    #[error("cannot read {kind} file {}: {source}", path.display())]
    Read {
        /// Which file: "CA", "certificate" or "key".
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file may be read by group or others; refused, as ssh does.
    #[error(
        "key file {} is readable by group or others (mode {mode:04o}); \
         run `chmod 600 {}`", path.display(), path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No `CERTIFICATE` block in a PEM file.
    #[error("{what} holds no PEM certificate")]
    NoCertificate {
        /// The file (or PEM) at fault.
        what: String,
    },
    /// No private key block in the key PEM.
    #[error("{what} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// The file (or PEM) at fault.
        what: String,
    },
    /// More than one private key in the key PEM: which one is meant is unclear.
    #[error("{what} holds more than one private key")]
    SeveralKeys {
        /// The file (or PEM) at fault.
        what: String,
    },
    /// A PEM block or the certificate inside it does not parse.
    #[error("{what} is malformed: {reason}")]
    Malformed {
        /// The file (or PEM) at fault.
        what: String,
        /// What the parser said.
        reason: String,
    },
    /// The CA bundle holds a certificate that is not a CA certificate; trusting it as a root
    /// would be a configuration mistake.
    #[error(
        "{ca} holds a certificate that is not a CA (number {index}, subject {subject}); \
         only CA certificates belong in the CA file"
    )]
    NotCa {
        /// The CA bundle file (or PEM).
        ca: String,
        /// Its position in the bundle, from 1.
        index: usize,
        /// Its subject.
        subject: String,
    },
    /// The private key is of a kind the TLS stack cannot sign with.
    #[error("{key} cannot be used: {reason}")]
    UnsupportedKey {
        /// The key file (or PEM).
        key: String,
        /// What the crypto provider said.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error("{key} does not belong to {cert}")]
    KeyMismatch {
        /// The certificate file (or PEM).
        cert: String,
        /// The key file (or PEM).
        key: String,
    },
    /// The certificate does not chain to any CA certificate of the trust bundle.
    #[error("{cert} is not signed by any CA in {ca}: {reason}")]
    NotSignedByCa {
        /// The certificate file (or PEM).
        cert: String,
        /// The CA bundle file (or PEM).
        ca: String,
        /// The chain validator's reason.
        reason: String,
    },
    /// The certificate carries no `spiffe://` URI SAN.
    #[error(
        "{cert} has no SPIFFE node ID \
         (a URI SAN spiffe://TRUST_DOMAIN/node/NAME)"
    )]
    NoSpiffeId {
        /// The certificate file (or PEM).
        cert: String,
    },
    /// The certificate's SPIFFE ID is not a node ID, or there are several.
    #[error("{cert} has an invalid SPIFFE node ID {uri:?}: {reason}")]
    InvalidSpiffeId {
        /// The certificate file (or PEM).
        cert: String,
        /// The URI (or URIs) found.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate's trust domain is not one the CA bundle's certificates are for.
    #[error("{cert} is for trust domain {found:?}, but the CAs in {ca} are for {expected}")]
    TrustDomainMismatch {
        /// The certificate file (or PEM).
        cert: String,
        /// The CA bundle file (or PEM).
        ca: String,
        /// The certificate's trust domain.
        found: String,
        /// The CA certificates' trust domains.
        expected: String,
    },
    /// The certificate's validity ended.
    #[error("{cert} expired at {not_after}")]
    Expired {
        /// The certificate file (or PEM).
        cert: String,
        /// When it expired.
        not_after: String,
    },
    /// The certificate's validity has not begun.
    #[error("{cert} is not valid before {not_before} (check the clock)")]
    NotYetValid {
        /// The certificate file (or PEM).
        cert: String,
        /// When it becomes valid.
        not_before: String,
    },
    /// The certificate lacks serverAuth or clientAuth: mesh nodes both dial and accept.
    #[error(
        "{cert} lacks the {usage} extended key usage \
         (node certificates need both serverAuth and clientAuth)"
    )]
    MissingKeyUsage {
        /// The certificate file (or PEM).
        cert: String,
        /// "serverAuth" or "clientAuth".
        usage: &'static str,
    },
    /// The certificate is a CA certificate, not a node certificate.
    #[error("{cert} is a CA certificate, not a node certificate")]
    IsCa {
        /// The certificate file (or PEM).
        cert: String,
    },
    /// A reloaded certificate names another node or trust domain.
    #[error("{cert} is for {found}, but this node is {expected}; a reload cannot change a node's identity")]
    IdentityChanged {
        /// The new certificate file (or PEM).
        cert: String,
        /// This node's SPIFFE ID.
        expected: String,
        /// The new certificate's SPIFFE ID.
        found: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("cannot build the TLS configuration: {reason}")]
    Config {
        /// What rustls or quinn said.
        reason: String,
    },
}
