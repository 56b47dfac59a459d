//! The mesh CA and node identities on disk: `Ca` write/load, `IssuedCert::write`,
//! `Identity::load` and every reason it refuses a certificate or key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use meshnode_transport::pki::{Ca, PkiError};
use meshnode_transport::tls::{node_name_from_cert, Identity, IdentityError};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

const TD: &str = "mesh.test";

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A CA written to `dir/ca`, and node-a's certificate written to `dir/certs`.
fn setup(dir: &Path) -> Result<(Ca, PathBuf, PathBuf, PathBuf)> {
    let ca = Ca::generate(TD, 30)?;
    ca.write(&dir.join("ca"))?;
    let (cert, key) = ca
        .issue("node-a", 10)?
        .write(&dir.join("certs"), "node-a")?;
    Ok((ca, dir.join("ca/ca.pem"), cert, key))
}

/// A certificate signed by the CA in `ca_dir`, shaped by `tweak` (for the refusal cases that
/// `Ca::issue` never produces). Returns (cert PEM, key PEM).
fn custom_cert(ca_dir: &Path, tweak: impl FnOnce(&mut CertificateParams)) -> (String, String) {
    let ca_key = KeyPair::from_pem(&fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let ca_pem = fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "node-a");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let uri = format!("spiffe://{TD}/node/node-a");
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(1);
    tweak(&mut params);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn ca_write_load_round_trip_with_modes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("new/ca");
    let ca = Ca::generate(TD, 30)?;
    ca.write(&dir)?;
    assert_eq!(mode(&dir), 0o755);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);

    let loaded = Ca::load(&dir)?;
    assert_eq!(loaded.trust_domain(), TD);
    assert_eq!(loaded.cert_pem(), ca.cert_pem());

    // A certificate issued by the loaded CA is trusted under the original CA certificate.
    let issued = loaded.issue("node-b", 1)?;
    let id = Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)?;
    assert_eq!((id.node_name(), id.trust_domain()), ("node-b", TD));
    Ok(())
}

#[test]
fn ca_write_never_overwrites_a_key() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    Ca::generate(TD, 30)?.write(tmp.path())?;
    let before = fs::read(tmp.path().join("ca.pem"))?;
    let err = Ca::generate(TD, 30)?.write(tmp.path()).unwrap_err();
    assert!(matches!(err, PkiError::KeyExists { .. }), "{err}");
    assert!(err.to_string().contains("ca.key"), "{err}");
    assert_eq!(
        fs::read(tmp.path().join("ca.pem"))?,
        before,
        "ca.pem untouched"
    );
    Ok(())
}

#[test]
fn ca_load_refuses_a_world_readable_key_and_a_foreign_pem() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    Ca::generate(TD, 30)?.write(tmp.path())?;
    let key = tmp.path().join("ca.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640))?;
    let err = Ca::load(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains(&key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;

    fs::write(tmp.path().join("ca.pem"), Ca::generate(TD, 1)?.cert_pem())?;
    let err = Ca::load(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("ca.pem") && err.contains("matches the key"),
        "{err}"
    );
    Ok(())
}

#[test]
fn issued_cert_round_trip_through_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_ca, ca_pem, cert, key) = setup(tmp.path())?;
    assert_eq!(cert, tmp.path().join("certs/node-a.pem"));
    assert_eq!(key, tmp.path().join("certs/node-a.key"));
    assert_eq!(mode(&cert), 0o644);
    assert_eq!(mode(&key), 0o600);

    let id = Identity::load(&ca_pem, &cert, &key)?;
    assert_eq!(id.node_name(), "node-a");
    assert_eq!(id.trust_domain(), TD);
    let leaf = &id.cert_chain()[0];
    assert_eq!(node_name_from_cert(leaf, TD).as_deref(), Some("node-a"));
    assert_eq!(node_name_from_cert(leaf, "other.test"), None);
    assert_eq!(node_name_from_cert(b"not a certificate", TD), None);
    Ok(())
}

#[test]
fn reissue_replaces_files_and_tightens_a_loose_key_mode() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ca, _, cert, key) = setup(tmp.path())?;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644))?;
    let again = ca.issue("node-a", 10)?;
    again.write(&tmp.path().join("certs"), "node-a")?;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(fs::read_to_string(&cert)?, again.cert_pem);
    let err = again.write(tmp.path(), "../evil").unwrap_err();
    assert!(matches!(err, PkiError::InvalidNodeName { .. }), "{err}");
    Ok(())
}

#[test]
fn key_readable_by_others_is_refused_naming_the_path() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_ca, ca_pem, cert, key) = setup(tmp.path())?;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644))?;
    let err = Identity::load(&ca_pem, &cert, &key).unwrap_err();
    assert!(
        matches!(err, IdentityError::KeyPermissions { mode: 0o644, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("chmod 600 {}", key.display())),
        "{msg}"
    );
    Ok(())
}

#[test]
fn missing_files_and_empty_pem_name_the_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_ca, ca_pem, cert, key) = setup(tmp.path())?;
    let missing = tmp.path().join("nope.pem");
    for (a, b, c) in [
        (&missing, &cert, &key),
        (&ca_pem, &missing, &key),
        (&ca_pem, &cert, &missing),
    ] {
        let msg = Identity::load(a, b, c).unwrap_err().to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
    }
    let empty = tmp.path().join("empty.pem");
    fs::write(&empty, "")?;
    let err = Identity::load(&ca_pem, &empty, &key).unwrap_err();
    assert!(matches!(err, IdentityError::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains("empty.pem"), "{err}");
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o600))?;
    let err = Identity::load(&ca_pem, &cert, &empty).unwrap_err();
    assert!(matches!(err, IdentityError::NoKey { .. }), "{err}");
    Ok(())
}

#[test]
fn certificate_from_a_foreign_ca_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_ca, ca_pem, _, _) = setup(tmp.path())?;
    // Same trust domain, same node name, another CA: only the signature tells them apart.
    let foreign = Ca::generate(TD, 30)?;
    let (cert, key) = foreign
        .issue("node-a", 10)?
        .write(&tmp.path().join("foreign"), "node-a")?;
    let err = Identity::load(&ca_pem, &cert, &key).unwrap_err();
    assert!(matches!(err, IdentityError::NotSignedByCa { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&cert.display().to_string()), "{msg}");
    assert!(msg.contains(&ca_pem.display().to_string()), "{msg}");
    Ok(())
}

#[test]
fn a_ca_bundle_trusts_every_ca_in_it() -> Result<()> {
    let (old, new) = (Ca::generate(TD, 30)?, Ca::generate(TD, 30)?);
    let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
    for ca in [&old, &new] {
        let issued = ca.issue("node-a", 1)?;
        let id = Identity::from_pem(&bundle, &issued.cert_pem, &issued.key_pem)?;
        assert_eq!(id.node_name(), "node-a");
    }
    Ok(())
}

#[test]
fn a_node_certificate_in_the_ca_file_is_refused() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let node = ca.issue("node-a", 1)?;
    let bundle = format!("{}{}", ca.cert_pem(), node.cert_pem);
    let err = Identity::from_pem(&bundle, &node.cert_pem, &node.key_pem).unwrap_err();
    assert!(
        matches!(err, IdentityError::NotCa { index: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("CA PEM"), "{err}");
    Ok(())
}

#[test]
fn key_of_another_certificate_is_refused() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let (a, b) = (ca.issue("node-a", 1)?, ca.issue("node-a", 1)?);
    let err = Identity::from_pem(ca.cert_pem(), &a.cert_pem, &b.key_pem).unwrap_err();
    assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err}");
    Ok(())
}

#[test]
fn malformed_identities_are_refused_with_the_reason() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ca, _, _, _) = setup(tmp.path())?;
    let ca_dir = tmp.path().join("ca");
    let now = OffsetDateTime::now_utc();
    type Tweak = Box<dyn FnOnce(&mut CertificateParams)>;
    let cases: Vec<(&str, Tweak)> = vec![
        (
            "expired",
            Box::new(move |p| {
                p.not_before = now - Duration::days(3);
                p.not_after = now - Duration::days(1);
            }),
        ),
        (
            "not valid before",
            Box::new(move |p| {
                p.not_before = now + Duration::days(1);
                p.not_after = now + Duration::days(3);
            }),
        ),
        (
            "lacks the clientAuth",
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
        ),
        (
            "lacks the serverAuth",
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]),
        ),
        (
            "no SPIFFE node ID",
            Box::new(|p| {
                p.subject_alt_names = vec![SanType::DnsName("node-a".try_into().unwrap())]
            }),
        ),
        (
            "invalid SPIFFE node ID",
            Box::new(|p| {
                let uri = format!("spiffe://{TD}/workload/node-a");
                p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            }),
        ),
        (
            "exactly one SPIFFE ID",
            Box::new(|p| {
                p.subject_alt_names = ["node-a", "node-b"]
                    .map(|n| SanType::URI(format!("spiffe://{TD}/node/{n}").try_into().unwrap()))
                    .to_vec();
            }),
        ),
        (
            "trust domain \"other.test\"",
            Box::new(|p| {
                let uri = "spiffe://other.test/node/node-a".to_string();
                p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            }),
        ),
    ];
    for (expect, tweak) in cases {
        let (cert, key) = custom_cert(&ca_dir, tweak);
        let msg = match Identity::from_pem(ca.cert_pem(), &cert, &key) {
            Ok(id) => panic!("{expect}: accepted as {}", id.node_name()),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(expect), "{expect}: {msg}");
        assert!(msg.contains("certificate PEM"), "{expect}: {msg}");
    }
    Ok(())
}

#[test]
fn reload_keeps_the_node_name() -> Result<()> {
    let ca = Ca::generate(TD, 30)?;
    let a = ca.issue("node-a", 1)?;
    let id = Identity::from_pem(ca.cert_pem(), &a.cert_pem, &a.key_pem)?;
    let clone = id.clone();
    let before = id.not_after();

    let renewed = ca.issue("node-a", 20)?;
    clone.reload(&renewed.cert_pem, &renewed.key_pem)?;
    assert!(
        id.not_after() > before,
        "the reload is seen through every clone"
    );
    assert_ne!(
        id.cert_chain(),
        Identity::from_pem(ca.cert_pem(), &a.cert_pem, &a.key_pem)?.cert_chain()
    );

    let b = ca.issue("node-b", 1)?;
    let err = id.reload(&b.cert_pem, &b.key_pem).unwrap_err();
    assert!(
        matches!(err, IdentityError::IdentityChanged { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("node/node-b"), "{err}");

    let foreign = Ca::generate(TD, 30)?.issue("node-a", 1)?;
    let err = id.reload(&foreign.cert_pem, &foreign.key_pem).unwrap_err();
    assert!(matches!(err, IdentityError::NotSignedByCa { .. }), "{err}");
    assert_eq!(id.node_name(), "node-a");
    Ok(())
}

#[test]
fn pki_input_errors_name_the_field() {
    let msg = Ca::generate("Not A Domain", 30).unwrap_err().to_string();
    assert!(msg.contains("trust domain"), "{msg}");
    let msg = Ca::generate(TD, 0).unwrap_err().to_string();
    assert!(msg.contains("days"), "{msg}");
    let ca = Ca::generate(TD, 30).unwrap();
    let msg = ca.issue("Node_A", 1).unwrap_err().to_string();
    assert!(msg.contains("node name"), "{msg}");
}
