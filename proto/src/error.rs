//! Errors of the `meshnode/1` codecs: one enum for encoding, one for decoding.

use crate::identity::NameError;
use crate::{MAX_HEADER_LEN, MAX_REASON_LEN, MAX_TRACEPARENT_LEN, VERSION};

/// Why a [`StreamHeader`](crate::StreamHeader) or [`Status`](crate::Status) could not be
/// encoded. Encoding checks every rule the decoder checks, so a message that encodes also
/// decodes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The service name breaks the naming rules of
    /// [`validate_service_name`](crate::identity::validate_service_name).
    #[error("service name: {0}")]
    ServiceName(NameError),
    /// The traceparent is longer than [`MAX_TRACEPARENT_LEN`] bytes; the value is its length.
    #[error("traceparent is {0} bytes, the limit is {MAX_TRACEPARENT_LEN}")]
    TraceparentTooLong(usize),
    /// The traceparent is empty or holds a byte outside visible ASCII (`0x21..=0x7e`).
    #[error("traceparent must be non-empty visible ASCII")]
    InvalidTraceparent,
    /// The whole encoded header would exceed [`MAX_HEADER_LEN`]; the value is its length.
    /// The current fields are bounded well below the limit; the check guards future fields.
    #[error("encoded header would be {0} bytes, the limit is {MAX_HEADER_LEN}")]
    TooLong(usize),
    /// The status reason is longer than [`MAX_REASON_LEN`] bytes; the value is its length.
    #[error("status reason is {0} bytes, the limit is {MAX_REASON_LEN}")]
    ReasonTooLong(usize),
}

/// Why received bytes are not a valid [`StreamHeader`](crate::StreamHeader) or
/// [`Status`](crate::Status).
///
/// Decoders return this as soon as the bytes seen so far cannot start a valid message, so a
/// caller may answer `400` and reset the stream without waiting for more input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// One of the two magic bytes is wrong (`"MN"` for a header, `"MS"` for a status): the
    /// peer is not speaking `meshnode/1`, or the message is of the other kind. The value is
    /// the offending byte.
    #[error("not a meshnode/1 message of this kind (bad magic byte 0x{0:02x})")]
    BadMagic(u8),
    /// The version byte names a wire version this build does not speak.
    #[error("unsupported meshnode/1 wire version {0} (this node speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// The length prefix declares a header longer than [`MAX_HEADER_LEN`]; the value is the
    /// declared total length, prefix included. Raised from the 5-byte prefix alone.
    #[error("declared header length {0} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    TooLong(usize),
    /// The header's declared length ends in the middle of the named field (or of a field's
    /// own length prefix), so no amount of further input can complete it.
    #[error("header length ends inside the {field} field")]
    Truncated {
        /// The field that does not fit: `"service"`, `"port"`, `"field length"` (an optional
        /// field's 2-byte length) or `"field value"` (an optional field's value).
        field: &'static str,
    },
    /// The service name breaks the naming rules of
    /// [`validate_service_name`](crate::identity::validate_service_name).
    #[error("service name: {0}")]
    InvalidServiceName(NameError),
    /// A text field holds bytes that are not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field: `"service"` or `"reason"`.
        field: &'static str,
    },
    /// The traceparent holds a byte outside visible ASCII (`0x21..=0x7e`).
    #[error("traceparent must be visible ASCII")]
    InvalidTraceparent,
    /// A known optional field has a length its type does not allow (the deadline is exactly
    /// 4 bytes, the traceparent 1 to [`MAX_TRACEPARENT_LEN`] bytes).
    #[error("{field} field has invalid length {len}")]
    FieldLength {
        /// The field: `"traceparent"` or `"deadline"`.
        field: &'static str,
        /// The length the peer declared for it.
        len: usize,
    },
    /// A known optional field appears twice; which copy wins would be ambiguous.
    #[error("{0} field appears twice")]
    DuplicateField(&'static str),
    /// An optional field of an unknown type in the mandatory class (`0x00..=0x7f`); unknown
    /// types in `0x80..=0xff` are skipped instead. The value is the type byte.
    #[error("unknown mandatory field type 0x{0:02x}")]
    UnknownField(u8),
    /// A status carries a code that is not one of [`StatusCode`](crate::StatusCode)'s.
    #[error("unknown status code {0}")]
    UnknownStatus(u16),
}
