//! The peer's stream credit on one connection, grown as tunnels open instead of granted up
//! front.
//!
//! quinn-proto allocates a slot for every stream the peer may open, as soon as the credit is
//! granted: at 65,536 streams an idle connection cost 5.3 MiB. A connection therefore starts at
//! [`TransportConfig::initial_streams`] and the accepting side calls [`StreamLimit::on_accept`]
//! for every stream it accepts: when the streams open reach [`GROW_AT_PERCENT`] of the credit,
//! the credit doubles (a MAX_STREAMS frame), up to [`TransportConfig::max_concurrent_streams`].
//! When the last stream closes the credit goes back to the initial value for the future; quinn
//! keeps the slots it already granted, so this bounds later growth rather than freeing memory.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::TransportConfig;

/// Share of the credit in use at which it is doubled. A peer opening streams faster than one
/// round trip per quarter of the credit waits for MAX_STREAMS; at 256 streams and a LAN round
/// trip that is 64 tunnels per ~0.1 ms, far above what the node can splice.
pub const GROW_AT_PERCENT: u32 = 75;

#[derive(Debug)]
struct State {
    open: u32,
    limit: u32,
    initial: u32,
    max: u32,
}

/// The stream credit of one connection. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct StreamLimit {
    conn: quinn::Connection,
    state: Arc<Mutex<State>>,
}

/// One accepted stream; dropping it tells the limit the stream is done.
#[derive(Debug)]
pub struct StreamPermit {
    limit: StreamLimit,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut st = self.limit.lock();
        st.open = st.open.saturating_sub(1);
        if st.open == 0 && st.limit > st.initial {
            st.limit = st.initial;
            self.limit
                .conn
                .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(st.limit));
        }
    }
}

impl StreamLimit {
    /// The limit of `conn`, which was made with `transport`'s settings (its credit starts at
    /// [`TransportConfig::initial_streams`]).
    pub fn new(conn: &quinn::Connection, transport: &TransportConfig) -> StreamLimit {
        let initial = transport.initial_streams();
        StreamLimit {
            conn: conn.clone(),
            state: Arc::new(Mutex::new(State {
                open: 0,
                limit: initial,
                initial,
                max: transport.max_concurrent_streams.max(initial),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain arithmetic under the lock: a panic cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a stream just accepted and grows the credit if the peer nears it. Call it for
    /// every accepted bidirectional stream and hold the permit until the stream is done.
    pub fn on_accept(&self) -> StreamPermit {
        let mut st = self.lock();
        st.open = st.open.saturating_add(1);
        let threshold = u64::from(st.limit) * u64::from(GROW_AT_PERCENT) / 100;
        if u64::from(st.open) >= threshold && st.limit < st.max {
            st.limit = st.limit.saturating_mul(2).min(st.max);
            self.conn
                .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(st.limit));
        }
        drop(st);
        StreamPermit {
            limit: self.clone(),
        }
    }

    /// The credit currently offered: concurrent streams the peer may have open.
    pub fn limit(&self) -> u32 {
        self.lock().limit
    }

    /// Streams accepted and not yet done.
    pub fn open(&self) -> u32 {
        self.lock().open
    }
}
