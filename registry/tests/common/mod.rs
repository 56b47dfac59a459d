//! Set-up shared by the etcd test files: logs, a time bound, and a registered node.
// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::time::Duration;

use meshnode_registry::testing::{registration, test_config};
use meshnode_registry::{etcd, Registry};

/// Key prefix of every test mesh.
pub const P: &str = "/mesh";
/// Deadline of the conditions inside a test.
pub const SOON: Duration = Duration::from_secs(5);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Runs a test body with logs on and at most `limit` of wall time.
pub async fn bounded<F>(limit: Duration, f: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    init_logs();
    tokio::time::timeout(limit, f).await?
}

/// An etcd-backed registry (test settings) with `name` registered at a fixed address,
/// hosting `services` as `(name, port)`.
pub async fn node(
    endpoint: &str,
    name: &str,
    services: &[(&str, u16)],
) -> anyhow::Result<Registry> {
    let r = etcd::start(test_config(endpoint, P));
    r.register(registration(name, "127.0.0.1:4433", services))
        .await?;
    Ok(r)
}
