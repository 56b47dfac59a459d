//! Standard CONNECT over HTTP/3 (RFC 9114 §4.4) from an independent implementation: aioquic
//! (Python), holding a mesh certificate, tunnels to a TCP service through node-b; a client
//! whose certificate comes from another CA is refused. The client runs on the test venv's
//! Python (`common::test_python`, made by `scripts/deps.sh --test`). Without aioquic there it
//! is skipped with a note, except in CI (`CI=true`), where that fails the test.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/h3_connect.py")
}

/// Runs the aioquic client; returns its exit success and its output.
async fn run_client(
    quic: std::net::SocketAddr,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    authority: &str,
) -> Result<(bool, String)> {
    let out = tokio::process::Command::new(test_python())
        .arg(script())
        .arg(quic.ip().to_string())
        .arg(quic.port().to_string())
        .arg(ca)
        .arg(cert)
        .arg(key)
        .arg("node-b")
        .arg(authority)
        .kill_on_drop(true)
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_connect_reaches_a_tcp_service_and_a_foreign_ca_is_refused() -> Result<()> {
    if !python_module_ready("aioquic").await? {
        return Ok(());
    }
    tokio::time::timeout(LIMIT, async {
        let pki = Pki::new(&["node-b", "client-x"])?;
        let foreign = Pki::new(&["client-x"])?;
        let mesh = memory_mesh();
        let echo = echo_server().await?;
        let svc = format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\nport = 7\n"
        );
        let b = start_node(&pki, "node-b", &svc, mesh.connect()).await?;
        let quic = b.quic_addr();
        let (ok, out) = run_client(
            quic,
            &pki.ca_pem(),
            &pki.cert("client-x"),
            &pki.key("client-x"),
            "echo:7",
        )
        .await?;
        assert!(ok && out.contains("OK"), "aioquic CONNECT failed: {out}");
        // A port the service does not advertise: 404.
        let (ok, out) = run_client(
            quic,
            &pki.ca_pem(),
            &pki.cert("client-x"),
            &pki.key("client-x"),
            "echo:8",
        )
        .await?;
        assert!(!ok && out.contains("404"), "unadvertised port: {out}");
        // A certificate from another CA: no connection.
        let (ok, out) = run_client(
            quic,
            &pki.ca_pem(),
            &foreign.cert("client-x"),
            &foreign.key("client-x"),
            "echo:7",
        )
        .await?;
        assert!(
            !ok && out.contains("connection closed"),
            "a foreign certificate must be refused: {out}"
        );
        eprintln!("foreign CA: {}", out.trim());
        b.drain().await;
        Ok(())
    })
    .await?
}
