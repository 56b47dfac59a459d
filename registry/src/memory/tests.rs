use std::time::Duration;

use super::*;
use crate::testing::{has_node, registration, wait_for_status, wait_for_view};

const WITHIN: Duration = Duration::from_secs(5);

#[tokio::test]
async fn members_see_each_other_and_count_updates() -> anyhow::Result<()> {
    let mesh = MemoryMesh::new();
    let a = mesh.connect();
    let b = mesh.connect();
    a.register(registration("node-a", "127.0.0.1:1", &[("echo", 7)]))
        .await?;
    b.register(registration(
        "node-b",
        "127.0.0.1:2",
        &[("echo", 7), ("web", 80)],
    ))
    .await?;
    for r in [&a, &b] {
        let view = wait_for_view(r, WITHIN, "both nodes", |v| {
            has_node(v, "node-a", &["echo"]) && has_node(v, "node-b", &["echo", "web"])
        })
        .await?;
        assert_eq!(view.endpoints("echo").count(), 2);
        assert_eq!(view.revision, 0);
    }
    let status = a.status().borrow().clone();
    assert_eq!(status.backend, "memory");
    assert_eq!(status.state, RegistryState::Connected);
    assert!(status.registered);
    assert_eq!(status.updates_total, 5, "2 + 3 records");
    assert!(has_node(&mesh.view(), "node-b", &["web"]));
    Ok(())
}

#[tokio::test]
async fn shutdown_removes_at_once_and_is_idempotent() -> anyhow::Result<()> {
    let mesh = MemoryMesh::new();
    let a = mesh.connect();
    let b = mesh.connect();
    a.register(registration("node-a", "127.0.0.1:1", &[("echo", 7)]))
        .await?;
    b.register(registration("node-b", "127.0.0.1:2", &[("echo", 7)]))
        .await?;
    wait_for_view(&a, WITHIN, "node-b", |v| has_node(v, "node-b", &["echo"])).await?;

    b.shutdown(Duration::from_secs(1)).await?;
    // Shutdown returns after the records are gone: no wait needed.
    let view = a.view().borrow().clone();
    assert!(!view.nodes.contains_key("node-b"), "{view:?}");
    assert_eq!(view.endpoints("echo").count(), 1);
    b.shutdown(Duration::from_secs(1)).await?;
    let err = b
        .register(registration("node-b", "127.0.0.1:2", &[]))
        .await
        .err();
    assert_eq!(err, Some(RegistryError::Stopped));
    Ok(())
}

#[tokio::test]
async fn dropping_every_handle_is_a_lease_expiry() -> anyhow::Result<()> {
    let mesh = MemoryMesh::new();
    let a = mesh.connect();
    let b = mesh.connect();
    let b2 = b.clone();
    b.register(registration("node-b", "127.0.0.1:2", &[("echo", 7)]))
        .await?;
    wait_for_view(&a, WITHIN, "node-b", |v| v.nodes.contains_key("node-b")).await?;
    drop(b);
    // One clone left: still registered.
    assert!(mesh.view().nodes.contains_key("node-b"));
    drop(b2);
    wait_for_view(&a, WITHIN, "node-b gone", |v| v.nodes.is_empty()).await?;
    Ok(())
}

#[tokio::test]
async fn one_name_per_live_member() -> anyhow::Result<()> {
    let mesh = MemoryMesh::new();
    let a = mesh.connect();
    let imposter = mesh.connect();
    a.register(registration("node-a", "127.0.0.1:1", &[]))
        .await?;
    let err = imposter
        .register(registration("node-a", "127.0.0.1:9", &[]))
        .await
        .err();
    assert_eq!(err, Some(RegistryError::NameTaken("node-a".into())));
    assert_eq!(mesh.view().nodes["node-a"].addr, "127.0.0.1:1");
    // A restarted node takes its name back once the old member is gone.
    a.shutdown(Duration::from_secs(1)).await?;
    imposter
        .register(registration("node-a", "127.0.0.1:9", &[]))
        .await?;
    assert_eq!(mesh.view().nodes["node-a"].addr, "127.0.0.1:9");
    Ok(())
}

#[tokio::test]
async fn re_register_replaces_records() -> anyhow::Result<()> {
    let mesh = MemoryMesh::new();
    let a = mesh.connect();
    let watcher = mesh.connect();
    a.register(registration(
        "node-a",
        "127.0.0.1:1",
        &[("echo", 7), ("web", 80)],
    ))
    .await?;
    let mut rx = watcher.view();
    rx.borrow_and_update();
    // Same registration again: the view is not replaced.
    a.register(registration(
        "node-a",
        "127.0.0.1:1",
        &[("echo", 7), ("web", 80)],
    ))
    .await?;
    assert!(!rx.has_changed()?);
    // Migration: new address, one service dropped.
    a.register(registration("node-a", "127.0.0.1:5", &[("echo", 7)]))
        .await?;
    let view = rx.borrow_and_update().clone();
    assert_eq!(view.nodes["node-a"].addr, "127.0.0.1:5");
    assert!(!view.services.contains_key("web"));
    let status = wait_for_status(&watcher, WITHIN, "counted", |s| s.updates_total == 5).await?;
    assert!(!status.registered, "the watcher registered nothing");
    Ok(())
}

#[tokio::test]
async fn invalid_registration_is_refused() {
    let mesh = MemoryMesh::new();
    let a = mesh.connect();
    let mut reg = registration("node-a", "not-an-addr", &[]);
    assert!(matches!(
        a.register(reg.clone()).await,
        Err(RegistryError::InvalidRegistration(_))
    ));
    reg = registration("node-a", "127.0.0.1:1", &[("echo", 7), ("echo", 8)]);
    assert!(matches!(
        a.register(reg.clone()).await,
        Err(RegistryError::InvalidRegistration(_))
    ));
    reg = registration("node-a", "127.0.0.1:1", &[("echo", 7)]);
    reg.services[0].node = "node-b".into();
    assert!(matches!(
        a.register(reg).await,
        Err(RegistryError::InvalidRegistration(_))
    ));
    assert!(mesh.view().nodes.is_empty());
}
