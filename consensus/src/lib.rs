//! Raft-replicated license config for Tollgate: openraft over a small
//! storage trait (sled in production, in-memory for tests and simulation).
//!
//! This crate owns the openraft type config ([`types`]), the log store
//! ([`log_store`]), the state machine and its snapshots
//! ([`state_machine`]), the storage engines ([`storage`]), the Raft network
//! ([`network`]) and the facade the node runs ([`ConsensusNode`]). It
//! replicates and applies `tollgate_quota::config::ConfigCommand`s and
//! publishes each applied `Config` through an `ArcSwap`; it must not know
//! about the decision hot path or usage counters (the node may store those in
//! a [`storage::Tree`], but their meaning is not ours).
//!
//! Typical use: [`ConsensusNode::start`], then
//! [`ConsensusNode::initialize_single`] (idempotent), then
//! [`ConsensusNode::write`] on the leader and
//! `ConsensusNode::config().load()` anywhere.

pub mod codec;
pub mod error;
pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;
pub mod storage;
pub mod types;

pub use error::{ConsensusError, WriteError};
pub use network::NoNetwork;
pub use node::{ConsensusMetrics, ConsensusNode, RaftSettings};
pub use storage::{BatchOp, MemStorage, SledStorage, Storage, StorageError, Tree};
pub use types::{NodeId, NodeInfo, TypeConfig};
