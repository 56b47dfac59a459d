//! Holds `PROTOCOL.md` and the codec to each other: every ```` ```hex NAME ```` block in the
//! document is decoded, compared with the message it describes, and (where the encoder is
//! canonical for it) compared byte for byte with the encoder's output.

use meshnode_proto::{Status, StatusCode, StreamHeader};

const DOC: &str = include_str!("../PROTOCOL.md");

/// The bytes of the hex block named `name`. Each line is hex byte pairs, then `|` and a
/// comment.
fn example(name: &str) -> Vec<u8> {
    let fence = format!("```hex {name}");
    let start = DOC
        .lines()
        .position(|line| line.trim_end() == fence)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no block {fence:?}"));
    let mut bytes = Vec::new();
    for line in DOC.lines().skip(start + 1) {
        if line.starts_with("```") {
            return bytes;
        }
        let hex = line.split('|').next().unwrap_or_default();
        for pair in hex.split_whitespace() {
            let byte = u8::from_str_radix(pair, 16)
                .unwrap_or_else(|_| panic!("bad hex {pair:?} in block {name}"));
            bytes.push(byte);
        }
    }
    panic!("block {name} is not closed");
}

fn echo_header() -> StreamHeader {
    StreamHeader {
        service: "echo".to_string(),
        port: 7000,
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string()),
        deadline_ms: Some(1500),
    }
}

fn db_header() -> StreamHeader {
    StreamHeader {
        service: "db".to_string(),
        port: 5432,
        traceparent: None,
        deadline_ms: None,
    }
}

#[test]
fn header_full() {
    let bytes = example("header-full");
    assert_eq!(bytes.len(), 77);
    assert_eq!(echo_header().to_bytes().unwrap(), bytes);
    assert_eq!(
        StreamHeader::decode(&bytes).unwrap(),
        Some((echo_header(), 77))
    );
}

#[test]
fn header_minimal() {
    let bytes = example("header-minimal");
    assert_eq!(bytes.len(), 10);
    assert_eq!(db_header().to_bytes().unwrap(), bytes);
    assert_eq!(
        StreamHeader::decode(&bytes).unwrap(),
        Some((db_header(), 10))
    );
}

#[test]
fn header_with_ignorable_field() {
    let bytes = example("header-ignorable");
    assert_eq!(
        StreamHeader::decode(&bytes).unwrap(),
        Some((db_header(), bytes.len()))
    );
}

#[test]
fn status_open() {
    let bytes = example("status-open");
    assert_eq!(Status::open().to_bytes().unwrap(), bytes);
    assert_eq!(Status::decode(&bytes).unwrap(), Some((Status::open(), 6)));
}

#[test]
fn status_unavailable() {
    let bytes = example("status-unavailable");
    let status = Status::new(StatusCode::Unavailable, "no healthy endpoint");
    assert_eq!(bytes.len(), 25);
    assert_eq!(status.to_bytes().unwrap(), bytes);
    assert_eq!(Status::decode(&bytes).unwrap(), Some((status, 25)));
}

#[test]
fn every_example_is_tested() {
    let blocks: Vec<&str> = DOC
        .lines()
        .filter_map(|line| line.strip_prefix("```hex "))
        .collect();
    assert_eq!(
        blocks,
        [
            "header-full",
            "header-minimal",
            "header-ignorable",
            "status-open",
            "status-unavailable"
        ]
    );
}
