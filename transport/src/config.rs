//! Transport tuning for a data centre rather than the public internet.
//!
//! quinn's defaults are chosen for the internet (30 s idle timeout, no keep-alive, 333 ms
//! initial RTT, 100 concurrent streams, 1.25 MB stream window). Between mesh nodes a path is
//! usually sub-millisecond and a dead peer must be noticed within about a second, so every
//! default below is a deliberate choice with its reason next to it.

use std::sync::Arc;
use std::time::Duration;

/// Keep-alive cadence. Four keep-alives fit in one idle timeout, so a single lost one does not
/// trip the idle timer, and a silent peer is found within [`DEFAULT_IDLE_TIMEOUT`].
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(250);
/// Idle timeout: the longest a silent peer can go unnoticed (SPEC §8: "about one second").
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Initial RTT estimate before the first sample. 333 ms (RFC 9002) would make the first
/// loss-recovery timers absurdly slow on a LAN; 10 ms still covers cross-zone links.
pub const DEFAULT_INITIAL_RTT: Duration = Duration::from_millis(10);
/// Concurrent bidirectional streams per connection: one per TCP tunnel between two nodes, so
/// far above quinn's 100 (the 101st `open_bi` would otherwise wait). 4,096 capped a node pair
/// at 4,096 open tunnels (measured with `IDLE_TUNNELS=10000 bench/run.sh`); quinn allocates
/// stream state only for streams that exist, so the credit itself costs nothing.
pub const DEFAULT_MAX_STREAMS: u32 = 65_536;
/// Per-stream receive window. 16 MiB covers 10 Gbit/s at 12 ms RTT, well above a LAN's BDP.
pub const DEFAULT_STREAM_WINDOW: u32 = 16 << 20;
/// Connection receive window: several bulk streams at full speed.
pub const DEFAULT_CONN_WINDOW: u32 = 64 << 20;
/// UDP socket buffers. With the kernel defaults ~1 % loss was seen on loopback under load.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 << 20;
/// How long a dial may take before the peer counts as unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);

/// QUIC transport settings for one node's endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// Interval between keep-alive packets on idle connections.
    pub keep_alive: Duration,
    /// Connection idle timeout (both sides use the smaller of their two values).
    pub idle_timeout: Duration,
    /// RTT assumed before the first measurement.
    pub initial_rtt: Duration,
    /// Maximum concurrent bidirectional streams the peer may open.
    pub max_concurrent_streams: u32,
    /// Per-stream flow-control window in bytes.
    pub stream_window: u32,
    /// Per-connection flow-control window in bytes.
    pub connection_window: u32,
    /// Requested SO_RCVBUF and SO_SNDBUF of the UDP socket.
    pub socket_buffer: usize,
    /// Deadline for establishing a connection to a peer.
    pub connect_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            initial_rtt: DEFAULT_INITIAL_RTT,
            max_concurrent_streams: DEFAULT_MAX_STREAMS,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONN_WINDOW,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl TransportConfig {
    /// The quinn transport configuration these settings describe.
    pub fn to_quinn(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        // An idle timeout that does not fit QUIC's varint is impossible for sane configs;
        // fall back to quinn's default rather than failing.
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.idle_timeout) {
            t.max_idle_timeout(Some(idle));
        }
        t.initial_rtt(self.initial_rtt);
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_concurrent_streams));
        // Nothing of ours uses unidirectional streams except h3's control streams.
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_window));
        t.receive_window(quinn::VarInt::from_u32(self.connection_window));
        t.send_window(u64::from(self.connection_window));
        Arc::new(t)
    }
}
