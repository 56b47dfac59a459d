//! A node's TLS identity and the rustls configurations quinn runs on (docs/protocol.md,
//! "Certificates and identities").
//!
//! Every node holds a certificate from the mesh CA whose only SPIFFE ID (URI SAN) is
//! `spiffe://{trust_domain}/node/{name}`, with both the serverAuth and clientAuth usages.
//!
//! * Accepting: TLS 1.3, client certificates required and chained to the CA bundle
//!   (`WebPkiClientVerifier`). The caller's node name comes from its certificate through
//!   [`peer_node_name`], never from a header; authorisation is the accepting code's job.
//! * Dialling: the server's chain must lead to the CA bundle, and its SPIFFE ID must name the
//!   node dialled: the server name given to `quinn::Endpoint::connect` is the peer's node
//!   name, and anything else is refused during the handshake.
//! * Reloading ([`Identity::reload`]): the certificate and key are served through resolvers over
//!   one swappable slot shared by every clone of the [`Identity`] and every config built from
//!   it, so new handshakes use the new pair while established connections are untouched. A new
//!   CA bundle needs a new `Identity` and new configs (`quinn::Endpoint::set_server_config`,
//!   new client configs for later dials).
//!
//! TLS session resumption and 0-RTT are off: every handshake presents and checks the current
//! certificates, and a tunnel header can never be replayed. Mesh connections are long-lived,
//! so the cost of full handshakes is negligible.
//!
//! The crypto provider is always `ring`, passed explicitly (`builder_with_provider`), never the
//! process default: with another provider linked in, rustls cannot tell which one to use and
//! the default builder panics.

mod error;
mod load;
mod resolve;
pub(crate) mod spiffe;
mod verify;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};

pub use error::IdentityError;
use resolve::{CertCell, ClientResolver, ServerResolver};
use verify::{check_identity, MeshServerVerifier, Trust};

/// This node's TLS identity: the CA bundle it trusts, its own certificate chain and key, and
/// the node name and trust domain read from the certificate's SPIFFE ID.
///
/// Clones share the same certificate slot: a [`reload`](Identity::reload) through any clone
/// is seen by all of them and by every config they built.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<CryptoProvider>,
    trust: Trust,
    node_name: String,
    trust_domain: String,
    cert: Arc<CertCell>,
    not_after: std::sync::Mutex<SystemTime>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_name", &self.inner.node_name)
            .field("trust_domain", &self.inner.trust_domain)
            .field("ca", &self.inner.trust.label)
            .finish_non_exhaustive()
    }
}

/// The crypto provider every config of this crate uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Identity {
    /// Loads the CA bundle `ca` (one or more CA certificates: several during a rotation), the
    /// node certificate chain `cert` (leaf first) and its private key `key`, all PEM.
    ///
    /// Refused, with the path at fault in the message: a missing or unreadable file; no
    /// certificate or no key in the PEM; a key file readable by group or others (like ssh:
    /// `chmod 600` it); a certificate not signed by a CA of the bundle; no valid SPIFFE node
    /// ID; expired or not yet valid; lacking the serverAuth or clientAuth usage; a key that does
    /// not belong to the certificate.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, IdentityError> {
        let ca_pem = load::read_file("CA", ca)?;
        let cert_pem = load::read_file("certificate", cert)?;
        let key_pem = load::read_key_file(key)?;
        Identity::build(
            &ca_pem,
            &format!("CA file {}", ca.display()),
            &cert_pem,
            &format!("certificate {}", cert.display()),
            &key_pem,
            &format!("key file {}", key.display()),
        )
    }

    /// Like [`load`](Identity::load), from PEM text in memory (without the file-mode check).
    /// Messages name "the CA PEM", "the certificate PEM" and "the key PEM".
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Identity, IdentityError> {
        Identity::build(
            ca_pem.as_bytes(),
            "the CA PEM",
            cert_pem.as_bytes(),
            "the certificate PEM",
            key_pem.as_bytes(),
            "the key PEM",
        )
    }

    fn build(
        ca_pem: &[u8],
        ca_label: &str,
        cert_pem: &[u8],
        cert_label: &str,
        key_pem: &[u8],
        key_label: &str,
    ) -> Result<Identity, IdentityError> {
        let provider = provider();
        let trust = Trust::from_pem(ca_pem, ca_label)?;
        let checked = check_identity(&trust, &provider, cert_pem, cert_label, key_pem, key_label)?;
        Ok(Identity {
            inner: Arc::new(Inner {
                provider,
                trust,
                node_name: checked.node_name,
                trust_domain: checked.trust_domain,
                cert: Arc::new(CertCell::new(checked.key)),
                not_after: std::sync::Mutex::new(checked.not_after),
            }),
        })
    }

    /// This node's name, from its certificate's SPIFFE ID.
    pub fn node_name(&self) -> &str {
        &self.inner.node_name
    }

    /// The mesh's trust domain, from this node's certificate's SPIFFE ID.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// When the current certificate expires (changes with [`reload`](Identity::reload)).
    pub fn not_after(&self) -> SystemTime {
        *self
            .inner
            .not_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current certificate chain, leaf first.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        self.inner.cert.get().cert.clone()
    }

    /// The rustls server configuration for quinn: TLS 1.3 only, a client certificate chained
    /// to the CA bundle is required, `alpns` offered in order, this node's current
    /// certificate served (reloads reach new handshakes). The caller's node name is then read
    /// with [`peer_node_name`].
    pub fn server_config(&self, alpns: &[&[u8]]) -> Result<Arc<QuicServerConfig>, IdentityError> {
        let inner = &self.inner;
        let verifier = WebPkiClientVerifier::builder_with_provider(
            inner.trust.roots.clone(),
            inner.provider.clone(),
        )
        .build()
        .map_err(config_err)?;
        let mut config = rustls::ServerConfig::builder_with_provider(inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ServerResolver(inner.cert.clone())));
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        config.max_early_data_size = 0;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        let quic = QuicServerConfig::try_from(config).map_err(config_err)?;
        Ok(Arc::new(quic))
    }

    /// The rustls client configuration for quinn: TLS 1.3 only, `alpns` offered, this node's
    /// current certificate presented, and the server accepted only if its chain leads to the CA
    /// bundle and its SPIFFE ID is `spiffe://{trust_domain}/node/{server_name}`, where
    /// `server_name` is the name passed to `quinn::Endpoint::connect`: pass the node name of
    /// the peer being dialled.
    pub fn client_config(&self, alpns: &[&[u8]]) -> Result<Arc<QuicClientConfig>, IdentityError> {
        let inner = &self.inner;
        let verifier = MeshServerVerifier {
            roots: inner.trust.roots.clone(),
            algs: inner.provider.signature_verification_algorithms,
            trust_domain: inner.trust_domain.clone(),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(ClientResolver(inner.cert.clone())));
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        config.resumption = Resumption::disabled();
        config.enable_early_data = false;
        let quic = QuicClientConfig::try_from(config).map_err(config_err)?;
        Ok(Arc::new(quic))
    }

    /// Swaps in a new certificate chain and key (PEM) for every later handshake, after the
    /// same checks as [`load`](Identity::load) against the CA bundle this identity was built
    /// with. The new certificate must name the same node in the same trust domain. Established
    /// connections keep the certificate they were made with. A changed CA bundle cannot be
    /// reloaded this way: build a new `Identity` and new configs.
    pub fn reload(&self, cert_pem: &str, key_pem: &str) -> Result<(), IdentityError> {
        self.swap(
            cert_pem.as_bytes(),
            "the new certificate PEM",
            key_pem.as_bytes(),
            "the new key PEM",
        )
    }

    /// [`reload`](Identity::reload) from files, with the same file checks as
    /// [`load`](Identity::load) (including the key file's permissions).
    pub fn reload_files(&self, cert: &Path, key: &Path) -> Result<(), IdentityError> {
        let cert_pem = load::read_file("certificate", cert)?;
        let key_pem = load::read_key_file(key)?;
        let c = format!("certificate {}", cert.display());
        let k = format!("key file {}", key.display());
        self.swap(&cert_pem, &c, &key_pem, &k)
    }

    fn swap(
        &self,
        cert_pem: &[u8],
        cert_label: &str,
        key_pem: &[u8],
        key_label: &str,
    ) -> Result<(), IdentityError> {
        let inner = &self.inner;
        let checked = check_identity(
            &inner.trust,
            &inner.provider,
            cert_pem,
            cert_label,
            key_pem,
            key_label,
        )?;
        if checked.node_name != inner.node_name || checked.trust_domain != inner.trust_domain {
            return Err(IdentityError::IdentityChanged {
                cert: cert_label.into(),
                expected: spiffe::node_spiffe_id(&inner.trust_domain, &inner.node_name),
                found: spiffe::node_spiffe_id(&checked.trust_domain, &checked.node_name),
            });
        }
        let mut not_after = inner
            .not_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.cert.set(checked.key);
        *not_after = checked.not_after;
        tracing::info!(node = %inner.node_name, "TLS certificate reloaded");
        Ok(())
    }
}

fn config_err(e: impl fmt::Display) -> IdentityError {
    IdentityError::Config {
        reason: e.to_string(),
    }
}

/// The caller's node name on an established connection, from the leaf of the certificate it
/// presented: its single SPIFFE ID must be `spiffe://{trust_domain}/node/{name}`. `None` when
/// there is no certificate or no such ID. The chain itself was checked by the handshake.
pub fn peer_node_name(conn: &quinn::Connection, trust_domain: &str) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_name_from_cert(chain.first()?, trust_domain)
}

/// The node name in a DER leaf certificate whose single SPIFFE ID is
/// `spiffe://{trust_domain}/node/{name}`; `None` otherwise. Does not check the chain.
pub fn node_name_from_cert(der: &[u8], trust_domain: &str) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    spiffe::node_name_of(&cert, trust_domain)
}
