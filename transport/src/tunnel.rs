//! TCP tunnels over raw QUIC streams (ALPN `meshnode/1`).
//!
//! A caller opens a bidirectional stream, writes a [`StreamHeader`], and waits for a
//! [`Status`]; after `200` both sides splice bytes between the stream and a TCP socket.
//! QUIC FIN maps to a TCP half-close and RESET_STREAM/STOP_SENDING to a TCP reset, in both
//! directions, so applications see the same semantics as a direct TCP connection.

mod splice;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meshnode_proto::{DecodeError, Status, StreamHeader, MAX_HEADER_LEN};

pub use splice::{
    splice, splice_with, LocalSide, MeshRecv, MeshSend, SpliceEnd, SpliceOutcome, TunnelCounters,
};

/// Application error code on RESET_STREAM/STOP_SENDING: the TCP peer reset its connection.
pub const CODE_TCP_RESET: u32 = 1;
/// Application error code: the stream was refused before a tunnel was opened (bad header).
pub const CODE_REFUSED: u32 = 2;
/// Application error code: the node is shutting down.
pub const CODE_SHUTDOWN: u32 = 3;

/// Errors while opening a tunnel from the calling side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The connection could not open a stream (closed, or stream limit while closing).
    #[error("cannot open a stream: {0}")]
    Stream(String),
    /// The header could not be encoded (invalid service name and the like).
    #[error("invalid tunnel header: {0}")]
    Header(String),
    /// The far node answered with something that is not a status.
    #[error("malformed status from peer: {0}")]
    Malformed(String),
    /// The stream ended or was reset before a status arrived.
    #[error("stream closed before the peer answered: {0}")]
    Closed(String),
    /// No status arrived within the deadline.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The far node refused the tunnel with this status.
    #[error("refused: {0}")]
    Refused(Status),
}

impl OpenError {
    /// Whether the target application certainly did not see this attempt, so that retrying
    /// on another endpoint is invisible to the application.
    pub fn is_retryable(&self) -> bool {
        use meshnode_proto::StatusCode as S;
        match self {
            OpenError::Stream(_) | OpenError::Closed(_) | OpenError::Timeout(_) => true,
            OpenError::Refused(s) => {
                matches!(s.code, S::BadGateway | S::Unavailable | S::GatewayTimeout)
            }
            OpenError::Header(_) | OpenError::Malformed(_) => false,
        }
    }
}

/// An open tunnel on the calling side.
#[derive(Debug)]
pub struct OpenTunnel {
    /// Towards the far node.
    pub send: quinn::SendStream,
    /// From the far node.
    pub recv: quinn::RecvStream,
    /// Payload that arrived together with the status; deliver it first.
    pub leftover: Bytes,
}

/// Opens a tunnel on `conn`: writes the header, waits up to `timeout` for the status.
pub async fn open(
    conn: &quinn::Connection,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<OpenTunnel, OpenError> {
    let bytes = header
        .to_bytes()
        .map_err(|e| OpenError::Header(e.to_string()))?;
    let attempt = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| OpenError::Stream(e.to_string()))?;
        // The stream is invisible to the peer until written to: the header goes first.
        send.write_chunk(Bytes::from(bytes))
            .await
            .map_err(|e| OpenError::Closed(e.to_string()))?;
        let (status, leftover) =
            read_message(&mut recv, Status::decode)
                .await
                .map_err(|e| match e {
                    ReadMessageError::Decode(d) => OpenError::Malformed(d.to_string()),
                    ReadMessageError::Closed(c) => OpenError::Closed(c),
                    ReadMessageError::TooLong => OpenError::Malformed(e.to_string()),
                })?;
        if !status.code.is_success() {
            let _ = send.reset(quinn::VarInt::from_u32(CODE_REFUSED));
            return Err(OpenError::Refused(status));
        }
        Ok(OpenTunnel {
            send,
            recv,
            leftover,
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(OpenError::Timeout(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        )),
    }
}

/// Errors while reading a header or status off a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadMessageError {
    /// The bytes do not form a valid message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream ended, was reset, or the connection was lost first.
    #[error("stream closed: {0}")]
    Closed(String),
    /// More than `MAX_HEADER_LEN` bytes arrived without a whole message.
    #[error("message longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
}

/// Reads the caller's header on an accepted stream. Returns the header and any payload that
/// followed it in the same read.
pub async fn read_header(
    recv: &mut quinn::RecvStream,
) -> Result<(StreamHeader, Bytes), ReadMessageError> {
    read_message(recv, StreamHeader::decode).await
}

/// Writes the callee's answer. After a non-success status the stream is finished.
pub async fn write_status(
    send: &mut quinn::SendStream,
    status: &Status,
) -> Result<(), quinn::WriteError> {
    // Reasons are ours and bounded; an encoding failure means a too-long reason, so fall
    // back to the code alone rather than failing the answer.
    let bytes = status
        .to_bytes()
        .or_else(|_| Status::new(status.code, "").to_bytes())
        .unwrap_or_default();
    send.write_chunk(Bytes::from(bytes)).await?;
    if !status.code.is_success() {
        let _ = send.finish();
    }
    Ok(())
}

/// A sans-IO decoder of `meshnode_proto`: `Ok(None)` asks for more bytes.
type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, DecodeError>;

/// Reads one length-bounded message with a sans-IO decoder. Never buffers more than
/// `MAX_HEADER_LEN` plus one read's worth of payload.
async fn read_message<T>(
    recv: &mut quinn::RecvStream,
    decode: Decoder<T>,
) -> Result<(T, Bytes), ReadMessageError> {
    let mut buf = BytesMut::new();
    loop {
        let want = MAX_HEADER_LEN.saturating_sub(buf.len()).max(1);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(ReadMessageError::Closed(
                    "finished before a whole message".into(),
                ))
            }
            Err(e) => return Err(ReadMessageError::Closed(e.to_string())),
        }
        if let Some((msg, used)) = decode(&buf)? {
            let rest = buf.split_off(used).freeze();
            return Ok((msg, rest));
        }
        if buf.len() >= MAX_HEADER_LEN {
            return Err(ReadMessageError::TooLong);
        }
    }
}
