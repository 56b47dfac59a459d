//! A fault-injecting UDP relay: one-way delay, jitter, loss, blackhole and NAT rebinding.
//!
//! The relay listens on one UDP address and forwards every datagram it receives there to a
//! fixed upstream address. Like a NAT, it gives each downstream source address its own upstream
//! socket, so the upstream side sees a stable source port per client until [`RelayHandle::rebind`]
//! moves every client to a fresh port. Replies arriving on an upstream socket are sent back to
//! the client from the listening socket.
//!
//! Faults are applied per direction ([`Direction::Up`] is client → upstream) by one scheduler task
//! per direction that keeps a timer queue (a binary heap of `(due, seq, packet)`), so a long delay
//! never holds back other packets and throughput is not limited by the delay. Without jitter,
//! packets leave in the order they arrived; with jitter, reordering follows the drawn delays.

pub mod control;

mod engine;

use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use engine::Shared;

/// Which way a packet travels through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client (the listening side) towards the upstream address.
    Up,
    /// From the upstream address back towards a client.
    Down,
}

impl Direction {
    /// Both directions, in `[Up, Down]` order.
    pub const BOTH: [Direction; 2] = [Direction::Up, Direction::Down];

    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// Counters of what the relay did since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RelayStats {
    /// Datagrams sent upstream (client → upstream).
    pub forwarded_up: u64,
    /// Datagrams sent back to clients (upstream → client).
    pub forwarded_down: u64,
    /// Datagrams dropped by loss, blackhole, a full delay queue or a failed send.
    pub dropped: u64,
    /// Number of [`RelayHandle::rebind`] calls.
    pub rebinds: u64,
}

/// The fault settings of one direction, as currently configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct DirectionSettings {
    /// One-way delay added to every datagram (JSON: `delay_us`, whole microseconds).
    #[serde(rename = "delay_us", serialize_with = "micros")]
    pub delay: Duration,
    /// Uniform jitter: each datagram's delay is drawn from `delay ± jitter` (never below zero).
    /// JSON: `jitter_us`.
    #[serde(rename = "jitter_us", serialize_with = "micros")]
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss: f64,
}

/// The relay's complete fault settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct RelaySettings {
    /// Client → upstream.
    pub up: DirectionSettings,
    /// Upstream → client.
    pub down: DirectionSettings,
    /// Whether every datagram, both ways, is being dropped.
    pub blackhole: bool,
}

/// Entry point: starts relays.
pub struct Relay;

impl Relay {
    /// Binds `listen` and starts forwarding to `upstream`, with no faults configured.
    ///
    /// Must be called from within a Tokio runtime (the relay's tasks are spawned on it); returns
    /// an error otherwise. The returned handle can be used from any thread.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<RelayHandle> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("Relay::start needs a Tokio runtime: {e}")))?;
        let socket = engine::bind_udp(listen)?;
        let local_addr = socket.local_addr()?;
        let shared = Shared::start(runtime, socket, upstream)?;
        Ok(RelayHandle { shared, local_addr })
    }

    /// Like [`Relay::start`] but takes an already bound socket (e.g. to hold a port).
    pub fn start_with_socket(
        socket: StdUdpSocket,
        upstream: SocketAddr,
    ) -> io::Result<RelayHandle> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("Relay::start needs a Tokio runtime: {e}")))?;
        let local_addr = socket.local_addr()?;
        let shared = Shared::start(runtime, socket, upstream)?;
        Ok(RelayHandle { shared, local_addr })
    }
}

/// A cheap, cloneable, thread-safe handle to a running relay.
///
/// Settings take effect for datagrams received after the call (a delay change does not move
/// datagrams already queued). Blackhole also drops datagrams already queued when they fall due.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

impl RelayHandle {
    /// The address clients send to (the address the far node advertises).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The upstream address datagrams are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Sets the one-way delay of both directions.
    pub fn set_delay(&self, delay: Duration) {
        for dir in Direction::BOTH {
            self.set_delay_in(dir, delay);
        }
    }

    /// Sets the one-way delay of one direction.
    pub fn set_delay_in(&self, dir: Direction, delay: Duration) {
        self.shared.faults[dir.index()]
            .delay_ns
            .store(duration_ns(delay), Ordering::Relaxed);
    }

    /// Sets the uniform jitter (`delay ± jitter`) of both directions.
    pub fn set_jitter(&self, jitter: Duration) {
        for dir in Direction::BOTH {
            self.set_jitter_in(dir, jitter);
        }
    }

    /// Sets the uniform jitter of one direction.
    pub fn set_jitter_in(&self, dir: Direction, jitter: Duration) {
        self.shared.faults[dir.index()]
            .jitter_ns
            .store(duration_ns(jitter), Ordering::Relaxed);
    }

    /// Sets the loss probability of both directions; clamped to `[0, 1]`, NaN counts as 0.
    pub fn set_loss(&self, loss: f64) {
        for dir in Direction::BOTH {
            self.set_loss_in(dir, loss);
        }
    }

    /// Sets the loss probability of one direction; clamped to `[0, 1]`, NaN counts as 0.
    pub fn set_loss_in(&self, dir: Direction, loss: f64) {
        let loss = if loss.is_nan() {
            0.0
        } else {
            loss.clamp(0.0, 1.0)
        };
        self.shared.faults[dir.index()]
            .loss_bits
            .store(loss.to_bits(), Ordering::Relaxed);
    }

    /// Drops every datagram both ways while `on` (including datagrams already delayed).
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }

    /// Moves every client's upstream socket to a new source port, as a NAT rebinding would.
    ///
    /// Replies sent by the upstream side to the old port are lost from then on; the new socket
    /// is bound before the old one is closed, so the port always changes.
    pub fn rebind(&self) -> io::Result<()> {
        self.shared.rebind()
    }

    /// The counters so far.
    pub fn stats(&self) -> RelayStats {
        self.shared.stats()
    }

    /// The current fault settings.
    pub fn settings(&self) -> RelaySettings {
        let dir = |d: Direction| {
            let f = &self.shared.faults[d.index()];
            DirectionSettings {
                delay: Duration::from_nanos(f.delay_ns.load(Ordering::Relaxed)),
                jitter: Duration::from_nanos(f.jitter_ns.load(Ordering::Relaxed)),
                loss: f64::from_bits(f.loss_bits.load(Ordering::Relaxed)),
            }
        };
        RelaySettings {
            up: dir(Direction::Up),
            down: dir(Direction::Down),
            blackhole: self.shared.blackhole.load(Ordering::Relaxed),
        }
    }

    /// Stops all of the relay's tasks and closes its sockets. Idempotent.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
