//! Request-smuggling guard for the proxy. hyper accepts a request carrying both
//! `Content-Length` and `Transfer-Encoding` (it drops the length and closes the connection
//! afterwards); the proxy refuses such requests with 400 instead. The sniffer watches the
//! bytes hyper reads, parses each request head at a known message boundary and raises a flag
//! on a conflicting one. After a chunked request the boundaries are no longer tracked; hyper
//! itself frames such a connection safely. An h2c connection (its first bytes are the HTTP/2
//! preface) is not watched: HTTP/2 frames every body itself.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest head the sniffer keeps (hyper refuses larger ones with 431 anyway).
const MAX_HEAD: usize = super::MAX_HEADER_BYTES + 1024;

enum State {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// Boundaries unknown from here on.
    Off,
}

/// A client connection whose request heads are checked as hyper reads them.
pub(crate) struct Sniffer {
    inner: TcpStream,
    state: State,
    flag: Arc<AtomicBool>,
}

impl Sniffer {
    /// Wraps `inner`; `flag` is raised when a conflicting head is seen.
    pub(crate) fn new(inner: TcpStream, flag: Arc<AtomicBool>) -> Sniffer {
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
                        Framing::Conflict => {
                            self.flag.store(true, Ordering::SeqCst);
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
    Conflict,
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
    let te = has("transfer-encoding");
    if te && has("content-length") {
        return Framing::Conflict;
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

impl AsyncRead for Sniffer {
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

impl AsyncWrite for Sniffer {
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
