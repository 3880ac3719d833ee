//! Config change history ("decision records"), structural diffs and
//! point-in-time lookup of licenses.
//!
//! This module owns the record kept for every applied command that touches a
//! license: who made it, when, why, what kind of change it was, the
//! field-by-field diff and the license document as it stood afterwards. It
//! bounds each license's history and answers "what did license X look like at
//! config version V". [`crate::config::Config::apply`] decides whether a
//! change is allowed and appends the record; this module must not decide
//! anything itself, must not read the clock (`at_ms` comes from the command)
//! and must never put key material in a record: licenses hold key hashes
//! only, and diffs are computed from that stored form.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::dataset::Dataset;
use crate::license::{License, Model};

/// Most records kept per license; the oldest are dropped beyond it. A
/// license changed every minute keeps about four hours of detail, one changed
/// weekly keeps about five years. Each record holds a full document, so this
/// bound is what keeps the replicated config (and every snapshot) small.
pub const MAX_HISTORY_PER_LICENSE: usize = 256;

/// Most deleted licenses whose history is kept; past it, the history of the
/// license deleted longest ago is dropped, so churn cannot grow snapshots
/// without bound.
pub const MAX_DELETED_HISTORIES: usize = 1024;

/// One applied change to one license.
///
/// Serialized as
/// `{"version":7,"actor":"ops","at_ms":1780000000000,"reason":"renewal",
/// "action":{"kind":"put"},"diff":[{"path":"quotas[0].limit","op":"changed","old":5,"new":10}],
/// "document":{...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// The config version (Raft log index) the change was applied at.
    pub version: u64,
    /// Name of the admin token that made the change.
    pub actor: String,
    /// Wall-clock time of the request at the proposing node, unix ms.
    pub at_ms: i64,
    /// Why the change was made, as given by the actor.
    #[serde(default)]
    pub reason: Option<String>,
    /// What kind of change it was.
    pub action: ChangeAction,
    /// What changed, field by field, from the license before to the license
    /// after. See [`diff_licenses`] for how creation and deletion look.
    #[serde(default)]
    pub diff: Vec<DiffEntry>,
    /// The license after the change; `None` after a delete.
    #[serde(default)]
    pub document: Option<Arc<License>>,
}

/// The kind of change a [`ChangeRecord`] describes, one per license command.
///
/// Serialized with a `kind` tag: `{"kind":"put"}`,
/// `{"kind":"rollback","to_version":5}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChangeAction {
    /// The license was created or replaced as a whole.
    Put,
    /// The license was revoked.
    Revoke,
    /// A key was added.
    AddKey,
    /// A key was removed.
    RevokeKey,
    /// The license was deleted.
    Delete,
    /// The license was restored to its content at config version `to_version`.
    Rollback {
        /// The config version whose content was restored.
        to_version: u64,
    },
    /// A quota exception was requested (the license itself is unchanged;
    /// the diff is of the exception, under `exceptions.<id>`).
    ExceptionRequested {
        /// The exception's id.
        exception: String,
    },
    /// A quota exception was approved: the limit is raised until `until_ms`.
    ExceptionApproved {
        /// The exception's id.
        exception: String,
        /// When it ends (unix ms).
        until_ms: i64,
    },
    /// An approved exception's end was seen to pass (recorded by a node).
    ExceptionExpired {
        /// The exception's id.
        exception: String,
    },
    /// A quota exception was rejected.
    ExceptionRejected {
        /// The exception's id.
        exception: String,
    },
    /// An escalation was opened (the diff is under `escalations.<id>`).
    EscalationOpened {
        /// The escalation's id.
        escalation: String,
    },
    /// An escalation was acknowledged.
    EscalationAcknowledged {
        /// The escalation's id.
        escalation: String,
    },
    /// An escalation was resolved.
    EscalationResolved {
        /// The escalation's id.
        escalation: String,
    },
}

/// One difference between two JSON values, at `path`.
///
/// Serialized flat: `{"path":"quotas[0].limit","op":"changed","old":5,"new":10}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiffEntry {
    /// Where the values differ, in the style of license validation errors:
    /// `field.sub[2].x`. The empty string is the value itself. A key that is
    /// not made only of ASCII letters, digits, `_` and `-` is written as
    /// `["key"]` (a JSON string) so that a path is never ambiguous.
    pub path: String,
    /// How they differ.
    #[serde(flatten)]
    pub change: Change,
}

/// How a value differs, tagged `op` when serialized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Present only in the new value.
    Added {
        /// The new value.
        new: Value,
    },
    /// Present only in the old value.
    Removed {
        /// The old value.
        old: Value,
    },
    /// Present in both, different.
    Changed {
        /// The old value.
        old: Value,
        /// The new value.
        new: Value,
    },
}

/// Why a license's content at a given version cannot be told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// No change to the license was ever recorded (it never existed, or it
    /// predates history keeping and has not changed since).
    #[error("license {id:?} has no recorded history")]
    NoHistory {
        /// License id.
        id: String,
    },
    /// The license was first created after `version`.
    #[error("license {id:?} did not exist yet at version {version}")]
    NotYetCreated {
        /// License id.
        id: String,
        /// The version asked about.
        version: u64,
    },
    /// The license had been deleted at `deleted_at` and not recreated by `version`.
    #[error("license {id:?} was deleted at version {deleted_at} (at or before version {version})")]
    Deleted {
        /// License id.
        id: String,
        /// The version asked about.
        version: u64,
        /// The version of the delete.
        deleted_at: u64,
    },
    /// The records that would answer were dropped by [`MAX_HISTORY_PER_LICENSE`]
    /// (or the license predates history keeping).
    #[error(
        "version {version} is older than the retained history of license {id:?} (oldest retained: {oldest_retained})"
    )]
    OlderThanRetained {
        /// License id.
        id: String,
        /// The version asked about.
        version: u64,
        /// The version of the oldest record still kept.
        oldest_retained: u64,
    },
    /// `version` has not been reached yet.
    #[error("version {version} is in the future (current: {current})")]
    Future {
        /// The version asked about.
        version: u64,
        /// The config's current version.
        current: u64,
    },
}

/// The retained history of one license, oldest record first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LicenseHistory {
    /// The retained records, oldest first, at most [`MAX_HISTORY_PER_LICENSE`].
    pub records: Vec<ChangeRecord>,
    /// Whether the license changed before `records[0]` without that change
    /// being retained: older records were dropped by the cap, or the license
    /// already existed when history keeping began. Without this flag a
    /// version before `records[0]` could not be told apart from "not created
    /// yet".
    #[serde(default)]
    pub truncated: bool,
}

impl LicenseHistory {
    /// Appends `record`, dropping the oldest records beyond the cap.
    pub(crate) fn push(&mut self, record: ChangeRecord) {
        if self.records.len() >= MAX_HISTORY_PER_LICENSE {
            let n_excess = self.records.len() + 1 - MAX_HISTORY_PER_LICENSE;
            self.records.drain(..n_excess);
            self.truncated = true;
        }
        self.records.push(record);
    }
}

/// The license `id` as it was at config version `version`, given that
/// the config is now at `current`: the document of the latest record at
/// or before `version`.
pub(crate) fn as_of(
    history: Option<&LicenseHistory>,
    id: &str,
    version: u64,
    current: u64,
) -> Result<Arc<License>, HistoryError> {
    if version > current {
        return Err(HistoryError::Future { version, current });
    }
    let Some(history) = history.filter(|h| !h.records.is_empty()) else {
        return Err(HistoryError::NoHistory { id: id.to_string() });
    };
    // Records are appended in log order, so versions never decrease.
    let n_at_or_before = history.records.partition_point(|r| r.version <= version);
    let Some(record) = n_at_or_before
        .checked_sub(1)
        .and_then(|idx| history.records.get(idx))
    else {
        let oldest_retained = history.records.first().map_or(0, |r| r.version);
        return Err(if history.truncated {
            HistoryError::OlderThanRetained {
                id: id.to_string(),
                version,
                oldest_retained,
            }
        } else {
            HistoryError::NotYetCreated {
                id: id.to_string(),
                version,
            }
        });
    };
    record
        .document
        .clone()
        .ok_or_else(|| HistoryError::Deleted {
            id: id.to_string(),
            version,
            deleted_at: record.version,
        })
}

/// The diff between two states of a license; `None` is "no license".
///
/// A missing license counts as an object with no fields, so a creation lists
/// every top-level field of the new license as `added` (`id`, `customer`,
/// `keys`, ...) and a deletion lists every top-level field as `removed`.
/// Keys appear only as their stored form (`sha256` and optional `id`).
/// One change of a model or a dataset (models are only ever put; datasets
/// are put or deleted): who, when, why and what changed. Kept per model
/// and per dataset, at most [`MAX_HISTORY_PER_LICENSE`] each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelChangeRecord {
    /// The config version the change was applied at.
    pub version: u64,
    /// Name of the admin token that made the change.
    pub actor: String,
    /// Wall-clock time of the request at the proposing node, unix ms.
    pub at_ms: i64,
    /// Why, as given by the actor.
    #[serde(default)]
    pub reason: Option<String>,
    /// `put` or `delete`; the same shape as license records.
    pub action: ChangeAction,
    /// What changed, from the document before (`{}` when new) to after
    /// (`{}` when deleted).
    #[serde(default)]
    pub diff: Vec<DiffEntry>,
}

/// The structural diff between two versions of a model (`None`: not there).
pub fn diff_models(old: Option<&Model>, new: Option<&Model>) -> Vec<DiffEntry> {
    diff_values(&document_value(old), &document_value(new))
}

/// The structural diff between two versions of a dataset (`None`: not there).
pub fn diff_datasets(old: Option<&Dataset>, new: Option<&Dataset>) -> Vec<DiffEntry> {
    diff_values(&document_value(old), &document_value(new))
}

/// The structural diff between two versions of a license (`None`: not there).
pub fn diff_licenses(old: Option<&License>, new: Option<&License>) -> Vec<DiffEntry> {
    diff_values(&document_value(old), &document_value(new))
}

/// A license or model as JSON; `{}` when absent.
fn document_value<T: Serialize>(document: Option<&T>) -> Value {
    // Serializing a document cannot fail (no maps with non-string keys); if
    // it ever did, an empty object keeps `apply` infallible at the cost of a
    // less precise diff.
    document
        .and_then(|d| serde_json::to_value(d).ok())
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// The structural diff from `old` to `new`, in a deterministic order.
///
/// Objects are compared key by key (keys in sorted order), arrays element by
/// element by index (elements past the shorter one's end are `added` or
/// `removed`), and anything else, including a change of type, is one
/// `changed` entry at that path. The result is empty exactly when
/// `old == new`. Recursion follows the values' nesting, which for licenses
/// is bounded by the schema.
pub fn diff_values(old: &Value, new: &Value) -> Vec<DiffEntry> {
    let mut out = Vec::new();
    let mut path = String::new();
    diff_into(&mut path, old, new, &mut out);
    out
}

fn diff_into(path: &mut String, old: &Value, new: &Value, out: &mut Vec<DiffEntry>) {
    match (old, new) {
        (Value::Object(old_map), Value::Object(new_map)) => {
            let keys: BTreeSet<&String> = old_map.keys().chain(new_map.keys()).collect();
            for key in keys {
                let path_len = path.len();
                push_key(path, key);
                match (old_map.get(key), new_map.get(key)) {
                    (Some(old_value), Some(new_value)) => {
                        diff_into(path, old_value, new_value, out)
                    }
                    (Some(old_value), None) => out.push(entry(
                        path,
                        Change::Removed {
                            old: old_value.clone(),
                        },
                    )),
                    (None, Some(new_value)) => out.push(entry(
                        path,
                        Change::Added {
                            new: new_value.clone(),
                        },
                    )),
                    // Every key came from one of the two maps.
                    (None, None) => {}
                }
                path.truncate(path_len);
            }
        }
        (Value::Array(old_items), Value::Array(new_items)) => {
            for idx in 0..old_items.len().max(new_items.len()) {
                let path_len = path.len();
                path.push('[');
                path.push_str(&idx.to_string());
                path.push(']');
                match (old_items.get(idx), new_items.get(idx)) {
                    (Some(old_value), Some(new_value)) => {
                        diff_into(path, old_value, new_value, out)
                    }
                    (Some(old_value), None) => out.push(entry(
                        path,
                        Change::Removed {
                            old: old_value.clone(),
                        },
                    )),
                    (None, Some(new_value)) => out.push(entry(
                        path,
                        Change::Added {
                            new: new_value.clone(),
                        },
                    )),
                    (None, None) => {}
                }
                path.truncate(path_len);
            }
        }
        _ if old == new => {}
        _ => out.push(entry(
            path,
            Change::Changed {
                old: old.clone(),
                new: new.clone(),
            },
        )),
    }
}

fn entry(path: &str, change: Change) -> DiffEntry {
    DiffEntry {
        path: path.to_string(),
        change,
    }
}

/// Appends object key `key` to `path`: `key` at the top, `.key` below it,
/// `["key"]` when the key has characters that would make the path ambiguous.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push('[');
        // A JSON string literal: quotes, backslashes and control characters
        // are escaped, so the closing `"]` is unambiguous.
        path.push_str(&Value::String(key.to_string()).to_string());
        path.push(']');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(old: Value, new: Value, expected: Value) {
        let diff = diff_values(&old, &new);
        assert_eq!(serde_json::to_value(&diff).unwrap(), expected);
    }

    #[test]
    fn diff_objects_arrays_and_scalars() {
        check(json!({"a": 1}), json!({"a": 1}), json!([]));
        check(
            json!({"quotas": [{"limit": 5, "id": "q"}], "tier": "x"}),
            json!({"quotas": [{"limit": 10, "id": "q"}, {"id": "r"}], "customer": "C"}),
            json!([
                {"path": "customer", "op": "added", "new": "C"},
                {"path": "quotas[0].limit", "op": "changed", "old": 5, "new": 10},
                {"path": "quotas[1]", "op": "added", "new": {"id": "r"}},
                {"path": "tier", "op": "removed", "old": "x"},
            ]),
        );
        check(
            json!([1, 2, 3]),
            json!([1]),
            json!([
                {"path": "[1]", "op": "removed", "old": 2},
                {"path": "[2]", "op": "removed", "old": 3},
            ]),
        );
        // A change of type is one entry; so is a change at the root.
        check(
            json!({"a": {"b": 1}}),
            json!({"a": [1]}),
            json!([{"path": "a", "op": "changed", "old": {"b": 1}, "new": [1]}]),
        );
        check(
            json!(null),
            json!(1),
            json!([{"path": "", "op": "changed", "old": null, "new": 1}]),
        );
        // Keys that would make a path ambiguous are quoted.
        check(
            json!({"a": {"x.y": 1, "": 2}}),
            json!({"a": {"x.y": 3}}),
            json!([
                {"path": "a[\"\"]", "op": "removed", "old": 2},
                {"path": "a[\"x.y\"]", "op": "changed", "old": 1, "new": 3},
            ]),
        );
    }

    #[test]
    fn diff_entry_round_trips_through_json() {
        let diff = diff_values(&json!({"a": 1, "b": [1.5]}), &json!({"b": [2], "c": "x"}));
        let text = serde_json::to_string(&diff).unwrap();
        let back: Vec<DiffEntry> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, diff);
    }

    #[test]
    fn change_action_serde_shape() {
        assert_eq!(
            serde_json::to_value(ChangeAction::Rollback { to_version: 5 }).unwrap(),
            json!({"kind": "rollback", "to_version": 5})
        );
        assert_eq!(
            serde_json::to_value(ChangeAction::RevokeKey).unwrap(),
            json!({"kind": "revoke_key"})
        );
    }
}
