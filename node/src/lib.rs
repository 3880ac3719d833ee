//! The Tollgate node: the server process and the `tollgate` CLI.
//!
//! This crate is the adapter around the sans-I/O core: it owns sockets,
//! tasks, the clock and storage, and calls `tollgate_quota` for every
//! decision and `tollgate_consensus` for every config write. Business rules
//! do not live here.

pub mod admin;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod bench;
pub mod certs;
pub mod client;
pub mod clock;
pub mod dashboard;
pub mod drain;
pub mod gossip;
pub mod gossip_bench;
pub mod grpc;
pub mod http;
pub mod lineage;
pub mod metrics;
pub mod persist;
pub mod quic;
pub mod revocation_bench;
pub mod roles;
pub mod server;
pub mod settings;
pub mod state;
pub mod telemetry;
pub mod up;
