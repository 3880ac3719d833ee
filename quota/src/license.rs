//! The license document schema (`apiVersion: tollgate/v1`), parsing and validation.
//!
//! This module owns the shapes of `kind: License` and `kind: Model` documents,
//! the parsing of every document kind from YAML/JSON (`kind: Dataset` has
//! its shapes in [`crate::dataset`]) and the semantic checks that serde
//! cannot express.
//! Every error names the field path (`quotas[0].limit: ...`). Plain keys are
//! accepted only as input and hashed during deserialization, so a parsed
//! [`License`] never holds key material. This module must not evaluate
//! requests (that is `decision`) nor read the clock.
//!
//! Vocabulary follows ODRL (permissions such as `models`, `features`,
//! `environments`; prohibitions such as `regions.deny`) and Keygen policies
//! (`max_devices`, `valid_until` expiry, `grace_period`).

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::dataset::{Dataset, DatasetConstraints};
use crate::keys;

/// The only supported `apiVersion`.
pub const API_VERSION: &str = "tollgate/v1";
/// Longest allowed id (license, model, quota, rate limit, key id).
pub const MAX_ID_LEN: usize = 64;
/// Longest allowed free-text field (customer, tier, feature, device id).
pub const MAX_TEXT_LEN: usize = 256;
/// Bound on list lengths in a document, so one document cannot bloat the config.
pub const MAX_LIST_LEN: usize = 1024;

/// A semantic or syntax error in a document, with the path of the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    /// Field path such as `quotas[0].limit`; `document` for whole-document errors.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

impl ValidationError {
    /// Builds an error for `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A parsed document.
// Unboxed on purpose: documents are parsed on the admin path only.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Document {
    /// A `kind: License` document.
    License(License),
    /// A `kind: Model` document.
    Model(Model),
    /// A `kind: Dataset` document.
    Dataset(Dataset),
}

impl Document {
    /// The document's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Document::License(_) => "License",
            Document::Model(_) => "Model",
            Document::Dataset(_) => "Dataset",
        }
    }

    /// The document's id.
    pub fn id(&self) -> &str {
        match self {
            Document::License(l) => &l.id,
            Document::Model(m) => &m.id,
            Document::Dataset(d) => &d.id,
        }
    }
}

/// The `apiVersion` marker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiVersion {
    /// `tollgate/v1`.
    #[default]
    #[serde(rename = "tollgate/v1")]
    V1,
}

/// The `kind: License` marker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LicenseKind {
    /// `License`.
    #[default]
    License,
}

/// The `kind: Model` marker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelKind {
    /// `Model`.
    #[default]
    Model,
}

/// A registered model and its released versions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Always `tollgate/v1`.
    #[serde(rename = "apiVersion", default)]
    pub api_version: ApiVersion,
    /// Always `Model`.
    #[serde(default)]
    pub kind: ModelKind,
    /// Model id, `[a-z0-9._-]{1,64}`.
    pub id: String,
    /// Released versions.
    pub versions: Vec<ModelVersion>,
}

/// One released version of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelVersion {
    /// Semantic version.
    pub version: semver::Version,
    /// Release date (UTC calendar date).
    pub released: NaiveDate,
}

impl Model {
    /// The highest registered version (by semver precedence), if any.
    pub fn latest(&self) -> Option<&ModelVersion> {
        self.versions
            .iter()
            .max_by(|a, b| a.version.cmp(&b.version))
    }

    /// The registered entry for `version`, if any.
    pub fn find(&self, version: &semver::Version) -> Option<&ModelVersion> {
        self.versions.iter().find(|v| &v.version == version)
    }

    /// Semantic checks serde cannot express.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("id", &self.id)?;
        if self.versions.is_empty() {
            return Err(ValidationError::new(
                "versions",
                "must list at least one version",
            ));
        }
        if self.versions.len() > MAX_LIST_LEN {
            return Err(ValidationError::new(
                "versions",
                format!("at most {MAX_LIST_LEN} entries"),
            ));
        }
        let mut seen = HashSet::new();
        for (idx, v) in self.versions.iter().enumerate() {
            if !seen.insert(&v.version) {
                return Err(ValidationError::new(
                    format!("versions[{idx}].version"),
                    format!("duplicate version {}", v.version),
                ));
            }
        }
        Ok(())
    }
}

/// A license: who may use which models, where, and how much.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct License {
    /// Always `tollgate/v1`.
    #[serde(rename = "apiVersion", default)]
    pub api_version: ApiVersion,
    /// Always `License`.
    #[serde(default)]
    pub kind: LicenseKind,
    /// License id, `[a-z0-9._-]{1,64}`.
    pub id: String,
    /// Customer display name.
    pub customer: String,
    /// Commercial tier label (informational).
    #[serde(default)]
    pub tier: String,
    /// Lifecycle status.
    #[serde(default)]
    pub status: LicenseStatus,
    /// Not valid before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<DateTime<Utc>>,
    /// Expires at this instant (then the grace period runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
    /// How long use stays allowed (with a warning) after `valid_until`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "grace_period"
    )]
    pub grace_period: Option<HumaneDuration>,
    /// API keys, stored as SHA-256 hashes only.
    #[serde(default)]
    pub keys: Vec<StoredKey>,
    /// Model grants (ODRL permissions on assets).
    #[serde(default)]
    pub models: Vec<ModelGrant>,
    /// Allowed features; empty means any feature.
    #[serde(default)]
    pub features: Vec<String>,
    /// Allowed environments; absent means all four.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<Vec<Environment>>,
    /// Region allow/deny globs; absent means anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<RegionRules>,
    /// Hardware binding.
    #[serde(default)]
    pub hardware: HardwareRules,
    /// Usage quotas.
    #[serde(default)]
    pub quotas: Vec<Quota>,
    /// Per-node token-bucket rate limits.
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    /// Concurrently running instances (seats) allowed across the whole
    /// cluster; 0 or absent means unlimited. Held globally by escrow.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_instances: u32,
    /// How long a seat lease lasts without renewal (default 60s).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "seat_lease_ttl"
    )]
    pub seat_lease_ttl: Option<HumaneDuration>,
    /// Dataset constraints on the lineage of each use; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datasets: Option<DatasetConstraints>,
    /// Who answers for the license, and where its alerts and escalations go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governance: Option<Governance>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Seat lease length when a license names none.
pub const DEFAULT_SEAT_LEASE_TTL_MS: u64 = 60_000;

/// Longest seat lease a license may set.
pub const MAX_SEAT_LEASE_TTL_MS: u64 = 86_400_000;

impl License {
    /// The seat lease length in ms.
    pub fn seat_lease_ttl_ms(&self) -> u64 {
        self.seat_lease_ttl
            .map_or(DEFAULT_SEAT_LEASE_TTL_MS, |d| d.ms)
    }

    /// The governance webhook, if the license has one.
    pub fn webhook(&self) -> Option<&str> {
        self.governance.as_ref()?.webhook.as_deref()
    }
}

/// Longest webhook URL a license may name.
pub const MAX_URL_LEN: usize = 2048;

/// How long an owner has to act on an escalation when the license names
/// no `escalation_deadline`.
pub const DEFAULT_ESCALATION_DEADLINE_MS: u64 = 86_400_000;

/// Deny-rate window when a rule names none.
pub const DEFAULT_DENY_RATE_WINDOW_MS: u64 = 60_000;

/// Fewest decisions in a window that can count as a deny-rate spike when a
/// rule names no `min_decisions`: below it a handful of denials is noise.
pub const DEFAULT_DENY_RATE_MIN_DECISIONS: u32 = 20;

/// Who answers for a license and where its alerts go: threshold crossings,
/// anomalies and escalations are sent to `webhook` and name `owner`.
///
/// ```yaml
/// governance:
///   owner: licensing@acme.example
///   webhook: https://hooks.acme.example/tollgate
///   escalation_deadline: 24h
///   anomalies:
///     deny_rate: { threshold: 0.5, window: 1m, min_decisions: 20 }
///     gossip_lag: 5s
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Governance {
    /// The governance owner: a person, team or mailbox, named in every
    /// alert and escalation.
    pub owner: String,
    /// Where alerts and escalations are POSTed: an `http` or `https` URL
    /// without credentials. Absent: nothing is sent (escalations are still
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// How long the owner has to act on an escalation (default 24h).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "escalation_deadline"
    )]
    pub escalation_deadline: Option<HumaneDuration>,
    /// Anomalies that raise alerts besides threshold crossings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalies: Option<Anomalies>,
}

impl Governance {
    /// The escalation deadline in ms.
    pub fn escalation_deadline_ms(&self) -> u64 {
        self.escalation_deadline
            .map_or(DEFAULT_ESCALATION_DEADLINE_MS, |d| d.ms)
    }
}

/// Anomaly alerts of a license.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anomalies {
    /// Alert when the share of this license's Checks denied at one node
    /// within one window reaches a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_rate: Option<DenyRateRule>,
    /// Alert when a node's gossip lag to a peer exceeds this (usage counts
    /// are then staler than usual everywhere).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "gossip_lag"
    )]
    pub gossip_lag: Option<HumaneDuration>,
}

/// A deny-rate spike: `threshold` of at least `min_decisions` Checks in one
/// calendar-aligned window of `window` denied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyRateRule {
    /// Fraction of decisions denied, in (0, 1].
    pub threshold: f64,
    /// Window length, 1s to 1d (default 1m).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deny_rate_window"
    )]
    pub window: Option<HumaneDuration>,
    /// Fewest decisions in a window that can count as a spike (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_decisions: Option<u32>,
}

impl DenyRateRule {
    /// The window length in ms.
    pub fn window_ms(&self) -> u64 {
        self.window.map_or(DEFAULT_DENY_RATE_WINDOW_MS, |d| d.ms)
    }

    /// The fewest decisions that can count as a spike.
    pub fn min_decisions(&self) -> u32 {
        self.min_decisions
            .unwrap_or(DEFAULT_DENY_RATE_MIN_DECISIONS)
    }
}

/// A duration field, named in the error so the path points at it.
fn named_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    field: &str,
) -> Result<Option<HumaneDuration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    HumaneDuration::parse(&text).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            ".{field}: expected a duration like 7d (30s, 15m, 12h, 7d), got {text:?}"
        ))
    })
}

fn grace_period<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<HumaneDuration>, D::Error> {
    named_duration(deserializer, "grace_period")
}

fn seat_lease_ttl<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<HumaneDuration>, D::Error> {
    named_duration(deserializer, "seat_lease_ttl")
}

fn escalation_deadline<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<HumaneDuration>, D::Error> {
    named_duration(deserializer, "escalation_deadline")
}

fn gossip_lag<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<HumaneDuration>, D::Error> {
    named_duration(deserializer, "gossip_lag")
}

fn deny_rate_window<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<HumaneDuration>, D::Error> {
    named_duration(deserializer, "window")
}

/// Checks that `url` is an absolute `http` or `https` URL with a host and no
/// credentials (a license is readable by every viewer, so a URL must not
/// carry secrets in its user part), made of printable ASCII.
pub fn check_webhook_url(path: &str, url: &str) -> Result<(), ValidationError> {
    if url.is_empty() || url.len() > MAX_URL_LEN {
        return Err(ValidationError::new(
            path,
            format!("must be 1 to {MAX_URL_LEN} characters"),
        ));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ValidationError::new(
            path,
            "must be printable ASCII without spaces (percent-encode anything else)",
        ));
    }
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    else {
        return Err(ValidationError::new(
            path,
            "must be an http:// or https:// URL",
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(ValidationError::new(
            path,
            "must not carry credentials (user:password@); configure a signing secret on the nodes instead",
        ));
    }
    let host = match authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() {
        return Err(ValidationError::new(path, "must name a host"));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !port.contains(']')
        && !(port.parse::<u16>().is_ok_and(|p| p > 0))
    {
        return Err(ValidationError::new(path, "port must be 1 to 65535"));
    }
    Ok(())
}

impl Governance {
    /// Semantic checks serde cannot express.
    fn validate(&self) -> Result<(), ValidationError> {
        check_text("governance.owner", &self.owner)?;
        if let Some(url) = &self.webhook {
            check_webhook_url("governance.webhook", url)?;
        }
        if let Some(d) = self.escalation_deadline
            && !(60_000..=MAX_ESCALATION_DEADLINE_MS).contains(&d.ms)
        {
            return Err(ValidationError::new(
                "governance.escalation_deadline",
                "must be between 1m and 365d",
            ));
        }
        let Some(anomalies) = &self.anomalies else {
            return Ok(());
        };
        if let Some(rule) = &anomalies.deny_rate {
            if !(rule.threshold.is_finite() && rule.threshold > 0.0 && rule.threshold <= 1.0) {
                return Err(ValidationError::new(
                    "governance.anomalies.deny_rate.threshold",
                    "must be in (0, 1]",
                ));
            }
            if let Some(w) = rule.window
                && !(1_000..=86_400_000).contains(&w.ms)
            {
                return Err(ValidationError::new(
                    "governance.anomalies.deny_rate.window",
                    "must be between 1s and 1d",
                ));
            }
            if rule.min_decisions == Some(0) {
                return Err(ValidationError::new(
                    "governance.anomalies.deny_rate.min_decisions",
                    "must be at least 1",
                ));
            }
        }
        if let Some(lag) = anomalies.gossip_lag
            && !(1_000..=86_400_000).contains(&lag.ms)
        {
            return Err(ValidationError::new(
                "governance.anomalies.gossip_lag",
                "must be between 1s and 1d",
            ));
        }
        Ok(())
    }
}

/// Longest escalation deadline a license may set.
pub const MAX_ESCALATION_DEADLINE_MS: u64 = 365 * 86_400_000;

/// A key as stored: its SHA-256 and an optional name. Input may give the
/// plain `key:` instead of `sha256:`; it is hashed during deserialization and
/// then dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "KeyInput")]
pub struct StoredKey {
    /// Optional key name, e.g. `ci` or `edge-fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// SHA-256 of the key, 64 lowercase hex characters.
    pub sha256: String,
}

/// Input form of a key entry. Deliberately not `Debug`: it can hold a plain key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyInput {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

impl TryFrom<KeyInput> for StoredKey {
    type Error = String;

    fn try_from(input: KeyInput) -> Result<Self, String> {
        let sha256 = match (input.key, input.sha256) {
            (Some(plain), None) => {
                if plain.is_empty() {
                    return Err("key must not be empty".into());
                }
                keys::hash_key(&plain)
            }
            (None, Some(hash)) => {
                let hash = hash.to_ascii_lowercase();
                if keys::decode_hash(&hash).is_none() {
                    return Err("sha256 must be 64 hex characters".into());
                }
                hash
            }
            (Some(_), Some(_)) => return Err("give either `key` or `sha256`, not both".into()),
            (None, None) => return Err("missing `key` or `sha256`".into()),
        };
        Ok(StoredKey {
            id: input.id,
            sha256,
        })
    }
}

/// Lifecycle status of a license.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum LicenseStatus {
    /// In force.
    #[default]
    Active,
    /// Temporarily off; back on at `until` if given.
    Suspended {
        /// Why.
        reason: Option<String>,
        /// When the suspension ends by itself.
        until: Option<DateTime<Utc>>,
    },
    /// Permanently off.
    Revoked {
        /// Why.
        reason: Option<String>,
    },
}

impl LicenseStatus {
    /// `active`, `suspended` or `revoked`.
    pub fn label(&self) -> &'static str {
        match self {
            LicenseStatus::Active => "active",
            LicenseStatus::Suspended { .. } => "suspended",
            LicenseStatus::Revoked { .. } => "revoked",
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StatusInput {
    Simple(SimpleStatus),
    Detailed(DetailedStatus),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SimpleStatus {
    Active,
    Suspended,
    Revoked,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum DetailedStatus {
    Suspended(SuspendedInput),
    Revoked(RevokedInput),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendedInput {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    until: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedInput {
    #[serde(default)]
    reason: Option<String>,
}

impl<'de> Deserialize<'de> for LicenseStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        StatusInput::deserialize(deserializer).map(Self::from).map_err(|_| {
            serde::de::Error::custom(
                ".status: expected active, suspended, revoked, {suspended: {reason, until}} or {revoked: {reason}}",
            )
        })
    }
}

impl From<StatusInput> for LicenseStatus {
    fn from(input: StatusInput) -> Self {
        match input {
            StatusInput::Simple(SimpleStatus::Active) => LicenseStatus::Active,
            StatusInput::Simple(SimpleStatus::Suspended) => LicenseStatus::Suspended {
                reason: None,
                until: None,
            },
            StatusInput::Simple(SimpleStatus::Revoked) => LicenseStatus::Revoked { reason: None },
            StatusInput::Detailed(DetailedStatus::Suspended(s)) => LicenseStatus::Suspended {
                reason: s.reason,
                until: s.until,
            },
            StatusInput::Detailed(DetailedStatus::Revoked(r)) => {
                LicenseStatus::Revoked { reason: r.reason }
            }
        }
    }
}

// Written by hand so YAML output uses the same singleton-map form that input
// accepts (serde_yaml would otherwise emit `!suspended` tags).
impl Serialize for LicenseStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Detail<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: &'a Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            until: Option<&'a DateTime<Utc>>,
        }
        match self {
            LicenseStatus::Active => serializer.serialize_str("active"),
            LicenseStatus::Suspended { reason, until } => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "suspended",
                    &Detail {
                        reason,
                        until: until.as_ref(),
                    },
                )?;
                map.end()
            }
            LicenseStatus::Revoked { reason } => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "revoked",
                    &Detail {
                        reason,
                        until: None,
                    },
                )?;
                map.end()
            }
        }
    }
}

/// A humane duration such as `30s`, `15m`, `12h`, `7d`, held in milliseconds.
///
/// Scalar types below report errors as `.field: message` because serde_yaml
/// attributes a custom scalar error to the parent mapping; `yaml_error`
/// appends the suffix so the path names the field itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumaneDuration {
    /// Length in milliseconds.
    pub ms: u64,
}

impl HumaneDuration {
    /// Parses `<digits><s|m|h|d>`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let split = text.len().checked_sub(1)?;
        if !text.is_char_boundary(split) {
            return None;
        }
        let (digits, unit) = text.split_at(split);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        let unit_ms: u64 = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        Some(Self {
            ms: n.checked_mul(unit_ms)?,
        })
    }
}

impl fmt::Display for HumaneDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The largest unit that divides exactly, so `7d` round-trips as `7d`.
        for (unit, unit_ms) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)] {
            if self.ms != 0 && self.ms.is_multiple_of(unit_ms) {
                return write!(f, "{}{unit}", self.ms / unit_ms);
            }
        }
        write!(f, "{}s", self.ms / 1_000)
    }
}

impl Serialize for HumaneDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumaneDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HumaneDuration::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected a duration like 7d (30s, 15m, 12h, 7d), got {text:?}"
            ))
        })
    }
}

/// A model grant: which model, which versions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelGrant {
    /// Model id.
    pub model: String,
    /// Version policy; absent means any version.
    #[serde(default)]
    pub versions: VersionPolicy,
}

/// Which versions of a model a grant covers.
///
/// `any`, `major` and `pin` are checked from the requested version string
/// alone, so they work without a `Model` document. `rolling` and
/// `maintenance_until` need release information and therefore deny with
/// `model_version_unknown` when the model or version is not registered.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum VersionPolicy {
    /// Every version.
    #[default]
    Any,
    /// Only the latest registered version.
    Rolling,
    /// Every version with this major number.
    Major(u64),
    /// Exactly this version.
    Pin(semver::Version),
    /// Versions released on or before this date.
    MaintenanceUntil(NaiveDate),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PolicyInput {
    Simple(SimplePolicy),
    Detailed(DetailedPolicy),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SimplePolicy {
    Any,
    Rolling,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum DetailedPolicy {
    Major(u64),
    Pin(semver::Version),
    MaintenanceUntil(NaiveDate),
}

impl<'de> Deserialize<'de> for VersionPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Untagged input errors say only "did not match any variant"; name the
        // accepted shapes instead.
        PolicyInput::deserialize(deserializer).map(Self::from).map_err(|_| {
            serde::de::Error::custom(
                ".versions: expected any, rolling, {major: N}, {pin: X.Y.Z} or {maintenance_until: YYYY-MM-DD}",
            )
        })
    }
}

impl From<PolicyInput> for VersionPolicy {
    fn from(input: PolicyInput) -> Self {
        match input {
            PolicyInput::Simple(SimplePolicy::Any) => VersionPolicy::Any,
            PolicyInput::Simple(SimplePolicy::Rolling) => VersionPolicy::Rolling,
            PolicyInput::Detailed(DetailedPolicy::Major(m)) => VersionPolicy::Major(m),
            PolicyInput::Detailed(DetailedPolicy::Pin(v)) => VersionPolicy::Pin(v),
            PolicyInput::Detailed(DetailedPolicy::MaintenanceUntil(d)) => {
                VersionPolicy::MaintenanceUntil(d)
            }
        }
    }
}

impl Serialize for VersionPolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            VersionPolicy::Any => serializer.serialize_str("any"),
            VersionPolicy::Rolling => serializer.serialize_str("rolling"),
            VersionPolicy::Major(m) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("major", m)?;
                map.end()
            }
            VersionPolicy::Pin(v) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("pin", v)?;
                map.end()
            }
            VersionPolicy::MaintenanceUntil(d) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("maintenance_until", d)?;
                map.end()
            }
        }
    }
}

impl fmt::Display for VersionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionPolicy::Any => f.write_str("any version"),
            VersionPolicy::Rolling => f.write_str("the latest version only (rolling)"),
            VersionPolicy::Major(m) => write!(f, "{m}.x"),
            VersionPolicy::Pin(v) => write!(f, "exactly {v}"),
            VersionPolicy::MaintenanceUntil(d) => write!(f, "versions released on or before {d}"),
        }
    }
}

/// A deployment environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    /// Production traffic.
    Production,
    /// Pre-production.
    Staging,
    /// Developer machines.
    Development,
    /// Research and experiments.
    Experiment,
}

impl Environment {
    /// All four, in a stable order.
    pub const ALL: [Environment; 4] = [
        Environment::Production,
        Environment::Staging,
        Environment::Development,
        Environment::Experiment,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Staging => "staging",
            Environment::Development => "development",
            Environment::Experiment => "experiment",
        }
    }

    /// Parses a snake_case name.
    pub fn parse(text: &str) -> Option<Self> {
        Environment::ALL.into_iter().find(|e| e.as_str() == text)
    }
}

/// Region allow/deny globs (ODRL spatial constraint). Deny wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRules {
    /// Globs of allowed regions, e.g. `eu-*`.
    #[serde(default = "allow_all", deserialize_with = "glob_allow")]
    pub allow: Vec<GlobPattern>,
    /// Globs of denied regions.
    #[serde(default, deserialize_with = "glob_deny")]
    pub deny: Vec<GlobPattern>,
}

fn glob_allow<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<GlobPattern>, D::Error> {
    glob_list(deserializer, "allow")
}

fn glob_deny<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<GlobPattern>, D::Error> {
    glob_list(deserializer, "deny")
}

/// Compiles a list of globs, naming a bad one as `.field[i]: ...`: the error
/// surfaces once the list is consumed, when serde_yaml's path is the parent,
/// so `yaml_error` appends this suffix to the path.
fn glob_list<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    field: &str,
) -> Result<Vec<GlobPattern>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .enumerate()
        .map(|(idx, text)| {
            GlobPattern::new(text).map_err(|e| {
                serde::de::Error::custom(format!(
                    ".{field}[{idx}]: invalid glob {text:?}: {}",
                    e.kind()
                ))
            })
        })
        .collect()
}

fn allow_all() -> Vec<GlobPattern> {
    GlobPattern::new("*").into_iter().collect()
}

impl RegionRules {
    /// True when any region passes, so a request without a region is fine.
    pub fn is_unrestricted(&self) -> bool {
        self.deny.is_empty() && self.allow.iter().any(|g| g.pattern == "*")
    }

    /// Whether `region` is allowed.
    pub fn allows(&self, region: &str) -> bool {
        !self.deny.iter().any(|g| g.is_match(region))
            && self.allow.iter().any(|g| g.is_match(region))
    }
}

/// One compiled glob; compares and serializes as its source text.
#[derive(Clone)]
pub struct GlobPattern {
    /// Source text.
    pub pattern: String,
    matcher: globset::GlobMatcher,
    shape: GlobShape,
}

/// Region globs are almost always `*`, `eu-*` or a literal; those are plain
/// string tests, far cheaper than globset's path candidate plus regex.
#[derive(Clone, Copy)]
enum GlobShape {
    /// `*`: everything matches.
    Any,
    /// `prefix*` with no other metacharacter (globset's `*` also crosses `/`
    /// by default, so this is exactly `starts_with`).
    Prefix,
    /// No metacharacter at all: equality.
    Literal,
    /// Anything else goes through the compiled matcher.
    General,
}

impl GlobShape {
    fn of(pattern: &str) -> Self {
        const META: &[char] = &['*', '?', '[', ']', '{', '}', '\\', '!'];
        if pattern == "*" {
            return GlobShape::Any;
        }
        match pattern.strip_suffix('*') {
            Some(prefix) if !prefix.contains(META) => GlobShape::Prefix,
            _ if !pattern.contains(META) => GlobShape::Literal,
            _ => GlobShape::General,
        }
    }
}

impl GlobPattern {
    /// Compiles `pattern`.
    pub fn new(pattern: &str) -> Result<Self, globset::Error> {
        let matcher = globset::Glob::new(pattern)?.compile_matcher();
        Ok(Self {
            pattern: pattern.to_string(),
            matcher,
            shape: GlobShape::of(pattern),
        })
    }

    /// Whether `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        match self.shape {
            GlobShape::Any => true,
            GlobShape::Prefix => self
                .pattern
                .strip_suffix('*')
                .is_some_and(|prefix| text.starts_with(prefix)),
            GlobShape::Literal => text == self.pattern,
            GlobShape::General => self.matcher.is_match(text),
        }
    }
}

impl fmt::Debug for GlobPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.pattern)
    }
}

impl PartialEq for GlobPattern {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl Serialize for GlobPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.pattern)
    }
}

impl<'de> Deserialize<'de> for GlobPattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        GlobPattern::new(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid glob {text:?}: {e}")))
    }
}

/// Hardware binding (Keygen's machine limits).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareRules {
    /// Allowed device ids; empty means any.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Maximum distinct devices ever seen; 0 means unlimited.
    #[serde(default)]
    pub max_devices: u32,
}

impl HardwareRules {
    /// Whether requests must name their device.
    pub fn is_bound(&self) -> bool {
        !self.devices.is_empty() || self.max_devices > 0
    }
}

/// A usage quota on one metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Quota id, unique within the license.
    pub id: String,
    /// Metered quantity name: `inferences`, `tokens`, `pages`, ...
    pub metric: String,
    /// Maximum per window and scope.
    pub limit: u64,
    /// Calendar-aligned UTC window.
    pub window: Window,
    /// What the quota is counted per.
    #[serde(default)]
    pub scope: QuotaScope,
    /// Enforcement mode.
    #[serde(default)]
    pub mode: QuotaMode,
    /// Fractions of `limit` that raise a `threshold_crossed` warning, in (0, 10].
    #[serde(default)]
    pub alert_thresholds: Vec<f64>,
    /// What happens when the quota is exhausted.
    #[serde(default)]
    pub on_exceed: OnExceed,
}

/// A calendar-aligned UTC window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// Resets every minute.
    Minute,
    /// Resets every hour.
    Hour,
    /// Resets at 00:00 UTC.
    Day,
    /// Resets on the 1st of each month, 00:00 UTC.
    Month,
    /// Never resets.
    Total,
}

impl Window {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
            Window::Total => "total",
        }
    }
}

/// What a quota is counted per.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    /// One counter for the whole license.
    #[default]
    License,
    /// One counter per request `subject` (missing subject counts as "").
    Subject,
    /// One counter per environment.
    Environment,
}

/// Enforcement mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaMode {
    /// Eventually consistent CRDT counters; bounded overshoot under partition.
    #[default]
    Soft,
    /// Escrow (bounded counter): each node consumes only rights it holds,
    /// so the limit is never exceeded, even while nodes are cut apart.
    Strict,
}

/// What happens when a quota is exhausted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// Deny until the window resets.
    #[default]
    Deny,
    /// Throttle with `retry_after_ms` = time until the window resets.
    Throttle,
    /// Deny like `deny`, and open an escalation record for the license's
    /// governance owner (one per quota and window), replicated to every
    /// node. Needs a `governance` section.
    Escalate,
}

/// A token-bucket rate limit, enforced per node (not replicated).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Rate limit id, unique within the license.
    pub id: String,
    /// Refill rate outside peak hours.
    pub per_second: f64,
    /// Bucket capacity outside peak hours.
    pub burst: u32,
    /// Optional peak-hours override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<RateSchedule>,
}

/// A local-time peak window with its own limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSchedule {
    /// IANA time zone name, e.g. `Europe/Berlin`.
    pub timezone: TimeZone,
    /// Peak hours and limits.
    pub peak: PeakLimits,
}

/// Limits during peak hours.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeakLimits {
    /// Local hour range `HH-HH`, start inclusive, end exclusive; may wrap midnight.
    pub hours: HourRange,
    /// Refill rate during peak.
    pub per_second: f64,
    /// Bucket capacity during peak.
    pub burst: u32,
}

/// A validated IANA time zone; serializes as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeZone(pub chrono_tz::Tz);

impl Serialize for TimeZone {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse::<chrono_tz::Tz>()
            .map(TimeZone)
            .map_err(|_| serde::de::Error::custom(format!(".timezone: unknown time zone {text:?}")))
    }
}

/// An hour range `HH-HH` (start inclusive, end exclusive, wraps past midnight
/// when start > end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HourRange {
    /// First hour, 0..=23.
    pub start_hour: u8,
    /// Hour after the last, 0..=24.
    pub end_hour: u8,
}

impl HourRange {
    /// Parses `08-20`.
    pub fn parse(text: &str) -> Option<Self> {
        let (a, b) = text.trim().split_once('-')?;
        let start_hour: u8 = a.trim().parse().ok()?;
        let end_hour: u8 = b.trim().parse().ok()?;
        (start_hour <= 23 && end_hour <= 24 && start_hour != end_hour).then_some(Self {
            start_hour,
            end_hour,
        })
    }

    /// Whether local hour `hour` is inside.
    pub fn contains(self, hour: u32) -> bool {
        let (start, end) = (u32::from(self.start_hour), u32::from(self.end_hour));
        if start < end {
            hour >= start && hour < end
        } else {
            hour >= start || hour < end
        }
    }
}

impl Serialize for HourRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:02}-{:02}", self.start_hour, self.end_hour))
    }
}

impl<'de> Deserialize<'de> for HourRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HourRange::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                ".hours: expected an hour range like \"08-20\" (start inclusive, end exclusive), got {text:?}"
            ))
        })
    }
}

pub(crate) fn check_id(path: &str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            path,
            format!("must be 1 to {MAX_ID_LEN} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(ValidationError::new(
            path,
            format!("{id:?} may only contain a-z, 0-9, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

pub(crate) fn check_text(path: &str, text: &str) -> Result<(), ValidationError> {
    if text.is_empty() || text.len() > MAX_TEXT_LEN {
        return Err(ValidationError::new(
            path,
            format!("must be 1 to {MAX_TEXT_LEN} bytes"),
        ));
    }
    Ok(())
}

pub(crate) fn check_len<T>(path: &str, list: &[T]) -> Result<(), ValidationError> {
    if list.len() > MAX_LIST_LEN {
        return Err(ValidationError::new(
            path,
            format!("at most {MAX_LIST_LEN} entries"),
        ));
    }
    Ok(())
}

impl License {
    /// Semantic checks serde cannot express; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("id", &self.id)?;
        check_text("customer", &self.customer)?;
        if self.tier.len() > MAX_TEXT_LEN {
            return Err(ValidationError::new(
                "tier",
                format!("at most {MAX_TEXT_LEN} bytes"),
            ));
        }
        if let (Some(from), Some(until)) = (self.valid_from, self.valid_until)
            && until <= from
        {
            return Err(ValidationError::new(
                "valid_until",
                "must be after valid_from",
            ));
        }
        check_len("keys", &self.keys)?;
        let mut key_hashes = HashSet::new();
        for (idx, key) in self.keys.iter().enumerate() {
            if keys::decode_hash(&key.sha256).is_none() {
                return Err(ValidationError::new(
                    format!("keys[{idx}].sha256"),
                    "must be 64 hex characters",
                ));
            }
            if !key_hashes.insert(key.sha256.as_str()) {
                return Err(ValidationError::new(
                    format!("keys[{idx}]"),
                    "duplicate key",
                ));
            }
            if let Some(id) = &key.id {
                check_id(&format!("keys[{idx}].id"), id)?;
            }
        }
        check_len("models", &self.models)?;
        let mut models = HashSet::new();
        for (idx, grant) in self.models.iter().enumerate() {
            check_id(&format!("models[{idx}].model"), &grant.model)?;
            if !models.insert(grant.model.as_str()) {
                return Err(ValidationError::new(
                    format!("models[{idx}].model"),
                    format!("duplicate grant for model {:?}", grant.model),
                ));
            }
        }
        check_len("features", &self.features)?;
        for (idx, feature) in self.features.iter().enumerate() {
            check_text(&format!("features[{idx}]"), feature)?;
        }
        if let Some(envs) = &self.environments
            && envs.is_empty()
        {
            return Err(ValidationError::new(
                "environments",
                "must not be empty; omit it to allow every environment",
            ));
        }
        if let Some(regions) = &self.regions {
            check_len("regions.allow", &regions.allow)?;
            check_len("regions.deny", &regions.deny)?;
        }
        check_len("hardware.devices", &self.hardware.devices)?;
        for (idx, device) in self.hardware.devices.iter().enumerate() {
            check_text(&format!("hardware.devices[{idx}]"), device)?;
        }
        check_len("quotas", &self.quotas)?;
        let mut quota_ids = HashSet::new();
        for (idx, quota) in self.quotas.iter().enumerate() {
            let path = format!("quotas[{idx}]");
            check_id(&format!("{path}.id"), &quota.id)?;
            if !quota_ids.insert(quota.id.as_str()) {
                return Err(ValidationError::new(
                    format!("{path}.id"),
                    format!("duplicate quota id {:?}", quota.id),
                ));
            }
            check_id(&format!("{path}.metric"), &quota.metric)?;
            if quota.limit == 0 {
                return Err(ValidationError::new(
                    format!("{path}.limit"),
                    "must be greater than 0",
                ));
            }
            for (t_idx, t) in quota.alert_thresholds.iter().enumerate() {
                if !(t.is_finite() && *t > 0.0 && *t <= 10.0) {
                    return Err(ValidationError::new(
                        format!("{path}.alert_thresholds[{t_idx}]"),
                        "must be in (0, 10]",
                    ));
                }
            }
        }
        for (idx, quota) in self.quotas.iter().enumerate() {
            if quota.on_exceed == OnExceed::Escalate && self.governance.is_none() {
                return Err(ValidationError::new(
                    format!("quotas[{idx}].on_exceed"),
                    "escalate needs a governance section naming the owner",
                ));
            }
        }
        if let Some(governance) = &self.governance {
            governance.validate()?;
        }
        if let Some(ttl) = self.seat_lease_ttl
            && !(1_000..=MAX_SEAT_LEASE_TTL_MS).contains(&ttl.ms)
        {
            return Err(ValidationError::new(
                "seat_lease_ttl",
                "must be between 1s and 1d",
            ));
        }
        check_len("rate_limits", &self.rate_limits)?;
        let mut rate_ids = HashSet::new();
        for (idx, rl) in self.rate_limits.iter().enumerate() {
            let path = format!("rate_limits[{idx}]");
            check_id(&format!("{path}.id"), &rl.id)?;
            if !rate_ids.insert(rl.id.as_str()) {
                return Err(ValidationError::new(
                    format!("{path}.id"),
                    format!("duplicate rate limit id {:?}", rl.id),
                ));
            }
            check_rate(&path, rl.per_second, rl.burst)?;
            if let Some(schedule) = &rl.schedule {
                check_rate(
                    &format!("{path}.schedule.peak"),
                    schedule.peak.per_second,
                    schedule.peak.burst,
                )?;
            }
        }
        if let Some(datasets) = &self.datasets {
            datasets.validate()?;
        }
        Ok(())
    }
}

fn check_rate(path: &str, per_second: f64, burst: u32) -> Result<(), ValidationError> {
    if !(per_second.is_finite() && per_second > 0.0) {
        return Err(ValidationError::new(
            format!("{path}.per_second"),
            "must be greater than 0",
        ));
    }
    if burst == 0 {
        return Err(ValidationError::new(
            format!("{path}.burst"),
            "must be at least 1",
        ));
    }
    Ok(())
}

/// Parses YAML (multi-document, `---` separated) or JSON (an object or an
/// array of objects; detected by a leading `{` or `[`) into validated documents.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, ValidationError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ValidationError::new("document", format!("invalid JSON: {e}")))?;
        let items = match value {
            serde_json::Value::Array(items) => items,
            other => vec![other],
        };
        let mut docs = Vec::with_capacity(items.len());
        for item in &items {
            // Re-rendered as JSON (which YAML accepts) so serde_yaml reports
            // field paths; serde_json alone only reports line and column.
            let rendered = serde_json::to_string_pretty(item)
                .map_err(|e| ValidationError::new("document", e.to_string()))?;
            docs.push(parse_one(&rendered)?);
        }
        return Ok(docs);
    }
    let mut docs = Vec::new();
    let mut chunk = String::new();
    let mut chunk_has_content = false;
    for line in text.lines() {
        if is_separator(line) {
            if chunk_has_content {
                docs.push(parse_one(&chunk)?);
            }
            // Keep line numbers in errors true to the original text by
            // padding the next chunk with the lines consumed so far.
            let n_lines = chunk.lines().count() + 1;
            chunk.clear();
            chunk.extend(std::iter::repeat_n('\n', n_lines));
            chunk_has_content = false;
            continue;
        }
        let content = line.trim();
        if !content.is_empty() && !content.starts_with('#') && content != "..." {
            chunk_has_content = true;
        }
        chunk.push_str(line);
        chunk.push('\n');
    }
    if chunk_has_content {
        docs.push(parse_one(&chunk)?);
    }
    if docs.is_empty() {
        return Err(ValidationError::new("document", "no documents found"));
    }
    Ok(docs)
}

fn is_separator(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t'))
}

/// Parses one YAML document (JSON is valid YAML here).
fn parse_one(text: &str) -> Result<Document, ValidationError> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(yaml_error)?;
    let Some(map) = value.as_mapping() else {
        return Err(ValidationError::new(
            "document",
            "expected a mapping with apiVersion and kind",
        ));
    };
    match map.get("apiVersion").and_then(|v| v.as_str()) {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(ValidationError::new(
                "apiVersion",
                format!("unsupported {other:?}; expected {API_VERSION:?}"),
            ));
        }
        None => {
            return Err(ValidationError::new(
                "apiVersion",
                format!("missing; expected {API_VERSION:?}"),
            ));
        }
    }
    match map.get("kind").and_then(|v| v.as_str()) {
        Some("License") => {
            let license: License = serde_yaml::from_str(text).map_err(yaml_error)?;
            license.validate()?;
            Ok(Document::License(license))
        }
        Some("Model") => {
            let model: Model = serde_yaml::from_str(text).map_err(yaml_error)?;
            model.validate()?;
            Ok(Document::Model(model))
        }
        Some("Dataset") => {
            let dataset: Dataset = serde_yaml::from_str(text).map_err(yaml_error)?;
            dataset.validate()?;
            Ok(Document::Dataset(dataset))
        }
        Some(other) => Err(ValidationError::new(
            "kind",
            format!("unknown kind {other:?}; expected License, Model or Dataset"),
        )),
        None => Err(ValidationError::new(
            "kind",
            "missing; expected License, Model or Dataset",
        )),
    }
}

/// Splits serde_yaml's `path: message at line L column C` into a path and message.
fn yaml_error(e: serde_yaml::Error) -> ValidationError {
    let text = e.to_string();
    if let Some((path, message)) = text.split_once(": ")
        && !path.is_empty()
        && !path.contains(' ')
    {
        let path = path.strip_prefix('.').unwrap_or(path);
        // A custom deserializer may name a deeper path as `.field[i]: ...`.
        if let Some((suffix, rest)) = message.split_once(": ")
            && (suffix.starts_with('.') || suffix.starts_with('['))
            && !suffix.contains(' ')
        {
            return ValidationError::new(format!("{path}{suffix}"), rest);
        }
        return ValidationError::new(path, message);
    }
    ValidationError::new("document", text)
}

/// Parses exactly one `kind: License` document.
pub fn parse_license(text: &str) -> Result<License, ValidationError> {
    let mut docs = parse_documents(text)?;
    match (docs.pop(), docs.is_empty()) {
        (Some(Document::License(l)), true) => Ok(l),
        (Some(_), true) => Err(ValidationError::new("kind", "expected a License document")),
        _ => Err(ValidationError::new(
            "document",
            "expected exactly one License document",
        )),
    }
}

/// Parses exactly one `kind: Dataset` document.
pub fn parse_dataset(text: &str) -> Result<Dataset, ValidationError> {
    let mut docs = parse_documents(text)?;
    match (docs.pop(), docs.is_empty()) {
        (Some(Document::Dataset(d)), true) => Ok(d),
        (Some(_), true) => Err(ValidationError::new("kind", "expected a Dataset document")),
        _ => Err(ValidationError::new(
            "document",
            "expected exactly one Dataset document",
        )),
    }
}

/// Parses exactly one `kind: Model` document.
pub fn parse_model(text: &str) -> Result<Model, ValidationError> {
    let mut docs = parse_documents(text)?;
    match (docs.pop(), docs.is_empty()) {
        (Some(Document::Model(m)), true) => Ok(m),
        (Some(_), true) => Err(ValidationError::new("kind", "expected a Model document")),
        _ => Err(ValidationError::new(
            "document",
            "expected exactly one Model document",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_fast_paths_agree_with_globset() {
        let patterns = [
            "*",
            "eu-*",
            "eu-east-*",
            "us-east-1",
            "",
            "a/b*",
            "eu-?",
            "e[uv]-*",
            "{eu,us}-*",
            "*-1",
            "eu-**",
            "EU-*",
        ];
        let texts = [
            "",
            "eu-",
            "eu-west-1",
            "eu-east-2",
            "us-east-1",
            "us-east-10",
            "a/b/c",
            "ev-1",
            "eu-1",
            "EU-west",
            "xeu-1",
        ];
        for pattern in patterns {
            let glob = GlobPattern::new(pattern).expect("valid glob");
            let matcher = globset::Glob::new(pattern)
                .expect("valid")
                .compile_matcher();
            for text in texts {
                assert_eq!(
                    glob.is_match(text),
                    matcher.is_match(text),
                    "{pattern:?} vs {text:?}"
                );
            }
        }
    }

    const BASE: &str = "apiVersion: tollgate/v1\nkind: License\nid: demo\ncustomer: Demo Corp\n";

    /// Parses `BASE` + `extra` and asserts the error contains every fragment
    /// of `expected` (or that it parses, when `expected` is empty).
    fn check(extra: &str, expected: &[&str]) {
        let result = parse_license(&format!("{BASE}{extra}"));
        match (result, expected.is_empty()) {
            (Ok(_), true) => {}
            (Ok(l), false) => panic!("expected an error containing {expected:?}, parsed {l:?}"),
            (Err(e), true) => panic!("unexpected error: {e}"),
            (Err(e), false) => {
                let text = e.to_string();
                for fragment in expected {
                    assert!(
                        text.contains(fragment),
                        "{text:?} should contain {fragment:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn validation_names_the_field() {
        check("", &[]);
        check(
            "quotas: [{ id: d, metric: inferences, limit: 0, window: day }]\n",
            &["quotas[0].limit: must be greater than 0"],
        );
        check(
            "quotas: [{ id: d, metric: inferences, limit: 1, window: day, colour: red }]\n",
            &["quotas[0]", "unknown field `colour`"],
        );
        check(
            "quotas: [{ id: d, metric: inferences, limit: 1, window: fortnight }]\n",
            &["quotas[0].window", "fortnight"],
        );
        check(
            "quotas:\n  - { id: d, metric: inferences, limit: 1, window: day }\n  - { id: d, metric: tokens, limit: 1, window: day }\n",
            &["quotas[1].id: duplicate quota id"],
        );
        check(
            "quotas: [{ id: d, metric: x, limit: 1, window: day, alert_thresholds: [0] }]\n",
            &["quotas[0].alert_thresholds[0]: must be in (0, 10]"],
        );
        check(
            "regions: { allow: [\"eu-*\", \"[\"] }\n",
            &["regions.allow[1]", "invalid glob"],
        );
        check(
            "rate_limits: [{ id: r, per_second: 1, burst: 1, schedule: { timezone: Mars/Base, peak: { hours: \"08-20\", per_second: 1, burst: 1 } } }]\n",
            &[
                "rate_limits[0].schedule.timezone",
                "unknown time zone \"Mars/Base\"",
            ],
        );
        check(
            "seat_lease_ttl: later\nmax_instances: 2\n",
            &["seat_lease_ttl: expected a duration like 7d", "\"later\""],
        );
        check(
            "grace_period: soon\n",
            &["grace_period", "expected a duration like 7d"],
        );
        check(
            "valid_from: 2026-02-01T00:00:00Z\nvalid_until: 2026-01-01T00:00:00Z\n",
            &["valid_until: must be after valid_from"],
        );
        check("keys: [{ key: a, sha256: abc }]\n", &["keys", "not both"]);
        check("colour: red\n", &["unknown field `colour`"]);
        check("status: paused\n", &["status: expected active"]);
        check(
            "environments: [production, moon]\n",
            &["environments[1]", "moon"],
        );
        check(
            "models: [{ model: m, versions: { major: two } }]\n",
            &["models[0].versions"],
        );
        check("quotas: [\n", &["line"]);
        check(
            "governance: { owner: ops, webhook: \"ftp://x\" }\n",
            &["governance.webhook: must be an http:// or https:// URL"],
        );
        check(
            "governance: { owner: ops, webhook: \"https://u:p@x/h\" }\n",
            &["governance.webhook", "credentials"],
        );
        check(
            "governance: { owner: ops, webhook: \"http://[::1]:8080/h\" }\n",
            &[],
        );
        check("governance: { owner: \"\" }\n", &["governance.owner"]);
        check(
            "governance: { owner: ops, escalation_deadline: soon }\n",
            &["escalation_deadline", "expected a duration"],
        );
        check(
            "governance: { owner: ops, anomalies: { deny_rate: { threshold: 1.5 } } }\n",
            &["governance.anomalies.deny_rate.threshold: must be in (0, 1]"],
        );
        check(
            "quotas: [{ id: d, metric: x, limit: 1, window: day, on_exceed: escalate }]\n",
            &["quotas[0].on_exceed: escalate needs a governance section"],
        );
        assert!(
            parse_license(&BASE.replace("id: demo", "id: Demo!"))
                .unwrap_err()
                .to_string()
                .starts_with("id: ")
        );
        assert!(
            parse_license(&BASE.replace("tollgate/v1", "tollgate/v9"))
                .unwrap_err()
                .to_string()
                .starts_with("apiVersion: ")
        );
    }

    #[test]
    fn malformed_yaml_reports_line_of_second_document() {
        let text = format!(
            "apiVersion: tollgate/v1\nkind: Model\nid: m\nversions: [{{version: 1.0.0, released: 2025-01-01}}]\n---\n{BASE}quotas: [{{ id: d, metric: x, limit: 1, window: day, bogus: 1 }}]\n"
        );
        let e = parse_documents(&text).unwrap_err();
        assert_eq!(e.path, "quotas[0]");
        assert!(e.message.contains("line 10"), "{e}");
    }

    #[test]
    fn plain_key_is_hashed_and_never_serialized() {
        let license = parse_license(&format!(
            "{BASE}keys: [{{ key: tg_super_secret, id: dev }}]\n"
        ))
        .unwrap();
        assert_eq!(license.keys[0].sha256, keys::hash_key("tg_super_secret"));
        let json = serde_json::to_string(&license).unwrap();
        assert!(!json.contains("tg_super_secret"));
        assert!(!format!("{license:?}").contains("tg_super_secret"));
        let yaml = serde_yaml::to_string(&license).unwrap();
        assert!(!yaml.contains("tg_super_secret"));
    }

    #[test]
    fn documents_round_trip_through_json_and_yaml() {
        let text = format!(
            "{BASE}status: {{suspended: {{reason: unpaid}}}}\ngrace_period: 12h\nkeys: [{{sha256: {}}}]\nmodels:\n  - {{ model: m, versions: {{ maintenance_until: 2026-12-31 }} }}\n  - {{ model: n, versions: rolling }}\nregions: {{ allow: [\"eu-*\"] }}\nrate_limits: [{{ id: r, per_second: 2, burst: 4, schedule: {{ timezone: Europe/Berlin, peak: {{ hours: \"22-06\", per_second: 1, burst: 1 }} }} }}]\ngovernance: {{ owner: ops, webhook: \"https://hooks.example/t\", escalation_deadline: 2h, anomalies: {{ deny_rate: {{ threshold: 0.5, window: 1m }}, gossip_lag: 5s }} }}\nquotas: [{{ id: q, metric: m, limit: 3, window: day, on_exceed: escalate }}]\n",
            keys::hash_key("x")
        );
        let license = parse_license(&text).unwrap();
        let json = serde_json::to_string(&license).unwrap();
        assert_eq!(parse_license(&json).unwrap(), license);
        let back: License = serde_json::from_str(&json).unwrap();
        assert_eq!(back, license);
        let yaml = serde_yaml::to_string(&license).unwrap();
        assert_eq!(parse_license(&yaml).unwrap(), license);
        let array = format!("[{json}]");
        assert_eq!(
            parse_documents(&array).unwrap(),
            vec![Document::License(license)]
        );
    }

    #[test]
    fn durations_and_hours() {
        assert_eq!(HumaneDuration::parse("30s").map(|d| d.ms), Some(30_000));
        assert_eq!(
            HumaneDuration::parse("7d").map(|d| d.to_string()),
            Some("7d".into())
        );
        assert_eq!(HumaneDuration::parse("7w"), None);
        assert_eq!(HumaneDuration::parse("d"), None);
        assert_eq!(HumaneDuration::parse("é"), None);
        let night = HourRange::parse("22-06").unwrap();
        assert!(night.contains(23) && night.contains(5) && !night.contains(12));
        assert_eq!(HourRange::parse("08-08"), None);
    }
}
