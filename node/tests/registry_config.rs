//! `[registry]` files are checked before anything starts, like `[tls]`'s: `meshnode validate`
//! and `meshnode run` exit 78 naming the field when a CA, certificate, key or password file
//! is missing, not a regular file, too large, or (key, password) readable by others.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_meshnode");

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn meshnode(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("MESHNODE_CONFIG")
        .output()
        .context("running meshnode")?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn chmod(p: &Path, mode: u32) -> Result<()> {
    Ok(std::fs::set_permissions(
        p,
        std::fs::Permissions::from_mode(mode),
    )?)
}

/// A mesh CA and node-a's certificate, plus `[registry]` files: `etcd/ca.pem`,
/// `etcd/client.pem`, `etcd/client.key` (0600) and `etcd/password` (0600).
fn setup() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (code, out) = meshnode(&["ca", "init", "--dir", s(&d.join("ca"))])?;
    assert_eq!(code, 0, "{out}");
    let (code, out) = meshnode(&[
        "cert",
        "issue",
        "--ca-dir",
        s(&d.join("ca")),
        "--name",
        "node-a",
        "--out",
        s(&d.join("certs")),
    ])?;
    assert_eq!(code, 0, "{out}");
    let etcd = d.join("etcd");
    std::fs::create_dir(&etcd)?;
    // Any PEM will do: validate checks the files, not etcd's chain.
    std::fs::copy(d.join("ca/ca.pem"), etcd.join("ca.pem"))?;
    std::fs::copy(d.join("certs/node-a.pem"), etcd.join("client.pem"))?;
    std::fs::copy(d.join("certs/node-a.key"), etcd.join("client.key"))?;
    chmod(&etcd.join("client.key"), 0o600)?;
    std::fs::write(etcd.join("password"), "hunter2\n")?;
    chmod(&etcd.join("password"), 0o600)?;
    Ok(dir)
}

const BASE: &str = r#"[node]
name = "node-a"
listen = "127.0.0.1:0"
state_dir = "state"
[admin]
listen = "127.0.0.1:0"
[tls]
ca = "ca/ca.pem"
cert = "certs/node-a.pem"
key = "certs/node-a.key"
"#;

const REGISTRY: &str = r#"[registry]
endpoints = ["https://127.0.0.1:1"]
lease_ttl = "3s"
ca = "etcd/ca.pem"
cert = "etcd/client.pem"
key = "etcd/client.key"
username = "meshnode"
password_file = "etcd/password"
"#;

fn write_config(dir: &Path, registry: &str) -> Result<std::path::PathBuf> {
    let p = dir.join("meshnode.toml");
    std::fs::write(&p, format!("{BASE}{registry}"))?;
    Ok(p)
}

fn validate(dir: &Path, registry: &str) -> Result<(i32, String)> {
    let p = write_config(dir, registry)?;
    meshnode(&["validate", "-c", s(&p)])
}

/// Asserts exit 78 and that the message names `field` and contains `detail`.
fn refused(dir: &Path, registry: &str, field: &str, detail: &str) -> Result<()> {
    let (code, out) = validate(dir, registry)?;
    assert_eq!(code, 78, "{field}: {out}");
    assert!(out.contains(field), "message should name {field}: {out}");
    assert!(out.contains(detail), "message should say {detail:?}: {out}");
    assert!(!out.contains("panicked"), "{out}");
    Ok(())
}

#[test]
fn good_registry_files_validate() -> Result<()> {
    let dir = setup()?;
    let (code, out) = validate(dir.path(), REGISTRY)?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

#[test]
fn missing_or_odd_files_are_refused_naming_the_field() -> Result<()> {
    let dir = setup()?;
    let d = dir.path();
    refused(
        d,
        &REGISTRY.replace("etcd/ca.pem", "etcd/absent.pem"),
        "registry.ca",
        "absent.pem",
    )?;
    refused(
        d,
        &REGISTRY.replace("etcd/client.pem", "etcd"),
        "registry.cert",
        "not a regular file",
    )?;
    std::fs::write(d.join("etcd/empty.pem"), "")?;
    refused(
        d,
        &REGISTRY.replace("etcd/ca.pem", "etcd/empty.pem"),
        "registry.ca",
        "empty",
    )?;
    let big = d.join("etcd/big-password");
    std::fs::write(&big, "x".repeat(5000))?;
    chmod(&big, 0o600)?;
    refused(
        d,
        &REGISTRY.replace("etcd/password", "etcd/big-password"),
        "registry.password_file",
        "5000 bytes",
    )?;
    refused(
        d,
        &REGISTRY.replace("key = \"etcd/client.key\"\n", ""),
        "registry.key",
        "go together",
    )?;
    refused(
        d,
        &REGISTRY.replace("https://", "http://"),
        "registry.endpoints[0]",
        "https",
    )?;
    Ok(())
}

#[test]
fn key_and_password_readable_by_others_are_refused() -> Result<()> {
    let dir = setup()?;
    let d = dir.path();
    for (field, file) in [
        ("registry.key", "etcd/client.key"),
        ("registry.password_file", "etcd/password"),
    ] {
        let p = d.join(file);
        chmod(&p, 0o644)?;
        refused(d, REGISTRY, field, "readable by group or others")?;
        chmod(&p, 0o640)?;
        refused(d, REGISTRY, field, "chmod 600")?;
        chmod(&p, 0o600)?;
    }
    // Certificates and the CA are public: 0644 is fine.
    chmod(&d.join("etcd/ca.pem"), 0o644)?;
    chmod(&d.join("etcd/client.pem"), 0o644)?;
    let (code, out) = validate(d, REGISTRY)?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

/// `run` refuses the same config before starting (it used to retry etcd forever).
#[test]
fn run_exits_78_before_starting() -> Result<()> {
    let dir = setup()?;
    let p = write_config(
        dir.path(),
        &REGISTRY.replace("etcd/ca.pem", "etcd/absent.pem"),
    )?;
    let mut child = Command::new(BIN)
        .args(["run", "-c", s(&p)])
        .env_remove("MESHNODE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("meshnode run kept running with a missing registry.ca");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        use std::io::Read;
        stderr.read_to_string(&mut err)?;
    }
    assert_eq!(status.code(), Some(78), "{err}");
    assert!(err.contains("registry.ca"), "{err}");
    Ok(())
}
