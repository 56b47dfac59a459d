//! One QUIC endpoint per node: a single UDP socket that accepts peers' connections and dials
//! this node's own outbound connections, for both ALPNs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_proto::{ALPN_H3, ALPN_MESHNODE};

use crate::admission::{
    Admission, ConnectionSlot, Decision, HandshakePermit, HandshakeResult, HandshakeStats, Limits,
    RateLimitedLog,
};
use crate::config::TransportConfig;
use crate::keys::{EndpointKeys, KeyError};
use crate::memory::{self, TrimStats};
use crate::runtime::MeshRuntime;
use crate::tls::{Identity, IdentityError};

/// Which application protocol a connection speaks; each is its own connection (h3 owns the
/// whole QUIC connection, so raw streams cannot share it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alpn {
    /// `meshnode/1`: one raw bidirectional stream per TCP tunnel.
    Meshnode,
    /// `h3`: HTTP/3 requests and CONNECT tunnels.
    H3,
}

impl Alpn {
    /// The ALPN identifier on the wire.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Alpn::Meshnode => ALPN_MESHNODE,
            Alpn::H3 => ALPN_H3,
        }
    }

    /// The ALPN identifier as text (`meshnode/1`, `h3`), e.g. for a metric label: the wire
    /// identifier itself, which is ASCII.
    pub fn name(self) -> &'static str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("unknown")
    }

    /// The ALPN named by negotiated protocol bytes, if it is one of ours.
    pub fn from_bytes(b: &[u8]) -> Option<Alpn> {
        [Alpn::Meshnode, Alpn::H3]
            .into_iter()
            .find(|a| a.as_bytes() == b)
    }
}

/// What the endpoint is bound to and how it behaves.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// UDP address to bind.
    pub listen: SocketAddr,
    /// Where the stateless-reset and connection-id keys live; `None` uses random keys.
    pub state_dir: Option<PathBuf>,
    /// QUIC tuning.
    pub transport: TransportConfig,
}

/// Errors while creating the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP socket could not be created or bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The persisted endpoint keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] IdentityError),
}

/// Errors while dialling a peer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    /// quinn refused to start the dial (bad address, endpoint closed).
    #[error("cannot dial {addr}: {reason}")]
    Start {
        /// The address dialled.
        addr: SocketAddr,
        /// quinn's reason.
        reason: String,
    },
    /// The handshake failed (peer refused our certificate, wrong identity, connection lost).
    #[error("handshake with {peer} at {addr} failed: {reason}")]
    Handshake {
        /// The node we meant to reach.
        peer: String,
        /// The address dialled.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// No handshake completed within the connect timeout.
    #[error("no answer from {peer} at {addr} within {timeout_ms} ms")]
    Timeout {
        /// The node we meant to reach.
        peer: String,
        /// The address dialled.
        addr: SocketAddr,
        /// The deadline.
        timeout_ms: u64,
    },
}

/// Why an admitted handshake did not become a peer connection.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AcceptError {
    /// No handshake completed within the connect timeout.
    #[error("handshake from {remote} timed out")]
    Timeout {
        /// The caller's address.
        remote: SocketAddr,
    },
    /// The handshake failed (no or a foreign certificate, connection lost).
    #[error("handshake from {remote} failed: {source}")]
    Handshake {
        /// The caller's address.
        remote: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// The connection negotiated no ALPN of ours.
    #[error("connection from {remote} negotiated no known ALPN")]
    UnknownAlpn {
        /// The caller's address.
        remote: SocketAddr,
    },
    /// The certificate names no mesh node of our trust domain.
    #[error("connection from {remote} has no mesh node identity")]
    NoIdentity {
        /// The caller's address.
        remote: SocketAddr,
    },
}

/// An incoming connection attempt that admission let through (see [`crate::admission`]): hand
/// it to [`MeshEndpoint::accept_connection`]. It holds its place among the handshakes in
/// progress until the handshake ends; dropping it refuses the attempt.
#[derive(Debug)]
pub struct Handshake {
    incoming: quinn::Incoming,
    permit: HandshakePermit,
}

impl Handshake {
    /// The caller's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.incoming.remote_address()
    }
}

/// Attempts not yet decided that quinn queues for the accept loop; past this, quinn drops new
/// Initials before deriving their keys (its cheapest path, not counted by us). The accept loop
/// decides each attempt without waiting, so the queue is short unless the node is starved.
pub const MAX_PENDING_INCOMING: usize = 4_096;
/// Datagrams buffered for one undecided attempt (quinn's default: 10 MiB). A client's first
/// flight is a few kilobytes.
pub const INCOMING_BUFFER_BYTES: u64 = 64 << 10;
/// Datagrams buffered for all undecided attempts together (quinn's default: 100 MiB).
pub const INCOMING_BUFFER_TOTAL_BYTES: u64 = 8 << 20;

/// An accepted, authenticated connection from a peer.
#[derive(Debug, Clone)]
pub struct InboundConnection {
    /// The connection.
    pub conn: quinn::Connection,
    /// The caller's node name, from its certificate.
    pub peer: String,
    /// The negotiated protocol.
    pub alpn: Alpn,
}

/// A node's QUIC endpoint. Cheap to clone.
#[derive(Clone)]
pub struct MeshEndpoint {
    endpoint: quinn::Endpoint,
    identity: Identity,
    client_meshnode: quinn::ClientConfig,
    client_h3: quinn::ClientConfig,
    transport: TransportConfig,
    admission: Admission,
    handshakes: Arc<HandshakeStats>,
    refusal_log: Arc<RateLimitedLog>,
    trims: Arc<TrimStats>,
    /// Connections this endpoint dialled that quinn still counts as live (handshaking or
    /// established, not yet closed): with the inbound ones held by admission, what quinn's open
    /// connections are once the closed ones have drained.
    dialled: Arc<AtomicU32>,
}

/// One dialled connection in [`MeshEndpoint::dialled`], from the dial's start until the
/// handshake fails or the connection closes.
struct Dialled(Arc<AtomicU32>);

impl Dialled {
    fn new(count: &Arc<AtomicU32>) -> Dialled {
        count.fetch_add(1, Ordering::Relaxed);
        Dialled(count.clone())
    }
}

impl Drop for Dialled {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl MeshEndpoint {
    /// Binds the UDP socket and starts the endpoint serving both ALPNs with mutual TLS.
    pub fn bind(opts: &EndpointOptions, identity: Identity) -> Result<MeshEndpoint, BindError> {
        let keys = match &opts.state_dir {
            Some(dir) => EndpointKeys::load_or_create(dir)?,
            None => EndpointKeys::random(),
        };
        let transport = opts.transport.to_quinn();
        let server_crypto = identity.server_config(&[ALPN_MESHNODE, ALPN_H3])?;
        let mut server = quinn::ServerConfig::with_crypto(server_crypto);
        server.transport_config(transport.clone());
        // A peer whose NAT rebinds must be followed (path validation is quinn's).
        server.migration(true);
        server
            .max_incoming(MAX_PENDING_INCOMING)
            .incoming_buffer_size(INCOMING_BUFFER_BYTES)
            .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL_BYTES);

        let client = |alpn: &[u8]| -> Result<quinn::ClientConfig, IdentityError> {
            let mut c = quinn::ClientConfig::new(identity.client_config(&[alpn])?);
            c.transport_config(transport.clone());
            Ok(c)
        };
        let client_meshnode = client(ALPN_MESHNODE)?;
        let client_h3 = client(ALPN_H3)?;

        let socket = udp_socket(opts.listen, opts.transport.socket_buffer).map_err(|source| {
            BindError::Socket {
                addr: opts.listen,
                source,
            }
        })?;
        let mut endpoint_config = keys.endpoint_config();
        // Accept datagrams as large as our own discovery may send; without this the peer's
        // discovery is capped at quinn's 1472 whatever its upper bound.
        let _ = endpoint_config.max_udp_payload_size(opts.transport.max_udp_payload_size());
        let endpoint =
            quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(MeshRuntime))
                .map_err(|source| BindError::Socket {
                    addr: opts.listen,
                    source,
                })?;
        Ok(MeshEndpoint {
            endpoint,
            identity,
            client_meshnode,
            client_h3,
            transport: opts.transport.clone(),
            admission: Admission::new(Limits::from_config(&opts.transport), Instant::now()),
            handshakes: Arc::default(),
            refusal_log: Arc::default(),
            trims: Arc::default(),
            dialled: Arc::default(),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This node's TLS identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The transport settings in force.
    pub fn transport(&self) -> &TransportConfig {
        &self.transport
    }

    /// The underlying quinn endpoint (migration, statistics).
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Counters of incoming handshakes by result, for `meshnode_handshakes_total{result}`.
    pub fn handshake_stats(&self) -> &HandshakeStats {
        &self.handshakes
    }

    /// Handshakes admitted and not yet finished.
    pub fn handshakes_in_progress(&self) -> u32 {
        self.admission.in_progress()
    }

    /// Established inbound peer connections, counted against `max_peer_connections`.
    pub fn inbound_connections(&self) -> u32 {
        self.admission.connections()
    }

    /// Times free memory was returned to the OS after peer connections closed.
    pub fn memory_trims(&self) -> u64 {
        self.trims.trims()
    }

    /// The next admitted connection attempt; `None` once the endpoint is closed. Attempts over
    /// the handshake bounds are answered (Retry, refusal) or dropped here and counted in
    /// [`MeshEndpoint::handshake_stats`], without ever starting a handshake.
    pub async fn accept(&self) -> Option<Handshake> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let now = Instant::now();
            let remote = incoming.remote_address();
            let validated = incoming.remote_address_validated();
            let (decision, permit) = self.admission.decide(now, remote.ip(), validated);
            let result = match (decision, permit) {
                (Decision::Accept, Some(permit)) => return Some(Handshake { incoming, permit }),
                (Decision::Retry, _) => match incoming.retry() {
                    Ok(()) => HandshakeResult::Retry,
                    // Only an already validated attempt cannot be retried, and those are
                    // never sent to Retry; refuse rather than loop.
                    Err(e) => {
                        e.into_incoming().refuse();
                        HandshakeResult::Refused
                    }
                },
                (Decision::Ignore, _) => {
                    incoming.ignore();
                    HandshakeResult::Ignored
                }
                (Decision::Full, _) => {
                    incoming.refuse();
                    HandshakeResult::AtCapacity
                }
                (Decision::Refuse | Decision::Accept, _) => {
                    incoming.refuse();
                    HandshakeResult::Refused
                }
            };
            self.handshakes.record(result);
            if result != HandshakeResult::Retry {
                if let Some(suppressed) = self.refusal_log.allow(now) {
                    tracing::info!(
                        %remote,
                        result = result.as_str(),
                        suppressed,
                        in_progress = self.admission.in_progress(),
                        "handshake not admitted (over the handshake bounds)"
                    );
                }
            }
        }
    }

    /// Completes an admitted handshake and names the caller from its certificate. Counts the
    /// outcome; failures are logged here at a bounded rate, so callers need not log each one.
    pub async fn accept_connection(
        &self,
        handshake: Handshake,
    ) -> Result<InboundConnection, AcceptError> {
        let Handshake { incoming, permit } = handshake;
        let result = self.complete(incoming).await;
        match &result {
            Ok(inbound) => {
                self.handshakes.record(HandshakeResult::Accepted);
                self.hold_until_closed(permit.into_connection(), inbound.conn.clone());
            }
            Err(e) => {
                drop(permit);
                self.handshakes.record(HandshakeResult::Failed);
                if let Some(suppressed) = self.refusal_log.allow(Instant::now()) {
                    tracing::info!(reason = %e, suppressed, "inbound handshake failed");
                }
                self.maybe_trim();
            }
        }
        result
    }

    /// Keeps `slot` (the connection's place under `max_peer_connections`) until `conn` closes,
    /// for whatever reason: the peer's close, the idle timeout, or the endpoint's close. The
    /// connection was established, so its closing always comes.
    fn hold_until_closed(&self, slot: ConnectionSlot, conn: quinn::Connection) {
        let ep = self.clone();
        when_closed(conn, move || {
            drop(slot);
            ep.maybe_trim();
        });
    }

    /// Returns free memory to the OS once most peer connections of a wave have gone
    /// ([`crate::memory`]).
    fn maybe_trim(&self) {
        if let Some(at) = self.admission.trim_due(Instant::now()) {
            memory::trim_after_drain(
                self.endpoint.clone(),
                self.admission.clone(),
                self.dialled.clone(),
                self.trims.clone(),
                at,
            );
        }
    }

    async fn complete(&self, incoming: quinn::Incoming) -> Result<InboundConnection, AcceptError> {
        let remote = incoming.remote_address();
        let conn = tokio::time::timeout(self.transport.connect_timeout, incoming)
            .await
            .map_err(|_| AcceptError::Timeout { remote })?
            .map_err(|source| AcceptError::Handshake { remote, source })?;
        let alpn = negotiated_alpn(&conn).ok_or(AcceptError::UnknownAlpn { remote })?;
        let peer = crate::tls::peer_node_name(&conn, self.identity.trust_domain())
            .ok_or(AcceptError::NoIdentity { remote })?;
        Ok(InboundConnection { conn, peer, alpn })
    }

    /// Dials `peer` at `addr` and checks that the certificate presented names `peer`.
    pub async fn connect(
        &self,
        peer: &str,
        addr: SocketAddr,
        alpn: Alpn,
    ) -> Result<quinn::Connection, ConnectError> {
        self.connect_within(peer, addr, alpn, self.transport.connect_timeout)
            .await
    }

    /// [`MeshEndpoint::connect`] with its own handshake timeout instead of the configured one.
    pub async fn connect_within(
        &self,
        peer: &str,
        addr: SocketAddr,
        alpn: Alpn,
        timeout: Duration,
    ) -> Result<quinn::Connection, ConnectError> {
        let cfg = match alpn {
            Alpn::Meshnode => self.client_meshnode.clone(),
            Alpn::H3 => self.client_h3.clone(),
        };
        let connecting =
            self.endpoint
                .connect_with(cfg, addr, peer)
                .map_err(|e| ConnectError::Start {
                    addr,
                    reason: e.to_string(),
                })?;
        let dialled = Dialled::new(&self.dialled);
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => {
                when_closed(conn.clone(), move || drop(dialled));
                Ok(conn)
            }
            Ok(Err(e)) => Err(ConnectError::Handshake {
                peer: peer.to_string(),
                addr,
                reason: e.to_string(),
            }),
            Err(_) => Err(ConnectError::Timeout {
                peer: peer.to_string(),
                addr,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Moves every connection of this endpoint to a new UDP socket bound to `addr`
    /// (connection migration after a local address change).
    pub fn rebind(&self, addr: SocketAddr) -> std::io::Result<()> {
        let socket = udp_socket(addr, self.transport.socket_buffer)?;
        self.endpoint.rebind(socket)
    }

    /// Closes every connection with `code` and stops accepting.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.endpoint.close(quinn::VarInt::from_u32(code), reason);
    }

    /// Waits until every connection has been closed and its close acknowledged or timed out.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// Runs `then` once `conn` has closed (the peer's close, the idle timeout, or the endpoint's),
/// on a task of its own; `conn`'s handle is let go first.
fn when_closed(conn: quinn::Connection, then: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        conn.closed().await;
        drop(conn);
        then();
    });
}

/// The ALPN negotiated on an established connection.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Alpn> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    Alpn::from_bytes(data.protocol.as_deref()?)
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Larger buffers absorb bursts; the kernel caps them at net.core.*mem_max, which is fine.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
