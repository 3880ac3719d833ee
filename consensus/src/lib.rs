//! Raft-replicated license config for Tollgate: openraft over a small
//! storage trait (sled in production, in-memory for tests and simulation),
//! with a gRPC transport between cluster members.
//!
//! This crate owns the openraft type config ([`types`]), the log store
//! ([`log_store`]), the state machine and its snapshots ([`state_machine`]),
//! the feed of what it applied ([`applied`]),
//! the storage engines ([`storage`]), the async runtime and the process's one
//! seedable random source ([`runtime`]), the Raft transport — its wire
//! encoding ([`wire`]), client ([`grpc_network`]), server ([`raft_service`])
//! and the dialer that opens its connections ([`dial`]) — and the facade the
//! node runs ([`ConsensusNode`]): starting, forming and joining a cluster,
//! writes forwarded to the leader, membership changes and metrics. It
//! replicates and applies `tollgate_quota::config::ConfigCommand`s and
//! publishes each applied `Config` through an `ArcSwap`; it must not know
//! about the decision hot path or usage counters (the node may store those in
//! a [`storage::Tree`], but their meaning is not ours), and it never binds a
//! socket: the caller serves [`raft_server`] on a listener it owns, and may
//! plug in how connections to peers are opened (a [`Dial`]; TCP by default).
//!
//! Typical use, single node: [`ConsensusNode::start`] with [`NoNetwork`],
//! then [`ConsensusNode::initialize_single`] (idempotent), then
//! [`ConsensusNode::write`] and `ConsensusNode::config().load()` anywhere.
//!
//! A cluster: on every node [`ConsensusNode::start_grpc`] and serve
//! [`raft_server`] on its `raft_addr`; on one node
//! [`ConsensusNode::initialize`] with the founding members (or, for a node
//! added later, [`ConsensusNode::join_cluster`] against any member); then
//! [`ConsensusNode::write_forwarded`] on any node. A deterministic simulation
//! does the same with [`ConsensusNode::start_grpc_with_dialer`] and
//! [`ConsensusNode::join_cluster_with_dialer`] over its own network, on
//! [`MemStorage`], with [`runtime::seed_thread_rng`] called first.

pub mod applied;
pub mod codec;
pub mod dial;
pub mod error;
pub mod grpc_network;
pub mod log_store;
pub mod network;
pub mod node;
pub mod raft_service;
pub mod runtime;
pub mod state_machine;
pub mod storage;
pub mod types;
pub mod wire;

pub use applied::{AppliedChange, AppliedEntry, AppliedFeed};
pub use dial::{BoxIo, Dial, DialFuture, Io, TcpDialer};
pub use error::{ConsensusError, WriteError};
pub use grpc_network::{
    CallError, GrpcNetwork, MAX_RAFT_MESSAGE_BYTES, PeerClient, SNAPSHOT_CHUNK_BYTES,
    TransportError, TransportSettings,
};
pub use network::NoNetwork;
pub use node::{ConsensusMetrics, ConsensusNode, Member, RaftSettings, Removal, removal_in};
pub use raft_service::{RaftService, raft_server};
pub use runtime::TollgateRuntime;
pub use storage::{BatchOp, MemStorage, SledStorage, Storage, StorageError, Tree};
pub use types::{NodeId, NodeInfo, TypeConfig};
pub use wire::WireError;
