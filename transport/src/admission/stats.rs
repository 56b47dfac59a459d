//! Handshake counters, for the node's `meshnode_handshakes_total{result}`.

use std::sync::atomic::{AtomicU64, Ordering};

/// How one incoming connection attempt ended. Every attempt the endpoint decides about is
/// counted exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeResult {
    /// Admitted, and the handshake completed with a mesh identity.
    Accepted,
    /// Answered with a QUIC Retry (address validation); a real client comes back as a new,
    /// validated attempt.
    Retry,
    /// Answered CONNECTION_REFUSED (over a bound, address validated).
    Refused,
    /// Dropped without an answer (over a bound, address not validated).
    Ignored,
    /// Admitted, but the handshake failed: TLS refusal (no or foreign certificate), timeout,
    /// unknown ALPN, no mesh identity.
    Failed,
    /// Answered CONNECTION_REFUSED because the node holds its most peer connections
    /// (`[transport] max_peer_connections`).
    AtCapacity,
}

impl HandshakeResult {
    /// Every result, in a stable order.
    pub const ALL: [HandshakeResult; 6] = [
        HandshakeResult::Accepted,
        HandshakeResult::Retry,
        HandshakeResult::Refused,
        HandshakeResult::Ignored,
        HandshakeResult::Failed,
        HandshakeResult::AtCapacity,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Accepted => "accepted",
            HandshakeResult::Retry => "retry",
            HandshakeResult::Refused => "refused",
            HandshakeResult::Ignored => "ignored",
            HandshakeResult::Failed => "failed",
            HandshakeResult::AtCapacity => "at_capacity",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one endpoint's incoming handshakes, updated without locks.
#[derive(Debug, Default)]
pub struct HandshakeStats {
    counts: [AtomicU64; HandshakeResult::ALL.len()],
}

impl HandshakeStats {
    /// Counts one attempt ending with `result`.
    pub fn record(&self, result: HandshakeResult) {
        self.counts[result.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Attempts that ended with `result` so far.
    pub fn get(&self, result: HandshakeResult) -> u64 {
        self.counts[result.index()].load(Ordering::Relaxed)
    }

    /// Every result with its count, in [`HandshakeResult::ALL`] order.
    pub fn snapshot(&self) -> [(HandshakeResult, u64); HandshakeResult::ALL.len()] {
        HandshakeResult::ALL.map(|r| (r, self.get(r)))
    }
}
