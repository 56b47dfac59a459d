//! `meshrelay`: the fault-injecting UDP relay as a process, with a TCP text control port.
//!
//! ```text
//! meshrelay --listen 127.0.0.1:7001 --upstream 127.0.0.1:7000 --control 127.0.0.1:7101
//! echo "delay 10ms" | socat - TCP:127.0.0.1:7101      # answers "ok"
//! ```
//! On start it prints one line, `meshrelay listen=ADDR upstream=ADDR control=ADDR|none`, with
//! the addresses actually bound (so port 0 can be used), then runs until SIGINT or SIGTERM.
//! See [`meshnode_bench::relay::control`] for the commands.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use meshnode_bench::relay::control::{parse_duration, serve};
use meshnode_bench::relay::Relay;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// Fault-injecting UDP relay (delay, jitter, loss, blackhole, NAT rebinding).
#[derive(Parser, Debug)]
#[command(name = "meshrelay", version)]
struct Args {
    /// UDP address to listen on (the address the far node advertises).
    #[arg(long)]
    listen: SocketAddr,
    /// UDP address every datagram is forwarded to.
    #[arg(long)]
    upstream: SocketAddr,
    /// TCP address of the text control port (`delay 10ms`, `loss 0.01`, `stats`, ...).
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Initial one-way delay of both directions, e.g. `5ms`.
    #[arg(long, value_parser = parse_duration)]
    delay: Option<std::time::Duration>,
    /// Initial uniform jitter of both directions, e.g. `1ms`.
    #[arg(long, value_parser = parse_duration)]
    jitter: Option<std::time::Duration>,
    /// Initial loss probability of both directions, e.g. `0.01`.
    #[arg(long)]
    loss: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let relay = Relay::start(args.listen, args.upstream)
        .with_context(|| format!("starting the relay on {}", args.listen))?;
    if let Some(d) = args.delay {
        relay.set_delay(d);
    }
    if let Some(j) = args.jitter {
        relay.set_jitter(j);
    }
    if let Some(p) = args.loss {
        anyhow::ensure!((0.0..=1.0).contains(&p), "--loss must be within [0, 1]");
        relay.set_loss(p);
    }
    let control = match args.control {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the control port {addr}"))?;
            let bound = listener.local_addr()?;
            let handle = relay.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(listener, handle).await {
                    eprintln!("meshrelay: control port stopped: {e}");
                }
            });
            bound.to_string()
        }
        None => "none".to_string(),
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "meshrelay listen={} upstream={} control={control}",
            relay.local_addr(),
            relay.upstream()
        )?;
        out.flush()?;
    }
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("meshrelay: stopping; {:?}", relay.stats());
    relay.shutdown();
    Ok(())
}
