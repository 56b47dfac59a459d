//! One etcd client per cluster member, and requests that fail over between members.
//!
//! Why not etcd-client's own multi-endpoint `Client`: it puts every endpoint behind one
//! tonic balance channel (tower's power-of-two-choices over `Reconnect` services). That
//! balancer knows nothing of etcd health: a refused connect is returned to the request that
//! happened to pick the dead member (it is not retried elsewhere), a SIGSTOPped member keeps
//! its established HTTP/2 connection and stays "ready" so requests hang on it until their
//! deadline, and a stream (watch, lease keep-alive) lives on one connection with no way to
//! say which member it is on or to move it. Health has to be tracked by whoever sees the
//! outcome of each request, so each member gets its own single-endpoint `Client` here
//! (sharing options: connect timeout, HTTP/2 keep-alive, TLS, auth, require-leader) and
//! [`Members`] decides which one to ask.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;
use tracing::debug;

use super::members::Members;
use super::EtcdConfig;

/// gRPC status codes that are etcd's answer to the request itself (the same on every
/// member), not a sign that the member is unhealthy: NotFound, InvalidArgument,
/// AlreadyExists, PermissionDenied, FailedPrecondition, OutOfRange, Unauthenticated.
const REQUEST_ERRORS: [i32; 7] = [5, 3, 6, 7, 9, 11, 16];

/// Why a request through the pool failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// A member answered with an error about the request itself (e.g. lease not found).
    Refused(etcd_client::Error),
    /// No member answered within its deadline; carries each member's failure.
    Unreachable(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(e) => write!(f, "{e}"),
            CallError::Unreachable(why) => write!(f, "no etcd member answered: {why}"),
        }
    }
}

/// Whether `e` says something about the member (unreachable, frozen, no leader) rather
/// than about the request.
pub(crate) fn is_member_failure(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => !REQUEST_ERRORS.contains(&i32::from(s.code())),
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => false,
        _ => true,
    }
}

/// An error with its whole source chain (tonic hides the cause, e.g. a TLS alert, in it).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

struct Inner {
    urls: Vec<String>,
    opts: ConnectOptions,
    /// Per member: its client, made on first use.
    clients: Mutex<Vec<Option<Client>>>,
    members: Arc<Mutex<Members>>,
    /// Deadline of one attempt on one member.
    attempt: Duration,
    /// Connect (and authenticate) deadline of a member's client.
    connect: Duration,
    /// `(ca, cert)` for TLS error messages, when TLS is used.
    tls_files: Option<String>,
}

/// Cheap to clone; shared by the supervisor and its lease keeper.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// A pool over `cfg.endpoints` sharing `members`' health. Reads the TLS files.
    pub(crate) fn new(cfg: &EtcdConfig, members: Arc<Mutex<Members>>) -> Result<Pool, String> {
        let opts = cfg.connect_options()?.with_require_leader(true);
        let tls_files = cfg.tls.as_ref().map(|t| {
            let show = |p: &Option<std::path::PathBuf>| {
                p.as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string())
            };
            format!("ca {}, client cert {}", show(&t.ca), show(&t.cert))
        });
        Ok(Pool {
            inner: Arc::new(Inner {
                clients: Mutex::new(vec![None; cfg.endpoints.len()]),
                urls: cfg.endpoints.clone(),
                opts,
                members,
                attempt: cfg.attempt_timeout(),
                connect: cfg.connect_timeout,
                tls_files,
            }),
        })
    }

    /// The deadline of one attempt on one member.
    pub(crate) fn attempt_timeout(&self) -> Duration {
        self.inner.attempt
    }

    /// The URL of member `i`.
    pub(crate) fn url(&self, i: usize) -> &str {
        self.inner.urls.get(i).map_or("?", String::as_str)
    }

    /// Whether member `i` is currently considered healthy.
    pub(crate) fn is_healthy(&self, i: usize) -> bool {
        lock(&self.inner.members).is_healthy(i, Instant::now())
    }

    /// Marks member `i` failed (e.g. a stream on it broke).
    pub(crate) fn failed(&self, i: usize, why: &str) {
        debug!(
            member = self.url(i),
            error = why,
            "etcd member failed; using the others"
        );
        lock(&self.inner.members).failed(i, Instant::now());
    }

    /// Marks member `i` healthy and preferred.
    pub(crate) fn succeeded(&self, i: usize) {
        lock(&self.inner.members).succeeded(i);
    }

    /// Member `i`'s client, connecting (and authenticating) it on first use. A refusal
    /// that any member would give (e.g. a wrong password) is `Ok(Err(_))`.
    async fn client(&self, i: usize) -> Result<Result<Client, etcd_client::Error>, String> {
        if let Some(c) = lock(&self.inner.clients).get(i).cloned().flatten() {
            return Ok(Ok(c));
        }
        let url = self.url(i).to_string();
        let connect = Client::connect([url.as_str()], Some(self.inner.opts.clone()));
        let client =
            match tokio::time::timeout(self.inner.connect + self.inner.attempt, connect).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) if !is_member_failure(&e) => return Ok(Err(e)),
                Ok(Err(e)) => return Err(self.describe("connect", &e)),
                Err(_) => return Err(format!("{url}: connect: no answer")),
            };
        if let Some(slot) = lock(&self.inner.clients).get_mut(i) {
            *slot = Some(client.clone());
        }
        Ok(Ok(client))
    }

    /// Text for a member failure: the member, the operation, the whole cause, and for a
    /// transport failure towards an `https://` member, that it is TLS and which files.
    fn describe(&self, what: &str, e: &etcd_client::Error) -> String {
        let text = chain(e);
        match (&self.inner.tls_files, e) {
            (
                Some(files),
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_),
            ) => {
                format!("{what}: TLS connection failed ({files}): {text}")
            }
            // Cancelled, Unknown, Unavailable: the connection was closed under the request
            // (etcd refusing the handshake, e.g. no client certificate, shows as this).
            (Some(files), etcd_client::Error::GRpcStatus(s))
                if [1, 2, 14].contains(&i32::from(s.code())) =>
            {
                format!("{what}: TLS connection failed or dropped ({files}): {text}")
            }
            _ => format!("{what}: {text}"),
        }
    }

    /// Runs `op` on one member after another, in [`Members::order`], each attempt bounded
    /// by the attempt deadline, until one answers. Returns the member that answered and its
    /// answer. A request error (the same on every member) is returned at once.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        what: &str,
        mut op: F,
    ) -> Result<(usize, T), CallError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let order = lock(&self.inner.members).order(Instant::now());
        let mut failures = Vec::new();
        for i in order {
            let url = self.url(i).to_string();
            let outcome: Result<(), String> = match self.client(i).await {
                Err(why) => Err(why),
                Ok(Err(e)) => return Err(CallError::Refused(e)),
                Ok(Ok(client)) => {
                    match tokio::time::timeout(self.inner.attempt, op(client)).await {
                        Ok(Ok(v)) => {
                            self.succeeded(i);
                            return Ok((i, v));
                        }
                        Ok(Err(e)) if !is_member_failure(&e) => return Err(CallError::Refused(e)),
                        Ok(Err(e)) => Err(self.describe(what, &e)),
                        Err(_) => Err(format!("{what}: no answer within {:?}", self.inner.attempt)),
                    }
                }
            };
            if let Err(why) = outcome {
                self.failed(i, &why);
                failures.push(format!("{url}: {why}"));
            }
        }
        Err(CallError::Unreachable(failures.join("; ")))
    }
}
