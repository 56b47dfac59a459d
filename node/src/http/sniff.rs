//! Request-smuggling guard for the proxy. hyper accepts a request carrying both
//! `Content-Length` and `Transfer-Encoding` (it drops the length and closes the connection
//! afterwards), a `Transfer-Encoding` such as `chunked, chunked`, and two `Host` headers; the
//! proxy refuses such requests with 400 instead (RFC 9112 §6.1, §3.2). The sniffer watches the
//! bytes hyper reads, parses each request head at a known message boundary and records a
//! [`Verdict`] on a refused one. After a chunked request the boundaries are no longer tracked; hyper
//! itself frames such a connection safely. An h2c connection (its first bytes are the HTTP/2
//! preface) is not watched: HTTP/2 frames every body itself.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest head the sniffer keeps (hyper refuses larger ones with 431 anyway).
const MAX_HEAD: usize = super::MAX_HEADER_BYTES + 1024;

/// Why a request head is refused, as the sniffer's shared flag holds it (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Verdict {
    /// Both `Content-Length` and `Transfer-Encoding`.
    Smuggling = 1,
    /// A `Transfer-Encoding` other than one `chunked` (repeated, or another coding).
    TransferEncoding = 2,
    /// More than one `Host` header.
    DuplicateHost = 3,
}

impl Verdict {
    /// The verdict stored in `flag`, if any.
    pub(crate) fn of(flag: &AtomicU8) -> Option<Verdict> {
        match flag.load(Ordering::SeqCst) {
            1 => Some(Verdict::Smuggling),
            2 => Some(Verdict::TransferEncoding),
            3 => Some(Verdict::DuplicateHost),
            _ => None,
        }
    }

    /// The `reason` label of `meshnode_http_rejected_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Verdict::Smuggling => "smuggling",
            Verdict::TransferEncoding => "transfer_encoding",
            Verdict::DuplicateHost => "duplicate_host",
        }
    }

    /// The answer's reason text.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Verdict::Smuggling => "conflicting Content-Length and Transfer-Encoding",
            Verdict::TransferEncoding => "Transfer-Encoding must be exactly one chunked",
            Verdict::DuplicateHost => "more than one Host header",
        }
    }
}

enum State {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// Boundaries unknown from here on.
    Off,
}

/// A client connection whose request heads are checked as hyper reads them.
pub(crate) struct Sniffer<T = TcpStream> {
    inner: T,
    state: State,
    flag: Arc<AtomicU8>,
}

impl<T> Sniffer<T> {
    /// Wraps `inner`; `flag` gets the [`Verdict`] of a refused head.
    pub(crate) fn new(inner: T, flag: Arc<AtomicU8>) -> Sniffer<T> {
        Sniffer {
            inner,
            state: State::Head(Vec::new()),
            flag,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Body(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::Head(buf) => {
                    // Blank lines between requests are allowed before a head.
                    if buf.is_empty() {
                        while let [b'\r' | b'\n', rest @ ..] = data {
                            data = rest;
                        }
                        if data.is_empty() {
                            return;
                        }
                    }
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    if buf.starts_with(H2_PREFACE) {
                        self.state = State::Off;
                        return;
                    }
                    let Some(end) = find_head_end(buf) else {
                        if buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let consumed = end - before;
                    let next = inspect(&buf[..end]);
                    data = &data[consumed..];
                    match next {
                        Framing::Refused(verdict) => {
                            self.flag.store(verdict as u8, Ordering::SeqCst);
                            self.state = State::Off;
                        }
                        Framing::Length(0) => self.state = State::Head(Vec::new()),
                        Framing::Length(n) => self.state = State::Body(n),
                        Framing::Unknown => self.state = State::Off,
                    }
                }
            }
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

enum Framing {
    Refused(Verdict),
    Length(u64),
    Unknown,
}

fn inspect(head: &[u8]) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return Framing::Unknown;
    }
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    let count = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    let te = has("transfer-encoding");
    if te && has("content-length") {
        return Framing::Refused(Verdict::Smuggling);
    }
    if te {
        let only_chunked = count("transfer-encoding") == 1
            && req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("transfer-encoding")
                    && std::str::from_utf8(h.value)
                        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"))
            });
        if !only_chunked {
            return Framing::Refused(Verdict::TransferEncoding);
        }
    }
    if count("host") > 1 {
        return Framing::Refused(Verdict::DuplicateHost);
    }
    if te || req.method == Some("CONNECT") {
        return Framing::Unknown;
    }
    let len = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match len {
        Some(n) => Framing::Length(n),
        None if has("content-length") => Framing::Unknown,
        None => Framing::Length(0),
    }
}

/// What the first bytes of a client connection say it speaks (an `[[outbound]]` port in
/// `auto` mode decides by them: docs/behaviour.md, Outbound ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    /// The HTTP/2 connection preface: h2c with prior knowledge.
    H2c,
    /// An HTTP/1.x request line.
    Http1,
    /// Anything else.
    Other,
}

/// What a client's first bytes say of an HTTP/2 connection preface (RFC 9113 §3.4: the magic,
/// then a SETTINGS frame). hyper's h2 checks the magic but takes any frame after it (a PING,
/// say) and then waits, so the proxy checks the SETTINGS itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preface {
    /// Not HTTP/2: the bytes depart from the magic.
    NotH2,
    /// The magic, then a SETTINGS frame's head.
    Valid,
    /// The magic, then anything else: a connection error of type PROTOCOL_ERROR.
    Invalid,
}

/// Bytes of the magic and of the SETTINGS frame head that must follow it.
pub(crate) const PREFACE_WITH_SETTINGS: usize = H2_PREFACE.len() + 9;

/// Classifies a client's first bytes; `None` while they could still be a valid preface.
pub(crate) fn preface(first: &[u8]) -> Option<Preface> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        return Some(Preface::NotH2);
    }
    let head = first.get(H2_PREFACE.len()..PREFACE_WITH_SETTINGS)?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    const SETTINGS: u8 = 0x4;
    const ACK: u8 = 0x1;
    let settings =
        head[3] == SETTINGS && head[4] & ACK == 0 && stream == 0 && len.is_multiple_of(6);
    Some(if settings {
        Preface::Valid
    } else {
        Preface::Invalid
    })
}

/// The answer to an invalid preface: the server's own preface (an empty SETTINGS frame), then
/// GOAWAY with last stream 0, PROTOCOL_ERROR and a reason.
pub(crate) fn bad_preface_answer() -> Vec<u8> {
    const PROTOCOL_ERROR: u32 = 0x1;
    let debug: &[u8] = b"the connection preface must end with a SETTINGS frame";
    let len = (8 + debug.len()) as u32;
    let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 0x7, 0]);
    out.extend_from_slice(&0u32.to_be_bytes()); // stream 0
    out.extend_from_slice(&0u32.to_be_bytes()); // last stream id
    out.extend_from_slice(&PROTOCOL_ERROR.to_be_bytes());
    out.extend_from_slice(debug);
    out
}

/// Longest request line [`detect`] waits for: as much as the proxy accepts for a whole head.
pub(crate) const MAX_REQUEST_LINE: usize = super::MAX_HEADER_BYTES;
/// Longest method name taken for HTTP (the registered ones have at most 17 characters).
const MAX_METHOD: usize = 32;

/// Classifies the first bytes of a client connection; `None` while they could still be an
/// HTTP/2 preface or an HTTP/1.x request line. Bytes that break the request line's grammar
/// (RFC 9112 §3: `token SP target SP HTTP/1.d CRLF`; empty lines before it are skipped) are
/// `Other` as soon as they arrive, so binary protocols are told apart by their first byte.
pub(crate) fn detect(first: &[u8]) -> Option<Detected> {
    if first.starts_with(H2_PREFACE) {
        return Some(Detected::H2c);
    }
    if H2_PREFACE.starts_with(first) {
        return None;
    }
    let line = {
        let skip = first
            .iter()
            .position(|b| !matches!(b, b'\r' | b'\n'))
            .unwrap_or(first.len());
        &first[skip..]
    };
    let other = Some(Detected::Other);
    let mut i = 0;
    // Method: a token, then one space.
    while i < line.len() && is_tchar(line[i]) {
        i += 1;
    }
    if i > MAX_METHOD {
        return other;
    }
    match line.get(i) {
        None => return undecided(first),
        Some(b' ') if i > 0 => i += 1,
        Some(_) => return other,
    }
    // Target: visible ASCII, then one space.
    let start = i;
    while i < line.len() && line[i].is_ascii_graphic() {
        i += 1;
    }
    match line.get(i) {
        None => return undecided(first),
        Some(b' ') if i > start => i += 1,
        Some(_) => return other,
    }
    // Version, then the line's end.
    const VERSION: &[u8] = b"HTTP/1.";
    let rest = &line[i..];
    let n = rest.len().min(VERSION.len());
    if rest[..n] != VERSION[..n] {
        return other;
    }
    match rest.get(VERSION.len()..) {
        None | Some([]) => undecided(first),
        Some([d, ..]) if !d.is_ascii_digit() => other,
        Some([_]) | Some([_, b'\r']) => undecided(first),
        Some([_, b'\n', ..]) | Some([_, b'\r', b'\n', ..]) => Some(Detected::Http1),
        Some(_) => other,
    }
}

/// `None` (more bytes needed) unless the line is already longer than any accepted.
fn undecided(first: &[u8]) -> Option<Detected> {
    (first.len() > MAX_REQUEST_LINE).then_some(Detected::Other)
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniffer<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            if !matches!(self.state, State::Off) {
                let fresh = &buf.filled()[start..];
                self.feed(fresh);
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniffer<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{detect, preface, Detected, Preface, H2_PREFACE, MAX_REQUEST_LINE};

    #[test]
    fn an_h2_preface_must_go_on_with_settings() {
        let with = |frame: &[u8]| [H2_PREFACE, frame].concat();
        // Empty SETTINGS, and one setting (6 bytes).
        assert_eq!(
            preface(&with(&[0, 0, 0, 4, 0, 0, 0, 0, 0])),
            Some(Preface::Valid)
        );
        assert_eq!(
            preface(&with(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3])),
            Some(Preface::Valid)
        );
        for (frame, why) in [
            (&[0, 0, 8, 6, 0, 0, 0, 0, 0][..], "PING first"),
            (&[0, 0, 0, 4, 1, 0, 0, 0, 0], "SETTINGS ACK first"),
            (&[0, 0, 0, 4, 0, 0, 0, 0, 1], "SETTINGS on a stream"),
            (&[0, 0, 5, 4, 0, 0, 0, 0, 0], "SETTINGS of 5 bytes"),
            (b"hello, no", "no frame at all"),
        ] {
            assert_eq!(preface(&with(frame)), Some(Preface::Invalid), "{why}");
        }
        // Undecided until the frame head is complete; decided as soon as the magic is left.
        for n in 0..H2_PREFACE.len() + 9 {
            assert_eq!(
                preface(&with(&[0, 0, 0, 4, 0, 0, 0, 0, 0])[..n]),
                None,
                "{n}"
            );
        }
        assert_eq!(preface(b"GET / HTTP/1.1\r\n"), Some(Preface::NotH2));
        assert_eq!(preface(b"PRI * HTTP/1.1"), Some(Preface::NotH2));
        assert_eq!(preface(b"P"), None);
    }

    #[test]
    fn the_h2_preface_is_h2c_and_its_prefixes_wait() {
        assert_eq!(detect(H2_PREFACE), Some(Detected::H2c));
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(detect(&with_settings), Some(Detected::H2c));
        for n in 0..H2_PREFACE.len() {
            assert_eq!(detect(&H2_PREFACE[..n]), None, "{n} bytes");
        }
    }

    #[test]
    fn request_lines_are_http1_once_the_line_ends() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://web/x HTTP/1.0\r\n",
            b"OPTIONS * HTTP/1.1\n",
            b"\r\nDELETE /x HTTP/1.1\r\n",
            b"PRI-VATE /x HTTP/1.1\r\n",
            b"CONNECT web:80 HTTP/1.1\r\n",
        ] {
            assert_eq!(detect(line), Some(Detected::Http1), "{line:?}");
            for n in 1..line.iter().position(|&b| b == b'\n').unwrap_or(0) {
                assert_eq!(detect(&line[..n]), None, "{:?}", &line[..n]);
            }
        }
    }

    #[test]
    fn other_bytes_are_told_apart_as_soon_as_they_break_the_grammar() {
        for (bytes, why) in [
            (&b"\x16\x03\x01\x02\x00"[..], "TLS ClientHello"),
            (b"PING\r\n", "redis inline command"),
            (b"*1\r\n$4\r\nPING\r\n", "redis protocol"),
            (b"SSH-2.0-OpenSSH_9.2\r\n", "ssh banner"),
            (b"GET  / HTTP/1.1\r\n", "two spaces"),
            (b"GET / HTTP/2.0\r\n", "not HTTP/1"),
            (b"GET / HTTP/1.1 x\r\n", "junk after the version"),
            (b"GET /\x01 HTTP/1.1\r\n", "control byte in the target"),
            (b" GET / HTTP/1.1\r\n", "leading space"),
            (
                b"PR\x00",
                "diverges from the preface with a byte no method has",
            ),
        ] {
            assert_eq!(detect(bytes), Some(Detected::Other), "{why}");
        }
        assert_eq!(detect(b"SET k"), None, "could still be a request line");
        assert_eq!(
            detect(&[b'A'; 40]),
            Some(Detected::Other),
            "a method longer than any"
        );
        let mut long = b"GET /".to_vec();
        long.resize(MAX_REQUEST_LINE + 1, b'a');
        assert_eq!(detect(&long), Some(Detected::Other), "a line too long");
    }
}
