//! `meshnode demo`: the README's first command must run, fail over, and say so, for the TCP
//! service (balanced per connection) and the HTTP service (balanced per request).

mod common;

use std::process::Command;

use anyhow::{Context, Result};

/// The figures of one `summary KIND: requests N ok, F failed; served by node-b X, node-c Y;
/// ...` line.
#[derive(Debug)]
struct Summary {
    ok: u64,
    failed: u64,
    b: u64,
    c: u64,
}

fn summary(stdout: &str, kind: &str) -> Result<Summary> {
    let prefix = format!("summary {kind}:");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("no {prefix} line"))?;
    let num_after = |key: &str| -> Result<u64> {
        let i = line.find(key).with_context(|| format!("{key} in {line}"))? + key.len();
        line[i..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("a number after {key} in {line}"))
    };
    Ok(Summary {
        ok: num_after("requests")?,
        failed: num_after("ok,")?,
        b: num_after("node-b")?,
        c: num_after("node-c")?,
    })
}

#[test]
fn demo_runs_fails_over_and_reports_zero_failures() -> Result<()> {
    let out = Command::new(common::meshnode_bin())
        .args(["demo", "--duration", "12"])
        .env(
            "MESHNODE_LOG",
            "warn,meshnode::peer_health=info,meshnode::balance=info",
        )
        .output()
        .context("running meshnode demo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stdout}\n{stderr}");
    assert!(stdout.contains("node-b killed"), "{stdout}");
    assert!(stdout.contains("node-b revived"), "{stdout}");

    let tcp = summary(&stdout, "tcp")?;
    assert!(tcp.ok > 500, "{tcp:?}");
    assert_eq!(tcp.failed, 0, "{stdout}\n{stderr}");
    assert!(tcp.b > 0 && tcp.c > 0, "both endpoints must serve: {tcp:?}");

    // The HTTP service: each request balanced on its own over kept-alive connections, and
    // retried elsewhere when node-b dies under it.
    let http = summary(&stdout, "http")?;
    eprintln!("demo summaries: tcp {tcp:?}, http {http:?}");
    assert!(http.ok > 500, "{http:?}");
    assert_eq!(http.failed, 0, "{stdout}\n{stderr}");
    assert!(
        http.b > 0 && http.c > 0,
        "both endpoints must serve: {http:?}"
    );
    assert!(
        http.b + http.c >= http.ok,
        "every request answered is counted by an endpoint: {http:?}"
    );
    Ok(())
}
