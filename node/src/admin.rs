//! Admin operations shared by the gRPC and HTTP admin APIs.
//!
//! Every write is validated here first (so bad input never reaches the Raft
//! log and never changes the config version), then committed through Raft.
//! The plain text of an issued key leaves this module once, in the response.

use std::sync::Arc;

use rand::RngCore;
use serde::Serialize;
use tollgate_consensus::WriteError;
use tollgate_quota::config::{ApplyOutcome, ConfigCommand, ConfigOp};
use tollgate_quota::dataset::Dataset;
use tollgate_quota::governance::{self, Escalation, QuotaException};
use tollgate_quota::keys;
use tollgate_quota::license::{self, Document, License, StoredKey};

use crate::api::ApiError;
use crate::state::NodeState;

/// Who makes an admin call: the name of the token it presented, and the
/// idempotency key it sent (or one drawn for this call), which the state
/// machine uses to apply the write at most once across retries.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The admin token's name, recorded as the actor of changes.
    pub actor: String,
    /// Idempotency key for the write this call makes.
    pub request_id: String,
}

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

impl Caller {
    /// A caller with `actor` and the client's idempotency key, if it sent
    /// a valid one; otherwise a fresh random key for this call.
    pub fn new(actor: String, idempotency_key: Option<&str>) -> Result<Self, ApiError> {
        let request_id = match idempotency_key.map(str::trim) {
            Some(k) if !k.is_empty() => {
                if k.len() > MAX_IDEMPOTENCY_KEY_BYTES || !k.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ApiError::InvalidArgument(format!(
                        "idempotency key: at most {MAX_IDEMPOTENCY_KEY_BYTES} printable ASCII characters"
                    )));
                }
                // Scoped by actor, so two tokens cannot collide on a key.
                format!("{actor}/{k}")
            }
            _ => {
                let mut random = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut random);
                format!("{actor}/~{}", hex::encode(random))
            }
        };
        Ok(Self { actor, request_id })
    }

    /// The bootstrap caller that applies seed documents.
    pub fn bootstrap() -> Self {
        let mut random = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut random);
        Self {
            actor: "bootstrap".to_string(),
            request_id: format!("bootstrap/~{}", hex::encode(random)),
        }
    }
}

/// One document applied by `apply_documents`.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedDoc {
    /// "Model", "Dataset" or "License".
    pub kind: &'static str,
    /// The document's id.
    pub id: String,
    /// The config version that committed it.
    pub version: u64,
}

/// A freshly issued key; the plain text is shown this once.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedKey {
    /// The plain key.
    pub key: String,
    /// The key's name in the license.
    pub key_id: String,
    /// The config version that committed it.
    pub version: u64,
}

/// Applies `ops` in order to a copy of the current config and reports the
/// first one the state machine would reject. The state machine checks again
/// at apply time (another write may land in between), but checking here
/// first means a bad write is refused without consuming a log entry or
/// moving the config version, and a multi-document apply is all or nothing.
fn precheck(
    state: &NodeState,
    caller: &Caller,
    reason: Option<&str>,
    ops: &[ConfigOp],
) -> Result<(), ApiError> {
    let mut trial = (*state.config()).clone();
    for op in ops {
        let cmd = ConfigCommand {
            request_id: None,
            actor: caller.actor.clone(),
            reason: reason.map(str::to_string),
            at_ms: state.now_ms(),
            op: op.clone(),
        };
        let next = trial.version + 1;
        if let ApplyOutcome::Rejected { reason, .. } = trial.apply(&cmd, next) {
            return Err(ApiError::Rejected(reason));
        }
    }
    Ok(())
}

/// Commits one config change through Raft and returns the new version.
pub async fn write(
    state: &NodeState,
    caller: &Caller,
    reason: Option<String>,
    op: ConfigOp,
) -> Result<u64, ApiError> {
    precheck(state, caller, reason.as_deref(), std::slice::from_ref(&op))?;
    let cmd = ConfigCommand {
        request_id: Some(caller.request_id.clone()),
        actor: caller.actor.clone(),
        reason,
        at_ms: state.now_ms(),
        op,
    };
    // Any node takes admin writes: a follower forwards to the leader.
    match state.consensus.write_forwarded(cmd).await {
        Ok(ApplyOutcome::Applied { version }) => Ok(version),
        Ok(ApplyOutcome::Rejected { reason, .. }) => Err(ApiError::Rejected(reason)),
        Err(e) => Err(write_error(e)),
    }
}

fn write_error(e: WriteError) -> ApiError {
    match e {
        WriteError::Fatal(_) => ApiError::Internal(e.to_string()),
        WriteError::Timeout { .. } | WriteError::Transport { .. } => {
            ApiError::OutcomeUnknown(format!(
                "{e}; the write may still apply: retry with the same Idempotency-Key, or read the config before retrying"
            ))
        }
        WriteError::NoQuorum { .. } => ApiError::NoQuorum(e.to_string()),
        WriteError::MembershipRejected { .. } => ApiError::Rejected(e.to_string()),
        _ => ApiError::Unavailable(e.to_string()),
    }
}

fn invalid(e: impl std::fmt::Display) -> ApiError {
    ApiError::InvalidArgument(e.to_string())
}

fn reason_opt(reason: &str) -> Option<String> {
    let r = reason.trim();
    if r.is_empty() {
        None
    } else {
        Some(r.to_string())
    }
}

/// Applies every Model, Dataset and License document in `text`, models and
/// datasets first so that licenses may refer to them. All documents are
/// validated before any write.
pub async fn apply_documents(
    state: &NodeState,
    caller: &Caller,
    text: &str,
    reason: &str,
) -> Result<Vec<AppliedDoc>, ApiError> {
    apply_batch(state, caller, text, reason, false).await
}

/// Applies seed documents: only to a config that never held anything, as
/// checked by the state machine, so a node that lost its data dir and
/// proposes them again changes nothing. Returns whether they were applied.
pub async fn apply_seed(state: &NodeState, text: &str) -> Result<bool, ApiError> {
    match apply_batch(
        state,
        &Caller::bootstrap(),
        text,
        "seed documents at first start",
        true,
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(ApiError::Rejected(reason)) => {
            tracing::info!(%reason, "seed documents not applied");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// All documents of `text` as one config version, all or nothing.
async fn apply_batch(
    state: &NodeState,
    caller: &Caller,
    text: &str,
    reason: &str,
    only_if_empty: bool,
) -> Result<Vec<AppliedDoc>, ApiError> {
    let mut docs = license::parse_documents(text).map_err(invalid)?;
    if docs.is_empty() {
        return Err(ApiError::InvalidArgument("no documents found".into()));
    }
    docs.sort_by_key(|d| match d {
        Document::Model(_) => 0,
        Document::Dataset(_) => 1,
        Document::License(_) => 2,
    });
    let planned: Vec<(&'static str, String, ConfigOp)> = docs
        .into_iter()
        .map(|doc| (doc.kind(), doc.id().to_string(), ConfigOp::from(doc)))
        .collect();
    let ops: Vec<ConfigOp> = planned.iter().map(|(_, _, op)| op.clone()).collect();
    let batch = ConfigOp::Batch { ops, only_if_empty };
    let version = write(state, caller, reason_opt(reason), batch).await?;
    Ok(planned
        .into_iter()
        .map(|(kind, id, _)| AppliedDoc { kind, id, version })
        .collect())
}

/// A document PUT to `/.../{id}` must carry that same id, so that a path
/// typo never overwrites another object.
fn ensure_path_id(document_id: &str, path_id: &str) -> Result<(), ApiError> {
    if document_id == path_id {
        return Ok(());
    }
    Err(ApiError::InvalidArgument(format!(
        "id: document id `{document_id}` does not match `{path_id}` in the path"
    )))
}

/// Creates or replaces license `id` from a YAML or JSON document.
pub async fn put_license(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    text: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    let lic = license::parse_license(text).map_err(invalid)?;
    ensure_path_id(&lic.id, id)?;
    write(state, caller, reason_opt(reason), ConfigOp::PutLicense(lic)).await
}

/// Creates or replaces model `id` from a YAML or JSON document.
pub async fn put_model(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    text: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    let model = license::parse_model(text).map_err(invalid)?;
    ensure_path_id(&model.id, id)?;
    write(state, caller, reason_opt(reason), ConfigOp::PutModel(model)).await
}

/// Creates or replaces dataset `id` from a YAML or JSON document.
pub async fn put_dataset(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    text: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    let dataset = license::parse_dataset(text).map_err(invalid)?;
    ensure_path_id(&dataset.id, id)?;
    write(
        state,
        caller,
        reason_opt(reason),
        ConfigOp::PutDataset(dataset),
    )
    .await
}

/// Removes dataset `id` from the registry.
pub async fn delete_dataset(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    get_dataset(state, id)?;
    write(
        state,
        caller,
        reason_opt(reason),
        ConfigOp::DeleteDataset { id: id.to_string() },
    )
    .await
}

/// Reads dataset `id` from the local applied config.
pub fn get_dataset(state: &NodeState, id: &str) -> Result<(Arc<Dataset>, u64), ApiError> {
    let config = state.config();
    config
        .dataset(id)
        .cloned()
        .map(|d| (d, config.version))
        .ok_or_else(|| ApiError::NotFound(format!("dataset `{id}` not found")))
}

/// The recorded changes of dataset `id`, oldest first, as JSON records, and
/// the config version they were read at.
pub fn dataset_history(state: &NodeState, id: &str) -> Result<(serde_json::Value, u64), ApiError> {
    let config = state.config();
    let records = config.dataset_history(id);
    if records.is_empty() {
        return Err(ApiError::NotFound(format!("dataset `{id}` has no history")));
    }
    let json = records_json(records.iter().map(|r| (r, r.at_ms)))?;
    Ok((json, config.version))
}

/// Reads license `id` from the local applied config.
pub fn get_license(state: &NodeState, id: &str) -> Result<(Arc<License>, u64), ApiError> {
    let config = state.config();
    config
        .license(id)
        .cloned()
        .map(|l| (l, config.version))
        .ok_or_else(|| ApiError::NotFound(format!("license `{id}` not found")))
}

/// Revokes license `id`: every later Check with its keys is denied.
pub async fn revoke(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    get_license(state, id)?;
    let why = reason_opt(reason).unwrap_or_else(|| "revoked by an administrator".to_string());
    write(
        state,
        caller,
        Some(why.clone()),
        ConfigOp::RevokeLicense {
            id: id.to_string(),
            reason: why,
        },
    )
    .await
}

/// Issues a new API key for license `id`; only its hash is stored.
pub async fn issue_key(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    name: &str,
    reason: &str,
) -> Result<IssuedKey, ApiError> {
    get_license(state, id)?;
    let mut random = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let key = keys::generate_key(random);
    let sha256 = keys::hash_key(&key);
    let sha256_hex = sha256.clone();
    let key_id = if name.trim().is_empty() {
        format!("key-{}", &sha256[..8])
    } else {
        name.trim().to_string()
    };
    let stored = StoredKey {
        id: Some(key_id.clone()),
        sha256,
    };
    let version = write(
        state,
        caller,
        reason_opt(reason),
        ConfigOp::AddKey {
            license_id: id.to_string(),
            key: stored,
        },
    )
    .await?;
    // A retried request (same idempotency key) is not applied again, and
    // the key drawn for the retry was never stored: refuse to show it.
    let stored = state
        .config()
        .license(id)
        .is_some_and(|l| l.keys.iter().any(|k| k.sha256 == sha256_hex));
    if !stored {
        return Err(ApiError::Rejected(
            "this idempotency key already issued a key; it was shown then and cannot be shown again"
                .to_string(),
        ));
    }
    Ok(IssuedKey {
        key,
        key_id,
        version,
    })
}

/// The list view of a license (no key material).
pub fn summary(l: &License) -> tollgate_proto::v1::LicenseSummary {
    tollgate_proto::v1::LicenseSummary {
        id: l.id.clone(),
        customer: l.customer.clone(),
        tier: l.tier.clone(),
        status: l.status.label().to_string(),
        n_keys: u32::try_from(l.keys.len()).unwrap_or(u32::MAX),
        n_quotas: u32::try_from(l.quotas.len()).unwrap_or(u32::MAX),
    }
}

/// The recorded changes of license `id`, oldest first, as JSON records
/// (version, actor, time, reason, action, diff; without the full document),
/// and the config version they were read at.
pub fn history(state: &NodeState, id: &str) -> Result<(serde_json::Value, u64), ApiError> {
    let config = state.config();
    let records = config.license_history(id);
    if records.is_empty() {
        return Err(ApiError::NotFound(format!("license `{id}` has no history")));
    }
    let json = records_json(records.iter().map(|r| (r, r.at_ms)))?;
    Ok((json, config.version))
}

/// The recorded changes of model `id`, oldest first, as JSON records, and
/// the config version they were read at.
pub fn model_history(state: &NodeState, id: &str) -> Result<(serde_json::Value, u64), ApiError> {
    let config = state.config();
    let records = config.model_history(id);
    if records.is_empty() {
        return Err(ApiError::NotFound(format!("model `{id}` has no history")));
    }
    let json = records_json(records.iter().map(|r| (r, r.at_ms)))?;
    Ok((json, config.version))
}

/// History records as a JSON array, each with an RFC 3339 `at` beside its
/// `at_ms` and without the full `document` (which carries key hashes).
fn records_json<'a, R: Serialize + 'a>(
    records: impl Iterator<Item = (&'a R, i64)>,
) -> Result<serde_json::Value, ApiError> {
    let mut out = Vec::new();
    for (r, at_ms) in records {
        let mut v = serde_json::to_value(r).map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            obj.remove("document");
            if let Some(at) = chrono::DateTime::from_timestamp_millis(at_ms) {
                let at = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                obj.insert("at".to_string(), serde_json::Value::String(at));
            }
        }
        out.push(v);
    }
    Ok(serde_json::Value::Array(out))
}

/// Writes license `id` as it was at config version `to_version` back as a
/// new version. History is appended to, never rewritten.
pub async fn rollback(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    to_version: u64,
    reason: &str,
) -> Result<u64, ApiError> {
    let why = reason_opt(reason).unwrap_or_else(|| format!("rollback to version {to_version}"));
    write(
        state,
        caller,
        Some(why),
        ConfigOp::RollbackLicense {
            id: id.to_string(),
            to_version,
        },
    )
    .await
}

/// Removes key `key_id` (its name, or a prefix of its hash) from license
/// `license_id`.
pub async fn revoke_key(
    state: &NodeState,
    caller: &Caller,
    license_id: &str,
    key_id: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    get_license(state, license_id)?;
    if key_id.trim().is_empty() {
        return Err(ApiError::InvalidArgument(
            "key_id: must not be empty".into(),
        ));
    }
    write(
        state,
        caller,
        reason_opt(reason),
        ConfigOp::RevokeKey {
            license_id: license_id.to_string(),
            key_id: key_id.trim().to_string(),
        },
    )
    .await
}

/// How long `cluster_status` waits for each member's answer.
const PEER_STATUS_TIMEOUT_MS: u64 = 1_000;

/// Every member's view: role, term, applied index and lag behind the
/// leader's log. Members that do not answer are listed as unreachable.
pub async fn cluster_status(state: &NodeState) -> serde_json::Value {
    let consensus = &state.consensus;
    let local = consensus.metrics();
    let members = consensus.members();
    let mut set = tokio::task::JoinSet::new();
    for m in &members {
        if m.id == state.node_id {
            continue;
        }
        let c = Arc::clone(consensus);
        let (id, info) = (m.id, m.info.clone());
        set.spawn(async move {
            let r = tokio::time::timeout(
                std::time::Duration::from_millis(PEER_STATUS_TIMEOUT_MS),
                c.peer_status(&info),
            )
            .await;
            let r = match r {
                Ok(Ok(m)) => Ok(m),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {PEER_STATUS_TIMEOUT_MS} ms")),
            };
            (id, r)
        });
    }
    let mut views = std::collections::BTreeMap::new();
    views.insert(state.node_id, Ok(local.clone()));
    while let Some(joined) = set.join_next().await {
        if let Ok((id, r)) = joined {
            views.insert(id, r);
        }
    }
    let leader_log = local
        .leader
        .and_then(|l| views.get(&l))
        .and_then(|v| v.as_ref().ok())
        .and_then(|m| m.last_log_index);
    let nodes: Vec<serde_json::Value> = members
        .iter()
        .map(|m| {
            let mut node = serde_json::json!({
                "id": m.id,
                "region": m.info.region,
                "voter": m.voter,
                "raft_addr": m.info.raft_addr,
                "grpc_addr": m.info.grpc_addr,
                "http_addr": m.info.http_addr,
                "leader": local.leader == Some(m.id),
            });
            match views.get(&m.id) {
                Some(Ok(v)) => {
                    // Where it serves now: edge ports may have moved since
                    // it registered.
                    if !v.serving.grpc_addr.is_empty() {
                        node["grpc_addr"] = v.serving.grpc_addr.clone().into();
                        node["http_addr"] = v.serving.http_addr.clone().into();
                    }
                    let applied = v.last_applied_index.unwrap_or(0);
                    node["reachable"] = true.into();
                    node["state"] = v.state.clone().into();
                    node["term"] = v.term.into();
                    node["applied_index"] = applied.into();
                    node["lag"] = leader_log.map(|l| l.saturating_sub(applied)).into();
                }
                Some(Err(e)) => {
                    node["reachable"] = false.into();
                    node["error"] = e.clone().into();
                }
                None => node["reachable"] = false.into(),
            }
            node
        })
        .collect();
    serde_json::json!({
        "node_id": state.node_id,
        "leader": local.leader,
        "term": local.term,
        "config_version": state.config().version,
        "nodes": nodes,
    })
}

/// Removes node `node_id` from the cluster membership.
pub async fn remove_node(
    state: &NodeState,
    caller: &Caller,
    node_id: u64,
    reason: &str,
) -> Result<u64, ApiError> {
    if !state.consensus.members().iter().any(|m| m.id == node_id) {
        return Err(ApiError::NotFound(format!(
            "node {node_id} is not a member"
        )));
    }
    tracing::info!(node_id, actor = %caller.actor, reason, "removing node from the cluster");
    state
        .consensus
        .remove_node(node_id)
        .await
        .map_err(write_error)
}

/// Longest an exception may be approved for, from now.
pub const MAX_EXCEPTION_DURATION_MS: i64 = 366 * 86_400_000;

/// What a caller asks for in `POST /v1/exceptions`.
#[derive(Debug, Clone)]
pub struct ExceptionAsk {
    /// License id.
    pub license: String,
    /// Quota id.
    pub quota: String,
    /// Units to raise the limit by.
    pub amount: u64,
    /// Why.
    pub reason: String,
    /// Until when the caller would like it (unix ms).
    pub requested_until_ms: Option<i64>,
}

/// Parses an instant: RFC 3339 (`2026-07-01T00:00:00Z`), or a duration from
/// `now_ms` such as `90s`, `15m`, `12h`, `7d`.
pub fn parse_until(text: &str, now_ms: i64) -> Result<i64, ApiError> {
    let text = text.trim();
    if let Some(d) = license::HumaneDuration::parse(text) {
        return Ok(now_ms.saturating_add(i64::try_from(d.ms).unwrap_or(i64::MAX)));
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::InvalidArgument(format!(
                "until: expected an RFC 3339 time (2026-07-01T00:00:00Z) or a duration from now (90s, 15m, 12h, 7d), got {text:?}"
            ))
        })
}

/// Asks for a quota exception; returns it, pending, as committed.
pub async fn request_exception(
    state: &NodeState,
    caller: &Caller,
    ask: ExceptionAsk,
) -> Result<serde_json::Value, ApiError> {
    let (license, _) = get_license(state, &ask.license)?;
    if !license.quotas.iter().any(|q| q.id == ask.quota) {
        return Err(ApiError::InvalidArgument(format!(
            "quota: license `{}` has no quota `{}`",
            ask.license, ask.quota
        )));
    }
    if !(1..=tollgate_quota::config::MAX_EXCEPTION_AMOUNT).contains(&ask.amount) {
        return Err(ApiError::InvalidArgument(format!(
            "amount: must be 1 to {}",
            tollgate_quota::config::MAX_EXCEPTION_AMOUNT
        )));
    }
    let reason = governance::check_reason(Some(&ask.reason)).map_err(ApiError::InvalidArgument)?;
    if let Some(until) = ask.requested_until_ms
        && until <= state.now_ms()
    {
        return Err(ApiError::InvalidArgument(
            "requested_until: must be in the future".into(),
        ));
    }
    let version = write(
        state,
        caller,
        Some(reason.to_string()),
        ConfigOp::RequestException {
            license_id: ask.license.clone(),
            quota_id: ask.quota.clone(),
            amount: ask.amount,
            requested_until_ms: ask.requested_until_ms,
        },
    )
    .await?;
    exception_json(state, &governance::exception_id(version))
}

/// The exception `id` as JSON, with its state now.
pub fn exception_json(state: &NodeState, id: &str) -> Result<serde_json::Value, ApiError> {
    let config = state.config();
    let e = config
        .exception(id)
        .ok_or_else(|| ApiError::NotFound(format!("exception `{id}` not found")))?;
    Ok(render_exception(e, state.now_ms()))
}

fn render_exception(e: &QuotaException, now_ms: i64) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("state".into(), e.state_at(now_ms).into());
        for (field, ms) in [
            ("requested_at", Some(e.requested_at_ms)),
            ("requested_until", e.requested_until_ms),
            ("until", e.until_ms),
            ("decided_at", e.decided_at_ms),
        ] {
            if let Some(at) = ms.and_then(crate::api::rfc3339_ms) {
                obj.insert(field.into(), at.into());
            }
        }
    }
    v
}

/// Every exception (of `license`, in `state` if given), newest first.
pub fn list_exceptions(
    state: &NodeState,
    license: Option<&str>,
    wanted: Option<&str>,
) -> serde_json::Value {
    let config = state.config();
    let now = state.now_ms();
    let mut list: Vec<&QuotaException> = config
        .exceptions()
        .filter(|e| license.is_none_or(|l| e.license == l))
        .filter(|e| wanted.is_none_or(|s| e.state_at(now) == s))
        .collect();
    list.sort_by_key(|e| std::cmp::Reverse(e.requested_at_ms));
    let items: Vec<serde_json::Value> = list.iter().map(|e| render_exception(e, now)).collect();
    serde_json::json!({"exceptions": items, "version": config.version})
}

/// Approves pending exception `id` until `until_ms`.
pub async fn approve_exception(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    until_ms: i64,
    reason: &str,
) -> Result<serde_json::Value, ApiError> {
    exception_json(state, id)?;
    let now = state.now_ms();
    if until_ms <= now {
        return Err(ApiError::InvalidArgument(
            "until: must be in the future".into(),
        ));
    }
    if until_ms > now.saturating_add(MAX_EXCEPTION_DURATION_MS) {
        return Err(ApiError::InvalidArgument(
            "until: at most 366 days from now".into(),
        ));
    }
    write(
        state,
        caller,
        reason_opt(reason),
        ConfigOp::ApproveException {
            id: id.to_string(),
            until_ms,
        },
    )
    .await?;
    exception_json(state, id)
}

/// Rejects pending exception `id`.
pub async fn reject_exception(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    reason: &str,
) -> Result<serde_json::Value, ApiError> {
    exception_json(state, id)?;
    let reason = governance::check_reason(Some(reason)).map_err(ApiError::InvalidArgument)?;
    write(
        state,
        caller,
        Some(reason.to_string()),
        ConfigOp::RejectException { id: id.to_string() },
    )
    .await?;
    exception_json(state, id)
}

fn render_escalation(e: &Escalation, now_ms: i64) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("overdue".into(), e.overdue(now_ms).into());
        for (field, ms) in [
            ("opened_at", Some(e.opened_at_ms)),
            ("deadline", Some(e.deadline_ms)),
            ("updated_at", e.updated_at_ms),
        ] {
            if let Some(at) = ms.and_then(crate::api::rfc3339_ms) {
                obj.insert(field.into(), at.into());
            }
        }
    }
    v
}

/// The escalation `id` as JSON.
pub fn escalation_json(state: &NodeState, id: &str) -> Result<serde_json::Value, ApiError> {
    let config = state.config();
    let e = config
        .escalation(id)
        .ok_or_else(|| ApiError::NotFound(format!("escalation `{id}` not found")))?;
    Ok(render_escalation(e, state.now_ms()))
}

/// Every escalation (of `license`, with `status` if given), newest first.
pub fn list_escalations(
    state: &NodeState,
    license: Option<&str>,
    status: Option<&str>,
) -> serde_json::Value {
    let config = state.config();
    let now = state.now_ms();
    let mut list: Vec<&Escalation> = config
        .escalations()
        .filter(|e| license.is_none_or(|l| e.license == l))
        .filter(|e| {
            status.is_none_or(|s| {
                serde_json::to_value(e.status)
                    .ok()
                    .as_ref()
                    .and_then(|v| v.as_str())
                    == Some(s)
            })
        })
        .collect();
    list.sort_by_key(|e| std::cmp::Reverse(e.version));
    let items: Vec<serde_json::Value> = list.iter().map(|e| render_escalation(e, now)).collect();
    serde_json::json!({"escalations": items, "version": config.version})
}

/// Acknowledges (`resolve` false) or resolves escalation `id`.
pub async fn update_escalation(
    state: &NodeState,
    caller: &Caller,
    id: &str,
    resolve: bool,
    reason: &str,
) -> Result<serde_json::Value, ApiError> {
    escalation_json(state, id)?;
    let op = if resolve {
        ConfigOp::ResolveEscalation { id: id.to_string() }
    } else {
        ConfigOp::AcknowledgeEscalation { id: id.to_string() }
    };
    write(state, caller, reason_opt(reason), op).await?;
    escalation_json(state, id)
}
