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
use tollgate_quota::keys;
use tollgate_quota::license::{self, Document, License, StoredKey};

use crate::api::ApiError;
use crate::state::{NodeState, now_ms};

/// One document applied by `apply_documents`.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedDoc {
    /// "Model" or "License".
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
fn precheck(state: &NodeState, ops: &[ConfigOp]) -> Result<(), ApiError> {
    let mut trial = (*state.config()).clone();
    for op in ops {
        let cmd = ConfigCommand {
            actor: String::new(),
            reason: None,
            at_ms: now_ms(),
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
    actor: &str,
    reason: Option<String>,
    op: ConfigOp,
) -> Result<u64, ApiError> {
    precheck(state, std::slice::from_ref(&op))?;
    let cmd = ConfigCommand {
        actor: actor.to_string(),
        reason,
        at_ms: now_ms(),
        op,
    };
    match state.consensus.write(cmd).await {
        Ok(ApplyOutcome::Applied { version }) => Ok(version),
        Ok(ApplyOutcome::Rejected { reason, .. }) => Err(ApiError::Rejected(reason)),
        Err(e @ WriteError::Fatal(_)) => Err(ApiError::Internal(e.to_string())),
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
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

/// Applies every Model and License document in `text`, models first so that
/// licenses may refer to them. All documents are validated before any write.
pub async fn apply_documents(
    state: &NodeState,
    actor: &str,
    text: &str,
    reason: &str,
) -> Result<Vec<AppliedDoc>, ApiError> {
    let mut docs = license::parse_documents(text).map_err(invalid)?;
    if docs.is_empty() {
        return Err(ApiError::InvalidArgument("no documents found".into()));
    }
    docs.sort_by_key(|d| match d {
        Document::Model(_) => 0,
        Document::License(_) => 1,
    });
    let planned: Vec<(&'static str, String, ConfigOp)> = docs
        .into_iter()
        .map(|doc| match doc {
            Document::Model(m) => ("Model", m.id.clone(), ConfigOp::PutModel(m)),
            Document::License(l) => ("License", l.id.clone(), ConfigOp::PutLicense(l)),
        })
        .collect();
    let ops: Vec<ConfigOp> = planned.iter().map(|(_, _, op)| op.clone()).collect();
    precheck(state, &ops)?;
    let mut applied = Vec::with_capacity(planned.len());
    for (kind, id, op) in planned {
        let version = write(state, actor, reason_opt(reason), op).await?;
        applied.push(AppliedDoc { kind, id, version });
    }
    Ok(applied)
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
    actor: &str,
    id: &str,
    text: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    let lic = license::parse_license(text).map_err(invalid)?;
    ensure_path_id(&lic.id, id)?;
    write(state, actor, reason_opt(reason), ConfigOp::PutLicense(lic)).await
}

/// Creates or replaces model `id` from a YAML or JSON document.
pub async fn put_model(
    state: &NodeState,
    actor: &str,
    id: &str,
    text: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    let model = license::parse_model(text).map_err(invalid)?;
    ensure_path_id(&model.id, id)?;
    write(state, actor, reason_opt(reason), ConfigOp::PutModel(model)).await
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
    actor: &str,
    id: &str,
    reason: &str,
) -> Result<u64, ApiError> {
    get_license(state, id)?;
    let why = reason_opt(reason).unwrap_or_else(|| "revoked by an administrator".to_string());
    write(
        state,
        actor,
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
    actor: &str,
    id: &str,
    name: &str,
    reason: &str,
) -> Result<IssuedKey, ApiError> {
    get_license(state, id)?;
    let mut random = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let key = keys::generate_key(random);
    let sha256 = keys::hash_key(&key);
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
        actor,
        reason_opt(reason),
        ConfigOp::AddKey {
            license_id: id.to_string(),
            key: stored,
        },
    )
    .await?;
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
