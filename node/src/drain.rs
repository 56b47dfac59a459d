//! Drain: one signal that every listener, accept loop and serving task watches, and hold
//! guards that make a drain wait for the work already accepted.
//!
//! [`Trigger::drain`] raises the signal (accept loops `select!` on [`Watch::signalled`] and
//! stop; the authoriser refuses new work with 503), then waits until every [`Hold`] is dropped
//! or the grace runs out. A task takes its hold *before* it checks [`Watch::is_draining`]: a
//! drain that begins after the check then waits for it (taken only once a tunnel was open, it
//! left a window — the connect to the target — in which a drain could find nothing active and
//! close the connection under a tunnel it had just accepted).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

struct Holds {
    active: AtomicUsize,
    idle: Notify,
}

/// The side that starts a drain (the node).
pub struct Trigger {
    signal: watch::Sender<bool>,
    holds: Arc<Holds>,
}

/// The side that watches for a drain and holds it off while work is in flight. Cheap to clone.
#[derive(Clone)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    holds: Arc<Holds>,
}

/// Work a drain waits for, until dropped.
#[must_use = "the drain waits only while the hold lives"]
pub struct Hold {
    holds: Arc<Holds>,
}

/// A new drain pair: nothing draining, nothing held.
pub fn new() -> (Trigger, Watch) {
    let (tx, rx) = watch::channel(false);
    let holds = Arc::new(Holds {
        active: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    (
        Trigger {
            signal: tx,
            holds: holds.clone(),
        },
        Watch { signal: rx, holds },
    )
}

impl Trigger {
    /// Raises the signal, then waits until nothing is held or `grace` has passed. Returns the
    /// holds still alive (0 when everything finished in time).
    pub async fn drain(&self, grace: Duration) -> usize {
        self.signal.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = self.holds.idle.notified();
            let active = self.holds.active.load(Ordering::SeqCst);
            if active == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.holds.active.load(Ordering::SeqCst);
            }
        }
    }

    /// Raises the signal without waiting (start-up failed, kill).
    pub fn signal(&self) {
        self.signal.send_replace(true);
    }

    /// Work in flight now.
    pub fn active(&self) -> usize {
        self.holds.active.load(Ordering::SeqCst)
    }
}

impl Watch {
    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once a drain has begun (at once if it already has). For `select!` in accept
    /// loops.
    pub async fn signalled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger is gone: the node is gone, so stop as well.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Makes a drain wait until the hold is dropped.
    pub fn hold(&self) -> Hold {
        self.holds.active.fetch_add(1, Ordering::SeqCst);
        Hold {
            holds: self.holds.clone(),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.holds.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.holds.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, short: the node's tokio has no test-util (paused time) feature.
    #[tokio::test]
    async fn drain_waits_for_holds_then_gives_up_at_the_grace() {
        let (trigger, watch) = new();
        assert!(!watch.is_draining());
        let hold = watch.hold();
        let w = watch.clone();
        let stopped = tokio::spawn(async move { w.signalled().await });
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(hold);
        });
        let t0 = std::time::Instant::now();
        assert_eq!(trigger.drain(Duration::from_secs(10)).await, 0);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert!(watch.is_draining());
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .expect("accept loops see the signal")
            .expect("task");
        release.await.expect("task");

        let _stuck = watch.hold();
        let t1 = std::time::Instant::now();
        assert_eq!(trigger.drain(Duration::from_millis(200)).await, 1);
        assert!(t1.elapsed() >= Duration::from_millis(200));
    }
}
