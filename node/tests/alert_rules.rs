//! The Prometheus alert rules shipped in deploy/examples: promtool checks their syntax and runs
//! their unit tests (deploy/examples/alerts.test.yml), checks that prometheus.yml loads them,
//! and every meshnode metric they use is one a running node exports.

use std::path::{Path, PathBuf};
use std::process::Command;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// promtool comes from Debian's `prometheus` package: on PATH, or `$MESHNODE_PROMTOOL` (where
/// scripts/deps.sh --test unpacks it). Outside CI a machine without it skips with a note; in CI
/// (CI=true) its absence fails the test.
fn promtool() -> Option<String> {
    let candidate = std::env::var("MESHNODE_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let found = Command::new(&candidate)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return Some(candidate);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool is missing in CI: scripts/deps.sh --test installs Debian's prometheus package"
    );
    eprintln!("skipped: promtool not installed (apt-get install prometheus)");
    None
}

fn run(promtool: &str, args: &[&str]) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(examples())
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let promtool = promtool.as_str();
    let check = run(promtool, &["check", "rules", "alerts.yml"]);
    assert!(check.contains("SUCCESS: 8 rules found"), "{check}");
    let tests = run(promtool, &["test", "rules", "alerts.test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
    let config = run(promtool, &["check", "config", "prometheus.yml"]);
    assert!(config.contains("1 rule files found"), "{config}");
}

#[test]
fn every_alert_names_a_runbook_and_a_severity() {
    let rules = std::fs::read_to_string(examples().join("alerts.yml")).expect("alerts.yml");
    let alerts = rules.matches("- alert: ").count();
    assert_eq!(alerts, 8);
    assert_eq!(rules.matches("runbook: ").count(), alerts);
    assert_eq!(rules.matches("severity: ").count(), alerts);
    for name in [
        "MeshnodeDown",
        "MeshnodeRegistryDisconnected",
        "MeshnodeNotReady",
        "MeshnodeEndpointEjections",
        "MeshnodeTunnelErrorRatio",
        "MeshnodeHTTPErrorRatio",
        "MeshnodeHTTPLatencyHigh",
        "MeshnodeLeaseChurn",
    ] {
        assert!(rules.contains(&format!("- alert: {name}\n")), "{name}");
    }
}

#[test]
fn every_metric_an_alert_uses_is_exported_by_a_node() {
    let rules = std::fs::read_to_string(examples().join("alerts.yml")).expect("alerts.yml");
    let node = meshnode::metrics::Metrics::new().render();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("meshnode_"))
        .map(|w| w.trim_end_matches("_bucket"))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 7, "{used:?}");
    for name in used {
        assert!(
            node.contains(&format!("# TYPE {name} ")),
            "alerts.yml uses {name}, which a node does not export"
        );
    }
}
