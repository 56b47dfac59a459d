//! A throw-away single-member etcd on loopback.

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Client, CompactionOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long etcd may take to become healthy (it needs one election; ~0.3 s here).
const READY_DEADLINE: Duration = Duration::from_secs(15);

/// A real etcd process with its own free loopback ports and a temporary data directory.
/// Killed when dropped. The binary is `$MESHNODE_ETCD_BIN` or `etcd` on `PATH`.
pub struct EtcdProcess {
    /// Client URL, `http://127.0.0.1:{port}`.
    pub endpoint: String,
    pub(super) client_port: u16,
    pub(super) peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Member name (`test` for a single member).
    pub(super) name: String,
    /// `--initial-cluster`, `name=peer-url,…`.
    pub(super) initial_cluster: String,
    /// Raft timing: heartbeat and election timeout, in ms.
    pub(super) timing: (u32, u32),
    /// Plain-HTTP `/health` (and `/metrics`) port, also when clients need TLS.
    metrics_port: u16,
    /// `https` when started with TLS flags.
    scheme: &'static str,
    /// Extra flags (TLS).
    extra: Vec<String>,
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdProcess {
    /// Starts etcd and waits (with a deadline) until `/health` reports healthy.
    pub async fn start() -> anyhow::Result<EtcdProcess> {
        let client_port = free_port()?;
        let mut peer_port = free_port()?;
        while peer_port == client_port {
            peer_port = free_port()?;
        }
        let mut etcd = EtcdProcess::new(
            "test",
            client_port,
            peer_port,
            format!("test=http://127.0.0.1:{peer_port}"),
            // A single member elects itself after one election timeout: keep it short.
            (25, 250),
        )?;
        etcd.spawn()?;
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    /// Starts a single member whose client URL is `https://` with the given server
    /// certificate and key (PEM files), requiring client certificates signed by `ca`.
    pub async fn start_tls(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> anyhow::Result<EtcdProcess> {
        let client_port = free_port()?;
        let mut peer_port = free_port()?;
        while peer_port == client_port {
            peer_port = free_port()?;
        }
        let mut etcd = EtcdProcess::new(
            "test",
            client_port,
            peer_port,
            format!("test=http://127.0.0.1:{peer_port}"),
            (25, 250),
        )?;
        etcd.scheme = "https";
        etcd.endpoint = format!("https://127.0.0.1:{client_port}");
        etcd.extra = vec![
            format!("--cert-file={}", cert.display()),
            format!("--key-file={}", key.display()),
            format!("--trusted-ca-file={}", ca.display()),
            "--client-cert-auth".to_string(),
        ];
        etcd.spawn()?;
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    /// A member not yet started (see `EtcdCluster`).
    pub(super) fn new(
        name: &str,
        client_port: u16,
        peer_port: u16,
        initial_cluster: String,
        timing: (u32, u32),
    ) -> anyhow::Result<EtcdProcess> {
        let mut metrics_port = free_port()?;
        while metrics_port == client_port || metrics_port == peer_port {
            metrics_port = free_port()?;
        }
        Ok(EtcdProcess {
            metrics_port,
            scheme: "http",
            extra: Vec::new(),
            endpoint: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            dir: tempfile::tempdir()?,
            child: None,
            name: name.to_string(),
            initial_cluster,
            timing,
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is started (and not killed by us).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub(super) fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = std::env::var("MESHNODE_ETCD_BIN").unwrap_or_else(|_| "etcd".to_string());
        let client = format!("{}://127.0.0.1:{}", self.scheme, self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&bin)
            .arg(format!("--name={}", self.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-token=meshnode-test")
            .arg(format!("--heartbeat-interval={}", self.timing.0))
            .arg(format!("--election-timeout={}", self.timing.1))
            .arg("--experimental-watch-progress-notify-interval=1s")
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .args(&self.extra)
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin} (Debian package etcd-server)"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits (with a deadline) until `/health` reports healthy (a leader is known).
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("etcd exited with {status}: {}", self.log_tail());
                }
            }
            if self.healthy().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy within {READY_DEADLINE:?}: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn healthy(&self) -> bool {
        let probe = async {
            let mut conn = TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
            conn.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await?;
            let mut body = String::new();
            conn.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body.contains(r#""health":"true""#))
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), probe).await,
            Ok(Ok(true))
        )
    }

    /// The last lines of etcd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGKILL (no clean shutdown) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd if it runs and starts it again on the same ports and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }

    fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let Some(child) = &self.child else {
            bail!("etcd is not running");
        };
        super::signal_pid(child.id(), signal)
    }

    /// Freezes etcd (SIGSTOP): its sockets stay open but nothing answers. Prefer
    /// [`EtcdProcess::freeze`], whose guard thaws it even when the test fails.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Thaws etcd (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Freezes etcd (SIGSTOP) until the returned guard is dropped (SIGCONT).
    pub fn freeze(&self) -> anyhow::Result<Frozen> {
        let Some(child) = &self.child else {
            bail!("etcd is not running");
        };
        self.pause()?;
        Ok(Frozen { pid: child.id() })
    }

    /// A plain client of this etcd.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let connect = Client::connect([self.endpoint.as_str()], None);
        Ok(tokio::time::timeout(Duration::from_secs(5), connect).await??)
    }

    /// Compacts (physically) at the current revision; returns that revision.
    pub async fn compact(&self) -> anyhow::Result<i64> {
        let mut client = self.client().await?;
        let work = async {
            let revision = client
                .get("/", None)
                .await?
                .header()
                .map_or(0, |h| h.revision());
            client
                .compact(revision, Some(CompactionOptions::new().with_physical()))
                .await?;
            Ok::<_, etcd_client::Error>(revision)
        };
        Ok(tokio::time::timeout(Duration::from_secs(5), work).await??)
    }
}

/// A SIGSTOPped etcd; SIGCONT when dropped (also on a failing test's unwind).
pub struct Frozen {
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = super::signal_pid(self.pid, libc::SIGCONT);
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process.
        self.kill();
    }
}
