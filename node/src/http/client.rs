//! Caller side: one h3 client per peer connection. The QUIC connection comes from the node's
//! pool (ALPN `h3`, dialled by this node); the h3 client on it is built once, its driver
//! polled in a task of its own, and its `SendRequest` cloned per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use meshnode_transport::Alpn;

use super::MAX_HEADER_BYTES;
use crate::node::{lock, Shared};

/// Sends requests on one peer connection.
pub(crate) type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// The cached client of one peer: the connection's stable id and its `SendRequest`.
type Slot = Arc<tokio::sync::Mutex<Option<(usize, SendRequest)>>>;

/// h3 clients by peer name. Dropping the last `SendRequest` of a connection closes it, so the
/// cache keeps one per live connection and replaces it only when the pool's connection changes.
#[derive(Default)]
pub(crate) struct H3Clients {
    slots: Mutex<HashMap<String, Slot>>,
}

impl H3Clients {
    /// The h3 client for `node` at `addr`, dialling and setting it up if needed.
    pub(crate) async fn get(
        &self,
        shared: &Shared,
        node: &str,
        addr: SocketAddr,
    ) -> Result<SendRequest, String> {
        let conn = shared
            .pool
            .connection(node, addr, Alpn::H3)
            .await
            .map_err(|e| e.to_string())?;
        let id = conn.stable_id();
        let slot = lock(&self.slots)
            .entry(node.to_string())
            .or_default()
            .clone();
        let mut cached = slot.lock().await;
        if let Some((cached_id, sr)) = cached.as_ref() {
            if *cached_id == id {
                return Ok(sr.clone());
            }
        }
        let (mut driver, sr) = h3::client::builder()
            .max_field_section_size(MAX_HEADER_BYTES as u64)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| format!("h3 set-up: {e}"))?;
        let peer = node.to_string();
        tokio::spawn(async move {
            let reason = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            tracing::debug!(%peer, %reason, "h3 client connection ended");
        });
        *cached = Some((id, sr.clone()));
        Ok(sr)
    }

    /// Forgets peers for which `keep` is false (nodes that left the mesh).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.slots).retain(|k, _| keep(k));
    }
}
