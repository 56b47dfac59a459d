//! meshnode benchmarks and test tooling.
//!
//! - [`relay`]: a fault-injecting UDP relay (delay, jitter, loss, blackhole, NAT rebinding) used
//!   between two nodes, because the kernel here has no netem. Binary: `meshrelay`.
//! - [`tcp`], [`latency`], [`http`], [`quic`]: the engines behind the `meshbench` binary (TCP
//!   sink/echo servers, bulk throughput, open-loop latency over TCP echo or HTTP/1.1, the HTTP
//!   echo target, and the raw quinn throughput ceiling).

pub mod http;
pub mod latency;
pub mod quic;
pub mod relay;
pub mod tcp;
