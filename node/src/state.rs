//! The node's shared state and its hot path.
//!
//! `NodeState` glues the applied config (an `Arc` swapped on every Raft
//! apply, read without a lock), the node-local usage state from quota/ and
//! the clock. It reads the clock and draws randomness so that quota/ never
//! has to. Business rules do not live here: `quota::decide` owns them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rand::Rng;
use sha2::{Digest, Sha256};
use tollgate_consensus::ConsensusNode;
use tollgate_quota::config::Config;
use tollgate_quota::decision::{Decision, Outcome};
use tollgate_quota::request::{CheckRequest, RequestError};
use tollgate_quota::usage::Usage;

/// Counters for the status API (and, later, /metrics).
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
    // SHA-256 of each admin token with the actor name it records.
    admin_tokens: Vec<([u8; 32], String)>,
    /// Whether the edge HTTP API rejects unknown JSON fields.
    pub strict_fields: bool,
    /// Decision counters.
    pub stats: Stats,
    /// Bumped on every change to usage; the flusher records how far it got.
    usage_seq: AtomicU64,
    usage_persisted_seq: AtomicU64,
}

/// Unix time in milliseconds, read here so that quota/ never reads a clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl NodeState {
    /// Builds the state around a started consensus node.
    /// `admin_tokens` pairs each actor name with its plain token; only the
    /// tokens' hashes are kept.
    pub fn new(
        node_id: u64,
        region: String,
        consensus: Arc<ConsensusNode>,
        usage: Usage,
        admin_tokens: &[(String, String)],
        strict_fields: bool,
    ) -> Self {
        let config = consensus.config();
        Self {
            node_id,
            region,
            consensus,
            config,
            usage: Mutex::new(usage),
            admin_tokens: admin_tokens
                .iter()
                .map(|(name, token)| (Sha256::digest(token.trim().as_bytes()).into(), name.clone()))
                .collect(),
            strict_fields,
            stats: Stats::default(),
            usage_seq: AtomicU64::new(0),
            usage_persisted_seq: AtomicU64::new(0),
        }
    }

    /// The config as last applied on this node.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Decides one Check and, unless it is a dry run, counts it.
    pub fn check(&self, req: &CheckRequest) -> Result<Decision, RequestError> {
        self.run(req, false)
    }

    /// Records usage measured after an inference.
    pub fn report(&self, req: &CheckRequest) -> Result<Decision, RequestError> {
        self.run(req, true)
    }

    fn run(&self, req: &CheckRequest, is_report: bool) -> Result<Decision, RequestError> {
        if let Err(e) = req.validate() {
            self.stats.n_invalid.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let now = now_ms();
        let decision_id = self.next_decision_id(now);
        let config = self.config.load();
        let decision = {
            let mut usage = self.usage.lock();
            let d = if is_report {
                usage.report(&config, req, now, decision_id)
            } else {
                usage.check(&config, req, now, decision_id)
            };
            if d.outcome == Outcome::Allow && !d.dry_run {
                self.usage_seq.fetch_add(1, Ordering::Release);
            }
            d
        };
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
        Ok(decision)
    }

    fn next_decision_id(&self, now: i64) -> String {
        let salt: u32 = rand::thread_rng().r#gen();
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
        self.usage_persisted_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// Whether accepted usage is waiting to be flushed.
    pub fn usage_unflushed(&self) -> bool {
        self.usage_persisted_seq.load(Ordering::Acquire) < self.usage_seq()
    }

    /// Checks a bearer token against the admin tokens; returns the name of
    /// the matching token, which is recorded as the actor of changes.
    pub fn authorize_admin(&self, authorization: Option<&str>) -> Option<String> {
        let token = authorization?.trim().strip_prefix("Bearer ")?.trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Comparing digests keeps the comparison's timing unrelated to the token.
        self.admin_tokens
            .iter()
            .find(|(hash, _)| *hash == digest)
            .map(|(_, name)| name.clone())
    }

    /// A JSON status document for operators.
    pub fn status_json(&self) -> serde_json::Value {
        let config = self.config();
        let m = self.consensus.metrics();
        serde_json::json!({
            "node_id": self.node_id,
            "region": self.region,
            "policy_version": config.version,
            "n_licenses": config.licenses.len(),
            "n_models": config.models.len(),
            "raft": serde_json::to_value(&m).unwrap_or_default(),
            "usage": {
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
}
