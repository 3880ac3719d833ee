//! The replicated license configuration: the data consensus applies commands to.
//!
//! `Config` holds every license and model, plus a derived key-hash index for
//! the hot path. `apply` is deterministic and never panics: every node that
//! applies the same log reaches the same state. This module must not know
//! about usage or decisions, and must not read the clock (`at_ms` in a command
//! is recorded by the proposer, never used for validity here).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::license::{License, LicenseStatus, Model, StoredKey};

/// The replicated configuration: licenses and models.
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
    /// SHA-256 of each key -> license id. Derived; rebuilt after a snapshot.
    #[serde(skip)]
    key_index: HashMap<[u8; 32], String, BuildHasherDefault<DigestHasher>>,
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
    /// Remove a license and its keys.
    DeleteLicense {
        /// License id.
        id: String,
    },
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
    /// command that cannot apply is `Rejected` and changes nothing else.
    pub fn apply(&mut self, cmd: &ConfigCommand, index: u64) -> ApplyOutcome {
        self.version = index;
        match self.apply_op(&cmd.op) {
            Ok(()) => ApplyOutcome::Applied { version: index },
            Err(reason) => ApplyOutcome::Rejected {
                version: index,
                reason,
            },
        }
    }

    fn apply_op(&mut self, op: &ConfigOp) -> Result<(), String> {
        match op {
            ConfigOp::PutLicense(license) => {
                // Commands arrive from the log, possibly written by an older
                // or hostile proposer: validate again rather than trust it.
                license
                    .validate()
                    .map_err(|e| format!("invalid license: {e}"))?;
                for key in &license.keys {
                    let hash = keys::decode_hash(&key.sha256)
                        .ok_or_else(|| "invalid key hash".to_string())?;
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
                self.licenses
                    .insert(license.id.clone(), Arc::new(license.clone()));
                Ok(())
            }
            ConfigOp::RevokeLicense { id, reason } => {
                let license = self
                    .licenses
                    .get_mut(id)
                    .ok_or_else(|| format!("unknown license {id:?}"))?;
                Arc::make_mut(license).status = LicenseStatus::Revoked {
                    reason: Some(reason.clone()),
                };
                Ok(())
            }
            ConfigOp::AddKey { license_id, key } => {
                let hash = keys::decode_hash(&key.sha256.to_ascii_lowercase())
                    .ok_or_else(|| "key sha256 must be 64 hex characters".to_string())?;
                let Some(license) = self.licenses.get_mut(license_id) else {
                    return Err(format!("unknown license {license_id:?}"));
                };
                match self.key_index.get(&hash) {
                    Some(owner) if owner == license_id => return Ok(()),
                    Some(owner) => return Err(format!("key is already used by license {owner:?}")),
                    None => {}
                }
                let mut stored = key.clone();
                stored.sha256 = hex::encode(hash);
                let mut updated = License::clone(license);
                updated.keys.push(stored);
                updated
                    .validate()
                    .map_err(|e| format!("invalid key: {e}"))?;
                *license = Arc::new(updated);
                self.key_index.insert(hash, license_id.clone());
                Ok(())
            }
            ConfigOp::PutModel(model) => {
                model
                    .validate()
                    .map_err(|e| format!("invalid model: {e}"))?;
                self.models
                    .insert(model.id.clone(), Arc::new(model.clone()));
                Ok(())
            }
            ConfigOp::DeleteLicense { id } => {
                if self.licenses.remove(id).is_none() {
                    return Err(format!("unknown license {id:?}"));
                }
                self.remove_keys_of(id);
                Ok(())
            }
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

    /// The model with `id`.
    pub fn model(&self, id: &str) -> Option<&Arc<Model>> {
        self.models.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::parse_license;

    fn cmd(op: ConfigOp) -> ConfigCommand {
        ConfigCommand {
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
}
