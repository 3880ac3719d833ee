//! Node settings: what `tollgate serve --config FILE` reads.
//!
//! Settings are plain data with defaults; command-line flags override the
//! file. Nothing here opens sockets or files other than the settings file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::alerts::AlertSettings;
use crate::audit::AuditConfig;
use crate::certs::TlsFiles;
use crate::gossip::GossipConfig;
use crate::metrics::MetricsSettings;
use crate::roles::Role;

/// Default interval between usage flushes to disk. It is the loss window for
/// accepted usage on a hard crash of a single node.
pub const DEFAULT_USAGE_FLUSH_INTERVAL_MS: u64 = 10;

/// Largest edge or admin request body the node accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Everything a node needs to start.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// This node's id in the Raft cluster; never reused for another node.
    pub node_id: u64,
    /// The region label, used for region rules and, later, gossip preference.
    #[serde(default = "default_region")]
    pub region: String,
    /// Edge and admin gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP/JSON listen address.
    pub http_addr: SocketAddr,
    /// Where sled keeps the Raft log, the config snapshot and usage counters.
    pub data_dir: PathBuf,
    /// File holding the admin bearer token (one line).
    pub admin_token_file: PathBuf,
    /// Initialize a one-node cluster when the data dir is new.
    #[serde(default = "default_true")]
    pub bootstrap: bool,
    /// Documents (models, licenses) to apply when the config is empty.
    #[serde(default)]
    pub seed_documents: Option<PathBuf>,
    /// How often accepted usage is written to disk (ms).
    #[serde(default = "default_flush")]
    pub usage_flush_interval_ms: u64,
    /// Reject unknown JSON fields on the edge HTTP API.
    #[serde(default = "default_true")]
    pub strict_fields: bool,
    /// Raft log entries between snapshots.
    #[serde(default = "default_snapshot_after")]
    pub snapshot_after_entries: u64,
    /// Log entries kept below the latest snapshot, so a follower that lags
    /// by fewer entries catches up from the log rather than a snapshot.
    #[serde(default = "default_snapshot_keep")]
    pub snapshot_keep_entries: u64,
    /// Raft transport listen address. Peers reach this node here, and the
    /// address is replicated in the membership, so it must stay stable.
    /// Default: the gRPC address with its port + 100 (7400 -> 7500).
    #[serde(default)]
    pub raft_addr: Option<SocketAddr>,
    /// Usage gossip (QUIC, UDP) listen address, registered in the
    /// membership so peers find it. Default: the gRPC address with its
    /// port + 200 (7400 -> 7600).
    #[serde(default)]
    pub gossip_addr: Option<SocketAddr>,
    /// Usage gossip tuning.
    #[serde(default)]
    pub gossip: GossipConfig,
    /// PEM files for gossip's mutual TLS: the cluster CA, this node's
    /// certificate and its key (`tollgate certs init` makes dev ones).
    /// Absent: a CA and certificate of this node's own are created under
    /// `data_dir/certs`, which only suits a one-node cluster.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Accept fault-injection commands (drop gossip to/from peers) on the
    /// admin API. For tests and chaos runs only.
    #[serde(default)]
    pub enable_fault_injection: bool,
    /// Answer a Check, Report or seat call that records usage only once that
    /// usage is on disk (up to one flush interval later), so a crash never
    /// loses usage a caller was told about.
    #[serde(default)]
    pub durable_usage_ack: bool,
    /// Raft timing.
    #[serde(default)]
    pub raft: RaftTiming,
    /// The members a bootstrapping node forms the cluster with (itself
    /// included). Empty: a one-node cluster of this node. Used only when
    /// `bootstrap` is set and the data dir is new.
    #[serde(default)]
    pub initial_members: Vec<MemberSettings>,
    /// Raft address of any member of an existing cluster to join when the
    /// data dir is new (`serve --join`). Implies `bootstrap: false`.
    #[serde(default)]
    pub join: Option<String>,
    /// The name recorded as the actor of changes made with the token in
    /// `admin_token_file`.
    #[serde(default = "default_token_name")]
    pub admin_token_name: String,
    /// More API tokens, each with its own name for the change history and
    /// a role (`admin` unless set; `auditor` and `viewer` may only read, see
    /// `roles`).
    #[serde(default)]
    pub admin_tokens: Vec<NamedTokenFile>,
    /// File holding the secret nodes present to each other on the Raft
    /// port. Every member needs the same one. Default: `admin_token_file`.
    #[serde(default)]
    pub cluster_token_file: Option<PathBuf>,
    /// `/metrics` and the dashboard: labels, access, sampling.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Alert delivery: retries, backoff, timeout, body signing.
    #[serde(default)]
    pub alerts: AlertSettings,
    /// The audit trail: on or off, what a full queue does, checkpoint
    /// cadence, the signing key file (see `audit`).
    #[serde(default)]
    pub audit: AuditConfig,
}

/// Raft timing of one node. Every member should use the same values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTiming {
    /// Leader heartbeat interval (ms).
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout (ms).
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout (ms).
    pub election_timeout_max_ms: u64,
    /// How long an admin write may take before it fails (ms).
    pub write_timeout_ms: u64,
}

impl Default for RaftTiming {
    /// Values for regions a WAN apart: heartbeats well inside the election
    /// timeout, elections slow enough to ride out cross-region jitter.
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            write_timeout_ms: 5_000,
        }
    }
}

impl RaftTiming {
    /// Values for nodes on one host or one LAN (the embedded default):
    /// a dead leader is replaced in well under a second.
    pub fn local() -> Self {
        Self {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            write_timeout_ms: 3_000,
        }
    }
}

/// One member of the initial cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemberSettings {
    /// Node id.
    pub id: u64,
    /// Region label.
    pub region: String,
    /// Raft transport address.
    pub raft_addr: SocketAddr,
    /// Edge/admin gRPC address.
    pub grpc_addr: SocketAddr,
    /// HTTP address.
    pub http_addr: SocketAddr,
    /// Usage gossip address. Default: the gRPC port + 200.
    #[serde(default)]
    pub gossip_addr: Option<SocketAddr>,
}

/// An extra API token, the name changes made with it are recorded under,
/// and its role.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamedTokenFile {
    /// Actor name, e.g. `ci-pipeline` or `alice`.
    pub name: String,
    /// File holding the token (one line).
    pub file: PathBuf,
    /// What the token may do.
    #[serde(default = "default_role")]
    pub role: Role,
}

fn default_role() -> Role {
    Role::Admin
}

fn default_region() -> String {
    "local-a".to_string()
}
fn default_true() -> bool {
    true
}
fn default_flush() -> u64 {
    DEFAULT_USAGE_FLUSH_INTERVAL_MS
}
fn default_snapshot_after() -> u64 {
    1000
}
fn default_snapshot_keep() -> u64 {
    100
}
fn default_token_name() -> String {
    "admin".to_string()
}

/// The Raft address used when none is configured: the gRPC port + 100.
pub fn default_raft_addr(grpc_addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(grpc_addr.ip(), grpc_addr.port().wrapping_add(100))
}

/// The gossip address used when none is configured: the gRPC port + 200.
pub fn default_gossip_addr(grpc_addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(grpc_addr.ip(), grpc_addr.port().wrapping_add(200))
}

impl NodeSettings {
    /// Settings for a node with everything at its default, under `data_dir`.
    pub fn local(
        node_id: u64,
        data_dir: &Path,
        grpc_addr: SocketAddr,
        http_addr: SocketAddr,
    ) -> Self {
        Self {
            node_id,
            region: default_region(),
            grpc_addr,
            http_addr,
            data_dir: data_dir.join(format!("node-{node_id}")),
            admin_token_file: data_dir.join("admin.token"),
            bootstrap: true,
            seed_documents: None,
            usage_flush_interval_ms: DEFAULT_USAGE_FLUSH_INTERVAL_MS,
            strict_fields: true,
            snapshot_after_entries: default_snapshot_after(),
            snapshot_keep_entries: default_snapshot_keep(),
            raft_addr: None,
            gossip_addr: None,
            gossip: GossipConfig::default(),
            tls: None,
            enable_fault_injection: false,
            durable_usage_ack: false,
            raft: RaftTiming::default(),
            initial_members: Vec::new(),
            join: None,
            admin_token_name: default_token_name(),
            admin_tokens: Vec::new(),
            cluster_token_file: None,
            metrics: MetricsSettings::default(),
            alerts: AlertSettings::default(),
            audit: AuditConfig::default(),
        }
    }

    /// The Raft address: configured, or derived from the gRPC address.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
            .unwrap_or_else(|| default_raft_addr(self.grpc_addr))
    }

    /// The gossip address: configured, or derived from the gRPC address.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
            .unwrap_or_else(|| default_gossip_addr(self.grpc_addr))
    }

    /// The file holding the cluster secret.
    pub fn cluster_token_file(&self) -> &Path {
        self.cluster_token_file
            .as_deref()
            .unwrap_or(&self.admin_token_file)
    }

    /// Reads settings from a YAML (or JSON) file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading settings file {}", path.display()))?;
        let settings: Self = serde_yaml::from_str(&text)
            .with_context(|| format!("parsing settings file {}", path.display()))?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_settings_file_parses() -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node.yaml");
        let s = NodeSettings::from_file(&path)?;
        assert_eq!(s.node_id, 1);
        assert_eq!(s.usage_flush_interval_ms, DEFAULT_USAGE_FLUSH_INTERVAL_MS);
        assert_eq!(s.metrics, MetricsSettings::default());
        Ok(())
    }

    #[test]
    fn example_cluster_settings_agree_on_the_members() -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
        let nodes: Vec<NodeSettings> = (1..=3)
            .map(|i| NodeSettings::from_file(&dir.join(format!("node-{i}.yaml"))))
            .collect::<anyhow::Result<_>>()?;
        let members = &nodes[0].initial_members;
        assert_eq!(members.len(), 3);
        for (n, m) in nodes.iter().zip(members) {
            assert_eq!(n.node_id, m.id);
            assert_eq!(n.region, m.region);
            assert_eq!(n.raft_addr(), m.raft_addr);
            assert_eq!(n.grpc_addr, m.grpc_addr);
            assert_eq!(n.http_addr, m.http_addr);
            assert_eq!(Some(n.gossip_addr()), m.gossip_addr);
            assert!(n.tls.is_some(), "members share one CA for gossip");
            assert_eq!(n.raft, nodes[0].raft, "every member uses the same timing");
        }
        assert!(nodes[0].bootstrap && !nodes[1].bootstrap && !nodes[2].bootstrap);
        Ok(())
    }

    #[test]
    fn unknown_setting_is_an_error() {
        let text = "node_id: 1\ngrpc_addr: 127.0.0.1:1\nhttp_addr: 127.0.0.1:2\ndata_dir: d\nadmin_token_file: t\nflush_ms: 3\n";
        let err = serde_yaml::from_str::<NodeSettings>(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("flush_ms"), "{err}");
    }
}
