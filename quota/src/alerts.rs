//! What an alert is, and when one is due: threshold crossings, deny-rate
//! spikes and escalation triggers, as pure functions.
//!
//! [`crate::decision::decide`] reports, on an allowed decision, every alert
//! threshold of a quota that the usage after the request has reached and
//! that this node has not reported yet for that counter and limit
//! ([`ThresholdAlert`]); [`crate::usage::Usage::commit`] marks them reported.
//! Usage only grows within a window, so "reported" is one number per
//! counter (the highest threshold reported), and a node reports each
//! threshold of each window at most once. Other nodes may report the same
//! crossing (each node sees the merged count reach it); [`event_key`] gives
//! them all the same idempotency key, so a receiver keeps one.
//!
//! This module must not read the clock, draw randomness or do I/O: node/
//! delivers the events.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::decision::{Decision, ReasonCode};
use crate::license::{DenyRateRule, License, OnExceed};
use crate::usage::CounterKey;

/// The units at which `fraction` of `limit` is reached: the smallest count
/// that is at least `fraction x limit`, and at least 1.
pub fn threshold_units(fraction: f64, limit: u64) -> u64 {
    ((fraction * limit as f64).ceil() as u64).max(1)
}

/// The thresholds of `thresholds` (fractions of `limit`) that `used` has
/// reached and that lie above `reported` (the highest threshold already
/// reported, in units), lowest first, as (fraction, units).
pub fn thresholds_due(
    thresholds: &[f64],
    limit: u64,
    used: u64,
    reported: u64,
) -> impl Iterator<Item = (f64, u64)> + '_ {
    thresholds.iter().filter_map(move |&t| {
        let units = threshold_units(t, limit);
        (used >= units && units > reported).then_some((t, units))
    })
}

/// One alert threshold of one quota reached by usage at this node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ThresholdAlert {
    /// The counter (license, quota, window epoch, scope).
    pub key: CounterKey,
    /// The threshold as a fraction of the limit, e.g. 0.8.
    pub threshold: f64,
    /// The threshold in units of the quota's metric.
    pub threshold_units: u64,
    /// Usage after the request that reached it.
    pub used: u64,
    /// The limit in force (with approved exceptions).
    pub limit: u64,
    /// The quota's metric.
    pub metric: String,
    /// Start of the window (unix ms).
    pub window_start_ms: i64,
    /// End of the window (unix ms); `None` for `total`.
    pub window_end_ms: Option<i64>,
}

impl ThresholdAlert {
    /// The idempotency key every node gives this crossing.
    pub fn event_key(&self) -> String {
        event_key(&[
            "threshold_crossed",
            &self.key.license,
            &self.key.quota,
            &self.key.scope,
            &self.key.epoch.to_string(),
            &self.threshold.to_string(),
            &self.limit.to_string(),
        ])
    }
}

/// A stable idempotency key for an event named by `parts`: 32 hex digits of
/// a SHA-256 over the parts (each length-prefixed, so no two lists of
/// parts collide by concatenation).
pub fn event_key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// A quota violation that opens an escalation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscalationTrigger {
    /// License id.
    pub license: String,
    /// The quota id.
    pub quota: String,
    /// The rule path, e.g. `quotas[daily]`.
    pub rule: String,
    /// The quota's window epoch at `now_ms`.
    pub window_epoch: u64,
}

/// The escalations a decision calls for: one per quota denied as
/// `quota_exceeded` whose `on_exceed` is `escalate`. Empty for anything
/// allowed, and for a decision of another license.
pub fn escalations(license: &License, decision: &Decision, now_ms: i64) -> Vec<EscalationTrigger> {
    if decision.reasons.is_empty() || decision.license_id.as_deref() != Some(license.id.as_str()) {
        return Vec::new();
    }
    decision
        .reasons
        .iter()
        .filter(|r| r.code == ReasonCode::QuotaExceeded)
        .filter_map(|r| {
            let id = r.rule.strip_prefix("quotas[")?.strip_suffix(']')?;
            let quota = license.quotas.iter().find(|q| q.id == id)?;
            (quota.on_exceed == OnExceed::Escalate).then(|| EscalationTrigger {
                license: license.id.clone(),
                quota: quota.id.clone(),
                rule: r.rule.clone(),
                window_epoch: quota.window.epoch(now_ms),
            })
        })
        .collect()
}

/// Decisions and denials of one license at one node in the current
/// deny-rate window. Feed every decision to [`DenyRate::observe`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyRate {
    /// The window epoch counted (`now_ms / window_ms`).
    pub epoch: i64,
    /// Decisions in it.
    pub n_decisions: u64,
    /// Denials in it.
    pub n_denied: u64,
    /// Whether this window's spike was reported.
    pub reported: bool,
}

/// A deny-rate spike: at least `min_decisions` decisions in one window, and
/// the denied share at or above the threshold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DenyRateSpike {
    /// Decisions in the window so far.
    pub n_decisions: u64,
    /// Denials among them.
    pub n_denied: u64,
    /// The threshold (fraction denied).
    pub threshold: f64,
    /// Start of the window (unix ms).
    pub window_start_ms: i64,
    /// End of the window (unix ms).
    pub window_end_ms: i64,
}

impl DenyRate {
    /// Counts one decision at `now_ms`; returns the spike the first time
    /// this window's denied share reaches the rule's threshold.
    pub fn observe(
        &mut self,
        rule: &DenyRateRule,
        now_ms: i64,
        denied: bool,
    ) -> Option<DenyRateSpike> {
        let window_ms = i64::try_from(rule.window_ms().max(1)).unwrap_or(i64::MAX);
        let epoch = now_ms.div_euclid(window_ms);
        if epoch != self.epoch {
            *self = DenyRate {
                epoch,
                ..DenyRate::default()
            };
        }
        self.n_decisions += 1;
        self.n_denied += u64::from(denied);
        if self.reported || self.n_decisions < u64::from(rule.min_decisions()) {
            return None;
        }
        // n_denied / n_decisions >= threshold, without dividing.
        if (self.n_denied as f64) < rule.threshold * self.n_decisions as f64 {
            return None;
        }
        self.reported = true;
        let start = epoch.saturating_mul(window_ms);
        Some(DenyRateSpike {
            n_decisions: self.n_decisions,
            n_denied: self.n_denied,
            threshold: rule.threshold,
            window_start_ms: start,
            window_end_ms: start.saturating_add(window_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::HumaneDuration;

    #[test]
    fn threshold_units_round_up_and_are_never_zero() {
        assert_eq!(threshold_units(0.8, 5), 4);
        assert_eq!(threshold_units(0.8, 10), 8);
        assert_eq!(threshold_units(0.81, 10), 9);
        assert_eq!(threshold_units(1.0, 10), 10);
        assert_eq!(threshold_units(0.001, 10), 1);
        assert_eq!(threshold_units(2.0, 10), 20);
    }

    #[test]
    fn only_reached_and_unreported_thresholds_are_due() {
        let due = |used, reported| -> Vec<u64> {
            thresholds_due(&[0.5, 0.8, 1.0], 10, used, reported)
                .map(|(_, u)| u)
                .collect()
        };
        assert_eq!(due(4, 0), Vec::<u64>::new());
        assert_eq!(due(5, 0), vec![5]);
        assert_eq!(due(9, 5), vec![8]);
        assert_eq!(due(10, 0), vec![5, 8, 10]);
        assert_eq!(due(10, 10), Vec::<u64>::new());
    }

    #[test]
    fn event_keys_are_stable_and_unambiguous() {
        assert_eq!(event_key(&["a", "b"]), event_key(&["a", "b"]));
        assert_ne!(event_key(&["ab", ""]), event_key(&["a", "b"]));
        assert_eq!(event_key(&["a"]).len(), 32);
    }

    #[test]
    fn a_deny_rate_spike_is_reported_once_per_window() {
        let rule = DenyRateRule {
            threshold: 0.5,
            window: Some(HumaneDuration { ms: 1_000 }),
            min_decisions: Some(4),
        };
        let mut rate = DenyRate::default();
        // Three denials of three: too few decisions to count.
        for t in 0..3 {
            assert!(rate.observe(&rule, 10_000 + t, true).is_none());
        }
        let spike = rate.observe(&rule, 10_003, false).expect("3 of 4 denied");
        assert_eq!((spike.n_decisions, spike.n_denied), (4, 3));
        assert_eq!(
            (spike.window_start_ms, spike.window_end_ms),
            (10_000, 11_000)
        );
        assert!(
            rate.observe(&rule, 10_004, true).is_none(),
            "once per window"
        );
        // A new window starts from zero.
        for t in 0..3 {
            assert!(rate.observe(&rule, 11_000 + t, false).is_none());
        }
        assert!(rate.observe(&rule, 11_003, true).is_none(), "1 of 4");
        assert!(rate.observe(&rule, 11_004, true).is_none(), "2 of 5");
        assert!(rate.observe(&rule, 11_005, true).is_some(), "3 of 6");
    }

    proptest::proptest! {
        /// However usage grows (one step at a time, or in jumps), feeding
        /// each new total to `thresholds_due` and remembering the highest
        /// threshold reported reports every threshold the final total
        /// reached exactly once, in ascending order, and no other.
        #[test]
        fn every_reached_threshold_is_due_exactly_once(
            limit in 1u64..10_000,
            mut thresholds in proptest::collection::vec(0.01f64..2.0, 0..6),
            steps in proptest::collection::vec(0u64..3_000, 1..40),
        ) {
            thresholds.sort_by(f64::total_cmp);
            let mut used = 0u64;
            let mut reported = 0u64;
            let mut seen = Vec::new();
            for step in steps {
                used += step;
                let due: Vec<(f64, u64)> = thresholds_due(&thresholds, limit, used, reported).collect();
                for (t, units) in due {
                    proptest::prop_assert!(used >= units);
                    proptest::prop_assert!(units > reported);
                    seen.push((t, units));
                }
                reported = seen.iter().map(|(_, u)| *u).max().unwrap_or(0);
            }
            let expected: Vec<u64> = {
                let mut units: Vec<u64> = thresholds
                    .iter()
                    .map(|t| threshold_units(*t, limit))
                    .filter(|u| used >= *u)
                    .collect();
                units.dedup();
                units
            };
            let mut got: Vec<u64> = seen.iter().map(|(_, u)| *u).collect();
            got.dedup();
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
