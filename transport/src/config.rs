//! Transport tuning for a data centre rather than the public internet.
//!
//! quinn's defaults are chosen for the internet (30 s idle timeout, no keep-alive, 333 ms
//! initial RTT, 100 concurrent streams, 1.25 MB stream window). Between mesh nodes a path is
//! usually sub-millisecond and a dead peer must be noticed within about a second, so every
//! default below is a deliberate choice with its reason next to it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Keep-alive cadence. Four keep-alives fit in one idle timeout, so a single lost one does not
/// trip the idle timer, and a silent peer is found within [`DEFAULT_IDLE_TIMEOUT`].
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(250);
/// Idle timeout: the longest a silent peer can go unnoticed, about one second (docs/behaviour.md,
/// "Dead, restarted and recovered peers").
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Initial RTT estimate before the first sample. 333 ms (RFC 9002) would make the first
/// loss-recovery timers absurdly slow on a LAN; 10 ms still covers cross-zone links.
pub const DEFAULT_INITIAL_RTT: Duration = Duration::from_millis(10);
/// Most concurrent bidirectional streams a peer may open on one connection: one per TCP tunnel
/// between two nodes, so far above quinn's 100. 4,096 capped a node pair at 4,096 open tunnels
/// (measured with `IDLE_TUNNELS=10000 bench/run.sh`). The credit is not granted up front:
/// quinn-proto pre-allocates a slot for every stream the peer may open (an idle connection cost
/// 5.3 MiB at 65,536), so a connection starts at [`DEFAULT_INITIAL_STREAMS`] and
/// [`crate::stream_limit::StreamLimit`] raises it towards this bound as tunnels open.
pub const DEFAULT_MAX_STREAMS: u32 = 65_536;
/// Concurrent bidirectional streams a peer may open on a new connection, before any growth.
/// quinn-proto pre-allocates per allowed stream. Measured with `transport/tests/idle_memory.rs`
/// (600 idle connections, server RSS): 53-63 KiB per idle connection at 256, against 5.3 MiB at
/// 65,536. 256 covers a burst of 192 tunnels before the first MAX_STREAMS round trip.
pub const DEFAULT_INITIAL_STREAMS: u32 = 256;
/// Handshakes in progress (admitted, not yet finished) from which a client whose address is not
/// yet validated is sent a QUIC Retry first. Retry costs one small packet and no state; a
/// forged source never answers it. 32 is far above what a healthy mesh needs at once (a peer
/// restarting dials each of its peers twice, spread over its dial back-off) and low enough that a
/// flood turns into Retries within a few milliseconds.
pub const DEFAULT_HANDSHAKE_RETRY_THRESHOLD: u32 = 32;
/// Most handshakes in progress at once, in total. Each costs a connection's state and its share
/// of TLS work; past this, new attempts are refused (address validated) or ignored (not).
pub const DEFAULT_MAX_HANDSHAKES: u32 = 256;
/// Most handshakes in progress at once from one source (IPv4 address, IPv6 /64): a node has at
/// most one connection per ALPN to another, plus a redial; 16 leaves room for several nodes on
/// one host (tests and benches run many on 127.0.0.1).
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 16;
/// New handshakes admitted per second, in total (the burst allowance is the same number). Each
/// admitted handshake costs the node a connection's setup, a key exchange, a signature and a
/// client certificate check, on the same cores as every established tunnel. Measured with
/// `transport/tests/handshake_flood.rs` on 2 shared cores: at 400/s a flood of refused clients
/// raised an established ping-pong's p99 from 2.5 to 19 ms (B ran ~380 doomed handshakes a
/// second); 100/s still lets a 100-node mesh (two ALPNs each) reconnect to a restarted node in
/// about 2 s, and peers over the bound are refused at once and redial.
pub const DEFAULT_HANDSHAKE_RATE: u32 = 100;
/// Inbound peer connections a node holds at once (established ones plus handshakes in
/// progress). A connection can buffer up to its windows ([`TransportConfig::worst_case_buffer`]:
/// 128 MiB with the defaults, reached only by a peer whose streams' local targets stop reading
/// while it keeps sending), so this is the per-node bound on buffered bytes. 4,096 is two
/// connections (`meshnode/1` and `h3`) to each of 2,048 peers; an idle connection costs about
/// 56 KiB, so the idle cost at the cap is about 230 MiB.
pub const DEFAULT_MAX_PEER_CONNECTIONS: u32 = 4_096;
/// New handshakes admitted per second from one source (burst the same).
pub const DEFAULT_HANDSHAKE_RATE_PER_SOURCE: u32 = 20;
/// Per-stream receive window. It also bounds how much of one stream is in flight, and that
/// is the queue every other stream of the connection waits behind: the receiving node is
/// CPU-bound, its backlog sits in quinn's user-space queues (not the socket, so no loss) and the
/// peer's ACK delay hides it from the RTT estimate, so Cubic never backs off and a bulk stream
/// keeps a whole window queued. Measured (bench/RESULTS.md, "Small requests under a concurrent
/// bulk transfer"): small-request p50 beside one bulk went 7.7 → 2.1 ms (veth) and 16.5 → 5.8 ms
/// (relay) when this went from 16 MiB to 1 MiB, and single-stream bulk did not drop (4.2–4.3
/// against 2.9–3.8 Gbit/s). BBR and smaller socket buffers helped less. 1 MiB still carries
/// 4 Gbit/s (one node's ceiling) per stream at 2 ms RTT; `[transport] stream_window` raises it.
pub const DEFAULT_STREAM_WINDOW: u32 = 1 << 20;
/// Connection receive window: several bulk streams at full speed.
pub const DEFAULT_CONN_WINDOW: u32 = 64 << 20;
/// UDP socket buffers. With the kernel defaults ~1 % loss was seen on loopback under load.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 << 20;
/// Bytes a connection may hold unacknowledged (sent or waiting to be sent) before stream writes
/// wait; the same as the connection receive window, so one bulk stream can fill it.
pub const DEFAULT_SEND_WINDOW: u64 = DEFAULT_CONN_WINDOW as u64;
/// Congestion controller. BBR (quinn's, experimental) did not shorten the queue behind a bulk
/// stream (p50 8.3 ms against Cubic's 8.1 ms), so quinn's default stays.
pub const DEFAULT_CONGESTION: Congestion = Congestion::Cubic;
/// Largest UDP payload MTU discovery (PLPMTUD, RFC 8899) probes for; the node also accepts
/// datagrams this large (`max_udp_payload_size`, at least quinn's 1472). Kept at quinn's 1452
/// (a 1500-byte Ethernet path) because raising it to 8952 (jumbo frames) was measured worse:
/// on loopback (64 KiB MTU, where discovery does climb) single-stream bulk fell to 0.69–0.90×
/// in 4 A/B runs, node A's connection declared 135 packets lost against 0, and about twice the
/// bytes crossed the socket for the same transfer; across a 1500-byte veth it changed nothing
/// (4.48 against 4.40 Gbit/s, p50 173 against 180 µs), as expected. bench/RESULTS.md,
/// "Throughput and CPU: what each change bought". Re-measure on real jumbo-frame hosts.
pub const DEFAULT_MTU_UPPER_BOUND: u16 = QUINN_MTU_UPPER_BOUND;
/// Longest time a peer may hold back an acknowledgement, requested with the ACK frequency
/// extension (draft-ietf-quic-ack-frequency, which quinn speaks on both ends; a peer without it
/// keeps its own). `None` leaves RFC 9000's 25 ms. Every loss-recovery timer adds this delay
/// (PTO = smoothed RTT + 4 × RTT variance + max_ack_delay), and a request that fits one packet is
/// recovered by that timer alone when the packet is lost: on a sub-millisecond LAN, 25 ms is
/// 90 % of it. Measured at 1 % loss across a veth pair, small requests beside a bulk transfer
/// (bench/RESULTS.md, "Run 7"): p99 27.1 ms with 25 ms, 7.8 with 5 ms, 4.5 with 2 ms, 4.5 with
/// 1 ms. The cost is an ACK-only packet where an answer used to carry the acknowledgement: none
/// at 1,000 requests/s per connection (system calls per request unchanged), one per request at
/// 100/s. 2 ms keeps nearly all of 1 ms's gain and needs half the request rate to piggyback.
pub const DEFAULT_MAX_ACK_DELAY: Option<Duration> = Some(Duration::from_millis(2));
/// The smallest `max_ack_delay` a quinn peer accepts (its timer granularity).
pub const MIN_MAX_ACK_DELAY: Duration = Duration::from_millis(1);
/// How long a dial may take before the peer counts as unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);

/// quinn's own MTU discovery upper bound (1500-byte Ethernet minus IPv6 and UDP headers).
const QUINN_MTU_UPPER_BOUND: u16 = 1452;
/// quinn's default `max_udp_payload_size` (1500 minus IPv4 and UDP headers).
const QUINN_MAX_UDP_PAYLOAD: u16 = 1472;

/// The congestion controller of every connection of an endpoint (`[transport] congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based: quinn's default.
    Cubic,
    /// BBR (quinn's experimental implementation), model-based: paces to the measured bottleneck
    /// bandwidth and keeps about one bandwidth-delay product in flight.
    Bbr,
    /// NewReno (RFC 9002), loss-based.
    NewReno,
}

impl Congestion {
    /// The names accepted by [`FromStr`], for error messages.
    pub const NAMES: &'static str = "\"cubic\", \"bbr\" or \"newreno\"";

    /// The config name of this controller.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        }
    }

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync + 'static> {
        match self {
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown congestion controller name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCongestion(pub String);

impl fmt::Display for UnknownCongestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown congestion controller {:?}: expected {}",
            self.0,
            Congestion::NAMES
        )
    }
}

impl std::error::Error for UnknownCongestion {}

impl FromStr for Congestion {
    type Err = UnknownCongestion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" => Ok(Congestion::NewReno),
            other => Err(UnknownCongestion(other.to_owned())),
        }
    }
}

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
    /// Unacknowledged bytes a connection may hold before stream writes wait.
    pub send_window: u64,
    /// Congestion controller of every connection.
    pub congestion: Congestion,
    /// Deadline for establishing a connection to a peer.
    pub connect_timeout: Duration,
    /// Upper bound of MTU discovery and the largest UDP payload accepted, in bytes.
    pub mtu_upper_bound: u16,
    /// Longest acknowledgement delay requested of peers; `None`: the peer's own (25 ms).
    pub max_ack_delay: Option<Duration>,
    /// Concurrent bidirectional streams a peer may open on a new connection; grown on demand up
    /// to [`TransportConfig::max_concurrent_streams`] by [`crate::stream_limit::StreamLimit`].
    pub initial_concurrent_streams: u32,
    /// Handshakes in progress from which unvalidated clients are sent a Retry first.
    pub handshake_retry_threshold: u32,
    /// Most handshakes in progress at once, in total.
    pub max_handshakes: u32,
    /// Most handshakes in progress at once from one source address.
    pub max_handshakes_per_source: u32,
    /// New handshakes admitted per second, in total.
    pub handshake_rate: u32,
    /// New handshakes admitted per second from one source address.
    pub handshake_rate_per_source: u32,
    /// Inbound peer connections held at once, handshakes in progress included.
    pub max_peer_connections: u32,
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
            send_window: DEFAULT_SEND_WINDOW,
            congestion: DEFAULT_CONGESTION,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            mtu_upper_bound: DEFAULT_MTU_UPPER_BOUND,
            max_ack_delay: DEFAULT_MAX_ACK_DELAY,
            initial_concurrent_streams: DEFAULT_INITIAL_STREAMS,
            handshake_retry_threshold: DEFAULT_HANDSHAKE_RETRY_THRESHOLD,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            handshake_rate: DEFAULT_HANDSHAKE_RATE,
            handshake_rate_per_source: DEFAULT_HANDSHAKE_RATE_PER_SOURCE,
            max_peer_connections: DEFAULT_MAX_PEER_CONNECTIONS,
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
        // The starting credit only: quinn-proto allocates a slot per stream the peer may open.
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.initial_streams()));
        // Nothing of ours uses unidirectional streams except h3's control streams.
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_window));
        t.receive_window(quinn::VarInt::from_u32(self.connection_window));
        t.send_window(self.send_window);
        // Streams of equal priority share the connection round-robin (quinn's default, stated
        // here because the node cannot tell bulk tunnels from interactive ones).
        t.send_fairness(true);
        t.congestion_controller_factory(self.congestion.factory());
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(self.mtu_upper_bound.max(QUINN_MTU_UPPER_BOUND));
        t.mtu_discovery_config(Some(mtud));
        if let Some(delay) = self.max_ack_delay {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.max_ack_delay(Some(delay.max(MIN_MAX_ACK_DELAY)));
            t.ack_frequency_config(Some(ack));
        }
        Arc::new(t)
    }

    /// The bidirectional stream credit a new connection starts with: the initial value, never
    /// above the maximum, never zero.
    pub fn initial_streams(&self) -> u32 {
        self.initial_concurrent_streams
            .min(self.max_concurrent_streams)
            .max(1)
    }

    /// The most stream data one connection can buffer: what the peer may send before the node
    /// reads it (the connection receive window, which caps the sum of the per-stream windows)
    /// plus what the node may hold unacknowledged or unsent towards the peer (the send window).
    pub fn worst_case_buffer(&self) -> u64 {
        u64::from(self.connection_window).saturating_add(self.send_window)
    }

    /// The `max_udp_payload_size` to advertise: at least quinn's default, so that a peer's
    /// discovery can reach [`TransportConfig::mtu_upper_bound`].
    pub fn max_udp_payload_size(&self) -> u16 {
        self.mtu_upper_bound.max(QUINN_MAX_UDP_PAYLOAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_names_round_trip() {
        for c in [Congestion::Cubic, Congestion::Bbr, Congestion::NewReno] {
            assert_eq!(c.name().parse::<Congestion>(), Ok(c));
            assert_eq!(c.to_string(), c.name());
        }
        let e = "reno".parse::<Congestion>().expect_err("unknown name");
        assert!(e.to_string().contains("\"reno\""), "{e}");
        assert!(e.to_string().contains("bbr"), "{e}");
    }

    #[test]
    fn every_controller_builds_a_quinn_config() {
        for c in [Congestion::Cubic, Congestion::Bbr, Congestion::NewReno] {
            let t = TransportConfig {
                congestion: c,
                ..TransportConfig::default()
            };
            let _ = t.to_quinn();
        }
    }
}
