//! Quota utilisation: how much of each configured quota (and of each
//! license's seats) the current window has used, as this node sees it.
//!
//! This is what metrics and dashboards plot. It reads the config and the
//! usage state and returns plain figures; like the rest of this crate it
//! takes `now_ms` as an argument and changes nothing.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::usage::{SEATS_QUOTA, Usage};

/// Where one quota of one license stands in its current window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaUtilization {
    /// License id.
    pub license: String,
    /// Quota id, or `@seats` for the license's `max_instances`.
    pub quota: String,
    /// The metered quantity (`seats` for seats).
    pub metric: String,
    /// Units used in the current window. For a quota counted per subject
    /// or environment, the most any one scope has used.
    pub used: u64,
    /// The limit per window and scope.
    pub limit: u64,
}

impl QuotaUtilization {
    /// `used / limit` (0 for a zero limit); above 1 when a soft quota went
    /// over.
    pub fn ratio(&self) -> f64 {
        if self.limit == 0 {
            0.0
        } else {
            self.used as f64 / self.limit as f64
        }
    }
}

impl Usage {
    /// Every quota of every configured license, and the seats of those with
    /// `max_instances`, in license then quota order, with what this node
    /// counts as used in the window that holds `now_ms`.
    ///
    /// Cost: one pass over the counters plus one entry per configured quota.
    pub fn utilization(&self, config: &Config, now_ms: i64) -> Vec<QuotaUtilization> {
        // The largest value per (license, quota) among the counters of the
        // current window, whatever their scope.
        let mut used: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (key, counter) in self.counters() {
            let Some(license) = config.license(&key.license) else {
                continue;
            };
            let current = if key.quota == SEATS_QUOTA {
                true
            } else {
                license
                    .quotas
                    .iter()
                    .find(|q| q.id == key.quota)
                    .is_some_and(|q| key.epoch == q.window.epoch(now_ms))
            };
            if current {
                let entry = used.entry((&key.license, &key.quota)).or_insert(0);
                *entry = (*entry).max(counter.value());
            }
        }
        let mut out = Vec::new();
        for (id, license) in &config.licenses {
            for q in &license.quotas {
                out.push(QuotaUtilization {
                    license: id.clone(),
                    quota: q.id.clone(),
                    metric: q.metric.clone(),
                    used: used
                        .get(&(id.as_str(), q.id.as_str()))
                        .copied()
                        .unwrap_or(0),
                    limit: q.limit,
                });
            }
            if license.max_instances > 0 {
                out.push(QuotaUtilization {
                    license: id.clone(),
                    quota: SEATS_QUOTA.to_string(),
                    metric: "seats".to_string(),
                    used: used.get(&(id.as_str(), SEATS_QUOTA)).copied().unwrap_or(0),
                    limit: u64::from(license.max_instances),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigCommand, ConfigOp};
    use crate::decision::Outcome;
    use crate::license::parse_license;
    use crate::request::{CheckRequest, Meter};

    const NOW_MS: i64 = 1_780_000_000_000;
    const DAY_MS: i64 = 86_400_000;

    fn config() -> Config {
        let text = "apiVersion: tollgate/v1\nkind: License\nid: l\ncustomer: C\nkeys: [{key: k}]\nmodels: [{model: m}]\nmax_instances: 2\nquotas:\n  - {id: daily, metric: inferences, limit: 10, window: day}\n  - {id: per_user, metric: inferences, limit: 4, window: day, scope: subject}\n";
        let mut config = Config::default();
        config.apply(
            &ConfigCommand {
                request_id: None,
                actor: "t".into(),
                reason: None,
                at_ms: 0,
                op: ConfigOp::PutLicense(parse_license(text).expect("valid")),
            },
            1,
        );
        config
    }

    fn use_as(usage: &mut Usage, config: &Config, subject: &str, now_ms: i64) {
        let mut req = CheckRequest::new("k", "m", "1.0.0");
        req.subject = Some(subject.to_string());
        req.meters = vec![Meter {
            metric: "inferences".into(),
            quantity: 1,
        }];
        let d = usage.check(config, &req, now_ms, String::new());
        assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    }

    fn figures(u: &[QuotaUtilization]) -> Vec<(&str, u64, u64)> {
        u.iter()
            .map(|q| (q.quota.as_str(), q.used, q.limit))
            .collect()
    }

    #[test]
    fn every_quota_and_the_seats_are_listed_with_the_busiest_scope() {
        let config = config();
        let mut usage = Usage::new(1);
        usage.set_members(&[1]);
        for subject in ["a", "a", "a", "b"] {
            use_as(&mut usage, &config, subject, NOW_MS);
        }
        let u = usage.utilization(&config, NOW_MS);
        assert_eq!(
            figures(&u),
            vec![("daily", 4, 10), ("per_user", 3, 4), ("@seats", 0, 2)]
        );
        assert!((u[0].ratio() - 0.4).abs() < 1e-9);
        assert_eq!(u[2].metric, "seats");
    }

    #[test]
    fn a_window_that_is_over_counts_nothing() {
        let config = config();
        let mut usage = Usage::new(1);
        usage.set_members(&[1]);
        use_as(&mut usage, &config, "a", NOW_MS);
        let u = usage.utilization(&config, NOW_MS + DAY_MS);
        assert_eq!(
            figures(&u),
            vec![("daily", 0, 10), ("per_user", 0, 4), ("@seats", 0, 2)]
        );
    }
}
