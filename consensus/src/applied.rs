//! A bounded feed of what the state machine applied: each committed config
//! command with its outcome, each membership change, and each snapshot
//! installed in place of entries.
//!
//! The node reads it to keep a record of every config change (its audit
//! log). Applying must never wait for that reader, so the feed is a bounded
//! queue that drops its oldest entry when full and counts the drop; entries
//! re-applied after a restart appear again, and the reader tells them apart
//! by log index. This module must not interpret commands: it only carries
//! them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tollgate_quota::config::{ApplyOutcome, ConfigCommand};

use crate::types::NodeId;

/// Most applied entries the feed holds for its reader. Config changes are
/// admin writes, seconds apart; a reader that drains every few milliseconds
/// never comes near this, while a node replaying a long log at start, before
/// its reader runs, stays bounded.
pub const MAX_APPLIED_BACKLOG: usize = 4096;

/// One applied log entry (or installed snapshot).
#[derive(Clone, Debug)]
pub struct AppliedEntry {
    /// Raft log index: the config version after it.
    pub index: u64,
    /// Term of the leader that wrote it.
    pub term: u64,
    /// What it did.
    pub change: AppliedChange,
}

/// What an applied entry did.
#[derive(Clone, Debug)]
pub enum AppliedChange {
    /// A config command, applied or rejected by the state machine.
    Command {
        /// The command as committed.
        command: Arc<ConfigCommand>,
        /// What applying it did.
        outcome: ApplyOutcome,
    },
    /// A membership change.
    Membership {
        /// Voting members after it.
        voters: Vec<NodeId>,
        /// Learners after it.
        learners: Vec<NodeId>,
    },
    /// The state was replaced by a snapshot covering every entry up to
    /// `index`; those entries are not reported one by one.
    Snapshot,
}

/// The queue between the state machine and its reader.
#[derive(Debug, Default)]
pub struct AppliedFeed {
    queue: Mutex<VecDeque<AppliedEntry>>,
    n_dropped: AtomicU64,
    ready: tokio::sync::Notify,
}

impl AppliedFeed {
    /// Appends `entry`, dropping the oldest one if the feed is full.
    pub(crate) fn push(&self, entry: AppliedEntry) {
        {
            let mut queue = self.queue.lock();
            if queue.len() >= MAX_APPLIED_BACKLOG {
                queue.pop_front();
                self.n_dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(entry);
        }
        // Stores a permit if nobody waits, so a push is never missed.
        self.ready.notify_one();
    }

    /// Takes every entry pushed so far, oldest first.
    pub fn drain(&self) -> Vec<AppliedEntry> {
        self.queue.lock().drain(..).collect()
    }

    /// How many entries were dropped because the reader fell behind.
    pub fn n_dropped(&self) -> u64 {
        self.n_dropped.load(Ordering::Relaxed)
    }

    /// Resolves once an entry was pushed since the last wake-up.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> AppliedEntry {
        AppliedEntry {
            index,
            term: 1,
            change: AppliedChange::Snapshot,
        }
    }

    #[test]
    fn drains_in_order_and_drops_the_oldest_when_full() {
        let feed = AppliedFeed::default();
        for i in 0..(MAX_APPLIED_BACKLOG as u64 + 3) {
            feed.push(entry(i));
        }
        assert_eq!(feed.n_dropped(), 3);
        let drained = feed.drain();
        assert_eq!(drained.len(), MAX_APPLIED_BACKLOG);
        assert_eq!(drained.first().map(|e| e.index), Some(3));
        assert!(feed.drain().is_empty());
    }

    #[tokio::test]
    async fn a_push_before_the_wait_is_not_missed() {
        let feed = AppliedFeed::default();
        feed.push(entry(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), feed.ready())
            .await
            .expect("woken by the earlier push");
    }
}
