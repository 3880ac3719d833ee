//! Conversions between the wire (gRPC messages, JSON bodies) and quota/'s
//! domain types, and the one error type both APIs map from.
//!
//! gRPC and HTTP share these so that both speak the same contract: the same
//! fields, the same reason codes, the same error texts.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use tollgate_proto::v1 as pb;
use tollgate_quota::decision::{Decision, Outcome};
use tollgate_quota::request::{CheckRequest, LineageEntry, Meter};
use tollgate_quota::seats::{SeatDecision, SeatRequest};

/// An API failure, mapped to a gRPC status or an HTTP status with a reason.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; nothing changed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Missing or wrong bearer token; nothing changed.
    #[error("missing or invalid token")]
    Unauthenticated,
    /// A valid token whose role may not do this; nothing changed.
    #[error("{0}")]
    Forbidden(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The cluster cannot commit writes right now (no leader or no quorum).
    #[error("{0}")]
    Unavailable(String),
    /// Fewer than a majority of the voters are reachable, so no write can
    /// commit; decisions still answer from local state.
    #[error("{0}")]
    NoQuorum(String),
    /// The write was proposed but its outcome is unknown (timeout, or the
    /// answer was lost); it may still apply.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// The state machine refused the change.
    #[error("{0}")]
    Rejected(String),
    /// Something went wrong inside the node.
    #[error("internal error: {0}")]
    Internal(String),
    /// The node is leaving the cluster (removed, or shutting down) and
    /// takes no more usage; nothing changed. Another member answers.
    #[error("{0}")]
    Draining(String),
    /// A fault-injection command on a node started without
    /// `--enable-fault-injection`; nothing changed.
    #[error("fault injection is disabled on this node; start it with --enable-fault-injection")]
    FaultInjectionDisabled,
}

impl ApiError {
    /// A short machine-readable code for JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden(_) => "permission_denied",
            ApiError::NotFound(_) => "not_found",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Draining(_) => "node_draining",
            ApiError::NoQuorum(_) => "no_quorum",
            ApiError::OutcomeUnknown(_) => "outcome_unknown",
            ApiError::Rejected(_) => "failed_precondition",
            ApiError::Internal(_) => "internal",
            ApiError::FaultInjectionDisabled => "fault_injection_disabled",
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::InvalidArgument(_) => 400,
            ApiError::Unauthenticated => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::Unavailable(_) | ApiError::NoQuorum(_) | ApiError::Draining(_) => 503,
            ApiError::OutcomeUnknown(_) => 504,
            ApiError::Rejected(_) => 409,
            ApiError::Internal(_) => 500,
            ApiError::FaultInjectionDisabled => 403,
        }
    }
}

impl From<crate::roles::AuthError> for ApiError {
    fn from(e: crate::roles::AuthError) -> Self {
        match e {
            crate::roles::AuthError::Unauthenticated => ApiError::Unauthenticated,
            forbidden @ crate::roles::AuthError::Forbidden { .. } => {
                ApiError::Forbidden(forbidden.to_string())
            }
        }
    }
}

impl From<crate::state::CallError> for ApiError {
    fn from(e: crate::state::CallError) -> Self {
        match e {
            crate::state::CallError::Invalid(e) => ApiError::InvalidArgument(e.to_string()),
            draining @ crate::state::CallError::Draining { .. } => {
                ApiError::Draining(draining.to_string())
            }
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            ApiError::Unauthenticated => tonic::Status::unauthenticated(msg),
            ApiError::Forbidden(_) => tonic::Status::permission_denied(msg),
            ApiError::NotFound(_) => tonic::Status::not_found(msg),
            ApiError::Unavailable(_) | ApiError::NoQuorum(_) | ApiError::Draining(_) => {
                tonic::Status::unavailable(msg)
            }
            ApiError::OutcomeUnknown(_) => tonic::Status::deadline_exceeded(msg),
            ApiError::Rejected(_) => tonic::Status::failed_precondition(msg),
            ApiError::Internal(_) => tonic::Status::internal(msg),
            ApiError::FaultInjectionDisabled => tonic::Status::permission_denied(msg),
        }
    }
}

/// A Check or Report body as JSON (snake_case, the gRPC fields).
#[derive(Debug, Deserialize)]
pub struct CheckJson {
    key: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    feature: Option<String>,
    #[serde(default)]
    environment: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    hardware_id: Option<String>,
    #[serde(default)]
    meters: Vec<MeterJson>,
    #[serde(default)]
    lineage: Vec<LineageJson>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    input_hash: Option<String>,
    #[serde(default)]
    output_hash: Option<String>,
    /// Every field not named above; in strict mode any is an error, so that
    /// a typo never silently changes a decision.
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct MeterJson {
    metric: String,
    quantity: i64,
}

/// One lineage entry; unknown fields are refused even in lax mode, since a
/// misspelt `release` would otherwise turn into a missing one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineageJson {
    dataset: String,
    release: String,
}

/// Parses a JSON Check body; in strict mode unknown fields are an error.
pub fn parse_check_json(body: &[u8], strict: bool) -> Result<CheckRequest, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidArgument(
            "body must be a JSON object".into(),
        ));
    }
    let json: CheckJson = serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidArgument(match e.classify() {
            serde_json::error::Category::Data => format!("invalid check request: {e}"),
            _ => format!("body is not valid JSON: {e}"),
        })
    })?;
    if strict && let Some(field) = json.unknown.keys().next() {
        return Err(ApiError::InvalidArgument(format!(
            "unknown field `{field}`"
        )));
    }
    let mut meters = Vec::with_capacity(json.meters.len());
    for (i, m) in json.meters.into_iter().enumerate() {
        let quantity = u64::try_from(m.quantity).map_err(|_| {
            ApiError::InvalidArgument(format!("meters[{i}].quantity: must not be negative"))
        })?;
        meters.push(Meter {
            metric: m.metric,
            quantity,
        });
    }
    Ok(CheckRequest {
        key: json.key,
        subject: json.subject,
        model: json.model.unwrap_or_default(),
        model_version: json.model_version.unwrap_or_default(),
        feature: json.feature,
        environment: json.environment,
        region: json.region,
        hardware_id: json.hardware_id,
        meters,
        lineage: json
            .lineage
            .into_iter()
            .map(|l| LineageEntry {
                dataset: l.dataset,
                release: l.release,
            })
            .collect(),
        request_id: json.request_id,
        dry_run: json.dry_run,
        input_hash: json.input_hash,
        output_hash: json.output_hash,
    })
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

/// Converts a gRPC Check message into the domain request.
pub fn check_from_proto(req: pb::CheckRequest) -> CheckRequest {
    CheckRequest {
        key: req.key,
        subject: non_empty(req.subject),
        model: req.model,
        model_version: req.model_version,
        feature: non_empty(req.feature),
        environment: non_empty(req.environment),
        region: non_empty(req.region),
        hardware_id: non_empty(req.hardware_id),
        meters: req
            .meters
            .into_iter()
            .map(|m| Meter {
                metric: m.metric,
                quantity: m.quantity,
            })
            .collect(),
        lineage: req
            .lineage
            .into_iter()
            .map(|l| LineageEntry {
                dataset: l.dataset,
                release: l.release,
            })
            .collect(),
        request_id: non_empty(req.request_id),
        dry_run: req.dry_run,
        input_hash: non_empty(req.input_hash),
        output_hash: non_empty(req.output_hash),
    }
}

/// RFC 3339 for a unix-ms instant.
pub fn rfc3339_ms(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// One line summing a decision up for humans.
pub fn summary(d: &Decision) -> String {
    match d.outcome {
        Outcome::Allow if d.warnings.is_empty() => "allowed".to_string(),
        Outcome::Allow => format!(
            "allowed with warnings: {}",
            d.warnings
                .iter()
                .map(|w| w.message.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ),
        _ => d
            .reasons
            .iter()
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// The JSON shape of a decision (the HTTP response and `tollgate check --json`).
#[derive(Debug, Serialize, Deserialize)]
pub struct DecisionJson {
    /// "allow", "deny" or "throttle".
    pub decision: String,
    /// Every failing rule.
    pub reasons: Vec<ReasonJson>,
    /// Per-quota state after this decision.
    pub quotas: Vec<QuotaJson>,
    /// How long to wait before retrying, when throttled or out of quota.
    pub retry_after_ms: Option<u64>,
    /// Unique id of this decision.
    pub decision_id: String,
    /// The config version (Raft applied index) the decision used.
    pub policy_version: u64,
    /// Non-fatal notes: thresholds crossed, grace period.
    pub warnings: Vec<WarningJson>,
    /// How to ask for more quota, on a quota denial.
    pub request_adjustment: Option<AdjustmentJson>,
    /// The license the key belongs to, when known.
    pub license_id: Option<String>,
    /// Whether nothing was consumed.
    pub dry_run: bool,
    /// A one-line human summary.
    pub message: String,
}

/// A failing rule.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReasonJson {
    /// Stable code, e.g. `quota_exceeded`.
    pub code: String,
    /// Human sentence.
    pub message: String,
    /// Rule path in the license.
    pub rule: String,
}

/// One quota's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuotaJson {
    /// Quota id.
    pub quota: String,
    /// Metric it counts.
    pub metric: String,
    /// Limit per window.
    pub limit: u64,
    /// Used in the current window.
    pub used: u64,
    /// Left in the current window.
    pub remaining: u64,
    /// Next window start (RFC 3339), none for a total quota.
    pub resets_at: Option<String>,
    /// The same as unix ms.
    pub resets_at_ms: Option<i64>,
    /// The scope key the quota was counted under.
    pub scope: String,
}

/// A warning.
#[derive(Debug, Serialize, Deserialize)]
pub struct WarningJson {
    /// Stable code.
    pub code: String,
    /// Human sentence.
    pub message: String,
}

/// Where to ask for more quota.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdjustmentJson {
    /// License id.
    pub license: String,
    /// Quota id.
    pub quota: String,
    /// What to do.
    pub message: String,
}

impl From<&Decision> for DecisionJson {
    fn from(d: &Decision) -> Self {
        DecisionJson {
            decision: d.outcome.as_str().to_string(),
            reasons: d
                .reasons
                .iter()
                .map(|r| ReasonJson {
                    code: r.code.as_str().to_string(),
                    message: r.message.clone(),
                    rule: r.rule.clone(),
                })
                .collect(),
            quotas: d
                .quotas
                .iter()
                .map(|q| QuotaJson {
                    quota: q.quota.clone(),
                    metric: q.metric.clone(),
                    limit: q.limit,
                    used: q.used,
                    remaining: q.remaining,
                    resets_at: q.resets_at_ms.and_then(rfc3339_ms),
                    resets_at_ms: q.resets_at_ms,
                    scope: q.scope.clone(),
                })
                .collect(),
            retry_after_ms: d.retry_after_ms,
            decision_id: d.decision_id.clone(),
            policy_version: d.policy_version,
            warnings: d
                .warnings
                .iter()
                .map(|w| WarningJson {
                    code: w.code.to_string(),
                    message: w.message.clone(),
                })
                .collect(),
            request_adjustment: d.request_adjustment.as_ref().map(|a| AdjustmentJson {
                license: a.license.clone(),
                quota: a.quota.clone(),
                message: a.message.clone(),
            }),
            license_id: d.license_id.as_ref().map(|s| s.to_string()),
            dry_run: d.dry_run,
            message: summary(d),
        }
    }
}

/// Converts a decision into the gRPC response.
pub fn decision_to_proto(d: &Decision) -> pb::CheckResponse {
    let outcome = match d.outcome {
        Outcome::Allow => pb::Outcome::Allow,
        Outcome::Deny => pb::Outcome::Deny,
        Outcome::Throttle => pb::Outcome::Throttle,
    };
    pb::CheckResponse {
        outcome: outcome as i32,
        decision: d.outcome.as_str().to_string(),
        reasons: d
            .reasons
            .iter()
            .map(|r| pb::Reason {
                code: r.code.as_str().to_string(),
                message: r.message.clone(),
                rule: r.rule.clone(),
            })
            .collect(),
        quotas: d
            .quotas
            .iter()
            .map(|q| pb::QuotaStatus {
                quota: q.quota.clone(),
                metric: q.metric.clone(),
                limit: q.limit,
                used: q.used,
                remaining: q.remaining,
                resets_at_ms: q.resets_at_ms.unwrap_or(0),
                resets_at: q.resets_at_ms.and_then(rfc3339_ms).unwrap_or_default(),
                scope: q.scope.clone(),
            })
            .collect(),
        retry_after_ms: d.retry_after_ms.unwrap_or(0),
        decision_id: d.decision_id.clone(),
        policy_version: d.policy_version,
        warnings: d
            .warnings
            .iter()
            .map(|w| pb::Warning {
                code: w.code.to_string(),
                message: w.message.clone(),
            })
            .collect(),
        request_adjustment: d.request_adjustment.as_ref().map(|a| pb::AdjustmentHint {
            license: a.license.clone(),
            quota: a.quota.clone(),
            message: a.message.clone(),
        }),
        license_id: d
            .license_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        dry_run: d.dry_run,
        message: summary(d),
    }
}

/// Converts a gRPC response back into the JSON shape (for the CLI).
pub fn proto_to_json(r: &pb::CheckResponse) -> DecisionJson {
    DecisionJson {
        decision: r.decision.clone(),
        reasons: r
            .reasons
            .iter()
            .map(|x| ReasonJson {
                code: x.code.clone(),
                message: x.message.clone(),
                rule: x.rule.clone(),
            })
            .collect(),
        quotas: r
            .quotas
            .iter()
            .map(|q| QuotaJson {
                quota: q.quota.clone(),
                metric: q.metric.clone(),
                limit: q.limit,
                used: q.used,
                remaining: q.remaining,
                resets_at: non_empty(q.resets_at.clone()),
                resets_at_ms: (q.resets_at_ms != 0).then_some(q.resets_at_ms),
                scope: q.scope.clone(),
            })
            .collect(),
        retry_after_ms: (r.retry_after_ms != 0).then_some(r.retry_after_ms),
        decision_id: r.decision_id.clone(),
        policy_version: r.policy_version,
        warnings: r
            .warnings
            .iter()
            .map(|w| WarningJson {
                code: w.code.clone(),
                message: w.message.clone(),
            })
            .collect(),
        request_adjustment: r.request_adjustment.as_ref().map(|a| AdjustmentJson {
            license: a.license.clone(),
            quota: a.quota.clone(),
            message: a.message.clone(),
        }),
        license_id: non_empty(r.license_id.clone()),
        dry_run: r.dry_run,
        message: r.message.clone(),
    }
}

/// A seat call body as JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeatJson {
    key: String,
    #[serde(default)]
    instance: String,
    #[serde(default)]
    lease_id: String,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// Parses and validates a seat call (`acquire` needs `instance`, renew and
/// release need `lease_id`).
pub fn parse_seat_json(body: &[u8], acquire: bool) -> Result<SeatRequest, ApiError> {
    let json: SeatJson = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidArgument(format!("invalid seat request: {e}")))?;
    let req = SeatRequest {
        key: json.key,
        instance: json.instance,
        lease_id: json.lease_id,
        ttl_ms: json.ttl_ms,
    };
    req.validate(acquire)
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    Ok(req)
}

/// Converts and validates a gRPC seat call.
pub fn seat_from_proto(req: pb::SeatRequest, acquire: bool) -> Result<SeatRequest, ApiError> {
    let req = SeatRequest {
        key: req.key,
        instance: req.instance,
        lease_id: req.lease_id,
        ttl_ms: (req.ttl_ms > 0).then_some(req.ttl_ms),
    };
    req.validate(acquire)
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    Ok(req)
}

/// A seat answer as gRPC.
pub fn seat_to_proto(d: &SeatDecision) -> pb::SeatResponse {
    pb::SeatResponse {
        granted: d.granted,
        reasons: d
            .reasons
            .iter()
            .map(|r| pb::Reason {
                code: r.code.as_str().to_string(),
                message: r.message.clone(),
                rule: r.rule.clone(),
            })
            .collect(),
        lease_id: d.lease_id.clone().unwrap_or_default(),
        expires_at_ms: d.expires_at_ms.unwrap_or(0),
        in_use: d.in_use,
        max_instances: d.max_instances,
        retry_after_ms: d.retry_after_ms.unwrap_or(0),
        license_id: d.license_id.clone().unwrap_or_default(),
        policy_version: d.policy_version,
        warnings: d
            .warnings
            .iter()
            .map(|w| pb::Warning {
                code: w.code.clone(),
                message: w.message.clone(),
            })
            .collect(),
    }
}
