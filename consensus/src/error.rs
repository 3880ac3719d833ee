//! Errors of the consensus facade: one enum for starting/running a node,
//! one for client writes.
//!
//! This module owns only error types; it must not contain recovery logic.

use crate::codec::CodecError;
use crate::storage::StorageError;
use crate::types::NodeInfo;

/// Starting, initializing, waiting on or stopping a consensus node failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Stored Raft data (snapshot, log, vote) cannot be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The settings are rejected by openraft (e.g. election timeout not
    /// greater than the heartbeat interval).
    #[error("invalid raft settings: {0}")]
    InvalidSettings(String),
    /// Raft stopped because of an unrecoverable error (usually storage); the
    /// node must be restarted.
    #[error("raft stopped: {0}")]
    Fatal(String),
    /// `initialize_single` was refused for a reason other than "already
    /// initialized".
    #[error("cannot initialize the cluster: {0}")]
    Initialize(String),
    /// A wait (for a leader, an applied index) did not finish in time.
    #[error("timed out after {after_ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after_ms: u64,
    },
    /// Raft tasks did not release their storage handles during shutdown.
    #[error("raft tasks still hold storage handles {after_ms} ms after shutdown")]
    ShutdownStuck {
        /// How long we waited.
        after_ms: u64,
    },
}

/// A config write was not applied (or its outcome is unknown).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader; retry on `leader` (unknown during an
    /// election: then retry after a short delay).
    #[error("not the leader; forward to {}", match leader_id { Some(id) => format!("node {id}"), None => "the leader once elected".to_string() })]
    ForwardToLeader {
        /// The current leader's id, if known.
        leader_id: Option<u64>,
        /// The current leader's addresses, if known.
        leader: Option<NodeInfo>,
    },
    /// The write was not committed in time for a reason other than a lost
    /// quorum (a slow disk, an overloaded leader, a lost answer from the
    /// leader). Its outcome is unknown: it may still be applied later, so
    /// callers must re-read the config before retrying a non-idempotent
    /// change.
    #[error("write not committed within {after_ms} ms; it may still apply later")]
    Timeout {
        /// The timeout that elapsed.
        after_ms: u64,
    },
    /// No leader can reach a majority of the voters: this node is a leader
    /// cut off from the majority, or no leader was found or elected in
    /// time. Refused before proposing, nothing was written; when a
    /// leader's proposal timed out this way, it is not committed now and
    /// commits later only if the majority comes back while this node still
    /// leads.
    #[error("no quorum: {detail} ({voters} voters)")]
    NoQuorum {
        /// Voters in the current membership.
        voters: usize,
        /// What was observed.
        detail: String,
    },
    /// A membership change was refused and retrying will not help (the id
    /// is a member at another address, the last voter cannot be removed).
    #[error("membership change refused: {reason}")]
    MembershipRejected {
        /// Why.
        reason: String,
    },
    /// Another membership change is still in progress; retry shortly.
    #[error("membership change in progress: {detail}")]
    MembershipBusy {
        /// What is in progress.
        detail: String,
    },
    /// The leader (or the member asked) could not be reached or refused the
    /// transport (wrong cluster token, malformed answer). The request was
    /// not delivered, or its answer was lost.
    #[error("cannot reach {target}: {detail}")]
    Transport {
        /// Whom this node tried to ask (`node N at host:port`).
        target: String,
        /// Why it failed.
        detail: String,
    },
    /// Raft is shut down or stopped on an unrecoverable error.
    #[error("raft is not running: {0}")]
    Fatal(String),
}
