//! Alerts: webhooks to a license's governance owner, and escalations
//! proposed through Raft.
//!
//! The hot path only hands events over: a threshold crossing that
//! `quota::decide` reported, a deny-rate spike (`quota::alerts::DenyRate`),
//! or a violation that escalates, each with `try_send` into a bounded
//! queue; a full queue drops the event and counts it. One task per node
//! ([`run`]) renders each event as JSON and delivers it with retries
//! (exponential backoff with jitter, at most `max_attempts`), at most
//! [`MAX_CONCURRENT_DELIVERIES`] at a time; it also proposes escalation
//! records, watches gossip lag and, on the leader, records in the license
//! history when an approved exception has ended. Every attempt of one event
//! sends the same bytes with the same `Idempotency-Key`, and every node
//! names the same crossing with the same key, so a receiver keeps one.
//!
//! Deliveries in progress when the node stops are dropped: alerts are
//! at-least-once per node while it runs, not durable. URLs, bodies and
//! secrets are never logged.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tollgate_quota::alerts::{
    DenyRate, DenyRateSpike, EscalationTrigger, ThresholdAlert, event_key,
};
use tollgate_quota::config::{Config, ConfigOp};
use tollgate_quota::decision::{Decision, Outcome};
use tollgate_quota::governance;

use crate::admin::{self, Caller};
use crate::state::NodeState;

/// Events waiting for delivery, per node. Past it, new events are dropped
/// (and counted): a receiver that is down must not hold the node's memory.
pub const ALERT_QUEUE_CAPACITY: usize = 1024;

/// Escalations waiting to be proposed, per node.
pub const ESCALATION_QUEUE_CAPACITY: usize = 256;

/// Deliveries in progress at once, retries included.
pub const MAX_CONCURRENT_DELIVERIES: usize = 8;

/// Escalation writes in progress at once: a write can wait seconds for a
/// quorum, and must not hold up deliveries meanwhile.
pub const MAX_CONCURRENT_PROPOSALS: usize = 4;

/// Events (anomalies, escalations) remembered as already sent or proposed
/// by this node, so one is not repeated; the oldest are forgotten first.
pub const MAX_REMEMBERED_EVENTS: usize = 4096;

/// Alert delivery settings, as the node's settings file spells them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// Attempts per event, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry (ms); it doubles with every retry, and
    /// each delay is drawn between half of it and all of it (jitter), so
    /// nodes retrying the same receiver spread out.
    pub retry_initial_ms: u64,
    /// Longest delay between two attempts (ms).
    pub retry_max_ms: u64,
    /// How long one attempt may take (ms).
    pub timeout_ms: u64,
    /// File holding a secret that signs every body with HMAC-SHA256
    /// (`X-Tollgate-Signature: sha256=<hex>`). Absent: bodies are unsigned.
    pub signing_secret_file: Option<PathBuf>,
    /// How often gossip lag is compared with the licenses' bounds (ms).
    pub lag_check_interval_ms: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            timeout_ms: 5_000,
            signing_secret_file: None,
            lag_check_interval_ms: 1_000,
        }
    }
}

/// Something to tell a governance owner.
#[derive(Clone, Debug)]
pub enum AlertEvent {
    /// A quota's usage reached one of its alert thresholds.
    Threshold(ThresholdAlert),
    /// A license's denied share of Checks at this node spiked.
    DenyRate {
        /// License id.
        license: String,
        /// The spike.
        spike: DenyRateSpike,
    },
    /// Gossip from this node to a peer lags beyond a license's bound.
    GossipLag {
        /// License id.
        license: String,
        /// The peer.
        peer: u64,
        /// The lag (ms).
        lag_ms: i64,
        /// The license's bound (ms).
        bound_ms: u64,
        /// When this node first saw the lag over the bound (unix ms).
        since_ms: i64,
    },
    /// An escalation record was opened by this node's proposal.
    EscalationOpened {
        /// The escalation id.
        id: String,
    },
}

impl AlertEvent {
    fn license(&self) -> Option<&str> {
        match self {
            AlertEvent::Threshold(a) => Some(&a.key.license),
            AlertEvent::DenyRate { license, .. } | AlertEvent::GossipLag { license, .. } => {
                Some(license)
            }
            AlertEvent::EscalationOpened { .. } => None,
        }
    }
}

/// Delivery counters for the status API.
#[derive(Debug, Default)]
pub struct AlertStats {
    /// Events accepted into the queue.
    pub n_queued: AtomicU64,
    /// Events dropped because the queue was full.
    pub n_dropped: AtomicU64,
    /// Events a receiver accepted (2xx).
    pub n_delivered: AtomicU64,
    /// Events given up on (attempts exhausted, or refused with a 4xx).
    pub n_failed: AtomicU64,
    /// Attempts made, first tries included.
    pub n_attempts: AtomicU64,
    /// Escalations this node proposed.
    pub n_escalations_proposed: AtomicU64,
    /// Escalations dropped because their queue was full.
    pub n_escalations_dropped: AtomicU64,
}

/// A bounded set of recent event keys.
#[derive(Debug, Default)]
struct Recent {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Recent {
    /// Remembers `key`; false if it was already there.
    fn insert(&mut self, key: String) -> bool {
        if self.set.contains(&key) {
            return false;
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        while self.order.len() > MAX_REMEMBERED_EVENTS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn remove(&mut self, key: &str) {
        if self.set.remove(key) {
            self.order.retain(|k| k != key);
        }
    }
}

/// The alert side of one node: queues the hot path hands events to, and
/// the node-local state of anomaly detection.
pub struct Alerts {
    events_tx: mpsc::Sender<AlertEvent>,
    events_rx: Mutex<Option<mpsc::Receiver<AlertEvent>>>,
    escalations_tx: mpsc::Sender<EscalationTrigger>,
    escalations_rx: Mutex<Option<mpsc::Receiver<EscalationTrigger>>>,
    deny_rates: Mutex<HashMap<String, DenyRate>>,
    proposed: Mutex<Recent>,
    /// Delivery counters.
    pub stats: AlertStats,
}

impl Default for Alerts {
    fn default() -> Self {
        let (events_tx, events_rx) = mpsc::channel(ALERT_QUEUE_CAPACITY);
        let (escalations_tx, escalations_rx) = mpsc::channel(ESCALATION_QUEUE_CAPACITY);
        Self {
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            escalations_tx,
            escalations_rx: Mutex::new(Some(escalations_rx)),
            deny_rates: Mutex::new(HashMap::new()),
            proposed: Mutex::new(Recent::default()),
            stats: AlertStats::default(),
        }
    }
}

impl Alerts {
    /// Hands an event to the delivery task without waiting; a full queue
    /// drops it (counted in `alerts.dropped`).
    pub fn enqueue(&self, event: AlertEvent) {
        match self.events_tx.try_send(event) {
            Ok(()) => {
                self.stats.n_queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.n_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// What one committed decision calls for: its threshold alerts, a
    /// deny-rate observation when the license watches one, and an
    /// escalation when it was denied by a quota that escalates. Cheap when
    /// there is nothing to do: empty lists, and one flag test on `config`.
    pub fn after_decision(&self, config: &Config, decision: &Decision, now_ms: i64) {
        if decision.dry_run {
            return;
        }
        for alert in &decision.alerts {
            self.enqueue(AlertEvent::Threshold(alert.clone()));
        }
        let denied = decision.outcome == Outcome::Deny;
        if !(denied || config.watches_deny_rate()) {
            return;
        }
        let Some(license) = decision
            .license_id
            .as_deref()
            .and_then(|id| config.license(id))
        else {
            return;
        };
        if let Some(rule) = license
            .governance
            .as_ref()
            .and_then(|g| g.anomalies.as_ref())
            .and_then(|a| a.deny_rate.as_ref())
        {
            let spike = {
                let mut rates = self.deny_rates.lock();
                match rates.get_mut(&license.id) {
                    Some(rate) => rate.observe(rule, now_ms, denied),
                    None => rates
                        .entry(license.id.clone())
                        .or_default()
                        .observe(rule, now_ms, denied),
                }
            };
            if let Some(spike) = spike {
                self.enqueue(AlertEvent::DenyRate {
                    license: license.id.clone(),
                    spike,
                });
            }
        }
        if denied {
            for trigger in tollgate_quota::alerts::escalations(license, decision, now_ms) {
                let id = governance::escalation_id(
                    &trigger.license,
                    &trigger.rule,
                    trigger.window_epoch,
                );
                if config.escalation(&id).is_some() || !self.proposed.lock().insert(id) {
                    continue;
                }
                if self.escalations_tx.try_send(trigger).is_err() {
                    self.stats
                        .n_escalations_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Figures for the status API.
    pub fn status_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "queued": get(&s.n_queued),
            "dropped": get(&s.n_dropped),
            "delivered": get(&s.n_delivered),
            "failed": get(&s.n_failed),
            "attempts": get(&s.n_attempts),
            "escalations_proposed": get(&s.n_escalations_proposed),
            "escalations_dropped": get(&s.n_escalations_dropped),
        })
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block_key.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block_key.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// One rendered event: where it goes and the exact bytes every attempt sends.
struct Delivery {
    url: String,
    key: String,
    kind: &'static str,
    license: String,
    body: Vec<u8>,
}

fn rfc3339(ms: i64) -> serde_json::Value {
    crate::api::rfc3339_ms(ms).map_or(serde_json::Value::Null, serde_json::Value::String)
}

fn window_json(start_ms: i64, end_ms: Option<i64>) -> serde_json::Value {
    serde_json::json!({
        "start": rfc3339(start_ms),
        "end": end_ms.map_or(serde_json::Value::Null, rfc3339),
        "start_ms": start_ms,
        "end_ms": end_ms,
    })
}

/// Renders `event` for the license's webhook, or `None` when the license
/// (or its webhook) is gone.
fn render(state: &NodeState, config: &Config, event: &AlertEvent, now_ms: i64) -> Option<Delivery> {
    let (license_id, kind, key, mut body) = match event {
        AlertEvent::Threshold(a) => (
            a.key.license.clone(),
            "threshold_crossed",
            a.event_key(),
            serde_json::json!({
                "quota": a.key.quota,
                "scope": a.key.scope,
                "metric": a.metric,
                "threshold": a.threshold,
                "threshold_units": a.threshold_units,
                "used": a.used,
                "limit": a.limit,
                "window": window_json(a.window_start_ms, a.window_end_ms),
            }),
        ),
        AlertEvent::DenyRate { license, spike } => (
            license.clone(),
            "deny_rate_spike",
            event_key(&[
                "deny_rate_spike",
                license,
                &spike.window_start_ms.to_string(),
            ]),
            serde_json::json!({
                "threshold": spike.threshold,
                "decisions": spike.n_decisions,
                "denied": spike.n_denied,
                "window": window_json(spike.window_start_ms, Some(spike.window_end_ms)),
            }),
        ),
        AlertEvent::GossipLag {
            license,
            peer,
            lag_ms,
            bound_ms,
            since_ms,
        } => (
            license.clone(),
            "gossip_lag",
            event_key(&[
                "gossip_lag",
                license,
                &state.node_id.to_string(),
                &peer.to_string(),
                &since_ms.to_string(),
            ]),
            serde_json::json!({
                "peer": peer,
                "lag_ms": lag_ms,
                "bound_ms": bound_ms,
                "since": rfc3339(*since_ms),
            }),
        ),
        AlertEvent::EscalationOpened { id } => {
            let e = config.escalation(id)?;
            (
                e.license.clone(),
                "escalation_opened",
                event_key(&["escalation_opened", id]),
                serde_json::json!({
                    "escalation": {
                        "id": e.id,
                        "rule": e.rule,
                        "status": e.status,
                        "opened_at": rfc3339(e.opened_at_ms),
                        "deadline": rfc3339(e.deadline_ms),
                        "window_epoch": e.window_epoch,
                    },
                }),
            )
        }
    };
    let license = config.license(&license_id)?;
    let governance = license.governance.as_ref()?;
    let url = governance.webhook.clone()?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("event".into(), kind.into());
        obj.insert("id".into(), key.clone().into());
        obj.insert("license".into(), license_id.clone().into());
        obj.insert("customer".into(), license.customer.clone().into());
        obj.insert("owner".into(), governance.owner.clone().into());
        obj.insert("node".into(), state.node_id.into());
        obj.insert("region".into(), state.region.clone().into());
        obj.insert("time".into(), rfc3339(now_ms));
        obj.insert("time_ms".into(), now_ms.into());
    }
    let body = serde_json::to_vec(&body).ok()?;
    Some(Delivery {
        url,
        key,
        kind,
        license: license_id,
        body,
    })
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Worth another try, not before `retry_after` if the receiver said so.
    Retry {
        retry_after: Option<Duration>,
    },
    /// The receiver refused it for good (a 4xx other than 408, 425, 429).
    Refused(u16),
}

async fn attempt(
    client: &reqwest::Client,
    d: &Delivery,
    signature: Option<&str>,
    n_attempt: u32,
) -> Attempt {
    let mut req = client
        .post(&d.url)
        .header("content-type", "application/json")
        .header("idempotency-key", &d.key)
        .header("x-tollgate-event", d.kind)
        .header("x-tollgate-attempt", n_attempt.to_string())
        .body(d.body.clone());
    if let Some(sig) = signature {
        req = req.header("x-tollgate-signature", sig);
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => Attempt::Delivered,
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            if (400..500).contains(&status) && ![408, 425, 429].contains(&status) {
                Attempt::Refused(status)
            } else {
                Attempt::Retry { retry_after }
            }
        }
        Err(_) => Attempt::Retry { retry_after: None },
    }
}

/// The delay before retry number `n_retry` (1-based): the initial delay
/// doubled `n_retry - 1` times, capped, then drawn uniformly from its
/// upper half with `random`.
pub fn backoff_ms(settings: &AlertSettings, n_retry: u32, random: u64) -> u64 {
    let base = settings
        .retry_initial_ms
        .max(1)
        .saturating_mul(1u64 << n_retry.saturating_sub(1).min(32))
        .min(settings.retry_max_ms.max(1));
    let half = base / 2;
    half + random % (base - half + 1)
}

async fn deliver(
    state: Arc<NodeState>,
    client: reqwest::Client,
    settings: AlertSettings,
    secret: Option<Arc<[u8]>>,
    d: Delivery,
) {
    let signature = secret.map(|s| format!("sha256={}", hex::encode(hmac_sha256(&s, &d.body))));
    let stats = &state.alerts.stats;
    let max_attempts = settings.max_attempts.max(1);
    for n_attempt in 1..=max_attempts {
        stats.n_attempts.fetch_add(1, Ordering::Relaxed);
        match attempt(&client, &d, signature.as_deref(), n_attempt).await {
            Attempt::Delivered => {
                stats.n_delivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(license = %d.license, event = d.kind, n_attempt, "alert delivered");
                return;
            }
            Attempt::Refused(status) => {
                stats.n_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(license = %d.license, event = d.kind, status, "alert refused by the receiver; not retried");
                return;
            }
            Attempt::Retry { retry_after } if n_attempt < max_attempts => {
                let mut delay = Duration::from_millis(backoff_ms(
                    &settings,
                    n_attempt,
                    tollgate_consensus::runtime::random_u64(),
                ));
                if let Some(asked) = retry_after {
                    delay = delay.max(asked.min(Duration::from_millis(settings.retry_max_ms)));
                }
                tokio::time::sleep(delay).await;
            }
            Attempt::Retry { .. } => {}
        }
    }
    stats.n_failed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(license = %d.license, event = d.kind, max_attempts, "alert not delivered; gave up");
}

/// Proposes one escalation through Raft, and alerts the owner if this
/// proposal opened it.
async fn propose_escalation(state: Arc<NodeState>, trigger: EscalationTrigger) {
    let state = &*state;
    let id = governance::escalation_id(&trigger.license, &trigger.rule, trigger.window_epoch);
    if state.config().license(&trigger.license).is_none() {
        return;
    }
    let op = ConfigOp::OpenEscalation {
        license_id: trigger.license.clone(),
        rule: trigger.rule.clone(),
        window_epoch: trigger.window_epoch,
    };
    let caller = Caller {
        actor: format!("node-{}", state.node_id),
        // The same on every node: the state machine answers a repeat with
        // the first outcome.
        request_id: format!("escalation/{id}"),
    };
    state
        .alerts
        .stats
        .n_escalations_proposed
        .fetch_add(1, Ordering::Relaxed);
    match admin::write(
        state,
        &caller,
        Some(format!("{} exceeded", trigger.rule)),
        op,
    )
    .await
    {
        Ok(version) => {
            let opened_here = state
                .config()
                .escalation(&id)
                .is_some_and(|e| e.version == version);
            if opened_here {
                tracing::info!(license = %trigger.license, rule = %trigger.rule, escalation = %id, "escalation opened");
                state.alerts.enqueue(AlertEvent::EscalationOpened { id });
            }
        }
        Err(e) => {
            // Forget it, so the next violation proposes it again.
            state.alerts.proposed.lock().remove(&id);
            tracing::warn!(license = %trigger.license, rule = %trigger.rule, error = %e, "could not open an escalation");
        }
    }
}

/// Per (license, peer): since when gossip lag has been over the license's
/// bound.
type LagEpisodes = BTreeMap<(String, u64), i64>;

/// Compares this node's gossip lag to each peer with the bound of every
/// license that watches it; alerts once per episode over the bound.
fn check_gossip_lag(state: &NodeState, episodes: &mut LagEpisodes) {
    let config = state.config();
    let watching: Vec<(&str, u64)> = config
        .licenses
        .values()
        .filter(|l| l.webhook().is_some())
        .filter_map(|l| {
            let bound = l.governance.as_ref()?.anomalies.as_ref()?.gossip_lag?;
            Some((l.id.as_str(), bound.ms))
        })
        .collect();
    if watching.is_empty() {
        episodes.clear();
        return;
    }
    let Some(gossip) = state.gossip.get() else {
        return;
    };
    let now = state.now_ms();
    let lags = gossip.peer_lags(now);
    let mut live = LagEpisodes::new();
    for (license, bound_ms) in watching {
        for &(peer, lag_ms) in &lags {
            if u64::try_from(lag_ms).unwrap_or(0) <= bound_ms {
                continue;
            }
            let key = (license.to_string(), peer);
            let since_ms = match episodes.get(&key) {
                Some(&since) => since,
                None => {
                    state.alerts.enqueue(AlertEvent::GossipLag {
                        license: license.to_string(),
                        peer,
                        lag_ms,
                        bound_ms,
                        since_ms: now,
                    });
                    now
                }
            };
            live.insert(key, since_ms);
        }
    }
    *episodes = live;
}

/// Most expiries recorded per tick; the rest wait for the next one.
pub const MAX_EXPIRIES_PER_TICK: usize = 16;

/// On the leader, records the end of every approved exception whose
/// `until` has passed by this node's clock, so the license history shows
/// it. Enforcement does not wait for this: decisions compare `until` with
/// their own time.
async fn record_expiries(state: &NodeState) {
    if !state.consensus.metrics().is_leader {
        return;
    }
    let config = state.config();
    let now = state.now_ms();
    let due: Vec<String> = config
        .exceptions()
        .filter(|e| {
            e.status == tollgate_quota::governance::ExceptionStatus::Approved
                && e.until_ms.is_some_and(|u| u <= now)
        })
        .take(MAX_EXPIRIES_PER_TICK)
        .map(|e| e.id.clone())
        .collect();
    for id in due {
        let caller = Caller {
            actor: format!("node-{}", state.node_id),
            request_id: format!("expire/{id}"),
        };
        let op = ConfigOp::ExpireException { id: id.clone() };
        if let Err(e) = admin::write(state, &caller, Some("ended".to_string()), op).await {
            tracing::debug!(exception = %id, error = %e, "could not record an exception's end yet");
        }
    }
}

/// Reads the signing secret, if configured.
pub fn read_secret(settings: &AlertSettings) -> anyhow::Result<Option<Arc<[u8]>>> {
    let Some(path) = &settings.signing_secret_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading alert signing secret {}: {e}", path.display()))?;
    let secret = text.trim();
    anyhow::ensure!(
        !secret.is_empty(),
        "alert signing secret {} is empty",
        path.display()
    );
    Ok(Some(Arc::from(secret.as_bytes())))
}

/// Delivers alerts, proposes escalations, watches gossip lag and records
/// the end of exceptions until `shutdown` flips.
pub async fn run(
    state: Arc<NodeState>,
    settings: AlertSettings,
    secret: Option<Arc<[u8]>>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (Some(mut events), Some(mut escalations)) = (
        state.alerts.events_rx.lock().take(),
        state.alerts.escalations_rx.lock().take(),
    ) else {
        anyhow::bail!("the alert task runs once per node");
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.timeout_ms.max(1)))
        .connect_timeout(Duration::from_millis(settings.timeout_ms.max(1)))
        // A redirect would resend the body somewhere the license does not name.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let mut deliveries = JoinSet::new();
    let mut proposals = JoinSet::new();
    let mut lag_tick = tokio::time::interval(Duration::from_millis(
        settings.lag_check_interval_ms.max(10),
    ));
    lag_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lag_episodes = LagEpisodes::new();
    loop {
        tokio::select! {
            Some(event) = events.recv(), if deliveries.len() < MAX_CONCURRENT_DELIVERIES => {
                let config = state.config();
                let now = state.now_ms();
                match render(&state, &config, &event, now) {
                    Some(d) => {
                        deliveries.spawn(deliver(
                            Arc::clone(&state),
                            client.clone(),
                            settings.clone(),
                            secret.clone(),
                            d,
                        ));
                    }
                    None => tracing::debug!(license = ?event.license(), "alert dropped: the license has no webhook now"),
                }
            }
            Some(trigger) = escalations.recv(), if proposals.len() < MAX_CONCURRENT_PROPOSALS => {
                proposals.spawn(propose_escalation(Arc::clone(&state), trigger));
            }
            Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            Some(_) = proposals.join_next(), if !proposals.is_empty() => {}
            _ = lag_tick.tick() => {
                check_gossip_lag(&state, &mut lag_episodes);
                record_expiries(&state).await;
            }
            _ = shutdown.changed() => break,
        }
    }
    deliveries.abort_all();
    proposals.abort_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let s = AlertSettings {
            retry_initial_ms: 100,
            retry_max_ms: 1_000,
            ..AlertSettings::default()
        };
        for (n_retry, base) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1_000),
            (40, 1_000),
        ] {
            for random in [0, 1, 77, u64::MAX] {
                let d = backoff_ms(&s, n_retry, random);
                assert!(d >= base / 2 && d <= base, "retry {n_retry}: {d} vs {base}");
            }
        }
    }

    #[test]
    fn recent_keys_are_bounded() {
        let mut r = Recent::default();
        assert!(r.insert("a".into()));
        assert!(!r.insert("a".into()));
        r.remove("a");
        assert!(r.insert("a".into()));
        for i in 0..MAX_REMEMBERED_EVENTS {
            r.insert(i.to_string());
        }
        assert_eq!(r.order.len(), MAX_REMEMBERED_EVENTS);
        assert!(r.insert("a".into()), "the oldest was forgotten");
    }
}
