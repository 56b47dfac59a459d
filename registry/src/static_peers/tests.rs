use std::time::Duration;

use super::*;
use crate::handle::RegistryError;
use crate::testing::{has_node, registration};

fn peer(name: &str, addr: &str, services: &[(&str, u16)]) -> StaticPeer {
    StaticPeer {
        name: name.into(),
        addr: addr.into(),
        zone: "z".into(),
        services: services
            .iter()
            .map(|(s, port)| StaticService {
                name: s.to_string(),
                protocol: Protocol::Http,
                port: *port,
                weight: DEFAULT_WEIGHT,
            })
            .collect(),
    }
}

#[tokio::test]
async fn view_is_peers_plus_own_registration() -> anyhow::Result<()> {
    let r = start(vec![
        peer("node-b", "10.0.0.2:4433", &[("web", 80)]),
        peer("node-c", "10.0.0.3:4433", &[("web", 80), ("db", 5432)]),
    ]);
    let view = r.view().borrow().clone();
    assert!(has_node(&view, "node-b", &["web"]));
    assert!(has_node(&view, "node-c", &["web", "db"]));
    assert_eq!(view.services["web"]["node-c"].zone, "z");
    let status = r.status().borrow().clone();
    assert_eq!(status.backend, "static");
    assert_eq!(status.state, RegistryState::Connected);
    assert!(!status.registered);

    r.register(registration("node-a", "10.0.0.1:4433", &[("web", 80)]))
        .await?;
    let view = r.view().borrow().clone();
    assert_eq!(view.endpoints("web").count(), 3);
    assert!(r.status().borrow().registered);

    // Re-registering replaces our own records, the peers stay.
    r.register(registration("node-a", "10.0.0.9:4433", &[]))
        .await?;
    let view = r.view().borrow().clone();
    assert_eq!(view.nodes["node-a"].addr, "10.0.0.9:4433");
    assert_eq!(view.endpoints("web").count(), 2);

    r.shutdown(Duration::from_secs(1)).await?;
    r.shutdown(Duration::from_secs(1)).await?;
    assert_eq!(
        r.register(registration("node-a", "10.0.0.1:4433", &[]))
            .await,
        Err(RegistryError::Stopped)
    );
    Ok(())
}

#[tokio::test]
async fn invalid_peers_are_skipped_and_counted() {
    let r = start(vec![
        peer("node-b", "10.0.0.2:4433", &[("web", 80)]),
        peer("Node-C", "10.0.0.3:4433", &[]),
        peer("node-d", "nowhere", &[]),
        peer("node-e", "10.0.0.5:4433", &[("web", 0)]),
        peer("node-b", "10.0.0.6:4433", &[]),
    ]);
    let view = r.view().borrow().clone();
    assert_eq!(view.nodes.keys().collect::<Vec<_>>(), ["node-b"]);
    assert_eq!(view.nodes["node-b"].addr, "10.0.0.2:4433");
    assert_eq!(r.status().borrow().invalid_records_total, 4);
}

#[tokio::test]
async fn own_name_among_the_peers_is_a_conflict() -> anyhow::Result<()> {
    let r = start(vec![peer("node-a", "10.0.0.2:4433", &[])]);
    r.register(registration("node-a", "10.0.0.1:4433", &[]))
        .await?;
    assert_eq!(r.view().borrow().nodes["node-a"].addr, "10.0.0.1:4433");
    assert_eq!(r.status().borrow().conflicts.len(), 1);
    Ok(())
}

#[test]
fn peers_parse_from_toml_like_json() {
    let peer: StaticPeer = serde_json::from_str(
        r#"{"name":"node-b","addr":"10.0.0.6:4433","services":[{"name":"orders","protocol":"http","port":8080}]}"#,
    )
    .expect("peer");
    assert_eq!(peer.services[0].weight, DEFAULT_WEIGHT);
    assert!(
        serde_json::from_str::<StaticPeer>(r#"{"name":"b","addr":"1.2.3.4:1","extra":1}"#).is_err()
    );
}
