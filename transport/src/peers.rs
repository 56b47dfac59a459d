//! This node's own outbound connections: one lazily dialled, reused connection per peer and
//! ALPN, always to the peer's advertised address (docs/README.md), re-dialled after loss.

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

/// A change in this node's connection to a peer, as the pool saw it. The node turns these into
/// balancer state: a lost connection marks the peer down at once, a new one brings it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A dial succeeded: the peer is reachable and its identity checked.
    Connected {
        /// Peer node name.
        peer: String,
        /// Protocol of the connection.
        alpn: Alpn,
    },
    /// A dial failed (timed out, refused, wrong identity).
    DialFailed {
        /// Peer node name.
        peer: String,
        /// Protocol of the connection.
        alpn: Alpn,
    },
    /// A live connection died: idle timeout (silent peer), stateless reset (restarted peer),
    /// or closed by the peer for a reason other than draining.
    Lost {
        /// Peer node name.
        peer: String,
        /// Protocol of the connection.
        alpn: Alpn,
        /// quinn's reason, for logs.
        reason: String,
    },
    /// The peer closed the connection with [`CLOSE_DRAINING`]: it is going away.
    Draining {
        /// Peer node name.
        peer: String,
        /// Protocol of the connection.
        alpn: Alpn,
    },
    /// A live connection's path changed: the peer's address moved from `old` to `new` (NAT
    /// rebinding, the peer's own migration). Seen on connections this node dialled and on
    /// inbound ones handed to [`PeerPool::watch_inbound`]; a new connection is not a migration.
    Migrated {
        /// Peer node name.
        peer: String,
        /// Protocol of the connection.
        alpn: Alpn,
        /// Whether this node dialled the connection (`false`: the peer did).
        outbound: bool,
        /// The address before.
        old: SocketAddr,
        /// The address now.
        new: SocketAddr,
    },
}

impl PeerEvent {
    /// The peer this event is about.
    pub fn peer(&self) -> &str {
        match self {
            PeerEvent::Connected { peer, .. }
            | PeerEvent::DialFailed { peer, .. }
            | PeerEvent::Lost { peer, .. }
            | PeerEvent::Draining { peer, .. }
            | PeerEvent::Migrated { peer, .. } => peer,
        }
    }
}

/// Events buffered per subscriber; a subscriber that falls further behind loses the oldest
/// (it is told how many) and should resynchronise from [`PeerPool::snapshot`].
const EVENT_BUFFER: usize = 1024;

/// How often a live connection's remote address is compared with the last one seen. quinn
/// reports no path change, so it is polled; the read is a lock and a copy, and 100 ms keeps a
/// migration visible well within the second a path change may stall traffic.
pub const PATH_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A connection a peer dialled to this node, as [`PeerPool::inbound`] lists it.
#[derive(Debug, Clone)]
pub struct InboundInfo {
    /// Peer node name.
    pub name: String,
    /// Protocol of this connection.
    pub alpn: Alpn,
    /// The address the connection uses now.
    pub remote: SocketAddr,
    /// The connection's QUIC statistics.
    pub quic: QuicStats,
}

/// What one QUIC connection measured and counted, read from quinn for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicStats {
    /// quinn's stable id of the connection (a new id means a new connection; an id may be
    /// reused after a connection closes).
    pub conn_id: usize,
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Current congestion window, bytes.
    pub cwnd: u64,
    /// Packets sent (ACK-only ones included).
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Congestion events (window reductions after a loss).
    pub congestion_events: u64,
}

impl QuicStats {
    /// The statistics of `conn` now.
    pub fn of(conn: &quinn::Connection) -> QuicStats {
        QuicStats::from_stats(conn, &conn.stats())
    }

    /// The statistics of `conn` from `stats`, already read from it.
    fn from_stats(conn: &quinn::Connection, stats: &quinn::ConnectionStats) -> QuicStats {
        let path = stats.path;
        QuicStats {
            conn_id: conn.stable_id(),
            rtt: path.rtt,
            cwnd: path.cwnd,
            sent_packets: path.sent_packets,
            lost_packets: path.lost_packets,
            congestion_events: path.congestion_events,
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
    /// The connection's QUIC statistics (RTT, window, packets sent and lost), if connected.
    pub quic: Option<QuicStats>,
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
/// Live inbound connections by peer and ALPN: the connection's stable id and itself.
type Inbound = Arc<Mutex<HashMap<(String, Alpn), (usize, quinn::Connection)>>>;

/// The outbound connection pool of one node.
#[derive(Clone)]
pub struct PeerPool {
    endpoint: MeshEndpoint,
    entries: Entries,
    inbound: Inbound,
    events: tokio::sync::broadcast::Sender<PeerEvent>,
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
            inbound: Arc::default(),
            events: tokio::sync::broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// Connection events from now on (see [`PeerEvent`]).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    fn emit(&self, event: PeerEvent) {
        // No subscriber is not an error: events are advice, the pool works without them.
        let _ = self.events.send(event);
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
        self.connect(peer, addr, alpn, None).await
    }

    /// [`PeerPool::connection`], but a dial it makes gives up after `timeout` instead of the
    /// configured connect timeout (a reconnector's quick, repeated tries).
    pub async fn connection_within(
        &self,
        peer: &str,
        addr: SocketAddr,
        alpn: Alpn,
        timeout: Duration,
    ) -> Result<quinn::Connection, ConnectError> {
        self.connect(peer, addr, alpn, Some(timeout)).await
    }

    async fn connect(
        &self,
        peer: &str,
        addr: SocketAddr,
        alpn: Alpn,
        timeout: Option<Duration>,
    ) -> Result<quinn::Connection, ConnectError> {
        let entry = self.entry(peer, alpn, addr);
        if let Some(conn) = Self::live(&entry, addr) {
            return Ok(conn);
        }
        // One deadline for the wait behind another caller's dial and for our own: a caller
        // that found a dial of a dead peer under way must not wait for it and then for a
        // second full handshake timeout of its own.
        let timeout = timeout.unwrap_or(self.endpoint.transport().connect_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let Ok(_dialling) = tokio::time::timeout_at(deadline, entry.dial.lock()).await else {
            return Err(ConnectError::Timeout {
                peer: peer.to_string(),
                addr,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            });
        };
        // Someone else may have connected while we waited for the dial lock.
        if let Some(conn) = Self::live(&entry, addr) {
            return Ok(conn);
        }
        {
            let mut slot = lock(&entry.slot);
            slot.addr = addr;
            slot.state = PeerState::Connecting;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let dialled = self.endpoint.connect_within(peer, addr, alpn, left).await;
        match dialled {
            Ok(conn) => {
                {
                    let mut slot = lock(&entry.slot);
                    slot.conn = Some(conn.clone());
                    slot.state = PeerState::Connected;
                }
                tracing::debug!(peer, %addr, ?alpn, "connected to peer");
                self.watch_close(peer.to_string(), alpn, entry.clone(), conn.clone());
                self.emit(PeerEvent::Connected {
                    peer: peer.to_string(),
                    alpn,
                });
                Ok(conn)
            }
            Err(e) => {
                lock(&entry.slot).state = PeerState::Down;
                self.emit(PeerEvent::DialFailed {
                    peer: peer.to_string(),
                    alpn,
                });
                Err(e)
            }
        }
    }

    /// Follows `conn`'s remote address until it closes, announcing each change as
    /// [`PeerEvent::Migrated`]. Returns the close reason.
    async fn follow_path(
        &self,
        peer: &str,
        alpn: Alpn,
        outbound: bool,
        conn: &quinn::Connection,
    ) -> quinn::ConnectionError {
        let mut last = conn.remote_address();
        let mut tick = tokio::time::interval(PATH_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                reason = conn.closed() => return reason,
                _ = tick.tick() => {}
            }
            let now = conn.remote_address();
            if now != last {
                tracing::info!(peer, old = %last, new = %now, outbound, "peer connection migrated");
                self.emit(PeerEvent::Migrated {
                    peer: peer.to_string(),
                    alpn,
                    outbound,
                    old: last,
                    new: now,
                });
                last = now;
            }
        }
    }

    /// Follows a connection a peer dialled to this node until it closes: its path changes
    /// become [`PeerEvent::Migrated`], and it is listed by [`PeerPool::inbound`].
    pub fn watch_inbound(&self, peer: String, alpn: Alpn, conn: quinn::Connection) {
        let pool = self.clone();
        let id = conn.stable_id();
        let key = (peer, alpn);
        lock(&self.inbound).insert(key.clone(), (id, conn.clone()));
        tokio::spawn(async move {
            pool.follow_path(&key.0, alpn, false, &conn).await;
            let mut inbound = lock(&pool.inbound);
            if inbound.get(&key).is_some_and(|(i, _)| *i == id) {
                inbound.remove(&key);
            }
        });
    }

    /// The live inbound connections handed to [`PeerPool::watch_inbound`], by peer and ALPN.
    pub fn inbound(&self) -> Vec<InboundInfo> {
        let conns: Vec<((String, Alpn), quinn::Connection)> = lock(&self.inbound)
            .iter()
            .map(|(k, (_, c))| (k.clone(), c.clone()))
            .collect();
        let mut out: Vec<InboundInfo> = conns
            .into_iter()
            .map(|((name, alpn), c)| InboundInfo {
                name,
                alpn,
                remote: c.remote_address(),
                quic: QuicStats::of(&c),
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.alpn).cmp(&(&b.name, b.alpn)));
        out
    }

    /// Marks the peer down the moment its connection closes, so it is skipped at once.
    fn watch_close(&self, peer: String, alpn: Alpn, entry: Arc<Entry>, conn: quinn::Connection) {
        let pool = self.clone();
        tokio::spawn(async move {
            let reason = pool.follow_path(&peer, alpn, true, &conn).await;
            let draining = matches!(
                &reason,
                quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == quinn::VarInt::from_u32(CLOSE_DRAINING)
            );
            let same = {
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
                }
                same
            };
            if !same {
                return;
            }
            tracing::info!(%peer, %reason, "peer connection closed");
            let event = if draining {
                PeerEvent::Draining { peer, alpn }
            } else if matches!(reason, quinn::ConnectionError::LocallyClosed) {
                // This node closed it (the peer left the registry, or this node is stopping).
                return;
            } else {
                PeerEvent::Lost {
                    peer,
                    alpn,
                    reason: reason.to_string(),
                }
            };
            pool.emit(event);
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
                quic: None,
            };
            if let Some(c) = conn {
                let stats = c.stats();
                let quic = QuicStats::from_stats(&c, &stats);
                info.remote = Some(c.remote_address());
                info.rtt = Some(quic.rtt);
                info.bytes_sent = stats.udp_tx.bytes;
                info.bytes_received = stats.udp_rx.bytes;
                info.quic = Some(quic);
            }
            out.push(info);
        }
        out.sort_by(|a, b| (&a.name, a.alpn).cmp(&(&b.name, b.alpn)));
        out
    }
}
