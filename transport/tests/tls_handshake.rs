//! Real quinn handshakes over loopback with the configs of `tls::Identity`: mutual success,
//! refusal of a foreign CA's client, refusal of a valid mesh node that is not the one dialled,
//! refusal of a client without a certificate, and certificate reload for new handshakes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshnode_transport::pki::Ca;
use meshnode_transport::tls::{peer_node_name, Identity};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::rustls;
use quinn::{Connection, ConnectionError, Endpoint};
use rustls::pki_types::CertificateDer;

const TD: &str = "mesh.test";
const ALPN: &[u8] = b"meshnode/1";
const LIMIT: Duration = Duration::from_secs(10);

fn identity(ca: &Ca, name: &str) -> Result<Identity> {
    let issued = ca.issue(name, 1)?;
    Ok(Identity::from_pem(
        ca.cert_pem(),
        &issued.cert_pem,
        &issued.key_pem,
    )?)
}

fn server(id: &Identity) -> Result<(Endpoint, SocketAddr)> {
    let config = quinn::ServerConfig::with_crypto(id.server_config(&[ALPN])?);
    let endpoint = Endpoint::server(config, "127.0.0.1:0".parse()?)?;
    let addr = endpoint.local_addr()?;
    Ok((endpoint, addr))
}

fn client(id: &Identity) -> Result<Endpoint> {
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(id.client_config(&[ALPN])?));
    Ok(endpoint)
}

async fn accept(server: &Endpoint) -> Result<Connection, ConnectionError> {
    let incoming = server.accept().await.expect("server endpoint open");
    incoming.await
}

async fn dial(
    client: &Endpoint,
    addr: SocketAddr,
    name: &str,
) -> Result<Connection, ConnectionError> {
    client.connect(addr, name).expect("valid dial").await
}

/// Dials `name` at the server and accepts on it at the same time; both outcomes.
async fn handshake(
    server: &Endpoint,
    client: &Endpoint,
    addr: SocketAddr,
    name: &str,
) -> Result<(
    Result<Connection, ConnectionError>,
    Result<Connection, ConnectionError>,
)> {
    let both = async { tokio::join!(accept(server), dial(client, addr, name)) };
    tokio::time::timeout(LIMIT, both)
        .await
        .context("handshake timed out")
}

/// The side that accepted a TLS 1.3 handshake before its peer refused it learns of the refusal
/// from the peer's CONNECTION_CLOSE: wait for it.
async fn expect_closed(side: Result<Connection, ConnectionError>) -> Result<ConnectionError> {
    match side {
        Err(e) => Ok(e),
        Ok(conn) => Ok(tokio::time::timeout(LIMIT, conn.closed()).await?),
    }
}

fn peer_leaf(conn: &Connection) -> Result<CertificateDer<'static>> {
    let chain = conn
        .peer_identity()
        .context("no peer identity")?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("peer identity is not a certificate chain"))?;
    Ok(chain[0].clone())
}

#[tokio::test]
async fn mutual_tls_and_both_sides_see_the_peer_name() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let (a, b) = (identity(&ca, "node-a")?, identity(&ca, "node-b")?);
    let (srv, addr) = server(&b)?;
    let cli = client(&a)?;

    let (accepted, dialled) = handshake(&srv, &cli, addr, "node-b").await?;
    let (accepted, dialled) = (accepted?, dialled?);
    assert_eq!(peer_node_name(&accepted, TD).as_deref(), Some("node-a"));
    assert_eq!(peer_node_name(&dialled, TD).as_deref(), Some("node-b"));
    assert_eq!(
        peer_node_name(&accepted, "other.test"),
        None,
        "trust domain must match"
    );
    let alpn = dialled
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    assert_eq!(alpn.as_deref(), Some(ALPN));

    // The connection carries data.
    let (mut send, mut recv) = dialled.open_bi().await?;
    send.write_all(b"ping").await?;
    send.finish()?;
    let (mut s2, mut r2) = tokio::time::timeout(LIMIT, accepted.accept_bi()).await??;
    assert_eq!(r2.read_to_end(16).await?, b"ping");
    s2.write_all(b"pong").await?;
    s2.finish()?;
    assert_eq!(
        tokio::time::timeout(LIMIT, recv.read_to_end(16)).await??,
        b"pong"
    );
    Ok(())
}

#[tokio::test]
async fn server_refuses_a_client_from_another_ca() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let b = identity(&ca, "node-b")?;
    // The intruder trusts the mesh CA (so it accepts node-b) but its own certificate, same
    // trust domain and a plausible name, comes from another CA.
    let rogue = Ca::generate(TD, 30)?;
    let issued = rogue.issue("node-a", 1)?;
    let bundle = format!("{}{}", ca.cert_pem(), rogue.cert_pem());
    let intruder = Identity::from_pem(&bundle, &issued.cert_pem, &issued.key_pem)?;

    let (srv, addr) = server(&b)?;
    let cli = client(&intruder)?;
    let (accepted, dialled) = handshake(&srv, &cli, addr, "node-b").await?;
    let Err(e) = accepted else {
        bail!("server accepted a certificate from another CA")
    };
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    expect_closed(dialled).await?;
    Ok(())
}

#[tokio::test]
async fn client_refuses_a_mesh_node_that_is_not_the_one_dialled() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let (a, c) = (identity(&ca, "node-a")?, identity(&ca, "node-c")?);
    let (srv, addr) = server(&c)?;
    let cli = client(&a)?;

    // node-a believes node-b lives at this address; node-c answers with a valid mesh cert.
    let (accepted, dialled) = handshake(&srv, &cli, addr, "node-b").await?;
    let Err(e) = dialled else {
        bail!("client accepted node-c when dialling node-b")
    };
    assert!(e.to_string().contains("not valid for name"), "{e}");
    expect_closed(accepted).await?;

    // The same server, dialled by its own name, is accepted.
    let (accepted, dialled) = handshake(&srv, &cli, addr, "node-c").await?;
    assert_eq!(peer_node_name(&dialled?, TD).as_deref(), Some("node-c"));
    assert_eq!(peer_node_name(&accepted?, TD).as_deref(), Some("node-a"));
    Ok(())
}

#[tokio::test]
async fn client_refuses_a_server_from_another_ca() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let a = identity(&ca, "node-a")?;
    let impostor = identity(&Ca::generate(TD, 30)?, "node-b")?;
    let (srv, addr) = server(&impostor)?;
    let cli = client(&a)?;
    let (accepted, dialled) = handshake(&srv, &cli, addr, "node-b").await?;
    let Err(e) = dialled else {
        bail!("client accepted node-b from another CA")
    };
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    expect_closed(accepted).await?;
    Ok(())
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let (srv, addr) = server(&identity(&ca, "node-b")?)?;
    // A standard TLS client that trusts the mesh CA (node-b's DNS SAN satisfies it) but has
    // no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()) {
        roots.add(der?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cli = Endpoint::client("127.0.0.1:0".parse()?)?;
    let config = QuicClientConfig::try_from(tls)?;
    cli.set_default_client_config(quinn::ClientConfig::new(Arc::new(config)));

    let (accepted, dialled) = handshake(&srv, &cli, addr, "node-b").await?;
    let Err(e) = accepted else {
        bail!("server accepted a client without a certificate")
    };
    assert!(e.to_string().contains("no certificates"), "{e}");
    expect_closed(dialled).await?;
    Ok(())
}

#[tokio::test]
async fn reload_swaps_certificates_for_new_handshakes_only() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let (a, b) = (identity(&ca, "node-a")?, identity(&ca, "node-b")?);
    let (srv, addr) = server(&b)?;
    let cli = client(&a)?;

    let (acc1, dial1) = handshake(&srv, &cli, addr, "node-b").await?;
    let (acc1, dial1) = (acc1?, dial1?);
    assert_eq!(peer_leaf(&dial1)?, b.cert_chain()[0]);
    assert_eq!(peer_leaf(&acc1)?, a.cert_chain()[0]);
    let (old_a, old_b) = (a.cert_chain()[0].clone(), b.cert_chain()[0].clone());

    // Reload both sides through clones: configs already built must pick the new pairs up.
    let new_b = ca.issue("node-b", 2)?;
    b.clone().reload(&new_b.cert_pem, &new_b.key_pem)?;
    let new_a = ca.issue("node-a", 2)?;
    a.clone().reload(&new_a.cert_pem, &new_a.key_pem)?;
    assert_ne!(b.cert_chain()[0], old_b);
    assert_ne!(a.cert_chain()[0], old_a);

    let (acc2, dial2) = handshake(&srv, &cli, addr, "node-b").await?;
    let (acc2, dial2) = (acc2?, dial2?);
    assert_eq!(
        peer_leaf(&dial2)?,
        b.cert_chain()[0],
        "server serves the new cert"
    );
    assert_eq!(
        peer_leaf(&acc2)?,
        a.cert_chain()[0],
        "client presents the new cert"
    );
    assert_eq!(peer_node_name(&acc2, TD).as_deref(), Some("node-a"));

    // The established connection is untouched and still works.
    assert!(dial1.close_reason().is_none());
    assert_eq!(peer_leaf(&dial1)?, old_b);
    let mut send = dial1.open_uni().await?;
    send.write_all(b"still here").await?;
    send.finish()?;
    let mut recv = tokio::time::timeout(LIMIT, acc1.accept_uni()).await??;
    assert_eq!(recv.read_to_end(64).await?, b"still here");
    Ok(())
}
