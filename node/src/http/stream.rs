//! The one splice (`meshnode_transport::tunnel::splice_with`) for the HTTP side's tunnels: an
//! `h3` CONNECT stream on the callee, an upgraded proxy connection on the caller.
//!
//! h3-quinn panics if `stop_sending` is called on a receive stream whose pending `recv_data`
//! was cancelled, and the splice cancels the other direction when one is reset: [`H3Recv`]
//! remembers an unfinished read and then leaves the stream alone.

use bytes::{Buf, Bytes};
use h3::error::Code;
use hyper_util::rt::TokioIo;
use meshnode_transport::tunnel::{LocalSide, MeshRecv, MeshSend, SpliceEnd};

use super::body::{ServerRecv, ServerSend};

/// The sending half of an `h3` request stream, as a splice's mesh side.
pub(crate) struct H3Send(pub ServerSend);

impl MeshSend for H3Send {
    async fn send_chunk(&mut self, chunk: Bytes) -> Result<(), SpliceEnd> {
        // Each DATA frame is copied once by h3: the splice's large reads make few of them.
        self.0
            .send_data(chunk)
            .await
            .map_err(|_| SpliceEnd::PeerReset)
    }

    async fn finish(&mut self) -> Result<(), SpliceEnd> {
        self.0
            .finish()
            .await
            .map_err(|e| SpliceEnd::Error(e.to_string()))
    }

    fn reset(&mut self) {
        self.0.stop_stream(Code::H3_REQUEST_CANCELLED);
    }
}

/// The receiving half of an `h3` request stream, as a splice's mesh side.
pub(crate) struct H3Recv {
    stream: ServerRecv,
    /// A `recv_data` began and has not completed (it may have been cancelled).
    reading: bool,
}

impl H3Recv {
    pub(crate) fn new(stream: ServerRecv) -> H3Recv {
        H3Recv {
            stream,
            reading: false,
        }
    }
}

impl MeshRecv for H3Recv {
    async fn recv_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, SpliceEnd> {
        self.reading = true;
        let got = self.stream.recv_data().await;
        self.reading = false;
        match got {
            Ok(Some(mut buf)) => {
                if let Some(slot) = bufs.first_mut() {
                    *slot = buf.copy_to_bytes(buf.remaining());
                }
                Ok(Some(1))
            }
            Ok(None) => Ok(None),
            Err(_) => Err(SpliceEnd::PeerReset),
        }
    }

    fn stop(&mut self) {
        if !self.reading {
            self.stream.stop_sending(Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// An upgraded client connection (the proxy's CONNECT), as a splice's local side.
pub(crate) struct Upgraded(pub TokioIo<hyper::upgrade::Upgraded>);

impl LocalSide for Upgraded {
    type Read<'a> = tokio::io::ReadHalf<&'a mut TokioIo<hyper::upgrade::Upgraded>>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut TokioIo<hyper::upgrade::Upgraded>>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(&mut self.0)
    }
}
