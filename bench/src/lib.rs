//! meshnode benchmarks and test tooling.
//!
//! - [`relay`]: a fault-injecting UDP relay (delay, jitter, loss, blackhole, NAT rebinding) used
//!   between two nodes, because the kernel here has no netem. Binary: `meshrelay`.
//! - [`tcp`], [`latency`], [`http`], [`quic`]: the engines behind the `meshbench` binary (TCP
//!   sink/echo servers, bulk throughput, open-loop latency over TCP echo or HTTP/1.1, the HTTP
//!   echo target, and the raw quinn throughput ceiling).
//! - [`closed`]: closed-loop throughput (N requests outstanding) over the same protocols.
//! - [`grpc`]: a gRPC-shaped unary echo server and client over h2c (HTTP/2 prior knowledge).
//! - [`h2tunnel`]: an HBONE-shaped tunnel pair (TLS 1.3 + HTTP/2 CONNECT over one TCP
//!   connection, as ztunnel between nodes), the head-of-line-blocking comparator.

pub mod closed;
pub mod grpc;
pub mod h2tunnel;
pub mod http;
pub mod latency;
pub mod quic;
pub mod relay;
pub mod tcp;
mod tls;
