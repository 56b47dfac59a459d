//! The lease keeper: a task that keeps one lease alive from whichever member answers.
//!
//! It runs beside the supervisor so that nothing the supervisor waits for (a write, a list,
//! a watch moving to another member) delays a keep-alive. Timing is [`LeaseClock`]'s; this
//! file only does the I/O and reports what it learns.

use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::lease::{Answer, Due, LeaseClock};
use super::pool::{CallError, Pool};
use super::Backoff;

/// Pause between rounds when no member answered, growing to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// What the keeper knows of the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LeaseReport {
    /// Kept alive at least until then.
    Alive(Instant),
    /// etcd says the lease is gone: the registration must be written under a new one.
    Lost,
    /// No answer for a whole TTL and no member answers `TimeToLive`: the lease may be gone.
    InDoubt(String),
}

/// The running keeper; stops it when dropped.
pub(crate) struct Keeper {
    task: JoinHandle<()>,
    /// Latest report.
    pub(crate) reports: watch::Receiver<LeaseReport>,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts keeping `lease` alive through `pool`.
pub(crate) fn spawn(pool: Pool, lease: i64, clock: LeaseClock) -> Keeper {
    let (tx, reports) = watch::channel(LeaseReport::Alive(clock.expires()));
    let task = tokio::spawn(keep(pool, lease, clock, tx));
    Keeper { task, reports }
}

/// A keep-alive stream on one member.
struct Stream {
    member: usize,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
}

async fn keep(pool: Pool, lease: i64, mut clock: LeaseClock, tx: watch::Sender<LeaseReport>) {
    let id = format!("{lease:x}");
    let mut stream: Option<Stream> = None;
    let mut retry = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        let now = Instant::now();
        match clock.poll(now) {
            Due::Send => match stream.as_mut() {
                Some(s) => match s.keeper.keep_alive().await {
                    Ok(()) => clock.sent(now),
                    Err(e) => {
                        pool.failed(s.member, &format!("lease keep-alive: {e}"));
                        stream = None;
                        clock.failed_over(now);
                    }
                },
                None => {
                    let opened = pool
                        .run("lease keep-alive", |mut c| async move {
                            c.lease_keep_alive(lease).await
                        })
                        .await;
                    match opened {
                        // Opening the stream sends the first keep-alive.
                        Ok((member, (keeper, answers))) => {
                            clock.sent(now);
                            retry.reset();
                            stream = Some(Stream {
                                member,
                                keeper,
                                answers,
                            });
                        }
                        Err(e) => {
                            debug!(lease = %id, error = %e, "lease keep-alive: no member took it");
                            pause(&clock, &mut retry).await;
                        }
                    }
                }
            },
            Due::Failover => {
                if let Some(s) = stream.take() {
                    let why = format!(
                        "lease keep-alive unanswered within {:?}",
                        pool.attempt_timeout()
                    );
                    info!(lease = %id, member = pool.url(s.member), "{why}; moving to another member");
                    pool.failed(s.member, &why);
                }
                clock.failed_over(now);
            }
            Due::AskTtl => {
                let asked = Instant::now();
                let answer = pool
                    .run("lease time-to-live", |mut c| async move {
                        c.lease_time_to_live(lease, None).await
                    })
                    .await;
                let ttl = match answer {
                    Ok((_, resp)) => resp.ttl(),
                    Err(CallError::Refused(e)) => {
                        warn!(lease = %id, error = %e, "lease time-to-live refused; taking the lease as gone");
                        0
                    }
                    Err(e @ CallError::Unreachable(_)) => {
                        let why = format!("lease {id} unanswered for its whole TTL: {e}");
                        tx.send_replace(LeaseReport::InDoubt(why));
                        pause(&clock, &mut retry).await;
                        continue;
                    }
                };
                match clock.confirm(ttl, asked) {
                    Answer::Lost => {
                        tx.send_replace(LeaseReport::Lost);
                        return;
                    }
                    Answer::Kept(until) => {
                        info!(lease = %id, ttl, "lease confirmed alive by etcd");
                        tx.send_replace(LeaseReport::Alive(until));
                    }
                }
            }
            Due::Wait(until) => {
                let Some(s) = stream.as_mut() else {
                    tokio::time::sleep_until(until).await;
                    continue;
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    msg = s.answers.message() => match msg {
                        Ok(Some(resp)) => match clock.answered(resp.ttl(), Instant::now()) {
                            Answer::Lost => {
                                tx.send_replace(LeaseReport::Lost);
                                return;
                            }
                            Answer::Kept(until) => {
                                pool.succeeded(s.member);
                                tx.send_replace(LeaseReport::Alive(until));
                            }
                        },
                        Ok(None) => {
                            pool.failed(s.member, "lease keep-alive stream ended");
                            stream = None;
                            clock.failed_over(Instant::now());
                        }
                        Err(e) => {
                            pool.failed(s.member, &format!("lease keep-alive stream: {e}"));
                            stream = None;
                            clock.failed_over(Instant::now());
                        }
                    },
                }
            }
        }
    }
}

/// Waits before another round after every member failed, never past the known expiry
/// (then etcd is asked at once).
async fn pause(clock: &LeaseClock, retry: &mut Backoff) {
    let delay = retry.next_delay();
    let now = Instant::now();
    let until = (now + delay).min(clock.expires().max(now + RETRY_MIN / 2));
    tokio::time::sleep_until(until).await;
}
