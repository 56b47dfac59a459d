//! The meshnode node: configuration, the running node (inbound and outbound tunnels,
//! balancing, failover), the admin API and metrics, and the command-line front end.
//!
//! `main.rs` only parses the command line; everything a test or the demo needs is here.
//! docs/ARCHITECTURE.md describes the parts and how a connection or a request moves through
//! them.

pub mod admin;
pub mod admit;
pub mod balance;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod docgen;
pub mod drain;
pub mod exit;
pub mod http;
pub mod inbound;
pub mod info;
pub mod limits;
pub mod local;
pub mod metrics;
pub mod migrate;
pub mod node;
pub mod notify;
pub mod outbound;
pub mod outbound_port;
pub mod peer_health;
pub mod pki_cmd;
pub mod prefixed;
pub mod refusal;
pub mod reload;
pub mod routing;
pub mod runtime;
pub mod sampler;
pub mod status;
pub mod status_cmd;
pub mod telemetry;
pub mod trace;

pub use node::{Node, NodeParts};
