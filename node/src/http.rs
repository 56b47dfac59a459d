//! HTTP between nodes (docs/README.md): the local HTTP/1.1 and h2c proxy on `[http_proxy] listen`
//! and on `auto` `[[outbound]]` ports
//! (caller side), HTTP/3 between nodes on the `h3` ALPN, and the h3 server that forwards each
//! request to the local target over pooled HTTP/1.1 or h2c (callee side). Standard CONNECT
//! (RFC 9114 §4.4) on `h3` opens a TCP tunnel to a service's target. A WebSocket upgrade on
//! the proxy is carried as a `meshnode/1` tunnel to the target (`upgrade.rs`).
//!
//! Bodies stream both ways through bounded channels; nothing is buffered whole.
//!
//! h3-quinn panics if `stop_sending` is called on a receive stream whose pending `recv_data`
//! was cancelled, so `stop_sending` is only called after a read completed: a received body is
//! read in place as hyper polls it, and one dropped before its end with a read pending is
//! dropped whole (quinn stops it). The callee's request streams are its own (`quic.rs`): it
//! watches each for the caller letting go, to cancel the request to the target.

pub(crate) mod body;
pub(crate) mod grpc;
pub(crate) mod headers;
pub(crate) mod idle;
pub(crate) mod proxy;
pub(crate) mod quic;
pub(crate) mod server;
pub(crate) mod sniff;
pub(crate) mod stream;
pub(crate) mod tunnel;
pub(crate) mod upgrade;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

pub use body::Body;

/// The header that names a mesh error on `h3` responses and proxy answers.
pub const MESH_ERROR: &str = "meshnode-error";
/// Largest request header block the proxy and the h3 server accept (431 above it).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Deadline for connecting to a local HTTP target (502 when it passes or is refused): the
/// same as for tunnels.
pub use crate::local::TARGET_CONNECT_TIMEOUT;
/// How long an idle pooled HTTP/1.1 connection to a target is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type PooledClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// The pooled clients to this node's targets: HTTP/1.1 (keep-alive) for `http` services, h2c
/// with prior knowledge (one multiplexed connection per target) for `http2` and `grpc`.
#[derive(Clone)]
pub struct TargetClient {
    h1: PooledClient,
    h2: PooledClient,
}

impl TargetClient {
    /// Sends `req` to a target speaking HTTP/2 (`h2`) or HTTP/1.1.
    pub async fn request(
        &self,
        mut req: http::Request<Body>,
        h2: bool,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        if h2 {
            *req.version_mut() = http::Version::HTTP_2;
            // HTTP/2 carries no Host: the URI's authority becomes `:authority`.
            req.headers_mut().remove(http::header::HOST);
            self.h2.request(req).await
        } else {
            self.h1.request(req).await
        }
    }
}

/// Fresh pooled clients to local targets.
pub fn target_client() -> TargetClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(TARGET_CONNECT_TIMEOUT));
    let exec = hyper_util::rt::TokioExecutor::new();
    let h1 = hyper_util::client::legacy::Client::builder(exec.clone())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector.clone());
    let h2 = hyper_util::client::legacy::Client::builder(exec)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .http2_only(true)
        .build(connector);
    TargetClient { h1, h2 }
}

/// A mesh error answer: `code`, the `meshnode-error: reason` header and a one-line body.
pub fn mesh_error(code: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from(format!("meshnode: {reason}\n"))));
    *resp.status_mut() = code;
    if let Ok(v) = HeaderValue::from_str(reason) {
        resp.headers_mut().insert(MESH_ERROR, v);
    }
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Methods that may be retried after a 502/503 from an endpoint (docs/README.md).
pub fn is_idempotent(m: &http::Method) -> bool {
    use http::Method as M;
    [M::GET, M::HEAD, M::OPTIONS, M::PUT, M::DELETE].contains(m)
}
