//! Real `meshnode` processes for multi-process tests, killed on drop.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A free loopback UDP port (bound and released), never one this process handed out before.
pub fn free_udp() -> Result<SocketAddr> {
    loop {
        let addr = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        if first_time(addr) {
            return Ok(addr);
        }
    }
}

/// A free loopback TCP port (bound and released), never one this process handed out before.
pub fn free_tcp() -> Result<SocketAddr> {
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if first_time(addr) {
            return Ok(addr);
        }
    }
}

/// Whether `addr`'s port is handed out for the first time in this process. A port is released
/// as soon as it is chosen, so the kernel may give it to the next bind to port 0: a test that
/// chose an `[[outbound]]` port and then started a node whose admin port was chosen after it got
/// the same port twice, and a config with one port for two listeners is refused (exit 78).
fn first_time(addr: SocketAddr) -> bool {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(addr.port())
}

/// Runs `meshnode` with `args` to completion; returns (exit code, stdout, stderr).
pub fn meshnode(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(super::meshnode_bin())
        .args(args)
        .env_remove("MESHNODE_CONFIG")
        .output()
        .context("running meshnode")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `meshnode(args)` for async tests: the wait for the command runs off the runtime's workers
/// (the command may be talking to a node served by this very runtime).
pub async fn meshnode_async(args: &[&str]) -> Result<(i32, String, String)> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        meshnode(&args)
    })
    .await?
}

/// A running `meshnode run` process.
pub struct NodeProcess {
    pub child: Child,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl NodeProcess {
    /// Starts `meshnode run -c config`, logging to `log`.
    pub fn start(config: &Path, admin: SocketAddr, log: &Path) -> Result<NodeProcess> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(super::meshnode_bin())
            .args(["run", "-c"])
            .arg(config)
            .env("MESHNODE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("spawning meshnode run")?;
        Ok(NodeProcess {
            child,
            config: config.to_path_buf(),
            admin,
            log: log.to_path_buf(),
        })
    }

    /// Starts the same node again (same config, admin address and log), after it exited.
    pub fn restart(&self) -> Result<NodeProcess> {
        NodeProcess::start(&self.config, self.admin, &self.log)
    }

    /// GET `path` on the admin API: (status code, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_ready(&mut self, deadline: Duration) -> Result<()> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "meshnode exited with {status} before ready; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok((200, _)) = self.get("/readyz").await {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "meshnode not ready within {deadline:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `signal` (e.g. libc::SIGTERM) to this process, by its PID.
    pub fn signal(&self, signal: i32) -> Result<()> {
        send_signal(self.child.id(), signal)
    }

    /// Waits for the process to exit; returns its code.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<Option<i32>> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s.code());
            }
            if Instant::now() > end {
                bail!(
                    "meshnode did not exit within {deadline:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` to the process `pid` with kill(2): no `kill` program needed (a minimal
/// machine has none without procps). The one unsafe call of the test harness.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: i32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("kill({pid}, {signal}): {e}");
    }
    Ok(())
}

/// A minimal HTTP/1.1 GET, bounded in time (connect 2 s, the whole answer 5 s).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}: timed out"))??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(request.as_bytes()).await?;
        s.read_to_end(&mut raw).await
    })
    .await
    .with_context(|| format!("GET {path} from {addr}: timed out"))??;
    let buf = String::from_utf8(raw).context("answer is not UTF-8")?;
    let (head, body) = buf.split_once("\r\n\r\n").context("no HTTP head")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    Ok((code, body.to_string()))
}

/// Makes a CA and node certificates in `dir` with the real CLI (ca/, certs/).
pub fn pki(dir: &Path, names: &[&str]) -> Result<()> {
    let ca = dir.join("ca");
    let (code, _, err) = meshnode(&["ca", "init", "--dir", ca.to_str().context("utf8")?])?;
    assert_eq!(code, 0, "ca init: {err}");
    for n in names {
        let (code, _, err) = meshnode(&[
            "cert",
            "issue",
            "--ca-dir",
            ca.to_str().context("utf8")?,
            "--name",
            n,
            "--out",
            dir.join("certs").to_str().context("utf8")?,
        ])?;
        assert_eq!(code, 0, "cert issue {n}: {err}");
    }
    Ok(())
}

pub fn node_config(
    dir: &Path,
    name: &str,
    quic: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    body: &str,
) -> String {
    format!(
        r#"[node]
name = "{name}"
listen = "{quic}"
state_dir = "{state}"
drain_timeout = "2s"
[tls]
ca = "ca/ca.pem"
cert = "certs/{name}.pem"
key = "certs/{name}.key"
[admin]
listen = "{admin}"
{body}"#,
        state = dir.join(format!("state-{name}")).display()
    )
}
