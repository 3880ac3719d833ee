//! Usage persistence: restore on start, batched flushes, window GC.
//!
//! Accepted usage lives in memory (quota's `Usage`) and is written to the
//! `usage` tree in batches every `usage_flush_interval_ms`, each batch made
//! durable (fsync) before it counts as persisted. The loss window on a hard
//! crash is therefore one flush interval plus one fsync.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tollgate_consensus::storage::{BatchOp, Storage, Tree};
use tollgate_quota::usage::{CounterKey, GCounter, Usage};

use crate::state::{NodeState, now_ms};

/// Name of the tree that holds usage counters.
pub const USAGE_TREE: &str = "usage";

/// Name of the tree that holds each license's seen hardware devices.
pub const DEVICES_TREE: &str = "devices";

/// How often expired window epochs are dropped.
pub const GC_INTERVAL_MS: u64 = 60_000;

/// Loads every persisted counter into a fresh `Usage` for `node_id`.
pub fn restore(storage: &dyn Storage, node_id: u64) -> anyhow::Result<Usage> {
    let tree = storage.tree(USAGE_TREE).context("opening usage tree")?;
    let mut usage = Usage::new(node_id);
    let mut n_skipped = 0usize;
    for (k, v) in tree.scan_prefix(b"").context("scanning usage tree")? {
        // A record this version cannot read is skipped, not fatal: losing one
        // counter's history beats refusing to start the node.
        match (
            CounterKey::from_bytes(&k),
            serde_json::from_slice::<GCounter>(&v),
        ) {
            (Ok(key), Ok(counter)) => usage.restore(key, counter),
            _ => n_skipped += 1,
        }
    }
    let devices = storage.tree(DEVICES_TREE).context("opening devices tree")?;
    for (k, v) in devices.scan_prefix(b"").context("scanning devices tree")? {
        match (
            String::from_utf8(k),
            serde_json::from_slice::<Vec<String>>(&v),
        ) {
            (Ok(license), Ok(ids)) => usage.restore_devices(license, ids),
            _ => n_skipped += 1,
        }
    }
    if n_skipped > 0 {
        tracing::warn!(n_skipped, "skipped unreadable usage records");
    }
    Ok(usage)
}

/// The trees usage is persisted in.
#[derive(Clone)]
pub struct UsageTrees {
    counters: Arc<dyn Tree>,
    devices: Arc<dyn Tree>,
}

impl UsageTrees {
    /// Opens both trees.
    pub fn open(storage: &dyn Storage) -> anyhow::Result<Self> {
        Ok(Self {
            counters: storage.tree(USAGE_TREE).context("opening usage tree")?,
            devices: storage.tree(DEVICES_TREE).context("opening devices tree")?,
        })
    }
}

/// Writes every counter and device set changed since the last flush, durably.
pub async fn flush(state: &NodeState, trees: &UsageTrees) -> anyhow::Result<()> {
    let seq = state.usage_seq();
    let (dirty, dirty_devices) = state.with_usage(|u| (u.take_dirty(), u.take_dirty_devices()));
    if dirty.is_empty() && dirty_devices.is_empty() {
        state.mark_persisted(seq);
        return Ok(());
    }
    let result = write_batch(trees, &dirty, &dirty_devices).await;
    match result {
        Ok(()) => {
            state.mark_persisted(seq);
            Ok(())
        }
        Err(e) => {
            // Put everything back as dirty so the next tick retries it: a
            // full disk or a failed task must not lose accepted usage.
            state.with_usage(|u| {
                for (key, counter) in dirty {
                    u.restore_dirty(key, counter);
                }
                for (license, ids) in dirty_devices {
                    u.restore_devices_dirty(license, ids);
                }
            });
            Err(e)
        }
    }
}

async fn write_batch(
    trees: &UsageTrees,
    dirty: &[(CounterKey, GCounter)],
    dirty_devices: &[(String, Vec<String>)],
) -> anyhow::Result<()> {
    let mut ops = Vec::with_capacity(dirty.len());
    for (key, counter) in dirty {
        ops.push(BatchOp::Insert {
            key: key.to_bytes(),
            value: serde_json::to_vec(counter)?,
        });
    }
    let mut device_ops = Vec::with_capacity(dirty_devices.len());
    for (license, ids) in dirty_devices {
        device_ops.push(BatchOp::Insert {
            key: license.as_bytes().to_vec(),
            value: serde_json::to_vec(ids)?,
        });
    }
    let t = trees.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        t.devices.apply_batch(device_ops)?;
        t.counters.apply_batch(ops)?;
        t.devices.flush()?;
        t.counters.flush()?;
        Ok(())
    })
    .await
    .context("usage flush task")?
}

/// Runs the flush and GC loops until `shutdown` flips, then flushes once more.
pub async fn run(
    state: Arc<NodeState>,
    storage: Arc<dyn Storage>,
    flush_interval_ms: u64,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let trees = UsageTrees::open(storage.as_ref())?;
    let mut flush_tick = tokio::time::interval(Duration::from_millis(flush_interval_ms.max(1)));
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc_tick = tokio::time::interval(Duration::from_millis(GC_INTERVAL_MS));
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = flush_tick.tick() => {
                if let Err(e) = flush(&state, &trees).await {
                    tracing::error!(error = %e, "usage flush failed; will retry");
                }
            }
            _ = gc_tick.tick() => {
                let config = state.config();
                let removed = state.with_usage(|u| u.gc(&config, now_ms()));
                if !removed.is_empty() {
                    let ops = removed.iter().map(|k| BatchOp::Remove { key: k.to_bytes() }).collect();
                    let counters = Arc::clone(&trees.counters);
                    let removed_ok = tokio::task::spawn_blocking(move || counters.apply_batch(ops)).await;
                    if !matches!(removed_ok, Ok(Ok(()))) {
                        tracing::warn!("usage GC could not delete expired counters from disk; a later GC drops them again");
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    flush(&state, &trees).await
}
