//! [`ConsensusNode`]: the facade the server process uses to run the license
//! config Raft group — start it on a storage engine and a network, form a
//! single-node cluster, propose config commands, read the applied config
//! lock-free, observe metrics and shut down.
//!
//! This module owns the lifecycle and the mapping of openraft's errors onto
//! Tollgate's. It must not interpret config commands (that is
//! `tollgate_quota::config`) nor pick a transport (the caller passes one).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::metrics::WaitError;
use openraft::network::RaftNetworkFactory;
use openraft::{ServerState, SnapshotPolicy};
use tollgate_quota::config::{ApplyOutcome, Config, ConfigCommand};

use crate::error::{ConsensusError, WriteError};
use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;
use crate::storage::Storage;
use crate::types::{NodeId, NodeInfo, Raft, TypeConfig};

/// Upper bound on how long `shutdown` waits for Raft's background tasks to
/// drop their storage handles.
const SHUTDOWN_RELEASE_TIMEOUT_MS: u64 = 5_000;
/// How often `shutdown` checks whether those handles are gone.
const SHUTDOWN_POLL_INTERVAL_MS: u64 = 5;

/// Timing and log-compaction settings of the Raft group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftSettings {
    /// Interval between leader heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout; must exceed the
    /// heartbeat interval.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot once this many entries were applied since the last
    /// one (openraft `SnapshotPolicy::LogsSinceLast`).
    pub snapshot_after_entries: u64,
    /// Entries kept in the log below the snapshot, so slightly lagging
    /// followers catch up from the log instead of a full snapshot.
    pub max_in_snapshot_log_to_keep: u64,
    /// How long `write` waits for its command to be committed and applied.
    pub write_timeout_ms: u64,
}

impl Default for RaftSettings {
    /// Settings for regions a WAN apart: heartbeats well under the election
    /// timeout, and elections slow enough to ride out cross-region jitter.
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            snapshot_after_entries: 1_000,
            max_in_snapshot_log_to_keep: 100,
            write_timeout_ms: 5_000,
        }
    }
}

impl RaftSettings {
    fn to_openraft(&self) -> Result<openraft::Config, ConsensusError> {
        let config = openraft::Config {
            cluster_name: "tollgate-config".to_string(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.max_in_snapshot_log_to_keep,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| ConsensusError::InvalidSettings(e.to_string()))
    }
}

/// A point-in-time view of the Raft group from this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsensusMetrics {
    /// This node's id.
    pub node_id: NodeId,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// Index of the last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry (equals the config version).
    pub last_applied_index: Option<u64>,
    /// Last index covered by the current snapshot.
    pub snapshot_index: Option<u64>,
    /// Last index removed from the log.
    pub purged_index: Option<u64>,
    /// Voting members of the current membership config.
    pub voter_ids: Vec<NodeId>,
}

/// One node of the license config Raft group.
pub struct ConsensusNode {
    node_id: NodeId,
    info: NodeInfo,
    raft: Raft,
    config: Arc<ArcSwap<Config>>,
    // Dies when the log store, state machine and every clone of them (which
    // live in Raft's tasks) are gone, i.e. when no storage handle remains.
    alive: Weak<()>,
    write_timeout: Duration,
}

impl std::fmt::Debug for ConsensusNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsensusNode")
            .field("node_id", &self.node_id)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn fatal_message<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl ConsensusNode {
    /// Starts Raft for node `node_id` on `storage`, talking to peers through
    /// `network`. The config from the persisted snapshot (if any) is
    /// published before this returns; entries after it are re-applied as
    /// soon as Raft knows they are committed.
    pub async fn start<N: RaftNetworkFactory<TypeConfig>>(
        node_id: NodeId,
        info: NodeInfo,
        storage: Arc<dyn Storage>,
        network: N,
        settings: &RaftSettings,
    ) -> Result<Self, ConsensusError> {
        let raft_config = Arc::new(settings.to_openraft()?);
        let alive = Arc::new(());
        let config = Arc::new(ArcSwap::from_pointee(Config::default()));
        let log_store = LogStore::open(storage.as_ref(), alive.clone())?;
        let state_machine =
            StateMachineStore::open(storage.as_ref(), config.clone(), alive.clone())?;
        let weak_alive = Arc::downgrade(&alive);
        // Only the stores hold the token from now on.
        drop(alive);
        let raft = Raft::new(node_id, raft_config, network, log_store, state_machine)
            .await
            .map_err(|e| ConsensusError::Fatal(e.to_string()))?;
        Ok(Self {
            node_id,
            info,
            raft,
            config,
            alive: weak_alive,
            write_timeout: Duration::from_millis(settings.write_timeout_ms),
        })
    }

    /// Forms a one-member cluster of this node unless the node was already
    /// initialized (by an earlier call, before a restart, or by joining a
    /// cluster). Returns whether this call initialized it.
    pub async fn initialize_single(&self) -> Result<bool, ConsensusError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ConsensusError::Fatal(e.to_string()))?;
        if initialized {
            return Ok(false);
        }
        let members = BTreeMap::from([(self.node_id, self.info.clone())]);
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            // Raced with another initialization: the goal is reached.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(RaftError::APIError(e)) => Err(ConsensusError::Initialize(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ConsensusError::Fatal(e.to_string())),
        }
    }

    /// Proposes `cmd` and waits (at most the configured write timeout) until
    /// it is committed and applied on this node, returning what applying it
    /// did. Only the leader accepts writes.
    pub async fn write(&self, cmd: ConfigCommand) -> Result<ApplyOutcome, WriteError> {
        let after_ms = u64::try_from(self.write_timeout.as_millis()).unwrap_or(u64::MAX);
        let result = tokio::time::timeout(self.write_timeout, self.raft.client_write(cmd))
            .await
            .map_err(|_| WriteError::Timeout { after_ms })?;
        match result {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::ForwardToLeader {
                    leader_id: f.leader_id,
                    leader: f.leader_node,
                })
            }
            // Only membership changes produce this; a plain write cannot.
            Err(RaftError::APIError(e @ ClientWriteError::ChangeMembershipError(_))) => {
                Err(WriteError::Fatal(fatal_message(e)))
            }
            Err(RaftError::Fatal(e)) => Err(WriteError::Fatal(fatal_message(e))),
        }
    }

    /// The published config, swapped after each applied batch. Readers call
    /// `.load()` for a lock-free snapshot; keep the returned `Arc` to follow
    /// future updates.
    pub fn config(&self) -> Arc<ArcSwap<Config>> {
        self.config.clone()
    }

    /// The config as currently applied on this node.
    pub fn current_config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Waits until some leader is known and returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ConsensusError> {
        let metrics = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|e| wait_error(e, "a leader", timeout))?;
        metrics
            .current_leader
            .ok_or_else(|| ConsensusError::Timeout {
                what: "a leader".to_string(),
                after_ms: duration_ms(timeout),
            })
    }

    /// Waits until this node has applied the log up to `index` (so its
    /// config version is at least `index`).
    pub async fn wait_for_applied(
        &self,
        index: u64,
        timeout: Duration,
    ) -> Result<(), ConsensusError> {
        let what = format!("applied index {index}");
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), &what)
            .await
            .map_err(|e| wait_error(e, &what, timeout))?;
        Ok(())
    }

    /// A snapshot of this node's Raft metrics.
    pub fn metrics(&self) -> ConsensusMetrics {
        let m = self.raft.metrics().borrow().clone();
        ConsensusMetrics {
            node_id: m.id,
            term: m.current_term,
            leader: m.current_leader,
            is_leader: m.state == ServerState::Leader,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voter_ids: m.membership_config.membership().voter_ids().collect(),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's addresses.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The underlying openraft handle, for the Raft transport server and
    /// membership changes.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Stops Raft and waits until its tasks have dropped every storage
    /// handle, so the same sled directory can be reopened in this process.
    /// Later calls on this node fail with `Fatal`.
    pub async fn shutdown(&self) -> Result<(), ConsensusError> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| ConsensusError::Fatal(e.to_string()))?;
        // The state machine worker and snapshot builders are separate tasks
        // that finish shortly after the core; wait for them, boundedly.
        let started = Instant::now();
        let limit = Duration::from_millis(SHUTDOWN_RELEASE_TIMEOUT_MS);
        while self.alive.strong_count() > 0 {
            if started.elapsed() > limit {
                return Err(ConsensusError::ShutdownStuck {
                    after_ms: SHUTDOWN_RELEASE_TIMEOUT_MS,
                });
            }
            tokio::time::sleep(Duration::from_millis(SHUTDOWN_POLL_INTERVAL_MS)).await;
        }
        Ok(())
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn wait_error(e: WaitError, what: &str, timeout: Duration) -> ConsensusError {
    match e {
        WaitError::Timeout(..) => ConsensusError::Timeout {
            what: what.to_string(),
            after_ms: duration_ms(timeout),
        },
        WaitError::ShuttingDown => ConsensusError::Fatal("raft is shutting down".to_string()),
    }
}
