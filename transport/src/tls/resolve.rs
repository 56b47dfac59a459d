//! Certificate resolvers over one swappable certificate, so a reload reaches new handshakes
//! of every config built from the same [`Identity`](super::Identity).

use std::fmt;
use std::sync::{Arc, RwLock};

use quinn::rustls;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

/// The node's current certificate chain and key. Readers clone the inner `Arc` (one pointer
/// copy under a read lock held for no longer than that), a reload replaces it whole: a
/// handshake sees either the old or the new pair, never a mix.
pub(crate) struct CertCell {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertCell {
    /// A cell holding `key`.
    pub(crate) fn new(key: Arc<CertifiedKey>) -> CertCell {
        CertCell {
            current: RwLock::new(key),
        }
    }

    /// The current certificate and key.
    pub(crate) fn get(&self) -> Arc<CertifiedKey> {
        // A poisoned lock only means a writer panicked between two pointer writes, which
        // cannot leave the `Arc` half-written: keep serving it.
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Replaces the certificate and key for every later handshake.
    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut g) => *g = key,
            Err(p) => *p.into_inner() = key,
        }
    }
}

impl fmt::Debug for CertCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertCell")
            .field("chain_len", &self.get().cert.len())
            .finish_non_exhaustive()
    }
}

/// Serves the node's current certificate to every client, whatever SNI it sent (peers dial
/// by node name, and a node has exactly one identity).
#[derive(Debug)]
pub(crate) struct ServerResolver(pub(crate) Arc<CertCell>);

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// Presents the node's current certificate whenever a server asks for one.
#[derive(Debug)]
pub(crate) struct ClientResolver(pub(crate) Arc<CertCell>);

impl ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
