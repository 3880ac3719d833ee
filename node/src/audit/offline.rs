//! Reading the audit log of a stopped node straight from its data dir:
//! what `tollgate audit verify --data-dir` and `tollgate audit export
//! --data-dir` run.
//!
//! sled locks its directory, so this works only while the node is stopped
//! (the error says so). Trusted keys come from the replicated config the
//! data dir holds (its snapshot and committed log), else from the node's key
//! file and the key the log recorded.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tollgate_consensus::storage::SledStorage;

use super::KEY_FILE_NAME;
use super::export::{ExportCursor, ExportQuery, MAX_EXPORT_LIMIT};
use super::keys::NodeSigner;
use super::store::AuditStore;
use super::verify::{VerifyReport, trusted_keys_for, verify};

/// The sled directory of a node data dir (`D/db`), or `D` itself when it
/// is one.
fn db_dir(data_dir: &Path) -> PathBuf {
    let nested = data_dir.join("db");
    if nested.is_dir() {
        nested
    } else {
        data_dir.to_path_buf()
    }
}

/// Opens a stopped node's storage.
pub fn open(data_dir: &Path) -> anyhow::Result<SledStorage> {
    let dir = db_dir(data_dir);
    anyhow::ensure!(
        dir.join("conf").is_file() || dir.join("db").is_file(),
        "{} holds no node storage (expected a node data dir with a db/ inside)",
        data_dir.display()
    );
    SledStorage::open(&dir).with_context(|| {
        format!(
            "opening {} (is the node still running? stop it first)",
            dir.display()
        )
    })
}

/// Verifies the audit log in `data_dir`. `key_file` overrides the node's
/// key file (default: `audit.key` in the data dir).
pub fn verify_data_dir(data_dir: &Path, key_file: Option<&Path>) -> anyhow::Result<VerifyReport> {
    let storage = open(data_dir)?;
    let store = AuditStore::open(&storage).context("opening the audit log")?;
    let node = store.node().context("reading the audit log")?;
    let mut local = Vec::new();
    let key_path = key_file.map_or_else(|| data_dir.join(KEY_FILE_NAME), Path::to_path_buf);
    if key_path.is_file() {
        let signer = NodeSigner::load(&key_path)?;
        local.push((
            signer.public_key(),
            format!("key file {}", key_path.display()),
        ));
    }
    if let Some(key) = store.public_key().context("reading the audit log")? {
        local.push((key, "the key the log recorded".to_string()));
    }
    let config = match tollgate_consensus::state_machine::recover_config(&storage) {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::warn!(error = %e, "the replicated config in this data dir cannot be read; checking against local keys");
            None
        }
    };
    let trusted = trusted_keys_for(config.as_ref(), node, local);
    verify(&store, &trusted).context("reading the audit log")
}

/// Writes the JSON Lines export of the audit log in `data_dir` to `sink`:
/// records at or after `since_ms`, at most `limit`. Returns how many
/// records it wrote.
pub fn export_data_dir(
    data_dir: &Path,
    since_ms: Option<i64>,
    limit: Option<u64>,
    sink: &mut dyn std::io::Write,
) -> anyhow::Result<u64> {
    let storage = open(data_dir)?;
    let store = AuditStore::open(&storage).context("opening the audit log")?;
    let mut remaining = limit.unwrap_or(u64::MAX);
    let mut query = ExportQuery {
        since_ms,
        after_seq: 0,
        limit: 0,
    };
    let mut n_records = 0u64;
    // Pages of the largest export, as over HTTP.
    loop {
        query.limit = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(MAX_EXPORT_LIMIT);
        let mut cursor = ExportCursor::start(&store, &query).context("reading the audit log")?;
        let mut n_page = 0usize;
        while let Some(chunk) = cursor.next_chunk(&store).context("reading the audit log")? {
            for line in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line)?;
                if v["type"] != "checkpoint" {
                    n_page += 1;
                    query.after_seq = v["seq"].as_u64().unwrap_or(query.after_seq);
                }
            }
            sink.write_all(&chunk)?;
        }
        n_records += n_page as u64;
        remaining = remaining.saturating_sub(n_page as u64);
        if n_page < query.limit || remaining == 0 {
            return Ok(n_records);
        }
    }
}
