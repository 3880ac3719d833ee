//! Quota exceptions and escalation records: the replicated governance state.
//!
//! This module owns the shapes of a [`QuotaException`] (a caller's request
//! for more quota, and an administrator's approval or rejection) and of an
//! [`Escalation`] (a violation of a quota whose `on_exceed` is `escalate`,
//! routed to the license's governance owner), their identifiers and their
//! bounds. [`crate::config::Config`] holds them and applies the commands that
//! change them; [`crate::decision::decide`] reads approved exceptions through
//! [`crate::config::Config::quota_limit`]. This module must not read the
//! clock: whether an exception is in force is a question asked with `now_ms`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most exceptions kept in the config. Past it, decided exceptions are
/// dropped (rejected ones first, then approved ones by earliest end), and a
/// new request is refused only if every kept exception is still pending.
pub const MAX_EXCEPTIONS: usize = 4096;

/// Most pending exceptions per license: an edge caller may ask, but cannot
/// flood the log with requests nobody has looked at.
pub const MAX_PENDING_EXCEPTIONS_PER_LICENSE: usize = 16;

/// Most escalation records kept. Past it, resolved ones are dropped, oldest
/// first; a new escalation is refused only if every kept one is unresolved.
pub const MAX_ESCALATIONS: usize = 4096;

/// Longest a reason may be.
pub const MAX_REASON_LEN: usize = 1024;

/// Where a quota exception stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExceptionStatus {
    /// Asked for; waiting for an administrator.
    Pending,
    /// Approved: the quota's limit is raised by `amount` until `until_ms`.
    Approved,
    /// Rejected; changes nothing.
    Rejected,
    /// Approved, and recorded as over once a node saw `until_ms` pass. The
    /// record is for the history: whether the limit is raised depends on
    /// `until_ms` and the time of the decision only, never on this status,
    /// so a node whose clock runs ahead cannot end a raise early elsewhere.
    Expired,
}

impl ExceptionStatus {
    /// `pending`, `approved`, `rejected` or `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExceptionStatus::Pending => "pending",
            ExceptionStatus::Approved => "approved",
            ExceptionStatus::Rejected => "rejected",
            ExceptionStatus::Expired => "expired",
        }
    }

    /// Whether it was approved (and so raises the limit until its end).
    pub fn was_approved(self) -> bool {
        matches!(self, ExceptionStatus::Approved | ExceptionStatus::Expired)
    }
}

/// A request to raise one quota of one license, and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuotaException {
    /// `exc-<config version of the request>`.
    pub id: String,
    /// License id.
    pub license: String,
    /// Quota id.
    pub quota: String,
    /// Units the limit is raised by while the exception is in force.
    pub amount: u64,
    /// Why the caller asks.
    pub reason: String,
    /// Who asked: an admin token's name, or `key:<key name>` for an edge
    /// caller that authenticated with the license's API key.
    pub requested_by: String,
    /// When it was asked for (unix ms, at the proposing node).
    pub requested_at_ms: i64,
    /// Until when the caller would like it (unix ms); a wish, not a term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_until_ms: Option<i64>,
    /// Where it stands.
    pub status: ExceptionStatus,
    /// When an approved exception ends (unix ms, exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
    /// The administrator who approved or rejected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When it was approved or rejected (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<i64>,
    /// Why it was approved or rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_reason: Option<String>,
}

impl QuotaException {
    /// Whether it raises the limit at `now_ms`.
    pub fn in_force(&self, now_ms: i64) -> bool {
        self.status.was_approved() && self.until_ms.is_some_and(|u| now_ms < u)
    }

    /// `pending`, `active` (approved, in force), `expired` (approved, over)
    /// or `rejected`, at `now_ms`.
    pub fn state_at(&self, now_ms: i64) -> &'static str {
        match self.status {
            ExceptionStatus::Pending => "pending",
            ExceptionStatus::Rejected => "rejected",
            ExceptionStatus::Approved | ExceptionStatus::Expired if self.in_force(now_ms) => {
                "active"
            }
            ExceptionStatus::Approved | ExceptionStatus::Expired => "expired",
        }
    }
}

/// The id of the exception requested at config version `version`.
pub fn exception_id(version: u64) -> String {
    format!("exc-{version}")
}

/// Where an escalation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationStatus {
    /// Opened; nobody has answered yet.
    Open,
    /// The owner (or an administrator) has seen it.
    Acknowledged,
    /// Dealt with.
    Resolved,
}

/// A violation routed to the license's governance owner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Escalation {
    /// `esc-` and 16 hex digits of a hash of (license, rule, window epoch),
    /// so every node names the same violation the same way.
    pub id: String,
    /// License id.
    pub license: String,
    /// The rule violated, e.g. `quotas[daily]`.
    pub rule: String,
    /// The quota's window epoch the violation happened in.
    pub window_epoch: u64,
    /// The governance owner at the time it was opened.
    pub owner: String,
    /// When it was opened (unix ms, at the proposing node).
    pub opened_at_ms: i64,
    /// When the owner should have acted by (unix ms).
    pub deadline_ms: i64,
    /// Who opened it: `node-<id>`.
    pub opened_by: String,
    /// The config version it was opened at.
    pub version: u64,
    /// Where it stands.
    pub status: EscalationStatus,
    /// Who last changed its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
    /// When its status last changed (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at_ms: Option<i64>,
    /// What was done, as the resolver said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
}

impl Escalation {
    /// Whether it is unresolved past its deadline at `now_ms`.
    pub fn overdue(&self, now_ms: i64) -> bool {
        self.status != EscalationStatus::Resolved && now_ms >= self.deadline_ms
    }
}

/// The id of the escalation for `rule` of `license` in window `epoch`.
pub fn escalation_id(license: &str, rule: &str, epoch: u64) -> String {
    let mut h = Sha256::new();
    h.update(license.as_bytes());
    h.update([0]);
    h.update(rule.as_bytes());
    h.update([0]);
    h.update(epoch.to_be_bytes());
    let digest = h.finalize();
    format!("esc-{}", hex::encode(&digest[..8]))
}

/// Checks a reason: not blank, at most [`MAX_REASON_LEN`] bytes.
pub fn check_reason(reason: Option<&str>) -> Result<&str, String> {
    match reason.map(str::trim) {
        Some(r) if !r.is_empty() && r.len() <= MAX_REASON_LEN => Ok(r),
        Some(r) if !r.is_empty() => Err(format!("reason: at most {MAX_REASON_LEN} bytes")),
        _ => Err("reason: required".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exception(status: ExceptionStatus, until_ms: Option<i64>) -> QuotaException {
        QuotaException {
            id: exception_id(7),
            license: "l".into(),
            quota: "q".into(),
            amount: 5,
            reason: "launch".into(),
            requested_by: "key:dev".into(),
            requested_at_ms: 0,
            requested_until_ms: None,
            status,
            until_ms,
            decided_by: None,
            decided_at_ms: None,
            decision_reason: None,
        }
    }

    #[test]
    fn an_approved_exception_is_in_force_until_its_end_exclusive() {
        let e = exception(ExceptionStatus::Approved, Some(1_000));
        assert!(e.in_force(999));
        assert!(!e.in_force(1_000));
        assert_eq!(e.state_at(999), "active");
        assert_eq!(e.state_at(1_000), "expired");
        assert!(!exception(ExceptionStatus::Pending, Some(1_000)).in_force(0));
        assert!(!exception(ExceptionStatus::Rejected, Some(1_000)).in_force(0));
        // The expiry record does not end a raise early.
        assert!(exception(ExceptionStatus::Expired, Some(1_000)).in_force(999));
        assert_eq!(e.id, "exc-7");
    }

    #[test]
    fn escalation_ids_are_stable_and_distinct() {
        let a = escalation_id("l", "quotas[q]", 1);
        assert_eq!(a, escalation_id("l", "quotas[q]", 1));
        assert_ne!(a, escalation_id("l", "quotas[q]", 2));
        assert_ne!(a, escalation_id("l", "quotas[r]", 1));
        assert_eq!(a.len(), "esc-".len() + 16);
    }

    #[test]
    fn reasons_are_required_and_bounded() {
        assert_eq!(check_reason(Some(" why ")), Ok("why"));
        assert!(check_reason(None).is_err());
        assert!(check_reason(Some("  ")).is_err());
        assert!(check_reason(Some(&"x".repeat(MAX_REASON_LEN + 1))).is_err());
    }
}
