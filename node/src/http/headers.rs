//! Header rules of a proxy: hop-by-hop headers are removed, `x-forwarded-for` is extended,
//! `traceparent` is passed through (or started).

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::trace::{Span, TRACEPARENT};

/// `traceparent`, built once (a `&str` name is parsed on every use).
static TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded. `Trailer` is not one of them (RFC
/// 2616 listed it by mistake): it names the trailer fields to come, end to end, and hyper
/// sends only the trailers it names. Names built once: removing by `&str` would parse the
/// name on every request.
static HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes hop-by-hop headers and every header the `Connection` header names. `te: trailers`
/// is kept (the one `TE` HTTP/3 allows): it says the client accepts trailers, and each hop
/// passes that on so the application's trailers reach it (hyper sends response trailers only
/// to a request that said so).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (comparisons of known names
    // are integer compares) spares the removals, each a hash and a probe.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let accepts_trailers = headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if accepts_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Appends `client` to `x-forwarded-for`.
pub fn add_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    let mut value = match headers.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()) {
        Some(prev) if !prev.trim_ascii().is_empty() => {
            let mut v = prev.to_vec();
            v.extend_from_slice(b", ");
            v
        }
        _ => Vec::with_capacity(15),
    };
    push_ip(&mut value, client);
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// Writes `ip` as text: IPv4 by hand (the common case, per request), IPv6 through `Display`.
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(_) => out.extend_from_slice(ip.to_string().as_bytes()),
    }
}

/// A new trace id and span id, both non-zero (W3C forbids all-zero ids). Ids need to be
/// unique, not unpredictable: a fast generator per thread, seeded once from the OS's, as the
/// OpenTelemetry SDK's id generator does, instead of the cryptographic one per request.
fn new_ids() -> (u128, u64) {
    use rand::{Rng, SeedableRng};
    thread_local! {
        static IDS: std::cell::RefCell<rand::rngs::SmallRng> =
            std::cell::RefCell::new(rand::rngs::SmallRng::from_entropy());
    }
    IDS.with(|r| {
        let mut r = r.borrow_mut();
        (r.gen::<u128>().max(1), r.gen::<u64>().max(1))
    })
}

/// Lower-case hex of `bytes` into `out`.
fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

/// Keeps a valid W3C `traceparent` unchanged, or starts a new trace; returns its trace id.
pub fn ensure_traceparent(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers
        .get(&TRACEPARENT_NAME)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split('-').nth(1))
        .filter(|id| id.len() == 32)
    {
        return id.to_string();
    }
    // A new trace: random non-zero ids (W3C forbids all-zero ones), hex written directly.
    let (trace, parent) = new_ids();
    let (trace, parent) = (trace.to_be_bytes(), parent.to_be_bytes());
    let mut tp = Vec::with_capacity(55);
    tp.extend_from_slice(b"00-");
    push_hex(&mut tp, &trace);
    tp.push(b'-');
    push_hex(&mut tp, &parent);
    tp.extend_from_slice(b"-01");
    let id = String::from_utf8_lossy(&tp[3..35]).into_owned();
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(tp)) {
        headers.insert(TRACEPARENT_NAME.clone(), v);
    }
    id
}

/// Makes `span` the parent the next hop sees, when tracing; otherwise keeps a valid
/// `traceparent` or starts a trace ([`ensure_traceparent`]). Returns the trace id.
pub fn continue_trace(headers: &mut HeaderMap, span: &Span) -> String {
    if let (Some(tp), Some(id)) = (span.traceparent(), span.trace_id()) {
        if let Ok(v) = HeaderValue::from_str(tp) {
            headers.insert(TRACEPARENT_NAME.clone(), v);
            return id;
        }
    }
    ensure_traceparent(headers)
}

/// Makes `span` the parent the next hop sees, when tracing; leaves the headers alone
/// otherwise.
pub fn set_parent(headers: &mut HeaderMap, span: &Span) {
    if let Some(v) = span
        .traceparent()
        .and_then(|tp| HeaderValue::from_str(tp).ok())
    {
        headers.insert(TRACEPARENT_NAME.clone(), v);
    }
}

/// The request's `traceparent`, if it is text.
pub fn traceparent(headers: &HeaderMap) -> Option<&str> {
    headers.get(&TRACEPARENT_NAME).and_then(|v| v.to_str().ok())
}

/// The host part of an authority or `Host` value, lower-cased, without the port.
pub fn host_of(authority: &str) -> String {
    let a = authority.trim();
    let host = match a.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(']') => h,
        Some((h, _)) if h.ends_with(']') => h,
        _ => a,
    };
    host.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn te_is_reduced_to_trailers_or_removed() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip, Trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn forwarded_for_appends_and_traceparent_is_kept() {
        let mut h = HeaderMap::new();
        add_forwarded_for(
            &mut h,
            "10.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
        );
        add_forwarded_for(
            &mut h,
            "10.0.0.2".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert("traceparent", HeaderValue::from_static(tp));
        assert_eq!(
            ensure_traceparent(&mut h),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(h["traceparent"], tp);
        assert_eq!(host_of("Web:8080"), "web");
        assert_eq!(host_of("web"), "web");
    }

    #[test]
    fn forwarded_for_writes_every_address_form() {
        for ip in [
            "0.0.0.0",
            "10.0.5.99",
            "192.168.100.255",
            "::1",
            "2001:db8::7",
        ] {
            let mut h = HeaderMap::new();
            add_forwarded_for(&mut h, ip.parse().unwrap_or_else(|_| unreachable!()));
            assert_eq!(h["x-forwarded-for"], ip);
        }
    }

    #[test]
    fn a_new_trace_is_a_valid_traceparent() {
        let mut h = HeaderMap::new();
        let id = ensure_traceparent(&mut h);
        let tp = h["traceparent"].to_str().unwrap_or_default().to_owned();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "01"));
        assert_eq!(parts[1], id);
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16));
        assert!(tp[3..]
            .chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_ne!(parts[1], "0".repeat(32));
        // A second trace is a different one.
        let mut h2 = HeaderMap::new();
        assert_ne!(ensure_traceparent(&mut h2), id);
    }
}
