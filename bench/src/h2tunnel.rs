//! An HBONE-shaped tunnel pair, the design ztunnel runs between nodes: TLS 1.3 over **one** TCP
//! connection from the entry to the exit, and an HTTP/2 CONNECT stream on it per application
//! connection. It is the comparator for head-of-line blocking: every tunnel between the two
//! shares one TCP byte stream, so a lost segment holds back all of them until it is repaired,
//! where QUIC holds back only the stream it belonged to.
//!
//! Flow-control windows and frame size are ztunnel's defaults (istio/ztunnel `src/config.rs`:
//! 4 MiB per stream, 16 MiB per connection, 1 MiB frames). The exit's certificate is a
//! throw-away self-signed one and the entry does not check its chain ([`crate::tls`]); no
//! client certificate. Benchmark use only.
//!
//! ```text
//! meshbench h2-exit --listen 10.0.0.2:15008
//! meshbench h2-entry --exit 10.0.0.2:15008 --forward 127.0.0.1:9000=127.0.0.1:7000
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ALPN of HTTP/2 over TLS.
const ALPN: &[u8] = b"h2";
/// Per-stream receive window (ztunnel: `HTTP2_STREAM_WINDOW_SIZE`, 4 MiB).
const STREAM_WINDOW: u32 = 4 << 20;
/// Connection receive window (ztunnel: `HTTP2_CONNECTION_WINDOW_SIZE`, 16 MiB).
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest DATA frame (ztunnel: `HTTP2_FRAME_SIZE`, 1 MiB).
const FRAME_SIZE: u32 = 1 << 20;
/// Bytes read from TCP per DATA send, as meshnode's splice reads.
const READ_CHUNK: usize = 64 * 1024;

fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .max_concurrent_streams(u32::MAX);
    b
}

fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE);
    b
}

/// Runs the exit on `listen`: every CONNECT opens a TCP connection to its authority. `ready`
/// gets the bound address.
pub async fn run_exit(listen: SocketAddr, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(crate::tls::server_config(ALPN)?));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    ready(listener.local_addr()?);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_entry(acceptor, tcp).await {
                eprintln!("meshbench h2-exit: connection from {peer}: {e:#}");
            }
        });
    }
}

async fn serve_entry(acceptor: TlsAcceptor, tcp: TcpStream) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let mut conn = server_builder().handshake(tls).await?;
    while let Some(request) = conn.accept().await {
        let (request, respond) = request?;
        tokio::spawn(async move {
            if let Err(e) = serve_connect(request, respond).await {
                eprintln!("meshbench h2-exit: tunnel: {e:#}");
            }
        });
    }
    Ok(())
}

async fn serve_connect(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> anyhow::Result<()> {
    let target = match request.uri().authority() {
        Some(a) if request.method() == Method::CONNECT => a.as_str().to_owned(),
        _ => {
            let answer = Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(())?;
            respond.send_response(answer, true)?;
            return Ok(());
        }
    };
    let tcp = match TcpStream::connect(&target).await {
        Ok(t) => t,
        Err(e) => {
            let answer = Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(())?;
            respond.send_response(answer, true)?;
            bail!("connecting {target}: {e}");
        }
    };
    let send =
        respond.send_response(Response::builder().status(StatusCode::OK).body(())?, false)?;
    splice(tcp, send, request.into_body()).await
}

/// Runs the entry: one TLS connection to `exit`, and for each `(listen, target)` a listener whose
/// connections become CONNECT streams to `target` on that one connection. `ready` gets the bound
/// addresses, in the order of `forwards`, once every listener is bound.
pub async fn run_entry(
    exit: SocketAddr,
    forwards: &[(SocketAddr, String)],
    ready: impl FnOnce(&[SocketAddr]),
) -> anyhow::Result<()> {
    let connector = TlsConnector::from(Arc::new(crate::tls::client_config(ALPN)?));
    let tcp = TcpStream::connect(exit)
        .await
        .with_context(|| format!("connecting {exit}"))?;
    tcp.set_nodelay(true)?;
    let name = quinn::rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = connector
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let (sender, connection) = client_builder().handshake(tls).await?;
    let driver = tokio::spawn(connection);
    let mut listeners = Vec::with_capacity(forwards.len());
    let mut bound = Vec::with_capacity(forwards.len());
    for (listen, target) in forwards {
        let l = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        bound.push(l.local_addr()?);
        listeners.push((l, target.clone()));
    }
    ready(&bound);
    for (listener, target) in listeners {
        let sender = sender.clone();
        tokio::spawn(async move {
            loop {
                let tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // EMFILE and the like: back off rather than spin.
                        eprintln!("meshbench h2-entry: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (sender, target) = (sender.clone(), target.clone());
                tokio::spawn(async move {
                    if let Err(e) = open_tunnel(sender, &target, tcp).await {
                        eprintln!("meshbench h2-entry: tunnel to {target}: {e:#}");
                    }
                });
            }
        });
    }
    // The one connection ending ends the entry: there is no second.
    driver.await?.context("the HTTP/2 connection to the exit")?;
    bail!("the HTTP/2 connection to the exit closed")
}

async fn open_tunnel(
    sender: h2::client::SendRequest<Bytes>,
    target: &str,
    tcp: TcpStream,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut sender = sender.ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .body(())?;
    let (response, send) = sender.send_request(request, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        bail!("the exit answered {}", response.status());
    }
    splice(tcp, send, response.into_body()).await
}

/// Moves bytes both ways until both directions have ended; a FIN becomes END_STREAM and back.
async fn splice(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> anyhow::Result<()> {
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let up = async move {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            if buf.capacity() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            if tcp_r.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true)?;
                return anyhow::Ok(());
            }
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .context("stream closed")??;
                if granted > 0 {
                    send.send_data(data.split_to(granted.min(data.len())), false)?;
                }
            }
        }
    };
    let down = async move {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            tcp_w.write_all(&chunk).await?;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        tcp_w.shutdown().await?;
        anyhow::Ok(())
    };
    let (up, down) = tokio::join!(up, down);
    up.and(down)
}
