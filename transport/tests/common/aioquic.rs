//! A pool of aioquic clients (`tests/aioquic_flood.py` on the test venv's Python) flooding an
//! endpoint with handshakes that must fail: no client certificate, or a foreign CA's. Used by
//! `handshake_flood.rs` beside its own quinn flood, as a third-party QUIC stack.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use meshnode_transport::pki::Ca;
use tokio::io::AsyncBufReadExt;

const CLIENTS: usize = 60;
/// 127.0.1.1 … : sources of their own, apart from the quinn flood's.
const SOURCES: usize = 30;

/// The test venv's interpreter (`$MESHNODE_TEST_PYTHON`, else the project's venv).
fn python() -> PathBuf {
    match std::env::var_os("MESHNODE_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python"),
    }
}

/// Whether aioquic can be imported; missing, the pool is skipped with a note, except in CI
/// (`CI=true`), where everything is installed and a missing module fails the test.
async fn ready() -> Result<bool> {
    let out = tokio::process::Command::new(python())
        .args(["-c", "import aioquic"])
        .kill_on_drop(true)
        .output();
    let why = match tokio::time::timeout(Duration::from_secs(30), out).await {
        Ok(Ok(o)) if o.status.success() => return Ok(true),
        Ok(Ok(o)) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 30 s".into(),
    };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    anyhow::ensure!(
        !ci,
        "aioquic is required in CI: {}: {why}",
        python().display()
    );
    eprintln!(
        "aioquic pool skipped: {}: {why}; run scripts/deps.sh --test",
        python().display()
    );
    Ok(false)
}

pub struct Pool {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

pub struct Report {
    pub line: String,
}

impl Report {
    /// The count named `key` in the pool's report, 0 if absent.
    pub fn get(&self, key: &str) -> u64 {
        self.line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Starts the pool against `target` for `length`, with a foreign CA's certificate written
/// to `dir`; returns once it runs, or `None` if aioquic is not installed (outside CI).
pub async fn start(dir: &Path, target: SocketAddr, length: Duration) -> Result<Option<Pool>> {
    if !ready().await? {
        return Ok(None);
    }
    let rogue = Ca::generate("mesh.test", 30)?;
    let issued = rogue.issue("node-x", 1)?;
    let (cert, key) = (dir.join("foreign.pem"), dir.join("foreign.key"));
    std::fs::write(&cert, &issued.cert_pem)?;
    std::fs::write(&key, &issued.key_pem)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aioquic_flood.py");
    let mut child = tokio::process::Command::new("nice")
        .args(["-n", "19"])
        .arg(python())
        .arg(script)
        .arg(target.ip().to_string())
        .arg(target.port().to_string())
        .arg(length.as_secs_f64().to_string())
        .arg(CLIENTS.to_string())
        .arg(SOURCES.to_string())
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("spawn the aioquic pool")?;
    let stdout = child.stdout.take().context("pool stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the aioquic pool did not start within 30 s")??;
    anyhow::ensure!(
        first.as_deref() == Some("STARTED"),
        "aioquic pool: unexpected first line {first:?}"
    );
    Ok(Some(Pool { child, lines }))
}

impl Pool {
    /// Waits for the pool's end (it stops by itself) and its report.
    pub async fn finish(&mut self) -> Result<Report> {
        let wait = async {
            let mut report = None;
            while let Some(line) = self.lines.next_line().await? {
                if let Some(at) = line.find("AIOQUIC done") {
                    report = Some(line[at..].to_string());
                }
            }
            let status = self.child.wait().await?;
            anyhow::ensure!(status.success(), "aioquic pool: {status}");
            report.context("the aioquic pool printed no report")
        };
        let line = tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .context("the aioquic pool did not finish within 20 s")??;
        Ok(Report { line })
    }
}
