//! Handshake admission: which incoming QUIC connection attempts get a handshake, a Retry, a
//! refusal or nothing, so that a flood of handshakes never starves established connections.
//!
//! A pure decision on an injected clock ([`Admission::decide`]); the endpoint applies it to
//! quinn's `Incoming` in [`crate::endpoint::MeshEndpoint::accept`]. The rules, in order:
//! 1. Under load (handshakes in progress ≥ the retry threshold) a client whose address is not
//!    validated gets a QUIC Retry (stateless, one small packet; a forged source never comes
//!    back), within a total Retry budget per second; past the budget it is ignored.
//! 2. Otherwise the source's own bounds (handshakes in progress, a token bucket per second) and
//!    the total ones must all allow it; the attempt is then admitted and holds a
//!    [`HandshakePermit`] until its handshake ends.
//! 3. A refused attempt gets CONNECTION_REFUSED if its address is validated (a real client: it
//!    stops at once instead of retransmitting), and nothing at all if not (no reflection).
//! 4. Peer connections held (established, plus handshakes in progress) are capped per node
//!    ([`Limits::max_connections`]): each can buffer up to its flow-control windows, so the cap
//!    bounds the node's buffered bytes. At the cap a validated attempt is refused
//!    ([`Decision::Full`]); an unvalidated one is first sent a Retry (within the Retry budget) so
//!    that a real client gets its refusal without the node answering forged sources.
//!
//! Admission also tracks the peak of connections held, for [`Admission::trim_due`]: when most of
//! them have gone, the endpoint asks the allocator to return the memory they used.

mod bucket;
mod log;
mod stats;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use bucket::TokenBucket;
pub use log::RateLimitedLog;
pub use stats::{HandshakeResult, HandshakeStats};

use crate::config::TransportConfig;

/// Retries sent per second, in total, as a multiple of the handshake rate: a Retry costs a few
/// microseconds, a handshake a few hundred, so the endpoint can afford many more of them, but
/// not an unbounded number under a flood of forged Initials.
pub const RETRY_RATE_FACTOR: u32 = 8;
/// Sources tracked at once. A source's entry is dropped once it holds no handshake and its bucket
/// is full again; past this many, a new unvalidated source is ignored and a validated one is
/// held to the total bounds only. About 64 bytes each: 1 MiB at most.
pub const MAX_TRACKED_SOURCES: usize = 16_384;

/// Least time between two sweeps of the source table, so that a full table of busy sources
/// costs one sweep per interval, not one per attempt.
pub const PRUNE_INTERVAL: Duration = Duration::from_millis(100);

/// Peak of peer connections held below which closing them never triggers a memory trim: a few
/// dozen idle connections are a few MiB, not worth a walk of the allocator's free lists.
pub const TRIM_MIN_PEAK: u32 = 64;
/// Least time between two memory trims. A trim walks every free chunk of the allocator (a few
/// milliseconds for a heap of hundreds of MiB, on a blocking thread), so connections that come
/// and go in waves cost at most one per interval.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// What to do with one incoming connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the handshake.
    Accept,
    /// Ask the client to prove its address first (QUIC Retry).
    Retry,
    /// Answer CONNECTION_REFUSED.
    Refuse,
    /// Drop the attempt without answering.
    Ignore,
    /// Answer CONNECTION_REFUSED: the node holds [`Limits::max_connections`] peer connections.
    Full,
}

/// The bounds of [`Admission`], from [`TransportConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes in progress from which unvalidated clients get a Retry.
    pub retry_threshold: u32,
    /// Handshakes in progress at once, in total.
    pub max_total: u32,
    /// Handshakes in progress at once from one source.
    pub max_per_source: u32,
    /// Handshakes admitted per second, in total.
    pub rate: u32,
    /// Handshakes admitted per second from one source.
    pub rate_per_source: u32,
    /// Inbound peer connections held at once (handshakes in progress included).
    pub max_connections: u32,
}

impl Limits {
    /// The bounds configured in `t`.
    pub fn from_config(t: &TransportConfig) -> Limits {
        Limits {
            retry_threshold: t.handshake_retry_threshold,
            max_total: t.max_handshakes,
            max_per_source: t.max_handshakes_per_source,
            rate: t.handshake_rate,
            rate_per_source: t.handshake_rate_per_source,
            max_connections: t.max_peer_connections,
        }
    }
}

/// The key a source is limited by: its IPv4 address, or the /64 prefix of its IPv6 address
/// (one host commonly owns a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

struct Source {
    in_progress: u32,
    bucket: TokenBucket,
}

struct State {
    limits: Limits,
    in_progress: u32,
    total: TokenBucket,
    retries: TokenBucket,
    sources: HashMap<IpAddr, Source>,
    last_prune: Instant,
    /// Established inbound connections (each holds a [`ConnectionSlot`]).
    connections: u32,
    /// Most connections held (`in_progress + connections`) since the last trim.
    peak: u32,
    last_trim: Option<Instant>,
    trim_pending: bool,
}

impl State {
    fn held(&self) -> u32 {
        self.in_progress.saturating_add(self.connections)
    }
}

/// Admission state of one endpoint. Cheap to clone (shared).
#[derive(Clone)]
pub struct Admission {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("in_progress", &self.in_progress())
            .finish_non_exhaustive()
    }
}

/// One admitted handshake; dropping it ends the handshake's claim on the bounds.
#[derive(Debug)]
pub struct HandshakePermit {
    admission: Admission,
    source: Option<IpAddr>,
    /// Already turned into a [`ConnectionSlot`].
    converted: bool,
}

impl HandshakePermit {
    /// The handshake succeeded: its place among the handshakes in progress becomes a connection
    /// held, in one step (the count of connections held never dips in between).
    pub fn into_connection(mut self) -> ConnectionSlot {
        let admission = self.admission.clone();
        let mut st = admission.lock();
        Self::end_handshake(&mut st, self.source);
        st.connections = st.connections.saturating_add(1);
        drop(st);
        self.converted = true;
        ConnectionSlot { admission }
    }

    fn end_handshake(st: &mut State, source: Option<IpAddr>) {
        st.in_progress = st.in_progress.saturating_sub(1);
        if let Some(src) = source {
            if let Some(s) = st.sources.get_mut(&src) {
                s.in_progress = s.in_progress.saturating_sub(1);
            }
        }
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        if !self.converted {
            Self::end_handshake(&mut self.admission.lock(), self.source);
        }
    }
}

/// One established inbound connection's place under [`Limits::max_connections`]; held until the
/// connection closes.
#[derive(Debug)]
pub struct ConnectionSlot {
    admission: Admission,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut st = self.admission.lock();
        st.connections = st.connections.saturating_sub(1);
    }
}

fn per_second(rate: u32) -> TokenBucket {
    TokenBucket::new(rate, rate, Duration::from_secs(1))
}

impl Admission {
    /// Admission with `limits`, every bucket full at `now`.
    pub fn new(limits: Limits, now: Instant) -> Admission {
        let state = State {
            limits,
            in_progress: 0,
            total: per_second(limits.rate).full_at(now),
            retries: per_second(limits.rate.saturating_mul(RETRY_RATE_FACTOR)).full_at(now),
            sources: HashMap::new(),
            last_prune: now,
            connections: 0,
            peak: 0,
            last_trim: None,
            trim_pending: false,
        };
        Admission {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Short critical sections of plain arithmetic: a panic cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handshakes admitted and not yet finished.
    pub fn in_progress(&self) -> u32 {
        self.lock().in_progress
    }

    /// Established inbound connections held.
    pub fn connections(&self) -> u32 {
        self.lock().connections
    }

    /// Inbound connections held: handshakes in progress and established connections.
    pub fn held(&self) -> u32 {
        self.lock().held()
    }

    /// When the allocator should be asked to return free memory, if it should: the connections
    /// held fell to half their peak or less, that peak was at least [`TRIM_MIN_PEAK`], and no
    /// trim is pending. The time is now, or [`TRIM_INTERVAL`] after the last trim if that is
    /// later (a wave that ends soon after the last trim is trimmed too, later). A `Some` makes
    /// the trim pending until [`Admission::trim_done`].
    pub fn trim_due(&self, now: Instant) -> Option<Instant> {
        let mut st = self.lock();
        if st.trim_pending || st.peak < TRIM_MIN_PEAK || st.held() > st.peak / 2 {
            return None;
        }
        st.trim_pending = true;
        Some(st.last_trim.map_or(now, |t| (t + TRIM_INTERVAL).max(now)))
    }

    /// The pending trim ran at `now`: the next peak starts from the connections held now, so
    /// the rest of a wave that is still closing does not trigger another.
    pub fn trim_done(&self, now: Instant) {
        let mut st = self.lock();
        st.trim_pending = false;
        st.last_trim = Some(now);
        st.peak = st.held();
    }

    /// Sources currently tracked.
    pub fn tracked_sources(&self) -> usize {
        self.lock().sources.len()
    }

    /// Decides about an attempt from `ip` at `now`; `validated`: the client already proved its
    /// address (it answered a Retry). An [`Decision::Accept`] comes with its permit.
    pub fn decide(
        &self,
        now: Instant,
        ip: IpAddr,
        validated: bool,
    ) -> (Decision, Option<HandshakePermit>) {
        let reject = if validated {
            Decision::Refuse
        } else {
            Decision::Ignore
        };
        let mut st = self.lock();
        let limits = st.limits;
        if !validated && st.in_progress >= limits.retry_threshold {
            let d = if st.retries.take(now) {
                Decision::Retry
            } else {
                Decision::Ignore
            };
            return (d, None);
        }
        if st.held() >= limits.max_connections {
            // Refusing needs a validated address (no answers to forged sources); a Retry costs
            // one small packet and a real client comes back validated to hear its refusal.
            let d = if validated {
                Decision::Full
            } else if st.retries.take(now) {
                Decision::Retry
            } else {
                Decision::Ignore
            };
            return (d, None);
        }
        if st.in_progress >= limits.max_total {
            return (reject, None);
        }
        let key = source_key(ip);
        if !st.sources.contains_key(&key)
            && st.sources.len() >= MAX_TRACKED_SOURCES
            && now.saturating_duration_since(st.last_prune) >= PRUNE_INTERVAL
        {
            st.last_prune = now;
            st.sources
                .retain(|_, s| s.in_progress > 0 || !s.bucket.is_full(now));
        }
        let tracked = if st.sources.len() < MAX_TRACKED_SOURCES || st.sources.contains_key(&key) {
            let src = st.sources.entry(key).or_insert_with(|| Source {
                in_progress: 0,
                bucket: per_second(limits.rate_per_source).full_at(now),
            });
            if src.in_progress >= limits.max_per_source || !src.bucket.take(now) {
                return (reject, None);
            }
            true
        } else if validated {
            false
        } else {
            return (Decision::Ignore, None);
        };
        if !st.total.take(now) {
            // Give the source its token back: the attempt was not admitted.
            if let Some(s) = st.sources.get_mut(&key) {
                s.bucket.put_back();
            }
            return (reject, None);
        }
        st.in_progress += 1;
        st.peak = st.peak.max(st.held());
        if tracked {
            if let Some(s) = st.sources.get_mut(&key) {
                s.in_progress += 1;
            }
        }
        drop(st);
        let permit = HandshakePermit {
            admission: self.clone(),
            source: tracked.then_some(key),
            converted: false,
        };
        (Decision::Accept, Some(permit))
    }
}

#[cfg(test)]
mod tests;
