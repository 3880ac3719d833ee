//! The openraft type configuration for Tollgate's config log, and the
//! per-node address record replicated in Raft membership.
//!
//! This module owns only type declarations: which application data goes
//! into the log ([`ConfigCommand`]), what applying it returns
//! ([`ApplyOutcome`]) and how nodes are identified. It must not contain
//! behaviour.

use std::io::Cursor;

use serde::{Deserialize, Serialize};
use tollgate_quota::config::{ApplyOutcome, ConfigCommand};

/// A node's Raft id.
pub type NodeId = u64;

/// Where a cluster member can be reached; replicated inside Raft membership
/// so every node (and gossip) learns peers' addresses from the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Region name, e.g. `eu-west`.
    pub region: String,
    /// Address of the Raft transport, `host:port`.
    pub raft_addr: String,
    /// Address of the edge/admin gRPC API, `host:port`.
    pub grpc_addr: String,
    /// Address of the HTTP/JSON API, `host:port`.
    pub http_addr: String,
    /// Address of the usage gossip transport (QUIC over UDP), `host:port`.
    /// Empty in membership written before gossip existed; such a member is
    /// assumed at its gRPC port + 200.
    #[serde(default)]
    pub gossip_addr: String,
}

openraft::declare_raft_types!(
    /// The openraft type configuration of the license config log.
    pub TypeConfig:
        D = ConfigCommand,
        R = ApplyOutcome,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::TollgateRuntime,
);

/// A Raft log id (term, leader, index) of this cluster.
pub type LogId = openraft::LogId<NodeId>;
/// A log entry of this cluster.
pub type Entry = openraft::Entry<TypeConfig>;
/// A vote of this cluster.
pub type Vote = openraft::Vote<NodeId>;
/// A membership config together with the log id that set it.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
/// Snapshot metadata of this cluster.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
/// The openraft storage error of this cluster.
pub type RaftStorageError = openraft::StorageError<NodeId>;
/// The Raft handle of this cluster.
pub type Raft = openraft::Raft<TypeConfig>;
