//! The dispatch engine: one attempt state machine for every protocol that sends work to a
//! service's endpoints — the L4 `[[outbound]]` tunnel, the proxy's HTTP requests and its
//! CONNECT, and the protocols to come (HTTP/2, gRPC, WebSocket), each a thin async adapter.
//!
//! Pure, like `balance/`: no sockets, no clock, no runtime. Time arrives as `now`, randomness
//! as `&mut impl Rng`. An adapter asks [`Dispatch::pick`] for an endpoint, makes the attempt,
//! and reports a typed [`Outcome`] to [`Dispatch::report`], which updates the balancer (and,
//! through it, the peer table) and decides: deliver, retry on another endpoint, or stop because
//! the retry budget is spent. Decisions never read header or error text: the adapter turns
//! what it saw into an [`Outcome`] once, at the edge.

#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use crate::balance::{Candidate, InflightGuard};
use crate::routing::{Route, Target};

/// Attempts per request: the first try plus up to two retries on other endpoints.
pub const MAX_ATTEMPTS: usize = 3;
/// A tunnel open may take this many times the endpoint's peak-EWMA latency before it is
/// abandoned and retried elsewhere: far above normal jitter, far below "dead".
pub const OPEN_DEADLINE_FACTOR: f64 = 10.0;
/// The shortest open deadline: below this, a busy but healthy target (a TCP accept queue, a
/// GC pause) would be retried needlessly.
pub const MIN_OPEN_DEADLINE: Duration = Duration::from_millis(500);

/// The deadline for opening a tunnel to an endpoint whose peak-EWMA latency is `ewma_ms`:
/// derived from what was measured, between [`MIN_OPEN_DEADLINE`] and the configured ceiling.
pub fn open_deadline(ewma_ms: f64, ceiling: Duration) -> Duration {
    let measured = Duration::from_secs_f64((ewma_ms.max(0.0) * OPEN_DEADLINE_FACTOR) / 1e3);
    measured
        .max(MIN_OPEN_DEADLINE)
        .min(ceiling.max(MIN_OPEN_DEADLINE))
}

/// What the engine must know of the request to decide whether a retry is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Everything the request carries can be sent again (an L4 tunnel before any byte was
    /// read from the application; an HTTP request without a body).
    pub replayable: bool,
    /// Sending it twice means no more than sending it once (GET, PUT, ...; an L4 tunnel
    /// whose application has sent nothing yet).
    pub idempotent: bool,
}

impl Request {
    /// An L4 tunnel: nothing is read from the application before the tunnel is open, so a
    /// retry is invisible to it.
    pub const TUNNEL: Request = Request {
        replayable: true,
        idempotent: true,
    };
}

/// What one attempt came to, as the adapter saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Open, or answered by the application with a status that is not a mesh failure.
    Ok {
        /// Time to the answer (tunnel status, HTTP response head).
        latency: Duration,
    },
    /// Answered with a refusing status: by the far node (`mesh`) or by the application.
    Refused {
        /// The status code.
        status: u16,
        /// The far node itself refused (a `meshnode/1` status, an `h3` answer carrying
        /// `meshnode-error`), rather than the application answering.
        mesh: bool,
        /// The far node says its target never saw the request (draining, target refused).
        unreached: bool,
        /// Time to the answer.
        latency: Duration,
    },
    /// The far node does not serve the service on the port asked for (`404` from the far
    /// node itself: its registry record is stale — gone, or naming another port). The target
    /// never saw the work, so another endpoint may get it; the endpoint counts it as a
    /// failure, so a record that stays stale gets the endpoint ejected, then probed.
    NotServed,
    /// No connection to the peer could be had.
    Unreachable,
    /// No answer within the deadline.
    Timeout,
    /// The stream failed before the request was sent.
    ResetBeforeSend,
    /// The stream failed after the request (or some of it) was sent, before an answer.
    ResetAfterSend,
    /// The far node answered something that is not a status.
    Protocol {
        /// Time to the answer.
        latency: Duration,
    },
    /// The application's own request failed (its body malformed or cut short): says nothing
    /// of the endpoint, and is not retried.
    ClientFailed,
}

impl Outcome {
    /// Whether the endpoint failed (as opposed to answering, however unwelcome the answer).
    fn is_failure(self) -> bool {
        match self {
            Outcome::Ok { .. } | Outcome::Protocol { .. } | Outcome::ClientFailed => false,
            Outcome::Refused { status, mesh, .. } => mesh && matches!(status, 502..=504),
            Outcome::Unreachable
            | Outcome::NotServed
            | Outcome::Timeout
            | Outcome::ResetBeforeSend
            | Outcome::ResetAfterSend => true,
        }
    }

    /// Whether another endpoint may get the request, as far as the request allows.
    fn retryable(self, req: Request) -> bool {
        match self {
            Outcome::Ok { .. } | Outcome::Protocol { .. } | Outcome::ClientFailed => false,
            Outcome::Unreachable | Outcome::ResetBeforeSend => true,
            Outcome::ResetAfterSend | Outcome::NotServed => req.replayable,
            Outcome::Timeout => req.replayable && req.idempotent,
            Outcome::Refused {
                status, unreached, ..
            } => {
                let unreached = unreached && matches!(status, 502..=504);
                let refused = matches!(status, 502 | 503);
                req.replayable && (unreached || (refused && req.idempotent))
            }
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// This outcome is the answer (a success, a refusal not worth retrying, or the last
    /// attempt).
    Deliver,
    /// Try another endpoint.
    Retry,
    /// A retry was due but the service's retry budget refused it.
    OutOfBudget,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoEndpoint {
    /// The endpoints tried already (empty when the service had none at all).
    pub tried: Vec<String>,
}

/// One request's way through a service's endpoints.
pub struct Dispatch<'r> {
    route: &'r Route,
    request: Request,
    tried: Vec<String>,
    attempts: usize,
}

impl<'r> Dispatch<'r> {
    /// Starts dispatching `request` on `route` (counted by the retry budget).
    pub fn new(route: &'r Route, request: Request, now: Instant) -> Dispatch<'r> {
        route.budget.record_request(now);
        Dispatch {
            route,
            request,
            tried: Vec::new(),
            attempts: 0,
        }
    }

    /// Attempts started so far.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// Picks the endpoint of `targets` for the next attempt, skipping those already tried —
    /// unless every endpoint failed once already: a second try on one of them still beats
    /// failing the application (a transient overload, a connection being replaced).
    pub fn pick<'t>(
        &mut self,
        targets: &'t [Target],
        now: Instant,
        rng: &mut impl rand::Rng,
    ) -> Result<&'t Target, NoEndpoint> {
        let candidates: Vec<Candidate<'_>> = targets
            .iter()
            .map(|t| Candidate {
                node: &t.node,
                weight: t.weight,
            })
            .collect();
        let mut exclude: Vec<&str> = self.tried.iter().map(String::as_str).collect();
        if !candidates.is_empty() && candidates.iter().all(|c| exclude.contains(&c.node)) {
            exclude.clear();
        }
        let picked = self.route.balancer.pick(&candidates, &exclude, now, rng);
        // `pick` chose from `targets`, so the lookup cannot miss.
        let target = picked.and_then(|node| targets.iter().find(|t| t.node == node));
        match target {
            Some(t) => {
                self.attempts += 1;
                Ok(t)
            }
            None => Err(NoEndpoint {
                tried: self.tried.clone(),
            }),
        }
    }

    /// Counts an attempt as in flight on `node` until the guard drops.
    pub fn start(&self, node: &str) -> InflightGuard {
        self.route.balancer.start(node)
    }

    /// The open deadline for `node`, from its measured latency, at most `ceiling`.
    pub fn deadline(&self, node: &str, ceiling: Duration, now: Instant) -> Duration {
        open_deadline(self.route.balancer.snapshot(node, now).ewma_ms, ceiling)
    }

    /// Applies the outcome of the attempt on `node` to the balancer and decides what follows.
    pub fn report(&mut self, node: &str, outcome: Outcome, now: Instant) -> Decision {
        let balancer = &self.route.balancer;
        match outcome {
            // Known dead: the peer table marks it down for every service.
            Outcome::Unreachable => balancer.mark_down(node, now),
            // The client's fault: the endpoint is neither credited nor blamed.
            Outcome::ClientFailed => {}
            Outcome::Ok { latency }
            | Outcome::Refused { latency, .. }
            | Outcome::Protocol { latency }
                if !outcome.is_failure() =>
            {
                // The endpoint is alive and answered; a refused request is not a failing
                // endpoint.
                balancer.record_success(node, latency, now);
            }
            _ => balancer.record_failure(node, now),
        }
        if !outcome.retryable(self.request) || self.attempts >= MAX_ATTEMPTS {
            return Decision::Deliver;
        }
        if !self.route.budget.try_retry(now) {
            return Decision::OutOfBudget;
        }
        self.tried.push(node.to_string());
        Decision::Retry
    }
}
