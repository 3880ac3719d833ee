//! Single-node Raft on sled: initialization, writes visible through the
//! published config, restart recovery, and snapshot + purge + restore; and
//! on the in-memory engine: restart, and a crash that loses unflushed
//! writes but no acknowledged one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tollgate_consensus::log_store::LOG_TREE;
use tollgate_consensus::{ConsensusNode, NoNetwork, NodeInfo, RaftSettings, SledStorage, Storage};
use tollgate_quota::config::{ApplyOutcome, Config, ConfigCommand, ConfigOp};
use tollgate_quota::license::parse_license;

const WAIT: Duration = Duration::from_secs(10);

/// The one place tests build a config command; adjust here if the license
/// schema changes.
fn put_cmd(i: usize) -> ConfigCommand {
    let yaml = format!(
        "apiVersion: tollgate/v1\nkind: License\nid: lic-{i}\ncustomer: C\nkeys: [{{key: key-{i}}}]\n"
    );
    let license = parse_license(&yaml).expect("test license parses");
    ConfigCommand {
        request_id: None,
        actor: "test".to_string(),
        reason: None,
        at_ms: 0,
        op: ConfigOp::PutLicense(license),
    }
}

fn info() -> NodeInfo {
    NodeInfo {
        region: "test".to_string(),
        raft_addr: "127.0.0.1:1".to_string(),
        grpc_addr: "127.0.0.1:2".to_string(),
        http_addr: "127.0.0.1:3".to_string(),
        ..NodeInfo::default()
    }
}

fn fast_settings() -> RaftSettings {
    RaftSettings {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 150,
        election_timeout_max_ms: 300,
        ..RaftSettings::default()
    }
}

async fn start(dir: &Path, settings: &RaftSettings) -> Result<ConsensusNode> {
    let storage: Arc<dyn Storage> = Arc::new(SledStorage::open(dir)?);
    let node = ConsensusNode::start(1, info(), storage, NoNetwork, settings).await?;
    Ok(node)
}

/// Config equality by value (Config has derived indexes and no PartialEq).
fn same_config(a: &Config, b: &Config) -> Result<bool> {
    Ok(serde_json::to_value(a)? == serde_json::to_value(b)?)
}

async fn write_n(node: &ConsensusNode, range: std::ops::Range<usize>) -> Result<u64> {
    let mut last = 0;
    for i in range {
        match node.write(put_cmd(i)).await? {
            ApplyOutcome::Applied { version } => last = version,
            other => bail!("write {i} not applied: {other:?}"),
        }
    }
    Ok(last)
}

#[tokio::test]
async fn t10_single_node_initializes_and_applies_a_write() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = start(dir.path(), &fast_settings()).await?;
    assert!(node.initialize_single().await?, "first initialization");
    assert!(!node.initialize_single().await?, "second call is a no-op");
    assert_eq!(node.wait_for_leader(WAIT).await?, 1);

    let config = node.config();
    let outcome = node.write(put_cmd(1)).await?;
    let ApplyOutcome::Applied { version } = outcome else {
        bail!("not applied: {outcome:?}");
    };
    let metrics = node.metrics();
    assert!(metrics.is_leader);
    assert_eq!(metrics.voter_ids, vec![1]);
    assert_eq!(metrics.last_applied_index, Some(version));
    let current = config.load();
    assert_eq!(current.version, version, "version is the log index");
    assert!(current.license("lic-1").is_some());
    assert_eq!(
        current
            .license_by_key("key-1")
            .map(|l| l.id.clone())
            .as_deref(),
        Some("lic-1"),
        "key index is live"
    );
    node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn t20_restart_recovers_config_and_version() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = fast_settings();
    let (before, version) = {
        let node = start(dir.path(), &settings).await?;
        node.initialize_single().await?;
        node.wait_for_leader(WAIT).await?;
        let version = write_n(&node, 0..5).await?;
        let before = node.current_config();
        node.shutdown().await?;
        (before, version)
    };

    let node = start(dir.path(), &settings).await.context("reopen")?;
    assert!(
        !node.initialize_single().await?,
        "already initialized before the restart"
    );
    node.wait_for_leader(WAIT).await?;
    node.wait_for_applied(version, WAIT).await?;
    let after = node.current_config();
    assert_eq!(after.licenses.len(), 5);
    assert!(after.license_by_key("key-4").is_some(), "key index rebuilt");
    // A new leader term appends a blank entry, which bumps the version.
    assert!(after.version >= version);
    let mut after_same_version = Config::clone(&after);
    after_same_version.version = before.version;
    assert!(same_config(&before, &after_same_version)?);

    // The log continues where it stopped.
    let ApplyOutcome::Applied { version: next } = node.write(put_cmd(99)).await? else {
        bail!("write after restart not applied");
    };
    assert!(next > version);
    node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn t30_snapshot_purges_log_and_restart_restores_from_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = RaftSettings {
        snapshot_after_entries: 10,
        max_in_snapshot_log_to_keep: 5,
        ..fast_settings()
    };
    let (before, version) = {
        let node = start(dir.path(), &settings).await?;
        node.initialize_single().await?;
        node.wait_for_leader(WAIT).await?;
        let version = write_n(&node, 0..50).await?;
        node.raft()
            .wait(Some(WAIT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= 40) && m.purged.is_some(),
                "snapshot and purge",
            )
            .await?;
        let metrics = node.metrics();
        let purged = metrics.purged_index.context("purged")?;
        let snapshot = metrics.snapshot_index.context("snapshot")?;
        assert!(purged > 0 && purged + 5 <= snapshot, "{metrics:?}");
        let before = node.current_config();
        node.shutdown().await?;
        (before, version)
    };

    // The log on disk really starts after the purge point.
    {
        let storage = SledStorage::open(dir.path())?;
        let log = storage.tree(LOG_TREE)?;
        let (first_key, _) = log.first()?.context("log not empty")?;
        let first_index = u64::from_be_bytes(first_key.as_slice().try_into()?);
        assert!(first_index > 1, "log was purged, starts at {first_index}");
    }

    let node = start(dir.path(), &settings).await?;
    // The persisted snapshot is published before Raft even elects a leader.
    assert!(node.current_config().licenses.len() >= 40);
    node.wait_for_leader(WAIT).await?;
    node.wait_for_applied(version, WAIT).await?;
    let mut after = Config::clone(&node.current_config());
    assert_eq!(after.licenses.len(), 50);
    assert!(after.license_by_key("key-49").is_some());
    assert!(after.version >= version);
    after.version = before.version;
    assert!(same_config(&before, &after)?);
    node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn t40_write_on_uninitialized_node_is_forwarded_without_leader() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = start(dir.path(), &fast_settings()).await?;
    match node.write(put_cmd(1)).await {
        Err(tollgate_consensus::WriteError::ForwardToLeader {
            leader_id: None, ..
        }) => {}
        other => bail!("expected ForwardToLeader without a leader, got {other:?}"),
    }
    node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn t50_mem_storage_node_survives_restart_on_same_engine() -> Result<()> {
    let storage = tollgate_consensus::MemStorage::new();
    let settings = fast_settings();
    let version = {
        let shared: Arc<dyn Storage> = Arc::new(storage.clone());
        let node = ConsensusNode::start(1, info(), shared, NoNetwork, &settings).await?;
        node.initialize_single().await?;
        node.wait_for_leader(WAIT).await?;
        let version = write_n(&node, 0..3).await?;
        node.shutdown().await?;
        version
    };
    let shared: Arc<dyn Storage> = Arc::new(storage);
    let node = ConsensusNode::start(1, info(), shared, NoNetwork, &settings).await?;
    assert!(!node.initialize_single().await?);
    node.wait_for_leader(WAIT).await?;
    node.wait_for_applied(version, WAIT).await?;
    assert_eq!(node.current_config().licenses.len(), 3);
    node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn t51_mem_storage_node_keeps_acknowledged_writes_across_a_crash() -> Result<()> {
    let storage = tollgate_consensus::MemStorage::new();
    // Small snapshots, so the crash also hits a snapshot and a purged log.
    let settings = RaftSettings {
        snapshot_after_entries: 4,
        max_in_snapshot_log_to_keep: 1,
        ..fast_settings()
    };
    let (version, before) = {
        let shared: Arc<dyn Storage> = Arc::new(storage.clone());
        let node = ConsensusNode::start(1, info(), shared, NoNetwork, &settings).await?;
        node.initialize_single().await?;
        node.wait_for_leader(WAIT).await?;
        let version = write_n(&node, 0..10).await?;
        let before = node.current_config();
        node.shutdown().await?;
        (version, before)
    };
    // Every acknowledged write was flushed; whatever was not is lost here.
    storage.crash();
    let shared: Arc<dyn Storage> = Arc::new(storage);
    let node = ConsensusNode::start(1, info(), shared, NoNetwork, &settings).await?;
    assert!(!node.initialize_single().await?);
    node.wait_for_leader(WAIT).await?;
    node.wait_for_applied(version, WAIT).await?;
    assert!(same_config(&before, &node.current_config())?);
    node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn t60_applied_commands_reach_the_feed_and_a_stopped_node_config_is_recoverable() -> Result<()>
{
    use tollgate_consensus::{AppliedChange, state_machine::recover_config};

    let dir = tempfile::tempdir()?;
    // Snapshots every 3 entries, so recovery reads a snapshot and a log.
    let settings = RaftSettings {
        snapshot_after_entries: 3,
        max_in_snapshot_log_to_keep: 0,
        ..fast_settings()
    };
    let version = {
        let node = start(dir.path(), &settings).await?;
        node.initialize_single().await?;
        node.wait_for_leader(WAIT).await?;
        let version = write_n(&node, 0..7).await?;
        let feed = node.applied_feed();
        let drained = feed.drain();
        let commands: Vec<(u64, String)> = drained
            .iter()
            .filter_map(|e| match &e.change {
                AppliedChange::Command { command, outcome } => {
                    assert!(matches!(outcome, ApplyOutcome::Applied { .. }));
                    Some((e.index, command.op.targets().join(",")))
                }
                _ => None,
            })
            .collect();
        assert_eq!(commands.len(), 7, "{commands:?}");
        assert_eq!(commands.last().map(|c| c.0), Some(version));
        assert_eq!(commands[0].1, "license:lic-0");
        assert!(
            drained
                .iter()
                .any(|e| matches!(&e.change, AppliedChange::Membership { voters, .. } if voters == &vec![1])),
            "the initial membership is in the feed"
        );
        assert_eq!(feed.n_dropped(), 0);
        node.shutdown().await?;
        version
    };
    let storage = SledStorage::open(dir.path())?;
    let config = recover_config(&storage)?;
    assert_eq!(config.version, version);
    assert_eq!(config.licenses.len(), 7);
    assert!(config.license_by_key("key-6").is_some());
    Ok(())
}
