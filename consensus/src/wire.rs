//! How Raft RPCs between cluster members are turned into bytes: MessagePack
//! with named fields, carried in the opaque `payload` of the
//! `tollgate.v1.Raft` service's `RaftMessage`.
//!
//! This module owns the request and response shapes of every Raft RPC
//! (openraft's own types where they exist, small structs here otherwise)
//! and their encoding, so the gRPC client ([`crate::grpc_network`]) and
//! server ([`crate::raft_service`]) cannot disagree. It must not do I/O.
//!
//! MessagePack with named fields is self-describing: license documents use
//! `#[serde(untagged)]` enums and `skip_serializing_if`, which formats that
//! rely on the reader knowing the exact shape (postcard, bincode) cannot read
//! back. It stays compact for the bulk of the traffic (heartbeats, votes)
//! and carries snapshot chunks as binary, not as arrays of numbers.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tollgate_quota::config::ApplyOutcome;

use crate::error::WriteError;
use crate::types::{NodeId, NodeInfo, SnapshotMeta, TypeConfig, Vote};

/// A Raft RPC payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Encoding `what` failed (a bug in a `Serialize` impl, never data).
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The serializer's error.
        #[source]
        source: rmp_serde::encode::Error,
    },
    /// The received bytes are not a valid encoding of `what`: a peer of an
    /// incompatible version, or corruption.
    #[error("malformed {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The deserializer's error.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// Encodes `value` (named `what` in errors) as MessagePack with field names.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, WireError> {
    rmp_serde::to_vec_named(value).map_err(|source| WireError::Encode { what, source })
}

/// Decodes a `T` (named `what` in errors) from `bytes`.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, WireError> {
    rmp_serde::from_slice(bytes).map_err(|source| WireError::Decode { what, source })
}

/// One chunk of a snapshot: openraft's `InstallSnapshotRequest` with its
/// data encoded as MessagePack binary (openraft's own type would encode the
/// bytes as an array of integers, up to twice the size and slow to decode).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The leader's vote.
    pub vote: Vote,
    /// Which snapshot this chunk belongs to.
    pub meta: SnapshotMeta,
    /// Byte offset of this chunk in the snapshot.
    pub offset: u64,
    /// The chunk's bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Whether this is the last chunk.
    pub done: bool,
}

impl From<openraft::raft::InstallSnapshotRequest<TypeConfig>> for SnapshotChunk {
    fn from(r: openraft::raft::InstallSnapshotRequest<TypeConfig>) -> Self {
        Self {
            vote: r.vote,
            meta: r.meta,
            offset: r.offset,
            data: r.data,
            done: r.done,
        }
    }
}

impl From<SnapshotChunk> for openraft::raft::InstallSnapshotRequest<TypeConfig> {
    fn from(c: SnapshotChunk) -> Self {
        Self {
            vote: c.vote,
            meta: c.meta,
            offset: c.offset,
            data: c.data,
            done: c.done,
        }
    }
}

/// Body of a `Join` RPC: add `node_id` at `info` to the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The joining node's id.
    pub node_id: NodeId,
    /// The joining node's addresses.
    pub info: NodeInfo,
    /// Set when a member already forwarded this request once; the receiver
    /// then answers itself instead of forwarding again, which bounds the
    /// number of hops to one.
    pub forwarded: bool,
}

/// Body of a `RemoveNode` RPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveNodeRequest {
    /// The node to remove from voters and learners.
    pub node_id: NodeId,
    /// As in [`JoinRequest::forwarded`].
    pub forwarded: bool,
}

/// A [`WriteError`] as it crosses the wire in `ClientWrite`, `Join` and
/// `RemoveNode` responses. A separate type, so `WriteError` may gain
/// variants that cannot be sent (with error sources) without changing the
/// wire format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireWriteError {
    /// See [`WriteError::ForwardToLeader`].
    ForwardToLeader {
        /// The leader's id, if known.
        leader_id: Option<NodeId>,
        /// The leader's addresses, if known.
        leader: Option<NodeInfo>,
    },
    /// See [`WriteError::NoQuorum`].
    NoQuorum {
        /// Voters in the membership.
        voters: usize,
        /// What was observed.
        detail: String,
    },
    /// See [`WriteError::Timeout`].
    Timeout {
        /// The timeout that elapsed.
        after_ms: u64,
    },
    /// See [`WriteError::MembershipRejected`].
    MembershipRejected {
        /// Why.
        reason: String,
    },
    /// See [`WriteError::MembershipBusy`].
    MembershipBusy {
        /// What is in progress.
        detail: String,
    },
    /// See [`WriteError::Transport`].
    Transport {
        /// Whom the node could not ask.
        target: String,
        /// Why.
        detail: String,
    },
    /// See [`WriteError::Fatal`].
    Fatal(String),
}

impl From<WriteError> for WireWriteError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::ForwardToLeader { leader_id, leader } => {
                Self::ForwardToLeader { leader_id, leader }
            }
            WriteError::NoQuorum { voters, detail } => Self::NoQuorum { voters, detail },
            WriteError::Timeout { after_ms } => Self::Timeout { after_ms },
            WriteError::MembershipRejected { reason } => Self::MembershipRejected { reason },
            WriteError::MembershipBusy { detail } => Self::MembershipBusy { detail },
            WriteError::Transport { target, detail } => Self::Transport { target, detail },
            WriteError::Fatal(m) => Self::Fatal(m),
        }
    }
}

impl From<WireWriteError> for WriteError {
    fn from(e: WireWriteError) -> Self {
        match e {
            WireWriteError::ForwardToLeader { leader_id, leader } => {
                Self::ForwardToLeader { leader_id, leader }
            }
            WireWriteError::NoQuorum { voters, detail } => Self::NoQuorum { voters, detail },
            WireWriteError::Timeout { after_ms } => Self::Timeout { after_ms },
            WireWriteError::MembershipRejected { reason } => Self::MembershipRejected { reason },
            WireWriteError::MembershipBusy { detail } => Self::MembershipBusy { detail },
            WireWriteError::Transport { target, detail } => Self::Transport { target, detail },
            WireWriteError::Fatal(m) => Self::Fatal(m),
        }
    }
}

/// The answer to a `ClientWrite` RPC.
pub type ClientWriteResult = Result<ApplyOutcome, WireWriteError>;
/// The answer to a `Join` or `RemoveNode` RPC: the log index of the
/// membership entry that made the change.
pub type MembershipResult = Result<u64, WireWriteError>;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::raft::AppendEntriesRequest;
    use openraft::{CommittedLeaderId, EntryPayload, Membership};
    use tollgate_quota::config::{ConfigCommand, ConfigOp};
    use tollgate_quota::license::parse_license;

    use super::*;
    use crate::types::{Entry, LogId};

    fn license_command() -> ConfigCommand {
        let yaml = "apiVersion: tollgate/v1\nkind: License\nid: a\ncustomer: C\nkeys: [{key: k}]\n";
        let license = parse_license(yaml).expect("test license parses");
        ConfigCommand {
            request_id: None,
            actor: "test".to_string(),
            reason: Some("round trip".to_string()),
            at_ms: 1_700_000_000_000,
            op: ConfigOp::PutLicense(license),
        }
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn append_entries_with_a_license_round_trips() {
        let members = BTreeMap::from([(1, NodeInfo::default()), (2, NodeInfo::default())]);
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], members);
        let request = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(3, 6)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 7),
                    payload: EntryPayload::Normal(license_command()),
                },
                Entry {
                    log_id: log_id(3, 8),
                    payload: EntryPayload::Membership(membership),
                },
                Entry {
                    log_id: log_id(3, 9),
                    payload: EntryPayload::Blank,
                },
            ],
            leader_commit: Some(log_id(3, 6)),
        };
        let bytes = encode("append entries", &request).expect("encodes");
        let back: AppendEntriesRequest<TypeConfig> =
            decode("append entries", &bytes).expect("decodes");
        // openraft's request has no PartialEq: compare the JSON forms, which
        // cover every field, the license document included.
        assert_eq!(
            serde_json::to_value(&back).expect("json"),
            serde_json::to_value(&request).expect("json")
        );
        let EntryPayload::Normal(cmd) = &back.entries[0].payload else {
            panic!(
                "first entry is not a command: {:?}",
                back.entries[0].payload
            );
        };
        assert_eq!(cmd, &license_command());
    }

    #[test]
    fn write_errors_and_outcomes_round_trip() {
        let results: Vec<ClientWriteResult> = vec![
            Ok(ApplyOutcome::Applied { version: 4 }),
            Ok(ApplyOutcome::Rejected {
                version: 5,
                reason: "key owned by another license".to_string(),
            }),
            Err(WireWriteError::ForwardToLeader {
                leader_id: Some(2),
                leader: Some(NodeInfo::default()),
            }),
            Err(WireWriteError::NoQuorum {
                voters: 3,
                detail: "no ack".to_string(),
            }),
        ];
        for result in results {
            let bytes = encode("client write result", &result).expect("encodes");
            let back: ClientWriteResult = decode("client write result", &bytes).expect("decodes");
            assert_eq!(back, result);
        }
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        let err = decode::<AppendEntriesRequest<TypeConfig>>("append entries", &[0xc1, 0xff, 0])
            .expect_err("garbage must not decode");
        assert!(matches!(err, WireError::Decode { .. }), "{err}");
    }

    #[test]
    fn snapshot_chunk_data_is_binary() {
        let chunk = SnapshotChunk {
            vote: Vote::new_committed(1, 1),
            meta: SnapshotMeta::default(),
            offset: 0,
            data: vec![0xff; 1024],
            done: true,
        };
        let bytes = encode("snapshot chunk", &chunk).expect("encodes");
        // As an array of integers each 0xff byte would take two bytes.
        assert!(bytes.len() < 1024 + 256, "{} bytes", bytes.len());
        let back: SnapshotChunk = decode("snapshot chunk", &bytes).expect("decodes");
        assert_eq!(back.data, chunk.data);
    }
}
