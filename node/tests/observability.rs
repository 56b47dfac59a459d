//! Metrics, /status, /readyz and `meshnode status` against real running nodes (docs/admin.md, docs/metrics.md).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use common::process::*;
use common::*;
use meshnode_registry::testing::{EtcdProcess, TcpProxy};

/// Every metric family of docs/metrics.md.
const DOCUMENTED_METRICS: &[&str] = &[
    "meshnode_build_info",
    "meshnode_tunnels_opened_total",
    "meshnode_tunnels_active",
    "meshnode_tunnel_bytes_total",
    "meshnode_http_requests_total",
    "meshnode_http_request_duration_seconds",
    "meshnode_peer_rtt_seconds",
    "meshnode_quic_lost_packets_total",
    "meshnode_quic_connection_rtt_seconds",
    "meshnode_quic_connection_cwnd_bytes",
    "meshnode_quic_connection_sent_packets_total",
    "meshnode_quic_connection_lost_packets_total",
    "meshnode_quic_connection_congestion_events_total",
    "meshnode_quic_migrations_total",
    "meshnode_endpoint_ejections_total",
    "meshnode_retries_total",
    "meshnode_registry_connected",
    "meshnode_registry_updates_total",
];

/// Parses Prometheus text: sample line → value. Fails on any malformed line.
fn parse_prometheus(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            anyhow::ensure!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').context("no value")?;
        let v: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        if let Some((name, labels)) = series.split_once('{') {
            anyhow::ensure!(labels.ends_with('}'), "bad labels in {line:?}");
            anyhow::ensure!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad name {name}"
            );
        }
        out.insert(series.to_string(), v);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_show_real_values() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let pki = Pki::new(&["node-a", "node-b"])?;
        let mesh = memory_mesh();
        let echo = echo_server().await?;
        let b = start_node(
            &pki,
            "node-b",
            &format!("[[service]]\nname = \"echo\"\nprotocol = \"tcp\"\ntarget = \"{echo}\"\n"),
            mesh.connect(),
        )
        .await?;
        let a = start_node(
            &pki,
            "node-a",
            "[[outbound]]\nservice = \"echo\"\nlisten = \"127.0.0.1:0\"\n",
            mesh.connect(),
        )
        .await?;
        wait_endpoints(&a, "echo", 1).await?;
        let out = a.outbound_addr("echo").context("outbound")?;
        const N: usize = 5;
        const LEN: usize = 10_000;
        for _ in 0..N {
            let back = roundtrip(out, &[1u8; LEN]).await?;
            assert_eq!(back.len(), LEN);
        }
        // Tunnels end asynchronously after the client's last read; wait for both sides.
        eventually("tunnels to close", Duration::from_secs(5), || {
            a.metrics().get("meshnode_tunnels_active", &["echo"]) == 0.0
                && b.metrics().get("meshnode_tunnels_active", &["echo"]) == 0.0
        })
        .await?;

        let admin = a.admin_addr();
        let (code, text) = http_get(admin, "/metrics").await?;
        assert_eq!(code, 200);
        let samples = parse_prometheus(&text)?;
        for name in DOCUMENTED_METRICS {
            assert!(text.contains(&format!("# HELP {name} ")), "HELP for {name}");
            assert!(text.contains(&format!("# TYPE {name} ")), "TYPE for {name}");
        }
        let get = |k: &str| samples.get(k).copied().unwrap_or(-1.0);
        assert_eq!(
            get("meshnode_tunnels_opened_total{service=\"echo\",peer=\"node-b\",result=\"ok\"}"),
            N as f64
        );
        assert_eq!(
            get("meshnode_tunnel_bytes_total{service=\"echo\",direction=\"sent\"}"),
            (N * LEN) as f64
        );
        assert_eq!(
            get("meshnode_tunnel_bytes_total{service=\"echo\",direction=\"received\"}"),
            (N * LEN) as f64
        );
        assert_eq!(get("meshnode_tunnels_active{service=\"echo\"}"), 0.0);
        assert_eq!(get("meshnode_registry_connected"), 1.0);
        assert_eq!(
            get(&format!(
                "meshnode_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            1.0
        );
        eventually("an RTT sample", Duration::from_secs(5), || {
            a.metrics().get("meshnode_peer_rtt_seconds", &["node-b"]) > 0.0
        })
        .await?;
        // The same connection's own series, on both of its ends: the caller dialled it, the
        // callee accepted it and sent its answers back on it.
        let series = |m: &meshnode::metrics::Metrics, peer: &str, dir: &str| {
            let l = [peer, "meshnode/1", dir];
            (
                m.get("meshnode_quic_connection_rtt_seconds", &l),
                m.get("meshnode_quic_connection_cwnd_bytes", &l),
                m.get("meshnode_quic_connection_sent_packets_total", &l),
            )
        };
        eventually(
            "the meshnode/1 connection's series",
            Duration::from_secs(5),
            || {
                let (rtt_a, cwnd_a, sent_a) = series(a.metrics(), "node-b", "outbound");
                let (rtt_b, cwnd_b, sent_b) = series(b.metrics(), "node-a", "inbound");
                rtt_a > 0.0
                    && cwnd_a > 0.0
                    && sent_a >= N as f64
                    && rtt_b > 0.0
                    && cwnd_b > 0.0
                    && sent_b >= N as f64
            },
        )
        .await?;
        // No HTTP request went out: no h3 connection, so no h3 series; node-b dialled nothing.
        let m = a.metrics();
        assert_eq!(
            m.get(
                "meshnode_quic_connection_sent_packets_total",
                &["node-b", "h3", "outbound"]
            ),
            0.0
        );
        assert_eq!(series(b.metrics(), "node-a", "outbound").2, 0.0);
        // node-a's connection to node-b is one of node-b's inbound peer connections.
        eventually(
            "node-b's inbound peer connection",
            Duration::from_secs(5),
            || b.metrics().get("meshnode_peer_connections_inbound", &[]) >= 1.0,
        )
        .await?;
        assert_eq!(
            a.metrics().get("meshnode_peer_connections_inbound", &[]),
            0.0
        );

        // /status has every field of docs/admin.md with plausible values.
        let (code, body) = http_get(admin, "/status").await?;
        assert_eq!(code, 200);
        let doc: serde_json::Value = serde_json::from_str(&body)?;
        for k in ["name", "addr", "zone", "version", "uptime_s"] {
            assert!(doc["node"].get(k).is_some(), "node.{k}");
        }
        assert_eq!(doc["node"]["name"], "node-a");
        assert_eq!(doc["node"]["addr"], a.quic_addr().to_string());
        for k in ["backend", "state", "lease_id", "lease_ttl_s"] {
            assert!(doc["registry"].get(k).is_some(), "registry.{k}");
        }
        let peer = &doc["peers"][0];
        assert_eq!(peer["name"], "node-b");
        assert_eq!(peer["state"], "connected");
        for k in [
            "addr",
            "rtt_ms",
            "streams_active",
            "bytes_sent",
            "bytes_received",
            "migrations",
        ] {
            assert!(peer.get(k).is_some(), "peer.{k}");
        }
        assert!(
            peer["bytes_sent"].as_u64().unwrap_or(0) >= (N * LEN) as u64,
            "{peer}"
        );
        let svc = &doc["services"][0];
        assert_eq!(svc["name"], "echo");
        assert_eq!(svc["local"], false);
        let ep = &svc["endpoints"][0];
        assert_eq!(ep["node"], "node-b");
        assert_eq!(ep["state"], "healthy");
        assert_eq!(ep["requests_total"], N as u64);
        assert_eq!(ep["failures_total"], 0);
        assert!(ep["ewma_ms"].as_f64().unwrap_or(0.0) > 0.0, "{ep}");

        // `meshnode status` against this running node.
        let (code, out, err) = meshnode_async(&["status", "--admin", &admin.to_string()]).await?;
        assert_eq!(code, 0, "{err}");
        for needle in ["node-a", "PEERS", "node-b", "SERVICES", "echo", "healthy"] {
            assert!(out.contains(needle), "{needle} missing from:\n{out}");
        }
        let (code, json, _) =
            meshnode_async(&["status", "--admin", &admin.to_string(), "--json"]).await?;
        assert_eq!(code, 0);
        let parsed: serde_json::Value = serde_json::from_str(&json)?;
        assert_eq!(parsed["node"]["name"], "node-a");
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_registered_then_200() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let etcd = EtcdProcess::start().await?;
        let proxy = TcpProxy::start(&etcd.endpoint).await?;
        proxy.cut();
        let pki = Pki::new(&["node-a"])?;
        let cfg = meshnode_registry::etcd::EtcdConfig {
            endpoints: vec![proxy.endpoint.clone()],
            prefix: "/ready".into(),
            lease_ttl: Duration::from_secs(2),
            ..Default::default()
        };
        let registry = meshnode_registry::etcd::start(cfg);
        let a = start_node(&pki, "node-a", "", registry).await?;
        let admin = a.admin_addr();
        let (code, body) = http_get(admin, "/readyz").await?;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("registry"), "{body}");
        let (code, _) = http_get(admin, "/healthz").await?;
        assert_eq!(code, 200);
        assert_eq!(a.metrics().get("meshnode_registry_connected", &[]), 0.0);
        proxy.restore();
        eventually("readyz 200", Duration::from_secs(15), || a.is_ready()).await?;
        let (code, _) = http_get(admin, "/readyz").await?;
        assert_eq!(code, 200);
        Ok(())
    })
    .await?
}

/// Every `meshnode_*` name in an expression, with histogram suffixes folded to the family.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("meshnode_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(family.to_string());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_queries_exists() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 10, "too few queries: {}", all.len());
    let exported = meshnode::metrics::Metrics::new().render();
    let mut seen = 0;
    for e in &all {
        for name in metric_names(e) {
            seen += 1;
            assert!(
                exported.contains(&format!("# HELP {name} ")),
                "dashboard queries {name}, which meshnode does not export ({e})"
            );
        }
    }
    assert!(seen >= 10);
    for name in DOCUMENTED_METRICS {
        assert!(
            all.iter().any(|e| e.contains(name)),
            "the dashboard does not show {name}"
        );
    }
    Ok(())
}
