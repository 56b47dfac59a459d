//! Wire formats and shared types of meshnode, sans-IO.
//!
//! This crate owns the bytes that cross the wire between two meshnode nodes on the
//! `meshnode/1` ALPN (docs/protocol.md, "`meshnode/1`: TCP tunnels"): the [`StreamHeader`] a
//! caller writes first on a new bidirectional QUIC stream, and the [`Status`] the callee writes
//! back before any payload.
//! It also holds the naming rules ([`identity`]) shared by configuration, certificates and
//! discovery.
//!
//! There are no sockets, no async runtime and no clock here. Decoders take the bytes received
//! so far and answer with `Ok(None)` when they need more, `Ok(Some((message, consumed)))` once a
//! whole message is there (bytes after `consumed` belong to the tunnel), or an error as soon as
//! the bytes seen cannot start a valid message. Decoders never read past the message, never
//! allocate more than the small per-field bounds, and never panic on any input; the byte
//! layout is documented in `proto/PROTOCOL.md`.
//!
//! ```
//! use meshnode_proto::{Status, StatusCode, StreamHeader};
//!
//! let header = StreamHeader {
//!     service: "echo".to_string(),
//!     port: 7000,
//!     traceparent: None,
//!     deadline_ms: Some(1500),
//! };
//! let mut wire = header.to_bytes().unwrap();
//! wire.extend_from_slice(b"payload");
//!
//! // The callee may see the bytes in pieces: a strict prefix only asks for more.
//! assert_eq!(StreamHeader::decode(&wire[..3]).unwrap(), None);
//! let (decoded, used) = StreamHeader::decode(&wire).unwrap().unwrap();
//! assert_eq!(decoded, header);
//! assert_eq!(&wire[used..], b"payload");
//!
//! let answer = Status::new(StatusCode::Unavailable, "node draining").to_bytes().unwrap();
//! let (status, _) = Status::decode(&answer).unwrap().unwrap();
//! assert_eq!(status.code.as_u16(), 503);
//! ```

#![warn(missing_docs)]

mod error;
mod header;
pub mod identity;
mod reader;
mod status;

pub use error::{DecodeError, EncodeError};
pub use header::StreamHeader;
pub use identity::NameError;
pub use status::{Status, StatusCode};

/// Wire version of the `meshnode/1` stream header and status (the byte after the magic).
pub const VERSION: u8 = 1;

/// Upper bound of a whole encoded [`StreamHeader`], the 5-byte prefix included.
///
/// A peer that declares a longer header is rejected from the prefix alone, before the body is
/// read, so a slow or hostile caller cannot make a node buffer more than this per stream.
pub const MAX_HEADER_LEN: usize = 4096;

/// Longest `traceparent` carried in a header, in bytes. A version-00 W3C traceparent is 55
/// bytes; the slack leaves room for future versions, which may append fields.
pub const MAX_TRACEPARENT_LEN: usize = 128;

/// Longest human-readable reason in a [`Status`], in bytes (the length is one byte on the wire).
pub const MAX_REASON_LEN: usize = 255;

/// ALPN of the L4 fast path: one raw bidirectional QUIC stream per TCP connection.
pub const ALPN_MESHNODE: &[u8] = b"meshnode/1";

/// ALPN of HTTP/3 (RFC 9114), used for HTTP services and standard CONNECT tunnels.
pub const ALPN_H3: &[u8] = b"h3";
