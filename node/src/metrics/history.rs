//! Recent history for the dashboard: a bounded ring of samples per quota
//! and of decision totals, filled by the sampler every
//! `metrics.sample_interval_ms`.
//!
//! Everything here is bounded by name: samples per series
//! (`metrics.history_samples`), and series ([`MAX_TRACKED_QUOTAS`]).

use std::collections::{BTreeMap, VecDeque};

use tollgate_quota::utilization::QuotaUtilization;

/// Most (license, quota) series kept; quotas beyond it are left out of the
/// history (and counted in [`History::n_untracked`]).
pub const MAX_TRACKED_QUOTAS: usize = 512;

/// One utilisation sample of one quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UtilizationPoint {
    /// When (unix ms, node clock).
    pub at_ms: i64,
    /// Units used in the window then.
    pub used: u64,
    /// The limit then.
    pub limit: u64,
}

impl UtilizationPoint {
    /// `used / limit`, 0 for a zero limit.
    pub fn ratio(&self) -> f64 {
        if self.limit == 0 {
            0.0
        } else {
            self.used as f64 / self.limit as f64
        }
    }
}

/// The history of one quota.
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaSeries {
    /// Metered quantity.
    pub metric: String,
    /// Oldest first.
    pub points: VecDeque<UtilizationPoint>,
}

/// Check decision totals at one sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionPoint {
    /// When (unix ms, node clock).
    pub at_ms: i64,
    /// Allowed since start.
    pub allow: u64,
    /// Denied since start.
    pub deny: u64,
    /// Throttled since start.
    pub throttle: u64,
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct History {
    max_samples: usize,
    /// Per (license, quota), in order.
    pub quotas: BTreeMap<(String, String), QuotaSeries>,
    /// Decision totals, oldest first.
    pub decisions: VecDeque<DecisionPoint>,
    /// The latest utilisation of every quota (tracked or not).
    pub latest: Vec<QuotaUtilization>,
    /// When `latest` was taken (unix ms; 0 before the first sample).
    pub latest_at_ms: i64,
    /// Quotas left out of `quotas` for lack of room.
    pub n_untracked: usize,
}

impl History {
    /// An empty history keeping `max_samples` (at least 2) per series.
    pub fn new(max_samples: usize) -> Self {
        Self {
            max_samples: max_samples.max(2),
            ..Self::default()
        }
    }

    /// Adds one sample. Series of quotas no longer configured are dropped.
    pub fn push(&mut self, at_ms: i64, utilization: Vec<QuotaUtilization>, totals: DecisionPoint) {
        let max = self.max_samples;
        self.quotas
            .retain(|(l, q), _| utilization.iter().any(|u| u.license == *l && u.quota == *q));
        self.n_untracked = 0;
        for u in &utilization {
            let point = UtilizationPoint {
                at_ms,
                used: u.used,
                limit: u.limit,
            };
            let key = (u.license.clone(), u.quota.clone());
            if let Some(series) = self.quotas.get_mut(&key) {
                push_bounded(&mut series.points, point, max);
            } else if self.quotas.len() < MAX_TRACKED_QUOTAS {
                self.quotas.insert(
                    key,
                    QuotaSeries {
                        metric: u.metric.clone(),
                        points: VecDeque::from([point]),
                    },
                );
            } else {
                self.n_untracked += 1;
            }
        }
        push_bounded(&mut self.decisions, DecisionPoint { at_ms, ..totals }, max);
        self.latest = utilization;
        self.latest_at_ms = at_ms;
    }
}

fn push_bounded<T>(ring: &mut VecDeque<T>, value: T, max: usize) {
    while ring.len() >= max {
        ring.pop_front();
    }
    ring.push_back(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(license: &str, quota: &str, used: u64) -> QuotaUtilization {
        QuotaUtilization {
            license: license.into(),
            quota: quota.into(),
            metric: "inferences".into(),
            used,
            limit: 10,
        }
    }

    #[test]
    fn rings_are_bounded_and_removed_quotas_dropped() {
        let mut h = History::new(3);
        for i in 0..5 {
            h.push(
                i,
                vec![u("a", "q", i as u64), u("b", "q", 1)],
                DecisionPoint::default(),
            );
        }
        let a = &h.quotas[&("a".to_string(), "q".to_string())];
        let used: Vec<u64> = a.points.iter().map(|p| p.used).collect();
        assert_eq!(used, vec![2, 3, 4]);
        assert_eq!(h.decisions.len(), 3);
        assert_eq!(h.decisions.back().map(|d| d.at_ms), Some(4));

        h.push(5, vec![u("b", "q", 2)], DecisionPoint::default());
        assert_eq!(h.quotas.len(), 1);
        assert_eq!(h.latest, vec![u("b", "q", 2)]);
        assert_eq!(h.latest_at_ms, 5);
    }
}
