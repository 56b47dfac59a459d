//! Why a node refuses inbound work, typed once: each kind names its status code, its
//! `meshnode_inbound_rejected_total` label and its `meshnode-error` text, the same for
//! `meshnode/1` tunnels, `h3` requests and `h3` CONNECT (docs/README.md, Metrics).

use meshnode_proto::StatusCode;

/// The kinds of refusal, one label each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The node is draining: callers retry elsewhere.
    Draining,
    /// No such service hosted here.
    UnknownService,
    /// The service does not advertise the port asked for.
    UnknownPort,
    /// The caller is not in the service's `allow` list.
    Forbidden,
    /// The local target refused the connection (or reset before answering).
    TargetRefused,
    /// The local target did not answer in time.
    TargetTimeout,
    /// The caller's tunnel header or request was malformed.
    Malformed,
    /// The caller did not send its header in time.
    SlowHeader,
    /// The TLS/QUIC handshake failed (identity not accepted).
    Handshake,
    /// A request with both Content-Length and Transfer-Encoding (request smuggling).
    Smuggling,
}

impl RefusalKind {
    /// Every kind, in [`RefusalKind::index`] order.
    pub const ALL: [RefusalKind; 10] = [
        RefusalKind::Draining,
        RefusalKind::UnknownService,
        RefusalKind::UnknownPort,
        RefusalKind::Forbidden,
        RefusalKind::TargetRefused,
        RefusalKind::TargetTimeout,
        RefusalKind::Malformed,
        RefusalKind::SlowHeader,
        RefusalKind::Handshake,
        RefusalKind::Smuggling,
    ];

    /// Position in [`RefusalKind::ALL`] (for per-kind metric handles).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `reason` label of `meshnode_inbound_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::Draining => "draining",
            RefusalKind::UnknownService => "unknown_service",
            RefusalKind::UnknownPort => "unknown_port",
            RefusalKind::Forbidden => "forbidden",
            RefusalKind::TargetRefused => "target_refused",
            RefusalKind::TargetTimeout => "target_timeout",
            RefusalKind::Malformed => "malformed",
            RefusalKind::SlowHeader => "slow_header",
            RefusalKind::Handshake => "handshake",
            RefusalKind::Smuggling => "smuggling",
        }
    }

    /// The status the caller gets.
    pub fn code(self) -> StatusCode {
        match self {
            RefusalKind::Draining => StatusCode::Unavailable,
            RefusalKind::UnknownService | RefusalKind::UnknownPort => StatusCode::NotFound,
            RefusalKind::Forbidden => StatusCode::Forbidden,
            RefusalKind::TargetRefused => StatusCode::BadGateway,
            RefusalKind::TargetTimeout => StatusCode::GatewayTimeout,
            RefusalKind::Malformed
            | RefusalKind::SlowHeader
            | RefusalKind::Handshake
            | RefusalKind::Smuggling => StatusCode::BadRequest,
        }
    }

    /// The status as an `http` status code.
    pub fn http_code(self) -> http::StatusCode {
        http::StatusCode::from_u16(self.code().as_u16())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The fixed `meshnode-error` text of kinds whose text carries no detail.
    fn fixed_wire(self) -> Option<&'static str> {
        match self {
            RefusalKind::Draining => Some("node draining"),
            RefusalKind::UnknownService | RefusalKind::UnknownPort => Some("unknown service"),
            RefusalKind::TargetRefused => Some("target refused"),
            RefusalKind::TargetTimeout => Some("target timed out"),
            _ => None,
        }
    }

    /// Reads a far node's `meshnode-error` text back into the kind it encodes, for the kinds
    /// whose text is fixed. The decoder of [`Refusal::wire`], kept beside it.
    pub fn from_wire(text: &[u8]) -> Option<RefusalKind> {
        RefusalKind::ALL
            .into_iter()
            .find(|k| k.fixed_wire().is_some_and(|w| w.as_bytes() == text))
    }

    /// Whether a refusal of this kind proves the target never saw the request, so that any
    /// method may be sent elsewhere.
    pub fn target_unreached(self) -> bool {
        matches!(self, RefusalKind::Draining | RefusalKind::TargetRefused)
    }
}

/// A refusal with the detail its log line and `meshnode/1` status reason carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What kind.
    pub kind: RefusalKind,
    /// The detail, for logs and the `meshnode/1` status reason.
    pub detail: String,
}

impl Refusal {
    /// A refusal of `kind` explained by `detail`.
    pub fn new(kind: RefusalKind, detail: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            detail: detail.into(),
        }
    }

    /// The `meshnode-error` text on `h3`: fixed per kind where it can be (callers decode it),
    /// else the detail.
    pub fn wire(&self) -> &str {
        self.kind.fixed_wire().unwrap_or(&self.detail)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_codes_and_wire_text_round_trip() {
        for (i, k) in RefusalKind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
            if let Some(w) = k.fixed_wire() {
                let back = RefusalKind::from_wire(w.as_bytes());
                // Unknown port shares the text of unknown service.
                assert_eq!(back.map(|b| b.code()), Some(k.code()));
            }
        }
        assert_eq!(
            RefusalKind::from_wire(b"node draining"),
            Some(RefusalKind::Draining)
        );
        assert_eq!(RefusalKind::from_wire(b"target reset"), None);
        assert!(RefusalKind::TargetRefused.target_unreached());
        assert!(!RefusalKind::TargetTimeout.target_unreached());
        assert_eq!(
            RefusalKind::Forbidden.http_code(),
            http::StatusCode::FORBIDDEN
        );
    }
}
