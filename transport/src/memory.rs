//! The allocator, and giving memory back to the OS after many peer connections have closed.
//!
//! meshnode's binary installs [`Allocator`] (mimalloc) as its global allocator: on the HTTP and
//! gRPC paths it takes about 9 % fewer instructions per request than glibc's malloc
//! (bench/RESULTS.md, session 10), which spent ~12 % of them in `malloc`/`free`.
//!
//! An allocator keeps what is freed for reuse and returns only part of it on its own: measured
//! with `transport/tests/idle_memory.rs`, 1,000 idle peer connections grew a node's RSS by
//! about 55 MiB, and with glibc's malloc nearly all of it stayed after they closed (free, not
//! leaked: a second wave reused it). After a flood that would leave the node looking, and being
//! accounted by the OS, as large as at its peak. So when the connections held fall to half their
//! peak ([`crate::admission::Admission::trim_due`]), the endpoint waits for quinn to drop the
//! closed connections' state and then returns free memory to the OS: mimalloc's heaps belong to
//! threads, so each runtime thread collects its own (`mi_collect`) when it next goes idle
//! ([`on_thread_park`], which the runtime that runs the endpoint must install), and glibc's
//! `malloc_trim` returns what C code and programs without mimalloc allocate with glibc's malloc;
//! one trim at a time, at least [`crate::admission::TRIM_INTERVAL`] apart.
//!
//! A closed connection stays in quinn, draining, for three probe timeouts after its close; on a
//! loaded host, after a burst of handshakes, that is seconds. The wait is therefore not "until
//! quinn's count stops falling" (a trim that ran while 736 of 1,000 closed connections were
//! still draining freed next to nothing) but until quinn holds no more connections than the
//! node still uses: inbound ones held by admission and the ones it dialled.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::Admission;

/// The global allocator of meshnode's binary and of the tests that measure its memory:
/// `#[global_allocator] static GLOBAL: Allocator = Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

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
        // Every runtime thread collects its heap at its next park; this one now.
        COLLECTS.fetch_add(1, Ordering::Relaxed);
        on_thread_park();
        // A failed join (the blocking pool shut down) means the runtime is going away.
        let released = tokio::task::spawn_blocking(trim_glibc_malloc)
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

/// Trims asked of the runtime's threads so far; each thread collects once per trim.
static COLLECTS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The trims this thread has collected its heap for.
    static COLLECTED: Cell<u64> = const { Cell::new(0) };
}

/// For the runtime's `on_thread_park` (`tokio::runtime::Builder::on_thread_park`): when a memory
/// trim has been asked since this thread last collected, returns the free pages of this
/// thread's mimalloc heap (and the pages other threads freed into it) to the OS. One atomic
/// load otherwise. A runtime without it returns only the trimming thread's memory.
///
/// The collection runs on the thread itself (a heap's pages can only be freed by the thread that
/// owns them, and `mi_collect(false)` returns nothing to the OS: measured): after 1,000
/// connections left it took 6–7 ms per thread in a release build, once per trim, while the
/// thread had nothing else to do. A forced collection from a blocking thread beside the owners'
/// unforced ones returned only about half (RSS 64 → 35 MiB against 9.5 MiB).
pub fn on_thread_park() {
    let due = COLLECTS.load(Ordering::Relaxed);
    if COLLECTED.with(|c| c.replace(due)) != due {
        collect_allocator();
    }
}

/// mimalloc's `mi_collect(true)`: frees this thread's empty pages, and purges what every
/// arena has waiting to be returned.
#[allow(unsafe_code)]
fn collect_allocator() {
    // SAFETY: mi_collect takes no pointers and only works on mimalloc's own structures, under
    // its own synchronisation; it may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// glibc's `malloc_trim(0)`, for what is allocated with glibc's malloc in this process (C code;
/// a program that does not install [`Allocator`]). Slow on a large heap: run it off the runtime.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_glibc_malloc() -> bool {
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's own free lists, under the
    // arenas' locks, and is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) != 0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc_malloc() -> bool {
    false
}

/// The process's resident set size, where the OS tells it cheaply (Linux: /proc/self/statm).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // 4 KiB pages: every Linux target meshnode builds for.
    Some(pages * 4096)
}
