//! `meshnode status`: fetch a node's `/status` and render it as a table.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Config, DEFAULT_ADMIN};
use crate::exit::{self, Failure};
use crate::status::StatusDoc;

const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BODY: usize = 16 << 20;

/// Runs the command.
pub async fn run(
    admin: Option<String>,
    config: Option<PathBuf>,
    json: bool,
    watch: Option<f64>,
) -> Result<(), Failure> {
    let addr = admin_addr(admin, config)?;
    let colour = std::io::stdout().is_terminal();
    loop {
        let body = fetch(&addr, "/status").await?;
        if json {
            println!("{body}");
        } else {
            let doc: StatusDoc = serde_json::from_str(&body).map_err(|e| {
                Failure::new(
                    exit::UNAVAILABLE,
                    format!(
                        "{addr} answered /status with something that is not meshnode status: {e}"
                    ),
                )
            })?;
            if watch.is_some() && colour {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&doc, colour));
        }
        match watch {
            Some(secs) if secs > 0.0 => tokio::time::sleep(Duration::from_secs_f64(secs)).await,
            _ => return Ok(()),
        }
    }
}

fn admin_addr(admin: Option<String>, config: Option<PathBuf>) -> Result<String, Failure> {
    if let Some(a) = admin {
        return Ok(a);
    }
    let path = config.or_else(|| std::env::var_os("MESHNODE_CONFIG").map(PathBuf::from));
    if let Some(p) = path {
        let cfg = Config::load(&p)?;
        return Ok(cfg.admin.listen.to_string());
    }
    Ok(DEFAULT_ADMIN.to_string())
}

/// GETs `path` from the admin API and returns the body of a 200 answer.
pub async fn fetch(addr: &str, path: &str) -> Result<String, Failure> {
    let unreachable = |why: String| {
        Failure::new(
            exit::UNAVAILABLE,
            format!(
                "no meshnode admin API answers at {addr} ({why}); is the node running? \
                 Point at it with --admin HOST:PORT or -c CONFIG"
            ),
        )
    };
    let sock: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let attempt = async {
        let mut tcp = TcpStream::connect(sock).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        (&mut tcp)
            .take(MAX_BODY as u64)
            .read_to_end(&mut buf)
            .await?;
        Ok::<_, std::io::Error>(buf)
    };
    let raw = tokio::time::timeout(FETCH_TIMEOUT, attempt)
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| unreachable("not an HTTP answer".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        let line = head.lines().next().unwrap_or_default();
        return Err(Failure::new(
            exit::UNAVAILABLE,
            format!("{addr}{path} answered {line}"),
        ));
    }
    Ok(body.to_string())
}

fn paint(s: &str, code: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

fn state_colour(state: &str) -> &'static str {
    match state {
        "connected" | "healthy" => "32",
        "connecting" | "draining" => "33",
        _ => "31",
    }
}

/// Renders the status document as the table operators read.
pub fn render(doc: &StatusDoc, colour: bool) -> String {
    let mut o = String::new();
    let n = &doc.node;
    let r = &doc.registry;
    let lease = r
        .lease_id
        .map(|l| format!(" lease {l:x} ttl {}s", r.lease_ttl_s))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "{} {}  zone {}  up {}s  v{}  {}  registry {} {}{}",
        paint("NODE", "1", colour),
        n.name,
        if n.zone.is_empty() { "-" } else { &n.zone },
        n.uptime_s,
        n.version,
        n.addr,
        r.backend,
        paint(&r.state, state_colour(&r.state), colour),
        lease
    );
    if !doc.ready {
        let _ = writeln!(o, "  not ready: {}", doc.readiness_blockers.join(", "));
    }
    let _ = writeln!(o, "\n{}", paint("PEERS", "1", colour));
    let _ = writeln!(
        o,
        "  {:<16} {:<22} {:<11} {:>9} {:>8} {:>12} {:>12} {:>5}",
        "NAME", "ADDRESS", "STATE", "RTT", "STREAMS", "SENT", "RECEIVED", "MIGR"
    );
    for p in &doc.peers {
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.2}ms"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            o,
            "  {:<16} {:<22} {} {:>9} {:>8} {:>12} {:>12} {:>5}",
            p.name,
            p.addr,
            paint(&format!("{:<11}", p.state), state_colour(&p.state), colour),
            rtt,
            p.streams_active,
            human_bytes(p.bytes_sent),
            human_bytes(p.bytes_received),
            p.migrations
        );
    }
    let _ = writeln!(o, "\n{}", paint("SERVICES", "1", colour));
    for s in &doc.services {
        let _ = writeln!(
            o,
            "  {} ({}){}",
            s.name,
            s.protocol,
            if s.local { ", hosted here" } else { "" }
        );
        for e in &s.endpoints {
            let _ = writeln!(
                o,
                "    {:<16} {:<22} {} ewma {:>7.2}ms  inflight {:>3}  requests {:>7}  failures {:>5}",
                e.node,
                e.addr,
                paint(&format!("{:<8}", e.state), state_colour(&e.state), colour),
                e.ewma_ms,
                e.inflight,
                e.requests_total,
                e.failures_total
            );
        }
    }
    o
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}
