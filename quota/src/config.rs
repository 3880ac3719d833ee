//! The replicated license configuration: the data consensus applies commands to.
//!
//! `Config` holds every license, model and dataset, each one's change
//! history (see [`crate::history`]), plus a derived key-hash index for the
//! hot path.
//! `apply` is deterministic and never panics: every node that applies the
//! same log reaches the same state, history included. This module must not
//! know about usage or decisions, and must not read the clock (`at_ms` in a
//! command is recorded by the proposer, never used for validity here).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::governance::{
    self, Escalation, EscalationStatus, ExceptionStatus, MAX_PENDING_EXCEPTIONS_PER_LICENSE,
    QuotaException,
};
use crate::history::{
    self, ChangeAction, ChangeRecord, DiffEntry, HistoryError, LicenseHistory, ModelChangeRecord,
};
use crate::keys;
use crate::license::{Document, License, LicenseStatus, Model, OnExceed, Quota, StoredKey};

/// Shortest SHA-256 hex prefix [`ConfigOp::RevokeKey`] accepts as a key
/// identifier: 8 hex characters (32 bits) make an accidental match between
/// the few keys of one license practically impossible, and a prefix that
/// still matches two keys is rejected as ambiguous.
pub const MIN_KEY_HASH_PREFIX_LEN: usize = 8;

/// Most audit signing keys the config keeps per node; registering one more
/// drops the oldest. A node registers a new key only when it lost its key
/// file, so a handful covers a node's life.
pub const MAX_KEYS_PER_NODE: usize = 8;

/// One node's audit signing key, as registered through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKey {
    /// The Ed25519 public key, 64 lowercase hex characters.
    pub public_key: String,
    /// The config version that registered it.
    pub since_version: u64,
    /// When the node asked for it (its clock, recorded, never checked).
    pub at_ms: i64,
}

/// The replicated configuration: licenses, models and datasets.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Config {
    /// Raft log index of the last applied entry (the policy version).
    pub version: u64,
    /// Licenses by id.
    #[serde(default)]
    pub licenses: BTreeMap<String, Arc<License>>,
    /// Models by id.
    #[serde(default)]
    pub models: BTreeMap<String, Arc<Model>>,
    /// The dataset registry: datasets by id. Older snapshots without it
    /// load with none.
    #[serde(default)]
    pub datasets: BTreeMap<String, Arc<Dataset>>,
    /// Change history by license id, kept after a license is deleted.
    /// Replicated (snapshots carry it; older snapshots without it load with
    /// empty history). Each entry is shared until its license changes, so
    /// cloning the config stays cheap.
    #[serde(default)]
    history: BTreeMap<String, Arc<LicenseHistory>>,
    /// Change history by model id.
    #[serde(default)]
    model_history: BTreeMap<String, Arc<Vec<ModelChangeRecord>>>,
    /// Change history by dataset id, kept after a dataset is deleted.
    #[serde(default)]
    dataset_history: BTreeMap<String, Arc<Vec<ModelChangeRecord>>>,
    /// Outcomes of recent commands by request id, for de-duplication.
    /// Replicated, so every node answers a retried command the same way.
    /// Shared, so the per-batch publication and admin prechecks, which clone
    /// the config, do not copy it.
    #[serde(default)]
    requests: Arc<RequestLog>,
    /// Quota exceptions by id, requested, approved or rejected (see
    /// [`crate::governance`]). Replicated; shared like `requests`.
    #[serde(default)]
    exceptions: Arc<BTreeMap<String, Arc<QuotaException>>>,
    /// Escalation records by id. Replicated; shared like `requests`.
    #[serde(default)]
    escalations: Arc<BTreeMap<String, Arc<Escalation>>>,
    /// Each node's audit signing keys (Ed25519 public keys), oldest first:
    /// what a checkpoint of that node's audit log is verified against.
    #[serde(default)]
    node_keys: BTreeMap<u64, Vec<NodeKey>>,
    /// SHA-256 of each key -> license id. Derived; rebuilt after a snapshot.
    #[serde(skip)]
    key_index: HashMap<[u8; 32], String, BuildHasherDefault<DigestHasher>>,
    /// Approved exceptions by license id, for [`Config::quota_limit`].
    /// Derived from `exceptions`; rebuilt after a snapshot. Usually empty,
    /// which `decide` checks first.
    #[serde(skip)]
    raises: Arc<BTreeMap<String, Vec<LimitRaise>>>,
    /// Whether any license watches its deny rate. Derived; lets the hot
    /// path skip a license lookup per decision when none does.
    #[serde(skip)]
    deny_rate_watch: bool,
}

/// One approved exception as `decide` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LimitRaise {
    quota: String,
    amount: u64,
    until_ms: i64,
}

/// Hashes a SHA-256 digest by folding its four 8-byte words: the digest is already
/// uniformly distributed, so re-hashing it (SipHash, every `decide`) is wasted
/// work. Flooding is not a concern: only admin commands insert keys, and a
/// lookup of an attacker-chosen digest can only walk chains those made.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as one 32-byte write (plus a length prefix, which
        // goes through `write_usize` below); fold anything else in so the
        // hasher stays correct for any input.
        let mut word = [0u8; 8];
        for chunk in bytes.chunks(8) {
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_usize(&mut self, _len: usize) {
        // The length prefix is the same (32) for every key: no information.
    }
}

/// One admin change, as written into the Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigCommand {
    /// Name of the admin token that made the change.
    pub actor: String,
    /// Why the change was made.
    pub reason: Option<String>,
    /// Wall-clock time of the request at the proposing node, unix ms.
    pub at_ms: i64,
    /// The change itself.
    pub op: ConfigOp,
    /// Idempotency key: a command whose id was applied before (among the
    /// last [`MAX_REMEMBERED_REQUESTS`]) is not applied again; applying it
    /// returns the first outcome. Lets a caller (or a forwarding node) retry
    /// a write whose outcome it did not learn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// How many request ids the config remembers for de-duplication.
pub const MAX_REMEMBERED_REQUESTS: usize = 1024;

/// Outcomes of recently applied commands, by request id (oldest first).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RequestLog {
    order: VecDeque<String>,
    outcomes: BTreeMap<String, ApplyOutcome>,
}

impl RequestLog {
    fn get(&self, id: &str) -> Option<&ApplyOutcome> {
        self.outcomes.get(id)
    }

    fn remember(&mut self, id: &str, outcome: &ApplyOutcome) {
        if self
            .outcomes
            .insert(id.to_string(), outcome.clone())
            .is_none()
        {
            self.order.push_back(id.to_string());
        }
        while self.order.len() > MAX_REMEMBERED_REQUESTS {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }
}

/// The change a command makes.
// Unboxed on purpose: commands are rare (admin writes), and callers build and
// match `PutLicense(license)` directly.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ConfigOp {
    /// Create or replace a license.
    PutLicense(License),
    /// Mark a license revoked (it stays in the config, denying with `license_revoked`).
    RevokeLicense {
        /// License id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Add one key (hash) to a license.
    AddKey {
        /// License id.
        license_id: String,
        /// The key's hash and name.
        key: StoredKey,
    },
    /// Create or replace a model.
    PutModel(Model),
    /// Remove a license and its keys. Its history is kept.
    DeleteLicense {
        /// License id.
        id: String,
    },
    /// Remove one key from a license, so it stops resolving at once.
    RevokeKey {
        /// License id.
        license_id: String,
        /// The key's name (`StoredKey::id`) or, when no key has that name, a
        /// unique prefix of its SHA-256 hex of at least
        /// [`MIN_KEY_HASH_PREFIX_LEN`] characters.
        key_id: String,
    },
    /// Apply every op in order, all or nothing, as one config version (a
    /// multi-document apply). With `only_if_empty`, applied only to a config
    /// that never held a license or model (seed documents): proposing it
    /// again later, from any node, changes nothing.
    Batch {
        /// The ops; a nested batch is rejected.
        ops: Vec<ConfigOp>,
        /// Apply only to an empty, never-used config.
        only_if_empty: bool,
    },
    /// Create or replace a dataset in the registry.
    PutDataset(Dataset),
    /// Remove a dataset from the registry; lineage naming it is then
    /// `dataset_unknown`. Its history is kept.
    DeleteDataset {
        /// Dataset id.
        id: String,
    },
    /// Write back a license's content as of config version `to_version`
    /// (from its history), with the same checks as `PutLicense`. This
    /// restores the keys and status of that time too, including keys revoked
    /// since. History is appended to, never rewritten.
    RollbackLicense {
        /// License id.
        id: String,
        /// The config version whose content to restore.
        to_version: u64,
    },
    /// Ask for a quota exception: raise `quota_id` of `license_id` by
    /// `amount` once approved. The command's reason is the request's
    /// (required); the exception's id is `exc-<log index>`. At most
    /// [`MAX_PENDING_EXCEPTIONS_PER_LICENSE`] may be pending per license.
    RequestException {
        /// License id.
        license_id: String,
        /// Quota id.
        quota_id: String,
        /// Units to raise the limit by, at least 1.
        amount: u64,
        /// Until when the caller would like it (unix ms).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_until_ms: Option<i64>,
    },
    /// Approve a pending exception: its quota's limit is raised by its
    /// amount until `until_ms`.
    ApproveException {
        /// Exception id.
        id: String,
        /// When the raise ends (unix ms, exclusive).
        until_ms: i64,
    },
    /// Reject a pending exception; the command's reason is required.
    RejectException {
        /// Exception id.
        id: String,
    },
    /// Record that an approved exception has ended (a node saw its
    /// `until_ms` pass). History only: the raise ends at `until_ms`
    /// whether or not this is ever applied.
    ExpireException {
        /// Exception id.
        id: String,
    },
    /// Open the escalation for a violation of `rule` (a quota whose
    /// `on_exceed` is `escalate`) in window `window_epoch`. At most one
    /// record per (license, rule, window): opening it again changes nothing.
    OpenEscalation {
        /// License id.
        license_id: String,
        /// The rule, `quotas[<id>]`.
        rule: String,
        /// The quota's window epoch.
        window_epoch: u64,
    },
    /// Mark an open escalation acknowledged.
    AcknowledgeEscalation {
        /// Escalation id.
        id: String,
    },
    /// Mark an escalation resolved; the command's reason is the resolution.
    ResolveEscalation {
        /// Escalation id.
        id: String,
    },
    /// Registers a node's audit signing key (Ed25519 public key), so that
    /// anyone holding the config can verify the checkpoints of that node's
    /// audit log. Registering a key the node already has changes nothing.
    RegisterNodeKey {
        /// The node.
        node_id: u64,
        /// The public key, 64 hex characters.
        public_key: String,
    },
}

impl ConfigOp {
    /// A stable snake_case name of the op, for audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigOp::PutLicense(_) => "put_license",
            ConfigOp::RevokeLicense { .. } => "revoke_license",
            ConfigOp::AddKey { .. } => "add_key",
            ConfigOp::PutModel(_) => "put_model",
            ConfigOp::DeleteLicense { .. } => "delete_license",
            ConfigOp::RevokeKey { .. } => "revoke_key",
            ConfigOp::Batch { .. } => "batch",
            ConfigOp::RollbackLicense { .. } => "rollback_license",
            ConfigOp::PutDataset(_) => "put_dataset",
            ConfigOp::DeleteDataset { .. } => "delete_dataset",
            ConfigOp::RequestException { .. } => "request_exception",
            ConfigOp::ApproveException { .. } => "approve_exception",
            ConfigOp::RejectException { .. } => "reject_exception",
            ConfigOp::ExpireException { .. } => "expire_exception",
            ConfigOp::OpenEscalation { .. } => "open_escalation",
            ConfigOp::AcknowledgeEscalation { .. } => "acknowledge_escalation",
            ConfigOp::ResolveEscalation { .. } => "resolve_escalation",
            ConfigOp::RegisterNodeKey { .. } => "register_node_key",
        }
    }

    /// What the op touches, as `kind:id` strings (ids and key hashes only,
    /// never document content), in op order; a batch lists its ops'.
    pub fn targets(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.push_targets(&mut out);
        out
    }

    fn push_targets(&self, out: &mut Vec<String>) {
        match self {
            ConfigOp::PutLicense(l) => out.push(format!("license:{}", l.id)),
            ConfigOp::RevokeLicense { id, .. }
            | ConfigOp::DeleteLicense { id }
            | ConfigOp::RollbackLicense { id, .. } => out.push(format!("license:{id}")),
            ConfigOp::AddKey { license_id, key } => {
                out.push(format!("license:{license_id}"));
                let prefix: String = key.sha256.chars().take(16).collect();
                out.push(format!("key:{}", prefix.to_ascii_lowercase()));
            }
            ConfigOp::RevokeKey { license_id, key_id } => {
                out.push(format!("license:{license_id}"));
                out.push(format!("key:{key_id}"));
            }
            ConfigOp::PutModel(m) => out.push(format!("model:{}", m.id)),
            ConfigOp::Batch { ops, .. } => {
                for op in ops {
                    op.push_targets(out);
                }
            }
            ConfigOp::PutDataset(d) => out.push(format!("dataset:{}", d.id)),
            ConfigOp::DeleteDataset { id } => out.push(format!("dataset:{id}")),
            ConfigOp::RequestException {
                license_id,
                quota_id,
                ..
            } => {
                out.push(format!("license:{license_id}"));
                out.push(format!("quota:{quota_id}"));
            }
            ConfigOp::ApproveException { id, .. }
            | ConfigOp::RejectException { id }
            | ConfigOp::ExpireException { id } => out.push(format!("exception:{id}")),
            ConfigOp::OpenEscalation { license_id, .. } => {
                out.push(format!("license:{license_id}"));
            }
            ConfigOp::AcknowledgeEscalation { id } | ConfigOp::ResolveEscalation { id } => {
                out.push(format!("escalation:{id}"));
            }
            ConfigOp::RegisterNodeKey { node_id, .. } => out.push(format!("node:{node_id}")),
        }
    }
}

/// Largest amount one exception may raise a limit by.
pub const MAX_EXCEPTION_AMOUNT: u64 = 1 << 40;

/// A license change `apply_op` made, for the history record.
struct LicenseChange {
    id: String,
    action: ChangeAction,
    /// The license before the change.
    before: Option<Arc<License>>,
    /// The diff to record instead of the license's own (a change to an
    /// exception or escalation of the license, which leaves it unchanged).
    diff: Option<Vec<DiffEntry>>,
}

impl LicenseChange {
    fn of_license(id: &str, action: ChangeAction, before: Option<Arc<License>>) -> Self {
        Self {
            id: id.to_string(),
            action,
            before,
            diff: None,
        }
    }
}

/// The diff of one governance record (`section` is `exceptions` or
/// `escalations`) from `old` to `new`, under `<section>.<id>`.
fn record_diff<T: Serialize>(
    section: &str,
    id: &str,
    old: Option<&T>,
    new: Option<&T>,
) -> Vec<DiffEntry> {
    let wrap = |v: Option<&T>| {
        let mut inner = serde_json::Map::new();
        if let Some(v) = v.and_then(|v| serde_json::to_value(v).ok()) {
            inner.insert(id.to_string(), v);
        }
        let mut outer = serde_json::Map::new();
        outer.insert(section.to_string(), serde_json::Value::Object(inner));
        serde_json::Value::Object(outer)
    };
    history::diff_values(&wrap(old), &wrap(new))
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ApplyOutcome {
    /// Applied; the config is now at `version`.
    Applied {
        /// The new policy version.
        version: u64,
    },
    /// Not applied (the state is unchanged apart from the version).
    Rejected {
        /// The new policy version.
        version: u64,
        /// Why it was not applied.
        reason: String,
    },
}

impl Config {
    /// Applies `cmd` at log index `index`. Deterministic and infallible: a
    /// command that cannot apply is `Rejected` and changes nothing else (no
    /// history record either). An applied command that touches a license
    /// appends one [`ChangeRecord`] to that license's history.
    pub fn apply(&mut self, cmd: &ConfigCommand, index: u64) -> ApplyOutcome {
        if let Some(id) = &cmd.request_id
            && let Some(first) = self.requests.get(id)
        {
            let first = first.clone();
            self.version = index;
            return first;
        }
        let outcome = self.apply_new(cmd, index);
        if let Some(id) = &cmd.request_id {
            Arc::make_mut(&mut self.requests).remember(id, &outcome);
        }
        self.deny_rate_watch = self.any_deny_rate_watch();
        outcome
    }

    fn any_deny_rate_watch(&self) -> bool {
        self.licenses.values().any(|l| {
            l.governance
                .as_ref()
                .and_then(|g| g.anomalies.as_ref())
                .is_some_and(|a| a.deny_rate.is_some())
        })
    }

    /// Whether any license watches its deny rate (see
    /// `license::Anomalies::deny_rate`).
    pub fn watches_deny_rate(&self) -> bool {
        self.deny_rate_watch
    }

    fn apply_new(&mut self, cmd: &ConfigCommand, index: u64) -> ApplyOutcome {
        let previous_version = self.version;
        self.version = index;
        if let ConfigOp::Batch { ops, only_if_empty } = &cmd.op {
            return match self.apply_batch(cmd, ops, *only_if_empty, previous_version, index) {
                Ok(()) => ApplyOutcome::Applied { version: index },
                Err(reason) => ApplyOutcome::Rejected {
                    version: index,
                    reason,
                },
            };
        }
        match self.apply_recorded(&cmd.op, cmd, index, previous_version) {
            Ok(()) => ApplyOutcome::Applied { version: index },
            Err(reason) => ApplyOutcome::Rejected {
                version: index,
                reason,
            },
        }
    }

    /// Applies one (non-batch) op and records it in the license or model
    /// history.
    fn apply_recorded(
        &mut self,
        op: &ConfigOp,
        cmd: &ConfigCommand,
        index: u64,
        previous_version: u64,
    ) -> Result<(), String> {
        if let ConfigOp::RegisterNodeKey {
            node_id,
            public_key,
        } = op
        {
            return self.register_node_key(*node_id, public_key, index, cmd.at_ms);
        }
        let record = |action: ChangeAction, diff: Vec<history::DiffEntry>| ModelChangeRecord {
            version: index,
            actor: cmd.actor.clone(),
            at_ms: cmd.at_ms,
            reason: cmd.reason.clone(),
            action,
            diff,
        };
        match op {
            ConfigOp::PutModel(model) => {
                let before = self.models.get(&model.id).cloned();
                self.apply_op(op, cmd, index, previous_version)?;
                let after = self.models.get(&model.id).cloned();
                let diff = history::diff_models(before.as_deref(), after.as_deref());
                push_capped(
                    &mut self.model_history,
                    &model.id,
                    record(ChangeAction::Put, diff),
                );
                return Ok(());
            }
            ConfigOp::PutDataset(dataset) => {
                let before = self.datasets.get(&dataset.id).cloned();
                self.apply_op(op, cmd, index, previous_version)?;
                let after = self.datasets.get(&dataset.id).cloned();
                let diff = history::diff_datasets(before.as_deref(), after.as_deref());
                push_capped(
                    &mut self.dataset_history,
                    &dataset.id,
                    record(ChangeAction::Put, diff),
                );
                return Ok(());
            }
            ConfigOp::DeleteDataset { id } => {
                let before = self.datasets.get(id).cloned();
                self.apply_op(op, cmd, index, previous_version)?;
                let diff = history::diff_datasets(before.as_deref(), None);
                push_capped(
                    &mut self.dataset_history,
                    id,
                    record(ChangeAction::Delete, diff),
                );
                self.prune_deleted_dataset_histories();
                return Ok(());
            }
            _ => {}
        }
        if let Some(change) = self.apply_op(op, cmd, index, previous_version)? {
            self.record(cmd, index, change);
        }
        Ok(())
    }

    /// Adds `public_key` to node `node_id`'s audit keys (a no-op if it is
    /// there already), dropping the oldest beyond [`MAX_KEYS_PER_NODE`].
    fn register_node_key(
        &mut self,
        node_id: u64,
        public_key: &str,
        index: u64,
        at_ms: i64,
    ) -> Result<(), String> {
        let public_key = public_key.to_ascii_lowercase();
        if public_key.len() != 64 || !public_key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("node key: must be 64 hex characters (an Ed25519 public key)".to_string());
        }
        let keys = self.node_keys.entry(node_id).or_default();
        if keys.iter().any(|k| k.public_key == public_key) {
            return Ok(());
        }
        if keys.len() >= MAX_KEYS_PER_NODE {
            keys.remove(0);
        }
        keys.push(NodeKey {
            public_key,
            since_version: index,
            at_ms,
        });
        Ok(())
    }

    /// Applies a batch to a copy and keeps the copy only if every op applied.
    fn apply_batch(
        &mut self,
        cmd: &ConfigCommand,
        ops: &[ConfigOp],
        only_if_empty: bool,
        previous_version: u64,
        index: u64,
    ) -> Result<(), String> {
        if only_if_empty
            && !(self.licenses.is_empty()
                && self.models.is_empty()
                && self.datasets.is_empty()
                && self.history.is_empty()
                && self.dataset_history.is_empty())
        {
            return Err("the config already holds licenses, models or datasets".to_string());
        }
        let mut trial = self.clone();
        for (i, op) in ops.iter().enumerate() {
            if matches!(op, ConfigOp::Batch { .. }) {
                return Err(format!("op {i}: a batch cannot contain a batch"));
            }
            trial
                .apply_recorded(op, cmd, index, previous_version)
                .map_err(|e| format!("op {i}: {e}"))?;
        }
        *self = trial;
        Ok(())
    }

    /// Applies `op` on a config last changed at `previous_version`; returns
    /// the license change to record, if any. Must check everything before
    /// changing anything.
    fn apply_op(
        &mut self,
        op: &ConfigOp,
        cmd: &ConfigCommand,
        index: u64,
        previous_version: u64,
    ) -> Result<Option<LicenseChange>, String> {
        match op {
            ConfigOp::PutLicense(license) => {
                let before = self.put_license(Arc::new(license.clone()))?;
                Ok(Some(LicenseChange::of_license(
                    &license.id,
                    ChangeAction::Put,
                    before,
                )))
            }
            ConfigOp::RevokeLicense { id, reason } => {
                let license = self
                    .licenses
                    .get_mut(id)
                    .ok_or_else(|| format!("unknown license {id:?}"))?;
                let before = Arc::clone(license);
                Arc::make_mut(license).status = LicenseStatus::Revoked {
                    reason: Some(reason.clone()),
                };
                Ok(Some(LicenseChange::of_license(
                    id,
                    ChangeAction::Revoke,
                    Some(before),
                )))
            }
            ConfigOp::AddKey { license_id, key } => {
                let hash = keys::decode_hash(&key.sha256.to_ascii_lowercase())
                    .ok_or_else(|| "key sha256 must be 64 hex characters".to_string())?;
                let Some(license) = self.licenses.get_mut(license_id) else {
                    return Err(format!("unknown license {license_id:?}"));
                };
                let before = Arc::clone(license);
                let change = Some(LicenseChange::of_license(
                    license_id,
                    ChangeAction::AddKey,
                    Some(Arc::clone(&before)),
                ));
                match self.key_index.get(&hash) {
                    // Already there: applied, and recorded (with an empty
                    // diff) so the audit trail shows every applied command.
                    Some(owner) if owner == license_id => return Ok(change),
                    Some(owner) => return Err(format!("key is already used by license {owner:?}")),
                    None => {}
                }
                let mut stored = key.clone();
                stored.sha256 = hex::encode(hash);
                let mut updated = License::clone(&before);
                updated.keys.push(stored);
                updated
                    .validate()
                    .map_err(|e| format!("invalid key: {e}"))?;
                *license = Arc::new(updated);
                self.key_index.insert(hash, license_id.clone());
                Ok(change)
            }
            ConfigOp::PutModel(model) => {
                model
                    .validate()
                    .map_err(|e| format!("invalid model: {e}"))?;
                self.models
                    .insert(model.id.clone(), Arc::new(model.clone()));
                Ok(None)
            }
            ConfigOp::PutDataset(dataset) => {
                dataset
                    .validate()
                    .map_err(|e| format!("invalid dataset: {e}"))?;
                self.datasets
                    .insert(dataset.id.clone(), Arc::new(dataset.clone()));
                Ok(None)
            }
            ConfigOp::DeleteDataset { id } => {
                if self.datasets.remove(id).is_none() {
                    return Err(format!("unknown dataset {id:?}"));
                }
                Ok(None)
            }
            ConfigOp::DeleteLicense { id } => {
                self.remove_keys_of(id);
                let Some(before) = self.licenses.remove(id) else {
                    return Err(format!("unknown license {id:?}"));
                };
                Ok(Some(LicenseChange::of_license(
                    id,
                    ChangeAction::Delete,
                    Some(before),
                )))
            }
            ConfigOp::RevokeKey { license_id, key_id } => {
                let Some(license) = self.licenses.get(license_id) else {
                    return Err(format!("unknown license {license_id:?}"));
                };
                let before = Arc::clone(license);
                let key_idx = find_key(&before.keys, key_id)
                    .map_err(|e| format!("license {license_id:?}: {e}"))?;
                let mut updated = License::clone(&before);
                let removed = updated.keys.remove(key_idx);
                updated
                    .validate()
                    .map_err(|e| format!("invalid license without the key: {e}"))?;
                if let Some(hash) = keys::decode_hash(&removed.sha256.to_ascii_lowercase())
                    && self
                        .key_index
                        .get(&hash)
                        .is_some_and(|owner| owner == license_id)
                {
                    self.key_index.remove(&hash);
                }
                self.licenses.insert(license_id.clone(), Arc::new(updated));
                Ok(Some(LicenseChange::of_license(
                    license_id,
                    ChangeAction::RevokeKey,
                    Some(before),
                )))
            }
            ConfigOp::Batch { .. } => Err("a batch must be applied as a whole".to_string()),
            ConfigOp::RegisterNodeKey { .. } => {
                Err("a node key is registered with its command".to_string())
            }
            ConfigOp::RollbackLicense { id, to_version } => {
                // `to_version` must already have been applied when this
                // command was proposed: the current index is not a version
                // one can name content of.
                let document = history::as_of(
                    self.history.get(id).map(|h| &**h),
                    id,
                    *to_version,
                    previous_version,
                )
                .map_err(|e| format!("cannot roll back: {e}"))?;
                let before = self.put_license(document)?;
                Ok(Some(LicenseChange::of_license(
                    id,
                    ChangeAction::Rollback {
                        to_version: *to_version,
                    },
                    before,
                )))
            }
            ConfigOp::RequestException {
                license_id,
                quota_id,
                amount,
                requested_until_ms,
            } => self.request_exception(
                cmd,
                index,
                license_id,
                quota_id,
                *amount,
                *requested_until_ms,
            ),
            ConfigOp::ApproveException { id, until_ms } => {
                self.decide_exception(cmd, id, Some(*until_ms))
            }
            ConfigOp::RejectException { id } => self.decide_exception(cmd, id, None),
            ConfigOp::ExpireException { id } => self.expire_exception(id),
            ConfigOp::OpenEscalation {
                license_id,
                rule,
                window_epoch,
            } => self.open_escalation(cmd, index, license_id, rule, *window_epoch),
            ConfigOp::AcknowledgeEscalation { id } => {
                self.update_escalation(cmd, id, EscalationStatus::Acknowledged)
            }
            ConfigOp::ResolveEscalation { id } => {
                self.update_escalation(cmd, id, EscalationStatus::Resolved)
            }
        }
    }

    fn request_exception(
        &mut self,
        cmd: &ConfigCommand,
        index: u64,
        license_id: &str,
        quota_id: &str,
        amount: u64,
        requested_until_ms: Option<i64>,
    ) -> Result<Option<LicenseChange>, String> {
        let license = Arc::clone(
            self.licenses
                .get(license_id)
                .ok_or_else(|| format!("unknown license {license_id:?}"))?,
        );
        if !license.quotas.iter().any(|q| q.id == quota_id) {
            return Err(format!("license {license_id:?} has no quota {quota_id:?}"));
        }
        if !(1..=MAX_EXCEPTION_AMOUNT).contains(&amount) {
            return Err(format!("amount: must be 1 to {MAX_EXCEPTION_AMOUNT}"));
        }
        let reason = governance::check_reason(cmd.reason.as_deref())?.to_string();
        let n_pending = self
            .exceptions
            .values()
            .filter(|e| e.license == license_id && e.status == ExceptionStatus::Pending)
            .count();
        if n_pending >= MAX_PENDING_EXCEPTIONS_PER_LICENSE {
            return Err(format!(
                "license {license_id:?} already has {n_pending} pending exceptions; wait for an administrator to decide them"
            ));
        }
        let id = governance::exception_id(index);
        if self.exceptions.contains_key(&id) {
            return Err(format!(
                "exception {id} exists (one request per config version)"
            ));
        }
        if !self.make_room_for_exception() {
            return Err(format!(
                "{} exceptions are pending; decide some first",
                governance::MAX_EXCEPTIONS
            ));
        }
        let before = Some(license);
        let exception = QuotaException {
            id: id.clone(),
            license: license_id.to_string(),
            quota: quota_id.to_string(),
            amount,
            reason,
            requested_by: cmd.actor.clone(),
            requested_at_ms: cmd.at_ms,
            requested_until_ms,
            status: ExceptionStatus::Pending,
            until_ms: None,
            decided_by: None,
            decided_at_ms: None,
            decision_reason: None,
        };
        let diff = record_diff("exceptions", &id, None, Some(&exception));
        Arc::make_mut(&mut self.exceptions).insert(id.clone(), Arc::new(exception));
        Ok(Some(LicenseChange {
            id: license_id.to_string(),
            action: ChangeAction::ExceptionRequested { exception: id },
            before,
            diff: Some(diff),
        }))
    }

    /// Drops decided exceptions until one more fits (rejected first, then
    /// approved by earliest end, then id). False if every kept one is
    /// pending. Deterministic: no clock.
    fn make_room_for_exception(&mut self) -> bool {
        while self.exceptions.len() >= governance::MAX_EXCEPTIONS {
            let victim = self
                .exceptions
                .values()
                .filter(|e| e.status != ExceptionStatus::Pending)
                .min_by_key(|e| {
                    (
                        e.status.was_approved(),
                        e.until_ms.unwrap_or(i64::MIN),
                        e.id.clone(),
                    )
                })
                .map(|e| (e.id.clone(), e.license.clone()));
            let Some((id, license)) = victim else {
                return false;
            };
            Arc::make_mut(&mut self.exceptions).remove(&id);
            self.rebuild_raises_of(&license);
        }
        true
    }

    /// Approves (`until_ms` given) or rejects a pending exception.
    fn decide_exception(
        &mut self,
        cmd: &ConfigCommand,
        id: &str,
        until_ms: Option<i64>,
    ) -> Result<Option<LicenseChange>, String> {
        let current = self
            .exceptions
            .get(id)
            .ok_or_else(|| format!("unknown exception {id:?}"))?;
        if current.status != ExceptionStatus::Pending {
            return Err(format!(
                "exception {id} is already {}",
                current.status.as_str()
            ));
        }
        let license = self
            .licenses
            .get(&current.license)
            .ok_or_else(|| format!("license {:?} no longer exists", current.license))?;
        let mut updated = QuotaException::clone(current);
        let action = match until_ms {
            Some(until_ms) => {
                if !license.quotas.iter().any(|q| q.id == current.quota) {
                    return Err(format!(
                        "license {:?} no longer has quota {:?}",
                        current.license, current.quota
                    ));
                }
                if until_ms <= current.requested_at_ms {
                    return Err("until: must be after the request".to_string());
                }
                updated.status = ExceptionStatus::Approved;
                updated.until_ms = Some(until_ms);
                updated.decision_reason = cmd
                    .reason
                    .as_deref()
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(str::to_string);
                ChangeAction::ExceptionApproved {
                    exception: id.to_string(),
                    until_ms,
                }
            }
            None => {
                updated.status = ExceptionStatus::Rejected;
                updated.decision_reason =
                    Some(governance::check_reason(cmd.reason.as_deref())?.to_string());
                ChangeAction::ExceptionRejected {
                    exception: id.to_string(),
                }
            }
        };
        updated.decided_by = Some(cmd.actor.clone());
        updated.decided_at_ms = Some(cmd.at_ms);
        let before = Some(Arc::clone(license));
        let license_id = updated.license.clone();
        let diff = record_diff("exceptions", id, Some(&**current), Some(&updated));
        Arc::make_mut(&mut self.exceptions).insert(id.to_string(), Arc::new(updated));
        self.rebuild_raises_of(&license_id);
        Ok(Some(LicenseChange {
            id: license_id,
            action,
            before,
            diff: Some(diff),
        }))
    }

    /// Marks an approved exception expired (see [`ConfigOp::ExpireException`]).
    fn expire_exception(&mut self, id: &str) -> Result<Option<LicenseChange>, String> {
        let current = self
            .exceptions
            .get(id)
            .ok_or_else(|| format!("unknown exception {id:?}"))?;
        if current.status != ExceptionStatus::Approved {
            return Err(format!(
                "exception {id} is {}, not approved",
                current.status.as_str()
            ));
        }
        let mut updated = QuotaException::clone(current);
        updated.status = ExceptionStatus::Expired;
        let license_id = updated.license.clone();
        let before = self.licenses.get(&license_id).cloned();
        let diff = record_diff("exceptions", id, Some(&**current), Some(&updated));
        Arc::make_mut(&mut self.exceptions).insert(id.to_string(), Arc::new(updated));
        Ok(Some(LicenseChange {
            id: license_id,
            action: ChangeAction::ExceptionExpired {
                exception: id.to_string(),
            },
            before,
            diff: Some(diff),
        }))
    }

    fn open_escalation(
        &mut self,
        cmd: &ConfigCommand,
        index: u64,
        license_id: &str,
        rule: &str,
        window_epoch: u64,
    ) -> Result<Option<LicenseChange>, String> {
        let license = Arc::clone(
            self.licenses
                .get(license_id)
                .ok_or_else(|| format!("unknown license {license_id:?}"))?,
        );
        let escalates = rule
            .strip_prefix("quotas[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|q| license.quotas.iter().find(|quota| quota.id == q))
            .is_some_and(|q| q.on_exceed == OnExceed::Escalate);
        if !escalates {
            return Err(format!(
                "rule {rule:?} of license {license_id:?} is not a quota that escalates"
            ));
        }
        let governance = license
            .governance
            .as_ref()
            .ok_or_else(|| format!("license {license_id:?} has no governance owner"))?;
        let owner = governance.owner.clone();
        // Derived here, not by the proposer: every replica computes the
        // same deadline from the command's own timestamp.
        let deadline_ms = cmd
            .at_ms
            .saturating_add(i64::try_from(governance.escalation_deadline_ms()).unwrap_or(i64::MAX));
        let id = governance::escalation_id(license_id, rule, window_epoch);
        if self.escalations.contains_key(&id) {
            // Every node that sees the violation proposes it: the first
            // one opens it, the others change nothing.
            return Ok(None);
        }
        if !self.make_room_for_escalation() {
            return Err(format!(
                "{} escalations are unresolved; resolve some first",
                governance::MAX_ESCALATIONS
            ));
        }
        let escalation = Escalation {
            id: id.clone(),
            license: license_id.to_string(),
            rule: rule.to_string(),
            window_epoch,
            owner,
            opened_at_ms: cmd.at_ms,
            deadline_ms,
            opened_by: cmd.actor.clone(),
            version: index,
            status: EscalationStatus::Open,
            updated_by: None,
            updated_at_ms: None,
            resolution: None,
        };
        let diff = record_diff("escalations", &id, None, Some(&escalation));
        Arc::make_mut(&mut self.escalations).insert(id.clone(), Arc::new(escalation));
        Ok(Some(LicenseChange {
            id: license_id.to_string(),
            action: ChangeAction::EscalationOpened { escalation: id },
            before: Some(license),
            diff: Some(diff),
        }))
    }

    /// Drops resolved escalations, earliest opened first, until one more
    /// fits. False if every kept one is unresolved.
    fn make_room_for_escalation(&mut self) -> bool {
        while self.escalations.len() >= governance::MAX_ESCALATIONS {
            let victim = self
                .escalations
                .values()
                .filter(|e| e.status == EscalationStatus::Resolved)
                .min_by_key(|e| (e.version, e.id.clone()))
                .map(|e| e.id.clone());
            let Some(id) = victim else {
                return false;
            };
            Arc::make_mut(&mut self.escalations).remove(&id);
        }
        true
    }

    fn update_escalation(
        &mut self,
        cmd: &ConfigCommand,
        id: &str,
        status: EscalationStatus,
    ) -> Result<Option<LicenseChange>, String> {
        let current = self
            .escalations
            .get(id)
            .ok_or_else(|| format!("unknown escalation {id:?}"))?;
        match (current.status, status) {
            (EscalationStatus::Resolved, _) => {
                return Err(format!("escalation {id} is already resolved"));
            }
            (EscalationStatus::Acknowledged, EscalationStatus::Acknowledged) => {
                return Err(format!("escalation {id} is already acknowledged"));
            }
            _ => {}
        }
        let mut updated = Escalation::clone(current);
        updated.status = status;
        updated.updated_by = Some(cmd.actor.clone());
        updated.updated_at_ms = Some(cmd.at_ms);
        let reason = cmd
            .reason
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string);
        if status == EscalationStatus::Resolved {
            updated.resolution = reason;
        }
        let action = match status {
            EscalationStatus::Resolved => ChangeAction::EscalationResolved {
                escalation: id.to_string(),
            },
            _ => ChangeAction::EscalationAcknowledged {
                escalation: id.to_string(),
            },
        };
        let license_id = updated.license.clone();
        let before = self.licenses.get(&license_id).cloned();
        let diff = record_diff("escalations", id, Some(&**current), Some(&updated));
        Arc::make_mut(&mut self.escalations).insert(id.to_string(), Arc::new(updated));
        Ok(Some(LicenseChange {
            id: license_id,
            action,
            before,
            diff: Some(diff),
        }))
    }

    /// Recomputes the approved exceptions of `license_id` that
    /// [`Self::quota_limit`] reads.
    fn rebuild_raises_of(&mut self, license_id: &str) {
        let list: Vec<LimitRaise> = self
            .exceptions
            .values()
            .filter(|e| e.license == license_id && e.status.was_approved())
            .filter_map(|e| {
                Some(LimitRaise {
                    quota: e.quota.clone(),
                    amount: e.amount,
                    until_ms: e.until_ms?,
                })
            })
            .collect();
        let raises = Arc::make_mut(&mut self.raises);
        if list.is_empty() {
            raises.remove(license_id);
        } else {
            raises.insert(license_id.to_string(), list);
        }
    }

    /// The limit of `quota` of license `license_id` in force at `now_ms`:
    /// its `limit` plus the amount of every approved exception for it that
    /// has not ended. Pure and cheap: with no approved exception anywhere
    /// it is one emptiness test.
    pub fn quota_limit(&self, license_id: &str, quota: &Quota, now_ms: i64) -> u64 {
        if self.raises.is_empty() {
            return quota.limit;
        }
        let Some(list) = self.raises.get(license_id) else {
            return quota.limit;
        };
        list.iter()
            .filter(|r| r.quota == quota.id && now_ms < r.until_ms)
            .fold(quota.limit, |limit, r| limit.saturating_add(r.amount))
    }

    /// Every exception, by id.
    pub fn exceptions(&self) -> impl Iterator<Item = &QuotaException> {
        self.exceptions.values().map(|e| &**e)
    }

    /// The exception with `id`.
    pub fn exception(&self, id: &str) -> Option<&QuotaException> {
        self.exceptions.get(id).map(|e| &**e)
    }

    /// Every escalation record, by id.
    pub fn escalations(&self) -> impl Iterator<Item = &Escalation> {
        self.escalations.values().map(|e| &**e)
    }

    /// The escalation with `id`.
    pub fn escalation(&self, id: &str) -> Option<&Escalation> {
        self.escalations.get(id).map(|e| &**e)
    }

    /// Creates or replaces `license` after validating it and checking that
    /// no other license owns one of its keys; returns the license it replaced.
    fn put_license(&mut self, license: Arc<License>) -> Result<Option<Arc<License>>, String> {
        // Commands arrive from the log, possibly written by an older or
        // hostile proposer, and history may predate today's rules: validate
        // again rather than trust either.
        license
            .validate()
            .map_err(|e| format!("invalid license: {e}"))?;
        for key in &license.keys {
            let hash =
                keys::decode_hash(&key.sha256).ok_or_else(|| "invalid key hash".to_string())?;
            if let Some(owner) = self.key_index.get(&hash)
                && owner != &license.id
            {
                return Err(format!("a key is already used by license {owner:?}"));
            }
        }
        self.remove_keys_of(&license.id);
        for key in &license.keys {
            if let Some(hash) = keys::decode_hash(&key.sha256) {
                self.key_index.insert(hash, license.id.clone());
            }
        }
        Ok(self.licenses.insert(license.id.clone(), license))
    }

    /// Appends the history record of an applied license change.
    fn record(&mut self, cmd: &ConfigCommand, index: u64, change: LicenseChange) {
        let after = self.licenses.get(&change.id).cloned();
        let after_deleted = after.is_none();
        let diff = match change.diff {
            Some(diff) => diff,
            None => history::diff_licenses(change.before.as_deref(), after.as_deref()),
        };
        let record = ChangeRecord {
            version: index,
            actor: cmd.actor.clone(),
            at_ms: cmd.at_ms,
            reason: cmd.reason.clone(),
            action: change.action,
            diff,
            document: after,
        };
        let entry = self.history.entry(change.id).or_insert_with(|| {
            // A license that exists without history predates history
            // keeping (an older snapshot): its earlier content is unknown.
            Arc::new(LicenseHistory {
                records: Vec::new(),
                truncated: change.before.is_some(),
            })
        });
        // Copies this license's records only if a published config still
        // shares them.
        Arc::make_mut(entry).push(record);
        if after_deleted {
            self.prune_deleted_histories();
        }
    }

    /// Drops the history of the licenses deleted longest ago beyond
    /// [`history::MAX_DELETED_HISTORIES`]. Deterministic: ordered by the
    /// version of their last record, then id.
    fn prune_deleted_histories(&mut self) {
        let mut deleted: Vec<(u64, String)> = self
            .history
            .iter()
            .filter(|(id, _)| !self.licenses.contains_key(*id))
            .map(|(id, h)| (h.records.last().map_or(0, |r| r.version), id.clone()))
            .collect();
        if deleted.len() <= history::MAX_DELETED_HISTORIES {
            return;
        }
        deleted.sort();
        let n_excess = deleted.len() - history::MAX_DELETED_HISTORIES;
        for (_, id) in deleted.into_iter().take(n_excess) {
            self.history.remove(&id);
        }
    }

    /// Drops the history of the datasets deleted longest ago beyond
    /// [`history::MAX_DELETED_HISTORIES`], like licenses'.
    fn prune_deleted_dataset_histories(&mut self) {
        let mut deleted: Vec<(u64, String)> = self
            .dataset_history
            .iter()
            .filter(|(id, _)| !self.datasets.contains_key(*id))
            .map(|(id, h)| (h.last().map_or(0, |r| r.version), id.clone()))
            .collect();
        if deleted.len() <= history::MAX_DELETED_HISTORIES {
            return;
        }
        deleted.sort();
        let n_excess = deleted.len() - history::MAX_DELETED_HISTORIES;
        for (_, id) in deleted.into_iter().take(n_excess) {
            self.dataset_history.remove(&id);
        }
    }

    fn remove_keys_of(&mut self, license_id: &str) {
        if let Some(old) = self.licenses.get(license_id) {
            for key in &old.keys {
                if let Some(hash) = keys::decode_hash(&key.sha256)
                    && self
                        .key_index
                        .get(&hash)
                        .is_some_and(|owner| owner == license_id)
                {
                    self.key_index.remove(&hash);
                }
            }
        }
    }

    /// Marks a non-command entry (blank, membership) as applied.
    pub fn bump_version(&mut self, index: u64) {
        self.version = index;
    }

    /// Rebuilds derived indexes after deserializing from a snapshot. If two
    /// licenses claim one key (impossible through `apply`), the first id wins.
    pub fn rebuild_indexes(&mut self) {
        let licenses: std::collections::BTreeSet<String> = self
            .exceptions
            .values()
            .map(|e| e.license.clone())
            .collect();
        self.raises = Arc::default();
        for license in licenses {
            self.rebuild_raises_of(&license);
        }
        self.deny_rate_watch = self.any_deny_rate_watch();
        self.key_index.clear();
        for (id, license) in &self.licenses {
            for key in &license.keys {
                if let Some(hash) = keys::decode_hash(&key.sha256) {
                    self.key_index.entry(hash).or_insert_with(|| id.clone());
                }
            }
        }
    }

    /// The license with `id`.
    pub fn license(&self, id: &str) -> Option<&Arc<License>> {
        self.licenses.get(id)
    }

    /// The license owning the key whose SHA-256 hex is `hash_hex`.
    pub fn license_by_key_hash(&self, hash_hex: &str) -> Option<&Arc<License>> {
        let hash = keys::decode_hash(&hash_hex.to_ascii_lowercase())?;
        self.license_by_key_hash_bytes(&hash)
    }

    /// The license owning the key with raw SHA-256 `hash` (the hot-path form).
    pub fn license_by_key_hash_bytes(&self, hash: &[u8; 32]) -> Option<&Arc<License>> {
        self.key_index
            .get(hash)
            .and_then(|id| self.licenses.get(id))
    }

    /// The license owning plain key `key`.
    pub fn license_by_key(&self, key: &str) -> Option<&Arc<License>> {
        self.license_by_key_hash_bytes(&keys::hash_key_bytes(key))
    }

    /// The audit signing keys registered for node `node_id`, oldest first.
    pub fn node_keys(&self, node_id: u64) -> &[NodeKey] {
        self.node_keys.get(&node_id).map_or(&[][..], Vec::as_slice)
    }

    /// The model with `id`.
    pub fn model(&self, id: &str) -> Option<&Arc<Model>> {
        self.models.get(id)
    }

    /// The retained change records of model `id`, oldest first; empty if
    /// none.
    pub fn model_history(&self, id: &str) -> &[ModelChangeRecord] {
        self.model_history.get(id).map_or(&[][..], |h| h.as_slice())
    }

    /// The dataset with `id`.
    pub fn dataset(&self, id: &str) -> Option<&Arc<Dataset>> {
        self.datasets.get(id)
    }

    /// The retained change records of dataset `id`, oldest first; empty if
    /// none. Deleted datasets keep theirs.
    pub fn dataset_history(&self, id: &str) -> &[ModelChangeRecord] {
        self.dataset_history
            .get(id)
            .map_or(&[][..], |h| h.as_slice())
    }

    /// The retained change records of license `id`, oldest first; empty if
    /// none. Deleted licenses keep theirs.
    pub fn license_history(&self, id: &str) -> &[ChangeRecord] {
        self.history
            .get(id)
            .map_or(&[][..], |h| h.records.as_slice())
    }

    /// The retained history of license `id`, with whether older changes
    /// were dropped.
    pub fn history(&self, id: &str) -> Option<&LicenseHistory> {
        self.history.get(id).map(|h| &**h)
    }

    /// Ids of every license with recorded history, deleted ones included.
    pub fn history_license_ids(&self) -> impl Iterator<Item = &str> {
        self.history.keys().map(String::as_str)
    }

    /// License `id` as it was at config version `version`: the document of
    /// its latest change at or before `version`.
    pub fn license_as_of(&self, id: &str, version: u64) -> Result<Arc<License>, HistoryError> {
        history::as_of(self.history(id), id, version, self.version)
    }
}

/// Appends `record` to the history of `id` in `histories`, dropping the
/// oldest beyond [`history::MAX_HISTORY_PER_LICENSE`].
fn push_capped(
    histories: &mut BTreeMap<String, Arc<Vec<ModelChangeRecord>>>,
    id: &str,
    record: ModelChangeRecord,
) {
    let records = Arc::make_mut(histories.entry(id.to_string()).or_default());
    if records.len() >= history::MAX_HISTORY_PER_LICENSE {
        let n_excess = records.len() + 1 - history::MAX_HISTORY_PER_LICENSE;
        records.drain(..n_excess);
    }
    records.push(record);
}

impl From<Document> for ConfigOp {
    /// The op that creates or replaces the document's object.
    fn from(doc: Document) -> Self {
        match doc {
            Document::License(l) => ConfigOp::PutLicense(l),
            Document::Model(m) => ConfigOp::PutModel(m),
            Document::Dataset(d) => ConfigOp::PutDataset(d),
        }
    }
}

/// The index of the key `key_id` names in `keys`: by `StoredKey::id`, else
/// by a unique SHA-256 hex prefix of at least [`MIN_KEY_HASH_PREFIX_LEN`].
fn find_key(keys: &[StoredKey], key_id: &str) -> Result<usize, String> {
    let mut named = keys
        .iter()
        .enumerate()
        .filter(|(_, k)| k.id.as_deref() == Some(key_id))
        .map(|(idx, _)| idx);
    match (named.next(), named.next()) {
        (Some(idx), None) => return Ok(idx),
        (Some(_), Some(_)) => {
            return Err(format!(
                "several keys are named {key_id:?}; name the key by a prefix of its sha256"
            ));
        }
        (None, _) => {}
    }
    let prefix = key_id.to_ascii_lowercase();
    if prefix.len() < MIN_KEY_HASH_PREFIX_LEN || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "no key named {key_id:?} (a sha256 prefix must be at least {MIN_KEY_HASH_PREFIX_LEN} hex characters)"
        ));
    }
    let mut hashed = keys
        .iter()
        .enumerate()
        .filter(|(_, k)| k.sha256.to_ascii_lowercase().starts_with(&prefix))
        .map(|(idx, _)| idx);
    match (hashed.next(), hashed.next()) {
        (Some(idx), None) => Ok(idx),
        (Some(_), Some(_)) => Err(format!(
            "sha256 prefix {key_id:?} matches several keys; give more characters"
        )),
        (None, _) => Err(format!("no key named or hashed {key_id:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::parse_license;

    fn cmd(op: ConfigOp) -> ConfigCommand {
        ConfigCommand {
            request_id: None,
            actor: "test".into(),
            reason: None,
            at_ms: 0,
            op,
        }
    }

    fn lic(id: &str, key: &str) -> License {
        parse_license(&format!(
            "apiVersion: tollgate/v1\nkind: License\nid: {id}\ncustomer: C\nkeys: [{{key: {key}}}]\n"
        ))
        .unwrap()
    }

    #[test]
    fn node_keys_are_registered_once_and_bounded() {
        let mut c = Config::default();
        let key = |i: u8| format!("{i:02x}").repeat(32);
        let register = |node_id, public_key: String| {
            cmd(ConfigOp::RegisterNodeKey {
                node_id,
                public_key,
            })
        };
        assert_eq!(
            c.apply(&register(1, key(1).to_ascii_uppercase()), 1),
            ApplyOutcome::Applied { version: 1 }
        );
        // Stored in lowercase; the same key again changes nothing.
        assert_eq!(
            c.apply(&register(1, key(1)), 2),
            ApplyOutcome::Applied { version: 2 }
        );
        assert_eq!(c.node_keys(1).len(), 1);
        assert_eq!(c.node_keys(1)[0].public_key, key(1));
        assert_eq!(c.node_keys(1)[0].since_version, 1);
        assert!(c.node_keys(2).is_empty());
        // Not a key: rejected, nothing stored.
        assert!(matches!(
            c.apply(&register(2, "abc".into()), 3),
            ApplyOutcome::Rejected { .. }
        ));
        assert!(c.node_keys(2).is_empty());
        // Bounded: the oldest goes first.
        for i in 2..=(MAX_KEYS_PER_NODE as u8 + 1) {
            c.apply(&register(1, key(i)), 10 + u64::from(i));
        }
        let keys = c.node_keys(1);
        assert_eq!(keys.len(), MAX_KEYS_PER_NODE);
        assert_eq!(keys[0].public_key, key(2));
        // A node key never makes a config count as holding licenses.
        let seed = cmd(ConfigOp::Batch {
            ops: vec![ConfigOp::PutLicense(lic("a", "ka"))],
            only_if_empty: true,
        });
        assert!(matches!(c.apply(&seed, 30), ApplyOutcome::Applied { .. }));
    }

    #[test]
    fn ops_name_their_kind_and_targets_without_content() {
        let batch = ConfigOp::Batch {
            ops: vec![
                ConfigOp::PutLicense(lic("a", "ka")),
                ConfigOp::RevokeKey {
                    license_id: "a".into(),
                    key_id: "ci".into(),
                },
            ],
            only_if_empty: false,
        };
        assert_eq!(batch.kind(), "batch");
        assert_eq!(batch.targets(), vec!["license:a", "license:a", "key:ci"]);
        let add = ConfigOp::AddKey {
            license_id: "a".into(),
            key: StoredKey {
                id: None,
                sha256: keys::hash_key("secret"),
            },
        };
        let targets = add.targets();
        assert_eq!(targets[0], "license:a");
        assert_eq!(targets[1].len(), "key:".len() + 16);
        assert!(!targets.iter().any(|t| t.contains("secret")));
        assert_eq!(
            ConfigOp::RegisterNodeKey {
                node_id: 3,
                public_key: String::new()
            }
            .targets(),
            vec!["node:3"]
        );
    }

    #[test]
    fn put_revoke_add_delete() {
        let mut c = Config::default();
        assert!(matches!(
            c.apply(&cmd(ConfigOp::PutLicense(lic("a", "ka"))), 1),
            ApplyOutcome::Applied { version: 1 }
        ));
        assert_eq!(c.license_by_key("ka").unwrap().id, "a");
        assert_eq!(
            c.license_by_key_hash(&keys::hash_key("ka")).unwrap().id,
            "a"
        );
        // Same key on another license is rejected.
        let out = c.apply(&cmd(ConfigOp::PutLicense(lic("b", "ka"))), 2);
        assert!(
            matches!(out, ApplyOutcome::Rejected { version: 2, .. }),
            "{out:?}"
        );
        assert!(c.license("b").is_none());
        // AddKey to unknown license is rejected.
        let key = StoredKey {
            id: None,
            sha256: keys::hash_key("kb"),
        };
        let out = c.apply(
            &cmd(ConfigOp::AddKey {
                license_id: "nope".into(),
                key: key.clone(),
            }),
            3,
        );
        assert!(matches!(out, ApplyOutcome::Rejected { .. }));
        let out = c.apply(
            &cmd(ConfigOp::AddKey {
                license_id: "a".into(),
                key,
            }),
            4,
        );
        assert_eq!(out, ApplyOutcome::Applied { version: 4 });
        assert_eq!(c.license_by_key("kb").unwrap().id, "a");
        let out = c.apply(
            &cmd(ConfigOp::RevokeLicense {
                id: "a".into(),
                reason: "fraud".into(),
            }),
            5,
        );
        assert_eq!(out, ApplyOutcome::Applied { version: 5 });
        assert_eq!(c.license("a").unwrap().status.label(), "revoked");
        // Snapshot round trip keeps the key index usable.
        let json = serde_json::to_string(&c).unwrap();
        let mut restored: Config = serde_json::from_str(&json).unwrap();
        restored.rebuild_indexes();
        assert_eq!(restored.license_by_key("kb").unwrap().id, "a");
        assert_eq!(restored.version, 5);
        let out = c.apply(&cmd(ConfigOp::DeleteLicense { id: "a".into() }), 6);
        assert_eq!(out, ApplyOutcome::Applied { version: 6 });
        assert!(c.license_by_key("ka").is_none());
        assert!(matches!(
            c.apply(&cmd(ConfigOp::DeleteLicense { id: "a".into() }), 7),
            ApplyOutcome::Rejected { .. }
        ));
        c.bump_version(8);
        assert_eq!(c.version, 8);
    }

    #[test]
    fn command_round_trips_through_json() {
        let c = cmd(ConfigOp::PutLicense(lic("a", "ka")));
        let json = serde_json::to_string(&c).unwrap();
        let back: ConfigCommand = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }

    use crate::history::{Change, DiffEntry, MAX_HISTORY_PER_LICENSE};
    use serde_json::{Value, json};

    fn by(actor: &str, reason: Option<&str>, at_ms: i64, op: ConfigOp) -> ConfigCommand {
        ConfigCommand {
            request_id: None,
            actor: actor.into(),
            reason: reason.map(str::to_string),
            at_ms,
            op,
        }
    }

    /// A license with one named key and one quota of `limit`.
    fn lic_quota(id: &str, key: &str, limit: u64) -> License {
        parse_license(&format!(
            "apiVersion: tollgate/v1\nkind: License\nid: {id}\ncustomer: C\nkeys: [{{id: main, key: {key}}}]\nquotas: [{{id: q, metric: inferences, limit: {limit}, window: day}}]\n"
        ))
        .unwrap()
    }

    fn applied(c: &mut Config, cmd: &ConfigCommand, index: u64) {
        let out = c.apply(cmd, index);
        assert_eq!(out, ApplyOutcome::Applied { version: index }, "{cmd:?}");
    }

    fn rejected(c: &mut Config, cmd: &ConfigCommand, index: u64) -> String {
        match c.apply(cmd, index) {
            ApplyOutcome::Rejected { version, reason } => {
                assert_eq!(version, index);
                reason
            }
            other => panic!("expected a rejection of {cmd:?}, got {other:?}"),
        }
    }

    fn diff_json(diff: &[DiffEntry]) -> Value {
        serde_json::to_value(diff).unwrap()
    }

    fn add_key(license_id: &str, name: &str, plain: &str) -> ConfigOp {
        ConfigOp::AddKey {
            license_id: license_id.into(),
            key: StoredKey {
                id: Some(name.into()),
                sha256: keys::hash_key(plain),
            },
        }
    }

    fn revoke_key(license_id: &str, key_id: &str) -> ConfigOp {
        ConfigOp::RevokeKey {
            license_id: license_id.into(),
            key_id: key_id.into(),
        }
    }

    fn rollback(id: &str, to_version: u64) -> ConfigOp {
        ConfigOp::RollbackLicense {
            id: id.into(),
            to_version,
        }
    }

    #[test]
    fn history_records_every_applied_change() {
        let mut c = Config::default();
        let steps = [
            by(
                "alice",
                Some("new customer"),
                100,
                ConfigOp::PutLicense(lic_quota("a", "ka", 5)),
            ),
            by(
                "bob",
                Some("upsell"),
                200,
                ConfigOp::PutLicense(lic_quota("a", "ka", 10)),
            ),
            by(
                "carol",
                None,
                300,
                ConfigOp::RevokeLicense {
                    id: "a".into(),
                    reason: "fraud".into(),
                },
            ),
            by("dave", Some("ci"), 400, add_key("a", "ci", "kb")),
            by("erin", Some("leaked"), 500, revoke_key("a", "ci")),
            by(
                "frank",
                Some("churn"),
                600,
                ConfigOp::DeleteLicense { id: "a".into() },
            ),
        ];
        for (idx, step) in steps.iter().enumerate() {
            applied(&mut c, step, idx as u64 + 1);
        }
        let history = c.license_history("a");
        assert_eq!(history.len(), steps.len());
        for (idx, (record, step)) in history.iter().zip(&steps).enumerate() {
            assert_eq!(record.version, idx as u64 + 1);
            assert_eq!(record.actor, step.actor);
            assert_eq!(record.reason, step.reason);
            assert_eq!(record.at_ms, step.at_ms);
        }
        let actions: Vec<_> = history.iter().map(|r| r.action.clone()).collect();
        assert_eq!(
            actions,
            [
                ChangeAction::Put,
                ChangeAction::Put,
                ChangeAction::Revoke,
                ChangeAction::AddKey,
                ChangeAction::RevokeKey,
                ChangeAction::Delete,
            ]
        );

        // Creation lists every top-level field as added.
        let created: Vec<_> = history[0].diff.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            created,
            [
                "apiVersion",
                "customer",
                "features",
                "hardware",
                "id",
                "keys",
                "kind",
                "models",
                "quotas",
                "rate_limits",
                "status",
                "tier"
            ]
        );
        assert!(
            history[0]
                .diff
                .iter()
                .all(|e| matches!(e.change, Change::Added { .. }))
        );
        assert_eq!(
            diff_json(&history[1].diff),
            json!([{"path": "quotas[0].limit", "op": "changed", "old": 5, "new": 10}])
        );
        assert_eq!(
            diff_json(&history[2].diff),
            json!([{"path": "status", "op": "changed", "old": "active",
                    "new": {"revoked": {"reason": "fraud"}}}])
        );
        let kb = keys::hash_key("kb");
        assert_eq!(
            diff_json(&history[3].diff),
            json!([{"path": "keys[1]", "op": "added", "new": {"id": "ci", "sha256": kb}}])
        );
        assert_eq!(
            diff_json(&history[4].diff),
            json!([{"path": "keys[1]", "op": "removed", "old": {"id": "ci", "sha256": kb}}])
        );
        assert!(
            history[5]
                .diff
                .iter()
                .all(|e| matches!(e.change, Change::Removed { .. }))
        );
        assert_eq!(history[5].diff.len(), history[0].diff.len());

        // Documents are the license after each change, none after delete.
        assert_eq!(history[1].document.as_ref().unwrap().quotas[0].limit, 10);
        assert_eq!(history[3].document.as_ref().unwrap().keys.len(), 2);
        assert_eq!(history[4].document.as_ref().unwrap().keys.len(), 1);
        assert!(history[5].document.is_none());
        assert!(c.license("a").is_none());

        // Only key hashes ever reach a record.
        let text = serde_json::to_string(history).unwrap();
        assert!(
            !text.contains("\"ka\"") && !text.contains("\"kb\""),
            "{text}"
        );
        assert!(text.contains(&keys::hash_key("ka")));
    }

    #[test]
    fn rejected_commands_record_nothing() {
        let mut c = Config::default();
        applied(&mut c, &cmd(ConfigOp::PutLicense(lic("a", "ka"))), 1);
        applied(&mut c, &cmd(ConfigOp::PutModel(model("m"))), 2);
        let before = c.license_history("a").to_vec();
        assert_eq!(before.len(), 1, "models have no license history");
        let mut invalid = lic("a", "kz");
        invalid.customer.clear();
        let rejections = [
            ConfigOp::PutLicense(lic("b", "ka")),
            ConfigOp::PutLicense(invalid),
            ConfigOp::RevokeLicense {
                id: "nope".into(),
                reason: "x".into(),
            },
            add_key("nope", "ci", "kc"),
            add_key("a", "BAD", "kc"),
            revoke_key("a", "missing"),
            revoke_key("nope", "main"),
            rollback("a", 99),
            rollback("b", 1),
            ConfigOp::DeleteLicense { id: "nope".into() },
        ];
        for (idx, op) in rejections.into_iter().enumerate() {
            rejected(&mut c, &cmd(op), idx as u64 + 3);
        }
        assert_eq!(c.license_history("a"), before.as_slice());
        assert_eq!(c.history_license_ids().collect::<Vec<_>>(), ["a"]);
        assert!(c.license_history("b").is_empty());
        assert!(c.license_history("nope").is_empty());
    }

    fn model(id: &str) -> Model {
        match crate::license::parse_documents(&format!(
            "apiVersion: tollgate/v1\nkind: Model\nid: {id}\nversions: [{{version: 1.0.0, released: 2025-03-01}}]\n"
        ))
        .unwrap()
        .pop()
        {
            Some(crate::license::Document::Model(m)) => m,
            other => panic!("not a model: {other:?}"),
        }
    }

    #[test]
    fn history_is_capped_and_says_so() {
        let mut c = Config::default();
        let n_changes = MAX_HISTORY_PER_LICENSE as u64 + 10;
        for index in 1..=n_changes {
            applied(
                &mut c,
                &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", index))),
                index,
            );
        }
        let history = c.license_history("a");
        assert_eq!(history.len(), MAX_HISTORY_PER_LICENSE);
        assert_eq!(history[0].version, 11);
        assert_eq!(history.last().unwrap().version, n_changes);
        assert!(c.history("a").unwrap().truncated);
        assert_eq!(c.license_as_of("a", 11).unwrap().quotas[0].limit, 11);
        let err = c.license_as_of("a", 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "version 10 is older than the retained history of license \"a\" (oldest retained: 11)"
        );
        let reason = rejected(&mut c, &cmd(rollback("a", 3)), n_changes + 1);
        assert!(
            reason.contains("older than the retained history"),
            "{reason}"
        );
    }

    #[test]
    fn license_as_of_cases() {
        let mut c = Config::default();
        c.bump_version(1);
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 5))),
            3,
        );
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 6))),
            5,
        );
        applied(&mut c, &cmd(ConfigOp::DeleteLicense { id: "a".into() }), 7);
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 8))),
            9,
        );
        c.bump_version(10);
        let limit_at = |c: &Config, version| {
            c.license_as_of("a", version)
                .map(|l| l.quotas[0].limit)
                .map_err(|e| e.to_string())
        };
        assert_eq!(limit_at(&c, 3), Ok(5));
        assert_eq!(limit_at(&c, 4), Ok(5));
        assert_eq!(limit_at(&c, 5), Ok(6));
        assert_eq!(limit_at(&c, 9), Ok(8));
        assert_eq!(limit_at(&c, 10), Ok(8));
        assert_eq!(
            limit_at(&c, 2),
            Err("license \"a\" did not exist yet at version 2".into())
        );
        assert_eq!(
            limit_at(&c, 8),
            Err("license \"a\" was deleted at version 7 (at or before version 8)".into())
        );
        assert_eq!(
            limit_at(&c, 11),
            Err("version 11 is in the future (current: 10)".into())
        );
        assert_eq!(
            c.license_as_of("b", 5).unwrap_err().to_string(),
            "license \"b\" has no recorded history"
        );
        // The document at the current version is the current license itself.
        assert!(Arc::ptr_eq(
            &c.license_as_of("a", 10).unwrap(),
            c.license("a").unwrap()
        ));
    }

    #[test]
    fn license_from_before_history_keeping() {
        // A snapshot written before history existed has no `history` field.
        let mut old = Config::default();
        applied(
            &mut old,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 5))),
            1,
        );
        let mut snapshot = serde_json::to_value(&old).unwrap();
        snapshot.as_object_mut().unwrap().remove("history");
        let mut c: Config = serde_json::from_value(snapshot).unwrap();
        c.rebuild_indexes();
        assert!(c.license_history("a").is_empty());
        assert!(c.license_as_of("a", 1).is_err());
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 6))),
            2,
        );
        // The first record diffs against the license that was there...
        assert_eq!(
            diff_json(&c.license_history("a")[0].diff),
            json!([{"path": "quotas[0].limit", "op": "changed", "old": 5, "new": 6}])
        );
        // ...and earlier versions are unknown rather than "did not exist".
        assert_eq!(
            c.license_as_of("a", 1).unwrap_err(),
            HistoryError::OlderThanRetained {
                id: "a".into(),
                version: 1,
                oldest_retained: 2,
            }
        );
    }

    #[test]
    fn rollback_restores_content_and_appends() {
        let mut c = Config::default();
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 5))),
            1,
        );
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 10))),
            2,
        );
        applied(&mut c, &cmd(add_key("a", "ci", "kb")), 3);
        applied(
            &mut c,
            &cmd(ConfigOp::RevokeLicense {
                id: "a".into(),
                reason: "fraud".into(),
            }),
            4,
        );
        let at_1 = c.license_as_of("a", 1).unwrap();
        let before = c.license_history("a").to_vec();

        applied(&mut c, &by("ops", Some("undo"), 50, rollback("a", 1)), 5);
        let current = c.license("a").unwrap();
        assert_eq!(**current, *at_1);
        assert_eq!(**current, lic_quota("a", "ka", 5));
        // Keys follow the restored content: kb was added after version 1.
        assert_eq!(c.license_by_key("ka").unwrap().id, "a");
        assert!(c.license_by_key("kb").is_none());

        let history = c.license_history("a");
        assert_eq!(history.len(), before.len() + 1);
        assert_eq!(&history[..before.len()], before.as_slice());
        let last = history.last().unwrap();
        assert_eq!(last.action, ChangeAction::Rollback { to_version: 1 });
        assert_eq!(
            (last.version, last.actor.as_str(), last.at_ms),
            (5, "ops", 50)
        );
        assert_eq!(last.reason.as_deref(), Some("undo"));
        assert_eq!(last.document.as_deref(), Some(&*at_1));
        let paths: Vec<_> = last.diff.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["keys[1]", "quotas[0].limit", "status"]);

        // Rolling back to the revoked state restores that too.
        applied(&mut c, &cmd(rollback("a", 4)), 6);
        assert_eq!(c.license("a").unwrap().status.label(), "revoked");
        assert_eq!(c.license_by_key("kb").unwrap().id, "a");
        assert_eq!(**c.license("a").unwrap(), *c.license_as_of("a", 4).unwrap());
    }

    #[test]
    fn rollback_recreates_a_deleted_license() {
        let mut c = Config::default();
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 5))),
            1,
        );
        applied(&mut c, &cmd(ConfigOp::DeleteLicense { id: "a".into() }), 2);
        assert!(c.license_by_key("ka").is_none());
        applied(&mut c, &cmd(rollback("a", 1)), 3);
        assert_eq!(**c.license("a").unwrap(), lic_quota("a", "ka", 5));
        assert_eq!(c.license_by_key("ka").unwrap().id, "a");
        let record = c.license_history("a").last().unwrap();
        assert!(
            record
                .diff
                .iter()
                .all(|e| matches!(e.change, Change::Added { .. }))
        );
    }

    #[test]
    fn rollback_rejections() {
        let mut c = Config::default();
        c.bump_version(2);
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 5))),
            3,
        );
        applied(&mut c, &cmd(ConfigOp::DeleteLicense { id: "a".into() }), 4);
        let check = |c: &mut Config, op: ConfigOp, index: u64, expected: &str| {
            let n_records = c.license_history("a").len();
            assert_eq!(rejected(c, &cmd(op), index), expected);
            assert_eq!(c.license_history("a").len(), n_records);
        };
        check(
            &mut c,
            rollback("a", 2),
            5,
            "cannot roll back: license \"a\" did not exist yet at version 2",
        );
        // The command's own index is not yet a version with content.
        check(
            &mut c,
            rollback("a", 6),
            6,
            "cannot roll back: version 6 is in the future (current: 5)",
        );
        check(
            &mut c,
            rollback("a", 4),
            7,
            "cannot roll back: license \"a\" was deleted at version 4 (at or before version 4)",
        );
        check(
            &mut c,
            rollback("zz", 1),
            8,
            "cannot roll back: license \"zz\" has no recorded history",
        );
        // The restored keys must not belong to another license by now.
        applied(&mut c, &cmd(ConfigOp::PutLicense(lic("b", "ka"))), 9);
        check(
            &mut c,
            rollback("a", 3),
            10,
            "a key is already used by license \"b\"",
        );
        assert!(c.license("a").is_none());
    }

    #[test]
    fn revoke_key_by_name_or_hash_prefix() {
        let mut c = Config::default();
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 5))),
            1,
        );
        applied(&mut c, &cmd(add_key("a", "ci", "kb")), 2);
        applied(
            &mut c,
            &cmd(ConfigOp::AddKey {
                license_id: "a".into(),
                key: StoredKey {
                    id: None,
                    sha256: keys::hash_key("kc"),
                },
            }),
            3,
        );
        applied(&mut c, &cmd(revoke_key("a", "ci")), 4);
        assert!(c.license_by_key("kb").is_none());
        assert!(c.license_by_key_hash(&keys::hash_key("kb")).is_none());
        assert_eq!(c.license_by_key("ka").unwrap().id, "a");

        // An unnamed key goes by a prefix of its hash, in either case.
        let kc_prefix = keys::hash_key("kc")[..8].to_ascii_uppercase();
        applied(&mut c, &cmd(revoke_key("a", &kc_prefix)), 5);
        assert!(c.license_by_key("kc").is_none());
        assert_eq!(c.license("a").unwrap().keys.len(), 1);

        let short = &keys::hash_key("ka")[..7];
        let mut check = |key_id: &str, expected: String| {
            assert_eq!(rejected(&mut c, &cmd(revoke_key("a", key_id)), 9), expected);
        };
        check(
            short,
            format!(
                "license \"a\": no key named {short:?} (a sha256 prefix must be at least 8 hex characters)"
            ),
        );
        check("ci", "license \"a\": no key named \"ci\" (a sha256 prefix must be at least 8 hex characters)".into());
        check(
            "deadbeef00",
            "license \"a\": no key named or hashed \"deadbeef00\"".into(),
        );
        assert_eq!(
            rejected(&mut c, &cmd(revoke_key("zz", "ci")), 10),
            "unknown license \"zz\""
        );
        // The last key can go too: a license without keys is valid.
        applied(&mut c, &cmd(revoke_key("a", "main")), 11);
        assert!(c.license_by_key("ka").is_none());
        assert!(c.license("a").unwrap().keys.is_empty());
    }

    #[test]
    fn revoke_key_rejects_ambiguity() {
        let mut c = Config::default();
        let mut license = lic("a", "ka");
        // Two keys with one name, and two hashes sharing a long prefix.
        license.keys = vec![
            StoredKey {
                id: Some("dup".into()),
                sha256: format!("{}{}", "ab".repeat(8), "0".repeat(48)),
            },
            StoredKey {
                id: Some("dup".into()),
                sha256: format!("{}{}", "ab".repeat(8), "1".repeat(48)),
            },
        ];
        applied(&mut c, &cmd(ConfigOp::PutLicense(license)), 1);
        assert_eq!(
            rejected(&mut c, &cmd(revoke_key("a", "dup")), 2),
            "license \"a\": several keys are named \"dup\"; name the key by a prefix of its sha256"
        );
        assert_eq!(
            rejected(&mut c, &cmd(revoke_key("a", "abababab")), 3),
            "license \"a\": sha256 prefix \"abababab\" matches several keys; give more characters"
        );
        applied(
            &mut c,
            &cmd(revoke_key("a", &format!("{}1", "ab".repeat(8)))),
            4,
        );
        assert_eq!(c.license("a").unwrap().keys.len(), 1);
    }

    #[test]
    fn snapshot_keeps_history() {
        let mut c = Config::default();
        applied(
            &mut c,
            &by(
                "alice",
                Some("new"),
                7,
                ConfigOp::PutLicense(lic_quota("a", "ka", 5)),
            ),
            1,
        );
        applied(
            &mut c,
            &cmd(ConfigOp::PutLicense(lic_quota("a", "ka", 6))),
            2,
        );
        applied(&mut c, &cmd(add_key("a", "ci", "kb")), 3);
        applied(&mut c, &cmd(revoke_key("a", "ci")), 4);
        applied(&mut c, &cmd(ConfigOp::PutLicense(lic("b", "kx"))), 5);
        applied(&mut c, &cmd(ConfigOp::DeleteLicense { id: "b".into() }), 6);
        let json = serde_json::to_string(&c).unwrap();
        let mut restored: Config = serde_json::from_str(&json).unwrap();
        restored.rebuild_indexes();
        for id in ["a", "b"] {
            assert_eq!(restored.license_history(id), c.license_history(id));
            assert_eq!(restored.history(id), c.history(id));
        }
        assert_eq!(restored.license_as_of("a", 1).unwrap().quotas[0].limit, 5);
        assert!(restored.license_as_of("b", 6).is_err());
        assert!(restored.license_by_key("kb").is_none());
        assert!(restored.license_by_key("kx").is_none());
        // The restored config keeps applying with history.
        applied(&mut restored, &cmd(rollback("a", 1)), 7);
        assert_eq!(**restored.license("a").unwrap(), lic_quota("a", "ka", 5));
        assert_eq!(restored.license_history("a").len(), 5);
    }

    #[test]
    fn clones_share_untouched_history() {
        let mut c = Config::default();
        applied(&mut c, &cmd(ConfigOp::PutLicense(lic("a", "ka"))), 1);
        applied(&mut c, &cmd(ConfigOp::PutLicense(lic("b", "kb"))), 2);
        let published = c.clone();
        applied(
            &mut c,
            &cmd(revoke_key("a", &keys::hash_key("ka")[..12])),
            3,
        );
        assert!(Arc::ptr_eq(&c.history["b"], &published.history["b"]));
        assert!(!Arc::ptr_eq(&c.history["a"], &published.history["a"]));
        assert_eq!(published.license_history("a").len(), 1);
        assert_eq!(c.license_history("a").len(), 2);
    }

    #[test]
    fn every_op_round_trips_through_json_and_messagepack() {
        let ops = [
            ConfigOp::PutLicense(lic_quota("a", "ka", 5)),
            ConfigOp::RevokeLicense {
                id: "a".into(),
                reason: "fraud".into(),
            },
            add_key("a", "ci", "kb"),
            ConfigOp::PutModel(model("m")),
            ConfigOp::DeleteLicense { id: "a".into() },
            revoke_key("a", "ci"),
            rollback("a", 7),
            ConfigOp::PutDataset(dataset("d", "v1")),
            ConfigOp::DeleteDataset { id: "d".into() },
        ];
        for op in ops {
            let command = by("ops", Some("why"), 1_780_000_000_000, op);
            let json = serde_json::to_vec(&command).unwrap();
            let back: ConfigCommand = serde_json::from_slice(&json).unwrap();
            assert_eq!(back, command);
            let packed = rmp_serde::to_vec_named(&command).unwrap();
            let back: ConfigCommand = rmp_serde::from_slice(&packed).unwrap();
            assert_eq!(back, command);
        }
        assert_eq!(
            serde_json::to_value(rollback("a", 7)).unwrap(),
            json!({"RollbackLicense": {"id": "a", "to_version": 7}})
        );
        assert_eq!(
            serde_json::to_value(revoke_key("a", "ci")).unwrap(),
            json!({"RevokeKey": {"license_id": "a", "key_id": "ci"}})
        );
    }

    #[test]
    fn a_batch_applies_all_or_nothing_as_one_version() {
        let mut c = Config::default();
        let out = c.apply(
            &cmd(ConfigOp::Batch {
                ops: vec![
                    ConfigOp::PutLicense(lic("a", "ka")),
                    ConfigOp::PutLicense(lic("b", "kb")),
                ],
                only_if_empty: false,
            }),
            1,
        );
        assert_eq!(out, ApplyOutcome::Applied { version: 1 });
        assert_eq!(
            c.license_by_key("kb").map(|l| l.id.clone()),
            Some("b".into())
        );
        assert_eq!(c.license_history("a")[0].version, 1);
        // The second op conflicts (key ka is a's): nothing of the batch stays.
        let out = c.apply(
            &cmd(ConfigOp::Batch {
                ops: vec![
                    ConfigOp::PutLicense(lic("c", "kc")),
                    ConfigOp::PutLicense(lic("d", "ka")),
                ],
                only_if_empty: false,
            }),
            2,
        );
        assert!(
            matches!(&out, ApplyOutcome::Rejected { reason, .. } if reason.starts_with("op 1:")),
            "{out:?}"
        );
        assert!(c.license("c").is_none());
        assert!(c.license_by_key("kc").is_none());
        assert_eq!(c.license_history("c").len(), 0);
    }

    #[test]
    fn a_seed_batch_applies_only_to_a_never_used_config() {
        let seed = ConfigOp::Batch {
            ops: vec![ConfigOp::PutLicense(lic("a", "ka"))],
            only_if_empty: true,
        };
        let mut c = Config::default();
        assert_eq!(
            c.apply(&cmd(seed.clone()), 1),
            ApplyOutcome::Applied { version: 1 }
        );
        c.apply(
            &cmd(ConfigOp::RevokeLicense {
                id: "a".into(),
                reason: "r".into(),
            }),
            2,
        );
        // Proposed again (a node that lost its data dir): the revocation stays.
        assert!(matches!(
            c.apply(&cmd(seed.clone()), 3),
            ApplyOutcome::Rejected { .. }
        ));
        assert_eq!(c.license("a").map(|l| l.status.label()), Some("revoked"));
        // Even after the license is deleted, the config is not "new".
        c.apply(&cmd(ConfigOp::DeleteLicense { id: "a".into() }), 4);
        assert!(matches!(
            c.apply(&cmd(seed), 5),
            ApplyOutcome::Rejected { .. }
        ));
    }

    #[test]
    fn a_command_with_a_known_request_id_is_not_applied_again() {
        let mut c = Config::default();
        let mut put = cmd(ConfigOp::PutLicense(lic("a", "ka")));
        put.request_id = Some("req-1".into());
        assert_eq!(c.apply(&put, 1), ApplyOutcome::Applied { version: 1 });
        let mut revoke = cmd(ConfigOp::RevokeLicense {
            id: "a".into(),
            reason: "r".into(),
        });
        revoke.request_id = Some("req-2".into());
        assert_eq!(c.apply(&revoke, 2), ApplyOutcome::Applied { version: 2 });
        // A retry of req-1 returns its first outcome and does not undo req-2.
        assert_eq!(c.apply(&put, 3), ApplyOutcome::Applied { version: 1 });
        assert_eq!(c.version, 3);
        assert_eq!(c.license("a").map(|l| l.status.label()), Some("revoked"));
        assert_eq!(c.license_history("a").len(), 2);
        // Remembered through a snapshot round trip, and bounded.
        let mut back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.apply(&put, 4), ApplyOutcome::Applied { version: 1 });
        for i in 0..MAX_REMEMBERED_REQUESTS as u64 {
            let mut m = cmd(ConfigOp::DeleteLicense { id: "none".into() });
            m.request_id = Some(format!("filler-{i}"));
            back.apply(&m, 5 + i);
        }
        assert!(matches!(
            back.apply(&put, 5000),
            ApplyOutcome::Applied { version: 5000 }
        ));
    }

    #[test]
    fn the_history_of_deleted_licenses_is_bounded() {
        let mut c = Config::default();
        let n = crate::history::MAX_DELETED_HISTORIES as u64 + 5;
        let mut index = 0;
        for i in 0..n {
            index += 1;
            c.apply(
                &cmd(ConfigOp::PutLicense(lic(
                    &format!("d{i}"),
                    &format!("k{i}"),
                ))),
                index,
            );
            index += 1;
            c.apply(
                &cmd(ConfigOp::DeleteLicense {
                    id: format!("d{i}"),
                }),
                index,
            );
        }
        c.apply(&cmd(ConfigOp::PutLicense(lic("live", "kl"))), index + 1);
        // The five deleted first are forgotten; the rest and live ones stay.
        assert!(c.license_history("d0").is_empty());
        assert!(c.license_history("d4").is_empty());
        assert_eq!(c.license_history("d5").len(), 2);
        assert_eq!(c.license_history("live").len(), 1);
        assert_eq!(
            c.history_license_ids().count(),
            crate::history::MAX_DELETED_HISTORIES + 1
        );
    }

    #[test]
    fn model_changes_are_recorded_with_a_diff() {
        let model = |released: &str| {
            crate::license::parse_model(&format!(
                "apiVersion: tollgate/v1\nkind: Model\nid: m\nversions:\n  - {{ version: 1.0.0, released: {released} }}\n"
            ))
            .unwrap()
        };
        let mut c = Config::default();
        let mut put = cmd(ConfigOp::PutModel(model("2026-01-01")));
        put.reason = Some("first release".into());
        c.apply(&put, 1);
        c.apply(
            &cmd(ConfigOp::Batch {
                ops: vec![ConfigOp::PutModel(model("2026-02-01"))],
                only_if_empty: false,
            }),
            2,
        );
        let h = c.model_history("m");
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].version, h[0].reason.as_deref()),
            (1, Some("first release"))
        );
        assert_eq!(h[1].version, 2);
        assert_eq!(h[1].diff.len(), 1, "{:?}", h[1].diff);
        assert_eq!(h[1].diff[0].path, "versions[0].released");
        // A rejected model records nothing.
        let mut bad = model("2026-03-01");
        bad.id = String::new();
        c.apply(&cmd(ConfigOp::PutModel(bad)), 3);
        assert_eq!(c.model_history("m").len(), 2);
        assert!(c.model_history("").is_empty());
    }

    fn dataset(id: &str, release: &str) -> Dataset {
        crate::license::parse_dataset(&format!(
            "apiVersion: tollgate/v1\nkind: Dataset\nid: {id}\nreleases:\n  - {{ version: {release}, source: vendor, categories: [pii], license: CC-BY-4.0 }}\n"
        ))
        .unwrap()
    }

    #[test]
    fn datasets_are_put_and_deleted_with_history() {
        let mut c = Config::default();
        applied(&mut c, &cmd(ConfigOp::PutDataset(dataset("d", "v1"))), 1);
        applied(&mut c, &cmd(ConfigOp::PutDataset(dataset("d", "v2"))), 2);
        assert!(c.dataset("d").and_then(|d| d.release("v2")).is_some());
        let h = c.dataset_history("d");
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].diff.len(), 1, "{:?}", h[1].diff);
        assert_eq!(h[1].diff[0].path, "releases[0].version");
        // A dataset that fails validation (from an older or hostile
        // proposer) is rejected and recorded nowhere.
        let mut bad = dataset("d", "v3");
        bad.releases.clear();
        let reason = rejected(&mut c, &cmd(ConfigOp::PutDataset(bad)), 3);
        assert!(reason.contains("releases"), "{reason}");
        assert_eq!(c.dataset_history("d").len(), 2);
        applied(&mut c, &cmd(ConfigOp::DeleteDataset { id: "d".into() }), 4);
        assert!(c.dataset("d").is_none());
        let h = c.dataset_history("d");
        assert_eq!(h.last().map(|r| &r.action), Some(&ChangeAction::Delete));
        assert!(
            rejected(&mut c, &cmd(ConfigOp::DeleteDataset { id: "d".into() }), 5)
                .contains("unknown dataset")
        );
        // A config that held a dataset is not empty for seed documents.
        let seed = cmd(ConfigOp::Batch {
            ops: vec![ConfigOp::PutLicense(lic("a", "ka"))],
            only_if_empty: true,
        });
        rejected(&mut c, &seed, 6);
        // Snapshots carry datasets and their history; older ones without
        // them still load.
        applied(&mut c, &cmd(ConfigOp::PutDataset(dataset("e", "v1"))), 7);
        let json = serde_json::to_vec(&c).unwrap();
        let back: Config = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.datasets, c.datasets);
        assert_eq!(back.dataset_history("d"), c.dataset_history("d"));
        let packed = rmp_serde::to_vec_named(&c).unwrap();
        let back: Config = rmp_serde::from_slice(&packed).unwrap();
        assert_eq!(back.datasets, c.datasets);
        let old: Config =
            serde_json::from_str(r#"{"version":3,"licenses":{},"models":{}}"#).unwrap();
        assert!(old.datasets.is_empty());
    }

    #[test]
    fn documents_become_put_ops() {
        let docs = crate::license::parse_documents(
            "apiVersion: tollgate/v1\nkind: Dataset\nid: d\nreleases: [{ version: v1, source: s, license: MIT }]\n---\napiVersion: tollgate/v1\nkind: License\nid: l\ncustomer: C\n",
        )
        .unwrap();
        let ops: Vec<ConfigOp> = docs.into_iter().map(ConfigOp::from).collect();
        assert!(matches!(&ops[0], ConfigOp::PutDataset(d) if d.id == "d"));
        assert!(matches!(&ops[1], ConfigOp::PutLicense(l) if l.id == "l"));
    }
}
