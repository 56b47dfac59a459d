//! etcd with client-certificate TLS and with username/password auth, each checked on a real
//! etcd: the right credentials register, the wrong ones keep the registry disconnected with a
//! `last_error` that says what is at fault (TLS and the files; authentication).

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

use meshnode_registry::etcd::{self, EtcdTls};
use meshnode_registry::testing::{
    has_node, registration, test_config, wait_for_status, wait_for_view, EtcdProcess,
};
use meshnode_registry::RegistryState;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

const LIMIT: Duration = Duration::from_secs(40);

/// Writes `ca.pem`, `server.pem`/`server.key` (for 127.0.0.1) and `client.pem`/`client.key`
/// (all signed by the CA) into `dir`.
fn pki(dir: &Path) -> anyhow::Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for (name, sans) in [("server", true), ("client", false)] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        if sans {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    Ok(())
}

#[tokio::test]
async fn client_certificate_tls() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        pki(d)?;
        let etcd = EtcdProcess::start_tls(
            &d.join("ca.pem"),
            &d.join("server.pem"),
            &d.join("server.key"),
        )
        .await?;
        let mut cfg = test_config(&etcd.endpoint, P);
        cfg.tls = Some(EtcdTls {
            ca: Some(d.join("ca.pem")),
            cert: Some(d.join("client.pem")),
            key: Some(d.join("client.key")),
        });
        let good = etcd::start(cfg.clone());
        good.register(registration("node-a", "127.0.0.1:4433", &[("echo", 7)]))
            .await?;
        wait_for_view(&good, SOON, "node-a over TLS", |v| {
            has_node(v, "node-a", &["echo"])
        })
        .await?;

        // No client certificate: etcd refuses the handshake; the error says TLS and names
        // the files.
        cfg.tls = Some(EtcdTls {
            ca: Some(d.join("ca.pem")),
            cert: None,
            key: None,
        });
        let bad = etcd::start(cfg);
        bad.register(registration("node-b", "127.0.0.1:4434", &[("echo", 7)]))
            .await?;
        let status = wait_for_status(&bad, SOON, "a TLS error", |s| {
            s.state == RegistryState::Disconnected && s.last_error.is_some()
        })
        .await?;
        let err = status.last_error.unwrap_or_default();
        println!("without a client certificate: {err}");
        assert!(err.contains("TLS") && err.contains("ca.pem"), "{err}");
        assert!(!good.view().borrow().nodes.contains_key("node-b"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn username_and_password() -> anyhow::Result<()> {
    bounded(LIMIT, async {
        let etcd = EtcdProcess::start().await?;
        let mut admin = etcd.client().await?;
        admin.user_add("root", "rootpw", None).await?;
        admin.user_grant_role("root", "root").await?;
        admin.user_add("meshnode", "s3cret", None).await?;
        admin.role_add("mesh").await?;
        admin
            .role_grant_permission(
                "mesh",
                etcd_client::Permission::read_write(format!("{P}/")).with_prefix(),
            )
            .await?;
        admin.user_grant_role("meshnode", "mesh").await?;
        admin.auth_enable().await?;

        let mut cfg = test_config(&etcd.endpoint, P);
        cfg.user = Some(("meshnode".into(), "s3cret".into()));
        let good = etcd::start(cfg.clone());
        good.register(registration("node-a", "127.0.0.1:4433", &[("echo", 7)]))
            .await?;
        wait_for_view(&good, SOON, "node-a with auth", |v| {
            has_node(v, "node-a", &["echo"])
        })
        .await?;
        wait_for_status(&good, SOON, "registered", |s| {
            s.state == RegistryState::Connected && s.registered
        })
        .await?;

        cfg.user = Some(("meshnode".into(), "wrong".into()));
        let bad = etcd::start(cfg);
        bad.register(registration("node-b", "127.0.0.1:4434", &[("echo", 7)]))
            .await?;
        let status = wait_for_status(&bad, SOON, "an auth error", |s| {
            s.state == RegistryState::Disconnected && s.last_error.is_some()
        })
        .await?;
        let err = status.last_error.unwrap_or_default();
        println!("wrong password: {err}");
        assert!(err.contains("authentication failed"), "{err}");
        Ok(())
    })
    .await
}
