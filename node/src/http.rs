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
pub(crate) mod target;
pub(crate) mod tunnel;
pub(crate) mod upgrade;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

pub use body::Body;
pub use target::TargetClient;

/// The header that names a mesh error on `h3` responses and proxy answers.
pub const MESH_ERROR: &str = "meshnode-error";
/// Largest request header block the proxy and the h3 server accept (431 above it).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Deadline for connecting to a local HTTP target (502 when it passes or is refused): the
/// same as for tunnels.
pub use crate::local::TARGET_CONNECT_TIMEOUT;
/// How long an idle pooled HTTP/1.1 connection to a target is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// `make()`'s future in a box allocated before the future is made, so that the compiler builds
/// it in place: `Box::pin(make())` builds it on the stack and then copies every byte of it into
/// the box (callgrind: 8.2 k instructions of `memcpy` per request for the proxy's request
/// future of about 8 KiB).
pub(crate) fn boxed_in_place<F: std::future::Future>(
    make: impl FnOnce() -> F,
) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
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
