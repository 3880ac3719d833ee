//! The decision function: is this one use allowed, and why (not)?
//!
//! [`decide`] is pure: it reads the config and the usage state and returns a
//! [`Decision`] whose [`Effects`] say what committing it would change; the
//! caller applies them with [`Usage::commit`]. Rules run in the order
//! authenticity -> status/validity/grace -> model version -> feature ->
//! environment -> region -> hardware -> dataset lineage -> rate limits ->
//! quotas. Every failing
//! rule is reported; only an unknown key stops evaluation, since nothing else
//! can be checked without a license. This module must not mutate state, read
//! the clock or allocate more than a handful of strings on the allow path.

use std::fmt::Write as _;

use chrono::{DateTime, Timelike, Utc};
use serde::Serialize;

use crate::alerts::{self, ThresholdAlert};
use crate::config::Config;
use crate::license::{Environment, License, OnExceed, Quota, QuotaMode, QuotaScope, VersionPolicy};
use crate::lineage::LineageEdge;
use crate::request::CheckRequest;
use crate::usage::{BucketState, CounterKey, Usage};

/// The verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Go ahead.
    Allow,
    /// Not allowed; retrying will not help until the terms or window change.
    Deny,
    /// Not now; retry after `retry_after_ms`.
    Throttle,
}

impl Outcome {
    /// `allow`, `deny` or `throttle`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Throttle => "throttle",
        }
    }
}

/// Machine-readable reason for a deny or throttle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// The key matches no license.
    UnknownKey,
    /// The license was revoked.
    LicenseRevoked,
    /// The license is suspended.
    LicenseSuspended,
    /// Before `valid_from`.
    LicenseNotYetValid,
    /// After `valid_until` plus grace.
    LicenseExpired,
    /// The model is not in the license.
    ModelNotGranted,
    /// The version is outside the grant's policy.
    ModelVersionNotAllowed,
    /// The version cannot be checked: not semver, or not registered when the
    /// policy needs release information.
    ModelVersionUnknown,
    /// The feature is not in the license.
    FeatureNotGranted,
    /// The environment is not allowed.
    EnvironmentNotAllowed,
    /// The region is not allowed (or missing while regions are restricted).
    RegionNotAllowed,
    /// The device is not allowed (or missing while hardware is bound).
    DeviceNotAllowed,
    /// A new device would exceed `max_devices`.
    DeviceLimitReached,
    /// The license requires lineage and the request names no dataset release.
    LineageRequired,
    /// A lineage entry names a dataset the registry does not hold.
    DatasetUnknown,
    /// A lineage entry names a release its dataset does not list.
    DatasetReleaseUnknown,
    /// A dataset release comes from a source the license does not allow.
    DatasetSourceNotAllowed,
    /// A dataset release holds a category the license denies.
    DatasetCategoryDenied,
    /// The request's datasets include a combination the license forbids.
    DatasetCombinationForbidden,
    /// A token bucket is empty.
    RateLimited,
    /// A quota would be exceeded.
    QuotaExceeded,
    /// A strict quota has units left across the cluster, but this node
    /// holds no rights to them and has not (yet) been given any.
    QuotaRightsUnavailable,
    /// Every seat (`max_instances`) is taken.
    SeatLimitReached,
    /// The seat lease is unknown here: expired, released, or never granted.
    SeatLeaseUnknown,
}

impl ReasonCode {
    /// The snake_case code.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::UnknownKey => "unknown_key",
            ReasonCode::LicenseRevoked => "license_revoked",
            ReasonCode::LicenseSuspended => "license_suspended",
            ReasonCode::LicenseNotYetValid => "license_not_yet_valid",
            ReasonCode::LicenseExpired => "license_expired",
            ReasonCode::ModelNotGranted => "model_not_granted",
            ReasonCode::ModelVersionNotAllowed => "model_version_not_allowed",
            ReasonCode::ModelVersionUnknown => "model_version_unknown",
            ReasonCode::FeatureNotGranted => "feature_not_granted",
            ReasonCode::EnvironmentNotAllowed => "environment_not_allowed",
            ReasonCode::RegionNotAllowed => "region_not_allowed",
            ReasonCode::DeviceNotAllowed => "device_not_allowed",
            ReasonCode::DeviceLimitReached => "device_limit_reached",
            ReasonCode::LineageRequired => "lineage_required",
            ReasonCode::DatasetUnknown => "dataset_unknown",
            ReasonCode::DatasetReleaseUnknown => "dataset_release_unknown",
            ReasonCode::DatasetSourceNotAllowed => "dataset_source_not_allowed",
            ReasonCode::DatasetCategoryDenied => "dataset_category_denied",
            ReasonCode::DatasetCombinationForbidden => "dataset_combination_forbidden",
            ReasonCode::RateLimited => "rate_limited",
            ReasonCode::QuotaExceeded => "quota_exceeded",
            ReasonCode::QuotaRightsUnavailable => "quota_rights_unavailable",
            ReasonCode::SeatLimitReached => "seat_limit_reached",
            ReasonCode::SeatLeaseUnknown => "seat_lease_unknown",
        }
    }

    /// Every reason code, in [`Self::index`] order: what a metrics table
    /// indexed by code is sized and labelled by.
    pub const ALL: [ReasonCode; 24] = [
        ReasonCode::UnknownKey,
        ReasonCode::LicenseRevoked,
        ReasonCode::LicenseSuspended,
        ReasonCode::LicenseNotYetValid,
        ReasonCode::LicenseExpired,
        ReasonCode::ModelNotGranted,
        ReasonCode::ModelVersionNotAllowed,
        ReasonCode::ModelVersionUnknown,
        ReasonCode::FeatureNotGranted,
        ReasonCode::EnvironmentNotAllowed,
        ReasonCode::RegionNotAllowed,
        ReasonCode::DeviceNotAllowed,
        ReasonCode::DeviceLimitReached,
        ReasonCode::LineageRequired,
        ReasonCode::DatasetUnknown,
        ReasonCode::DatasetReleaseUnknown,
        ReasonCode::DatasetSourceNotAllowed,
        ReasonCode::DatasetCategoryDenied,
        ReasonCode::DatasetCombinationForbidden,
        ReasonCode::RateLimited,
        ReasonCode::QuotaExceeded,
        ReasonCode::QuotaRightsUnavailable,
        ReasonCode::SeatLimitReached,
        ReasonCode::SeatLeaseUnknown,
    ];

    /// The code's position in [`Self::ALL`]. The match is exhaustive on
    /// purpose: a new code does not compile until it has a slot, so counters
    /// indexed by code can never silently drop it.
    pub fn index(self) -> usize {
        match self {
            ReasonCode::UnknownKey => 0,
            ReasonCode::LicenseRevoked => 1,
            ReasonCode::LicenseSuspended => 2,
            ReasonCode::LicenseNotYetValid => 3,
            ReasonCode::LicenseExpired => 4,
            ReasonCode::ModelNotGranted => 5,
            ReasonCode::ModelVersionNotAllowed => 6,
            ReasonCode::ModelVersionUnknown => 7,
            ReasonCode::FeatureNotGranted => 8,
            ReasonCode::EnvironmentNotAllowed => 9,
            ReasonCode::RegionNotAllowed => 10,
            ReasonCode::DeviceNotAllowed => 11,
            ReasonCode::DeviceLimitReached => 12,
            ReasonCode::LineageRequired => 13,
            ReasonCode::DatasetUnknown => 14,
            ReasonCode::DatasetReleaseUnknown => 15,
            ReasonCode::DatasetSourceNotAllowed => 16,
            ReasonCode::DatasetCategoryDenied => 17,
            ReasonCode::DatasetCombinationForbidden => 18,
            ReasonCode::RateLimited => 19,
            ReasonCode::QuotaExceeded => 20,
            ReasonCode::QuotaRightsUnavailable => 21,
            ReasonCode::SeatLimitReached => 22,
            ReasonCode::SeatLeaseUnknown => 23,
        }
    }
}

/// One failing rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reason {
    /// Machine-readable code.
    pub code: ReasonCode,
    /// Human explanation.
    pub message: String,
    /// Path of the rule in the license, e.g. `quotas[daily]`.
    pub rule: String,
}

/// Where one quota stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuotaStatus {
    /// Quota id.
    pub quota: String,
    /// Metric.
    pub metric: String,
    /// Limit per window.
    pub limit: u64,
    /// Used in this window, including this request if it was allowed.
    pub used: u64,
    /// `limit - used`, floored at 0.
    pub remaining: u64,
    /// When the window resets (unix ms); `None` for `total`.
    pub resets_at_ms: Option<i64>,
    /// `license`, `subject:<id>` or `environment:<name>`.
    pub scope: String,
}

/// A non-blocking notice.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Warning {
    /// `threshold_crossed`, `in_grace_period` or `over_quota`.
    pub code: String,
    /// Human explanation.
    pub message: String,
}

/// How to get more quota, attached to a quota denial.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdjustmentHint {
    /// License id.
    pub license: String,
    /// Quota id.
    pub quota: String,
    /// What to ask for.
    pub message: String,
}

/// One counter increment of this node's slot.
#[derive(Clone, Debug, PartialEq)]
pub struct Increment {
    /// The counter.
    pub key: CounterKey,
    /// Units to add.
    pub by: u64,
    /// Whether the counter is an escrow one (strict quota).
    pub escrow: bool,
}

/// What committing a decision changes in [`Usage`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effects {
    /// Counter increments for this node's slot.
    pub increments: Vec<Increment>,
    /// Units refused for lack of escrow rights, per counter: recorded even
    /// though the request is denied, as the demand that moves rights here.
    pub starved: Vec<(CounterKey, u64)>,
    /// A device to add to a license's seen set: (license id, device id).
    pub new_device: Option<(String, String)>,
    /// New token bucket states: (license id, rate limit id, state).
    pub buckets: Vec<(String, String, BucketState)>,
    /// Lineage graph edges to count once each in this node's slot
    /// (see [`crate::lineage`]); set only on an allowed decision.
    pub lineage: Vec<CounterKey>,
}

/// The answer to one Check or Report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// The verdict.
    pub outcome: Outcome,
    /// Every failing rule (empty on allow).
    pub reasons: Vec<Reason>,
    /// Quotas touched by the request's meters.
    pub quotas: Vec<QuotaStatus>,
    /// When to retry, on throttle.
    pub retry_after_ms: Option<u64>,
    /// Non-blocking notices.
    pub warnings: Vec<Warning>,
    /// Config version the decision was made against.
    pub policy_version: u64,
    /// Caller-supplied decision id.
    pub decision_id: String,
    /// The license the key belongs to.
    pub license_id: Option<String>,
    /// How to ask for more quota.
    pub request_adjustment: Option<AdjustmentHint>,
    /// Whether nothing will be recorded.
    pub dry_run: bool,
    /// What [`Usage::commit`] applies (empty unless allowed).
    #[serde(skip)]
    pub effects: Effects,
    /// Alert thresholds this request's usage reached that this node has not
    /// reported yet (only for licenses with a governance webhook, only on
    /// an allowed decision); [`Usage::commit`] marks them reported.
    #[serde(skip)]
    pub alerts: Vec<ThresholdAlert>,
}

impl Decision {
    fn new(policy_version: u64, decision_id: String, dry_run: bool) -> Self {
        Self {
            outcome: Outcome::Allow,
            reasons: Vec::new(),
            quotas: Vec::new(),
            retry_after_ms: None,
            warnings: Vec::new(),
            policy_version,
            decision_id,
            license_id: None,
            request_adjustment: None,
            dry_run,
            effects: Effects::default(),
            alerts: Vec::new(),
        }
    }

    /// The first reason's code, if any.
    pub fn code(&self) -> Option<ReasonCode> {
        self.reasons.first().map(|r| r.code)
    }
}

/// Accumulates the verdict while rules run.
struct Verdict {
    decision: Decision,
    deny: bool,
    throttle: bool,
}

impl Verdict {
    fn deny(&mut self, code: ReasonCode, rule: impl Into<String>, message: String) {
        self.deny = true;
        self.decision.reasons.push(Reason {
            code,
            message,
            rule: rule.into(),
        });
    }

    fn throttle(&mut self, code: ReasonCode, rule: String, message: String, retry_after_ms: u64) {
        self.throttle = true;
        self.decision.reasons.push(Reason {
            code,
            message,
            rule,
        });
        let retry = self.decision.retry_after_ms.get_or_insert(0);
        *retry = (*retry).max(retry_after_ms);
    }

    /// A denial that waiting can cure: the retry hint is kept (see `finish`).
    fn throttle_deny(
        &mut self,
        code: ReasonCode,
        rule: String,
        message: String,
        retry_after_ms: u64,
    ) {
        self.deny(code, rule, message);
        let retry = self.decision.retry_after_ms.get_or_insert(0);
        *retry = (*retry).max(retry_after_ms);
    }

    fn warn(&mut self, code: &str, message: String) {
        self.decision.warnings.push(Warning {
            code: code.to_string(),
            message,
        });
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Decides one Check. Pure: `usage` is only read; apply the result with
/// [`Usage::commit`] (or use [`Usage::check`]).
pub fn decide(
    config: &Config,
    usage: &Usage,
    req: &CheckRequest,
    now_ms: i64,
    decision_id: String,
) -> Decision {
    let mut v = Verdict {
        decision: Decision::new(config.version, decision_id, req.dry_run),
        deny: false,
        throttle: false,
    };
    let Some(license) = config.license_by_key(&req.key) else {
        v.deny(
            ReasonCode::UnknownKey,
            "keys",
            "the API key is not recognised".to_string(),
        );
        return finish(v, None, req, usage);
    };
    v.decision.license_id = Some(license.id.clone());
    check_status(license, now_ms, &mut v);
    check_model(config, license, req, &mut v);
    if !license.features.is_empty()
        && let Some(feature) = &req.feature
        && !license.features.iter().any(|f| f == feature)
    {
        v.deny(
            ReasonCode::FeatureNotGranted,
            "features",
            format!(
                "license {} does not grant feature {feature:?} (granted: {})",
                license.id,
                license.features.join(", ")
            ),
        );
    }
    let environment = check_environment(license, req, &mut v);
    check_region(license, req, &mut v);
    check_hardware(license, usage, req, &mut v);
    check_lineage(config, license, req, &mut v);
    check_rate_limits(license, usage, now_ms, &mut v);
    evaluate_quotas(
        config,
        license,
        usage,
        req,
        environment,
        now_ms,
        false,
        &mut v,
    );
    let mut decision = finish(v, Some(license), req, usage);
    if decision.outcome == Outcome::Allow {
        lineage_edges(license, req, &mut decision.effects);
    }
    decision
}

/// Decides one Report (post-inference metering): the key must be known and
/// the license in force; then the meters are recorded even past a limit, with
/// an `over_quota` warning. Pure like [`decide`].
pub fn decide_report(
    config: &Config,
    usage: &Usage,
    req: &CheckRequest,
    now_ms: i64,
    decision_id: String,
) -> Decision {
    let mut v = Verdict {
        decision: Decision::new(config.version, decision_id, req.dry_run),
        deny: false,
        throttle: false,
    };
    let Some(license) = config.license_by_key(&req.key) else {
        v.deny(
            ReasonCode::UnknownKey,
            "keys",
            "the API key is not recognised".to_string(),
        );
        return finish(v, None, req, usage);
    };
    v.decision.license_id = Some(license.id.clone());
    check_status(license, now_ms, &mut v);
    let environment = req
        .environment
        .as_deref()
        .and_then(Environment::parse)
        .unwrap_or(Environment::Production);
    evaluate_quotas(
        config,
        license,
        usage,
        req,
        Some(environment),
        now_ms,
        true,
        &mut v,
    );
    finish(v, Some(license), req, usage)
}

/// Why `license` is not in force at `now_ms` (revoked, suspended, not yet
/// valid, expired past grace), plus any warnings (grace period); for calls
/// that check the license but not a use, such as seat leases.
pub(crate) fn status_reasons(license: &License, now_ms: i64) -> (Vec<Reason>, Vec<Warning>) {
    let mut v = Verdict {
        decision: Decision::new(0, String::new(), false),
        deny: false,
        throttle: false,
    };
    check_status(license, now_ms, &mut v);
    (v.decision.reasons, v.decision.warnings)
}

fn check_status(license: &License, now_ms: i64, v: &mut Verdict) {
    use crate::license::LicenseStatus;
    match &license.status {
        LicenseStatus::Active => {}
        LicenseStatus::Revoked { reason } => {
            let why = reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            v.deny(
                ReasonCode::LicenseRevoked,
                "status",
                format!("license {} was revoked{why}", license.id),
            );
        }
        LicenseStatus::Suspended { reason, until } => {
            // A suspension with an end time lifts by itself once it passes.
            if until.is_none_or(|u| now_ms < u.timestamp_millis()) {
                let why = reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                let till = until
                    .map(|u| format!(" until {}", rfc3339(u.timestamp_millis())))
                    .unwrap_or_default();
                v.deny(
                    ReasonCode::LicenseSuspended,
                    "status",
                    format!("license {} is suspended{till}{why}", license.id),
                );
            }
        }
    }
    if let Some(from) = license.valid_from
        && now_ms < from.timestamp_millis()
    {
        v.deny(
            ReasonCode::LicenseNotYetValid,
            "valid_from",
            format!(
                "license {} is valid from {}",
                license.id,
                rfc3339(from.timestamp_millis())
            ),
        );
    }
    if let Some(until) = license.valid_until {
        let until_ms = until.timestamp_millis();
        if now_ms >= until_ms {
            let grace_ms = license
                .grace_period
                .map_or(0, |g| i64::try_from(g.ms).unwrap_or(i64::MAX));
            let grace_end_ms = until_ms.saturating_add(grace_ms);
            if now_ms < grace_end_ms {
                v.warn(
                    "in_grace_period",
                    format!(
                        "license {} expired at {}; the grace period ends at {}",
                        license.id,
                        rfc3339(until_ms),
                        rfc3339(grace_end_ms)
                    ),
                );
            } else {
                v.deny(
                    ReasonCode::LicenseExpired,
                    "valid_until",
                    format!("license {} expired at {}", license.id, rfc3339(until_ms)),
                );
            }
        }
    }
}

fn check_model(config: &Config, license: &License, req: &CheckRequest, v: &mut Verdict) {
    let Some(grant) = license.models.iter().find(|g| g.model == req.model) else {
        let granted: Vec<&str> = license.models.iter().map(|g| g.model.as_str()).collect();
        v.deny(
            ReasonCode::ModelNotGranted,
            "models",
            format!(
                "license {} does not grant model {:?} (granted: {})",
                license.id,
                req.model,
                granted.join(", ")
            ),
        );
        return;
    };
    let rule = || format!("models[{}].versions", grant.model);
    let Ok(version) = semver::Version::parse(&req.model_version) else {
        v.deny(
            ReasonCode::ModelVersionUnknown,
            rule(),
            format!(
                "requested version {:?} is not a semantic version",
                req.model_version
            ),
        );
        return;
    };
    let not_allowed = |v: &mut Verdict, extra: &str| {
        v.deny(
            ReasonCode::ModelVersionNotAllowed,
            rule(),
            format!(
                "license grants {} {}; requested {version}{extra}",
                grant.model, grant.versions
            ),
        );
    };
    match &grant.versions {
        VersionPolicy::Any => {}
        VersionPolicy::Major(major) => {
            if version.major != *major {
                not_allowed(v, "");
            }
        }
        VersionPolicy::Pin(pin) => {
            if &version != pin {
                not_allowed(v, "");
            }
        }
        VersionPolicy::Rolling | VersionPolicy::MaintenanceUntil(_) => {
            // These policies depend on release information, so the model and
            // version must be registered.
            let Some(registered) = config.model(&grant.model).and_then(|m| m.find(&version)) else {
                v.deny(
                    ReasonCode::ModelVersionUnknown,
                    rule(),
                    format!("{} {version} is not a registered version; policy {} needs release information", grant.model, grant.versions),
                );
                return;
            };
            match &grant.versions {
                VersionPolicy::Rolling => {
                    let latest = config.model(&grant.model).and_then(|m| m.latest());
                    if latest.is_some_and(|l| l.version != version) {
                        let latest = latest.map(|l| l.version.to_string()).unwrap_or_default();
                        not_allowed(v, &format!(" (latest is {latest})"));
                    }
                }
                VersionPolicy::MaintenanceUntil(date) if registered.released > *date => {
                    not_allowed(v, &format!(" (released {})", registered.released));
                }
                _ => {}
            }
        }
    }
}

fn check_environment(
    license: &License,
    req: &CheckRequest,
    v: &mut Verdict,
) -> Option<Environment> {
    // A request that names no environment is production: the safe default,
    // since it is the environment every license grants when it grants any.
    let name = req.environment.as_deref().unwrap_or("production");
    let Some(env) = Environment::parse(name) else {
        v.deny(
            ReasonCode::EnvironmentNotAllowed,
            "environments",
            format!("unknown environment {name:?} (expected production, staging, development or experiment)"),
        );
        return None;
    };
    if let Some(allowed) = &license.environments
        && !allowed.contains(&env)
    {
        let names: Vec<&str> = allowed.iter().map(|e| e.as_str()).collect();
        v.deny(
            ReasonCode::EnvironmentNotAllowed,
            "environments",
            format!(
                "license {} allows environments {}; requested {name}",
                license.id,
                names.join(", ")
            ),
        );
    }
    Some(env)
}

fn check_region(license: &License, req: &CheckRequest, v: &mut Verdict) {
    let Some(rules) = &license.regions else {
        return;
    };
    if rules.is_unrestricted() {
        return;
    }
    let Some(region) = req.region.as_deref() else {
        v.deny(
            ReasonCode::RegionNotAllowed,
            "regions",
            format!(
                "license {} restricts regions; the request names none",
                license.id
            ),
        );
        return;
    };
    if let Some(denied) = rules.deny.iter().find(|g| g.is_match(region)) {
        v.deny(
            ReasonCode::RegionNotAllowed,
            "regions.deny",
            format!("region {region} matches denied pattern {}", denied.pattern),
        );
    } else if !rules.allow.iter().any(|g| g.is_match(region)) {
        let allowed: Vec<&str> = rules.allow.iter().map(|g| g.pattern.as_str()).collect();
        v.deny(
            ReasonCode::RegionNotAllowed,
            "regions.allow",
            format!(
                "region {region} is not in the allowed regions {}",
                allowed.join(", ")
            ),
        );
    }
}

fn check_hardware(license: &License, usage: &Usage, req: &CheckRequest, v: &mut Verdict) {
    let hw = &license.hardware;
    if !hw.is_bound() {
        return;
    }
    let Some(device) = req.hardware_id.as_deref() else {
        v.deny(
            ReasonCode::DeviceNotAllowed,
            "hardware",
            format!(
                "license {} is bound to hardware; the request names no hardware_id",
                license.id
            ),
        );
        return;
    };
    if !hw.devices.is_empty() && !hw.devices.iter().any(|d| d == device) {
        v.deny(
            ReasonCode::DeviceNotAllowed,
            "hardware.devices",
            format!("device {device:?} is not among the license's devices"),
        );
        return;
    }
    if hw.max_devices > 0 && !usage.knows_device(&license.id, device) {
        let n_devices = usage.n_devices(&license.id);
        if n_devices >= hw.max_devices as usize {
            v.deny(
                ReasonCode::DeviceLimitReached,
                "hardware.max_devices",
                format!("license {} already uses {n_devices} of {} devices; {device:?} would be one more", license.id, hw.max_devices),
            );
        } else {
            v.decision.effects.new_device = Some((license.id.clone(), device.to_string()));
        }
    }
}

/// Checks the request's lineage against the registry and the license's
/// dataset constraints. Every lineage entry must name a registered dataset
/// release, whatever the license says, so the lineage graph only ever holds
/// real releases. Allocates only to explain a denial.
fn check_lineage(config: &Config, license: &License, req: &CheckRequest, v: &mut Verdict) {
    let constraints = license.datasets.as_ref();
    if req.lineage.is_empty() {
        if constraints.is_some_and(|c| c.require_lineage) {
            v.deny(
                ReasonCode::LineageRequired,
                "datasets.require_lineage",
                format!(
                    "license {} requires lineage: name the dataset releases that feed this use in lineage [{{dataset, release}}]",
                    license.id
                ),
            );
        }
        return;
    }
    for (idx, entry) in req.lineage.iter().enumerate() {
        let Some(dataset) = config.dataset(&entry.dataset) else {
            v.deny(
                ReasonCode::DatasetUnknown,
                format!("lineage[{idx}]"),
                format!("dataset {:?} is not registered", entry.dataset),
            );
            continue;
        };
        let Some(release) = dataset.release(&entry.release) else {
            let known: Vec<&str> = dataset
                .releases
                .iter()
                .map(|r| r.version.as_str())
                .collect();
            v.deny(
                ReasonCode::DatasetReleaseUnknown,
                format!("lineage[{idx}]"),
                format!(
                    "dataset {} has no release {:?} (registered: {})",
                    dataset.id,
                    entry.release,
                    known.join(", ")
                ),
            );
            continue;
        };
        let Some(c) = constraints else {
            continue;
        };
        if let Some(allowed) = &c.allowed_sources
            && !allowed.contains(&release.source)
        {
            v.deny(
                ReasonCode::DatasetSourceNotAllowed,
                "datasets.allowed_sources",
                format!(
                    "dataset {} release {} comes from source {}, which license {} does not allow (allowed: {})",
                    dataset.id,
                    release.version,
                    release.source,
                    license.id,
                    allowed.join(", ")
                ),
            );
        }
        for category in &release.categories {
            if c.denied_categories.contains(category) {
                v.deny(
                    ReasonCode::DatasetCategoryDenied,
                    "datasets.denied_categories",
                    format!(
                        "dataset {} release {} holds {category} data, a category license {} denies",
                        dataset.id, release.version, license.id
                    ),
                );
            }
        }
    }
    let Some(c) = constraints else {
        return;
    };
    for (idx, combination) in c.forbidden_combinations.iter().enumerate() {
        if combination
            .iter()
            .all(|d| req.lineage.iter().any(|e| e.dataset == *d))
        {
            v.deny(
                ReasonCode::DatasetCombinationForbidden,
                format!("datasets.forbidden_combinations[{idx}]"),
                format!(
                    "license {} forbids datasets {} from feeding one use together",
                    license.id,
                    combination.join(" + ")
                ),
            );
        }
    }
}

/// The lineage edges an allowed use adds: license -> model version, and
/// model version -> each dataset release.
fn lineage_edges(license: &License, req: &CheckRequest, effects: &mut Effects) {
    if req.lineage.is_empty() {
        return;
    }
    let (model, version) = (req.model.as_str(), req.model_version.as_str());
    effects.lineage.reserve_exact(req.lineage.len() + 1);
    effects
        .lineage
        .push(LineageEdge::ModelVersion { model, version }.key(&license.id));
    for entry in &req.lineage {
        let edge = LineageEdge::DatasetRelease {
            model,
            version,
            dataset: &entry.dataset,
            release: &entry.release,
        };
        effects.lineage.push(edge.key(&license.id));
    }
}

fn check_rate_limits(license: &License, usage: &Usage, now_ms: i64, v: &mut Verdict) {
    // Each passing limit pushes one bucket update: size the list once.
    v.decision
        .effects
        .buckets
        .reserve_exact(license.rate_limits.len());
    for rl in &license.rate_limits {
        let (per_second, burst, peak) = match &rl.schedule {
            Some(s) => {
                let hour = DateTime::<Utc>::from_timestamp_millis(now_ms)
                    .map_or(0, |t| t.with_timezone(&s.timezone.0).hour());
                if s.peak.hours.contains(hour) {
                    (s.peak.per_second, s.peak.burst, true)
                } else {
                    (rl.per_second, rl.burst, false)
                }
            }
            None => (rl.per_second, rl.burst, false),
        };
        let burst_f = f64::from(burst);
        let state = usage.bucket(&license.id, &rl.id).unwrap_or(BucketState {
            tokens: burst_f,
            last_ms: now_ms,
        });
        // A clock that went backwards refills nothing rather than going negative.
        let elapsed_ms = now_ms.saturating_sub(state.last_ms).max(0) as f64;
        let tokens = (state.tokens + elapsed_ms * per_second / 1000.0).min(burst_f);
        if tokens >= 1.0 {
            v.decision.effects.buckets.push((
                license.id.clone(),
                rl.id.clone(),
                BucketState {
                    tokens: tokens - 1.0,
                    last_ms: now_ms.max(state.last_ms),
                },
            ));
        } else {
            let retry_after_ms = (((1.0 - tokens) * 1000.0 / per_second).ceil() as u64).max(1);
            let period = if rl.schedule.is_some() {
                if peak { " (peak hours)" } else { " (off-peak)" }
            } else {
                ""
            };
            v.throttle(
                ReasonCode::RateLimited,
                format!("rate_limits[{}]", rl.id),
                format!("rate limit {} allows {per_second}/s with burst {burst}{period}; retry in {retry_after_ms} ms", rl.id),
                retry_after_ms,
            );
        }
    }
}

/// Evaluates the quotas the request's meters touch. For each, in license
/// order, it pushes one [`QuotaStatus`] (with `used` = the count before this
/// request) and one tentative increment, so `decision.quotas[i]` and
/// `effects.increments[i]` describe the same quota; `finish` relies on that
/// instead of a side list, which saves an allocation per call. A quota's
/// limit is the one in force at `now_ms`: its `limit` plus every approved
/// exception still running.
#[allow(clippy::too_many_arguments)]
fn evaluate_quotas(
    config: &Config,
    license: &License,
    usage: &Usage,
    req: &CheckRequest,
    environment: Option<Environment>,
    now_ms: i64,
    is_report: bool,
    v: &mut Verdict,
) {
    for (quota_idx, quota) in license.quotas.iter().enumerate() {
        let Some(meter) = req.meters.iter().find(|m| m.metric == quota.metric) else {
            continue;
        };
        if v.decision.quotas.is_empty() {
            // At most the remaining quotas match: size both lists once.
            let upper = license.quotas.len() - quota_idx;
            v.decision.quotas.reserve_exact(upper);
            v.decision.effects.increments.reserve_exact(upper);
        }
        let (scope_value, scope_label) = match quota.scope {
            QuotaScope::License => (String::new(), "license".to_string()),
            QuotaScope::Subject => {
                let s = req.subject.as_deref().unwrap_or_default();
                (s.to_string(), labelled("subject:", s))
            }
            QuotaScope::Environment => {
                let e = environment.map_or("production", Environment::as_str);
                (e.to_string(), labelled("environment:", e))
            }
        };
        let epoch = quota.window.epoch(now_ms);
        let resets_at_ms = quota.window.bounds(epoch).1;
        let key = CounterKey {
            license: license.id.clone(),
            quota: quota.id.clone(),
            epoch,
            scope: scope_value,
        };
        let limit = config.quota_limit(&license.id, quota, now_ms);
        let used_before = usage.counter_value(&key);
        let after = used_before.saturating_add(meter.quantity);
        let escrow = quota.mode == QuotaMode::Strict;
        if !escrow && !is_report && after <= limit {
            near_limit_share(
                quota,
                limit,
                usage,
                &key,
                used_before,
                meter.quantity,
                now_ms,
                v,
            );
        }
        if escrow && after <= limit && !is_report && !escrow_check_skipped() {
            let held = usage.escrow_available(&key, limit);
            if meter.quantity > held {
                let retry = usage.rights_retry_ms();
                v.throttle_deny(
                    ReasonCode::QuotaRightsUnavailable,
                    format!("quotas[{}]", quota.id),
                    format!(
                        "strict quota {} has {} of {} {} left across the cluster, but this node holds rights to {held} and this request needs {}; rights move to nodes with demand, retry in {retry} ms",
                        quota.id,
                        limit.saturating_sub(used_before),
                        limit,
                        quota.metric,
                        meter.quantity
                    ),
                    retry,
                );
                v.decision
                    .effects
                    .starved
                    .push((key.clone(), meter.quantity));
            }
        }
        if after > limit && !is_report {
            let reset = resets_at_ms
                .map(|r| format!("; resets at {}", rfc3339(r)))
                .unwrap_or_default();
            let message = format!(
                "quota {} allows {} {} per {}; {used_before} used, this request needs {}{reset}",
                quota.id,
                limit,
                quota.metric,
                quota.window.as_str(),
                meter.quantity
            );
            let rule = format!("quotas[{}]", quota.id);
            match (quota.on_exceed, resets_at_ms) {
                (OnExceed::Throttle, Some(reset)) => {
                    let retry = u64::try_from(reset.saturating_sub(now_ms))
                        .unwrap_or(0)
                        .max(1);
                    v.throttle(ReasonCode::QuotaExceeded, rule, message, retry);
                }
                (OnExceed::Throttle | OnExceed::Deny | OnExceed::Escalate, None) => {
                    v.deny(ReasonCode::QuotaExceeded, rule, message);
                }
                (OnExceed::Deny | OnExceed::Escalate, Some(reset)) => {
                    v.deny(ReasonCode::QuotaExceeded, rule, message);
                    // The window reset is when a retry can succeed; `finish`
                    // keeps this hint only if quotas are all that denied.
                    let retry = u64::try_from(reset.saturating_sub(now_ms))
                        .unwrap_or(0)
                        .max(1);
                    let slot = v.decision.retry_after_ms.get_or_insert(0);
                    *slot = (*slot).max(retry);
                }
            }
            if v.decision.request_adjustment.is_none() {
                v.decision.request_adjustment = Some(AdjustmentHint {
                    license: license.id.clone(),
                    quota: quota.id.clone(),
                    message: format!(
                        "ask the license owner to raise quotas[{}].limit above {} {} per {}{reset}, or request an exception (POST /v1/exceptions)",
                        quota.id,
                        limit,
                        quota.metric,
                        quota.window.as_str()
                    ),
                });
            }
        }
        v.decision.quotas.push(QuotaStatus {
            quota: quota.id.clone(),
            metric: quota.metric.clone(),
            limit,
            used: used_before,
            remaining: limit.saturating_sub(used_before),
            resets_at_ms,
            scope: scope_label,
        });
        v.decision.effects.increments.push(Increment {
            key,
            by: meter.quantity,
            escrow,
        });
    }
}

/// Near the limit of a soft quota, each node takes at most half an even
/// share (among the nodes using the counter within the last second) of what
/// remained when it last pushed its usage to the others, so
/// nodes that have not heard of each other's last few ms cannot all spend
/// the same remainder: this bounds the overshoot when every node is busy.
/// The first use after a push always passes (if it fits), so the quota is
/// always used up, at worst at one use per node per push.
#[allow(clippy::too_many_arguments)]
fn near_limit_share(
    quota: &Quota,
    limit: u64,
    usage: &Usage,
    key: &CounterKey,
    used_before: u64,
    quantity: u64,
    now_ms: i64,
    v: &mut Verdict,
) {
    // Only the nodes using the counter right now share the remainder; a
    // node alone on it is not held back.
    let n = usage.active_nodes(key, now_ms);
    let margin = limit.div_ceil(crate::usage::NEAR_LIMIT_DIVISOR).max(1);
    if n <= 1 || used_before.saturating_add(quantity) <= limit.saturating_sub(margin) {
        return;
    }
    let unsynced = usage.own_unsynced(key);
    if unsynced == 0 {
        return;
    }
    let remaining_at_sync = limit.saturating_sub(used_before.saturating_sub(unsynced));
    let share = (remaining_at_sync / (2 * n)).max(1);
    if unsynced.saturating_add(quantity) > share {
        let retry = usage.rights_retry_ms();
        v.throttle_deny(
            ReasonCode::QuotaRightsUnavailable,
            format!("quotas[{}]", quota.id),
            format!(
                "quota {} is close to its limit ({} of {} {} used); near the limit each node takes at most a share of what remains between syncs with the others, and this node has used its share; retry in {retry} ms",
                quota.id, used_before, limit, quota.metric
            ),
            retry,
        );
    }
}

/// `prefix` followed by `value`, in one exact-size allocation (no `format!`
/// machinery on the allow path).
fn labelled(prefix: &str, value: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + value.len());
    out.push_str(prefix);
    out.push_str(value);
    out
}

fn finish(
    mut v: Verdict,
    license: Option<&License>,
    req: &CheckRequest,
    usage: &Usage,
) -> Decision {
    v.decision.outcome = if v.deny {
        Outcome::Deny
    } else if v.throttle {
        Outcome::Throttle
    } else {
        Outcome::Allow
    };
    let only_quota_denials = v.decision.reasons.iter().all(|r| {
        matches!(
            r.code,
            ReasonCode::QuotaExceeded | ReasonCode::QuotaRightsUnavailable
        )
    });
    let only_rights_denials = v
        .decision
        .reasons
        .iter()
        .all(|r| r.code == ReasonCode::QuotaRightsUnavailable);
    // A retry hint is honest only when waiting helps: a throttle, or a
    // denial by windowed quotas alone (not a revoked key or a wrong model).
    if !(v.decision.outcome == Outcome::Throttle
        || (v.decision.outcome == Outcome::Deny && only_quota_denials))
    {
        v.decision.retry_after_ms = None;
    }
    if v.decision.outcome != Outcome::Allow {
        // All or nothing: a request that is not allowed changes nothing,
        // except that demand refused only for lack of escrow rights is
        // recorded, so that rights move here.
        let starved = if only_rights_denials {
            std::mem::take(&mut v.decision.effects.starved)
        } else {
            Vec::new()
        };
        v.decision.effects = Effects {
            starved,
            ..Effects::default()
        };
        return v.decision;
    }
    let Some(license) = license else {
        return v.decision;
    };
    // The quotas `evaluate_quotas` resolved are exactly those with a meter,
    // in license order, matching `decision.quotas` and the increments
    // index for index.
    let touched = license
        .quotas
        .iter()
        .filter(|q| req.meters.iter().any(|m| m.metric == q.metric));
    // Alerts go to a governance webhook: without one there is nothing to
    // report, and no reason to look anything up.
    let alerting = license.webhook().is_some();
    let decision = &mut v.decision;
    for ((quota, status), inc) in touched
        .zip(decision.quotas.iter_mut())
        .zip(decision.effects.increments.iter())
    {
        let used_before = status.used;
        let after = used_before.saturating_add(inc.by);
        quota_warnings(
            quota,
            status.limit,
            used_before,
            after,
            &mut decision.warnings,
        );
        if alerting && !decision.dry_run {
            threshold_alerts(quota, status, &inc.key, after, usage, &mut decision.alerts);
        }
        status.used = after;
        status.remaining = status.limit.saturating_sub(after);
    }
    v.decision
}

/// Pushes the alert thresholds of `quota` that `after` reached and this
/// node has not reported for the counter `key` yet. Before the lowest
/// threshold this is a few comparisons; only once one is reached does it
/// look up what was reported.
fn threshold_alerts(
    quota: &Quota,
    status: &QuotaStatus,
    key: &crate::usage::CounterKey,
    after: u64,
    usage: &Usage,
    out: &mut Vec<ThresholdAlert>,
) {
    let limit = status.limit;
    if !quota
        .alert_thresholds
        .iter()
        .any(|t| after >= alerts::threshold_units(*t, limit))
    {
        return;
    }
    let reported = usage.alert_reported(key, limit);
    let (window_start_ms, window_end_ms) = quota.window.bounds(key.epoch);
    for (threshold, threshold_units) in
        alerts::thresholds_due(&quota.alert_thresholds, limit, after, reported)
    {
        out.push(ThresholdAlert {
            key: key.clone(),
            threshold,
            threshold_units,
            used: after,
            limit,
            metric: quota.metric.clone(),
            window_start_ms,
            window_end_ms,
        });
    }
}

/// Adds threshold and over-quota warnings for one quota of an allowed
/// decision, against the limit in force.
fn quota_warnings(
    quota: &Quota,
    limit: u64,
    used_before: u64,
    after: u64,
    warnings: &mut Vec<Warning>,
) {
    if after > limit {
        let mut message = String::new();
        let _ = write!(
            message,
            "quota {} is over its limit: {after} of {limit} {}",
            quota.id, quota.metric
        );
        warnings.push(Warning {
            code: "over_quota".to_string(),
            message,
        });
        return;
    }
    for t in &quota.alert_thresholds {
        let threshold = alerts::threshold_units(*t, limit);
        if used_before < threshold && after >= threshold {
            warnings.push(Warning {
                code: "threshold_crossed".to_string(),
                message: format!(
                    "quota {} crossed {}% ({after} of {limit} {})",
                    quota.id,
                    (t * 100.0).round(),
                    quota.metric
                ),
            });
        }
    }
}

/// Whether a planted bug turns the escrow check off (simulator builds
/// only; a constant `false` elsewhere).
#[inline(always)]
fn escrow_check_skipped() -> bool {
    crate::planted::COMPILED && crate::planted::skip_escrow_check()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApplyOutcome, ConfigCommand, ConfigOp};
    use crate::license::{Window, parse_documents};
    use crate::request::Meter;

    const MODEL: &str = "apiVersion: tollgate/v1
kind: Model
id: demo-classifier
versions:
  - { version: 1.4.0, released: 2025-03-01 }
  - { version: 2.0.0, released: 2026-01-15 }
  - { version: 2.1.0, released: 2026-06-01 }
";

    /// A config with the demo model and one license `t` (key `k`) whose
    /// extra YAML lines are `extra`; `models:` defaults to a `major: 2` grant.
    fn config(extra: &str) -> Config {
        let models = if extra.contains("models:") {
            ""
        } else {
            "models:\n  - { model: demo-classifier, versions: { major: 2 } }\n"
        };
        let text = format!(
            "{MODEL}---\napiVersion: tollgate/v1\nkind: License\nid: t\ncustomer: Test\nkeys: [{{key: k}}]\n{models}{extra}"
        );
        let mut config = Config::default();
        for (idx, doc) in parse_documents(&text).unwrap().into_iter().enumerate() {
            let op = ConfigOp::from(doc);
            let cmd = ConfigCommand {
                request_id: None,
                actor: "t".into(),
                reason: None,
                at_ms: 0,
                op,
            };
            assert!(matches!(
                config.apply(&cmd, idx as u64 + 1),
                ApplyOutcome::Applied { .. }
            ));
        }
        config
    }

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    /// Runs one Check (committing it) and asserts `expect`: `allow`, or
    /// `deny:<code>` / `throttle:<code>` naming one of the reasons.
    fn check(
        config: &Config,
        usage: &mut Usage,
        now: &str,
        edit: impl FnOnce(&mut CheckRequest),
        expect: &str,
    ) -> Decision {
        let mut req = CheckRequest::new("k", "demo-classifier", "2.1.0");
        req.meters.push(Meter {
            metric: "inferences".into(),
            quantity: 1,
        });
        edit(&mut req);
        let d = usage.check(config, &req, ms(now), "id".into());
        let got = match d.outcome {
            Outcome::Allow => "allow".to_string(),
            other => {
                let codes: Vec<&str> = d.reasons.iter().map(|r| r.code.as_str()).collect();
                let want = expect.split_once(':').map(|(_, c)| c).unwrap_or("");
                let code = codes
                    .iter()
                    .find(|c| **c == want)
                    .copied()
                    .unwrap_or(codes.first().copied().unwrap_or(""));
                format!("{}:{code}", other.as_str())
            }
        };
        assert_eq!(got, expect, "decision: {d:#?}");
        d
    }

    const NOW: &str = "2026-03-10T10:00:00Z";

    fn none(_: &mut CheckRequest) {}

    #[test]
    fn unknown_key() {
        let c = config("");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.key = "nope".into(),
            "deny:unknown_key",
        );
        check(&c, &mut Usage::new(1), NOW, none, "allow");
    }

    #[test]
    fn revoked() {
        check(
            &config("status: {revoked: {reason: fraud}}\n"),
            &mut Usage::new(1),
            NOW,
            none,
            "deny:license_revoked",
        );
        check(
            &config("status: revoked\n"),
            &mut Usage::new(1),
            NOW,
            none,
            "deny:license_revoked",
        );
        check(
            &config("status: active\n"),
            &mut Usage::new(1),
            NOW,
            none,
            "allow",
        );
    }

    #[test]
    fn suspended_until() {
        let c = config("status: {suspended: {reason: unpaid, until: 2026-04-01T00:00:00Z}}\n");
        check(&c, &mut Usage::new(1), NOW, none, "deny:license_suspended");
        check(
            &c,
            &mut Usage::new(1),
            "2026-04-02T00:00:00Z",
            none,
            "allow",
        );
    }

    #[test]
    fn validity_window() {
        let c = config("valid_from: 2026-01-01T00:00:00Z\nvalid_until: 2026-02-01T00:00:00Z\n");
        check(
            &c,
            &mut Usage::new(1),
            "2025-12-01T00:00:00Z",
            none,
            "deny:license_not_yet_valid",
        );
        check(
            &c,
            &mut Usage::new(1),
            "2026-01-15T00:00:00Z",
            none,
            "allow",
        );
        check(&c, &mut Usage::new(1), NOW, none, "deny:license_expired");
    }

    #[test]
    fn grace_period() {
        let c = config("valid_until: 2026-03-08T00:00:00Z\ngrace_period: 7d\n");
        let d = check(&c, &mut Usage::new(1), NOW, none, "allow");
        assert_eq!(d.warnings[0].code, "in_grace_period");
        assert!(
            d.warnings[0].message.contains("2026-03-15T00:00:00Z"),
            "{:?}",
            d.warnings
        );
        check(
            &c,
            &mut Usage::new(1),
            "2026-03-16T00:00:00Z",
            none,
            "deny:license_expired",
        );
    }

    #[test]
    fn model_major() {
        let c = config("");
        let d = check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model_version = "1.4.0".into(),
            "deny:model_version_not_allowed",
        );
        assert!(
            d.reasons[0]
                .message
                .contains("demo-classifier 2.x; requested 1.4.0"),
            "{}",
            d.reasons[0].message
        );
        assert_eq!(d.reasons[0].rule, "models[demo-classifier].versions");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model_version = "2.0.0".into(),
            "allow",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model = "other".into(),
            "deny:model_not_granted",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model_version = "two".into(),
            "deny:model_version_unknown",
        );
    }

    #[test]
    fn model_pin() {
        let c = config("models:\n  - { model: demo-classifier, versions: { pin: 2.0.0 } }\n");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model_version = "2.0.0".into(),
            "allow",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            none,
            "deny:model_version_not_allowed",
        );
    }

    #[test]
    fn model_maintenance_window() {
        let c = config(
            "models:\n  - { model: demo-classifier, versions: { maintenance_until: 2026-02-01 } }\n",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model_version = "2.0.0".into(),
            "allow",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            none,
            "deny:model_version_not_allowed",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model_version = "3.0.0".into(),
            "deny:model_version_unknown",
        );
    }

    #[test]
    fn model_rolling() {
        let c = config("models:\n  - { model: demo-classifier, versions: rolling }\n");
        check(&c, &mut Usage::new(1), NOW, none, "allow");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.model_version = "2.0.0".into(),
            "deny:model_version_not_allowed",
        );
    }

    #[test]
    fn feature() {
        let c = config("features: [summarize]\n");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.feature = Some("summarize".into()),
            "allow",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.feature = Some("translate".into()),
            "deny:feature_not_granted",
        );
    }

    #[test]
    fn environment() {
        let c = config("environments: [production]\n");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.environment = Some("production".into()),
            "allow",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.environment = Some("staging".into()),
            "deny:environment_not_allowed",
        );
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.environment = Some("moon".into()),
            "deny:environment_not_allowed",
        );
    }

    #[test]
    fn region_deny_glob() {
        let c = config("regions: { allow: [\"*\"], deny: [\"eu-*\"] }\n");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.region = Some("us-east-1".into()),
            "allow",
        );
        let d = check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.region = Some("eu-west-1".into()),
            "deny:region_not_allowed",
        );
        assert!(d.reasons[0].message.contains("eu-*"));
        check(&c, &mut Usage::new(1), NOW, none, "deny:region_not_allowed");
        let c = config("regions: { allow: [\"us-*\"] }\n");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.region = Some("ap-south-1".into()),
            "deny:region_not_allowed",
        );
    }

    #[test]
    fn device_limit() {
        let c = config("hardware: { max_devices: 2 }\n");
        let mut u = Usage::new(1);
        let dev = |id: &'static str| move |r: &mut CheckRequest| r.hardware_id = Some(id.into());
        check(&c, &mut u, NOW, dev("d1"), "allow");
        check(&c, &mut u, NOW, dev("d2"), "allow");
        check(&c, &mut u, NOW, dev("d3"), "deny:device_limit_reached");
        check(&c, &mut u, NOW, dev("d1"), "allow");
        check(&c, &mut u, NOW, none, "deny:device_not_allowed");
        assert_eq!(
            u.take_dirty_devices(),
            vec![("t".to_string(), vec!["d1".to_string(), "d2".to_string()])]
        );
        let c = config("hardware: { devices: [gpu-1] }\n");
        check(&c, &mut Usage::new(1), NOW, dev("gpu-1"), "allow");
        check(
            &c,
            &mut Usage::new(1),
            NOW,
            dev("gpu-2"),
            "deny:device_not_allowed",
        );
    }

    #[test]
    fn rate_limit() {
        let c = config("rate_limits: [{ id: burst, per_second: 1, burst: 2 }]\n");
        let mut u = Usage::new(1);
        check(&c, &mut u, NOW, none, "allow");
        check(&c, &mut u, NOW, none, "allow");
        let d = check(&c, &mut u, NOW, none, "throttle:rate_limited");
        assert_eq!(d.retry_after_ms, Some(1000));
        assert_eq!(d.reasons[0].rule, "rate_limits[burst]");
        check(&c, &mut u, "2026-03-10T10:00:01Z", none, "allow");
    }

    #[test]
    fn rate_limit_schedule_peak_vs_off_peak() {
        let c = config(
            "rate_limits:\n  - id: burst\n    per_second: 1\n    burst: 3\n    schedule:\n      timezone: Europe/Berlin\n      peak: { hours: \"08-20\", per_second: 1, burst: 1 }\n",
        );
        // 10:00Z is 11:00 in Berlin: peak, burst 1.
        let mut u = Usage::new(1);
        check(&c, &mut u, NOW, none, "allow");
        let d = check(&c, &mut u, NOW, none, "throttle:rate_limited");
        assert!(d.reasons[0].message.contains("peak hours"));
        // 21:00Z is 22:00 in Berlin: off-peak, burst 3.
        let mut u = Usage::new(1);
        let night = "2026-03-10T21:00:00Z";
        for _ in 0..3 {
            check(&c, &mut u, night, none, "allow");
        }
        check(&c, &mut u, night, none, "throttle:rate_limited");
    }

    #[test]
    fn quota_five_per_day() {
        let c = config("quotas: [{ id: daily, metric: inferences, limit: 5, window: day }]\n");
        let mut u = Usage::new(1);
        for i in 1..=5 {
            let d = check(&c, &mut u, NOW, none, "allow");
            assert_eq!((d.quotas[0].used, d.quotas[0].remaining), (i, 5 - i));
        }
        let d = check(&c, &mut u, NOW, none, "deny:quota_exceeded");
        assert_eq!(d.quotas[0].remaining, 0);
        assert_eq!(d.quotas[0].used, 5);
        assert_eq!(d.quotas[0].resets_at_ms, Some(ms("2026-03-11T00:00:00Z")));
        let until_reset = ms("2026-03-11T00:00:00Z") - ms(NOW);
        assert_eq!(d.retry_after_ms, u64::try_from(until_reset).ok());
        assert_eq!(d.reasons[0].rule, "quotas[daily]");
        let hint = d.request_adjustment.expect("hint");
        assert_eq!((hint.license.as_str(), hint.quota.as_str()), ("t", "daily"));
        assert!(d.effects.increments.is_empty());
        check(&c, &mut u, "2026-03-11T00:00:00Z", none, "allow");
    }

    #[test]
    fn quota_throttle_until_reset() {
        let c = config(
            "quotas: [{ id: hourly, metric: inferences, limit: 1, window: hour, on_exceed: throttle }]\n",
        );
        let mut u = Usage::new(1);
        check(&c, &mut u, "2026-03-10T10:59:00Z", none, "allow");
        let d = check(
            &c,
            &mut u,
            "2026-03-10T10:59:00Z",
            none,
            "throttle:quota_exceeded",
        );
        assert_eq!(d.retry_after_ms, Some(60_000));
    }

    #[test]
    fn month_window_resets() {
        let c = config("quotas: [{ id: monthly, metric: inferences, limit: 2, window: month }]\n");
        let mut u = Usage::new(1);
        let end_of_jan = "2026-01-31T23:00:00Z";
        check(&c, &mut u, end_of_jan, none, "allow");
        check(&c, &mut u, end_of_jan, none, "allow");
        let d = check(&c, &mut u, end_of_jan, none, "deny:quota_exceeded");
        assert_eq!(d.quotas[0].resets_at_ms, Some(ms("2026-02-01T00:00:00Z")));
        check(&c, &mut u, "2026-02-01T00:00:00Z", none, "allow");
        // January's counter outlives its window by the grace, still taking
        // peers' late usage, then GC drops it.
        let feb = ms("2026-02-01T00:00:00Z");
        assert!(u.gc(&c, feb).is_empty());
        let grace = crate::usage::CLOSED_WINDOW_GRACE_MS;
        assert!(u.gc(&c, feb + grace - 1).is_empty());
        let removed = u.gc(&c, feb + grace);
        assert_eq!(removed.len(), 1);
        assert_eq!(u.n_counters(), 1);
    }

    #[test]
    fn subject_scope_counts_separately() {
        let c = config(
            "quotas: [{ id: per-user, metric: inferences, limit: 1, window: day, scope: subject }]\n",
        );
        let mut u = Usage::new(1);
        let who = |s: &'static str| move |r: &mut CheckRequest| r.subject = Some(s.into());
        check(&c, &mut u, NOW, who("alice"), "allow");
        let d = check(&c, &mut u, NOW, who("alice"), "deny:quota_exceeded");
        assert_eq!(d.quotas[0].scope, "subject:alice");
        check(&c, &mut u, NOW, who("bob"), "allow");
    }

    #[test]
    fn threshold_warning() {
        let c = config(
            "quotas: [{ id: daily, metric: inferences, limit: 10, window: day, alert_thresholds: [0.5] }]\n",
        );
        let mut u = Usage::new(1);
        for _ in 0..4 {
            assert!(check(&c, &mut u, NOW, none, "allow").warnings.is_empty());
        }
        let d = check(&c, &mut u, NOW, none, "allow");
        assert_eq!(d.warnings[0].code, "threshold_crossed");
        assert!(check(&c, &mut u, NOW, none, "allow").warnings.is_empty());
    }

    #[test]
    fn multi_meter_all_or_nothing() {
        let c = config(
            "quotas:\n  - { id: calls, metric: inferences, limit: 10, window: day }\n  - { id: toks, metric: tokens, limit: 100, window: day }\n",
        );
        let mut u = Usage::new(1);
        let d = check(
            &c,
            &mut u,
            NOW,
            |r| {
                r.meters.push(Meter {
                    metric: "tokens".into(),
                    quantity: 200,
                })
            },
            "deny:quota_exceeded",
        );
        assert_eq!(d.quotas.len(), 2);
        assert_eq!(u.n_counters(), 0);
        let d = check(
            &c,
            &mut u,
            NOW,
            |r| {
                r.meters.push(Meter {
                    metric: "tokens".into(),
                    quantity: 50,
                })
            },
            "allow",
        );
        assert_eq!(
            d.quotas.iter().map(|q| q.used).collect::<Vec<_>>(),
            vec![1, 50]
        );
    }

    #[test]
    fn report_records_past_the_limit() {
        let c = config("quotas: [{ id: daily, metric: inferences, limit: 1, window: day }]\n");
        let mut u = Usage::new(1);
        let mut req = CheckRequest::new("k", "demo-classifier", "2.1.0");
        req.meters.push(Meter {
            metric: "inferences".into(),
            quantity: 3,
        });
        let d = u.report(&c, &req, ms(NOW), "r".into());
        assert_eq!(d.outcome, Outcome::Allow);
        assert_eq!(d.quotas[0].used, 3);
        assert_eq!(d.warnings[0].code, "over_quota");
        let dirty = u.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].1.value(), 3);
        assert!(u.take_dirty().is_empty());
        req.key = "nope".into();
        assert_eq!(
            u.report(&c, &req, ms(NOW), "r".into()).outcome,
            Outcome::Deny
        );
    }

    #[test]
    fn dry_run_changes_nothing() {
        let c = config(
            "quotas: [{ id: daily, metric: inferences, limit: 1, window: day }]\nhardware: { max_devices: 1 }\n",
        );
        let mut u = Usage::new(1);
        let before = u.clone();
        let d = check(
            &c,
            &mut u,
            NOW,
            |r| {
                r.dry_run = true;
                r.hardware_id = Some("d".into());
            },
            "allow",
        );
        assert!(d.dry_run);
        assert_eq!(u, before);
    }

    #[test]
    fn every_failing_rule_is_reported() {
        let c = config("status: revoked\nenvironments: [production]\n");
        let d = check(
            &c,
            &mut Usage::new(1),
            NOW,
            |r| r.environment = Some("staging".into()),
            "deny:license_revoked",
        );
        let codes: Vec<&str> = d.reasons.iter().map(|r| r.code.as_str()).collect();
        assert_eq!(codes, vec!["license_revoked", "environment_not_allowed"]);
    }

    const DATASETS: &str = "apiVersion: tollgate/v1
kind: Dataset
id: web-reviews
releases:
  - { version: \"2025.1\", source: licensed-vendor, categories: [copyrighted], license: CC-BY-4.0 }
---
apiVersion: tollgate/v1
kind: Dataset
id: clinical-notes
releases:
  - { version: v2, source: hospital-ehr, categories: [pii], license: LicenseRef-hospital-dua }
  - { version: v3, source: hospital-ehr, categories: [pii, medical], license: LicenseRef-hospital-dua }
---
apiVersion: tollgate/v1
kind: Dataset
id: crm-customers
releases:
  - { version: \"2026-01\", source: internal-crm, categories: [pii], license: LicenseRef-internal }
";

    /// `config(extra)` plus the three datasets above.
    fn lineage_config(extra: &str) -> Config {
        let mut c = config(extra);
        for doc in parse_documents(DATASETS).unwrap() {
            let cmd = ConfigCommand {
                request_id: None,
                actor: "t".into(),
                reason: None,
                at_ms: 0,
                op: ConfigOp::from(doc),
            };
            let next = c.version + 1;
            assert!(matches!(c.apply(&cmd, next), ApplyOutcome::Applied { .. }));
        }
        c
    }

    /// Sets the request's lineage to `entries` (`dataset@release`).
    fn lineage(entries: &[&str]) -> impl FnOnce(&mut CheckRequest) {
        let entries: Vec<crate::request::LineageEntry> = entries
            .iter()
            .map(|e| {
                let (dataset, release) = e.split_once('@').unwrap();
                crate::request::LineageEntry {
                    dataset: dataset.into(),
                    release: release.into(),
                }
            })
            .collect();
        move |r: &mut CheckRequest| r.lineage = entries
    }

    /// The reason with `code` whose message names every fragment of `named`.
    fn reason_naming<'a>(d: &'a Decision, code: ReasonCode, named: &[&str]) -> &'a Reason {
        d.reasons
            .iter()
            .find(|r| r.code == code && named.iter().all(|n| r.message.contains(n)))
            .unwrap_or_else(|| panic!("no {code:?} reason naming {named:?}: {:#?}", d.reasons))
    }

    #[test]
    fn a_denied_category_names_dataset_release_and_category() {
        let c = lineage_config("datasets: { denied_categories: [medical, biometric] }\n");
        let mut u = Usage::new(1);
        let d = check(
            &c,
            &mut u,
            NOW,
            lineage(&["web-reviews@2025.1", "clinical-notes@v3"]),
            "deny:dataset_category_denied",
        );
        let r = reason_naming(
            &d,
            ReasonCode::DatasetCategoryDenied,
            &["clinical-notes", "v3", "medical"],
        );
        assert_eq!(r.rule, "datasets.denied_categories");
        assert_eq!(d.reasons.len(), 1, "{d:#?}");
        assert!(d.effects.lineage.is_empty() && d.effects.increments.is_empty());
        // The release before medical notes were added is fine.
        check(&c, &mut u, NOW, lineage(&["clinical-notes@v2"]), "allow");
    }

    #[test]
    fn a_forbidden_combination_is_denied_but_each_part_alone_is_not() {
        let c = lineage_config(
            "datasets: { forbidden_combinations: [[clinical-notes, crm-customers], [web-reviews, x, y]] }\n",
        );
        let mut u = Usage::new(1);
        let d = check(
            &c,
            &mut u,
            NOW,
            lineage(&[
                "crm-customers@2026-01",
                "web-reviews@2025.1",
                "clinical-notes@v2",
            ]),
            "deny:dataset_combination_forbidden",
        );
        let r = reason_naming(
            &d,
            ReasonCode::DatasetCombinationForbidden,
            &["clinical-notes + crm-customers"],
        );
        assert_eq!(r.rule, "datasets.forbidden_combinations[0]");
        assert_eq!(d.reasons.len(), 1, "{d:#?}");
        check(
            &c,
            &mut u,
            NOW,
            lineage(&["crm-customers@2026-01"]),
            "allow",
        );
        check(
            &c,
            &mut u,
            NOW,
            lineage(&["clinical-notes@v2", "web-reviews@2025.1"]),
            "allow",
        );
    }

    #[test]
    fn sources_must_be_allowed() {
        let c = lineage_config("datasets: { allowed_sources: [licensed-vendor, internal-crm] }\n");
        let mut u = Usage::new(1);
        let d = check(
            &c,
            &mut u,
            NOW,
            lineage(&["clinical-notes@v2"]),
            "deny:dataset_source_not_allowed",
        );
        let r = reason_naming(
            &d,
            ReasonCode::DatasetSourceNotAllowed,
            &["clinical-notes", "v2", "hospital-ehr"],
        );
        assert_eq!(r.rule, "datasets.allowed_sources");
        check(
            &c,
            &mut u,
            NOW,
            lineage(&["web-reviews@2025.1", "crm-customers@2026-01"]),
            "allow",
        );
    }

    #[test]
    fn lineage_required() {
        let c = lineage_config("datasets: { require_lineage: true }\n");
        let mut u = Usage::new(1);
        let d = check(&c, &mut u, NOW, none, "deny:lineage_required");
        assert_eq!(d.reasons[0].rule, "datasets.require_lineage");
        check(&c, &mut u, NOW, lineage(&["web-reviews@2025.1"]), "allow");
        // Without the clause, no lineage is fine.
        check(&lineage_config(""), &mut u, NOW, none, "allow");
    }

    #[test]
    fn lineage_must_name_registered_releases_under_any_license() {
        for extra in ["", "datasets: { denied_categories: [genetic] }\n"] {
            let c = lineage_config(extra);
            let mut u = Usage::new(1);
            let d = check(
                &c,
                &mut u,
                NOW,
                lineage(&["nope@1", "clinical-notes@v9"]),
                "deny:dataset_unknown",
            );
            assert_eq!(
                reason_naming(&d, ReasonCode::DatasetUnknown, &["nope"]).rule,
                "lineage[0]"
            );
            let r = reason_naming(
                &d,
                ReasonCode::DatasetReleaseUnknown,
                &["clinical-notes", "v9", "v2, v3"],
            );
            assert_eq!(r.rule, "lineage[1]");
        }
    }

    #[test]
    fn only_allowed_uses_add_lineage_edges() {
        let c = lineage_config(
            "datasets: { denied_categories: [medical] }\nquotas: [{ id: daily, metric: inferences, limit: 2, window: day }]\n",
        );
        let mut u = Usage::new(1);
        let feed = ["web-reviews@2025.1", "clinical-notes@v2"];
        let d = check(&c, &mut u, NOW, lineage(&feed), "allow");
        assert_eq!(d.effects.lineage.len(), 3);
        // A dry run, a denied dataset and a denied quota add nothing.
        check(
            &c,
            &mut u,
            NOW,
            |r| {
                r.dry_run = true;
                r.lineage = vec![crate::request::LineageEntry {
                    dataset: "web-reviews".into(),
                    release: "2025.1".into(),
                }];
            },
            "allow",
        );
        check(
            &c,
            &mut u,
            NOW,
            lineage(&["clinical-notes@v3"]),
            "deny:dataset_category_denied",
        );
        check(&c, &mut u, NOW, lineage(&["web-reviews@2025.1"]), "allow");
        check(
            &c,
            &mut u,
            NOW,
            lineage(&["web-reviews@2025.1"]),
            "deny:quota_exceeded",
        );
        // Without lineage, no edge.
        check(&c, &mut Usage::new(1), NOW, none, "allow");
        let g = u.lineage_graph("t");
        assert_eq!(g.model_versions.len(), 1);
        let v = &g.model_versions[0];
        assert_eq!(
            (v.model.as_str(), v.version.as_str(), v.count),
            ("demo-classifier", "2.1.0", 2)
        );
        let datasets: Vec<(&str, &str, u64)> = v
            .datasets
            .iter()
            .map(|d| (d.dataset.as_str(), d.release.as_str(), d.count))
            .collect();
        assert_eq!(
            datasets,
            vec![("clinical-notes", "v2", 1), ("web-reviews", "2025.1", 2)]
        );
        // Lineage counters live as long as the license: GC keeps them.
        assert!(
            u.gc(&c, ms(NOW) + 40 * 86_400_000)
                .iter()
                .all(|k| k.quota != crate::lineage::LINEAGE_QUOTA)
        );
        assert_eq!(u.lineage_graph("t"), g);
    }

    #[test]
    fn every_reason_code_has_its_own_slot_and_name() {
        for (i, code) in ReasonCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i, "{code:?}");
        }
        let mut names: Vec<&str> = ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ReasonCode::ALL.len());
    }

    /// Applies `op` to `c` as `actor` with `reason` at `at`, asserting it applies.
    fn apply(c: &mut Config, op: ConfigOp, actor: &str, reason: Option<&str>, at: &str) -> u64 {
        let index = c.version + 1;
        let cmd = ConfigCommand {
            request_id: None,
            actor: actor.into(),
            reason: reason.map(str::to_string),
            at_ms: ms(at),
            op,
        };
        let out = c.apply(&cmd, index);
        assert_eq!(out, ApplyOutcome::Applied { version: index });
        index
    }

    #[test]
    fn an_approved_exception_raises_the_limit_until_it_ends() {
        let mut c = config("quotas: [{ id: daily, metric: inferences, limit: 2, window: day }]\n");
        let mut u = Usage::new(1);
        check(&c, &mut u, NOW, none, "allow");
        check(&c, &mut u, NOW, none, "allow");
        check(&c, &mut u, NOW, none, "deny:quota_exceeded");
        let request = ConfigOp::RequestException {
            license_id: "t".into(),
            quota_id: "daily".into(),
            amount: 3,
            requested_until_ms: None,
        };
        let version = apply(&mut c, request, "key:dev", Some("launch day"), NOW);
        let id = crate::governance::exception_id(version);
        // Pending changes nothing.
        check(&c, &mut u, NOW, none, "deny:quota_exceeded");
        let until = "2026-03-10T12:00:00Z";
        let approve = ConfigOp::ApproveException {
            id: id.clone(),
            until_ms: ms(until),
        };
        apply(&mut c, approve, "ops", Some("ok for launch"), NOW);
        for used in 3..=5 {
            let d = check(&c, &mut u, NOW, none, "allow");
            assert_eq!((d.quotas[0].limit, d.quotas[0].used), (5, used));
        }
        check(&c, &mut u, NOW, none, "deny:quota_exceeded");
        // The last millisecond in force, then the limit is back.
        let last = "2026-03-10T11:59:59.999Z";
        let d = check(&c, &mut u, last, none, "deny:quota_exceeded");
        assert_eq!(d.quotas[0].limit, 5);
        let d = check(&c, &mut u, until, none, "deny:quota_exceeded");
        assert_eq!(d.quotas[0].limit, 2);
        assert!(
            c.exception(&id)
                .is_some_and(|e| e.state_at(ms(until)) == "expired")
        );
        // A node records the end; the record changes no decision, even one
        // made (by a node whose clock is behind) before the end.
        apply(
            &mut c,
            ConfigOp::ExpireException { id: id.clone() },
            "node-1",
            None,
            until,
        );
        let d = check(
            &c,
            &mut u,
            last,
            |r| r.dry_run = true,
            "deny:quota_exceeded",
        );
        assert_eq!(d.quotas[0].limit, 5);
        // Every step is in the license's history, with actor and reason.
        let records: Vec<(String, Option<String>, &str)> = c
            .license_history("t")
            .iter()
            .filter_map(|r| {
                let kind = match &r.action {
                    crate::history::ChangeAction::ExceptionRequested { .. } => "requested",
                    crate::history::ChangeAction::ExceptionApproved { .. } => "approved",
                    crate::history::ChangeAction::ExceptionExpired { .. } => "expired",
                    _ => return None,
                };
                Some((r.actor.clone(), r.reason.clone(), kind))
            })
            .collect();
        assert_eq!(
            records,
            vec![
                ("key:dev".into(), Some("launch day".into()), "requested"),
                ("ops".into(), Some("ok for launch".into()), "approved"),
                ("node-1".into(), None, "expired"),
            ]
        );
        let records = c.license_history("t");
        let approved = &records[records.len() - 2];
        let paths: Vec<&str> = approved.diff.iter().map(|d| d.path.as_str()).collect();
        assert!(
            paths.contains(&format!("exceptions.{id}.status").as_str()),
            "{paths:?}"
        );
    }

    #[test]
    fn a_rejected_exception_changes_no_limit_and_needs_a_reason() {
        let mut c = config("quotas: [{ id: daily, metric: inferences, limit: 1, window: day }]\n");
        let request = ConfigOp::RequestException {
            license_id: "t".into(),
            quota_id: "daily".into(),
            amount: 3,
            requested_until_ms: None,
        };
        let id = crate::governance::exception_id(apply(&mut c, request, "ops", Some("x"), NOW));
        let reject = ConfigOp::RejectException { id: id.clone() };
        let cmd = ConfigCommand {
            request_id: None,
            actor: "ops".into(),
            reason: None,
            at_ms: ms(NOW),
            op: reject.clone(),
        };
        let next = c.version + 1;
        assert!(matches!(c.apply(&cmd, next), ApplyOutcome::Rejected { .. }));
        apply(&mut c, reject, "ops", Some("not this month"), NOW);
        let approve = ConfigOp::ApproveException {
            id,
            until_ms: ms("2026-03-11T00:00:00Z"),
        };
        let cmd = ConfigCommand {
            request_id: None,
            actor: "ops".into(),
            reason: None,
            at_ms: ms(NOW),
            op: approve,
        };
        let next = c.version + 1;
        assert!(
            matches!(c.apply(&cmd, next), ApplyOutcome::Rejected { .. }),
            "decided once"
        );
        let mut u = Usage::new(1);
        check(&c, &mut u, NOW, none, "allow");
        check(&c, &mut u, NOW, none, "deny:quota_exceeded");
    }

    const GOVERNED: &str =
        "governance: { owner: ops@example.com, webhook: http://127.0.0.1:9/hook }\n";

    #[test]
    fn each_alert_threshold_is_reported_once_per_window_and_limit() {
        let c = config(&format!(
            "{GOVERNED}quotas: [{{ id: daily, metric: inferences, limit: 4, window: day, alert_thresholds: [0.5, 1.0] }}]\n"
        ));
        let mut u = Usage::new(1);
        let reported = |d: &Decision| -> Vec<(f64, u64)> {
            d.alerts.iter().map(|a| (a.threshold, a.used)).collect()
        };
        let d = check(&c, &mut u, NOW, none, "allow");
        assert!(d.alerts.is_empty());
        let d = check(&c, &mut u, NOW, none, "allow");
        assert_eq!(reported(&d), vec![(0.5, 2)]);
        assert_eq!(d.alerts[0].event_key(), d.alerts[0].clone().event_key());
        let d = check(&c, &mut u, NOW, none, "allow");
        assert!(d.alerts.is_empty(), "0.5 was reported");
        let d = check(&c, &mut u, NOW, none, "allow");
        assert_eq!(reported(&d), vec![(1.0, 4)]);
        let d = check(&c, &mut u, NOW, none, "deny:quota_exceeded");
        assert!(d.alerts.is_empty());
        // A new window re-arms every threshold.
        let tomorrow = "2026-03-11T10:00:00Z";
        check(&c, &mut u, tomorrow, none, "allow");
        let d = check(&c, &mut u, tomorrow, none, "allow");
        assert_eq!(reported(&d), vec![(0.5, 2)]);
        assert_eq!(d.alerts[0].window_start_ms, ms("2026-03-11T00:00:00Z"));
        // A dry run reports nothing and marks nothing.
        let d = check(&c, &mut u, tomorrow, |r| r.dry_run = true, "allow");
        assert!(d.alerts.is_empty());
    }

    #[test]
    fn alerts_need_a_webhook_and_a_jump_reports_every_threshold_passed() {
        let quotas = "quotas: [{ id: daily, metric: inferences, limit: 10, window: day, alert_thresholds: [0.5, 0.8] }]\n";
        let c = config(quotas);
        let mut u = Usage::new(1);
        let d = check(&c, &mut u, NOW, |r| r.meters[0].quantity = 9, "allow");
        assert!(d.alerts.is_empty(), "no webhook, no alerts");
        assert_eq!(d.warnings.len(), 2, "the warnings still say so");
        let c = config(&format!("{GOVERNED}{quotas}"));
        let mut u = Usage::new(1);
        let d = check(&c, &mut u, NOW, |r| r.meters[0].quantity = 9, "allow");
        let units: Vec<u64> = d.alerts.iter().map(|a| a.threshold_units).collect();
        assert_eq!(units, vec![5, 8]);
    }

    #[test]
    fn escalate_denies_like_deny_and_names_the_violation() {
        let c = config(&format!(
            "{GOVERNED}quotas: [{{ id: daily, metric: inferences, limit: 1, window: day, on_exceed: escalate }}]\n"
        ));
        let mut u = Usage::new(1);
        let d = check(&c, &mut u, NOW, none, "allow");
        let license = c.license("t").expect("license");
        assert!(crate::alerts::escalations(license, &d, ms(NOW)).is_empty());
        let d = check(&c, &mut u, NOW, none, "deny:quota_exceeded");
        assert!(d.retry_after_ms.is_some(), "the window reset helps");
        let triggers = crate::alerts::escalations(license, &d, ms(NOW));
        assert_eq!(triggers.len(), 1);
        assert_eq!(triggers[0].rule, "quotas[daily]");
        assert_eq!(triggers[0].window_epoch, Window::Day.epoch(ms(NOW)));
    }

    #[test]
    fn escalations_open_once_per_rule_and_window_and_move_forward_only() {
        let mut c = config(&format!(
            "{GOVERNED}quotas: [{{ id: daily, metric: inferences, limit: 1, window: day, on_exceed: escalate }}]\n"
        ));
        let open = |epoch| ConfigOp::OpenEscalation {
            license_id: "t".into(),
            rule: "quotas[daily]".into(),
            window_epoch: epoch,
        };
        let version = apply(&mut c, open(7), "node-1", None, NOW);
        apply(&mut c, open(7), "node-2", None, NOW);
        apply(&mut c, open(8), "node-2", None, NOW);
        let records: Vec<&crate::governance::Escalation> = c.escalations().collect();
        assert_eq!(records.len(), 2, "one per window");
        let first = c
            .escalation(&crate::governance::escalation_id("t", "quotas[daily]", 7))
            .expect("opened");
        assert_eq!(
            (first.version, first.opened_by.as_str()),
            (version, "node-1")
        );
        assert_eq!(first.owner, "ops@example.com");
        // The deadline follows from when the command was stamped and the
        // license's default of a day, the same on every replica.
        assert_eq!(first.opened_at_ms, ms(NOW));
        assert_eq!(first.deadline_ms, ms(NOW) + 24 * 3_600_000);
        let id = first.id.clone();
        apply(
            &mut c,
            ConfigOp::AcknowledgeEscalation { id: id.clone() },
            "ops",
            None,
            NOW,
        );
        apply(
            &mut c,
            ConfigOp::ResolveEscalation { id: id.clone() },
            "ops",
            Some("raised the plan"),
            NOW,
        );
        let done = c.escalation(&id).expect("kept");
        assert_eq!(done.status, crate::governance::EscalationStatus::Resolved);
        assert_eq!(done.resolution.as_deref(), Some("raised the plan"));
        let again = ConfigCommand {
            request_id: None,
            actor: "ops".into(),
            reason: None,
            at_ms: 0,
            op: ConfigOp::AcknowledgeEscalation { id },
        };
        let next = c.version + 1;
        assert!(matches!(
            c.apply(&again, next),
            ApplyOutcome::Rejected { .. }
        ));
        // A quota that does not escalate cannot be escalated.
        let wrong = ConfigCommand {
            request_id: None,
            actor: "node-1".into(),
            reason: None,
            at_ms: 0,
            op: ConfigOp::OpenEscalation {
                license_id: "t".into(),
                rule: "quotas[nope]".into(),
                window_epoch: 7,
            },
        };
        let next = c.version + 1;
        assert!(matches!(
            c.apply(&wrong, next),
            ApplyOutcome::Rejected { .. }
        ));
    }

    #[test]
    fn pending_exceptions_per_license_are_bounded() {
        let mut c = config("quotas: [{ id: daily, metric: inferences, limit: 1, window: day }]\n");
        let request = || ConfigOp::RequestException {
            license_id: "t".into(),
            quota_id: "daily".into(),
            amount: 1,
            requested_until_ms: None,
        };
        for _ in 0..crate::governance::MAX_PENDING_EXCEPTIONS_PER_LICENSE {
            apply(&mut c, request(), "key:dev", Some("more"), NOW);
        }
        let cmd = ConfigCommand {
            request_id: None,
            actor: "key:dev".into(),
            reason: Some("more".into()),
            at_ms: 0,
            op: request(),
        };
        let next = c.version + 1;
        assert!(matches!(c.apply(&cmd, next), ApplyOutcome::Rejected { .. }));
        // Unknown quota, zero amount: rejected, nothing recorded.
        let n_records = c.license_history("t").len();
        for op in [
            ConfigOp::RequestException {
                license_id: "t".into(),
                quota_id: "nope".into(),
                amount: 1,
                requested_until_ms: None,
            },
            ConfigOp::RequestException {
                license_id: "t".into(),
                quota_id: "daily".into(),
                amount: 0,
                requested_until_ms: None,
            },
        ] {
            let cmd = ConfigCommand {
                request_id: None,
                actor: "ops".into(),
                reason: Some("x".into()),
                at_ms: 0,
                op,
            };
            let next = c.version + 1;
            assert!(matches!(c.apply(&cmd, next), ApplyOutcome::Rejected { .. }));
        }
        assert_eq!(c.license_history("t").len(), n_records);
    }
}
