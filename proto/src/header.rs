//! The stream header a caller writes first on a new `meshnode/1` stream.
//!
//! Layout (every byte is described in `proto/PROTOCOL.md`):
//!
//! ```text
//! "MN" version(1) body_len(u16 BE) | service_len(u8) service port(u16 BE) [type(u8) len(u16 BE) value]*
//! ```

use crate::identity::{validate_service_name, NameError, MAX_NAME_LEN};
use crate::reader::{check_prefix, finish, Reader, Stop};
use crate::{DecodeError, EncodeError, MAX_HEADER_LEN, MAX_TRACEPARENT_LEN, VERSION};

/// Magic of a stream header: ASCII `"MN"`.
const MAGIC: [u8; 2] = *b"MN";
/// Magic, version and the 2-byte body length.
const PREFIX_LEN: usize = 5;
/// Type byte of the optional traceparent field.
const TLV_TRACEPARENT: u8 = 0x01;
/// Type byte of the optional deadline field.
const TLV_DEADLINE: u8 = 0x02;
/// Type, then a 2-byte length.
const TLV_HEAD_LEN: usize = 3;
/// Optional field types with this bit set may be skipped by a receiver that does not know
/// them; unknown types without it are an error.
const TLV_IGNORABLE: u8 = 0x80;

/// First bytes a caller writes on a new bidirectional `meshnode/1` stream: which service it
/// wants, and the context of the call.
///
/// The caller's identity is not here: the callee takes it from the caller's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Service name, 1 to 63 characters of `[a-z0-9-]`
    /// (see [`validate_service_name`](crate::identity::validate_service_name)).
    pub service: String,
    /// Advertised port of the service, for services that advertise several.
    pub port: u16,
    /// W3C `traceparent` of the caller's span: 1 to [`MAX_TRACEPARENT_LEN`] bytes of
    /// visible ASCII. Its syntax beyond that is the tracing layer's business.
    pub traceparent: Option<String>,
    /// Budget for opening the tunnel, in milliseconds from when the callee reads the header.
    /// Relative because the two hosts' clocks differ.
    pub deadline_ms: Option<u32>,
}

impl StreamHeader {
    /// Appends the encoded header to `out`.
    ///
    /// Every field is checked before anything is written, so on error `out` is unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        validate_service_name(&self.service).map_err(EncodeError::ServiceName)?;
        if let Some(tp) = &self.traceparent {
            if tp.len() > MAX_TRACEPARENT_LEN {
                return Err(EncodeError::TraceparentTooLong(tp.len()));
            }
            if !valid_traceparent(tp.as_bytes()) {
                return Err(EncodeError::InvalidTraceparent);
            }
        }
        let body_len = 1
            + self.service.len()
            + 2
            + self
                .traceparent
                .as_ref()
                .map_or(0, |tp| TLV_HEAD_LEN + tp.len())
            + self.deadline_ms.map_or(0, |_| TLV_HEAD_LEN + 4);
        let total = PREFIX_LEN + body_len;
        if total > MAX_HEADER_LEN {
            return Err(EncodeError::TooLong(total));
        }

        out.reserve(total);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        // Both casts are lossless: total <= MAX_HEADER_LEN and the name is <= 63 bytes.
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        out.push(self.service.len() as u8);
        out.extend_from_slice(self.service.as_bytes());
        out.extend_from_slice(&self.port.to_be_bytes());
        if let Some(tp) = &self.traceparent {
            put_tlv(out, TLV_TRACEPARENT, tp.as_bytes());
        }
        if let Some(deadline) = self.deadline_ms {
            put_tlv(out, TLV_DEADLINE, &deadline.to_be_bytes());
        }
        Ok(())
    }

    /// The encoded header in a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes a header from the start of `buf`, the bytes received on the stream so far.
    ///
    /// `Ok(None)`: the bytes are a valid beginning, read more. `Ok(Some((header, consumed)))`:
    /// a whole header; the bytes after `consumed` are tunnel payload. `Err`: the bytes cannot
    /// start a valid header; this is decided as early as possible (a wrong first byte, or an
    /// oversized length from the 5-byte prefix alone), and further input never changes it.
    pub fn decode(buf: &[u8]) -> Result<Option<(StreamHeader, usize)>, DecodeError> {
        finish(decode_header(buf))
    }
}

fn put_tlv(out: &mut Vec<u8>, ty: u8, value: &[u8]) {
    out.push(ty);
    // Lossless: values are at most MAX_TRACEPARENT_LEN bytes.
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn valid_traceparent(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn decode_header(buf: &[u8]) -> Result<(StreamHeader, usize), Stop> {
    check_prefix(buf, MAGIC)?;
    let mut prefix = Reader::new(buf, PREFIX_LEN);
    prefix.skip(3, "magic")?;
    let body_len = usize::from(prefix.u16("length")?);
    let total = PREFIX_LEN + body_len;
    if total > MAX_HEADER_LEN {
        return Err(DecodeError::TooLong(total).into());
    }

    // Past the prefix, read only this header's own bytes: what follows is payload.
    let body = buf.get(PREFIX_LEN..total.min(buf.len())).unwrap_or(&[]);
    let mut r = Reader::new(body, body_len);

    let service_len = usize::from(r.u8("service")?);
    if service_len == 0 {
        return Err(DecodeError::InvalidServiceName(NameError::Empty).into());
    }
    if service_len > MAX_NAME_LEN {
        let err = NameError::TooLong { max: MAX_NAME_LEN };
        return Err(DecodeError::InvalidServiceName(err).into());
    }
    let service = std::str::from_utf8(r.take(service_len, "service")?)
        .map_err(|_| DecodeError::InvalidUtf8 { field: "service" })?;
    validate_service_name(service).map_err(DecodeError::InvalidServiceName)?;
    let port = r.u16("port")?;

    let mut header = StreamHeader {
        service: service.to_string(),
        port,
        traceparent: None,
        deadline_ms: None,
    };
    while !r.at_end() {
        let ty = r.u8("field type")?;
        // Judge the type before its length arrives: an unknown mandatory type or a duplicate
        // is fatal whatever follows.
        match ty {
            TLV_TRACEPARENT if header.traceparent.is_some() => {
                return Err(DecodeError::DuplicateField("traceparent").into());
            }
            TLV_DEADLINE if header.deadline_ms.is_some() => {
                return Err(DecodeError::DuplicateField("deadline").into());
            }
            TLV_TRACEPARENT | TLV_DEADLINE => {}
            _ if ty & TLV_IGNORABLE != 0 => {}
            _ => return Err(DecodeError::UnknownField(ty).into()),
        }
        let len = usize::from(r.u16("field length")?);
        match ty {
            TLV_TRACEPARENT => {
                if len == 0 || len > MAX_TRACEPARENT_LEN {
                    let field = "traceparent";
                    return Err(DecodeError::FieldLength { field, len }.into());
                }
                let value = r.take(len, "field value")?;
                if !valid_traceparent(value) {
                    return Err(DecodeError::InvalidTraceparent.into());
                }
                // Visible ASCII is UTF-8, so this never substitutes anything.
                header.traceparent = Some(String::from_utf8_lossy(value).into_owned());
            }
            TLV_DEADLINE => {
                if len != 4 {
                    let field = "deadline";
                    return Err(DecodeError::FieldLength { field, len }.into());
                }
                let v = r.take(4, "field value")?;
                header.deadline_ms = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            }
            _ => r.skip(len, "field value")?,
        }
    }
    Ok((header, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(service: &str, port: u16) -> StreamHeader {
        StreamHeader {
            service: service.to_string(),
            port,
            traceparent: None,
            deadline_ms: None,
        }
    }

    /// The header of `db:5432` with no optional fields, then the given TLV bytes.
    fn with_tlvs(tlvs: &[u8]) -> Vec<u8> {
        let mut out = b"MN\x01".to_vec();
        out.extend_from_slice(&(5 + tlvs.len() as u16).to_be_bytes());
        out.extend_from_slice(b"\x02db\x15\x38");
        out.extend_from_slice(tlvs);
        out
    }

    #[test]
    fn minimal_header_bytes() {
        let bytes = header("db", 5432).to_bytes().unwrap();
        assert_eq!(bytes, b"MN\x01\x00\x05\x02db\x15\x38");
        assert_eq!(bytes, with_tlvs(&[]));
        let decoded = StreamHeader::decode(&bytes).unwrap();
        assert_eq!(decoded, Some((header("db", 5432), 10)));
    }

    #[test]
    fn full_header_bytes() {
        let h = StreamHeader {
            traceparent: Some("00-ab-01".to_string()),
            deadline_ms: Some(1500),
            ..header("db", 5432)
        };
        let bytes = h.to_bytes().unwrap();
        let expected = with_tlvs(b"\x01\x00\x0800-ab-01\x02\x00\x04\x00\x00\x05\xdc");
        assert_eq!(bytes, expected);
        assert_eq!(StreamHeader::decode(&bytes).unwrap(), Some((h, 28)));
    }

    #[test]
    fn encode_appends_and_leaves_out_unchanged_on_error() {
        let mut out = b"xy".to_vec();
        header("db", 5432).encode(&mut out).unwrap();
        assert_eq!(&out[..2], b"xy");
        assert_eq!(&out[2..], &header("db", 5432).to_bytes().unwrap()[..]);

        let mut out = b"xy".to_vec();
        let err = header("Db", 1).encode(&mut out).unwrap_err();
        assert_eq!(err, EncodeError::ServiceName(NameError::InvalidChar('D')));
        assert_eq!(out, b"xy");
    }

    #[test]
    fn encode_checks_the_traceparent() {
        let mut h = header("db", 1);
        h.traceparent = Some(String::new());
        assert_eq!(h.to_bytes(), Err(EncodeError::InvalidTraceparent));
        h.traceparent = Some("a b".to_string());
        assert_eq!(h.to_bytes(), Err(EncodeError::InvalidTraceparent));
        h.traceparent = Some("x".repeat(129));
        assert_eq!(h.to_bytes(), Err(EncodeError::TraceparentTooLong(129)));
        h.traceparent = Some("x".repeat(128));
        assert!(h.to_bytes().is_ok());
    }

    #[test]
    fn payload_after_the_header_is_not_consumed() {
        let mut bytes = header("db", 5432).to_bytes().unwrap();
        bytes.extend_from_slice(b"\xffMN garbage");
        let (_, used) = StreamHeader::decode(&bytes).unwrap().unwrap();
        assert_eq!(used, 10);
    }

    #[test]
    fn oversized_length_is_rejected_from_the_prefix_alone() {
        assert_eq!(StreamHeader::decode(b"MN\x01\x0f\xfb"), Ok(None));
        assert_eq!(
            StreamHeader::decode(b"MN\x01\x0f\xfc"),
            Err(DecodeError::TooLong(4097))
        );
        assert_eq!(
            StreamHeader::decode(b"MN\x01\xff\xff"),
            Err(DecodeError::TooLong(65540))
        );
    }

    #[test]
    fn invalid_service_names_are_rejected_as_early_as_possible() {
        let err = |b: &[u8]| StreamHeader::decode(b).unwrap_err();
        let name = DecodeError::InvalidServiceName;
        assert_eq!(err(b"MN\x01\x00\x06\x00"), name(NameError::Empty));
        assert_eq!(
            err(b"MN\x01\x00\x06\x40"),
            name(NameError::TooLong { max: 63 })
        );
        assert_eq!(
            err(b"MN\x01\x00\x06\x02dB"),
            name(NameError::InvalidChar('B'))
        );
        assert_eq!(err(b"MN\x01\x00\x06\x02d-"), name(NameError::BadEdge));
        assert_eq!(
            err(b"MN\x01\x00\x06\x02\xc3\x28"),
            DecodeError::InvalidUtf8 { field: "service" }
        );
    }

    #[test]
    fn declared_length_too_short_for_the_fields() {
        let err = |b: &[u8]| StreamHeader::decode(b).unwrap_err();
        let truncated = |field| DecodeError::Truncated { field };
        assert_eq!(err(b"MN\x01\x00\x00"), truncated("service"));
        assert_eq!(err(b"MN\x01\x00\x02\x02"), truncated("service"));
        assert_eq!(err(b"MN\x01\x00\x04\x02db"), truncated("port"));
        assert_eq!(err(&with_tlvs(b"\x01")[..]), truncated("field length"));
        assert_eq!(
            err(&with_tlvs(b"\x01\x00\x05ab")[..]),
            truncated("field value")
        );
        // A field overrunning the declared length fails before its value arrives.
        let mut short = with_tlvs(b"\x81\x00\x10");
        short[4] += 2;
        assert_eq!(err(&short), truncated("field value"));
    }

    #[test]
    fn ignorable_unknown_fields_are_skipped() {
        let bytes = with_tlvs(b"\x80\x00\x00\xff\x00\x02hi\x02\x00\x04\x00\x00\x00\x07");
        let (h, used) = StreamHeader::decode(&bytes).unwrap().unwrap();
        assert_eq!(h.deadline_ms, Some(7));
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn mandatory_unknown_fields_are_rejected_on_the_type_byte() {
        for ty in [0x00, 0x03, 0x7f] {
            let bytes = with_tlvs(&[ty]);
            let err = StreamHeader::decode(&bytes).unwrap_err();
            assert_eq!(err, DecodeError::UnknownField(ty));
        }
    }

    #[test]
    fn bad_optional_fields() {
        let err = |tlvs: &[u8]| StreamHeader::decode(&with_tlvs(tlvs)).unwrap_err();
        let len = |field, len| DecodeError::FieldLength { field, len };
        assert_eq!(err(b"\x01\x00\x00"), len("traceparent", 0));
        assert_eq!(err(b"\x01\x00\x81"), len("traceparent", 129));
        assert_eq!(err(b"\x01\x00\x02a\n"), DecodeError::InvalidTraceparent);
        assert_eq!(err(b"\x02\x00\x02"), len("deadline", 2));
        assert_eq!(
            err(b"\x02\x00\x04\x00\x00\x00\x01\x02"),
            DecodeError::DuplicateField("deadline")
        );
        assert_eq!(
            err(b"\x01\x00\x01a\x01"),
            DecodeError::DuplicateField("traceparent")
        );
    }
}
