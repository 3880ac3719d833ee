//! [`ConsensusNode`]: the facade the server process uses to run the license
//! config Raft group — start it on a storage engine and a network, form or
//! join a cluster, propose config commands (forwarding them to the leader
//! when needed), change membership, read the applied config lock-free,
//! observe metrics and shut down.
//!
//! This module owns the lifecycle, leader routing, the bounds on every
//! write, and the mapping of openraft's errors onto Tollgate's. It must not
//! interpret config commands (that is `tollgate_quota::config`) nor encode
//! or serve Raft RPCs (that is [`crate::wire`], [`crate::grpc_network`] and
//! [`crate::raft_service`]).

// `WriteError` carries the leader's `NodeInfo` (a few strings) so a caller
// can redirect; that makes it larger than clippy likes for a `Result`. Writes
// and membership changes are rare admin operations, never on a hot path, so
// boxing would buy nothing but noise in every caller's match.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use openraft::error::{ChangeMembershipError, ClientWriteError, InitializeError, RaftError};
use openraft::metrics::{RaftMetrics, WaitError};
use openraft::network::RaftNetworkFactory;
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tollgate_quota::config::{ApplyOutcome, Config, ConfigCommand};

use crate::applied::AppliedFeed;
use crate::dial::{Dial, TcpDialer};
use crate::error::{ConsensusError, WriteError};
use crate::grpc_network::{
    CallError, GrpcNetwork, PeerClient, RaftRpc, SNAPSHOT_CHUNK_BYTES, TransportSettings,
};
use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;
use crate::storage::Storage;
use crate::types::{NodeId, NodeInfo, Raft, TypeConfig};
use crate::wire::{ClientWriteResult, JoinRequest, MembershipResult, RemoveNodeRequest};

/// Upper bound on how long `shutdown` waits for Raft's background tasks to
/// drop their storage handles.
const SHUTDOWN_RELEASE_TIMEOUT_MS: u64 = 5_000;
/// How often `shutdown` checks whether those handles are gone.
const SHUTDOWN_POLL_INTERVAL_MS: u64 = 5;
/// Added to the write timeout for a forwarded write: the leader spends up
/// to the write timeout itself, and the hop and the wait to see the write
/// applied here need a little more.
const FORWARD_SLACK_MS: u64 = 500;

/// Timing and log-compaction settings of the Raft group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftSettings {
    /// Interval between leader heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout; must exceed the
    /// heartbeat interval.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout. A leader that has
    /// not heard from a majority for longer than this refuses writes at
    /// once with `NoQuorum`.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot once this many entries were applied since the last
    /// one (openraft `SnapshotPolicy::LogsSinceLast`).
    pub snapshot_after_entries: u64,
    /// Entries kept in the log below the snapshot, so slightly lagging
    /// followers catch up from the log instead of a full snapshot.
    pub max_in_snapshot_log_to_keep: u64,
    /// How long a write waits for its command to be committed and applied;
    /// a forwarded write gets this plus a small slack in total.
    pub write_timeout_ms: u64,
    /// Timeout of sending one snapshot chunk and, for the last one,
    /// installing the snapshot (openraft `install_snapshot_timeout`).
    /// Default 30 s: a snapshot is the whole config, sent a WAN apart.
    pub install_snapshot_timeout_ms: u64,
    /// Bound on adding a node (it first catches up as a learner, possibly
    /// through a snapshot) and on a node's request to join. Default 60 s.
    pub membership_timeout_ms: u64,
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
            install_snapshot_timeout_ms: 30_000,
            membership_timeout_ms: 60_000,
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
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            max_in_snapshot_log_to_keep: self.max_in_snapshot_log_to_keep,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| ConsensusError::InvalidSettings(e.to_string()))
    }
}

/// A point-in-time view of the Raft group from one node; also the answer to
/// a peer's `NodeStatus` RPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsensusMetrics {
    /// This node's id.
    pub node_id: NodeId,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    #[serde(default)]
    pub state: String,
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
    /// Every member of the current membership config, learners included.
    #[serde(default)]
    pub member_ids: Vec<NodeId>,
    /// Log index of the entry that made the current membership config
    /// (`None`: the initial, empty one).
    #[serde(default)]
    pub membership_index: Option<u64>,
    /// On the leader: milliseconds since a majority of voters last
    /// acknowledged it. `None` elsewhere, or before the first majority ack.
    #[serde(default)]
    pub millis_since_quorum_ack: Option<u64>,
    /// On the leader: the highest log index known to match on each
    /// follower and learner, the leader itself excluded (`None` until the
    /// first match). Empty elsewhere.
    #[serde(default)]
    pub replication: BTreeMap<NodeId, Option<u64>>,
    /// InstallSnapshot RPCs (chunks) this node received since it started.
    #[serde(default)]
    pub install_snapshot_rpcs_received: u64,
    /// The addresses this node serves on now. They can differ from the
    /// replicated membership's for the edge ports (which may move across a
    /// restart); the Raft address cannot.
    #[serde(default)]
    pub serving: NodeInfo,
}

/// A committed membership change that left a node out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removal {
    /// Log index of the membership entry without the node.
    pub membership_index: u64,
    /// The member whose view showed it (the node itself, or a peer).
    pub seen_by: NodeId,
}

/// Whether `theirs` (some member's metrics, possibly `me`'s own) shows a
/// committed membership without node `me` that is newer than
/// `member_at`, the newest membership index at which `me` saw itself a
/// member. Only an applied entry counts: an entry that is merely appended
/// may still be truncated by a new leader, and a node that drained on it
/// would have left for nothing. A node that never saw itself a member
/// (still joining; or fresh from a snapshot taken before it was added,
/// whose membership does not list it yet) has not been removed.
pub fn removal_in(
    me: NodeId,
    member_at: Option<u64>,
    theirs: &ConsensusMetrics,
) -> Option<Removal> {
    let index = theirs.membership_index?;
    let applied = theirs.last_applied_index.is_some_and(|a| a >= index);
    let newer = member_at.is_some_and(|m| index > m);
    (applied && newer && !theirs.member_ids.contains(&me)).then_some(Removal {
        membership_index: index,
        seen_by: theirs.node_id,
    })
}

/// One node of the current membership config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's id.
    pub id: NodeId,
    /// Its addresses.
    pub info: NodeInfo,
    /// Whether it votes (otherwise it is a learner).
    pub voter: bool,
}

/// An operation that only the leader can run, and that a follower forwards.
enum LeaderOp {
    Write(Box<ConfigCommand>),
    AddNode(NodeId, NodeInfo),
    RemoveNode(NodeId),
}

/// What a [`LeaderOp`] returned.
enum LeaderOutput {
    Write(ApplyOutcome),
    /// The log index of the membership entry that made the change.
    Membership(u64),
}

/// Where a [`LeaderOp`] runs.
enum Target {
    Local,
    Remote(NodeId, NodeInfo),
}

/// The result of one attempt at a [`LeaderOp`].
struct Attempt {
    result: Result<LeaderOutput, WriteError>,
    /// Leadership moved while the attempt ran (the target was no longer
    /// the leader, or could not be reached): worth one retry.
    moved: bool,
}

/// One node of the license config Raft group.
pub struct ConsensusNode {
    node_id: NodeId,
    info: NodeInfo,
    raft: Raft,
    config: Arc<ArcSwap<Config>>,
    applied: Arc<AppliedFeed>,
    // Dies when the log store, state machine and every clone of them (which
    // live in Raft's tasks) are gone, i.e. when no storage handle remains.
    alive: Weak<()>,
    settings: RaftSettings,
    // The gRPC client for forwarding and status queries; `None` when the
    // node runs on another network (single node, tests).
    peers: Option<PeerClient>,
    install_snapshot_rpcs: AtomicU64,
    /// One more than the newest membership index at which this node saw
    /// itself a member in its own view (0: never), for `find_own_removal`.
    member_at: AtomicU64,
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
    ///
    /// A node started this way cannot forward writes or membership
    /// requests (`write_forwarded` answers `ForwardToLeader`); use
    /// [`ConsensusNode::start_grpc`] for a multi-node cluster.
    pub async fn start<N: RaftNetworkFactory<TypeConfig>>(
        node_id: NodeId,
        info: NodeInfo,
        storage: Arc<dyn Storage>,
        network: N,
        settings: &RaftSettings,
    ) -> Result<Self, ConsensusError> {
        Self::start_inner(node_id, info, storage, network, settings, None).await
    }

    /// Starts Raft over the gRPC transport: peers are reached at their
    /// `NodeInfo::raft_addr`, authenticating with `cluster_token`. Serve
    /// [`crate::raft_service::raft_server`] on this node's `raft_addr` so
    /// peers can reach it.
    pub async fn start_grpc(
        node_id: NodeId,
        info: NodeInfo,
        storage: Arc<dyn Storage>,
        settings: &RaftSettings,
        transport: &TransportSettings,
        cluster_token: &str,
    ) -> Result<Self, ConsensusError> {
        Self::start_grpc_with_dialer(
            node_id,
            info,
            storage,
            settings,
            transport,
            cluster_token,
            Arc::new(TcpDialer),
        )
        .await
    }

    /// [`ConsensusNode::start_grpc`], with connections to peers opened by
    /// `dialer` instead of TCP (the simulator passes its in-process
    /// network). Forwarded writes and status queries use it too.
    pub async fn start_grpc_with_dialer(
        node_id: NodeId,
        info: NodeInfo,
        storage: Arc<dyn Storage>,
        settings: &RaftSettings,
        transport: &TransportSettings,
        cluster_token: &str,
        dialer: Arc<dyn Dial>,
    ) -> Result<Self, ConsensusError> {
        let peers = PeerClient::with_dialer(transport, cluster_token, dialer)
            .map_err(|e| ConsensusError::InvalidSettings(e.to_string()))?;
        let network = GrpcNetwork::with_client(node_id, peers.clone());
        Self::start_inner(node_id, info, storage, network, settings, Some(peers)).await
    }

    async fn start_inner<N: RaftNetworkFactory<TypeConfig>>(
        node_id: NodeId,
        info: NodeInfo,
        storage: Arc<dyn Storage>,
        network: N,
        settings: &RaftSettings,
        peers: Option<PeerClient>,
    ) -> Result<Self, ConsensusError> {
        let raft_config = Arc::new(settings.to_openraft()?);
        let alive = Arc::new(());
        let config = Arc::new(ArcSwap::from_pointee(Config::default()));
        let log_store = LogStore::open(storage.as_ref(), alive.clone())?;
        let applied = Arc::new(AppliedFeed::default());
        let state_machine = StateMachineStore::open(
            storage.as_ref(),
            config.clone(),
            applied.clone(),
            alive.clone(),
        )?;
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
            applied,
            alive: weak_alive,
            settings: settings.clone(),
            peers,
            install_snapshot_rpcs: AtomicU64::new(0),
            member_at: AtomicU64::new(0),
        })
    }

    /// Forms a one-member cluster of this node unless the node was already
    /// initialized (by an earlier call, before a restart, or by joining a
    /// cluster). Returns whether this call initialized it.
    pub async fn initialize_single(&self) -> Result<bool, ConsensusError> {
        self.initialize(BTreeMap::from([(self.node_id, self.info.clone())]))
            .await
    }

    /// Forms a cluster of `members` (all voters; this node must be one of
    /// them) unless this node was already initialized. Call it on one node
    /// only; the others learn the membership from its log. Returns whether
    /// this call initialized the cluster.
    pub async fn initialize(
        &self,
        members: BTreeMap<NodeId, NodeInfo>,
    ) -> Result<bool, ConsensusError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ConsensusError::Fatal(e.to_string()))?;
        if initialized {
            return Ok(false);
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            // Raced with another initialization: the goal is reached.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(RaftError::APIError(e)) => Err(ConsensusError::Initialize(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ConsensusError::Fatal(e.to_string())),
        }
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.write_timeout_ms)
    }

    /// Proposes `cmd` on this node and waits (at most the configured write
    /// timeout) until it is committed and applied here, returning what
    /// applying it did. Only the leader accepts writes; a leader that has
    /// lost touch with the majority refuses at once with `NoQuorum`.
    pub async fn write(&self, cmd: ConfigCommand) -> Result<ApplyOutcome, WriteError> {
        self.write_within(cmd, self.write_timeout()).await
    }

    async fn write_within(
        &self,
        cmd: ConfigCommand,
        timeout: Duration,
    ) -> Result<ApplyOutcome, WriteError> {
        self.refuse_without_quorum()?;
        match tokio::time::timeout(timeout, self.raft.client_write(cmd)).await {
            Err(_) => Err(self.timed_out(timeout)),
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(e)) => Err(client_write_error(e)),
        }
    }

    /// Writes `cmd` through the leader, wherever it is: locally when this
    /// node leads, otherwise forwarded over `ClientWrite`. When no leader is
    /// known it waits for one; when leadership moves mid-request it waits
    /// for the new leader and retries exactly once. Bounded by the write
    /// timeout plus a small slack. A forwarded write returns only once this
    /// node applied it too (boundedly), so a caller reading from this node
    /// sees its own write.
    pub async fn write_forwarded(&self, cmd: ConfigCommand) -> Result<ApplyOutcome, WriteError> {
        let deadline =
            Instant::now() + self.write_timeout() + Duration::from_millis(FORWARD_SLACK_MS);
        match self
            .on_leader(&LeaderOp::Write(Box::new(cmd)), deadline)
            .await?
        {
            LeaderOutput::Write(outcome) => Ok(outcome),
            LeaderOutput::Membership(index) => Err(WriteError::Fatal(format!(
                "a config write was answered with membership index {index}"
            ))),
        }
    }

    /// Adds node `id` at `info`: on the leader, first as a learner that
    /// catches up (from the log or a snapshot), then promoted to voter;
    /// elsewhere, forwarded to the leader over `Join`. Idempotent when `id`
    /// already votes at the same `raft_addr`; refused when `id` is a member
    /// at another address. Returns the index of the membership entry.
    /// Bounded by `membership_timeout_ms`.
    pub async fn add_node(&self, id: NodeId, info: NodeInfo) -> Result<u64, WriteError> {
        let deadline = Instant::now() + Duration::from_millis(self.settings.membership_timeout_ms);
        membership_index(
            self.on_leader(&LeaderOp::AddNode(id, info), deadline)
                .await?,
        )
    }

    /// Removes node `id` from the voters and learners (through the leader).
    /// Refuses to remove the last voter; removing a non-member is a no-op.
    /// Returns the index of the membership entry. Bounded by the write
    /// timeout plus a small slack.
    pub async fn remove_node(&self, id: NodeId) -> Result<u64, WriteError> {
        let deadline =
            Instant::now() + self.write_timeout() + Duration::from_millis(FORWARD_SLACK_MS);
        membership_index(self.on_leader(&LeaderOp::RemoveNode(id), deadline).await?)
    }

    /// Asks the cluster member at `seed_raft_addr` to add node `id` at
    /// `info` (a follower forwards the request to the leader), retrying
    /// with backoff until `timeout`. Called by a new node, after it started
    /// and serves its Raft transport. Returns the index of the membership
    /// entry that made it a voter.
    pub async fn join_cluster(
        seed_raft_addr: &str,
        cluster_token: &str,
        id: NodeId,
        info: NodeInfo,
        timeout: Duration,
    ) -> Result<u64, WriteError> {
        Self::join_cluster_with_dialer(
            seed_raft_addr,
            cluster_token,
            id,
            info,
            timeout,
            Arc::new(TcpDialer),
        )
        .await
    }

    /// [`ConsensusNode::join_cluster`], reaching the seed with `dialer`
    /// instead of TCP.
    pub async fn join_cluster_with_dialer(
        seed_raft_addr: &str,
        cluster_token: &str,
        id: NodeId,
        info: NodeInfo,
        timeout: Duration,
        dialer: Arc<dyn Dial>,
    ) -> Result<u64, WriteError> {
        let transport = TransportSettings::default();
        let peers = PeerClient::with_dialer(&transport, cluster_token, dialer).map_err(|e| {
            WriteError::Transport {
                target: seed_raft_addr.to_string(),
                detail: e.to_string(),
            }
        })?;
        let deadline = Instant::now() + timeout;
        let mut backoff = transport.backoff();
        let request = JoinRequest {
            node_id: id,
            info,
            forwarded: false,
        };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = match peers
                .request::<_, MembershipResult>(seed_raft_addr, RaftRpc::Join, &request, remaining)
                .await
            {
                Ok(answer) => answer.map_err(WriteError::from),
                Err(e) => Err(call_error(seed_raft_addr, e)),
            };
            let error = match result {
                Ok(index) => return Ok(index),
                Err(e @ (WriteError::MembershipRejected { .. } | WriteError::Fatal(_))) => {
                    return Err(e);
                }
                Err(e) => e,
            };
            let delay = backoff.next().unwrap_or(Duration::from_secs(1));
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining <= delay {
                return Err(error);
            }
            tracing::info!(seed = seed_raft_addr, error = %error, "join not done yet; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Runs `op` on the leader: see [`ConsensusNode::write_forwarded`].
    async fn on_leader(
        &self,
        op: &LeaderOp,
        deadline: Instant,
    ) -> Result<LeaderOutput, WriteError> {
        // The leader (and its term) that failed the first attempt, and why.
        let mut avoid = None;
        let mut first_error: Option<String> = None;
        loop {
            let (target, term) = match self.find_leader(avoid, deadline).await {
                Ok(found) => found,
                // Say why the old leader failed: from here, a leader that
                // died looks the same as one only this node cannot reach.
                Err(WriteError::NoQuorum { voters, detail }) if first_error.is_some() => {
                    let why = first_error.unwrap_or_default();
                    return Err(WriteError::NoQuorum {
                        voters,
                        detail: format!("{detail} (the old leader failed with: {why})"),
                    });
                }
                Err(e) => return Err(e),
            };
            let leader_id = match &target {
                Target::Local => self.node_id,
                Target::Remote(id, _) => *id,
            };
            let attempt = match &target {
                Target::Local => self.run_here(op, deadline).await,
                Target::Remote(id, info) => self.run_remote(op, *id, info, deadline).await,
            };
            if attempt.moved && avoid.is_none() {
                tracing::info!(leader = leader_id, error = ?attempt.result.as_ref().err(), "leadership moved; retrying once on the new leader");
                avoid = Some((leader_id, term));
                first_error = attempt.result.as_ref().err().map(ToString::to_string);
                continue;
            }
            let output = attempt.result?;
            if let (Target::Remote(..), LeaderOutput::Write(outcome)) = (&target, &output) {
                self.await_own_write(outcome_version(outcome), deadline)
                    .await;
            }
            return Ok(output);
        }
    }

    /// Waits until some leader other than `avoid` (or the same node in a
    /// later term) is known, and says where to run.
    async fn find_leader(
        &self,
        avoid: Option<(NodeId, u64)>,
        deadline: Instant,
    ) -> Result<(Target, u64), WriteError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // A follower can hear from a new leader before the log entry that
        // names its address reaches it (a node that just joined, a fresh
        // cluster): such a leader is known but not reachable yet, so wait
        // for the membership too.
        let reachable = |m: &RaftMetrics<NodeId, NodeInfo>, leader: NodeId| {
            leader == self.node_id || m.membership_config.membership().get_node(&leader).is_some()
        };
        let accept = |m: &RaftMetrics<NodeId, NodeInfo>| match (m.current_leader, avoid) {
            (None, _) => false,
            (Some(leader), None) => reachable(m, leader),
            (Some(leader), Some((old, term))) => {
                (leader != old || m.current_term > term) && reachable(m, leader)
            }
        };
        let current = self.raft.metrics().borrow().clone();
        let m = if accept(&current) {
            current
        } else {
            match self
                .raft
                .wait(Some(remaining))
                .metrics(|m| accept(m), "a leader")
                .await
            {
                Ok(m) => m,
                Err(WaitError::ShuttingDown) => {
                    return Err(WriteError::Fatal("raft is shutting down".to_string()));
                }
                Err(WaitError::Timeout(..)) => {
                    let now = self.raft.metrics().borrow().clone();
                    let voters = voter_count(&now);
                    let unknown = now.current_leader.filter(|l| !reachable(&now, *l));
                    let detail = match (unknown, avoid) {
                        (Some(leader), _) => format!(
                            "leader {leader} is not in this node's membership config after {} ms",
                            duration_ms(remaining)
                        ),
                        (None, None) => format!(
                            "no leader known or elected within {} ms",
                            duration_ms(remaining)
                        ),
                        (None, Some((old, _))) => format!(
                            "leader {old} stepped down or became unreachable and no new leader was elected within {} ms",
                            duration_ms(remaining)
                        ),
                    };
                    return Err(WriteError::NoQuorum { voters, detail });
                }
            }
        };
        let Some(leader) = m.current_leader else {
            return Err(WriteError::Fatal(
                "leader vanished from metrics".to_string(),
            ));
        };
        if leader == self.node_id {
            return Ok((Target::Local, m.current_term));
        }
        match m.membership_config.membership().get_node(&leader) {
            Some(info) => Ok((Target::Remote(leader, info.clone()), m.current_term)),
            None => Err(WriteError::Transport {
                target: format!("node {leader}"),
                detail: "the leader is not in this node's membership config".to_string(),
            }),
        }
    }

    async fn run_here(&self, op: &LeaderOp, deadline: Instant) -> Attempt {
        let result = match op {
            LeaderOp::Write(cmd) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                self.write_within(
                    ConfigCommand::clone(cmd),
                    remaining.min(self.write_timeout()),
                )
                .await
                .map(LeaderOutput::Write)
            }
            LeaderOp::AddNode(id, info) => self
                .add_node_here(*id, info.clone(), deadline)
                .await
                .map(LeaderOutput::Membership),
            LeaderOp::RemoveNode(id) => self
                .remove_node_here(*id, deadline)
                .await
                .map(LeaderOutput::Membership),
        };
        let moved = matches!(result, Err(WriteError::ForwardToLeader { .. }));
        Attempt { result, moved }
    }

    async fn run_remote(
        &self,
        op: &LeaderOp,
        leader: NodeId,
        info: &NodeInfo,
        deadline: Instant,
    ) -> Attempt {
        let Some(peers) = &self.peers else {
            return Attempt {
                result: Err(WriteError::ForwardToLeader {
                    leader_id: Some(leader),
                    leader: Some(info.clone()),
                }),
                moved: false,
            };
        };
        let addr = info.raft_addr.as_str();
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answer = match op {
            LeaderOp::Write(cmd) => peers
                .request::<ConfigCommand, ClientWriteResult>(
                    addr,
                    RaftRpc::ClientWrite,
                    cmd,
                    remaining,
                )
                .await
                .map(|r| r.map(LeaderOutput::Write)),
            LeaderOp::AddNode(id, node) => {
                let request = JoinRequest {
                    node_id: *id,
                    info: node.clone(),
                    forwarded: true,
                };
                peers
                    .request::<_, MembershipResult>(addr, RaftRpc::Join, &request, remaining)
                    .await
                    .map(|r| r.map(LeaderOutput::Membership))
            }
            LeaderOp::RemoveNode(id) => {
                let request = RemoveNodeRequest {
                    node_id: *id,
                    forwarded: true,
                };
                peers
                    .request::<_, MembershipResult>(addr, RaftRpc::RemoveNode, &request, remaining)
                    .await
                    .map(|r| r.map(LeaderOutput::Membership))
            }
        };
        match answer {
            Ok(result) => {
                let result = result.map_err(WriteError::from);
                let moved = matches!(result, Err(WriteError::ForwardToLeader { .. }));
                Attempt { result, moved }
            }
            Err(e) => {
                let moved = e.not_delivered();
                let target = format!("leader {leader} at {addr}");
                Attempt {
                    result: Err(call_error(&target, e)),
                    moved,
                }
            }
        }
    }

    /// After a forwarded write committed at `version`, waits (until
    /// `deadline`) for this node to apply it. A miss is only logged: the
    /// write did commit, and this node will apply it shortly.
    async fn await_own_write(&self, version: u64, deadline: Instant) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = self.wait_for_applied(version, remaining).await {
            tracing::warn!(version, error = %e, "forwarded write committed but not yet applied here");
        }
    }

    /// Adds a node on this node, which must lead (else `ForwardToLeader`).
    pub(crate) async fn add_node_here(
        &self,
        id: NodeId,
        info: NodeInfo,
        deadline: Instant,
    ) -> Result<u64, WriteError> {
        let m = self.leader_metrics()?;
        let stored = m.membership_config.clone();
        let membership = stored.membership();
        if let Some(existing) = membership.get_node(&id) {
            if existing.raft_addr != info.raft_addr {
                return Err(WriteError::MembershipRejected {
                    reason: format!(
                        "node {id} is already a member at {}; remove it before adding it at {}",
                        existing.raft_addr, info.raft_addr
                    ),
                });
            }
            if membership.voter_ids().any(|v| v == id) {
                return Ok(stored.log_id().map_or(0, |l| l.index));
            }
        }
        // One process must not count as two voters (a wiped node that
        // rejoins under a new id).
        if let Some((other, _)) = membership
            .nodes()
            .find(|(other, n)| **other != id && n.raft_addr == info.raft_addr)
        {
            return Err(WriteError::MembershipRejected {
                reason: format!(
                    "node {other} is already a member at {}; remove it before adding node {id} there",
                    info.raft_addr
                ),
            });
        }
        self.refuse_without_quorum()?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        // Blocking: returns once the learner's log is up to date, so the
        // promotion below never makes a voter that would stall commits.
        match tokio::time::timeout(remaining, self.raft.add_learner(id, info, true)).await {
            Err(_) => {
                return Err(WriteError::Timeout {
                    after_ms: duration_ms(remaining),
                });
            }
            Ok(Err(e)) => return Err(client_write_error(e)),
            Ok(Ok(_)) => {}
        }
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), deadline)
            .await
    }

    /// Removes a node on this node, which must lead (else `ForwardToLeader`).
    pub(crate) async fn remove_node_here(
        &self,
        id: NodeId,
        deadline: Instant,
    ) -> Result<u64, WriteError> {
        let m = self.leader_metrics()?;
        let stored = m.membership_config.clone();
        let membership = stored.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(WriteError::MembershipRejected {
                    reason: format!("node {id} is the last voter; a cluster cannot be emptied"),
                });
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if membership.get_node(&id).is_some() {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Ok(stored.log_id().map_or(0, |l| l.index));
        };
        self.refuse_without_quorum()?;
        self.change_membership(change, deadline).await
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, NodeInfo>,
        deadline: Instant,
    ) -> Result<u64, WriteError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // `retain = false`: a removed voter leaves the cluster instead of
        // staying on as a learner.
        match tokio::time::timeout(remaining, self.raft.change_membership(change, false)).await {
            Err(_) => Err(self.timed_out(remaining)),
            Ok(Ok(response)) => Ok(response.log_id.index),
            Ok(Err(e)) => Err(client_write_error(e)),
        }
    }

    /// The metrics, if this node leads; `ForwardToLeader` otherwise.
    fn leader_metrics(&self) -> Result<RaftMetrics<NodeId, NodeInfo>, WriteError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return Ok(m);
        }
        let leader = m
            .current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        Err(WriteError::ForwardToLeader {
            leader_id: m.current_leader,
            leader,
        })
    }

    /// On a leader that has not heard from a majority for longer than an
    /// election timeout, refuses before proposing: the proposal could not
    /// commit, and the followers have likely elected someone else.
    fn refuse_without_quorum(&self) -> Result<(), WriteError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Ok(());
        }
        match m.millis_since_quorum_ack {
            Some(ms) if ms > self.settings.election_timeout_max_ms => Err(WriteError::NoQuorum {
                voters: voter_count(&m),
                detail: format!(
                    "leader {} has not heard from a majority of the voters for {ms} ms",
                    self.node_id
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The error for a proposal that did not commit within `timeout`:
    /// `NoQuorum` when this node leads without a fresh majority ack, else
    /// `Timeout` (outcome unknown).
    fn timed_out(&self, timeout: Duration) -> WriteError {
        let m = self.raft.metrics().borrow().clone();
        let stale = m
            .millis_since_quorum_ack
            .is_none_or(|ms| ms > self.settings.election_timeout_max_ms);
        if m.state == ServerState::Leader && stale {
            return WriteError::NoQuorum {
                voters: voter_count(&m),
                detail: format!(
                    "leader {} could not commit within {} ms: a majority of the voters is not acknowledging",
                    self.node_id,
                    duration_ms(timeout)
                ),
            };
        }
        WriteError::Timeout {
            after_ms: duration_ms(timeout),
        }
    }

    /// The members of the current membership config (voters and learners).
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, info)| Member {
                id: *id,
                info: info.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }

    /// The committed membership change that removed this node, if this node
    /// knows of one: its own view when it applied it (a leader removing
    /// itself), else the view of a member it asks over `NodeStatus` (a
    /// removed follower or learner never receives the entry that removes
    /// it: the leader stops replicating to it as soon as the entry exists).
    /// Asks the known leader, or without one at most `max_asked` members.
    pub async fn find_own_removal(&self, max_asked: usize) -> Option<Removal> {
        let own = self.metrics();
        if own.member_ids.contains(&self.node_id)
            && let Some(index) = own.membership_index
        {
            self.member_at.fetch_max(index + 1, Ordering::AcqRel);
        }
        let member_at = self.member_at.load(Ordering::Acquire).checked_sub(1);
        if let Some(removal) = removal_in(self.node_id, member_at, &own) {
            return Some(removal);
        }
        // A leader that is still a member has not been removed.
        if own.is_leader {
            return None;
        }
        let max_asked = if own.leader.is_some() { 1 } else { max_asked };
        let mut members = self.members();
        members.retain(|m| m.id != self.node_id);
        // The leader knows first; then the others in id order.
        members.sort_by_key(|m| (Some(m.id) != own.leader, m.id));
        for member in members.into_iter().take(max_asked) {
            match self.peer_status(&member.info).await {
                Ok(theirs) => {
                    if let Some(removal) = removal_in(self.node_id, member_at, &theirs) {
                        return Some(removal);
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = member.id, error = %e, "membership check: peer did not answer")
                }
            }
        }
        None
    }

    /// The metrics of the member at `peer` (over its `NodeStatus` RPC, with
    /// the transport's short status timeout).
    pub async fn peer_status(&self, peer: &NodeInfo) -> Result<ConsensusMetrics, CallError> {
        let Some(peers) = &self.peers else {
            return Err(CallError::NoTransport);
        };
        let timeout = Duration::from_millis(peers.settings().status_timeout_ms);
        peers
            .request(&peer.raft_addr, RaftRpc::NodeStatus, &(), timeout)
            .await
    }

    /// What the state machine applied since the last drain (config commands
    /// with their outcomes, membership changes, installed snapshots), for
    /// the node's audit log. Bounded: see [`AppliedFeed`].
    pub fn applied_feed(&self) -> Arc<AppliedFeed> {
        self.applied.clone()
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
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        ConsensusMetrics {
            node_id: m.id,
            term: m.current_term,
            leader: m.current_leader,
            is_leader: m.state == ServerState::Leader,
            state: state.to_string(),
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voter_ids: m.membership_config.membership().voter_ids().collect(),
            member_ids: m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect(),
            membership_index: m.membership_config.log_id().map(|l| l.index),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            replication: m
                .replication
                .map(|r| {
                    r.iter()
                        .filter(|(id, _)| **id != self.node_id)
                        .map(|(id, matched)| (*id, matched.map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            install_snapshot_rpcs_received: self.install_snapshot_rpcs.load(Ordering::Relaxed),
            serving: self.info.clone(),
        }
    }

    /// Counts one received InstallSnapshot RPC (called by the Raft server).
    pub(crate) fn count_install_snapshot_rpc(&self) {
        self.install_snapshot_rpcs.fetch_add(1, Ordering::Relaxed);
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's addresses.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The settings this node runs with.
    pub fn settings(&self) -> &RaftSettings {
        &self.settings
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

fn voter_count(m: &RaftMetrics<NodeId, NodeInfo>) -> usize {
    m.membership_config.membership().voter_ids().count()
}

fn outcome_version(outcome: &ApplyOutcome) -> u64 {
    match outcome {
        ApplyOutcome::Applied { version } | ApplyOutcome::Rejected { version, .. } => *version,
    }
}

fn membership_index(output: LeaderOutput) -> Result<u64, WriteError> {
    match output {
        LeaderOutput::Membership(index) => Ok(index),
        LeaderOutput::Write(outcome) => Err(WriteError::Fatal(format!(
            "a membership change was answered with a write outcome {outcome:?}"
        ))),
    }
}

/// Maps a failed call to `target` onto a write error.
fn call_error(target: &str, e: CallError) -> WriteError {
    match e {
        CallError::Timeout { after_ms, .. } => WriteError::Timeout { after_ms },
        other => WriteError::Transport {
            target: target.to_string(),
            detail: other.to_string(),
        },
    }
}

fn client_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::ForwardToLeader {
            leader_id: f.leader_id,
            leader: f.leader_node,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            e @ ChangeMembershipError::InProgress(_),
        )) => WriteError::MembershipBusy {
            detail: e.to_string(),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            WriteError::MembershipRejected {
                reason: e.to_string(),
            }
        }
        RaftError::Fatal(e) => WriteError::Fatal(fatal_message(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(
        node_id: NodeId,
        members: &[NodeId],
        index: Option<u64>,
        applied: u64,
    ) -> ConsensusMetrics {
        ConsensusMetrics {
            node_id,
            term: 1,
            leader: None,
            is_leader: false,
            state: "follower".into(),
            last_log_index: Some(applied),
            last_applied_index: Some(applied),
            snapshot_index: None,
            purged_index: None,
            voter_ids: members.to_vec(),
            member_ids: members.to_vec(),
            membership_index: index,
            millis_since_quorum_ack: None,
            replication: BTreeMap::new(),
            install_snapshot_rpcs_received: 0,
            serving: NodeInfo::default(),
        }
    }

    fn check(member_at: Option<u64>, theirs: &ConsensusMetrics, expected: Option<u64>) {
        assert_eq!(
            removal_in(3, member_at, theirs).map(|r| r.membership_index),
            expected,
            "member at {member_at:?}, theirs {theirs:?}"
        );
    }

    #[test]
    fn a_removal_counts_once_applied_newer_and_without_the_node() {
        // Node 3 last saw itself a member in the membership of entry 10.
        let member_at = Some(10);
        // A peer applied a newer membership without node 3.
        check(member_at, &view(1, &[1, 2], Some(14), 14), Some(14));
        // Appended but not applied yet: it may still be truncated.
        check(member_at, &view(1, &[1, 2], Some(14), 13), None);
        // Still listing node 3 (e.g. the joint config).
        check(member_at, &view(1, &[1, 2, 3], Some(14), 14), None);
        // An older view says nothing.
        check(member_at, &view(1, &[1, 2], Some(8), 14), None);
        // A leader that removed itself sees it in its own view.
        check(member_at, &view(3, &[1, 2], Some(14), 14), Some(14));
        // A node that never saw itself a member was not removed: one still
        // joining, or one that installed a snapshot taken before it was
        // added (its own view lists the others only, for now).
        check(None, &view(1, &[1, 2], Some(14), 14), None);
        check(None, &view(3, &[1, 2], Some(14), 14), None);
    }
}
