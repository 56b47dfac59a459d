//! The command line: exit codes and messages for bad configs, PKI commands, status.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use common::process::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn setup() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    let (code, out, err) =
        meshnode(&["ca", "init", "--dir", s(&ca), "--trust-domain", "prod.mesh"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("prod.mesh"), "{out}");
    let mode = std::fs::metadata(ca.join("ca.key"))?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "ca.key mode");
    let (code, _, err) = meshnode(&[
        "cert",
        "issue",
        "--ca-dir",
        s(&ca),
        "--name",
        "node-a",
        "--out",
        s(&dir.path().join("certs")),
    ])?;
    assert_eq!(code, 0, "{err}");
    let mode = std::fs::metadata(dir.path().join("certs/node-a.key"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "node key mode");
    Ok(dir)
}

const GOOD: &str = r#"[node]
name = "node-a"
listen = "127.0.0.1:4433"
state_dir = "state"
[tls]
ca = "ca/ca.pem"
cert = "certs/node-a.pem"
key = "certs/node-a.key"
"#;

fn validate(dir: &Path, text: &str) -> Result<(i32, String)> {
    let p = dir.join("meshnode.toml");
    std::fs::write(&p, text)?;
    let (code, out, err) = meshnode(&["validate", "-c", s(&p)])?;
    Ok((code, format!("{out}{err}")))
}

#[test]
fn validate_accepts_a_good_config_and_names_what_is_wrong_in_bad_ones() -> Result<()> {
    let dir = setup()?;
    let d = dir.path();
    let (code, out) = validate(d, GOOD)?;
    assert_eq!(code, 0, "{out}");

    let cases: &[(&str, String)] = &[
        ("bogus", format!("{GOOD}bogus = 1\n")),
        (
            "lease_ttl",
            format!("{GOOD}[registry]\nlease_ttl = \"ten\"\n"),
        ),
        ("missing.pem", GOOD.replace("ca/ca.pem", "ca/missing.pem")),
        (
            "node.max_connections",
            GOOD.replace(
                "state_dir = \"state\"",
                "state_dir = \"state\"\nmax_connections = 0",
            ),
        ),
        (
            "node.http_idle_timeout: must be between 1s and 24h",
            GOOD.replacen("[node]\n", "[node]\nhttp_idle_timeout = \"0s\"\n", 1),
        ),
        (
            "transport.max_peer_connections: must be at least 1",
            format!("{GOOD}[transport]\nmax_peer_connections = 0\n"),
        ),
        (
            "node.name",
            GOOD.replace("name = \"node-a\"", "name = \"node-b\""),
        ),
        (
            "target = \"nowhere\"",
            format!("{GOOD}[[service]]\nname = \"x\"\nprotocol = \"tcp\"\ntarget = \"nowhere\"\n"),
        ),
    ];
    for (needle, text) in cases {
        let (code, out) = validate(d, text)?;
        assert_eq!(code, 78, "{needle}: {out}");
        assert!(out.contains(needle), "message should name {needle}: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }

    // A key readable by others is refused, as ssh does.
    let key = d.join("certs/node-a.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let (code, out) = validate(d, GOOD)?;
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("node-a.key"), "{out}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;

    // A certificate from another CA.
    let other = d.join("other");
    meshnode(&["ca", "init", "--dir", s(&other)])?;
    let (code, out) = validate(d, &GOOD.replace("ca/ca.pem", "other/ca.pem"))?;
    assert_eq!(code, 78, "{out}");

    // A missing config file.
    let (code, _, err) = meshnode(&["validate", "-c", s(&d.join("absent.toml"))])?;
    assert_eq!(code, 78);
    assert!(err.contains("absent.toml"), "{err}");
    Ok(())
}

/// Files that are not files: a device as the config or a CA is refused at once (it was read
/// until memory ran out), as is a state_dir that is a regular file (it passed validate and failed
/// run). Each names the path and the reason, exit 78.
#[test]
fn devices_and_odd_paths_are_refused_without_being_read() -> Result<()> {
    let dir = setup()?;
    let d = dir.path();
    let started = std::time::Instant::now();
    let (code, _, err) = meshnode(&["validate", "-c", "/dev/zero"])?;
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("/dev/zero") && err.contains("not a regular file"),
        "{err}"
    );

    let (code, out) = validate(d, &GOOD.replace("ca/ca.pem", "/dev/zero"))?;
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("/dev/zero") && out.contains("not a regular file"),
        "{out}"
    );
    let (code, out) = validate(d, &GOOD.replace("certs/node-a.key", "/dev/urandom"))?;
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("/dev/urandom"), "{out}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "devices must not be read: {:?}",
        started.elapsed()
    );

    // A CA file far past any real bundle.
    std::fs::write(d.join("huge.pem"), vec![b'A'; 2 << 20])?;
    let (code, out) = validate(d, &GOOD.replace("ca/ca.pem", "huge.pem"))?;
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("huge.pem") && out.contains("at most"), "{out}");

    // state_dir: a regular file, and a path below one.
    std::fs::write(d.join("plain"), b"x")?;
    for state in ["plain", "plain/below"] {
        let (code, out) = validate(
            d,
            &GOOD.replace("state_dir = \"state\"", &format!("state_dir = \"{state}\"")),
        )?;
        assert_eq!(code, 78, "{state}: {out}");
        assert!(
            out.contains("node.state_dir") && out.contains("not a directory"),
            "{out}"
        );
    }
    // A state_dir that does not exist yet is created by run: valid.
    let (code, out) = validate(
        d,
        &GOOD.replace("state_dir = \"state\"", "state_dir = \"new/deeper\""),
    )?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

#[test]
fn ca_init_refuses_to_overwrite_and_bad_names_are_usage_errors() -> Result<()> {
    let dir = setup()?;
    let ca = dir.path().join("ca");
    let (code, _, err) = meshnode(&["ca", "init", "--dir", s(&ca)])?;
    assert_ne!(code, 0, "overwrote an existing CA");
    assert!(err.contains("ca.key"), "{err}");
    let (code, _, err) = meshnode(&[
        "cert",
        "issue",
        "--ca-dir",
        s(&ca),
        "--name",
        "Bad_Name",
        "--out",
        s(dir.path()),
    ])?;
    assert_eq!(code, 64, "{err}");
    let (code, _, _) = meshnode(&["frobnicate"])?;
    assert_eq!(code, 64);
    let (code, out, _) = meshnode(&["version"])?;
    assert_eq!(code, 0);
    assert!(out.starts_with("meshnode "), "{out}");
    Ok(())
}

#[test]
fn status_without_a_node_says_how_to_reach_one() -> Result<()> {
    let port = free_tcp()?;
    let (code, _, err) = meshnode(&["status", "--admin", &port.to_string()])?;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("--admin") && err.contains("-c"), "{err}");
    Ok(())
}

#[test]
fn run_with_a_bad_config_exits_78_without_a_backtrace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[node]\nname = \"a\"\n")?;
    let (code, _, err) = meshnode(&["run", "-c", s(&p)]).context("run")?;
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("tls"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

#[test]
fn the_example_configs_validate_once_their_pki_exists() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    for f in ["node-a.toml", "node-b.toml"] {
        std::fs::copy(examples.join(f), dir.path().join(f))?;
    }
    let pki = dir.path().join("pki");
    let (code, _, err) = meshnode(&["ca", "init", "--dir", s(&pki.join("ca"))])?;
    assert_eq!(code, 0, "{err}");
    for n in ["node-a", "node-b"] {
        let (code, _, err) = meshnode(&[
            "cert",
            "issue",
            "--ca-dir",
            s(&pki.join("ca")),
            "--name",
            n,
            "--out",
            s(&pki),
        ])?;
        assert_eq!(code, 0, "{err}");
        let (code, out, err) =
            meshnode(&["validate", "-c", s(&dir.path().join(format!("{n}.toml")))])?;
        assert_eq!(code, 0, "{n}: {out}{err}");
    }
    let traced = dir.path().join("tracing-node-a.toml");
    std::fs::copy(examples.join("tracing-node-a.toml"), &traced)?;
    let (code, out, err) = meshnode(&["validate", "-c", s(&traced)])?;
    assert_eq!(code, 0, "tracing-node-a.toml: {out}{err}");
    Ok(())
}
