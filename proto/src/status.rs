//! The callee's answer to a stream header.
//!
//! Layout (every byte is described in `proto/PROTOCOL.md`):
//!
//! ```text
//! "MS" version(1) code(u16 BE) reason_len(u8) reason
//! ```

use std::fmt;

use crate::reader::{check_prefix, finish, Reader, Stop};
use crate::{DecodeError, EncodeError, MAX_REASON_LEN, VERSION};

/// Magic of a status: ASCII `"MS"`, distinct from the header's so neither is taken for the other.
const MAGIC: [u8; 2] = *b"MS";

/// Outcome of a tunnel open, or a mesh error. The numbers are HTTP status codes, so the same
/// outcome reads the same on `meshnode/1` and on `h3` (docs/protocol.md, "Status codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    /// 200: the tunnel is open; payload follows.
    Open,
    /// 400: the header was malformed.
    BadRequest,
    /// 403: the caller's node is not in the service's `allow` list.
    Forbidden,
    /// 404: the callee does not know the service, or the service does not advertise the port.
    NotFound,
    /// 502: the target refused or reset the connection.
    BadGateway,
    /// 503: no healthy endpoint, or the node is draining.
    Unavailable,
    /// 504: the target did not answer within the deadline.
    GatewayTimeout,
}

impl StatusCode {
    /// Every code, in ascending numeric order.
    pub const ALL: [StatusCode; 7] = [
        StatusCode::Open,
        StatusCode::BadRequest,
        StatusCode::Forbidden,
        StatusCode::NotFound,
        StatusCode::BadGateway,
        StatusCode::Unavailable,
        StatusCode::GatewayTimeout,
    ];

    /// The HTTP status number.
    pub fn as_u16(self) -> u16 {
        match self {
            StatusCode::Open => 200,
            StatusCode::BadRequest => 400,
            StatusCode::Forbidden => 403,
            StatusCode::NotFound => 404,
            StatusCode::BadGateway => 502,
            StatusCode::Unavailable => 503,
            StatusCode::GatewayTimeout => 504,
        }
    }

    /// The code with this HTTP status number, if meshnode uses it.
    pub fn from_u16(v: u16) -> Option<StatusCode> {
        StatusCode::ALL.into_iter().find(|code| code.as_u16() == v)
    }

    /// Whether the tunnel is open (only [`StatusCode::Open`]).
    pub fn is_success(self) -> bool {
        self == StatusCode::Open
    }

    /// The standard HTTP reason phrase, such as `"Service Unavailable"`.
    pub fn default_reason(self) -> &'static str {
        match self {
            StatusCode::Open => "OK",
            StatusCode::BadRequest => "Bad Request",
            StatusCode::Forbidden => "Forbidden",
            StatusCode::NotFound => "Not Found",
            StatusCode::BadGateway => "Bad Gateway",
            StatusCode::Unavailable => "Service Unavailable",
            StatusCode::GatewayTimeout => "Gateway Timeout",
        }
    }
}

/// Formats as number and reason phrase: `"503 Service Unavailable"`.
impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.as_u16(), self.default_reason())
    }
}

/// The callee's answer to a [`StreamHeader`](crate::StreamHeader), written back on the same
/// stream before any payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The outcome.
    pub code: StatusCode,
    /// Why, for humans: UTF-8, at most [`MAX_REASON_LEN`] bytes, possibly empty. It comes from
    /// the peer, so escape it before logging it or putting it in an HTTP header.
    pub reason: String,
}

impl Status {
    /// A status with this code and reason.
    pub fn new(code: StatusCode, reason: impl Into<String>) -> Status {
        Status {
            code,
            reason: reason.into(),
        }
    }

    /// The status that opens a tunnel: [`StatusCode::Open`] with an empty reason.
    pub fn open() -> Status {
        Status::new(StatusCode::Open, "")
    }

    /// Appends the encoded status to `out`; on error `out` is unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let reason = self.reason.as_bytes();
        let Ok(reason_len) = u8::try_from(reason.len()) else {
            return Err(EncodeError::ReasonTooLong(reason.len()));
        };
        out.reserve(6 + reason.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.code.as_u16().to_be_bytes());
        out.push(reason_len);
        out.extend_from_slice(reason);
        Ok(())
    }

    /// The encoded status in a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes a status from the start of `buf`, the bytes received on the stream so far.
    ///
    /// `Ok(None)`: a valid beginning, read more. `Ok(Some((status, consumed)))`: a whole
    /// status; the bytes after `consumed` are tunnel payload. `Err`: the bytes cannot start a
    /// valid status (an unknown code is rejected as soon as its two bytes arrive).
    pub fn decode(buf: &[u8]) -> Result<Option<(Status, usize)>, DecodeError> {
        finish(decode_status(buf))
    }
}

/// Formats as code, then the reason if any: `"503 Service Unavailable: node draining"`.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reason.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.reason)
        }
    }
}

fn decode_status(buf: &[u8]) -> Result<(Status, usize), Stop> {
    check_prefix(buf, MAGIC)?;
    // No length prefix: the reason's one-byte length bounds the whole status.
    let mut r = Reader::new(buf, 6 + MAX_REASON_LEN);
    r.skip(3, "magic")?;
    let code = r.u16("code")?;
    let code = StatusCode::from_u16(code).ok_or(DecodeError::UnknownStatus(code))?;
    let reason_len = usize::from(r.u8("reason")?);
    let reason = std::str::from_utf8(r.take(reason_len, "reason")?)
        .map_err(|_| DecodeError::InvalidUtf8 { field: "reason" })?;
    Ok((Status::new(code, reason), r.pos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_read_well() {
        for code in StatusCode::ALL {
            assert_eq!(StatusCode::from_u16(code.as_u16()), Some(code));
            assert_eq!(code.is_success(), code.as_u16() == 200);
        }
        assert_eq!(StatusCode::from_u16(201), None);
        assert_eq!(StatusCode::from_u16(0), None);
        assert_eq!(
            StatusCode::Unavailable.to_string(),
            "503 Service Unavailable"
        );
        assert_eq!(StatusCode::Open.to_string(), "200 OK");
        assert_eq!(
            Status::new(StatusCode::Forbidden, "node-c not allowed").to_string(),
            "403 Forbidden: node-c not allowed"
        );
        assert_eq!(Status::open().to_string(), "200 OK");
    }

    #[test]
    fn open_bytes() {
        let bytes = Status::open().to_bytes().unwrap();
        assert_eq!(bytes, b"MS\x01\x00\xc8\x00");
        assert_eq!(Status::decode(&bytes).unwrap(), Some((Status::open(), 6)));
    }

    #[test]
    fn error_bytes_and_trailing_payload() {
        let status = Status::new(StatusCode::NotFound, "no svc");
        let mut bytes = status.to_bytes().unwrap();
        assert_eq!(bytes, b"MS\x01\x01\x94\x06no svc");
        bytes.extend_from_slice(b"payload");
        assert_eq!(Status::decode(&bytes).unwrap(), Some((status, 12)));
    }

    #[test]
    fn reason_limit() {
        let ok = Status::new(StatusCode::BadGateway, "r".repeat(255));
        assert_eq!(ok.to_bytes().unwrap().len(), 261);
        let mut out = b"x".to_vec();
        let long = Status::new(StatusCode::BadGateway, "r".repeat(256));
        assert_eq!(long.encode(&mut out), Err(EncodeError::ReasonTooLong(256)));
        assert_eq!(out, b"x");
    }

    #[test]
    fn unknown_code_is_rejected_before_the_reason() {
        assert_eq!(
            Status::decode(b"MS\x01\x00\xc9"),
            Err(DecodeError::UnknownStatus(201))
        );
        assert_eq!(
            Status::decode(b"MS\x01\xff\xff\x00"),
            Err(DecodeError::UnknownStatus(65535))
        );
    }

    #[test]
    fn bad_prefix_and_reason() {
        assert_eq!(Status::decode(b"MN"), Err(DecodeError::BadMagic(b'N')));
        assert_eq!(
            Status::decode(b"MS\x07"),
            Err(DecodeError::UnsupportedVersion(7))
        );
        assert_eq!(
            Status::decode(b"MS\x01\x01\xf7\x01\xff"),
            Err(DecodeError::InvalidUtf8 { field: "reason" })
        );
    }
}
