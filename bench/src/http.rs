//! HTTP/1.1 target and client for `meshbench http-echo` and `meshbench http`.
//!
//! **Server** ([`serve_echo`]): hyper's HTTP/1.1 server with keep-alive; every request, whatever
//! its method and path, gets `200` with a fixed body of `size` bytes and `Content-Length`. The
//! request body is read and discarded. A request's `x-seq` header is copied to the response, so
//! the client can check that each answer belongs to the request it waits for.
//!
//! **Client** ([`HttpGet`]): a [`Protocol`] for the open-loop engine in [`crate::latency`], so
//! the schedule, the coordinated-omission correction and the histograms are the same as for
//! TCP echo. Requests are origin-form `GET PATH HTTP/1.1` with `Host: HOST`, which is how
//! meshnode's HTTP proxy routes (by `Host` when the target is not absolute-form); sent direct
//! to `http-echo`, the `Host` header is ignored. Requests are pipelined on each keep-alive
//! connection of the pool; a server that handles one request at a time per connection (hyper,
//! meshnode's proxy) answers them in order, which the reader checks with `x-seq`.

use std::convert::Infallible;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::latency::{Answer, Protocol};

/// The header carrying the request's sequence number, copied to the response.
pub const SEQ_HEADER: &str = "x-seq";
/// Longest response head the client accepts (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Most headers the client parses in one response.
const MAX_HEADERS: usize = 64;

/// Serves HTTP/1.1 on every connection accepted from `listener`, forever: each request is
/// answered `200` with `body` (see the module docs).
pub async fn serve_echo(listener: TcpListener, body: Bytes) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, body.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                if !e.is_incomplete_message() {
                    eprintln!("meshbench http-echo: {peer}: {e}");
                }
            }
        });
    }
}

async fn answer(req: Request<Incoming>, body: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    let seq = req.headers().get(SEQ_HEADER).cloned();
    let mut incoming = req.into_body();
    // Discard the request body frame by frame (never buffered whole).
    while let Some(frame) = incoming.frame().await {
        if frame.is_err() {
            break;
        }
    }
    let len = body.len();
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len as u64));
    if let Some(seq) = seq {
        resp.headers_mut().insert(SEQ_HEADER, seq);
    }
    Ok(resp)
}

/// `GET` requests with `Host` and `x-seq`; see the module docs.
#[derive(Clone, Debug)]
pub struct HttpGet {
    /// The `Host` header: the mesh service name when going through meshnode's proxy.
    pub host: String,
    /// The origin-form request target, e.g. `/`.
    pub path: String,
    /// If set, a `2xx` whose body has another length counts as an error.
    pub expect_size: Option<u64>,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// The response head, parsed: status, body framing and `x-seq`.
struct Head {
    status: u16,
    framing: Framing,
    seq: Option<u64>,
}

enum Framing {
    Length(u64),
    Chunked,
    None,
}

/// Reads one response head (up to and including the empty line) and parses it.
fn read_head(input: &mut BufReader<TcpStream>) -> io::Result<Head> {
    let mut raw = Vec::with_capacity(512);
    loop {
        let before = raw.len();
        let n = input
            .by_ref()
            .take(MAX_HEAD as u64)
            .read_until(b'\n', &mut raw)?;
        if n == 0 {
            return Err(if before == 0 {
                io::ErrorKind::UnexpectedEof.into()
            } else {
                invalid("connection closed inside a response head")
            });
        }
        if raw.len() > MAX_HEAD {
            return Err(invalid("response head too long"));
        }
        let line = &raw[before..];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(invalid("incomplete response head")),
        Err(e) => return Err(invalid(format!("bad response head: {e}"))),
    }
    let status = resp.code.ok_or_else(|| invalid("no status code"))?;
    let mut framing = Framing::None;
    let mut seq = None;
    for h in resp.headers.iter() {
        let value = || std::str::from_utf8(h.value).map(str::trim);
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| invalid("bad Content-Length"))?;
            if !matches!(framing, Framing::Chunked) {
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value().is_ok_and(|v| v.to_ascii_lowercase().ends_with("chunked")) {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case(SEQ_HEADER) {
            seq = value().ok().and_then(|v| v.parse().ok());
        }
    }
    Ok(Head {
        status,
        framing,
        seq,
    })
}

/// Reads and discards exactly `n` bytes.
fn skip(input: &mut BufReader<TcpStream>, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut input.by_ref().take(n), &mut io::sink())?;
    if copied < n {
        return Err(invalid("connection closed inside a response body"));
    }
    Ok(())
}

/// Reads one CRLF-terminated line of at most 1 KiB.
fn read_line(input: &mut BufReader<TcpStream>) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    input.by_ref().take(1024).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(invalid("bad chunk framing"));
    }
    Ok(line)
}

/// Reads and discards a chunked body (and its trailers); returns its length.
fn skip_chunked(input: &mut BufReader<TcpStream>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let line = read_line(input)?;
        let text = std::str::from_utf8(&line).map_err(|_| invalid("bad chunk size"))?;
        let hex = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(hex, 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while read_line(input)?.len() > 2 {}
            return Ok(total);
        }
        skip(input, size)?;
        total = total.saturating_add(size);
        if read_line(input)? != b"\r\n" {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

impl Protocol for HttpGet {
    fn encode(&self, seq: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(SEQ_HEADER.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
    }

    fn decode(&self, input: &mut BufReader<TcpStream>) -> io::Result<Answer> {
        let head = read_head(input)?;
        let len = match head.framing {
            Framing::Length(n) => {
                skip(input, n)?;
                n
            }
            Framing::Chunked => skip_chunked(input)?,
            Framing::None if head.status == 204 || head.status == 304 => 0,
            Framing::None => return Err(invalid("response without Content-Length or chunking")),
        };
        let size_ok = self.expect_size.is_none_or(|want| want == len);
        Ok(Answer {
            seq: head.seq,
            ok: (200..300).contains(&head.status) && size_ok,
        })
    }
}

/// Connects once, sends one request and reads the answer: a readiness probe for scripts.
pub fn probe(addr: SocketAddr, request: &HttpGet) -> io::Result<Answer> {
    let stream = TcpStream::connect(addr)?;
    let mut input = BufReader::new(stream.try_clone()?);
    let mut out = Vec::new();
    request.encode(0, &mut out);
    io::Write::write_all(&mut &stream, &out)?;
    request.decode(&mut input)
}
