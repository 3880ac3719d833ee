//! Usage state: CRDT counters, window epochs, seen devices, seat leases and
//! token buckets.
//!
//! This module owns the node-local mutable state that decisions read and
//! commits write. Counters ([`Counter`]) are keyed by
//! (license, quota, window epoch, scope): soft quotas are G-Counters with one
//! slot per node, strict quotas and seats are escrow counters; all merge by
//! per-entry max, so replicas converge whatever the delivery order. Seen
//! devices are a grow-only set per license (merge = union). Token buckets are
//! node-local and never replicated: rate limits are enforced per node.
//!
//! Persistence is a dirty-drain: after commits, call [`Usage::take_dirty`]
//! (counters) and [`Usage::take_dirty_devices`] (device sets), write what they
//! return, and on failure hand them back with [`Usage::restore_dirty`] /
//! [`Usage::restore_devices_dirty`]. At start, feed stored records to
//! [`Usage::restore`] / [`Usage::restore_devices`]. This module must not do
//! that I/O itself nor read the clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use crate::counter::Counter;

use chrono::{DateTime, Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::decision::{self, Decision, Outcome};
pub use crate::license::Window;
use crate::request::CheckRequest;

// Hasher of the usage maps. Their keys hold request-supplied text (the
// subject), so the hash must be randomly seeded; foldhash is, and costs a
// fraction of std's SipHash on these short keys, which `decide` hashes
// several times per call.
use crate::hashing::FastState;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Identifies one counter: (license, quota, window epoch, scope value).
#[derive(Clone, Debug, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CounterKey {
    /// License id.
    pub license: String,
    /// Quota id.
    pub quota: String,
    /// Window epoch (see [`Window::epoch`]).
    pub epoch: u64,
    /// Scope value: "" for license scope, the subject, or the environment.
    pub scope: String,
}

// Equality is field-wise, exactly what `derive` would give, but written out
// because it is the inner loop of every counter lookup: the cheap epoch goes
// first, and empty strings (the scope of every license-scoped quota) never
// reach `memcmp`. An empty `String`'s pointer is dangling, and glibc's
// AVX-512 memcmp does a masked load from it that takes a slow fault-
// suppression assist; measured, that was a fifth of `decide`'s time.
impl PartialEq for CounterKey {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch
            && text_eq(&self.license, &other.license)
            && text_eq(&self.quota, &other.quota)
            && text_eq(&self.scope, &other.scope)
    }
}

// Written out alongside `PartialEq` (clippy requires them to agree); the same
// fields in the same order as `derive(Hash)`.
impl std::hash::Hash for CounterKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.license.hash(state);
        self.quota.hash(state);
        self.epoch.hash(state);
        self.scope.hash(state);
    }
}

/// String equality that skips `memcmp` for empty strings (see above).
#[inline]
fn text_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a.as_bytes() == b.as_bytes())
}

/// Why stored key bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CounterKeyError {
    /// Missing separator or epoch bytes.
    #[error("counter key is truncated")]
    Truncated,
    /// A part is not UTF-8.
    #[error("counter key is not UTF-8")]
    NotUtf8,
}

impl CounterKey {
    /// Stable byte form: `license 0x00 quota 0x00 epoch(8 bytes BE) scope`.
    /// Ids never contain 0x00 (validated charset), and the scope comes last so
    /// it may hold any bytes. Keys of one license share [`Self::license_prefix`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.license.len() + self.quota.len() + self.scope.len() + 10);
        out.extend_from_slice(self.license.as_bytes());
        out.push(0);
        out.extend_from_slice(self.quota.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(self.scope.as_bytes());
        out
    }

    /// The prefix every key of `license` starts with, for prefix scans.
    pub fn license_prefix(license: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(license.len() + 1);
        out.extend_from_slice(license.as_bytes());
        out.push(0);
        out
    }

    /// Parses [`Self::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CounterKeyError> {
        let license_end = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(CounterKeyError::Truncated)?;
        let rest = &bytes[license_end + 1..];
        let quota_end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(CounterKeyError::Truncated)?;
        let after = &rest[quota_end + 1..];
        let (epoch_bytes, scope) = after
            .split_at_checked(8)
            .ok_or(CounterKeyError::Truncated)?;
        let mut epoch = [0u8; 8];
        epoch.copy_from_slice(epoch_bytes);
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| CounterKeyError::NotUtf8);
        Ok(Self {
            license: text(&bytes[..license_end])?,
            quota: text(&rest[..quota_end])?,
            epoch: u64::from_be_bytes(epoch),
            scope: text(scope)?,
        })
    }
}

fn month_start_ms(year: i32, month0: u32) -> Option<i64> {
    let date = NaiveDate::from_ymd_opt(year, month0 + 1, 1)?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

impl Window {
    /// The window epoch containing `now_ms` (calendar aligned, UTC). Instants
    /// before 1970 fall into epoch 0. `total` is always epoch 0.
    pub fn epoch(self, now_ms: i64) -> u64 {
        let raw = match self {
            Window::Minute => now_ms.div_euclid(MINUTE_MS),
            Window::Hour => now_ms.div_euclid(HOUR_MS),
            Window::Day => now_ms.div_euclid(DAY_MS),
            Window::Month => match DateTime::from_timestamp_millis(now_ms) {
                Some(t) => i64::from(t.year() - 1970) * 12 + i64::from(t.month0()),
                None => 0,
            },
            Window::Total => 0,
        };
        u64::try_from(raw).unwrap_or(0)
    }

    /// `[start_ms, end_ms)` of `epoch`; `end_ms` is `None` for `total` (or if
    /// out of range).
    pub fn bounds(self, epoch: u64) -> (i64, Option<i64>) {
        let e = i64::try_from(epoch).unwrap_or(i64::MAX);
        let fixed = |len: i64| {
            let start = e.saturating_mul(len);
            (start, start.checked_add(len))
        };
        match self {
            Window::Minute => fixed(MINUTE_MS),
            Window::Hour => fixed(HOUR_MS),
            Window::Day => fixed(DAY_MS),
            Window::Month => {
                let year = |m: i64| i32::try_from(1970 + m / 12).ok();
                let start = year(e).and_then(|y| month_start_ms(y, (e % 12) as u32));
                let next = e.checked_add(1);
                let end =
                    next.and_then(|n| year(n).and_then(|y| month_start_ms(y, (n % 12) as u32)));
                match start {
                    Some(s) => (s, end),
                    None => (i64::MAX, None),
                }
            }
            Window::Total => (0, None),
        }
    }
}

/// A token bucket's state at `last_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BucketState {
    /// Tokens available at `last_ms`.
    pub tokens: f64,
    /// When the bucket was last updated, unix ms.
    pub last_ms: i64,
}

/// The quota id under which a license's seats are counted. Quota ids are
/// `[a-z0-9._-]`, so this can never clash with one.
pub const SEATS_QUOTA: &str = "@seats";

/// One seat lease held at this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// License id.
    pub license: String,
    /// Caller-chosen instance label.
    pub instance: String,
    /// When the lease lapses unless renewed (unix ms).
    pub expires_ms: i64,
    /// Whether it holds a unit of the seat counter (false when granted
    /// while the license had no `max_instances`): only those give one back.
    #[serde(default)]
    pub counted: bool,
}

/// A license's seat counter key.
pub fn seats_key(license: &str) -> CounterKey {
    CounterKey {
        license: license.to_string(),
        quota: SEATS_QUOTA.to_string(),
        epoch: 0,
        scope: String::new(),
    }
}

/// Demand estimate of one node on one escrow counter (node-local).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct DemandRate {
    /// When the last sample was taken.
    pub last_ms: i64,
    /// [`Counter::demand`] per node at the last sample.
    pub last: BTreeMap<u64, u64>,
    /// Smoothed units per second, per node.
    pub rate: BTreeMap<u64, f64>,
    /// When each node's demand was last seen growing here.
    pub grew_ms: BTreeMap<u64, i64>,
}

/// The node-local usage state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    node_id: u64,
    counters: HashMap<CounterKey, Counter, FastState>,
    dirty: BTreeSet<CounterKey>,
    // The nodes a new escrow counter splits its limit among (the cluster
    // membership as this node last saw it).
    members: Vec<u64>,
    // How long a caller refused for lack of rights should wait.
    rights_retry_ms: u64,
    pub(crate) leases: BTreeMap<String, Lease>,
    pub(crate) dirty_leases: BTreeSet<String>,
    pub(crate) rates: HashMap<CounterKey, DemandRate, FastState>,
    // Counters of licenses not in the config, and since when (GC grace).
    unknown_since: HashMap<CounterKey, i64, FastState>,
    // This node's slot of each counter as last handed to a flush (and so to
    // gossip): what other nodes can know of its usage, at best.
    synced_own: HashMap<CounterKey, u64, FastState>,
    // When each other node's slot of a counter was last seen to grow.
    active: HashMap<CounterKey, BTreeMap<u64, i64>, FastState>,
    devices: HashMap<String, BTreeSet<String>, FastState>,
    dirty_devices: BTreeSet<String>,
    // license id -> (rate limit id, state); a short Vec per license keeps the
    // hot-path lookup allocation-free.
    buckets: HashMap<String, Vec<(String, BucketState)>, FastState>,
    // Per counter: (limit, highest alert threshold reported, in units) at
    // this node. Node-local and not persisted: after a restart a threshold
    // may be reported once more, with the same idempotency key.
    alerted: HashMap<CounterKey, (u64, u64), FastState>,
}

impl Usage {
    /// Empty state for node `node_id` (its slot in every counter).
    pub fn new(node_id: u64) -> Self {
        Self {
            node_id,
            members: vec![node_id],
            rights_retry_ms: DEFAULT_RIGHTS_RETRY_MS,
            ..Self::default()
        }
    }

    /// Sets the nodes that escrow counters created from now on split their
    /// limit among (the cluster's members). Existing counters keep theirs.
    /// A node that is not in the list (not yet a member) holds no share: it
    /// serves strict quotas only with rights other nodes give it.
    pub fn set_members(&mut self, members: &[u64]) {
        let mut members = members.to_vec();
        members.sort_unstable();
        members.dedup();
        self.members = members;
    }

    /// The members new escrow counters use.
    pub fn members(&self) -> &[u64] {
        &self.members
    }

    /// Sets the retry hint given with `quota_rights_unavailable`.
    pub fn set_rights_retry_ms(&mut self, ms: u64) {
        self.rights_retry_ms = ms.max(1);
    }

    /// The retry hint given with `quota_rights_unavailable`.
    pub fn rights_retry_ms(&self) -> u64 {
        self.rights_retry_ms
    }

    /// Rights this node may consume on the escrow counter `key` under `limit`
    /// (a counter not yet created would be split among [`Self::members`]).
    pub fn escrow_available(&self, key: &CounterKey, limit: u64) -> u64 {
        match self.counters.get(key) {
            Some(c) if c.is_escrow() => c.available(self.node_id, limit),
            // A counter that was soft until now (the quota became strict
            // mid-window, or a peer with older config sent it): its usage
            // so far counts against this node's share.
            Some(c) => {
                let mut c = c.clone();
                c.members = Counter::escrow(&self.members).members;
                c.available(self.node_id, limit)
            }
            None => Counter::escrow(&self.members).available(self.node_id, limit),
        }
    }

    /// Every counter, for status and gossip start-up.
    pub fn counters(&self) -> impl Iterator<Item = (&CounterKey, &Counter)> {
        self.counters.iter()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The counter for `key`, if any.
    pub fn counter(&self, key: &CounterKey) -> Option<&Counter> {
        self.counters.get(key)
    }

    /// The total of the counter for `key` (0 when absent).
    pub fn counter_value(&self, key: &CounterKey) -> u64 {
        self.counters.get(key).map_or(0, Counter::value)
    }

    /// Number of live counters.
    pub fn n_counters(&self) -> usize {
        self.counters.len()
    }

    /// Whether `device` has been seen on `license`.
    pub fn knows_device(&self, license: &str, device: &str) -> bool {
        self.devices
            .get(license)
            .is_some_and(|set| set.contains(device))
    }

    /// How many distinct devices `license` has used.
    pub fn n_devices(&self, license: &str) -> usize {
        self.devices.get(license).map_or(0, BTreeSet::len)
    }

    /// The highest alert threshold (in units) this node has reported for
    /// `key` under `limit`; 0 when none was, or when the limit has changed
    /// since (an exception raised it), which re-arms every threshold.
    pub fn alert_reported(&self, key: &CounterKey, limit: u64) -> u64 {
        match self.alerted.get(key) {
            Some(&(at_limit, units)) if at_limit == limit => units,
            _ => 0,
        }
    }

    /// The bucket for (`license`, `rate_limit`), if it has been used.
    pub fn bucket(&self, license: &str, rate_limit: &str) -> Option<BucketState> {
        self.buckets
            .get(license)?
            .iter()
            .find(|(id, _)| id == rate_limit)
            .map(|(_, s)| *s)
    }

    /// Applies the effects of an allowed, non-dry-run decision. Of a denied
    /// one, only the demand signal (`starved`) is recorded; a dry run
    /// changes nothing.
    pub fn commit(&mut self, decision: &Decision) {
        if decision.dry_run {
            return;
        }
        let effects = &decision.effects;
        for (key, by) in &effects.starved {
            let node = self.node_id;
            self.update_counter(key, true, |c| c.starve(node, *by));
        }
        if decision.outcome != Outcome::Allow {
            return;
        }
        for inc in &effects.increments {
            let node = self.node_id;
            self.update_counter(&inc.key, inc.escrow, |c| c.consume(node, inc.by));
        }
        for key in &effects.lineage {
            let node = self.node_id;
            self.update_counter(key, false, |c| c.consume(node, 1));
        }
        for alert in &decision.alerts {
            let mark = self
                .alerted
                .entry(alert.key.clone())
                .or_insert((alert.limit, 0));
            if mark.0 != alert.limit {
                *mark = (alert.limit, 0);
            }
            mark.1 = mark.1.max(alert.threshold_units);
        }
        if let Some((license, device)) = &effects.new_device
            && self
                .devices
                .entry(license.clone())
                .or_default()
                .insert(device.clone())
        {
            self.dirty_devices.insert(license.clone());
        }
        for (license, rate_limit, state) in &effects.buckets {
            let list = self.buckets.entry(license.clone()).or_default();
            match list.iter_mut().find(|(id, _)| id == rate_limit) {
                Some((_, s)) => *s = *state,
                None => list.push((rate_limit.clone(), *state)),
            }
        }
    }

    /// Changes the counter for `key` with `change`, creating it (an escrow
    /// one over [`Self::members`] when `escrow`) if absent, and marks it
    /// dirty. The key is cloned only for a new counter or a newly dirty
    /// one: this runs for every counted use.
    pub(crate) fn update_counter(
        &mut self,
        key: &CounterKey,
        escrow: bool,
        change: impl FnOnce(&mut Counter),
    ) {
        if !self.dirty.contains(key) {
            self.dirty.insert(key.clone());
        }
        let members = &self.members;
        let make_escrow = |c: &mut Counter| {
            if escrow && !c.is_escrow() {
                // New, or soft until now: split the limit among the members.
                c.members = Counter::escrow(members).members;
            }
        };
        match self.counters.get_mut(key) {
            Some(c) => {
                make_escrow(c);
                change(c);
            }
            None => {
                let mut c = Counter::default();
                make_escrow(&mut c);
                change(&mut c);
                self.counters.insert(key.clone(), c);
            }
        }
    }

    /// Decides and, if allowed, commits. The hot path.
    pub fn check(
        &mut self,
        config: &Config,
        req: &CheckRequest,
        now_ms: i64,
        decision_id: String,
    ) -> Decision {
        let decision = decision::decide(config, self, req, now_ms, decision_id);
        self.commit(&decision);
        decision
    }

    /// Post-inference metering: authenticity and status are checked, then the
    /// meters are always recorded, even past a limit (the use already
    /// happened); going over yields `over_quota` warnings, not a denial.
    pub fn report(
        &mut self,
        config: &Config,
        req: &CheckRequest,
        now_ms: i64,
        decision_id: String,
    ) -> Decision {
        let decision = decision::decide_report(config, self, req, now_ms, decision_id);
        self.commit(&decision);
        decision
    }

    /// Counters changed since the last call, with their full state, for
    /// batched persistence and gossip.
    pub fn take_dirty(&mut self) -> Vec<(CounterKey, Counter)> {
        let dirty = std::mem::take(&mut self.dirty);
        let me = self.node_id;
        let mut out = Vec::with_capacity(dirty.len());
        for key in dirty {
            if let Some(c) = self.counters.get(&key) {
                self.synced_own.insert(key.clone(), c.slot(me));
                out.push((key, c.clone()));
            }
        }
        out
    }

    /// The states of those of `keys` that are soft counters and whose own
    /// slot grew since it was last handed to a flush or to this call, to
    /// gossip now from memory (near a soft limit, where waiting for the
    /// flush costs overshoot). Escrow counters are never returned: their
    /// transfers must be on disk before anyone sees them.
    pub fn take_unsynced_soft(&mut self, keys: &[CounterKey]) -> Vec<(CounterKey, Counter)> {
        let me = self.node_id;
        let mut out = Vec::new();
        for key in keys {
            let Some(c) = self.counters.get(key) else {
                continue;
            };
            let synced = self.synced_own.get(key).copied().unwrap_or(0);
            if !c.is_escrow() && c.slot(me) > synced {
                self.synced_own.insert(key.clone(), c.slot(me));
                out.push((key.clone(), c.clone()));
            }
        }
        out
    }

    /// How many nodes, this one included, used `key` within the last
    /// [`ACTIVE_WINDOW_MS`] as far as this node has heard.
    pub fn active_nodes(&self, key: &CounterKey, now_ms: i64) -> u64 {
        let others = self.active.get(key).map_or(0, |m| {
            m.values()
                .filter(|t| now_ms.saturating_sub(**t) < ACTIVE_WINDOW_MS)
                .count()
        });
        1 + others as u64
    }

    /// This node's usage of `key` not yet handed to a flush (and gossip).
    pub fn own_unsynced(&self, key: &CounterKey) -> u64 {
        let own = self.counters.get(key).map_or(0, |c| c.slot(self.node_id));
        own.saturating_sub(self.synced_own.get(key).copied().unwrap_or(0))
    }

    /// Whether any counter is waiting for [`Self::take_dirty`].
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.dirty_devices.is_empty() || !self.dirty_leases.is_empty()
    }

    /// Merges a stored counter at start-up (not marked dirty).
    pub fn restore(&mut self, key: CounterKey, counter: Counter) {
        self.synced_own
            .insert(key.clone(), counter.slot(self.node_id));
        self.counters.entry(key).or_default().merge(&counter);
    }

    /// Merges a counter and marks it dirty again: hand back what
    /// [`Self::take_dirty`] returned when writing it failed.
    pub fn restore_dirty(&mut self, key: CounterKey, counter: Counter) {
        self.counters
            .entry(key.clone())
            .or_default()
            .merge(&counter);
        self.dirty.insert(key);
    }

    /// Merges a counter received from a peer; marked dirty if it changed, so
    /// peers' progress is persisted too. A counter of a window that is over
    /// (by this node's clock and config) is ignored, so a partition that
    /// spans a window boundary never folds old usage into the new window.
    /// Returns whether anything changed.
    pub fn merge_remote(
        &mut self,
        config: &Config,
        now_ms: i64,
        key: &CounterKey,
        counter: &Counter,
    ) -> bool {
        if !window_is_open(config, now_ms, key) {
            return false;
        }
        // Which other nodes are using this counter right now (their slot
        // grew): near a soft limit, the remainder is shared among them.
        let me = self.node_id;
        let known = self.counters.get(key);
        let grew: Vec<u64> = counter
            .slots
            .iter()
            .filter(|(n, v)| **n != me && known.is_none_or(|c| **v > c.slot(**n)))
            .map(|(n, _)| *n)
            .collect();
        if !grew.is_empty() {
            let active = self.active.entry(key.clone()).or_default();
            for n in grew {
                active.insert(n, now_ms);
            }
        }
        let changed = match self.counters.get_mut(key) {
            Some(c) => c.merge(counter),
            None => {
                self.counters.insert(key.clone(), counter.clone());
                true
            }
        };
        if changed {
            self.dirty.insert(key.clone());
        }
        changed
    }

    /// Device sets changed since the last call: (license id, all its devices).
    pub fn take_dirty_devices(&mut self) -> Vec<(String, Vec<String>)> {
        let dirty = std::mem::take(&mut self.dirty_devices);
        dirty
            .into_iter()
            .filter_map(|license| {
                let devices = self.devices.get(&license)?.iter().cloned().collect();
                Some((license, devices))
            })
            .collect()
    }

    /// Unions stored devices into `license`'s set at start-up (or from a peer).
    pub fn restore_devices(&mut self, license: String, devices: Vec<String>) {
        self.devices.entry(license).or_default().extend(devices);
    }

    /// Like [`Self::restore_devices`] but marks the set dirty again.
    pub fn restore_devices_dirty(&mut self, license: String, devices: Vec<String>) {
        self.dirty_devices.insert(license.clone());
        self.restore_devices(license, devices);
    }

    /// Drops counters whose window ended more than
    /// [`CLOSED_WINDOW_GRACE_MS`] ago, and counters of licenses or quotas no
    /// longer configured. `total` windows
    /// and seats of configured licenses are never dropped. Returns the
    /// removed keys (delete them from storage).
    pub fn gc(&mut self, config: &Config, now_ms: i64) -> Vec<CounterKey> {
        let mut removed = Vec::new();
        let unknown_since = &mut self.unknown_since;
        self.counters.retain(|key, _| {
            let keep = match window_of(config, key) {
                Some(Window::Total) => true,
                Some(_) => window_is_open(config, now_ms, key),
                // A license this node's config does not hold (yet): it may
                // be behind (just restarted, or a peer counts a license
                // applied there first), so the counter is kept until the
                // license has been unknown for a while.
                None => {
                    let since = *unknown_since.entry(key.clone()).or_insert(now_ms);
                    now_ms.saturating_sub(since) < UNKNOWN_LICENSE_GRACE_MS
                }
            };
            if !keep {
                removed.push(key.clone());
            }
            keep
        });
        for key in &removed {
            self.dirty.remove(key);
            self.rates.remove(key);
            self.synced_own.remove(key);
            self.active.remove(key);
            self.alerted.remove(key);
        }
        let counters = &self.counters;
        self.unknown_since
            .retain(|k, _| counters.contains_key(k) && window_of(config, k).is_none());
        self.buckets
            .retain(|license, _| config.license(license).is_some());
        removed.sort();
        removed
    }
}

/// Near the limit of a soft quota means within `limit / NEAR_LIMIT_DIVISOR`
/// (25%) of it: there a node takes at most half an even share of what
/// remains between two pushes of its usage, and pushes it to every peer
/// every few ms instead of on the gossip tick.
pub const NEAR_LIMIT_DIVISOR: u64 = 4;

/// A node counts as using a counter if its slot grew this recently (ms).
pub const ACTIVE_WINDOW_MS: i64 = 1_000;

/// How long a counter of a license the config does not hold is kept.
pub const UNKNOWN_LICENSE_GRACE_MS: i64 = 600_000;

/// Default retry hint for `quota_rights_unavailable`.
pub const DEFAULT_RIGHTS_RETRY_MS: u64 = 100;

/// How long a counter is kept after its window ended: its final count still
/// takes peers' usage that arrives late (a node whose clock runs behind
/// counts into the window after it ended here, a partition holds back what
/// was counted before the end), so every node reports the same total for it.
pub const CLOSED_WINDOW_GRACE_MS: i64 = 120_000;

/// Whether `key`'s counter is still kept by `config` and `now_ms`: its window
/// is open or ended less than [`CLOSED_WINDOW_GRACE_MS`] ago (true for a
/// license or quota the config does not know: it may be behind). Decisions
/// count only in the current window; this says which counters peers' states
/// still merge into.
pub fn window_is_open(config: &Config, now_ms: i64, key: &CounterKey) -> bool {
    window_of(config, key).is_none_or(|w| {
        w == Window::Total || key.epoch >= w.epoch(now_ms.saturating_sub(CLOSED_WINDOW_GRACE_MS))
    })
}

/// The window of the quota (or seats, or lineage edges) a counter belongs
/// to, if configured.
pub(crate) fn window_of(config: &Config, key: &CounterKey) -> Option<Window> {
    let license = config.license(&key.license)?;
    if key.quota == SEATS_QUOTA || key.quota == crate::lineage::LINEAGE_QUOTA {
        return Some(Window::Total);
    }
    license
        .quotas
        .iter()
        .find(|q| q.id == key.quota)
        .map(|q| q.window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn windows_are_calendar_aligned() {
        let now = ms("2026-02-14T13:45:10Z");
        let (start, end) = Window::Day.bounds(Window::Day.epoch(now));
        assert_eq!(
            (start, end),
            (ms("2026-02-14T00:00:00Z"), Some(ms("2026-02-15T00:00:00Z")))
        );
        let (start, end) = Window::Month.bounds(Window::Month.epoch(now));
        assert_eq!(
            (start, end),
            (ms("2026-02-01T00:00:00Z"), Some(ms("2026-03-01T00:00:00Z")))
        );
        let dec = ms("2025-12-31T23:59:59Z");
        assert_eq!(
            Window::Month.bounds(Window::Month.epoch(dec)).1,
            Some(ms("2026-01-01T00:00:00Z"))
        );
        let (start, end) = Window::Hour.bounds(Window::Hour.epoch(now));
        assert_eq!(
            (start, end),
            (ms("2026-02-14T13:00:00Z"), Some(ms("2026-02-14T14:00:00Z")))
        );
        assert_eq!(
            Window::Minute.bounds(Window::Minute.epoch(now)).0,
            ms("2026-02-14T13:45:00Z")
        );
        assert_eq!(Window::Total.epoch(now), 0);
        assert_eq!(Window::Total.bounds(0), (0, None));
        assert_eq!(Window::Day.epoch(-5), 0);
        // No panic on extremes.
        let _ = Window::Month.bounds(u64::MAX);
        let _ = Window::Day.bounds(u64::MAX);
        let _ = Window::Month.epoch(i64::MAX);
    }

    #[test]
    fn counter_key_bytes_round_trip() {
        let key = CounterKey {
            license: "demo".into(),
            quota: "daily".into(),
            epoch: 20_000,
            scope: "a\0b".into(),
        };
        let bytes = key.to_bytes();
        assert!(bytes.starts_with(&CounterKey::license_prefix("demo")));
        assert_eq!(CounterKey::from_bytes(&bytes), Ok(key));
        assert_eq!(
            CounterKey::from_bytes(b"x"),
            Err(CounterKeyError::Truncated)
        );
        assert_eq!(
            CounterKey::from_bytes(b"a\x00b\x00123"),
            Err(CounterKeyError::Truncated)
        );
    }

    #[test]
    fn counter_basics() {
        let mut a = Counter::default();
        a.consume(1, 5);
        let mut b = Counter::default();
        b.consume(2, 3);
        assert!(a.merge(&b));
        assert_eq!(a.value(), 8);
        assert!(!a.merge(&b));
        assert_eq!(a.slot(1), 5);
        assert_eq!(a.slot(9), 0);
    }
}
