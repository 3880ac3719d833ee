//! The node's shared state and its hot path.
//!
//! `NodeState` glues the applied config (an `Arc` swapped on every Raft
//! apply, read without a lock), the node-local usage state from quota/ and
//! the clock. It reads the clock and draws randomness so that quota/ never
//! has to. Business rules do not live here: `quota::decide` owns them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tollgate_consensus::ConsensusNode;
use tollgate_quota::config::Config;
use tollgate_quota::decision::{Decision, Outcome};
use tollgate_quota::lineage::LineageGraph;
use tollgate_quota::request::{CheckRequest, RequestError};
use tollgate_quota::seats::{SeatDecision, SeatRequest};
use tollgate_quota::usage::Usage;

use crate::alerts::Alerts;
use crate::audit::Auditor;
use crate::audit::record::{DecisionOp, SeatCall};
use crate::clock::Clock;
use crate::dashboard::Dashboard;
use crate::drain::Drain;
use crate::gossip::GossipNode;
use crate::metrics::{DecisionKind, Metrics};
use crate::persist::Flushes;
use crate::roles::TokenSet;

/// Outcome counters for the status API. `/metrics` has the finer breakdown
/// (by kind, outcome and reason) in [`NodeState::metrics`].
#[derive(Debug, Default)]
pub struct Stats {
    /// Decisions that allowed.
    pub n_allow: AtomicU64,
    /// Decisions that denied.
    pub n_deny: AtomicU64,
    /// Decisions that throttled.
    pub n_throttle: AtomicU64,
    /// Requests rejected as malformed.
    pub n_invalid: AtomicU64,
    /// Reports recorded.
    pub n_report: AtomicU64,
}

/// Shared state of one running node.
pub struct NodeState {
    /// This node's Raft id.
    pub node_id: u64,
    /// This node's region label.
    pub region: String,
    /// The Raft handle for admin writes and metrics (shared with the Raft
    /// transport server).
    pub consensus: Arc<ConsensusNode>,
    config: Arc<ArcSwap<Config>>,
    usage: Mutex<Usage>,
    /// The API tokens this node accepts, with their actor names and roles.
    pub tokens: TokenSet,
    /// Whether the edge HTTP API rejects unknown JSON fields.
    pub strict_fields: bool,
    /// Decision counters.
    pub stats: Stats,
    /// What `/metrics` exposes and the dashboard draws.
    pub metrics: Metrics,
    /// Dashboard sessions and the sections other parts of the node add.
    pub dashboard: Dashboard,
    /// Bumped on every change to usage; the flusher records how far it got.
    usage_seq: AtomicU64,
    usage_persisted_seq: AtomicU64,
    persisted_tx: tokio::sync::watch::Sender<u64>,
    /// The storage engine's flushes, shared by the usage flusher and the
    /// audit writer (see [`crate::persist::Flushes`]).
    pub storage_flushes: Arc<Flushes>,
    /// Wakes the flusher early when a caller waits for durability (group
    /// commit: one fsync covers everyone waiting at that moment).
    pub flush_wanted: tokio::sync::Notify,
    /// Whether a Check, Report or seat call that records usage answers only
    /// once that usage is on disk.
    pub durable_usage_ack: bool,
    /// The usage gossip of this node, once started.
    pub gossip: OnceLock<Arc<GossipNode>>,
    /// The wall clock every decision, window and lease is measured by.
    pub clock: Arc<Clock>,
    /// Alert and escalation queues (see `alerts`).
    pub alerts: Alerts,
    /// The audit trail's queue and counters.
    pub audit: Auditor,
    /// Whether this node still takes usage or is leaving (see `drain`).
    pub drain: Drain,
}

/// What deciding one request did.
struct Ran {
    decision: Decision,
    /// The usage change number, when usage was recorded, and whether it
    /// holds escrow units.
    usage: Option<(u64, bool)>,
    /// When it was decided.
    at_ms: i64,
}

/// Why a Check, Report or seat call was not decided.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request is malformed; nothing changed.
    #[error(transparent)]
    Invalid(#[from] RequestError),
    /// The node is leaving the cluster and takes no more usage; nothing
    /// changed. Another member answers.
    #[error(
        "node {node_id} is draining (it is leaving the cluster); send the call to another member"
    )]
    Draining {
        /// This node.
        node_id: u64,
    },
}

/// A seat call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeatOp {
    /// Take a seat.
    Acquire,
    /// Extend a lease.
    Renew,
    /// Give a seat back.
    Release,
}

impl NodeState {
    /// Builds the state around a started consensus node.
    pub fn new(
        node_id: u64,
        region: String,
        consensus: Arc<ConsensusNode>,
        usage: Usage,
        tokens: TokenSet,
        strict_fields: bool,
    ) -> Self {
        let config = consensus.config();
        Self {
            node_id,
            region,
            consensus,
            config,
            usage: Mutex::new(usage),
            tokens,
            strict_fields,
            stats: Stats::default(),
            metrics: Metrics::default(),
            dashboard: Dashboard::default(),
            usage_seq: AtomicU64::new(0),
            usage_persisted_seq: AtomicU64::new(0),
            persisted_tx: tokio::sync::watch::channel(0).0,
            storage_flushes: Arc::new(Flushes::default()),
            flush_wanted: tokio::sync::Notify::new(),
            durable_usage_ack: false,
            gossip: OnceLock::new(),
            clock: Arc::new(Clock::system()),
            alerts: Alerts::default(),
            audit: Auditor::disabled(),
            drain: Drain::default(),
        }
    }

    /// Unix time in milliseconds on this node's clock, read here so that
    /// quota/ never reads a clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The config as last applied on this node.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Decides one Check and, unless it is a dry run, counts it.
    /// The request is taken whole: what the audit record keeps of it is
    /// moved there, not copied.
    pub async fn check(&self, req: CheckRequest) -> Result<Decision, CallError> {
        // Elapsed time only, never the time of day: measured, not decided on.
        let started = std::time::Instant::now();
        let ran = self.run(&req, false)?;
        self.audit
            .decision(DecisionOp::Check, req, &ran.decision, ran.at_ms)
            .await;
        self.wait_durable(ran.usage).await;
        self.metrics.latency.record(started.elapsed());
        Ok(ran.decision)
    }

    /// Records usage measured after an inference.
    pub async fn report(&self, req: CheckRequest) -> Result<Decision, CallError> {
        let ran = self.run(&req, true)?;
        self.audit
            .decision(DecisionOp::Report, req, &ran.decision, ran.at_ms)
            .await;
        self.wait_durable(ran.usage).await;
        Ok(ran.decision)
    }

    /// Waits until usage change `seq` is on disk if it must be: with
    /// `durable_usage_ack`, or when it holds escrow units (strict quotas,
    /// seats; the flag). Returns at once otherwise, or if the node stops.
    async fn wait_durable(&self, seq: Option<(u64, bool)>) {
        let Some((seq, _)) = seq.filter(|(_, escrow)| *escrow || self.durable_usage_ack) else {
            return;
        };
        let mut rx = self.persisted_tx.subscribe();
        if *rx.borrow() >= seq {
            return;
        }
        self.flush_wanted.notify_one();
        // Err only when the sender is gone, i.e. the node is shutting down.
        let _ = rx.wait_for(|persisted| *persisted >= seq).await;
    }

    /// Decides and commits.
    fn run(&self, req: &CheckRequest, is_report: bool) -> Result<Ran, CallError> {
        if let Err(e) = req.validate() {
            self.stats.n_invalid.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        let now = self.now_ms();
        let decision_id = self.next_decision_id(now);
        let config = self.config.load();
        let (decision, seq) = {
            let mut usage = self.usage.lock();
            // Under the usage lock: a drain's first flush takes it after
            // the phase changed, so every use counted here is in it.
            self.accepts_usage()?;
            let d = if is_report {
                usage.report(&config, req, now, decision_id)
            } else {
                usage.check(&config, req, now, decision_id)
            };
            let seq = (d.outcome == Outcome::Allow && !d.dry_run)
                .then(|| self.usage_seq.fetch_add(1, Ordering::AcqRel) + 1);
            (d, seq)
        };
        // Outside the usage lock: at most a few `try_send`s, and usually
        // nothing at all.
        self.alerts.after_decision(&config, &decision, now);
        // Strict quotas answer only once their usage is on disk, whatever
        // `durable_usage_ack` says: a crash that lost it would hand the
        // same rights out twice.
        let escrow = decision.effects.increments.iter().any(|i| i.escrow);
        let counter = if is_report {
            &self.stats.n_report
        } else {
            match decision.outcome {
                Outcome::Allow => &self.stats.n_allow,
                Outcome::Deny => &self.stats.n_deny,
                Outcome::Throttle => &self.stats.n_throttle,
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let kind = if is_report {
            DecisionKind::Report
        } else {
            DecisionKind::Check
        };
        self.metrics.record_decision(kind, &decision);
        Ok(Ran {
            decision,
            usage: seq.map(|n| (n, escrow)),
            at_ms: now,
        })
    }

    /// Acquires, renews or releases a seat lease.
    /// A draining node refuses to acquire or renew (those would hold a seat
    /// here after it left) but still releases.
    pub async fn seat(&self, op: SeatOp, req: &SeatRequest) -> Result<SeatDecision, CallError> {
        let now = self.now_ms();
        let config = self.config.load();
        let d = {
            let mut usage = self.usage.lock();
            if op != SeatOp::Release {
                self.accepts_usage()?;
            }
            let d = match op {
                SeatOp::Acquire => {
                    let salt = tollgate_consensus::runtime::random_u64();
                    let lease_id = format!("{:x}.{salt:016x}", self.node_id);
                    usage.acquire_seat(&config, req, now, lease_id)
                }
                SeatOp::Renew => usage.renew_seat(&config, req, now),
                SeatOp::Release => usage.release_seat(&config, req, now),
            };
            self.usage_seq.fetch_add(1, Ordering::AcqRel);
            d
        };
        let call = match op {
            SeatOp::Acquire => SeatCall::Acquire,
            SeatOp::Renew => SeatCall::Renew,
            SeatOp::Release => SeatCall::Release,
        };
        if self.audit.enabled() {
            let decision_id = self.next_decision_id(now);
            self.audit.seat(call, &d, decision_id, now).await;
        }
        // A seat is an escrow unit: always on disk before the answer.
        self.wait_durable(Some((self.usage_seq(), true))).await;
        Ok(d)
    }

    /// Refuses (and counts) a call that would take usage while the node
    /// drains. Call it under the usage lock (see [`Drain::accepts_usage`]).
    fn accepts_usage(&self) -> Result<(), CallError> {
        if self.drain.accepts_usage() {
            return Ok(());
        }
        self.drain.count_refused();
        Err(CallError::Draining {
            node_id: self.node_id,
        })
    }

    fn next_decision_id(&self, now: i64) -> String {
        let salt = tollgate_consensus::runtime::random_u64() as u32;
        format!("{:x}-{:x}-{:08x}", self.node_id, now, salt)
    }

    /// Runs `f` on the usage state under its lock (persistence, GC).
    pub fn with_usage<T>(&self, f: impl FnOnce(&mut Usage) -> T) -> T {
        f(&mut self.usage.lock())
    }

    /// The usage change counter, read before draining dirty counters.
    pub fn usage_seq(&self) -> u64 {
        self.usage_seq.load(Ordering::Acquire)
    }

    /// Records that every usage change up to `seq` is on disk.
    pub fn mark_persisted(&self, seq: u64) {
        let before = self.usage_persisted_seq.fetch_max(seq, Ordering::AcqRel);
        if seq > before {
            self.persisted_tx.send_replace(seq);
        }
    }

    /// How many usage changes are accepted but not yet on disk.
    pub fn usage_unflushed_changes(&self) -> u64 {
        self.usage_seq()
            .saturating_sub(self.usage_persisted_seq.load(Ordering::Acquire))
    }

    /// Whether accepted usage is waiting to be flushed.
    pub fn usage_unflushed(&self) -> bool {
        self.usage_persisted_seq.load(Ordering::Acquire) < self.usage_seq()
    }

    /// A JSON status document for operators.
    pub fn status_json(&self) -> serde_json::Value {
        let config = self.config();
        let m = self.consensus.metrics();
        let now = self.now_ms();
        let rights = self.with_usage(|u| u.rights_status(&config, now));
        let gossip = self
            .gossip
            .get()
            .map(|g| g.status_json(now))
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "node_id": self.node_id,
            "region": self.region,
            "policy_version": config.version,
            "n_licenses": config.licenses.len(),
            "n_models": config.models.len(),
            "n_datasets": config.datasets.len(),
            "raft": serde_json::to_value(&m).unwrap_or_default(),
            "gossip": gossip,
            "alerts": self.alerts.status_json(),
            "drain": self.drain.status_json(),
            "rights": rights,
            "audit": self.audit.status_json(),
            "usage": {
                "durable_ack": self.durable_usage_ack,
                "seq": self.usage_seq(),
                "persisted_seq": self.usage_persisted_seq.load(Ordering::Acquire),
                "unflushed": self.usage_unflushed(),
            },
            "decisions": {
                "allow": self.stats.n_allow.load(Ordering::Relaxed),
                "deny": self.stats.n_deny.load(Ordering::Relaxed),
                "throttle": self.stats.n_throttle.load(Ordering::Relaxed),
                "invalid": self.stats.n_invalid.load(Ordering::Relaxed),
                "report": self.stats.n_report.load(Ordering::Relaxed),
            }
        })
    }

    /// `license`'s lineage graph as this node knows it. The usage lock is
    /// held only to copy the edge counts out.
    pub fn lineage_graph(&self, license: &str) -> LineageGraph {
        let counts = self.with_usage(|u| u.lineage_counts(license));
        LineageGraph::from_counts(license, counts.iter().map(|(s, n)| (s.as_str(), *n)))
    }

    /// This node's view of every counter (optionally of one license), for
    /// operators and convergence checks.
    pub fn usage_json(&self, license: Option<&str>) -> serde_json::Value {
        let mut counters: Vec<serde_json::Value> = self.with_usage(|u| {
            u.counters()
                .filter(|(k, _)| license.is_none_or(|l| k.license == l))
                .map(|(k, c)| {
                    serde_json::json!({
                        "license": k.license,
                        "quota": k.quota,
                        "epoch": k.epoch,
                        "scope": k.scope,
                        "value": c.value(),
                        "slots": c.slots,
                    })
                })
                .collect()
        });
        counters.sort_by(|a, b| {
            let key = |v: &serde_json::Value| {
                (
                    v["license"].as_str().unwrap_or_default().to_string(),
                    v["quota"].as_str().unwrap_or_default().to_string(),
                    v["epoch"].as_u64().unwrap_or(0),
                    v["scope"].as_str().unwrap_or_default().to_string(),
                )
            };
            key(a).cmp(&key(b))
        });
        serde_json::json!({"node_id": self.node_id, "counters": counters})
    }
}
