//! meshnode's transport: one QUIC endpoint per node with mutual TLS, the peer connection
//! pool, and TCP tunnels over raw QUIC streams (ALPN `meshnode/1`).
//!
//! Layering: [`tls`] and [`pki`] hold identities; [`endpoint`] owns the UDP socket and the
//! quinn endpoint (on the [`runtime`] glue between quinn and tokio); [`peers`] keeps this node's outbound connections; [`tunnel`] opens, accepts
//! and splices tunnels. Policy (which endpoint, retries, authorisation) lives in the node.
#![warn(missing_docs)]

pub mod admission;
pub mod config;
pub mod endpoint;
pub mod files;
pub mod keys;
pub mod memory;
pub mod peers;
pub mod pki;
pub mod runtime;
pub mod stream_limit;
pub mod tls;
pub mod tunnel;

pub use config::TransportConfig;
pub use endpoint::{
    AcceptError, Alpn, ConnectError, EndpointOptions, Handshake, InboundConnection, MeshEndpoint,
};
pub use peers::{InboundInfo, PeerEvent, PeerInfo, PeerPool, PeerState, QuicStats};
pub use quinn;
pub use stream_limit::{StreamLimit, StreamPermit};
pub use tls::Identity;
