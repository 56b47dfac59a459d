//! The `meshnode` binary: parse the command line, run the subcommand, exit with its code.

use std::process::ExitCode;

use clap::Parser;
use meshnode::cli::{self, CaCommand, CertCommand, Cli, Command};
use meshnode::exit::{self, Failure};
use meshnode::runtime::Shape;

/// mimalloc: ~9 % fewer instructions per HTTP or gRPC request than glibc's malloc (see
/// `meshnode_transport::memory`, which also returns its free memory after a flood).
#[global_allocator]
static GLOBAL: meshnode_transport::memory::Allocator = meshnode_transport::memory::Allocator;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.log_format);
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("meshnode: {f}");
            ExitCode::from(f.code)
        }
    }
}

/// The access log (one line per tunnel) is off unless MESHNODE_LOG names it: at thousands of
/// connections a second it would drown everything else.
const DEFAULT_LOG: &str = "info,meshnode::access=off";

fn init_logging(format: cli::LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("MESHNODE_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        cli::LogFormat::Json => builder.json().try_init(),
        cli::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// The tokio runtime, shaped by `MESHNODE_RUNTIME` and the CPU count (see
/// [`meshnode::runtime`]).
fn runtime() -> Result<(tokio::runtime::Runtime, Shape), Failure> {
    let shape = Shape::from_env().map_err(|e| Failure::new(exit::USAGE, e))?;
    let rt = shape
        .builder()
        .build()
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot start the runtime: {e}")))?;
    Ok((rt, shape))
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => {
            let (rt, shape) = runtime()?;
            tracing::info!(runtime = %shape, "starting ({} to change)", meshnode::runtime::ENV);
            rt.block_on(cli::run(&config))
        }
        Command::Validate { config } => {
            println!("{}", cli::validate(&config)?);
            Ok(())
        }
        Command::Status {
            admin,
            config,
            json,
            watch,
        } => runtime()?
            .0
            .block_on(meshnode::status_cmd::run(admin, config, json, watch)),
        Command::Ca {
            command:
                CaCommand::Init {
                    dir,
                    trust_domain,
                    days,
                },
        } => {
            println!("{}", meshnode::pki_cmd::ca_init(&dir, &trust_domain, days)?);
            Ok(())
        }
        Command::Cert {
            command:
                CertCommand::Issue {
                    ca_dir,
                    name,
                    out,
                    days,
                },
        } => {
            println!(
                "{}",
                meshnode::pki_cmd::cert_issue(&ca_dir, &name, &out, days)?
            );
            Ok(())
        }
        Command::Demo { duration } => {
            runtime()?
                .0
                .block_on(meshnode::demo::run(std::time::Duration::from_secs(
                    duration,
                )))
        }
        Command::Completions { shell } => meshnode::docgen::completions(shell),
        Command::Man => meshnode::docgen::man(),
        Command::Version => {
            println!("meshnode {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
