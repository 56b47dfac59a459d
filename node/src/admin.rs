//! The admin API (docs/README.md): `/metrics`, `/status`, `/healthz`, `/readyz` over HTTP/1.1.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::sampler::{self, SamplerInputs};
use crate::status::StatusInputs;

/// What the admin API reads.
pub struct AdminInputs {
    /// `/status` and `/readyz`.
    pub status: Arc<StatusInputs>,
    /// Sampled totals, brought up to date before `/metrics` renders.
    pub sampler: Arc<SamplerInputs>,
}

/// The admin API's own thread and runtime, away from the data plane: a saturated data plane
/// must not make `/metrics` and `/readyz` time out, and a flood of admin requests must not
/// steal the data plane's workers.
pub(crate) struct AdminThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl AdminThread {
    /// Stops serving (the thread exits once its runtime winds down).
    pub(crate) fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for AdminThread {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the admin API on `listener` in a thread with a single-threaded runtime.
pub(crate) fn spawn(
    shared: Arc<AdminInputs>,
    listener: std::net::TcpListener,
) -> std::io::Result<AdminThread> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("meshnode-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin API cannot listen");
                        return;
                    }
                };
                tokio::select! {
                    _ = serve(shared, listener) => {}
                    _ = rx => {}
                }
            });
        })?;
    Ok(AdminThread { stop: Some(tx) })
}

/// Serves the admin API until the task is stopped.
async fn serve(shared: Arc<AdminInputs>, listener: TcpListener) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, &req)) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(shared: &AdminInputs, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n");
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let blockers = shared.status.readiness.blockers();
            if blockers.is_empty() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", blockers.join(", ")),
                )
            }
        }
        "/status" => match serde_json::to_vec_pretty(&crate::status::build(&shared.status)) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        "/metrics" => {
            sampler::sync(&shared.sampler);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                shared.sampler.telemetry.metrics().render(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /status, /metrics, /healthz or /readyz\n",
        ),
    }
}
