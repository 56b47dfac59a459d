//! Real `meshnode` processes for multi-process tests, killed on drop.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A free loopback UDP port (bound and released; the kernel does not hand it out again at once).
pub fn free_udp() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// A free loopback TCP port.
pub fn free_tcp() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
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
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin, path)
    }

    /// Waits for `/readyz` to answer 200.
    pub fn wait_ready(&mut self, deadline: Duration) -> Result<()> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "meshnode exited with {status} before ready; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok((200, _)) = self.get("/readyz") {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "meshnode not ready within {deadline:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends `signal` (e.g. libc::SIGTERM).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = i32::try_from(self.child.id())?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit; returns its code.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<Option<i32>> {
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
            std::thread::sleep(Duration::from_millis(20));
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

/// A minimal blocking HTTP/1.1 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
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
