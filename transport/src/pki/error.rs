//! Why a CA could not be created, loaded or written, or a certificate issued.

use std::path::PathBuf;

/// Errors of [`Ca`](super::Ca) and [`IssuedCert`](super::IssuedCert). Every message names the
/// file, directory or field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain {value:?}: {reason}")]
    InvalidTrustDomain {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The node name is not 1..=63 of `[a-z0-9-]`.
    #[error("invalid node name {value:?}: {reason}")]
    InvalidNodeName {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The validity in days is out of range.
    #[error("invalid days {value}: must be between 1 and {max}")]
    InvalidDays {
        /// The value given.
        value: u32,
        /// The largest accepted value.
        max: u32,
    },
    /// A file or directory operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was attempted: "read", "create", "write", ...
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `ca.key` exists already; a CA key is never overwritten.
    #[error("{} already exists; refusing to overwrite a CA key (move it away to create a new CA)", path.display())]
    KeyExists {
        /// The existing key file.
        path: PathBuf,
    },
    /// A key file may be read by group or others; refused, as ssh does.
    #[error(
        "key file {} is readable by group or others (mode {mode:04o}); run `chmod 600 {}`",
        path.display(), path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file's content is not what it should be.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA's certificate expired: it can issue nothing.
    #[error("the CA certificate for trust domain {trust_domain} expired at {not_after}; create a new CA")]
    CaExpired {
        /// The CA's trust domain.
        trust_domain: String,
        /// When it expired.
        not_after: String,
    },
    /// Key generation or certificate signing failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being made.
        what: String,
        /// The cause.
        source: rcgen::Error,
    },
}
