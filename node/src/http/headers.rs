//! Header rules of a proxy: hop-by-hop headers are removed, `x-forwarded-for` is extended,
//! `traceparent` is passed through (or started).

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::trace::{Span, TRACEPARENT};

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded. `Trailer` is not one of them (RFC
/// 2616 listed it by mistake): it names the trailer fields to come, end to end, and hyper
/// sends only the trailers it names.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers and every header the `Connection` header names. `te: trailers`
/// is kept (the one `TE` HTTP/3 allows): it says the client accepts trailers, and each hop
/// passes that on so the application's trailers reach it (hyper sends response trailers only
/// to a request that said so).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
    if accepts_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends `client` to `x-forwarded-for`.
pub fn add_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {client}"),
        _ => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// Keeps a valid W3C `traceparent` unchanged, or starts a new trace; returns its trace id.
pub fn ensure_traceparent(headers: &mut HeaderMap) -> String {
    if let Some(id) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split('-').nth(1))
        .filter(|id| id.len() == 32)
    {
        return id.to_string();
    }
    let id = format!("{:032x}", rand::random::<u128>());
    let tp = format!("00-{id}-{:016x}-01", rand::random::<u64>());
    if let Ok(v) = HeaderValue::from_str(&tp) {
        headers.insert("traceparent", v);
    }
    id
}

/// Makes `span` the parent the next hop sees, when tracing; otherwise keeps a valid
/// `traceparent` or starts a trace ([`ensure_traceparent`]). Returns the trace id.
pub fn continue_trace(headers: &mut HeaderMap, span: &Span) -> String {
    if let (Some(tp), Some(id)) = (span.traceparent(), span.trace_id()) {
        if let Ok(v) = HeaderValue::from_str(tp) {
            headers.insert(TRACEPARENT, v);
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
        headers.insert(TRACEPARENT, v);
    }
}

/// The request's `traceparent`, if it is text.
pub fn traceparent(headers: &HeaderMap) -> Option<&str> {
    headers.get(TRACEPARENT).and_then(|v| v.to_str().ok())
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
}
