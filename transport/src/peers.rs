//! This node's own outbound connections: one lazily dialled, reused connection per peer and
//! ALPN, always to the peer's advertised address (SPEC §5), re-dialled after loss.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::endpoint::{Alpn, ConnectError, MeshEndpoint};

/// Application close code a draining node sends so peers stop sending new work at once.
pub const CLOSE_DRAINING: u32 = 0x4d44; // "MD"

/// What this node knows of its connection to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// A handshake is under way.
    Connecting,
    /// A connection is up.
    Connected,
    /// The last connection was lost or the last dial failed.
    Down,
    /// The peer announced it is draining.
    Draining,
}

impl PeerState {
    /// The lowercase name used in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::Connected => "connected",
            PeerState::Down => "down",
            PeerState::Draining => "draining",
        }
    }
}

/// A point-in-time view of one peer connection, for status and metrics.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Peer node name.
    pub name: String,
    /// Protocol of this connection.
    pub alpn: Alpn,
    /// Address dialled (the peer's advertised address).
    pub addr: SocketAddr,
    /// The address the connection currently uses (differs from `addr` after migration).
    pub remote: Option<SocketAddr>,
    /// Connection state.
    pub state: PeerState,
    /// Smoothed RTT, if connected.
    pub rtt: Option<Duration>,
    /// Bytes sent on the connection (UDP payload).
    pub bytes_sent: u64,
    /// Bytes received on the connection (UDP payload).
    pub bytes_received: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// quinn's stable id of the current connection (a new id means a new connection).
    pub conn_id: Option<usize>,
}

struct Slot {
    addr: SocketAddr,
    conn: Option<quinn::Connection>,
    state: PeerState,
}

struct Entry {
    slot: Mutex<Slot>,
    /// Serialises dials so a burst of new tunnels makes one handshake, not many.
    dial: tokio::sync::Mutex<()>,
}

type Entries = Arc<Mutex<HashMap<(String, Alpn), Arc<Entry>>>>;

/// The outbound connection pool of one node.
#[derive(Clone)]
pub struct PeerPool {
    endpoint: MeshEndpoint,
    entries: Entries,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short critical sections cannot leave them inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PeerPool {
    /// A pool dialling from `endpoint`.
    pub fn new(endpoint: MeshEndpoint) -> PeerPool {
        PeerPool {
            endpoint,
            entries: Arc::default(),
        }
    }

    /// The endpoint this pool dials from.
    pub fn endpoint(&self) -> &MeshEndpoint {
        &self.endpoint
    }

    fn entry(&self, peer: &str, alpn: Alpn, addr: SocketAddr) -> Arc<Entry> {
        let mut entries = lock(&self.entries);
        entries
            .entry((peer.to_string(), alpn))
            .or_insert_with(|| {
                Arc::new(Entry {
                    slot: Mutex::new(Slot {
                        addr,
                        conn: None,
                        state: PeerState::Connecting,
                    }),
                    dial: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    fn live(entry: &Entry, addr: SocketAddr) -> Option<quinn::Connection> {
        let slot = lock(&entry.slot);
        match &slot.conn {
            Some(c) if c.close_reason().is_none() && slot.addr == addr => Some(c.clone()),
            _ => None,
        }
    }

    /// The connection to `peer` for `alpn`, dialling `addr` if there is none or the peer's
    /// advertised address changed.
    pub async fn connection(
        &self,
        peer: &str,
        addr: SocketAddr,
        alpn: Alpn,
    ) -> Result<quinn::Connection, ConnectError> {
        let entry = self.entry(peer, alpn, addr);
        if let Some(conn) = Self::live(&entry, addr) {
            return Ok(conn);
        }
        let _dialling = entry.dial.lock().await;
        // Someone else may have connected while we waited for the dial lock.
        if let Some(conn) = Self::live(&entry, addr) {
            return Ok(conn);
        }
        {
            let mut slot = lock(&entry.slot);
            slot.addr = addr;
            slot.state = PeerState::Connecting;
        }
        match self.endpoint.connect(peer, addr, alpn).await {
            Ok(conn) => {
                {
                    let mut slot = lock(&entry.slot);
                    slot.conn = Some(conn.clone());
                    slot.state = PeerState::Connected;
                }
                tracing::debug!(peer, %addr, ?alpn, "connected to peer");
                self.watch_close(peer.to_string(), entry.clone(), conn.clone());
                Ok(conn)
            }
            Err(e) => {
                lock(&entry.slot).state = PeerState::Down;
                Err(e)
            }
        }
    }

    /// Marks the peer down the moment its connection closes, so it is skipped at once.
    fn watch_close(&self, peer: String, entry: Arc<Entry>, conn: quinn::Connection) {
        tokio::spawn(async move {
            let reason = conn.closed().await;
            let draining = matches!(
                &reason,
                quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == quinn::VarInt::from_u32(CLOSE_DRAINING)
            );
            let mut slot = lock(&entry.slot);
            let same = slot
                .conn
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id());
            if same {
                slot.conn = None;
                slot.state = if draining {
                    PeerState::Draining
                } else {
                    PeerState::Down
                };
                tracing::info!(%peer, %reason, "peer connection closed");
            }
        });
    }

    /// The state of this node's connection to `peer` (meshnode ALPN), if it ever dialled it.
    pub fn state(&self, peer: &str) -> Option<PeerState> {
        let entries = lock(&self.entries);
        let entry = entries.get(&(peer.to_string(), Alpn::Meshnode))?;
        let state = lock(&entry.slot).state;
        Some(state)
    }

    /// Marks `peer` as draining (it told us so) until its next successful dial.
    pub fn mark_draining(&self, peer: &str) {
        let entries = lock(&self.entries);
        for ((name, _), entry) in entries.iter() {
            if name == peer {
                lock(&entry.slot).state = PeerState::Draining;
            }
        }
    }

    /// Closes and forgets connections to peers not in `keep` (they left the registry).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut entries = lock(&self.entries);
        entries.retain(|(name, _), entry| {
            let k = keep(name);
            if !k {
                if let Some(c) = lock(&entry.slot).conn.take() {
                    c.close(quinn::VarInt::from_u32(0), b"peer left the mesh");
                }
            }
            k
        });
    }

    /// Closes every connection with `code` (e.g. [`CLOSE_DRAINING`]).
    pub fn close_all(&self, code: u32, reason: &[u8]) {
        let entries = lock(&self.entries);
        for entry in entries.values() {
            if let Some(c) = lock(&entry.slot).conn.as_ref() {
                c.close(quinn::VarInt::from_u32(code), reason);
            }
        }
    }

    /// A snapshot of every peer connection. Takes each connection's stats lock once: call it
    /// periodically, not per request.
    pub fn snapshot(&self) -> Vec<PeerInfo> {
        let entries: Vec<((String, Alpn), Arc<Entry>)> = lock(&self.entries)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::with_capacity(entries.len());
        for ((name, alpn), entry) in entries {
            let (addr, state, conn) = {
                let slot = lock(&entry.slot);
                (slot.addr, slot.state, slot.conn.clone())
            };
            let mut info = PeerInfo {
                name,
                alpn,
                addr,
                remote: None,
                state,
                rtt: None,
                bytes_sent: 0,
                bytes_received: 0,
                lost_packets: 0,
                conn_id: None,
            };
            if let Some(c) = conn {
                let stats = c.stats();
                info.remote = Some(c.remote_address());
                info.rtt = Some(stats.path.rtt);
                info.bytes_sent = stats.udp_tx.bytes;
                info.bytes_received = stats.udp_rx.bytes;
                info.lost_packets = stats.path.lost_packets;
                info.conn_id = Some(c.stable_id());
            }
            out.push(info);
        }
        out.sort_by(|a, b| (&a.name, a.alpn).cmp(&(&b.name, b.alpn)));
        out
    }
}
