//! Node settings: what `tollgate serve --config FILE` reads.
//!
//! Settings are plain data with defaults; command-line flags override the
//! file. Nothing here opens sockets or files other than the settings file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

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
        }
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
