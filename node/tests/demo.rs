//! `meshnode demo`: the README's first command must run, fail over, and say so.

mod common;

use std::process::Command;

use anyhow::{Context, Result};

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
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("node-b killed"), "{stdout}");
    assert!(stdout.contains("node-b revived"), "{stdout}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .context("no summary line")?;
    // "summary: requests N ok, F failed; served by node-b X, node-c Y; ..."
    let num_after = |key: &str| -> Option<u64> {
        let i = summary.find(key)? + key.len();
        summary[i..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let ok = num_after("requests").context("ok count")?;
    let failed = summary
        .split("ok, ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .context("failed count")?;
    let (b, c) = (
        num_after("node-b").context("node-b")?,
        num_after("node-c").context("node-c")?,
    );
    assert!(ok > 500, "{summary}");
    assert_eq!(
        failed,
        0,
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(b > 0 && c > 0, "both endpoints must serve: {summary}");
    Ok(())
}
