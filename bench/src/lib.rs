//! meshnode benchmarks and test tooling.
//!
//! - [`relay`]: a fault-injecting UDP relay (delay, jitter, loss, blackhole, NAT rebinding) used
//!   between two nodes, because the kernel here has no netem. Binary: `meshrelay`.
//! - [`tcp`], [`latency`], [`quic`]: the engines behind the `meshbench` binary (TCP sink/echo
//!   servers, bulk throughput, open-loop latency, and the raw quinn throughput ceiling).

pub mod latency;
pub mod quic;
pub mod relay;
pub mod tcp;
