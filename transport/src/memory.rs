//! Giving memory back to the OS after many peer connections have closed.
//!
//! glibc's malloc keeps what is freed in its arenas for reuse and returns little of it on its
//! own: measured with `transport/tests/idle_memory.rs`, 1,000 idle peer connections grew the
//! node's RSS by about 55 MiB and nearly all of it stayed after they closed (free, not leaked: a
//! second wave reused it). After a flood that would leave the node looking, and being accounted
//! by the OS, as large as at its peak. So when the connections held fall to half their peak
//! ([`crate::admission::Admission::trim_due`]), the endpoint waits for quinn to drop the closed
//! connections' state and then calls `malloc_trim(0)` on a blocking thread, off the I/O path;
//! one trim at a time, at least [`crate::admission::TRIM_INTERVAL`] apart.
//!
//! A closed connection stays in quinn, draining, for three probe timeouts after its close; on a
//! loaded host, after a burst of handshakes, that is seconds. The wait is therefore not "until
//! quinn's count stops falling" (a trim that ran while 736 of 1,000 closed connections were
//! still draining freed next to nothing) but until quinn holds no more connections than the
//! node still uses: inbound ones held by admission and the ones it dialled.
//! On other allocators (musl, other systems) the trim is a no-op.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::Admission;

/// Interval at which the open connections are sampled while closed ones drain.
const DRAIN_STEP: Duration = Duration::from_millis(200);
/// Longest wait for closed connections to drain before trimming anyway: draining lasts three
/// probe timeouts, which grow with the RTT variance a burst of handshakes leaves (a peer that
/// vanished is dropped after the idle timeout, one second by default).
const DRAIN_MAX: Duration = Duration::from_secs(10);

/// Trims done by one endpoint.
#[derive(Debug, Default)]
pub struct TrimStats {
    trims: AtomicU64,
}

impl TrimStats {
    /// Trims done so far (each after a wave of closed connections).
    pub fn trims(&self) -> u64 {
        self.trims.load(Ordering::Relaxed)
    }
}

/// At `at` (a trim interval after the last trim at the earliest), waits until the wave of
/// closing connections has stopped and `endpoint`'s closed connections have drained (quinn
/// holds no more than the inbound connections `admission` holds and the `dialled` ones; at
/// most [`DRAIN_MAX`]), returns free memory to
/// the OS, and tells `admission` the trim is done. Runs on its own task.
pub(crate) fn trim_after_drain(
    endpoint: quinn::Endpoint,
    admission: Admission,
    dialled: Arc<AtomicU32>,
    stats: Arc<TrimStats>,
    at: Instant,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        tokio::time::sleep_until(at.into()).await;
        let started = Instant::now();
        let mut held_before = None;
        loop {
            let held = admission.held();
            let live = held as usize + dialled.load(Ordering::Relaxed) as usize;
            let draining = endpoint.open_connections().saturating_sub(live);
            // The wave has stopped closing (held unchanged for a step) and what it closed has
            // drained.
            let settled = draining == 0 && held_before == Some(held);
            if settled || started.elapsed() >= DRAIN_MAX {
                break;
            }
            held_before = Some(held);
            tokio::time::sleep(DRAIN_STEP).await;
        }
        drop(endpoint);
        let before = resident_bytes();
        // A failed join (the blocking pool shut down) means the runtime is going away.
        let released = tokio::task::spawn_blocking(release_free_memory)
            .await
            .unwrap_or(false);
        admission.trim_done(Instant::now());
        stats.trims.fetch_add(1, Ordering::Relaxed);
        let mib = |b: Option<u64>| b.map(|b| b >> 20);
        tracing::info!(
            peer_connections = admission.connections(),
            released,
            rss_before_mib = mib(before),
            rss_after_mib = mib(resident_bytes()),
            "returned free memory to the OS after peer connections closed"
        );
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's own free lists, under the
    // arenas' locks, and is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) != 0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() -> bool {
    false
}

/// The process's resident set size, where the OS tells it cheaply (Linux: /proc/self/statm).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // 4 KiB pages: every Linux target meshnode builds for.
    Some(pages * 4096)
}
