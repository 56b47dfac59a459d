//! Reading PEM files: certificates, private keys, and the ssh-like key permission check.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pemfile::Item;

use super::IdentityError;

/// Permission bits that must be clear on a key file: anything for group or others.
pub(crate) const KEY_MODE_FORBIDDEN: u32 = 0o077;

/// Reads a certificate or CA file.
pub(crate) fn read_file(kind: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    crate::files::read_bounded(path, crate::files::MAX_PEM_BYTES).map_err(|source| {
        IdentityError::Read {
            kind,
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Reads a private key file, refusing it if group or others may read it. The mode is taken
/// from the opened file, so it is the mode of the very bytes that are read.
pub(crate) fn read_key_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let read_err = |source| IdentityError::Read {
        kind: "key",
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
    if mode & KEY_MODE_FORBIDDEN != 0 {
        return Err(IdentityError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    crate::files::read_open_bounded(file, crate::files::MAX_PEM_BYTES).map_err(read_err)
}

/// Every certificate in a PEM text, in order; other PEM blocks are ignored.
pub(crate) fn parse_certs(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let mut certs = Vec::new();
    for item in rustls_pemfile::read_all(&mut &pem[..]) {
        match item.map_err(|e| malformed(what, e))? {
            Item::X509Certificate(der) => certs.push(der),
            _ => continue,
        }
    }
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// The one private key in a PEM text (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let mut key = None;
    for item in rustls_pemfile::read_all(&mut &pem[..]) {
        let found = match item.map_err(|e| malformed(what, e))? {
            Item::Pkcs8Key(k) => PrivateKeyDer::Pkcs8(k),
            Item::Pkcs1Key(k) => PrivateKeyDer::Pkcs1(k),
            Item::Sec1Key(k) => PrivateKeyDer::Sec1(k),
            _ => continue,
        };
        if key.replace(found).is_some() {
            return Err(IdentityError::SeveralKeys { what: what.into() });
        }
    }
    key.ok_or_else(|| IdentityError::NoKey { what: what.into() })
}

fn malformed(what: &str, e: std::io::Error) -> IdentityError {
    IdentityError::Malformed {
        what: what.into(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_pem_has_no_cert_or_key() {
        let e = parse_certs(b"", "x.pem").unwrap_err();
        assert!(e.to_string().contains("x.pem"), "{e}");
        let e = parse_key(b"hello", "x.key").unwrap_err();
        assert!(matches!(e, IdentityError::NoKey { .. }), "{e}");
    }

    #[test]
    fn broken_pem_is_malformed() {
        let pem = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = parse_certs(pem, "x.pem").unwrap_err();
        assert!(matches!(e, IdentityError::Malformed { .. }), "{e}");
    }
}
