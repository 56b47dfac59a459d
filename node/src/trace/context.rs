//! W3C Trace Context `traceparent` (version 00): read what a caller sent, write what the next
//! hop gets. Pure and bounded: a malformed value is ignored (a new trace starts), never an
//! error for the request.

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// Length of a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const LEN: usize = 55;

/// The remote span context of a `traceparent`, or `None` when it is malformed or names the
/// invalid (all-zero) trace or span. Future versions are read by their version-00 prefix,
/// as the specification asks; version `ff` is invalid.
pub fn parse(value: &str) -> Option<SpanContext> {
    let v = value.trim().as_bytes();
    if v.len() < LEN || (v.len() > LEN && v[LEN] != b'-') {
        return None;
    }
    let version = hex::<1>(&v[0..2])?[0];
    if version == 0xff || (version == 0 && v.len() != LEN) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from_bytes(hex::<16>(&v[3..35])?);
    let span_id = SpanId::from_bytes(hex::<8>(&v[36..52])?);
    let flags = hex::<1>(&v[53..55])?[0];
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::NONE,
    ))
}

/// The `traceparent` that makes `cx` the parent of the next hop's span.
pub fn format(cx: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags()
    )
}

/// `N` bytes from `2N` lower-case hex digits (upper case is invalid in `traceparent`).
fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn round_trip_keeps_ids_and_sampled_flag() {
        let cx = parse(TP).expect("valid");
        assert!(cx.is_remote() && cx.is_sampled());
        assert_eq!(
            format!("{:032x}", cx.trace_id()),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(format(&cx), TP);
        let unsampled = parse(&TP.replace("-01", "-00")).expect("valid");
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "00",
            &TP.to_uppercase(),
            &TP.replace("0af7651916cd43dd8448eb211c80319c", &"0".repeat(32)),
            &TP.replace("b7ad6b7169203331", &"0".repeat(16)),
            &TP.replacen("00-", "ff-", 1),
            &format!("{TP}-extra"),
            &TP.replacen('-', "_", 1),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333é-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        // A later version with more fields is read by its version-00 prefix.
        assert!(parse(&format!("{}-what-ever", TP.replacen("00-", "01-", 1))).is_some());
    }
}
