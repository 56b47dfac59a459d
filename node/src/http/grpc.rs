//! gRPC on the caller side (docs/behaviour.md, gRPC): which requests are gRPC, how a mesh
//! error is answered to a gRPC caller (HTTP 200 with a trailers-only `grpc-status`), which
//! answers of an endpoint the engine may retry (`UNAVAILABLE` in a trailers-only response),
//! and the small request bodies that are buffered so that a unary call can be replayed on
//! another endpoint.
//!
//! gRPC's own trailers (`grpc-status`, `grpc-message`, `grpc-status-details-bin`, custom
//! keys) need nothing here: bodies carry trailers end to end (`http/body.rs`), and a
//! trailers-only response is a response head without a body.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming};

use super::body::{self, Body, BoxError};
use super::MESH_ERROR;

/// gRPC status codes the mesh answers with (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// The call was not answered within its deadline.
    DeadlineExceeded = 4,
    /// The caller may not use the service.
    PermissionDenied = 7,
    /// No service of that name in the mesh.
    Unimplemented = 12,
    /// The mesh itself failed the call in an unexpected way.
    Internal = 13,
    /// No endpoint could take the call now (none healthy, draining, unreachable).
    Unavailable = 14,
}

/// `grpc-status: 14`, the one status the engine retries on (before any message was sent).
const UNAVAILABLE: &[u8] = b"14";

/// Largest request body buffered so that a call can be replayed.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
/// How long the proxy waits for a request body to end before sending it on as a stream (a
/// bidirectional call may wait for the answer before sending more).
pub const REPLAY_WAIT: Duration = Duration::from_millis(50);

/// Whether a request (or response) is gRPC: `content-type: application/grpc[+proto|...]`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.trim().to_ascii_lowercase();
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

/// The gRPC status a mesh error of HTTP status `code` becomes.
pub fn code_of(code: StatusCode) -> Code {
    match code.as_u16() {
        404 => Code::Unimplemented,
        403 => Code::PermissionDenied,
        504 => Code::DeadlineExceeded,
        502 | 503 => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// A trailers-only gRPC answer: HTTP 200, `grpc-status`, `grpc-message`, no body.
pub fn trailers_only(code: Code, message: &str) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from((code as u8) as u16));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    resp
}

/// Turns a mesh error (an answer carrying `meshnode-error`) into its gRPC status, keeping
/// `meshnode-error`; any other answer is returned as it is.
pub fn answer(resp: Response<Body>) -> Response<Body> {
    let Some(reason) = resp.headers().get(MESH_ERROR).cloned() else {
        return resp;
    };
    let message = reason.to_str().unwrap_or("mesh error");
    let mut out = trailers_only(code_of(resp.status()), &format!("meshnode: {message}"));
    out.headers_mut().insert(MESH_ERROR, reason);
    out
}

/// Whether an endpoint's response head is a trailers-only `UNAVAILABLE`: nothing of the
/// call was answered, so another endpoint may take it.
pub fn is_unavailable(headers: &HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == UNAVAILABLE)
}

/// The call's deadline from `grpc-timeout` (`1..=8` digits and a unit of `H M S m u n`), if
/// it carries a valid one.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-message` encoding: printable ASCII but `%` as is, every other byte `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A request body as the proxy forwards it.
pub enum RequestBody {
    /// Read whole (data and trailers): sent again on every attempt.
    Whole(Bytes, Option<HeaderMap>),
    /// Too large or too slow to end: what was read, then the rest of the stream; sent once.
    Streaming(Body),
}

impl RequestBody {
    /// A fresh body for one attempt (`Whole`), or the stream (taken once).
    pub fn whole_body(data: &Bytes, trailers: &Option<HeaderMap>) -> Body {
        let mut frames = VecDeque::new();
        if !data.is_empty() {
            frames.push_back(Frame::data(data.clone()));
        }
        if let Some(t) = trailers {
            frames.push_back(Frame::trailers(t.clone()));
        }
        Prefixed { frames, rest: None }.boxed_unsync()
    }
}

/// Reads `incoming` until it ends, passes [`MAX_REPLAY_BODY`] or [`REPLAY_WAIT`] passes.
pub async fn buffer(mut incoming: Incoming) -> RequestBody {
    let mut data = BytesMut::new();
    let mut frames = VecDeque::new();
    let deadline = tokio::time::Instant::now() + REPLAY_WAIT;
    loop {
        if incoming.is_end_stream() {
            return RequestBody::Whole(data.freeze(), None);
        }
        let next = match tokio::time::timeout_at(deadline, incoming.frame()).await {
            Ok(n) => n,
            Err(_) => break,
        };
        match next {
            None => return RequestBody::Whole(data.freeze(), None),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    data.extend_from_slice(&d);
                    if data.len() > MAX_REPLAY_BODY {
                        break;
                    }
                }
                Err(f) => match f.into_trailers() {
                    Ok(t) => return RequestBody::Whole(data.freeze(), Some(t)),
                    Err(_) => continue,
                },
            },
            Some(Err(e)) => {
                // The client went away mid-body: pass the failure on as a failing stream.
                if !data.is_empty() {
                    frames.push_back(Frame::data(data.freeze()));
                }
                let failed = Prefixed {
                    frames,
                    rest: Some(
                        http_body_util::StreamBody::new(futures_util::stream::once(async move {
                            Err::<Frame<Bytes>, BoxError>(Box::new(e))
                        }))
                        .boxed_unsync(),
                    ),
                };
                return RequestBody::Streaming(failed.boxed_unsync());
            }
        }
    }
    if !data.is_empty() {
        frames.push_back(Frame::data(data.freeze()));
    }
    let rest = incoming.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
    RequestBody::Streaming(
        Prefixed {
            frames,
            rest: Some(rest),
        }
        .boxed_unsync(),
    )
}

/// Frames already read, then (optionally) the rest of a body.
struct Prefixed {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for (ct, yes) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC+json", true),
            ("application/grpc-web", false),
            ("application/json", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), yes, "{ct}");
        }
    }

    #[test]
    fn mesh_errors_become_statuses() {
        assert_eq!(code_of(StatusCode::NOT_FOUND), Code::Unimplemented);
        assert_eq!(code_of(StatusCode::FORBIDDEN), Code::PermissionDenied);
        assert_eq!(code_of(StatusCode::GATEWAY_TIMEOUT), Code::DeadlineExceeded);
        assert_eq!(code_of(StatusCode::SERVICE_UNAVAILABLE), Code::Unavailable);
        assert_eq!(code_of(StatusCode::BAD_GATEWAY), Code::Unavailable);
        assert_eq!(code_of(StatusCode::BAD_REQUEST), Code::Internal);
        let resp = answer(super::super::mesh_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy endpoint",
        ));
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(is_unavailable(resp.headers()));
        assert!(resp.body().is_end_stream());
        assert_eq!(
            resp.headers().get("grpc-message").map(|v| v.as_bytes()),
            Some(&b"meshnode: no healthy endpoint"[..])
        );
        assert_eq!(percent_encode("50% \u{e9}"), "50%25 %C3%A9");
    }

    #[test]
    fn grpc_timeouts() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout(&h), None);
        for (v, d) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5u", Some(Duration::from_micros(5))),
            ("123456789S", None),
            ("S", None),
            ("10x", None),
            ("-1S", None),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(timeout(&h), d, "{v}");
        }
    }
}
