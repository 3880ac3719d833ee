//! Draining: a node that leaves hands its usage to the others first.
//!
//! A node leaves when a committed membership change removed it, or on a
//! graceful shutdown. Usage it acknowledged but had not gossiped yet would
//! leave with it, so before it goes it drains: from the moment [`Drain::begin`]
//! flips the phase, the hot path refuses new Checks, Reports and seat
//! acquisitions and renewals (`unavailable`, "node draining"); the gossip
//! loop (`crate::gossip::run`) flushes, hands its whole published state to
//! every peer and waits for their acks, bounded by `gossip.drain_timeout_ms`,
//! then calls [`Drain::finish`]. This module owns the phase and its figures;
//! it does no I/O and decides nothing about gossip.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tollgate_quota::gossip::DrainProgress;

/// Why a node drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainReason {
    /// A committed membership change left this node out.
    Removed,
    /// The node is shutting down.
    Shutdown,
}

/// Where a node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainPhase {
    /// Taking usage.
    Serving,
    /// Refusing usage, handing what it holds to its peers.
    Draining,
    /// Every live peer acked this node's whole usage; it may stop.
    Drained,
    /// The drain timeout passed first; some usage may exist only here.
    TimedOut,
}

impl DrainPhase {
    const ALL: [DrainPhase; 4] = [
        DrainPhase::Serving,
        DrainPhase::Draining,
        DrainPhase::Drained,
        DrainPhase::TimedOut,
    ];

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(Self::Serving)
    }

    fn as_u8(self) -> u8 {
        match self {
            DrainPhase::Serving => 0,
            DrainPhase::Draining => 1,
            DrainPhase::Drained => 2,
            DrainPhase::TimedOut => 3,
        }
    }

    /// The phase as status and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainPhase::Serving => "serving",
            DrainPhase::Draining => "draining",
            DrainPhase::Drained => "drained",
            DrainPhase::TimedOut => "timed_out",
        }
    }

    /// Whether the drain is over (either way).
    pub fn is_finished(self) -> bool {
        matches!(self, DrainPhase::Drained | DrainPhase::TimedOut)
    }

    /// Every phase, for metrics.
    pub fn all() -> [DrainPhase; 4] {
        Self::ALL
    }
}

/// What the status API shows of a drain.
#[derive(Clone, Debug, Default, Serialize)]
struct DrainRecord {
    reason: Option<DrainReason>,
    /// This node's clock (unix ms) when the drain began and ended.
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    /// The peers' standing when it ended.
    progress: Option<DrainProgress>,
}

/// The drain phase of one node. The hot path reads [`Drain::accepts_usage`]
/// (one atomic load); the rest is for the gossip loop, shutdown and status.
#[derive(Debug)]
pub struct Drain {
    phase: AtomicU8,
    changed: watch::Sender<DrainPhase>,
    record: Mutex<DrainRecord>,
    n_refused: AtomicU64,
    n_drained: AtomicU64,
    n_timed_out: AtomicU64,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(DrainPhase::Serving.as_u8()),
            changed: watch::channel(DrainPhase::Serving).0,
            record: Mutex::new(DrainRecord::default()),
            n_refused: AtomicU64::new(0),
            n_drained: AtomicU64::new(0),
            n_timed_out: AtomicU64::new(0),
        }
    }
}

impl Drain {
    /// The current phase.
    pub fn phase(&self) -> DrainPhase {
        DrainPhase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Whether new usage may be taken. Read under the usage lock, so that
    /// once [`Drain::begin`] returned, the next flush holds every use this
    /// node will ever acknowledge.
    pub fn accepts_usage(&self) -> bool {
        self.phase() == DrainPhase::Serving
    }

    /// Counts a call refused because the node drains.
    pub fn count_refused(&self) {
        self.n_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts draining at `now_ms`; false (and nothing changes) if a drain
    /// already began.
    pub fn begin(&self, reason: DrainReason, now_ms: i64) -> bool {
        if self
            .phase
            .compare_exchange(
                DrainPhase::Serving.as_u8(),
                DrainPhase::Draining.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        {
            let mut record = self.record.lock();
            record.reason = Some(reason);
            record.started_at_ms = Some(now_ms);
        }
        self.changed.send_replace(DrainPhase::Draining);
        true
    }

    /// Ends a drain: `drained` if every live peer acked everything, else it
    /// timed out. Does nothing unless draining.
    pub fn finish(&self, drained: bool, progress: DrainProgress, now_ms: i64) {
        let outcome = if drained {
            DrainPhase::Drained
        } else {
            DrainPhase::TimedOut
        };
        if self
            .phase
            .compare_exchange(
                DrainPhase::Draining.as_u8(),
                outcome.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return;
        }
        let counter = if drained {
            &self.n_drained
        } else {
            &self.n_timed_out
        };
        counter.fetch_add(1, Ordering::Relaxed);
        {
            let mut record = self.record.lock();
            record.finished_at_ms = Some(now_ms);
            record.progress = Some(progress);
        }
        self.changed.send_replace(outcome);
    }

    /// A receiver that sees every phase change.
    pub fn subscribe(&self) -> watch::Receiver<DrainPhase> {
        self.changed.subscribe()
    }

    /// Waits until the drain is over; at once if it is.
    pub async fn finished(&self) -> DrainPhase {
        let mut rx = self.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we
        // borrow it; fall back to the current phase regardless.
        match rx.wait_for(|p| p.is_finished()).await {
            Ok(p) => *p,
            Err(_) => self.phase(),
        }
    }

    /// Why the node drains, if it does.
    pub fn reason(&self) -> Option<DrainReason> {
        self.record.lock().reason
    }

    /// Calls refused while draining.
    pub fn n_refused(&self) -> u64 {
        self.n_refused.load(Ordering::Relaxed)
    }

    /// Drains that ended with every live peer holding everything (0 or 1).
    pub fn n_drained(&self) -> u64 {
        self.n_drained.load(Ordering::Relaxed)
    }

    /// Drains that ended at the timeout (0 or 1).
    pub fn n_timed_out(&self) -> u64 {
        self.n_timed_out.load(Ordering::Relaxed)
    }

    /// The `drain` section of `/v1/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let record = self.record.lock().clone();
        serde_json::json!({
            "phase": self.phase().as_str(),
            "reason": record.reason,
            "started_at_ms": record.started_at_ms,
            "finished_at_ms": record.finished_at_ms,
            "progress": record.progress,
            "refused_calls": self.n_refused(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_begins_once_and_finishes_once() {
        let drain = Drain::default();
        assert!(drain.accepts_usage());
        drain.finish(true, DrainProgress::default(), 5);
        assert_eq!(
            drain.phase(),
            DrainPhase::Serving,
            "not draining: no finish"
        );
        assert!(drain.begin(DrainReason::Removed, 10));
        assert!(!drain.accepts_usage());
        assert!(!drain.begin(DrainReason::Shutdown, 11));
        assert_eq!(drain.reason(), Some(DrainReason::Removed));
        drain.finish(false, DrainProgress::default(), 20);
        drain.finish(true, DrainProgress::default(), 21);
        assert_eq!(drain.phase(), DrainPhase::TimedOut);
        assert_eq!((drain.n_drained(), drain.n_timed_out()), (0, 1));
        assert!(!drain.accepts_usage());
        let status = drain.status_json();
        assert_eq!(status["phase"], "timed_out");
        assert_eq!(status["reason"], "removed");
        assert_eq!(status["started_at_ms"], 10);
        assert_eq!(status["finished_at_ms"], 20);
    }

    #[tokio::test]
    async fn waiters_see_the_end_of_a_drain() {
        let drain = std::sync::Arc::new(Drain::default());
        drain.begin(DrainReason::Shutdown, 0);
        let waiter = tokio::spawn({
            let drain = std::sync::Arc::clone(&drain);
            async move { drain.finished().await }
        });
        drain.finish(true, DrainProgress::default(), 1);
        assert_eq!(waiter.await.ok(), Some(DrainPhase::Drained));
        assert_eq!(drain.finished().await, DrainPhase::Drained);
    }
}
