//! Usage persistence: restore on start and batched, durable flushes.
//!
//! Accepted usage lives in memory (quota's `Usage`) and is written to the
//! `usage` tree in batches every `usage_flush_interval_ms`, each batch made
//! durable (fsync) before it counts as persisted. The loss window on a hard
//! crash is therefore one flush interval plus one fsync (none with
//! `durable_usage_ack`). The loop that drives flushes, gossip and window GC
//! is in `gossip`; a flushed batch is what gossip may send.

use std::sync::Arc;

use anyhow::Context;
use tollgate_consensus::storage::{BatchOp, Storage, Tree};
use tollgate_quota::usage::{Counter, CounterKey, Lease, Usage};

use crate::state::NodeState;

/// Name of the tree that holds usage counters.
pub const USAGE_TREE: &str = "usage";

/// Name of the tree that holds each license's seen hardware devices.
pub const DEVICES_TREE: &str = "devices";

/// Name of the tree that holds the seat leases this node granted.
pub const SEATS_TREE: &str = "seats";

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
            serde_json::from_slice::<Counter>(&v),
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
    let seats = storage.tree(SEATS_TREE).context("opening seats tree")?;
    for (k, v) in seats.scan_prefix(b"").context("scanning seats tree")? {
        match (String::from_utf8(k), serde_json::from_slice::<Lease>(&v)) {
            (Ok(id), Ok(lease)) => usage.restore_lease(id, lease),
            _ => n_skipped += 1,
        }
    }
    if n_skipped > 0 {
        tracing::warn!(n_skipped, "skipped unreadable usage records");
    }
    Ok(usage)
}

/// The flushes of the node's storage engine, numbered as they begin.
///
/// A flush makes every earlier write to any tree of the engine durable
/// (see [`Tree::flush`]). So a writer that takes a [`Flushes::mark`] after
/// its writes knows they are durable once [`Flushes::covers`] says a flush
/// begun after that mark has finished, whoever asked for it, and need not
/// flush itself. The usage flusher and the audit writer share one: while
/// decisions are being counted, the usage flush of each tick also makes
/// the audit trail durable, and the disk sees one flush per tick, not two.
#[derive(Debug, Default)]
pub struct Flushes {
    count: parking_lot::Mutex<FlushCount>,
}

#[derive(Debug, Default)]
struct FlushCount {
    /// Flushes begun.
    begun: u64,
    /// The highest number of a flush that finished.
    finished: u64,
}

impl Flushes {
    /// Flushes the engine through `tree` and counts it.
    pub fn flush(&self, tree: &dyn Tree) -> Result<(), tollgate_consensus::storage::StorageError> {
        let n = self.begin();
        tree.flush()?;
        self.finish(n);
        Ok(())
    }

    /// Numbers a flush about to begin.
    fn begin(&self) -> u64 {
        let mut count = self.count.lock();
        count.begun += 1;
        count.begun
    }

    /// Records that flush `n` finished (flushes may finish out of order).
    fn finish(&self, n: u64) {
        let mut count = self.count.lock();
        count.finished = count.finished.max(n);
    }

    /// A mark to take after writing: see [`Flushes::covers`].
    pub fn mark(&self) -> u64 {
        self.count.lock().begun
    }

    /// Whether a flush begun after `mark` was taken has finished, so that
    /// every write made before it is durable.
    pub fn covers(&self, mark: u64) -> bool {
        self.count.lock().finished > mark
    }
}

/// The trees usage is persisted in.
#[derive(Clone)]
pub struct UsageTrees {
    pub(crate) counters: Arc<dyn Tree>,
    devices: Arc<dyn Tree>,
    seats: Arc<dyn Tree>,
    // Whether writes go to a thread of their own (a real fsync) or run
    // inline (the in-memory engine, where a thread would break the
    // simulator's determinism).
    blocking: bool,
}

/// Runs storage work `f` on a blocking thread when the engine needs one,
/// inline otherwise.
pub(crate) async fn run_storage<T: Send + 'static>(
    blocking: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    if blocking {
        tokio::task::spawn_blocking(f).await.context("storage task")
    } else {
        Ok(f())
    }
}

impl UsageTrees {
    /// Opens both trees.
    pub fn open(storage: &dyn Storage) -> anyhow::Result<Self> {
        Ok(Self {
            counters: storage.tree(USAGE_TREE).context("opening usage tree")?,
            devices: storage.tree(DEVICES_TREE).context("opening devices tree")?,
            seats: storage.tree(SEATS_TREE).context("opening seats tree")?,
            blocking: storage.needs_blocking_thread(),
        })
    }
}

/// Writes every counter, device set and lease changed since the last flush,
/// durably. Returns the counters written (what gossip may now send).
pub async fn flush(
    state: &NodeState,
    trees: &UsageTrees,
) -> anyhow::Result<Vec<(CounterKey, Counter)>> {
    let seq = state.usage_seq();
    let (dirty, dirty_devices, dirty_leases) = state.with_usage(|u| {
        (
            u.take_dirty(),
            u.take_dirty_devices(),
            u.take_dirty_leases(),
        )
    });
    if dirty.is_empty() && dirty_devices.is_empty() && dirty_leases.is_empty() {
        state.mark_persisted(seq);
        return Ok(Vec::new());
    }
    match write_batch(state, trees, &dirty, &dirty_devices, &dirty_leases).await {
        Ok(()) => {
            state.mark_persisted(seq);
            Ok(dirty)
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
                u.restore_leases_dirty(dirty_leases.into_iter().map(|(id, _)| id));
            });
            Err(e)
        }
    }
}

async fn write_batch(
    state: &NodeState,
    trees: &UsageTrees,
    dirty: &[(CounterKey, Counter)],
    dirty_devices: &[(String, Vec<String>)],
    dirty_leases: &[(String, Option<Lease>)],
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
    let mut seat_ops = Vec::with_capacity(dirty_leases.len());
    for (id, lease) in dirty_leases {
        seat_ops.push(match lease {
            Some(lease) => BatchOp::Insert {
                key: id.as_bytes().to_vec(),
                value: serde_json::to_vec(lease)?,
            },
            None => BatchOp::Remove {
                key: id.as_bytes().to_vec(),
            },
        });
    }
    let t = trees.clone();
    let flushes = Arc::clone(&state.storage_flushes);
    run_storage(t.blocking, move || -> anyhow::Result<()> {
        t.devices.apply_batch(device_ops)?;
        t.seats.apply_batch(seat_ops)?;
        t.counters.apply_batch(ops)?;
        // One flush covers the three trees (and whatever else was written
        // to the engine before it).
        flushes.flush(t.counters.as_ref())?;
        Ok(())
    })
    .await?
}

/// Deletes garbage-collected counters from disk, off the async runtime.
pub async fn delete_counters(trees: &UsageTrees, keys: &[CounterKey]) {
    if keys.is_empty() {
        return;
    }
    let ops = keys
        .iter()
        .map(|k| BatchOp::Remove { key: k.to_bytes() })
        .collect();
    let counters = Arc::clone(&trees.counters);
    let removed = run_storage(trees.blocking, move || counters.apply_batch(ops)).await;
    if !matches!(removed, Ok(Ok(()))) {
        tracing::warn!(
            "usage GC could not delete expired counters from disk; a later GC drops them again"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_flush_begun_after_the_mark_covers_it() {
        let flushes = Flushes::default();
        let mark = flushes.mark();
        assert!(!flushes.covers(mark), "no flush yet");

        // A flush already running when the mark is taken may have missed
        // the writes before it.
        let running = flushes.begin();
        let mark = flushes.mark();
        let after = flushes.begin();
        flushes.finish(running);
        assert!(!flushes.covers(mark), "the flush begun before the mark");
        // One begun after it covers it, even if an earlier one is still
        // running (flushes may finish out of order).
        let third = flushes.begin();
        flushes.finish(third);
        assert!(flushes.covers(mark));
        flushes.finish(after);
        assert!(flushes.covers(mark));
        assert!(!flushes.covers(flushes.mark()), "a new mark waits again");
    }

    #[test]
    fn flushing_through_any_tree_counts() -> anyhow::Result<()> {
        let storage = tollgate_consensus::storage::MemStorage::new();
        let tree = storage.tree("t")?;
        let flushes = Flushes::default();
        let mark = flushes.mark();
        flushes.flush(tree.as_ref())?;
        assert!(flushes.covers(mark));
        Ok(())
    }
}
