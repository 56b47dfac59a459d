//! HTTP/2 by hand, for clients that must misbehave (RFC 9113 frames, RFC 7541 HPACK without
//! Huffman or dynamic-table use unless asked), and a small h1/h2c application to be the target.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;

/// The client connection preface's magic.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

/// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// Error codes.
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: length, type, flags, stream, payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The preface and an empty SETTINGS frame: what a client sends first.
pub fn client_start() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out
}

/// An HPACK integer with a `prefix`-bit prefix; `pattern` holds the bits above it.
pub fn hpack_int(pattern: u8, prefix: u8, value: usize) -> Vec<u8> {
    let max = (1usize << prefix) - 1;
    if value < max {
        return vec![pattern | value as u8];
    }
    let mut out = vec![pattern | max as u8];
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
    out
}

/// An HPACK string literal, not Huffman-coded.
pub fn hpack_string(s: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(0x00, 7, s.len());
    out.extend_from_slice(s);
    out
}

/// A header field literal without indexing, new name.
pub fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    out.extend(hpack_string(name));
    out.extend(hpack_string(value));
    out
}

/// A header field literal *with* incremental indexing, new name: it enters the dynamic table
/// (index 62 as the newest entry).
pub fn indexed_literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x40];
    out.extend(hpack_string(name));
    out.extend(hpack_string(value));
    out
}

/// The header block of a request: `:method`, `:scheme http`, `:path`, `:authority`.
pub fn request_block(method: &str, path: &str, authority: &str) -> Vec<u8> {
    let mut out = match method {
        "GET" => vec![0x82],
        "POST" => vec![0x83],
        m => {
            let mut v = hpack_int(0x00, 4, 2);
            v.extend(hpack_string(m.as_bytes()));
            v
        }
    };
    out.push(0x86);
    if path == "/" {
        out.push(0x84);
    } else {
        out.extend(hpack_int(0x00, 4, 4));
        out.extend(hpack_string(path.as_bytes()));
    }
    out.extend(hpack_int(0x00, 4, 1));
    out.extend(hpack_string(authority.as_bytes()));
    out
}

/// A frame read back.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's error code.
    pub fn goaway_code(&self) -> Option<u32> {
        let p = &self.payload;
        (self.kind == GOAWAY && p.len() >= 8).then(|| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
    }

    /// The `:status` of a response HEADERS frame, when it comes first in the block as h2 writes
    /// it: a static-table entry (200, 204, 206, 304, 400, 404, 500) or a literal with the
    /// `:status` name (index 8), raw or Huffman-coded.
    pub fn status(&self) -> Option<u16> {
        let p = &self.payload;
        if self.kind != HEADERS {
            return None;
        }
        let static_status = [200, 204, 206, 304, 400, 404, 500];
        match *p.first()? {
            b @ 0x88..=0x8e => return Some(static_status[(b - 0x88) as usize]),
            0x48 | 0x08 | 0x18 => {}
            _ => return None,
        }
        let len = (*p.get(1)? & 0x7f) as usize;
        let value = p.get(2..2 + len)?;
        let digits = if p[1] & 0x80 == 0 {
            value.to_vec()
        } else {
            huffman_digits(value)?
        };
        std::str::from_utf8(&digits).ok()?.parse().ok()
    }

    /// A RST_STREAM's error code.
    pub fn reset_code(&self) -> Option<u32> {
        let p = &self.payload;
        (self.kind == RST_STREAM && p.len() == 4)
            .then(|| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
    }
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541 Appendix B: '0'-'2' are the
/// 5-bit codes 0-2, '3'-'9' the 6-bit codes 0x19-0x1f), as a status is sent.
fn huffman_digits(coded: &[u8]) -> Option<Vec<u8>> {
    let bits: Vec<u8> = coded
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let take = |at: usize, n: usize| -> Option<u8> {
        bits.get(at..at + n)
            .map(|b| b.iter().fold(0u8, |acc, bit| acc << 1 | bit))
    };
    let mut out = Vec::new();
    let mut at = 0;
    // What is left at the end is padding: the most significant bits of EOS, all ones.
    while bits.len() - at >= 5 && bits[at..].contains(&0) {
        match take(at, 5)? {
            c @ 0..=2 => {
                out.push(b'0' + c);
                at += 5;
            }
            _ => match take(at, 6)? {
                c @ 0x19..=0x1f => {
                    out.push(b'3' + (c - 0x19));
                    at += 6;
                }
                _ => return None,
            },
        }
    }
    Some(out)
}

/// What reading the next frame gave.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    /// The peer closed (or reset) the connection.
    Closed,
    TimedOut,
}

/// Frames read from the server's side of a connection.
pub struct Frames<R> {
    r: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Frames<R> {
    pub fn new(r: R) -> Frames<R> {
        Frames { r, buf: Vec::new() }
    }

    /// The next frame, if one arrives within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Next {
        let end = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5] & 0x7f,
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]),
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Next::Frame(f);
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(end, self.r.read(&mut chunk)).await {
                Err(_) => return Next::TimedOut,
                Ok(Ok(0)) | Ok(Err(_)) => return Next::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until a GOAWAY (its frame), the end of the connection or `wait`; every frame
    /// read on the way is in `seen`.
    pub async fn until_goaway(&mut self, wait: Duration, seen: &mut Vec<Frame>) -> Next {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Frame(f) if f.kind == GOAWAY => return Next::Frame(f),
                Next::Frame(f) => seen.push(f),
                other => return other,
            }
        }
    }

    /// Reads until the connection ends or `wait` passes; true if it ended.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Frame(_) => continue,
                Next::Closed => return true,
                Next::TimedOut => return false,
            }
        }
    }
}

pub type TestBody = BoxBody<Bytes, hyper::Error>;

pub fn text(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

/// An application answering `tag` plus the HTTP version it was spoken to in; POST /echo
/// echoes (the answer's head at once, the body as it comes). Speaks HTTP/1.1, or HTTP/2
/// only when `h2`.
pub async fn app(tag: &'static str, h2: bool) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let resp: Response<TestBody> = match req.uri().path() {
                        "/echo" => Response::new(req.into_body().boxed()),
                        _ => Response::new(text(format!("{tag} {:?}", req.version()))),
                    };
                    Ok::<_, Infallible>(resp)
                });
                serve_conn(tcp, h2, svc).await;
            });
        }
    });
    Ok(addr)
}

/// Serves one test application connection with `svc`: HTTP/1.1, or HTTP/2 only when `h2`.
pub async fn serve_conn<S>(tcp: tokio::net::TcpStream, h2: bool, svc: S)
where
    S: hyper::service::HttpService<Incoming, ResBody = TestBody> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(tcp);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    }
}
