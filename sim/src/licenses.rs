//! The licenses a simulated cluster starts with, built from the scenario's
//! workload: one quota kind each, so that every checker reads one counter.

use crate::scenario::Workload;

/// Key of the license with a soft monthly quota.
pub const SOFT_KEY: &str = "tg_sim_soft";
/// Key of the license with a strict monthly quota.
pub const STRICT_KEY: &str = "tg_sim_strict";
/// Key of the license that only takes Reports (a pure counter).
pub const METERED_KEY: &str = "tg_sim_metered";
/// Key of the license with a seat limit.
pub const SEATS_KEY: &str = "tg_sim_seats";
/// Key of the rate-limited license.
pub const RATE_KEY: &str = "tg_sim_rate";
/// Id of the license the admin client rewrites, revokes and rolls back.
pub const CHURN_ID: &str = "sim-churn";
/// The model every license grants.
pub const MODEL: &str = "sim-model";
/// The model version every request names.
pub const MODEL_VERSION: &str = "1.0.0";
/// The quota id of the soft and strict quotas.
pub const QUOTA_ID: &str = "monthly";

/// The seed documents: a model and six licenses.
pub fn seed_documents(w: &Workload) -> String {
    format!(
        r#"apiVersion: tollgate/v1
kind: Model
id: {MODEL}
versions:
  - {{ version: {MODEL_VERSION}, released: 2026-01-01 }}
---
apiVersion: tollgate/v1
kind: License
id: sim-soft
customer: Sim soft
keys: [{{key: {SOFT_KEY}, id: k}}]
models: [{{model: {MODEL}}}]
quotas:
  - {{id: {QUOTA_ID}, metric: inferences, limit: {soft}, window: month, scope: license, mode: soft}}
---
apiVersion: tollgate/v1
kind: License
id: sim-strict
customer: Sim strict
keys: [{{key: {STRICT_KEY}, id: k}}]
models: [{{model: {MODEL}}}]
quotas:
  - {{id: {QUOTA_ID}, metric: inferences, limit: {strict}, window: month, scope: license, mode: strict}}
---
apiVersion: tollgate/v1
kind: License
id: sim-metered
customer: Sim metered
keys: [{{key: {METERED_KEY}, id: k}}]
models: [{{model: {MODEL}}}]
quotas:
  - {{id: {QUOTA_ID}, metric: inferences, limit: 100000000, window: month, scope: license, mode: soft}}
---
apiVersion: tollgate/v1
kind: License
id: sim-seats
customer: Sim seats
keys: [{{key: {SEATS_KEY}, id: k}}]
models: [{{model: {MODEL}}}]
max_instances: {seats}
seat_lease_ttl: {ttl}s
---
apiVersion: tollgate/v1
kind: License
id: sim-rate
customer: Sim rate
keys: [{{key: {RATE_KEY}, id: k}}]
models: [{{model: {MODEL}}}]
rate_limits: [{{id: r, per_second: {rate}, burst: {rate}}}]
---
{churn}"#,
        soft = w.soft_limit,
        strict = w.strict_limit,
        seats = w.max_instances,
        ttl = w.seat_ttl_s,
        rate = w.rate_per_second,
        churn = churn_license(1),
    )
}

/// The churned license at revision `rev` (its quota limit is `1000 + rev`,
/// so every revision is a different document).
pub fn churn_license(rev: u64) -> String {
    format!(
        r#"apiVersion: tollgate/v1
kind: License
id: {CHURN_ID}
customer: Sim churn
keys: [{{key: tg_sim_churn, id: k}}]
models: [{{model: {MODEL}}}]
quotas:
  - {{id: daily, metric: inferences, limit: {limit}, window: day}}
"#,
        limit = 1000 + rev
    )
}
