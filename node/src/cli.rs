//! The command line (docs/README.md). One function per subcommand; each returns the exit failure.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use meshnode_registry::Registry;
use meshnode_transport::files::read_text_bounded;
use meshnode_transport::Identity;

use crate::config::{Backend, Config, MAX_PASSWORD_BYTES};
use crate::exit::{self, Failure};
use crate::node::{Node, NodeParts};

/// meshnode: a QUIC service-mesh transport for VMs and bare metal.
#[derive(Debug, Parser)]
#[command(
    name = "meshnode",
    version,
    about,
    disable_help_subcommand = true,
    after_help = "Environment: MESHNODE_LOG (log filter), MESHNODE_LOG_FORMAT (text | json), \
                  MESHNODE_RUNTIME (auto, the default: one thread on hosts with 1-2 CPUs, else multi | multi = a worker per CPU | multi:N | current = one thread)."
)]
pub struct Cli {
    /// Log format on stderr: `text` or `json`. Verbosity: MESHNODE_LOG (env-filter syntax,
    /// default `info,meshnode::access=off`; `meshnode::access=info` turns on the access log).
    #[arg(
        long,
        global = true,
        env = "MESHNODE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node.
    Run {
        /// Config file.
        #[arg(short, long, env = "MESHNODE_CONFIG")]
        config: PathBuf,
    },
    /// Check config, certificates and keys; exit 0, or 78 with reasons. Does not contact etcd.
    Validate {
        /// Config file.
        #[arg(short, long, env = "MESHNODE_CONFIG")]
        config: PathBuf,
    },
    /// Show a running node's state.
    Status {
        /// Admin API address of the node.
        #[arg(long)]
        admin: Option<String>,
        /// Read the admin address from this config file.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the /status JSON as is.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds.
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
    },
    /// Certificate authority commands.
    Ca {
        /// The CA subcommand.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Node certificate commands.
    Cert {
        /// The cert subcommand.
        #[command(subcommand)]
        command: CertCommand,
    },
    /// A whole mesh on this machine, no set-up: three nodes, traffic, a failover.
    Demo {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 30)]
        duration: u64,
    },
    /// Print a shell completion script on stdout (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout; the Debian package ships it as meshnode(1).
    #[command(hide = true)]
    Man,
    /// Print the version.
    Version,
}

/// `meshnode ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the mesh CA (ca.pem, ca.key).
    Init {
        /// Directory for ca.pem and ca.key (created if needed).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the mesh.
        #[arg(long, default_value = crate::pki_cmd::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = crate::pki_cmd::DEFAULT_CA_DAYS)]
        days: u32,
    },
}

/// `meshnode cert …`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue NODE.pem + NODE.key signed by the CA.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Node name.
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = crate::pki_cmd::DEFAULT_CERT_DAYS)]
        days: u32,
    },
}

/// Loads the config and the identity it names, with every check of `validate`.
pub fn load_checked(path: &Path) -> Result<(Config, Identity), Failure> {
    let config = Config::load(path)?;
    let identity = Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .map_err(|e| Failure::config(format!("{}: tls: {e}", path.display())))?;
    if identity.node_name() != config.node.name {
        return Err(Failure::config(format!(
            "{}: node.name is {:?} but {} is a certificate for {:?}",
            path.display(),
            config.node.name,
            config.tls.cert.display(),
            identity.node_name()
        )));
    }
    if config.registry.backend == Backend::Etcd {
        if let Some(p) = &config.registry.password_file {
            read_text_bounded(p, MAX_PASSWORD_BYTES).map_err(|e| {
                Failure::config(format!(
                    "{}: registry.password_file {}: {e}",
                    path.display(),
                    p.display()
                ))
            })?;
        }
    }
    Ok((config, identity))
}

/// `meshnode validate`
pub fn validate(path: &Path) -> Result<String, Failure> {
    let (config, identity) = load_checked(path)?;
    Ok(format!(
        "{}: ok (node {}, trust domain {}, {} service(s), {} outbound(s), registry {:?})",
        path.display(),
        config.node.name,
        identity.trust_domain(),
        config.service.len(),
        config.outbound.len(),
        config.registry.backend
    ))
}

/// The registry backend a config asks for, started.
pub fn start_registry(config: &Config) -> Result<Registry, Failure> {
    match config.registry.backend {
        Backend::Static => {
            let peers = config
                .registry
                .peers
                .iter()
                .map(|p| meshnode_registry::static_peers::StaticPeer {
                    name: p.name.clone(),
                    addr: p.addr.to_string(),
                    zone: p.zone.clone(),
                    services: p
                        .services
                        .iter()
                        .map(|s| meshnode_registry::static_peers::StaticService {
                            name: s.name.clone(),
                            protocol: s.protocol,
                            port: s.port,
                            weight: s.weight,
                        })
                        .collect(),
                })
                .collect();
            Ok(meshnode_registry::static_peers::start(peers))
        }
        Backend::Etcd => {
            let r = &config.registry;
            let user = match (&r.username, &r.password_file) {
                (Some(u), Some(p)) => {
                    let pw = read_text_bounded(p, MAX_PASSWORD_BYTES).map_err(|e| {
                        Failure::config(format!("registry.password_file {}: {e}", p.display()))
                    })?;
                    Some((u.clone(), pw.trim_end_matches(['\n', '\r']).to_string()))
                }
                _ => None,
            };
            let tls = if r.ca.is_some() || r.cert.is_some() || r.key.is_some() {
                Some(meshnode_registry::etcd::EtcdTls {
                    ca: r.ca.clone(),
                    cert: r.cert.clone(),
                    key: r.key.clone(),
                })
            } else {
                None
            };
            let cfg = meshnode_registry::etcd::EtcdConfig {
                endpoints: r.endpoints.clone(),
                prefix: r.prefix.clone(),
                lease_ttl: r.lease_ttl,
                tls,
                user,
                ..Default::default()
            };
            Ok(meshnode_registry::etcd::start(cfg))
        }
    }
}

/// `meshnode run`: start, wait for SIGTERM/SIGINT, drain.
pub async fn run(path: &Path) -> Result<(), Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let (config, identity) = load_checked(path)?;
    match crate::limits::raise_nofile() {
        Ok(l) => tracing::info!(
            soft_was = l.was,
            soft = l.now,
            hard = l.hard,
            "file descriptor limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let registry = start_registry(&config)?;
    let node = Node::start(NodeParts {
        config,
        identity,
        registry,
    })
    .await?;
    let watch = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot watch {name}: {e}")))
    };
    let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
    let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = watch(SignalKind::hangup(), "SIGHUP")?;
    {
        let ready = node.wait_ready();
        tokio::pin!(ready);
        let mut announced = false;
        loop {
            tokio::select! {
                _ = &mut ready, if !announced => {
                    announced = true;
                    crate::notify::ready();
                    tracing::info!("ready");
                }
                _ = hup.recv() => {
                    // Only a node that announced READY may say RELOADING/READY again:
                    // systemd must not see a start-up finish early.
                    if announced {
                        crate::notify::reloading();
                    }
                    reload(&node, path).await;
                    if announced {
                        crate::notify::ready();
                    }
                }
                _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
                _ = int.recv() => { tracing::info!("SIGINT received"); break; }
            }
        }
    }
    crate::notify::stopping();
    node.drain().await;
    Ok(())
}

/// SIGHUP: re-read and validate the config; a bad one is rejected and the old one kept.
async fn reload(node: &Node, path: &Path) {
    let config = match load_checked(path) {
        Ok((config, _)) => config,
        Err(f) => {
            tracing::error!(error = %f, "reload rejected; the running config is kept");
            return;
        }
    };
    match node.reload(config).await {
        Ok(summary) => tracing::info!("{summary}"),
        Err(f) => tracing::error!(error = %f, "reload failed; the running config is kept"),
    }
}
