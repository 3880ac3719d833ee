//! The audit trail: every decision (Check, Report, seat calls) and every
//! applied config change, as a hash-chained, checkpoint-signed log in this
//! node's storage.
//!
//! The hot path only builds a small [`DecisionEvent`] (ids, codes, the raw
//! subject, which never leaves memory) and offers it to a bounded queue
//! ([`Auditor`]); one writer task (`writer`) pseudonymises subjects, chains
//! records, signs checkpoints and writes batches, each made durable before
//! the next. When the queue is full, `audit.on_full` decides: `block` (the
//! caller waits for room, at most `block_timeout_ms`, then the record is
//! shed) or `shed` (dropped at once); shed records are counted and a `shed`
//! record in the log says how many went missing where.
//!
//! Modules: `record` (the format, hashing, checkpoints; pure), `keys`
//! (Ed25519 signing key, subject HMAC key), `store` (the tree layout),
//! `verify` (checking a log), `export` (JSONL), `offline` (both on a
//! stopped node's data dir), `writer` (the task).
//! Nothing here decides; records hold ids and hashes, never payloads.

pub mod export;
pub mod keys;
pub mod offline;
pub mod record;
pub mod store;
pub mod verify;
pub(crate) mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tollgate_quota::decision::{Decision, Outcome};
use tollgate_quota::request::CheckRequest;
use tollgate_quota::seats::SeatDecision;

use self::record::{DecisionOp, SeatCall, Verdict};
use self::store::AuditStore;

/// Largest queue a node may be configured with.
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;
/// Most records one write carries (and one wake-up of the writer takes).
pub const MAX_BATCH_RECORDS: usize = 4096;
/// Shortest checkpoint interval accepted.
pub const MIN_CHECKPOINT_INTERVAL_MS: u64 = 100;
/// Longest flush interval accepted: records wait in memory at most this.
pub const MAX_FLUSH_INTERVAL_MS: u64 = 1_000;

/// What a Check does when the audit queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Wait for room (at most `block_timeout_ms`): the trail stays complete
    /// and decisions slow down with the disk.
    Block,
    /// Drop the record at once and count it: decisions never wait for the
    /// disk, and the trail says how many records it lacks.
    Shed,
}

impl OnFull {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::Block => "block",
            OnFull::Shed => "shed",
        }
    }
}

/// Audit settings as the node's settings file spells them (`audit:`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Record decisions and config changes. Off: nothing is written, and
    /// no key is registered.
    pub enabled: bool,
    /// What to do when the queue is full.
    pub on_full: OnFull,
    /// Decisions the queue holds before `on_full` applies.
    pub queue_capacity: usize,
    /// With `block`, how long a caller waits for room before its record is
    /// shed anyway (a writer that cannot write at all, e.g. a full disk,
    /// must not stop decisions for good).
    pub block_timeout_ms: u64,
    /// Sign a checkpoint after this many records...
    pub checkpoint_every_records: u64,
    /// ...or after this long, whichever comes first (if anything was
    /// written since the last one).
    pub checkpoint_interval_ms: u64,
    /// Least time between two writes (each ends in an fsync): records
    /// gather meanwhile and go to disk together. The most a crash can lose
    /// is this plus one fsync; decisions never wait for it.
    pub flush_interval_ms: u64,
    /// The Ed25519 signing key (PKCS#8, mode 0600); created on first
    /// start. Default: `audit.key` in the data dir.
    pub key_file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            on_full: OnFull::Block,
            queue_capacity: 65_536,
            block_timeout_ms: 1_000,
            checkpoint_every_records: 1_000,
            checkpoint_interval_ms: 10_000,
            flush_interval_ms: 10,
            key_file: None,
        }
    }
}

impl AuditConfig {
    /// The queue capacity, within bounds.
    pub fn capacity(&self) -> usize {
        self.queue_capacity.clamp(1, MAX_QUEUE_CAPACITY)
    }

    /// Records between checkpoints, at least 1.
    pub fn every_records(&self) -> u64 {
        self.checkpoint_every_records.max(1)
    }

    /// The checkpoint interval, at least [`MIN_CHECKPOINT_INTERVAL_MS`].
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.checkpoint_interval_ms.max(MIN_CHECKPOINT_INTERVAL_MS))
    }

    /// The least time between writes, at most [`MAX_FLUSH_INTERVAL_MS`].
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms.min(MAX_FLUSH_INTERVAL_MS))
    }

    /// The key file for a node whose data dir is `data_dir`.
    pub fn key_path(&self, data_dir: &std::path::Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| data_dir.join(KEY_FILE_NAME))
    }
}

/// The default name of the signing key file in the data dir.
pub const KEY_FILE_NAME: &str = "audit.key";

/// Counters of the audit trail, read by `/v1/status` (and metrics).
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Records durably written (decisions, config changes, start and shed
    /// markers).
    pub n_appended: AtomicU64,
    /// Decision records dropped because the queue was full.
    pub n_shed: AtomicU64,
    /// Decisions (and seat calls) accepted into the queue.
    pub n_queued: AtomicU64,
    /// Of those, how many are durably written.
    pub n_recorded: AtomicU64,
    /// Callers that found the queue full and waited (`block`).
    pub n_blocked: AtomicU64,
    /// Checkpoints written.
    pub n_checkpoints: AtomicU64,
    /// Writes that failed (each retried).
    pub n_write_errors: AtomicU64,
    /// Seq of the last durable record.
    pub last_seq: AtomicU64,
    /// Seq of the last durable checkpoint.
    pub last_checkpoint_seq: AtomicU64,
}

impl AuditStats {
    /// Decisions queued or being written, not yet durable.
    pub fn backlog(&self) -> u64 {
        // Read `recorded` first: it never exceeds `queued`.
        let recorded = self.n_recorded.load(Ordering::Acquire);
        self.n_queued
            .load(Ordering::Acquire)
            .saturating_sub(recorded)
    }
}

/// A Check or Report, as queued for the writer.
#[derive(Debug)]
pub struct DecisionEvent {
    op: DecisionOp,
    at_ms: i64,
    decision_id: String,
    license: Option<String>,
    // The raw subject stays in memory: the writer keeps only its HMAC.
    subject: Option<String>,
    model: String,
    model_version: String,
    verdict: Verdict,
    reasons: Vec<&'static str>,
    policy_version: u64,
    input_hash: Option<String>,
    output_hash: Option<String>,
    request_id: Option<String>,
    dry_run: bool,
}

/// A seat call, as queued for the writer.
#[derive(Debug)]
pub struct SeatEvent {
    call: SeatCall,
    at_ms: i64,
    decision_id: String,
    license: Option<String>,
    lease_id: Option<String>,
    granted: bool,
    reasons: Vec<&'static str>,
    policy_version: u64,
}

/// What the hot path queues.
#[derive(Debug)]
pub enum Event {
    /// A Check or Report.
    Decision(DecisionEvent),
    /// A seat call.
    Seat(SeatEvent),
}

/// The hot path's side of the audit trail: the queue and the counters.
pub struct Auditor {
    tx: Option<mpsc::Sender<Event>>,
    on_full: OnFull,
    block_timeout: Duration,
    /// The counters.
    pub stats: Arc<AuditStats>,
    store: Option<AuditStore>,
    blocking: bool,
    public_key: Option<[u8; 32]>,
}

impl Auditor {
    /// An auditor that records nothing (`audit.enabled: false`).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            on_full: OnFull::Block,
            block_timeout: Duration::ZERO,
            stats: Arc::new(AuditStats::default()),
            store: None,
            blocking: false,
            public_key: None,
        }
    }

    /// An auditor queueing to `tx`, over `store`, per `config`.
    pub(crate) fn new(
        tx: mpsc::Sender<Event>,
        config: &AuditConfig,
        store: AuditStore,
        blocking: bool,
        public_key: [u8; 32],
    ) -> Self {
        Self {
            tx: Some(tx),
            on_full: config.on_full,
            block_timeout: Duration::from_millis(config.block_timeout_ms),
            stats: Arc::new(AuditStats::default()),
            store: Some(store),
            blocking,
            public_key: Some(public_key),
        }
    }

    /// Whether decisions are recorded.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// The log, for reading (export, verify); `None` when disabled.
    pub fn store(&self) -> Option<&AuditStore> {
        self.store.as_ref()
    }

    /// Whether reading the log belongs on a blocking thread.
    pub fn needs_blocking_thread(&self) -> bool {
        self.blocking
    }

    /// The public key checkpoints are signed with.
    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.public_key
    }

    /// Queues a Check or Report decision; what the record keeps of the
    /// request is moved into it, not copied.
    pub async fn decision(&self, op: DecisionOp, req: CheckRequest, d: &Decision, at_ms: i64) {
        if self.tx.is_none() {
            return;
        }
        let event = Event::Decision(DecisionEvent {
            op,
            at_ms,
            decision_id: d.decision_id.clone(),
            license: d.license_id.clone(),
            subject: req.subject,
            model: req.model,
            model_version: req.model_version,
            verdict: match d.outcome {
                Outcome::Allow => Verdict::Allow,
                Outcome::Deny => Verdict::Deny,
                Outcome::Throttle => Verdict::Throttle,
            },
            reasons: d.reasons.iter().map(|r| r.code.as_str()).collect(),
            policy_version: d.policy_version,
            input_hash: req.input_hash,
            output_hash: req.output_hash,
            request_id: req.request_id,
            dry_run: d.dry_run,
        });
        self.submit(event).await;
    }

    /// Queues a seat call's answer.
    pub async fn seat(&self, call: SeatCall, d: &SeatDecision, decision_id: String, at_ms: i64) {
        if self.tx.is_none() {
            return;
        }
        let event = Event::Seat(SeatEvent {
            call,
            at_ms,
            decision_id,
            license: d.license_id.clone(),
            lease_id: d.lease_id.clone(),
            granted: d.granted,
            reasons: d.reasons.iter().map(|r| r.code.as_str()).collect(),
            policy_version: d.policy_version,
        });
        self.submit(event).await;
    }

    async fn submit(&self, event: Event) {
        let Some(tx) = &self.tx else {
            return;
        };
        let event = match tx.try_send(event) {
            Ok(()) => {
                self.stats.n_queued.fetch_add(1, Ordering::Release);
                return;
            }
            Err(TrySendError::Full(event)) => event,
            Err(TrySendError::Closed(_)) => {
                // The writer stopped (the node is shutting down).
                self.stats.n_shed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        match self.on_full {
            OnFull::Shed => {
                self.stats.n_shed.fetch_add(1, Ordering::Relaxed);
            }
            OnFull::Block => {
                self.stats.n_blocked.fetch_add(1, Ordering::Relaxed);
                let sent = tokio::time::timeout(self.block_timeout, tx.send(event)).await;
                if matches!(sent, Ok(Ok(()))) {
                    self.stats.n_queued.fetch_add(1, Ordering::Release);
                } else {
                    self.stats.n_shed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The `audit` part of `/v1/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let capacity = self.tx.as_ref().map_or(0, |tx| tx.max_capacity());
        serde_json::json!({
            "enabled": self.enabled(),
            "on_full": self.on_full.as_str(),
            "appended": load(&s.n_appended),
            "shed": load(&s.n_shed),
            "backlog": s.backlog(),
            "queued": load(&s.n_queued),
            "recorded": load(&s.n_recorded),
            "queue_capacity": capacity,
            "blocked": load(&s.n_blocked),
            "checkpoints": load(&s.n_checkpoints),
            "write_errors": load(&s.n_write_errors),
            "last_seq": load(&s.last_seq),
            "last_checkpoint_seq": load(&s.last_checkpoint_seq),
            "public_key": self.public_key.map(hex::encode),
        })
    }
}
