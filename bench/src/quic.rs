//! The raw quinn ceiling: a minimal bulk sender and receiver over one QUIC connection, with no
//! TCP legs, configured the way a data-centre mesh would be.
//!
//! The client opens one bidirectional stream, writes `N` bytes as large zero-copy chunks
//! ([`quinn::SendStream::write_chunk`]) and finishes the stream; the server counts the bytes to the
//! end of the stream and answers with the count as 8 big-endian bytes, which stops the clock.
//!
//! The server uses a throw-away self-signed certificate (rcgen). The client does not check the
//! certificate chain (there is none to check), but still verifies the handshake signature, so the
//! handshake costs what a real one does. Benchmark use only.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, TokioRuntime, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::tcp::BulkRun;

/// ALPN of the raw bulk protocol.
const ALPN: &[u8] = b"meshbench-bulk";
/// Size of each chunk handed to `write_chunk`.
const WRITE_CHUNK: usize = 1 << 20;
/// Stream flow-control window (bytes).
const STREAM_WINDOW: u32 = 16 << 20;
/// Connection flow-control window (bytes).
const CONN_WINDOW: u32 = 32 << 20;
/// Requested UDP socket buffer size (capped by net.core.{r,w}mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

/// Transport settings for a data centre rather than the internet: windows well above the
/// bandwidth-delay product, keep-alive, a 1 ms initial RTT estimate.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONN_WINDOW))
        .send_window(u64::from(CONN_WINDOW))
        .initial_rtt(Duration::from_millis(1))
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(VarInt::from_u32(30_000).into()));
    t
}

/// A UDP socket with large buffers, bound to `addr`.
fn udp_socket(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding UDP {addr}"))?;
    Ok(socket.into())
}

fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> anyhow::Result<Endpoint> {
    let socket = udp_socket(addr)?;
    Ok(Endpoint::new(
        EndpointConfig::default(),
        server,
        socket,
        Arc::new(TokioRuntime),
    )?)
}

/// Server configuration with a fresh self-signed certificate for `localhost`.
fn server_config() -> anyhow::Result<quinn::ServerConfig> {
    let tls = crate::tls::server_config(ALPN)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Runs the bulk receiver on `listen` until the task is dropped. `ready` gets the bound address.
pub async fn serve(listen: SocketAddr, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let endpoint = endpoint(listen, Some(server_config()?))?;
    ready(endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let result = async {
                let connection = incoming.await?;
                while let Ok((send, recv)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        if let Err(e) = count_stream(send, recv).await {
                            eprintln!("meshbench quic-bulk-server: stream: {e:#}");
                        }
                    });
                }
                anyhow::Ok(())
            };
            if let Err(e) = result.await {
                eprintln!("meshbench quic-bulk-server: connection: {e:#}");
            }
        });
    }
    Ok(())
}

/// Counts one stream's bytes to its end and answers with the count.
async fn count_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let mut total = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        total += chunk.bytes.len() as u64;
    }
    send.write_all(&total.to_be_bytes()).await?;
    send.finish()?;
    // Let the answer go out before the stream is dropped.
    let _ = send.stopped().await;
    Ok(())
}

/// Connects a fresh client endpoint to a `quic-bulk-server` at `server`.
pub async fn connect(server: SocketAddr) -> anyhow::Result<(Endpoint, quinn::Connection)> {
    let tls = crate::tls::client_config(ALPN)?;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config()));
    let any: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = endpoint(any, None)?;
    endpoint.set_default_client_config(config);
    let connection = endpoint
        .connect(server, "localhost")?
        .await
        .with_context(|| format!("QUIC handshake with {server}"))?;
    Ok((endpoint, connection))
}

/// Sends `bytes` split over `streams` concurrent new streams of `connection` (as meshnode carries
/// that many tunnels on one peer connection) and times it until every stream's count arrives.
pub async fn bulk(
    connection: &quinn::Connection,
    bytes: u64,
    streams: usize,
) -> anyhow::Result<BulkRun> {
    ensure!(streams >= 1, "--streams must be at least 1");
    // WRITE_CHUNK bytes of pattern; every write hands quinn a cheap slice of it (no copy).
    let window = crate::tcp::Pattern::new()
        .window(0, crate::tcp::CHUNK)
        .to_vec();
    let chunk = Bytes::from(window.repeat(WRITE_CHUNK / crate::tcp::CHUNK));
    let n = streams as u64;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        // The remainder goes to the first stream.
        let share = bytes / n + if i == 0 { bytes % n } else { 0 };
        let (connection, chunk) = (connection.clone(), chunk.clone());
        tasks.spawn(async move { send_stream(&connection, share, &chunk).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(BulkRun::new(bytes, start.elapsed()))
}

/// Sends `bytes` of `chunk`'s pattern on one new stream and waits for the server's count.
async fn send_stream(
    connection: &quinn::Connection,
    bytes: u64,
    chunk: &Bytes,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut sent = 0u64;
    while sent < bytes {
        let len = usize::try_from(bytes - sent)
            .unwrap_or(usize::MAX)
            .min(chunk.len());
        send.write_chunk(chunk.slice(..len)).await?;
        sent += len as u64;
    }
    send.finish()?;
    let answer = recv
        .read_to_end(8)
        .await
        .context("reading the server's byte count")?;
    let counted: [u8; 8] = answer.as_slice().try_into().context("short byte count")?;
    let counted = u64::from_be_bytes(counted);
    ensure!(
        counted == bytes,
        "the server counted {counted} bytes, {bytes} were sent"
    );
    Ok(())
}
