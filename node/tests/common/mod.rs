//! Shared test harness: a throw-away PKI, TCP targets, in-process nodes on loopback, and
//! helpers to run the real `meshnode` binary. Every wait has a deadline.
#![allow(dead_code)]

pub mod cluster;
pub mod h2;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meshnode::config::Config;
use meshnode::{Node, NodeParts};
use meshnode_registry::memory::MemoryMesh;
use meshnode_registry::Registry;
use meshnode_transport::pki::Ca;
use meshnode_transport::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A temp directory with a CA and node certificates.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new(names: &[&str]) -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate("test.mesh", 2)?;
        ca.write(&dir.path().join("ca"))?;
        let pki = Pki { dir, ca };
        for n in names {
            pki.issue(n)?;
        }
        Ok(pki)
    }

    pub fn issue(&self, name: &str) -> Result<()> {
        self.ca
            .issue(name, 2)?
            .write(&self.dir.path().join("certs"), name)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.path().join("ca/ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.path().join(format!("certs/{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.path().join(format!("certs/{name}.key"))
    }

    pub fn identity(&self, name: &str) -> Result<Identity> {
        Ok(Identity::load(
            &self.ca_pem(),
            &self.cert(name),
            &self.key(name),
        )?)
    }

    /// The `[node]` and `[tls]` sections of a node's config, listening on port 0.
    pub fn base_config(&self, name: &str) -> String {
        format!(
            r#"
[node]
name = "{name}"
listen = "127.0.0.1:0"
state_dir = "{state}"
drain_timeout = "2s"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[admin]
listen = "127.0.0.1:0"
"#,
            state = self.path().join(format!("state-{name}")).display(),
            ca = self.ca_pem().display(),
            cert = self.cert(name).display(),
            key = self.key(name).display(),
        )
    }
}

/// Starts an in-process node from config text on a shared in-memory registry.
pub async fn start_node(pki: &Pki, name: &str, extra: &str, registry: Registry) -> Result<Node> {
    start_node_with(pki, name, "", extra, registry).await
}

/// [`start_node`] with `node_keys` (lines of the `[node]` table) added to its `[node]`.
pub async fn start_node_with(
    pki: &Pki,
    name: &str,
    node_keys: &str,
    extra: &str,
    registry: Registry,
) -> Result<Node> {
    let base = pki
        .base_config(name)
        .replacen("[node]\n", &format!("[node]\n{node_keys}"), 1);
    let text = format!("{base}{extra}");
    let config = Config::parse(&text).with_context(|| format!("config of {name}"))?;
    let identity = pki.identity(name)?;
    let node = Node::start(NodeParts {
        config,
        identity,
        registry,
    })
    .await
    .map_err(|f| anyhow::anyhow!("{name}: {f}"))?;
    Ok(node)
}

/// A TCP echo server on loopback; returns its address. Echoes until EOF, then half-closes.
pub async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A TCP server that writes `tag` on each connection, then echoes.
pub async fn tagged_server(tag: &'static str) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(tag.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// An address on loopback where nothing listens (bound then closed).
pub async fn closed_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    drop(l);
    Ok(a)
}

/// Polls `f` until it returns true or `deadline` passes.
pub async fn eventually<F: FnMut() -> bool>(
    what: &str,
    deadline: Duration,
    mut f: F,
) -> Result<()> {
    let end = Instant::now() + deadline;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` sees `count` endpoints of `service`.
pub async fn wait_endpoints(node: &Node, service: &str, count: usize) -> Result<()> {
    eventually(
        &format!("{} to see {count} endpoints of {service}", node.name()),
        Duration::from_secs(10),
        || {
            node.status()
                .services
                .iter()
                .any(|s| s.name == service && s.endpoints.len() == count)
        },
    )
    .await
}

/// Sends `data` through `addr`, half-closes, and returns everything read back.
pub async fn roundtrip(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let mut out = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut out);
    let (wr, rr) = tokio::join!(write, read);
    wr?;
    rr?;
    Ok(out)
}

/// A fresh in-memory registry shared by in-process nodes.
pub fn memory_mesh() -> MemoryMesh {
    MemoryMesh::new()
}

/// The Python interpreter of the test clients (aioquic, …): `$MESHNODE_TEST_PYTHON`, which
/// scripts/test.sh sets, else the project-local venv that `scripts/deps.sh --test` makes.
pub fn test_python() -> PathBuf {
    match std::env::var_os("MESHNODE_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python"),
    }
}

/// Whether a missing test tool must fail the test instead of skipping it: in CI (`CI=true`),
/// where scripts/test.sh has installed everything.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Why the test venv's Python cannot import `module`, if it cannot.
pub async fn python_module_missing(module: &str) -> Option<String> {
    let python = test_python();
    let out = tokio::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(30), out).await {
        Ok(Ok(o)) if o.status.success() => None,
        Ok(Ok(o)) => Some(format!(
            "{} cannot import {module}: {}",
            python.display(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        )),
        Ok(Err(e)) => Some(format!("{}: {e}", python.display())),
        Err(_) => Some(format!("{} did not answer within 30 s", python.display())),
    }
}

/// Whether the test can run with the venv's `module`: `Ok(false)` (skip, with a note) when it
/// is missing outside CI; an error in CI, where a missing module fails the test.
pub async fn python_module_ready(module: &str) -> Result<bool> {
    let Some(why) = python_module_missing(module).await else {
        return Ok(true);
    };
    let fix = "run scripts/deps.sh --test (or set MESHNODE_TEST_PYTHON)";
    anyhow::ensure!(!in_ci(), "{module} is required in CI: {why}; {fix}");
    eprintln!("skipped: {why}; {fix}");
    Ok(false)
}

/// Path of the real `meshnode` binary built for these tests.
pub fn meshnode_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshnode"))
}

/// A Python test peer (`node/tests/SCRIPT` on the venv's interpreter, with `args`) that prints
/// `READY PORT` once it listens on 127.0.0.1:PORT; killed when the returned child is dropped.
pub async fn python_peer(
    script: &str,
    args: &[&str],
) -> Result<(tokio::process::Child, SocketAddr)> {
    use tokio::io::AsyncBufReadExt;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let mut child = tokio::process::Command::new(test_python())
        .arg(&path)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {script}"))?;
    let stdout = child.stdout.take().context("peer stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .with_context(|| format!("{script} {args:?} did not start within 30 s"))??
        .with_context(|| format!("{script} {args:?} exited before it was ready"))?;
    let port: u16 = line
        .strip_prefix("READY ")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("{script}: unexpected line {line:?}"))?;
    Ok((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Runs a Python test client (`node/tests/SCRIPT` on the venv's interpreter, with `args`) to its
/// end and parses the one JSON document it prints; its output is in the error if it fails.
pub async fn python_json<S: AsRef<std::ffi::OsStr>>(
    script: &str,
    args: impl IntoIterator<Item = S>,
) -> Result<serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = tokio::process::Command::new(test_python())
        .arg(&path)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {script}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{script} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_str(stdout.trim()).with_context(|| format!("{script} printed {stdout:?}"))
}
