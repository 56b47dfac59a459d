//! Property tests of the `meshnode/1` codecs: round trips, truncation at every offset, and
//! arbitrary or corrupted input that must never panic and must be judged consistently however
//! it is split.

use meshnode_proto::identity::validate_service_name;
use meshnode_proto::{DecodeError, EncodeError, Status, StatusCode, StreamHeader, MAX_HEADER_LEN};
use proptest::prelude::*;
use proptest::sample::select;

fn service() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
}

fn header() -> impl Strategy<Value = StreamHeader> {
    (
        service(),
        any::<u16>(),
        proptest::option::of("[!-~]{1,128}"),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(service, port, traceparent, deadline_ms)| StreamHeader {
            service,
            port,
            traceparent,
            deadline_ms,
        })
}

fn status() -> impl Strategy<Value = Status> {
    (
        select(StatusCode::ALL.to_vec()),
        ".{0,80}".prop_filter("reason fits in 255 bytes", |r: &String| r.len() <= 255),
    )
        .prop_map(|(code, reason)| Status::new(code, reason))
}

/// A decoder's answer.
type Answer<T> = Result<Option<(T, usize)>, DecodeError>;

/// Runs `decode` on `buf` and checks what a decoder must do with any input.
fn judge<T: Clone + PartialEq + std::fmt::Debug>(
    buf: &[u8],
    decode: impl Fn(&[u8]) -> Answer<T>,
    encode: impl Fn(&T) -> Vec<u8>,
) {
    let whole = decode(buf);
    if let Ok(Some((msg, used))) = &whole {
        assert!(*used <= buf.len());
        // What decoded re-encodes to something that decodes to the same message.
        let again = encode(msg);
        assert_eq!(decode(&again), Ok(Some((msg.clone(), again.len()))));
    }
    // Any prefix either asks for more or already gives the final answer: an error is never
    // taken back, and a complete message never changes as more bytes arrive.
    for cut in 0..buf.len() {
        let part = decode(&buf[..cut]);
        if part != Ok(None) {
            assert_eq!(part, whole, "prefix of {cut} bytes judged differently");
        }
    }
}

fn judge_header(buf: &[u8]) {
    judge(buf, StreamHeader::decode, |h| h.to_bytes().unwrap())
}

fn judge_status(buf: &[u8]) {
    judge(buf, Status::decode, |s| s.to_bytes().unwrap())
}

proptest! {
    #[test]
    fn header_round_trip(h in header(), payload in proptest::collection::vec(any::<u8>(), 0..16)) {
        let bytes = h.to_bytes().unwrap();
        prop_assert!(bytes.len() <= MAX_HEADER_LEN);
        let mut wire = bytes.clone();
        wire.extend_from_slice(&payload);
        prop_assert_eq!(StreamHeader::decode(&wire), Ok(Some((h, bytes.len()))));
    }

    #[test]
    fn status_round_trip(s in status(), payload in proptest::collection::vec(any::<u8>(), 0..16)) {
        let bytes = s.to_bytes().unwrap();
        let mut wire = bytes.clone();
        wire.extend_from_slice(&payload);
        prop_assert_eq!(Status::decode(&wire), Ok(Some((s, bytes.len()))));
    }

    #[test]
    fn every_strict_prefix_needs_more(h in header(), s in status()) {
        let bytes = h.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            prop_assert_eq!(StreamHeader::decode(&bytes[..cut]), Ok(None), "header cut at {}", cut);
        }
        let bytes = s.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            prop_assert_eq!(Status::decode(&bytes[..cut]), Ok(None), "status cut at {}", cut);
        }
    }

    #[test]
    fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
        judge_header(&buf);
        judge_status(&buf);
    }

    #[test]
    fn random_bodies_behind_valid_prefixes(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        len in 0u16..320,
    ) {
        let mut buf = b"MN\x01".to_vec();
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&body);
        judge_header(&buf);
        let mut buf = b"MS\x01".to_vec();
        buf.extend_from_slice(&body);
        judge_status(&buf);
    }

    #[test]
    fn corrupted_encodings(
        h in header(),
        s in status(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = h.to_bytes().unwrap();
        for (at, byte) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
        judge_header(&bytes);
        let mut bytes = s.to_bytes().unwrap();
        for (at, byte) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
        judge_status(&bytes);
    }

    #[test]
    fn oversized_length_is_rejected_from_the_prefix(len in (MAX_HEADER_LEN as u16 - 4)..=u16::MAX) {
        let mut prefix = b"MN\x01".to_vec();
        prefix.extend_from_slice(&len.to_be_bytes());
        prop_assert_eq!(
            StreamHeader::decode(&prefix),
            Err(DecodeError::TooLong(5 + usize::from(len)))
        );
    }

    #[test]
    fn unknown_status_code_is_rejected(code in any::<u16>()) {
        prop_assume!(StatusCode::from_u16(code).is_none());
        let mut buf = b"MS\x01".to_vec();
        buf.extend_from_slice(&code.to_be_bytes());
        prop_assert_eq!(Status::decode(&buf), Err(DecodeError::UnknownStatus(code)));
    }

    #[test]
    fn invalid_service_names_are_rejected_both_ways(name in "[ -~]{0,70}") {
        prop_assume!(validate_service_name(&name).is_err());
        let h = StreamHeader { service: name.clone(), port: 80, traceparent: None, deadline_ms: None };
        prop_assert!(matches!(h.to_bytes(), Err(EncodeError::ServiceName(_))));

        // The same header built by hand, as a faulty or hostile peer would send it.
        let len = name.len().min(255);
        let mut buf = b"MN\x01".to_vec();
        buf.extend_from_slice(&(1 + len as u16 + 2).to_be_bytes());
        buf.push(len as u8);
        buf.extend_from_slice(&name.as_bytes()[..len]);
        buf.extend_from_slice(&80u16.to_be_bytes());
        prop_assert!(matches!(
            StreamHeader::decode(&buf),
            Err(DecodeError::InvalidServiceName(_))
        ));
    }
}
