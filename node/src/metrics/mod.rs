//! Metrics: what `GET /metrics` exposes in the Prometheus text format, and
//! the recent history the dashboard draws.
//!
//! The hot path only touches relaxed atomics (decision counters indexed by
//! outcome and reason code) and one per-thread shard of the latency
//! histogram, after the decision is made and outside the usage lock.
//! Everything else (Raft, gossip, usage figures) is read when scraped, and
//! quota utilisation is read from the latest sample the sampler task
//! ([`run_sampler`]) takes every `metrics.sample_interval_ms`, so a scrape
//! never walks the counters under the usage lock.
//!
//! Label sets are bounded: outcomes, reason codes, peers (the membership)
//! and Raft states. License ids appear only with
//! `metrics.per_license_labels`, and then at most [`MAX_LICENSE_SERIES`] of
//! them. Other parts of the node add their own counters and gauges through
//! [`Metrics::registry`].

pub mod exposition;
pub mod history;
pub mod latency;
pub mod registry;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tollgate_quota::decision::{Decision, Outcome, ReasonCode};
use tollgate_quota::utilization::QuotaUtilization;

use crate::state::NodeState;
use exposition::{MetricType, TextEncoder};
use history::{DecisionPoint, History};
use latency::{BUCKETS_SECONDS, LatencyHistogram, QUANTILES};
use registry::{Gauge, Registry};

/// Most licenses with series of their own under `per_license_labels`;
/// decisions of further licenses are counted under `license="_other"`.
pub const MAX_LICENSE_SERIES: usize = 2_000;

/// The audit backlog gauge's name: records accepted but not yet appended.
pub const AUDIT_BACKLOG: &str = "tollgate_audit_backlog_records";

/// Metrics settings (`metrics:` in the node's settings file).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Label quota utilisation and decision counts with the license id.
    /// Off by default: the number of series then grows with the number of
    /// licenses, and license ids become visible to whoever may scrape.
    pub per_license_labels: bool,
    /// Require a bearer token of at least the `viewer` role on
    /// `GET /metrics`. Off by default, like `/v1/status`, whose figures
    /// it shares.
    pub require_token: bool,
    /// How often quota utilisation is sampled for metrics and the
    /// dashboard (ms).
    pub sample_interval_ms: u64,
    /// Samples kept per series for the dashboard's charts.
    pub history_samples: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            per_license_labels: false,
            require_token: false,
            sample_interval_ms: 5_000,
            history_samples: 120,
        }
    }
}

/// Whether a decision answered a Check or a Report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionKind {
    /// A Check (before the use).
    Check,
    /// A Report (usage measured after the use).
    Report,
}

impl DecisionKind {
    const ALL: [DecisionKind; 2] = [DecisionKind::Check, DecisionKind::Report];

    fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Check => "check",
            DecisionKind::Report => "report",
        }
    }

    fn index(self) -> usize {
        match self {
            DecisionKind::Check => 0,
            DecisionKind::Report => 1,
        }
    }
}

const OUTCOMES: [Outcome; 3] = [Outcome::Allow, Outcome::Deny, Outcome::Throttle];
const N_REASONS: usize = ReasonCode::ALL.len();

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Allow => 0,
        Outcome::Deny => 1,
        Outcome::Throttle => 2,
    }
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// Decisions by kind, outcome and first reason (slot 0: no reason), and
/// reason codes reported by outcome.
struct DecisionCounters {
    by_first_reason: [[[AtomicU64; N_REASONS + 1]; 3]; 2],
    reasons: [[AtomicU64; N_REASONS]; 3],
}

impl DecisionCounters {
    fn new() -> Self {
        Self {
            by_first_reason: std::array::from_fn(|_| std::array::from_fn(|_| counters())),
            reasons: std::array::from_fn(|_| counters()),
        }
    }
}

/// Decisions per license and outcome, when enabled.
#[derive(Default)]
struct LicenseCounters {
    map: RwLock<HashMap<String, Arc<[AtomicU64; 3]>>>,
    other: [AtomicU64; 3],
}

impl LicenseCounters {
    fn record(&self, license: &str, outcome: usize) {
        if let Some(c) = self.map.read().get(license) {
            c[outcome].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut map = self.map.write();
        if let Some(c) = map.get(license) {
            c[outcome].fetch_add(1, Ordering::Relaxed);
        } else if map.len() < MAX_LICENSE_SERIES {
            let c = Arc::new(counters());
            c[outcome].fetch_add(1, Ordering::Relaxed);
            map.insert(license.to_string(), c);
        } else {
            self.other[outcome].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A node's metrics. See the module documentation.
pub struct Metrics {
    settings: MetricsSettings,
    decisions: DecisionCounters,
    per_license: Option<LicenseCounters>,
    /// Check latency.
    pub latency: LatencyHistogram,
    /// Families other parts of the node register (see [`Registry`]).
    pub registry: Registry,
    /// Audit records accepted but not yet appended; set by the audit log.
    pub audit_backlog: Arc<Gauge>,
    history: Mutex<History>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(MetricsSettings::default())
    }
}

/// Check decisions since start, per outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeTotals {
    /// Allowed.
    pub allow: u64,
    /// Denied.
    pub deny: u64,
    /// Throttled.
    pub throttle: u64,
}

impl Metrics {
    /// Metrics with `settings`.
    pub fn new(settings: MetricsSettings) -> Self {
        let registry = Registry::default();
        let audit_backlog = registry
            .gauge(
                AUDIT_BACKLOG,
                "Audit records accepted but not yet appended to the audit log.",
                &[],
            )
            // A constant, valid name in an empty registry.
            .unwrap_or_default();
        Self {
            per_license: settings.per_license_labels.then(LicenseCounters::default),
            history: Mutex::new(History::new(settings.history_samples)),
            settings,
            decisions: DecisionCounters::new(),
            latency: LatencyHistogram::new(),
            registry,
            audit_backlog,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &MetricsSettings {
        &self.settings
    }

    /// Counts one decision: by kind, outcome and first reason, every
    /// distinct reason code it reports, and, if enabled, per license.
    pub fn record_decision(&self, kind: DecisionKind, d: &Decision) {
        let o = outcome_index(d.outcome);
        let first = d.reasons.first().map_or(0, |r| r.code.index() + 1);
        self.decisions.by_first_reason[kind.index()][o][first].fetch_add(1, Ordering::Relaxed);
        for (i, r) in d.reasons.iter().enumerate() {
            // A code reported twice (two quotas exceeded) counts once: the
            // series counts decisions that carry the code.
            if d.reasons[..i].iter().all(|p| p.code != r.code) {
                self.decisions.reasons[o][r.code.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Some(per), Some(license)) = (&self.per_license, &d.license_id) {
            per.record(license, o);
        }
    }

    /// Check decisions since start, per outcome.
    pub fn check_totals(&self) -> OutcomeTotals {
        let sum = |o: Outcome| {
            self.decisions.by_first_reason[DecisionKind::Check.index()][outcome_index(o)]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum()
        };
        OutcomeTotals {
            allow: sum(Outcome::Allow),
            deny: sum(Outcome::Deny),
            throttle: sum(Outcome::Throttle),
        }
    }

    /// Decisions (Checks and Reports) that carried each reason code, denied
    /// and throttled ones together; codes never seen are left out.
    pub fn reason_totals(&self) -> Vec<(ReasonCode, u64)> {
        ReasonCode::ALL
            .iter()
            .map(|&code| {
                let n = self
                    .decisions
                    .reasons
                    .iter()
                    .map(|by_code| by_code[code.index()].load(Ordering::Relaxed))
                    .sum();
                (code, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// A copy of the recent history.
    pub fn history(&self) -> History {
        self.history.lock().clone()
    }

    /// Takes one sample: quota utilisation, decision totals; and drains the
    /// latency shards. `mono_ms` is a monotonic clock for the latency
    /// window.
    pub fn sample(&self, state: &NodeState, mono_ms: u64) {
        let now = state.now_ms();
        let config = state.config();
        let utilization = state.with_usage(|u| u.utilization(&config, now));
        let t = self.check_totals();
        let totals = DecisionPoint {
            at_ms: now,
            allow: t.allow,
            deny: t.deny,
            throttle: t.throttle,
        };
        self.history.lock().push(now, utilization, totals);
        self.latency.drain(mono_ms);
    }

    /// The exposition document for `GET /metrics`.
    pub fn render(&self, state: &NodeState) -> String {
        let mut out = TextEncoder::new();
        out.family(
            "tollgate_node_info",
            MetricType::Gauge,
            "This node: id, region and version (always 1).",
        );
        out.sample(
            "tollgate_node_info",
            &[
                ("node_id", &state.node_id.to_string()),
                ("region", &state.region),
                ("version", env!("CARGO_PKG_VERSION")),
            ],
            1.0,
        );
        self.render_decisions(state.stats.n_invalid.load(Ordering::Relaxed), &mut out);
        self.render_latency(&mut out);
        self.render_utilization(&mut out);
        render_usage(state, &mut out);
        render_gossip(state, &mut out);
        render_drain(state, &mut out);
        render_raft(state, &mut out);
        self.registry.render(&mut out);
        out.finish()
    }

    fn render_decisions(&self, n_invalid: u64, out: &mut TextEncoder) {
        const NAME: &str = "tollgate_decisions_total";
        out.family(
            NAME,
            MetricType::Counter,
            "Decisions made by this node, by kind (check or report), outcome and first reason code (none when allowed).",
        );
        for kind in DecisionKind::ALL {
            for outcome in OUTCOMES {
                let row = &self.decisions.by_first_reason[kind.index()][outcome_index(outcome)];
                for (slot, c) in row.iter().enumerate() {
                    let n = c.load(Ordering::Relaxed);
                    let reason = match slot {
                        0 => "none",
                        i => ReasonCode::ALL[i - 1].as_str(),
                    };
                    // Always show the series a decision of that outcome can
                    // land in, so that rates start at zero; leave out the
                    // impossible ones (allow with a reason, a block without
                    // one) unless they happened.
                    let possible = (outcome == Outcome::Allow) == (slot == 0);
                    if possible || n > 0 {
                        out.sample(
                            NAME,
                            &[
                                ("kind", kind.as_str()),
                                ("outcome", outcome.as_str()),
                                ("reason", reason),
                            ],
                            n as f64,
                        );
                    }
                }
            }
        }

        const REASONS: &str = "tollgate_decision_reasons_total";
        out.family(
            REASONS,
            MetricType::Counter,
            "Denied or throttled decisions (checks and reports) that reported each reason code; a decision reporting several codes counts under each.",
        );
        for outcome in [Outcome::Deny, Outcome::Throttle] {
            for code in ReasonCode::ALL {
                let n = self.decisions.reasons[outcome_index(outcome)][code.index()]
                    .load(Ordering::Relaxed);
                out.sample(
                    REASONS,
                    &[("outcome", outcome.as_str()), ("reason", code.as_str())],
                    n as f64,
                );
            }
        }

        out.single(
            "tollgate_requests_invalid_total",
            MetricType::Counter,
            "Check and Report requests rejected as malformed before any decision.",
            n_invalid as f64,
        );

        if let Some(per) = &self.per_license {
            const PER: &str = "tollgate_license_decisions_total";
            out.family(
                PER,
                MetricType::Counter,
                "Decisions by license and outcome (metrics.per_license_labels).",
            );
            let map = per.map.read();
            let mut licenses: Vec<(&String, &Arc<[AtomicU64; 3]>)> = map.iter().collect();
            licenses.sort_by(|a, b| a.0.cmp(b.0));
            let other = ("_other".to_string(), &per.other);
            let rows = licenses
                .iter()
                .map(|(l, c)| (l.as_str(), &***c))
                .chain(std::iter::once((other.0.as_str(), other.1)));
            for (license, c) in rows {
                for outcome in OUTCOMES {
                    let n = c[outcome_index(outcome)].load(Ordering::Relaxed);
                    if license == "_other" && n == 0 {
                        continue;
                    }
                    out.sample(
                        PER,
                        &[("license", license), ("outcome", outcome.as_str())],
                        n as f64,
                    );
                }
            }
        }
    }

    fn render_latency(&self, out: &mut TextEncoder) {
        let s = self.latency.snapshot();
        const SUMMARY: &str = "tollgate_check_latency_seconds";
        out.family(
            SUMMARY,
            MetricType::Summary,
            "Time to answer a Check on this node (decision, counting, and the wait for disk where the answer needs it), quantiles over the last 30 to 60 seconds; sum and count since start.",
        );
        for (q, v) in QUANTILES.iter().zip(s.quantiles) {
            out.sample(SUMMARY, &[("quantile", &q.to_string())], v);
        }
        out.sample("tollgate_check_latency_seconds_sum", &[], s.sum_seconds);
        out.sample("tollgate_check_latency_seconds_count", &[], s.count as f64);

        const HIST: &str = "tollgate_check_duration_seconds";
        out.family(
            HIST,
            MetricType::Histogram,
            "Time to answer a Check on this node, as cumulative buckets since start (bounds to 1% precision); aggregate these across nodes.",
        );
        for (le, n) in BUCKETS_SECONDS.iter().zip(s.buckets) {
            out.sample(
                "tollgate_check_duration_seconds_bucket",
                &[("le", &le.to_string())],
                n as f64,
            );
        }
        out.sample(
            "tollgate_check_duration_seconds_bucket",
            &[("le", "+Inf")],
            s.count as f64,
        );
        out.sample("tollgate_check_duration_seconds_sum", &[], s.sum_seconds);
        out.sample("tollgate_check_duration_seconds_count", &[], s.count as f64);
    }

    fn render_utilization(&self, out: &mut TextEncoder) {
        let history = self.history.lock();
        let latest = &history.latest;
        out.single(
            "tollgate_quota_sample_timestamp_seconds",
            MetricType::Gauge,
            "When the quota utilisation below was sampled (unix time; 0 before the first sample).",
            history.latest_at_ms as f64 / 1000.0,
        );
        let max = latest.iter().map(|u| u.ratio()).fold(0.0, f64::max);
        out.single(
            "tollgate_quota_utilization_max_ratio",
            MetricType::Gauge,
            "The highest used/limit of any quota or seat limit in its current window, as this node sees it.",
            max,
        );
        const BANDS: &str = "tollgate_quotas_by_utilization";
        out.family(
            BANDS,
            MetricType::Gauge,
            "Quotas and seat limits by how much of their current window is used.",
        );
        let mut bands = [0u64; 4];
        for u in latest {
            let r = u.ratio();
            let band = if r >= 1.0 {
                3
            } else if r >= 0.8 {
                2
            } else if r >= 0.5 {
                1
            } else {
                0
            };
            bands[band] += 1;
        }
        for (band, n) in ["below_50pct", "50_to_80pct", "80_to_100pct", "exhausted"]
            .iter()
            .zip(bands)
        {
            out.sample(BANDS, &[("band", band)], n as f64);
        }
        if self.settings.per_license_labels {
            type Figure = fn(&QuotaUtilization) -> f64;
            let figures: [(&str, &str, Figure); 3] = [
                (
                    "tollgate_quota_used",
                    "Units used in the current window, per license and quota (@seats: seats in use); the busiest scope for scoped quotas.",
                    |u| u.used as f64,
                ),
                (
                    "tollgate_quota_limit",
                    "Limit per window, per license and quota (@seats: max_instances).",
                    |u| u.limit as f64,
                ),
                (
                    "tollgate_quota_utilization_ratio",
                    "used/limit in the current window, per license and quota.",
                    QuotaUtilization::ratio,
                ),
            ];
            for (name, help, value) in figures {
                out.family(name, MetricType::Gauge, help);
                for u in latest {
                    out.sample(
                        name,
                        &[
                            ("license", &u.license),
                            ("quota", &u.quota),
                            ("metric", &u.metric),
                        ],
                        value(u),
                    );
                }
            }
        }
    }
}

fn render_usage(state: &NodeState, out: &mut TextEncoder) {
    out.single(
        "tollgate_usage_counters",
        MetricType::Gauge,
        "Usage counters (license, quota, window, scope) this node holds.",
        state.with_usage(|u| u.n_counters()) as f64,
    );
    out.single(
        "tollgate_usage_unflushed_changes",
        MetricType::Gauge,
        "Usage changes accepted but not yet on disk.",
        state.usage_unflushed_changes() as f64,
    );
    let config = state.config();
    out.single(
        "tollgate_config_version",
        MetricType::Gauge,
        "The config (policy) version this node decides with: the Raft index last applied to it.",
        config.version as f64,
    );
    out.single(
        "tollgate_licenses",
        MetricType::Gauge,
        "Licenses in this node's config.",
        config.licenses.len() as f64,
    );
}

fn render_gossip(state: &NodeState, out: &mut TextEncoder) {
    let Some(gossip) = state.gossip.get() else {
        return;
    };
    let f = gossip.figures(state.now_ms());
    let ids: Vec<String> = f.peers.iter().map(|p| p.id.to_string()).collect();
    let per_peer = |out: &mut TextEncoder,
                    name: &str,
                    kind: MetricType,
                    help: &str,
                    value: &dyn Fn(usize) -> Option<f64>| {
        out.family(name, kind, help);
        for (i, id) in ids.iter().enumerate() {
            if let Some(v) = value(i) {
                out.sample(name, &[("peer", id)], v);
            }
        }
    };
    per_peer(
        out,
        "tollgate_gossip_peer_lag_seconds",
        MetricType::Gauge,
        "How long the peer has been missing some of this node's usage (0: up to date as far as acks tell).",
        &|i| Some(f.peers[i].lag_ms as f64 / 1000.0),
    );
    per_peer(
        out,
        "tollgate_gossip_peer_last_heard_seconds",
        MetricType::Gauge,
        "Seconds since anything arrived from the peer (absent: never).",
        &|i| f.peers[i].last_heard_ms_ago.map(|ms| ms as f64 / 1000.0),
    );
    per_peer(
        out,
        "tollgate_gossip_peer_connected",
        MetricType::Gauge,
        "Whether a QUIC connection with the peer is up.",
        &|i| {
            Some(
                f.wire_of(f.peers[i].id)
                    .map_or(0.0, |w| if w.connected { 1.0 } else { 0.0 }),
            )
        },
    );
    per_peer(
        out,
        "tollgate_gossip_pending_counters",
        MetricType::Gauge,
        "Counters waiting to be sent to the peer.",
        &|i| Some(f.peers[i].pending as f64),
    );
    per_peer(
        out,
        "tollgate_gossip_in_flight_deltas",
        MetricType::Gauge,
        "Deltas sent to the peer and not yet acknowledged.",
        &|i| Some(f.peers[i].in_flight as f64),
    );
    per_peer(
        out,
        "tollgate_gossip_deltas_sent_total",
        MetricType::Counter,
        "Deltas sent to the peer.",
        &|i| Some(f.peers[i].deltas_sent as f64),
    );
    per_peer(
        out,
        "tollgate_gossip_deltas_acked_total",
        MetricType::Counter,
        "Deltas the peer acknowledged.",
        &|i| Some(f.peers[i].deltas_acked as f64),
    );
    per_peer(
        out,
        "tollgate_gossip_bytes_sent_total",
        MetricType::Counter,
        "UDP payload bytes sent to the peer (QUIC headers, handshakes and acks included).",
        &|i| {
            Some(
                f.wire_of(f.peers[i].id)
                    .map_or(0.0, |w| w.bytes_sent as f64),
            )
        },
    );
    per_peer(
        out,
        "tollgate_gossip_bytes_received_total",
        MetricType::Counter,
        "UDP payload bytes received from the peer.",
        &|i| {
            Some(
                f.wire_of(f.peers[i].id)
                    .map_or(0.0, |w| w.bytes_received as f64),
            )
        },
    );
    out.single(
        "tollgate_gossip_lag_max_seconds",
        MetricType::Gauge,
        "The largest lag of any peer.",
        f.max_lag_ms() as f64 / 1000.0,
    );
    out.single(
        "tollgate_gossip_published_counters",
        MetricType::Gauge,
        "Counters this node gossips.",
        f.published_counters as f64,
    );
    out.single(
        "tollgate_gossip_malformed_messages_total",
        MetricType::Counter,
        "Gossip messages that did not decode.",
        f.malformed_messages as f64,
    );
    out.single(
        "tollgate_gossip_send_errors_total",
        MetricType::Counter,
        "Gossip messages that could not be handed to the transport.",
        f.send_errors as f64,
    );
}

fn render_drain(state: &NodeState, out: &mut TextEncoder) {
    const PHASE: &str = "tollgate_drain_phase";
    out.family(
        PHASE,
        MetricType::Gauge,
        "This node's drain phase: 1 for the current one (serving, draining, drained, timed_out).",
    );
    let now = state.drain.phase();
    for phase in crate::drain::DrainPhase::all() {
        out.sample(
            PHASE,
            &[("phase", phase.as_str())],
            if phase == now { 1.0 } else { 0.0 },
        );
    }
    const DRAINS: &str = "tollgate_drains_total";
    out.family(
        DRAINS,
        MetricType::Counter,
        "Drains that ended, by outcome: drained (every live peer acked this node's usage) or timed_out.",
    );
    out.sample(
        DRAINS,
        &[("outcome", "drained")],
        state.drain.n_drained() as f64,
    );
    out.sample(
        DRAINS,
        &[("outcome", "timed_out")],
        state.drain.n_timed_out() as f64,
    );
    out.single(
        "tollgate_drain_refused_calls_total",
        MetricType::Counter,
        "Checks, Reports and seat calls refused because this node was draining.",
        state.drain.n_refused() as f64,
    );
}

fn render_raft(state: &NodeState, out: &mut TextEncoder) {
    let m = state.consensus.metrics();
    let members = state.consensus.members();
    out.single(
        "tollgate_raft_term",
        MetricType::Gauge,
        "This node's current Raft term.",
        m.term as f64,
    );
    out.single(
        "tollgate_raft_is_leader",
        MetricType::Gauge,
        "Whether this node is the Raft leader.",
        if m.is_leader { 1.0 } else { 0.0 },
    );
    out.single(
        "tollgate_raft_has_leader",
        MetricType::Gauge,
        "Whether this node knows a Raft leader.",
        if m.leader.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(leader) = m.leader {
        out.single(
            "tollgate_raft_leader_id",
            MetricType::Gauge,
            "The node id of the Raft leader this node knows (absent when none).",
            leader as f64,
        );
    }
    const STATE: &str = "tollgate_raft_state";
    out.family(
        STATE,
        MetricType::Gauge,
        "This node's Raft role: 1 for the current one.",
    );
    for s in ["leader", "follower", "candidate", "learner", "shutdown"] {
        out.sample(STATE, &[("state", s)], if m.state == s { 1.0 } else { 0.0 });
    }
    out.single(
        "tollgate_raft_last_log_index",
        MetricType::Gauge,
        "Index of the last entry in this node's Raft log.",
        m.last_log_index.unwrap_or(0) as f64,
    );
    out.single(
        "tollgate_raft_applied_index",
        MetricType::Gauge,
        "Index of the last Raft entry applied on this node.",
        m.last_applied_index.unwrap_or(0) as f64,
    );
    out.single(
        "tollgate_raft_members",
        MetricType::Gauge,
        "Members of the Raft membership (voters and learners).",
        members.len() as f64,
    );
    out.single(
        "tollgate_raft_voters",
        MetricType::Gauge,
        "Voting members of the Raft membership.",
        m.voter_ids.len() as f64,
    );
    if let Some(ms) = m.millis_since_quorum_ack {
        out.single(
            "tollgate_raft_quorum_ack_age_seconds",
            MetricType::Gauge,
            "On the leader: time since a majority of voters last acknowledged it.",
            ms as f64 / 1000.0,
        );
    }
}

/// Samples every `metrics.sample_interval_ms` (the first at once) until
/// `shutdown` flips.
pub async fn run_sampler(
    state: Arc<NodeState>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let interval_ms = state.metrics.settings().sample_interval_ms.max(10);
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let mono_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                state.metrics.sample(&state, mono_ms);
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_quota::decision::Reason;

    fn decision(outcome: Outcome, codes: &[ReasonCode], license: Option<&str>) -> Decision {
        let mut d = unknown_key_decision();
        d.outcome = outcome;
        d.license_id = license.map(str::to_string);
        d.reasons = codes
            .iter()
            .map(|&code| Reason {
                code,
                message: String::new(),
                rule: String::new(),
            })
            .collect();
        d
    }

    fn unknown_key_decision() -> Decision {
        let config = tollgate_quota::config::Config::default();
        let mut usage = tollgate_quota::usage::Usage::new(1);
        let req = tollgate_quota::request::CheckRequest::new("nope", "m", "1.0.0");
        usage.check(&config, &req, 0, String::new())
    }

    #[test]
    fn decisions_count_by_kind_outcome_first_reason_and_distinct_codes() {
        let m = Metrics::new(MetricsSettings {
            per_license_labels: true,
            ..MetricsSettings::default()
        });
        m.record_decision(
            DecisionKind::Check,
            &decision(Outcome::Allow, &[], Some("a")),
        );
        m.record_decision(
            DecisionKind::Check,
            &decision(
                Outcome::Deny,
                &[
                    ReasonCode::QuotaExceeded,
                    ReasonCode::QuotaExceeded,
                    ReasonCode::RegionNotAllowed,
                ],
                Some("a"),
            ),
        );
        m.record_decision(
            DecisionKind::Report,
            &decision(Outcome::Deny, &[ReasonCode::UnknownKey], None),
        );
        assert_eq!(
            m.check_totals(),
            OutcomeTotals {
                allow: 1,
                deny: 1,
                throttle: 0
            }
        );
        assert_eq!(
            m.reason_totals(),
            vec![
                (ReasonCode::UnknownKey, 1),
                (ReasonCode::RegionNotAllowed, 1),
                (ReasonCode::QuotaExceeded, 1),
            ]
        );
        let mut out = TextEncoder::new();
        m.render_decisions(0, &mut out);
        let text = out.finish();
        for line in [
            "tollgate_decisions_total{kind=\"check\",outcome=\"allow\",reason=\"none\"} 1",
            "tollgate_decisions_total{kind=\"check\",outcome=\"deny\",reason=\"quota_exceeded\"} 1",
            "tollgate_decisions_total{kind=\"report\",outcome=\"deny\",reason=\"unknown_key\"} 1",
            "tollgate_decision_reasons_total{outcome=\"deny\",reason=\"region_not_allowed\"} 1",
            "tollgate_license_decisions_total{license=\"a\",outcome=\"deny\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains("outcome=\"allow\",reason=\"quota_exceeded\""));
    }
}
