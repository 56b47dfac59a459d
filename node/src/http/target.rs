//! The callee's clients to its local targets: HTTP/1.1 connections driven by the request that
//! uses them ([`H1Pool`]), and hyper-util's pooled h2c client for `http2` and `grpc` targets.
//!
//! A pooled client such as hyper-util's runs every HTTP/1.1 connection on a task of its own: a
//! request reaches the target through a channel to that task and its answer comes back through
//! another, two task hand-offs per request, and each answer with a body spawned one more task to
//! put the connection back when the body ended. Here the request's own task polls the
//! connection: while it waits for the answer's head, and as it reads the body ([`H1Body`]). A
//! connection at rest in the pool is not polled; taken out, it is polled once, so that one the
//! target has closed is seen and passed over; a request that could not be written on a reused
//! connection (it was never sent) goes out again on another, the rule hyper-util follows.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Body, POOL_IDLE_TIMEOUT, TARGET_CONNECT_TIMEOUT};

type H2Client =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// Idle HTTP/1.1 connections kept per target at most; more are closed as they come back.
const MAX_IDLE_PER_TARGET: usize = 256;

/// The clients to this node's targets: HTTP/1.1 (keep-alive) for `http` services, h2c with
/// prior knowledge (one multiplexed connection per target) for `http2` and `grpc`.
#[derive(Clone)]
pub struct TargetClient {
    h1: Arc<H1Pool>,
    h2: H2Client,
}

impl TargetClient {
    /// Fresh clients with empty pools. Inside a runtime, a task closes HTTP/1.1 connections
    /// idle longer than [`POOL_IDLE_TIMEOUT`]; it ends with the client.
    pub fn new() -> TargetClient {
        let h1 = Arc::new(H1Pool::new(POOL_IDLE_TIMEOUT, TARGET_CONNECT_TIMEOUT));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(H1Pool::sweep(Arc::downgrade(&h1)));
        }
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(TARGET_CONNECT_TIMEOUT));
        let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http2_only(true)
            .build(connector);
        TargetClient { h1, h2 }
    }

    /// Sends `req` to a target speaking HTTP/2 (`h2`; the URI absolute, `http://target/path`)
    /// or HTTP/1.1 at `target` (the URI in origin form, or absolute).
    pub async fn request(
        &self,
        target: SocketAddr,
        mut req: Request<Body>,
        h2: bool,
    ) -> Result<Response<TargetBody>, TargetError> {
        if h2 {
            *req.version_mut() = http::Version::HTTP_2;
            // HTTP/2 carries no Host: the URI's authority becomes `:authority`.
            req.headers_mut().remove(HOST);
            let resp = self.h2.request(req).await.map_err(TargetError::H2)?;
            Ok(resp.map(TargetBody::Right))
        } else {
            let resp = self.h1.request(target, req).await?;
            Ok(resp.map(TargetBody::Left))
        }
    }
}

impl Default for TargetClient {
    fn default() -> Self {
        TargetClient::new()
    }
}

/// Why a request to a target failed.
#[derive(Debug)]
pub enum TargetError {
    /// No connection to the target (refused, unreachable, or not within the connect timeout).
    Connect(std::io::Error),
    /// The HTTP/1.1 exchange failed (the target reset or closed the connection, or answered
    /// something that is not HTTP).
    H1(hyper::Error),
    /// The h2c client failed (connecting or the exchange).
    H2(hyper_util::client::legacy::Error),
}

impl TargetError {
    /// The target could not be reached at all (the request never reached it).
    pub fn is_connect(&self) -> bool {
        match self {
            TargetError::Connect(_) => true,
            TargetError::H1(_) => false,
            TargetError::H2(e) => e.is_connect(),
        }
    }
}

impl std::fmt::Display for TargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetError::Connect(e) => write!(f, "connecting to the target: {e}"),
            TargetError::H1(e) => write!(f, "HTTP/1.1 to the target: {e}"),
            TargetError::H2(e) => write!(f, "h2c to the target: {e}"),
        }
    }
}

impl std::error::Error for TargetError {}

/// A target's answer body: read through the HTTP/1.1 connection it arrives on (`Left`), or
/// from the h2c client's stream (`Right`).
pub type TargetBody = http_body_util::Either<H1Body, Incoming>;

type H1Conn = http1::Connection<TokioIo<TcpStream>, Body>;

/// One HTTP/1.1 connection: the request side and the connection itself, which whoever uses
/// the connection polls. `conn` is `None` once the connection has ended; boxed (hyper's
/// connection state is most of a kilobyte), so that answers and pool entries move a pointer.
struct Driven {
    sender: http1::SendRequest<Body>,
    conn: Option<Box<H1Conn>>,
}

impl Driven {
    /// Polls the connection once (reads, writes, state changes); drops it when it ends, so
    /// that a request still queued on it fails with its message given back.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = self.conn.as_mut() {
            if Pin::new(&mut **conn).poll(cx).is_ready() {
                self.conn = None;
            }
        }
    }

    /// Whether the connection can carry another request now. Polls it once first, so that a
    /// close or stray bytes from the target are seen.
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx);
        self.conn.is_some() && self.sender.is_ready()
    }

    /// Sends `req` and drives the connection until the answer's head arrives.
    async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>> {
        let mut answer = std::pin::pin!(self.sender.try_send_request(req));
        poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            // The connection takes the request, writes it, reads the answer and hands it over:
            // all on this task, so the answer is looked at again right after.
            self.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await
    }
}

/// A pool of HTTP/1.1 connections to local targets, each driven by the request using it.
pub struct H1Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

struct Idle {
    conn: Driven,
    since: Instant,
}

impl H1Pool {
    /// An empty pool: connections idle longer than `idle_timeout` are closed; a connection
    /// attempt may take `connect_timeout`.
    pub fn new(idle_timeout: Duration, connect_timeout: Duration) -> H1Pool {
        H1Pool {
            idle: Mutex::default(),
            idle_timeout,
            connect_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` to `target` on an idle connection, or a new one. The request goes out in
    /// origin form (`/path?query`; an absolute URI is cut to it) with a `Host` header.
    pub async fn request(
        self: &Arc<Self>,
        target: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<H1Body>, TargetError> {
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let origin = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            if let Ok(uri) = Uri::try_from(origin) {
                *req.uri_mut() = uri;
            }
        }
        if !req.headers().contains_key(HOST) {
            if let Ok(host) = HeaderValue::from_str(&target.to_string()) {
                req.headers_mut().insert(HOST, host);
            }
        }
        loop {
            let (mut conn, reused) = match self.checkout(target).await {
                Some(c) => (c, true),
                None => (self.connect(target).await?, false),
            };
            match conn.send(req).await {
                Ok(resp) => {
                    let pool = Arc::downgrade(self);
                    return Ok(resp.map(|inner| H1Body {
                        inner,
                        conn: Some(conn),
                        ended: false,
                        home: (pool, target),
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send again, on another connection.
                    Some(again) if reused => req = again,
                    _ => return Err(TargetError::H1(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection to `target` that is still open.
    async fn checkout(&self, target: SocketAddr) -> Option<Driven> {
        loop {
            let idle = {
                let mut pool = self.lock();
                let list = pool.get_mut(&target)?;
                let idle = list.pop();
                if list.is_empty() {
                    pool.remove(&target);
                }
                idle?
            };
            if idle.since.elapsed() >= self.idle_timeout {
                // The rest of the list is older still; closed outside the lock.
                let expired = self.lock().remove(&target);
                drop(expired);
                continue;
            }
            let mut conn = idle.conn;
            if poll_fn(|cx| Poll::Ready(conn.reusable(cx))).await {
                return Some(conn);
            }
        }
    }

    async fn connect(&self, target: SocketAddr) -> Result<Driven, TargetError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| {
                TargetError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                ))
            })?
            .map_err(TargetError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(TargetError::H1)?;
        Ok(Driven {
            sender,
            conn: Some(Box::new(conn)),
        })
    }

    fn checkin(&self, target: SocketAddr, conn: Driven) {
        let mut pool = self.lock();
        let list = pool.entry(target).or_default();
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections to `target`.
    #[cfg(test)]
    fn idle_count(&self, target: SocketAddr) -> usize {
        self.lock().get(&target).map_or(0, Vec::len)
    }

    /// Closes connections idle past the timeout, every third of it, while the pool lives.
    async fn sweep(pool: Weak<H1Pool>) {
        let every = match pool.upgrade() {
            Some(p) => (p.idle_timeout / 3).max(Duration::from_millis(100)),
            None => return,
        };
        loop {
            tokio::time::sleep(every).await;
            let Some(pool) = pool.upgrade() else { return };
            let expired: Vec<Idle> = {
                let mut map = pool.lock();
                let mut expired = Vec::new();
                map.retain(|_, list| {
                    // Oldest first: the expired ones are a prefix.
                    let fresh = list.partition_point(|i| i.since.elapsed() >= pool.idle_timeout);
                    expired.extend(list.drain(..fresh));
                    !list.is_empty()
                });
                expired
            };
            // Closed outside the lock.
            drop(expired);
        }
    }
}

/// An answer's body from an HTTP/1.1 target, read through its connection, which it drives.
/// Read to its end, it puts the connection back into the pool when dropped; dropped before,
/// it closes the connection, so the target sees the request cancelled.
pub struct H1Body {
    inner: Incoming,
    conn: Option<Driven>,
    ended: bool,
    home: (Weak<H1Pool>, SocketAddr),
}

impl hyper::body::Body for H1Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut frame = Pin::new(&mut this.inner).poll_frame(cx);
        if frame.is_pending() {
            // The connection reads the next piece and hands it to `inner`, on this task.
            if let Some(conn) = this.conn.as_mut() {
                conn.drive(cx);
            }
            frame = Pin::new(&mut this.inner).poll_frame(cx);
        }
        if let Poll::Ready(None) = frame {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        if !(self.ended || self.inner.is_end_stream()) {
            return;
        }
        let (Some(mut conn), Some(pool)) = (self.conn.take(), self.home.0.upgrade()) else {
            return;
        };
        // One poll lets the connection finish the answer (its end is read) and turn idle;
        // nothing waits on it, so no waker is needed.
        if conn.reusable(&mut Context::from_waker(Waker::noop())) {
            pool.checkin(self.home.1, conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::body;

    /// A real HTTP/1.1 server (hyper's) on loopback answering `size` bytes (the request's own
    /// body for a POST); counts the TCP connections it accepted. `keep_alive: false` answers
    /// `Connection: close`.
    async fn target(size: usize, keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let body = if req.method() == http::Method::POST {
                        req.into_body().collect().await?.to_bytes()
                    } else {
                        Bytes::from(vec![b'x'; size])
                    };
                    Ok::<_, hyper::Error>(Response::new(Full::new(body)))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        (addr, accepted)
    }

    fn pool() -> Arc<H1Pool> {
        Arc::new(H1Pool::new(Duration::from_secs(90), Duration::from_secs(5)))
    }

    fn get(addr: SocketAddr) -> Request<Body> {
        let mut req = Request::new(body::empty());
        *req.uri_mut() = format!("http://{addr}/path?q=1").parse().expect("uri");
        req
    }

    async fn read_all(resp: Response<H1Body>) -> Bytes {
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = target(100_000, true).await;
        let pool = pool();
        for _ in 0..20 {
            let resp = pool.request(addr, get(addr)).await.expect("answer");
            assert_eq!(resp.status(), 200);
            assert_eq!(read_all(resp).await.len(), 100_000);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(addr), 1);
    }

    #[tokio::test]
    async fn a_request_body_streams_to_the_target() {
        let (addr, accepted) = target(0, true).await;
        let pool = pool();
        for i in 0..3u8 {
            let data = Bytes::from(vec![i; 300_000]);
            let mut req = Request::new(body::full(data.clone()));
            *req.method_mut() = http::Method::POST;
            *req.uri_mut() = format!("http://{addr}/echo").parse().expect("uri");
            let resp = pool.request(addr, req).await.expect("answer");
            assert_eq!(read_all(resp).await, data);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_all_come_back() {
        let (addr, accepted) = target(10, true).await;
        let pool = pool();
        let answers = (0..8).map(|_| {
            let pool = pool.clone();
            async move { read_all(pool.request(addr, get(addr)).await.expect("answer")).await }
        });
        let bodies = futures_util::future::join_all(answers).await;
        assert!(bodies.iter().all(|b| b.len() == 10));
        let opened = accepted.load(Ordering::SeqCst);
        assert_eq!(pool.idle_count(addr), opened);
        assert!((1..=8).contains(&opened), "{opened} connections");
    }

    #[tokio::test]
    async fn connection_close_answers_are_not_pooled() {
        let (addr, accepted) = target(10, false).await;
        let pool = pool();
        for _ in 0..3 {
            read_all(pool.request(addr, get(addr)).await.expect("answer")).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle_count(addr), 0);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        // Nothing listens there any more.
        let err = pool()
            .request(addr, get(addr))
            .await
            .err()
            .expect("refused");
        assert!(err.is_connect(), "{err}");
    }

    /// A target that answers one request on a connection and closes the connection when told
    /// to (a message on the returned sender); sends the request head it read once it has.
    async fn one_shot_target() -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedSender<()>,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let (closed, seen) = tokio::sync::mpsc::unbounded_channel();
        let (close, mut told) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut head = vec![0u8; 4096];
                let n = tcp.read(&mut head).await.unwrap_or(0);
                head.truncate(n);
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                if told.recv().await.is_none() {
                    return;
                }
                drop(tcp);
                let _ = closed.send(head);
            }
        });
        (addr, accepted, close, seen)
    }

    #[tokio::test]
    async fn a_connection_the_target_closed_is_passed_over() {
        let (addr, accepted, close, mut closed) = one_shot_target().await;
        let pool = pool();
        let resp = pool.request(addr, get(addr)).await.expect("first");
        assert_eq!(read_all(resp).await, "ok");
        assert_eq!(pool.idle_count(addr), 1);
        close.send(()).expect("target");
        let head = closed.recv().await.expect("closed");
        // Sent in origin form, with a Host.
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("get /path?q=1 http/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("host: {addr}\r\n")), "{head}");
        // The FIN is in the pooled connection's socket; let the reactor see it.
        tokio::task::yield_now().await;
        assert_eq!(pool.idle_count(addr), 1);
        let resp = pool.request(addr, get(addr)).await.expect("second");
        assert_eq!(read_all(resp).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(close);
    }

    #[tokio::test]
    async fn an_answer_dropped_before_its_end_closes_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (saw_close, mut closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
                .await;
            // The rest never comes; the client's close is what ends this read.
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            let _ = saw_close.send(n);
        });
        let pool = pool();
        let resp = pool.request(addr, get(addr)).await.expect("answer");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "half");
        drop(body);
        let n = tokio::time::timeout(Duration::from_secs(10), &mut closed)
            .await
            .expect("the target saw the connection close")
            .expect("sent");
        assert_eq!(n, 0);
        assert_eq!(pool.idle_count(addr), 0);
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_closed() {
        let (addr, accepted) = target(10, true).await;
        let pool = Arc::new(H1Pool::new(Duration::ZERO, Duration::from_secs(5)));
        for _ in 0..2 {
            read_all(pool.request(addr, get(addr)).await.expect("answer")).await;
        }
        // Each came back and was found expired by the next.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
