//! The systemd deployment (`deploy/systemd/`): the unit passes `systemd-analyze verify`, the real
//! binary speaks the notify protocol to a fake `NOTIFY_SOCKET` (READY=1 when ready, RELOADING=1
//! and READY=1 around SIGHUP, STOPPING=1 on SIGTERM), and `install.sh` stages every file with
//! the right mode into a `DESTDIR`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_meshnode");
/// Where the unit and install.sh put the binary.
const INSTALLED_BIN: &str = "/usr/local/bin/meshnode";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn unit_text() -> Result<String> {
    let path = deploy_dir().join("meshnode.service");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// 1. systemd-analyze verify

/// Runs `systemd-analyze verify` on `unit` (written as meshnode.service in a fresh directory);
/// returns (exit code, stderr lines about meshnode.service). Other lines are the environment's
/// (containers without a running systemd print some), not ours.
fn verify(unit: &str) -> Result<(i32, Vec<String>)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("meshnode.service");
    std::fs::write(&path, unit)?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .current_dir(dir.path())
        // Warnings are logged at "warning": make sure an inherited level does not hide them.
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_COLOR", "0")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "systemd-analyze is not installed, so the unit cannot be checked: \
             apt-get install systemd"
        ),
        Err(e) => return Err(e).context("running systemd-analyze verify"),
    };
    let ours = format!("{}\n{}", text(&out.stderr), text(&out.stdout))
        .lines()
        .filter(|l| l.contains("meshnode.service"))
        .map(str::to_string)
        .collect();
    Ok((out.status.code().unwrap_or(-1), ours))
}

/// The unit with its executables pointed at ones that exist here (verify checks them).
fn unit_for_here() -> Result<String> {
    ensure!(
        Path::new("/bin/sh").is_file(),
        "/bin/sh (ExecReload=) is missing"
    );
    Ok(unit_text()?.replace(INSTALLED_BIN, BIN))
}

#[test]
fn unit_passes_systemd_analyze_verify() -> Result<()> {
    let unit = unit_for_here()?;
    let (code, ours) = verify(&unit)?;
    assert_eq!(
        code,
        0,
        "systemd-analyze verify failed:\n{}",
        ours.join("\n")
    );
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns about the unit:\n{}",
        ours.join("\n")
    );

    // The check is not vacuous: verify does report a bad key in this environment.
    let bad = unit.replace("[Service]\n", "[Service]\nProtectEverything=yes\n");
    let (_, ours) = verify(&bad)?;
    assert!(
        ours.iter().any(|l| l.contains("ProtectEverything")),
        "systemd-analyze verify did not report an unknown key; its checks are not running: {ours:?}"
    );
    Ok(())
}

/// `Key=value` settings of the unit, in order, comments dropped.
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn unit_matches_the_binary_and_the_config_defaults() -> Result<()> {
    let s = settings(&unit_text()?);
    let get = |key: &str| -> Vec<&str> {
        s.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(
        get("RestartPreventExitStatus"),
        [meshnode::exit::CONFIG.to_string()],
        "the exit code for a bad config"
    );
    let config = "-c /etc/meshnode/meshnode.toml";
    assert_eq!(
        get("ExecStartPre"),
        [format!("{INSTALLED_BIN} validate {config}")]
    );
    assert_eq!(get("ExecStart"), [format!("{INSTALLED_BIN} run {config}")]);
    assert_eq!(
        get("ExecReload"),
        [
            format!("{INSTALLED_BIN} validate {config}").as_str(),
            r#"/bin/sh -c 'kill -HUP "$1"' meshnode-reload $MAINPID"#
        ]
    );
    // systemd must not SIGKILL a node that is still inside its default drain.
    let stop = get("TimeoutStopSec");
    let stop: u64 = stop
        .first()
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .context("TimeoutStopSec=<N>s")?;
    assert!(
        Duration::from_secs(stop) >= meshnode::config::DEFAULT_DRAIN + Duration::from_secs(5),
        "TimeoutStopSec={stop}s leaves no room after the {:?} drain",
        meshnode::config::DEFAULT_DRAIN
    );
    assert_eq!(get("StateDirectory"), ["meshnode"]);
    assert_eq!(get("CapabilityBoundingSet"), [""]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. The notify protocol of the real binary

/// A `meshnode run` child, killed on drop.
struct Node {
    child: Child,
    log: PathBuf,
}

impl Node {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` (e.g. libc::SIGTERM) with kill(2), as systemd would: no `kill` program
    /// needed.
    #[allow(unsafe_code)]
    fn signal(&self, sig: i32) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) takes two integers and touches no memory of ours.
        if unsafe { libc::kill(pid, sig) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!("kill({pid}, {sig}): {e}");
        }
        Ok(())
    }

    fn wait_exit(&mut self, deadline: Duration) -> Result<Option<i32>> {
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
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fake systemd end: a datagram socket the node is pointed at with `NOTIFY_SOCKET`.
struct FakeSystemd {
    sock: UnixDatagram,
    /// Every assignment received so far, in order.
    seen: Vec<String>,
}

impl FakeSystemd {
    fn bind(path: &Path) -> Result<FakeSystemd> {
        let sock = UnixDatagram::bind(path)
            .with_context(|| format!("binding the notify socket {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(FakeSystemd {
            sock,
            seen: Vec::new(),
        })
    }

    /// Waits for the assignment `want` (e.g. "READY=1") in a datagram received after the
    /// previous call; fails early if the node exits.
    fn expect(&mut self, node: &mut Node, want: &str, deadline: Duration) -> Result<()> {
        let end = Instant::now() + deadline;
        let mut buf = [0u8; 4096];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = text(&buf[..n]);
                    let lines: Vec<String> = msg.lines().map(str::to_string).collect();
                    self.seen.extend(lines.iter().cloned());
                    if lines.iter().any(|l| l == want) {
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("receiving from the notify socket"),
            }
            if let Some(status) = node.child.try_wait()? {
                bail!(
                    "meshnode exited with {status} before sending {want}; received {:?}; log:\n{}",
                    self.seen,
                    node.log_text()
                );
            }
            if Instant::now() > end {
                bail!(
                    "no {want} on NOTIFY_SOCKET within {deadline:?} (received {:?}): is \
                     meshnode::notify wired into the node? log:\n{}",
                    self.seen,
                    node.log_text()
                );
            }
        }
    }
}

/// A CA and node-a's certificate made by the binary itself, and a static, loopback-only config.
fn node_setup(dir: &Path) -> Result<PathBuf> {
    let ca = dir.join("ca");
    let out = run(Command::new(BIN).args(["ca", "init", "--dir"]).arg(&ca))?;
    ensure!(out.status.success(), "ca init: {}", text(&out.stderr));
    let out = run(Command::new(BIN)
        .args(["cert", "issue", "--ca-dir"])
        .arg(&ca)
        .args(["--name", "node-a", "--out"])
        .arg(dir))?;
    ensure!(out.status.success(), "cert issue: {}", text(&out.stderr));
    let config = dir.join("node-a.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"node-a\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{state}\"\n\
             drain_timeout = \"1s\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [registry]\nbackend = \"static\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            state = dir.join("state").display(),
            ca = ca.join("ca.pem").display(),
            cert = dir.join("node-a.pem").display(),
            key = dir.join("node-a.key").display(),
        ),
    )?;
    Ok(config)
}

fn start_node(dir: &Path, config: &Path, notify_socket: &Path) -> Result<Node> {
    let log = dir.join("node.log");
    let child = Command::new(BIN)
        .arg("run")
        .arg("-c")
        .arg(config)
        .env("NOTIFY_SOCKET", notify_socket)
        .env("MESHNODE_LOG", "info")
        .env_remove("MESHNODE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawning meshnode run")?;
    Ok(Node { child, log })
}

#[test]
fn notifies_ready_then_stopping_and_exits_0_on_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = node_setup(dir.path())?;
    let socket = dir.path().join("notify");
    let mut systemd = FakeSystemd::bind(&socket)?;
    let mut node = start_node(dir.path(), &config, &socket)?;

    systemd.expect(&mut node, "READY=1", Duration::from_secs(10))?;
    assert!(
        !systemd.seen.iter().any(|l| l == "STOPPING=1"),
        "STOPPING=1 before any signal: {:?}",
        systemd.seen
    );

    node.signal(libc::SIGTERM)?;
    systemd.expect(&mut node, "STOPPING=1", Duration::from_secs(10))?;
    let code = node.wait_exit(Duration::from_secs(15))?;
    assert_eq!(
        code,
        Some(0),
        "exit after SIGTERM; log:\n{}",
        node.log_text()
    );
    Ok(())
}

#[test]
fn notifies_reloading_then_ready_around_sighup() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = node_setup(dir.path())?;
    let socket = dir.path().join("notify");
    let mut systemd = FakeSystemd::bind(&socket)?;
    let mut node = start_node(dir.path(), &config, &socket)?;

    systemd.expect(&mut node, "READY=1", Duration::from_secs(10))?;
    node.signal(libc::SIGHUP)?;
    systemd.expect(&mut node, "RELOADING=1", Duration::from_secs(10))?;
    systemd.expect(&mut node, "READY=1", Duration::from_secs(10))?;

    node.signal(libc::SIGTERM)?;
    systemd.expect(&mut node, "STOPPING=1", Duration::from_secs(10))?;
    assert_eq!(node.wait_exit(Duration::from_secs(15))?, Some(0));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. install.sh into a DESTDIR

fn install(destdir: &Path) -> Result<Output> {
    let out = run(Command::new("bash")
        .arg(deploy_dir().join("install.sh"))
        .arg(BIN)
        .env("DESTDIR", destdir)
        .stdin(Stdio::null()))?;
    ensure!(
        out.status.success(),
        "install.sh failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(out)
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{} was not installed", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

#[test]
fn install_sh_stages_files_with_their_modes_and_keeps_a_config() -> Result<()> {
    let root = tempfile::tempdir()?;
    let r = root.path();
    let out = install(r)?;
    let said = text(&out.stdout);
    assert!(
        said.contains("skipped: creating system user") && said.contains("systemctl"),
        "install.sh should say what DESTDIR skips:\n{said}"
    );
    assert!(said.contains("systemctl enable --now meshnode"), "{said}");

    let bin = r.join("usr/local/bin/meshnode");
    let unit = r.join("etc/systemd/system/meshnode.service");
    let etc = r.join("etc/meshnode");
    let config = etc.join("meshnode.toml");
    assert_eq!(mode(&bin)?, 0o755, "{}", bin.display());
    assert_eq!(mode(&unit)?, 0o644, "{}", unit.display());
    assert_eq!(mode(&etc)?, 0o750, "{}", etc.display());
    assert_eq!(mode(&config)?, 0o640, "{}", config.display());
    assert_eq!(std::fs::read(&bin)?, std::fs::read(BIN)?, "binary differs");
    assert_eq!(std::fs::read_to_string(&unit)?, unit_text()?);
    let example = std::fs::read_to_string(deploy_dir().join("meshnode.example.toml"))?;
    assert_eq!(std::fs::read_to_string(&config)?, example);
    let leftovers: Vec<_> = std::fs::read_dir(r.join("usr/local/bin"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(leftovers, ["meshnode"], "only the binary in usr/local/bin");

    // Idempotent, and an operator's config survives a re-install (an upgrade).
    std::fs::write(&config, "# mine\n")?;
    let said = text(&install(r)?.stdout);
    assert!(said.contains("kept existing"), "{said}");
    assert_eq!(std::fs::read_to_string(&config)?, "# mine\n");
    assert_eq!(mode(&bin)?, 0o755);
    Ok(())
}

#[test]
fn example_config_validates_once_certificates_exist() -> Result<()> {
    // The example as installed, with /etc/meshnode and /var/lib/meshnode moved under a temp root.
    let root = tempfile::tempdir()?;
    let r = root.path();
    let etc = r.join("etc/meshnode");
    std::fs::create_dir_all(&etc)?;
    let ca = r.join("admin-ca");
    let out = run(Command::new(BIN).args(["ca", "init", "--dir"]).arg(&ca))?;
    ensure!(out.status.success(), "ca init: {}", text(&out.stderr));
    let out = run(Command::new(BIN)
        .args(["cert", "issue", "--ca-dir"])
        .arg(&ca)
        .args(["--name", "node-a", "--out"])
        .arg(&etc))?;
    ensure!(out.status.success(), "cert issue: {}", text(&out.stderr));
    std::fs::copy(ca.join("ca.pem"), etc.join("ca.pem"))?;

    let example = std::fs::read_to_string(deploy_dir().join("meshnode.example.toml"))?;
    assert!(example.contains("state_dir = \"/var/lib/meshnode\""));
    let config = etc.join("meshnode.toml");
    std::fs::write(
        &config,
        example
            .replace("\"/etc/meshnode/", &format!("\"{}/", etc.display()))
            .replace(
                "\"/var/lib/meshnode\"",
                &format!("\"{}\"", r.join("state").display()),
            ),
    )?;
    let out = run(Command::new(BIN)
        .args(["validate", "-c"])
        .arg(&config)
        .env_remove("MESHNODE_CONFIG"))?;
    assert!(
        out.status.success(),
        "the example config does not validate ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(())
}
