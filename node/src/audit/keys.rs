//! The audit log's secrets: this node's Ed25519 signing key (checkpoints)
//! and the cluster's subject pseudonymisation key (HMAC-SHA256).
//!
//! Both come from `ring`, which the node already links for TLS (rustls and
//! quinn use it), so signing, verifying and keyed hashing add no crate. The
//! signing key lives in a file of its own (mode 0600) in the data dir and
//! is created from OS randomness on first start; its public half goes into
//! the replicated config. The subject key is derived from the cluster token,
//! which every member already shares, so every node gives one subject the
//! same pseudonym. Neither key is ever logged or written into the log.

use std::path::Path;

use anyhow::Context;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

/// Label the subject key is derived under, so the cluster token is never
/// used as an HMAC key directly for anything else.
const SUBJECT_KEY_LABEL: &[u8] = b"tollgate/audit/subject-pseudonym/v1";
/// Label of the subject key's public fingerprint.
const SUBJECT_KEY_ID_LABEL: &[u8] = b"tollgate/audit/subject-key-id/v1";

/// This node's checkpoint signing key.
pub struct NodeSigner {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner")
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl NodeSigner {
    /// Loads the key in `path`, or creates one there (mode 0600) when the
    /// file does not exist. Returns whether it was created. Two processes
    /// (or threads) creating it at once end up with the same key: the
    /// first file linked into place wins and the other loads it.
    pub fn load_or_create(path: &Path) -> anyhow::Result<(Self, bool)> {
        match std::fs::read(path) {
            Ok(pkcs8) => Ok((Self::from_pkcs8(&pkcs8, path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| anyhow::anyhow!("generating the audit signing key"))?;
                if create_private(path, pkcs8.as_ref(), &rng)? {
                    Ok((Self::from_pkcs8(pkcs8.as_ref(), path)?, true))
                } else {
                    Ok((Self::load(path)?, false))
                }
            }
            Err(e) => Err(e).with_context(|| format!("reading audit key {}", path.display())),
        }
    }

    /// Loads the key in `path`; an error if there is none.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let pkcs8 =
            std::fs::read(path).with_context(|| format!("reading audit key {}", path.display()))?;
        Self::from_pkcs8(&pkcs8, path)
    }

    fn from_pkcs8(pkcs8: &[u8], path: &Path) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|e| {
            anyhow::anyhow!(
                "audit key {} is not an Ed25519 PKCS#8 key: {e}",
                path.display()
            )
        })?;
        Ok(Self { pair })
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// Signs `message` (Ed25519 is deterministic: same message, same
    /// signature).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

/// Whether `signature` is `public_key`'s Ed25519 signature of `message`.
pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

/// Creates `path` holding `bytes`, readable by the owner only, unless it
/// exists: written to a private temporary file first, then linked into
/// place, so a crash never leaves half a key and a file someone else
/// created first is never replaced. Returns whether this call created it.
fn create_private(
    path: &Path,
    bytes: &[u8],
    rng: &ring::rand::SystemRandom,
) -> anyhow::Result<bool> {
    use std::io::Write;

    use ring::rand::SecureRandom;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut suffix = [0u8; 8];
    rng.fill(&mut suffix)
        .map_err(|_| anyhow::anyhow!("drawing a temporary file name"))?;
    let tmp = path.with_extension(format!("{}.tmp", hex::encode(suffix)));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let linked = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
        });
    let _ = std::fs::remove_file(&tmp);
    linked
}

/// The keyed hash that turns a subject into a pseudonym: HMAC-SHA256 under
/// a key derived from the cluster token.
pub struct SubjectKey {
    key: ring::hmac::Key,
    id: [u8; 8],
}

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectKey")
            .field("id", &hex::encode(self.id))
            .finish_non_exhaustive()
    }
}

impl SubjectKey {
    /// The key every member derives from the shared cluster token.
    pub fn from_cluster_token(cluster_token: &str) -> Self {
        let token_key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, cluster_token.trim().as_bytes());
        let derived = ring::hmac::sign(&token_key, SUBJECT_KEY_LABEL);
        let mut digest = Sha256::new();
        digest.update(SUBJECT_KEY_ID_LABEL);
        digest.update(derived.as_ref());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.finalize()[..8]);
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            id,
        }
    }

    /// The pseudonym of `subject`.
    pub fn pseudonym(&self, subject: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::hmac::sign(&self.key, subject.as_bytes()).as_ref());
        out
    }

    /// A public fingerprint of the key (8 bytes of a hash of it), recorded
    /// so an auditor knows which key made a pseudonym without learning it.
    pub fn id(&self) -> [u8; 8] {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_created_private_and_loads_the_same_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.key");
        let (created, was_new) = NodeSigner::load_or_create(&path)?;
        assert!(was_new);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (loaded, was_new) = NodeSigner::load_or_create(&path)?;
        assert!(!was_new);
        assert_eq!(created.public_key(), loaded.public_key());
        let signature = loaded.sign(b"message");
        assert!(verify_signature(
            &created.public_key(),
            b"message",
            &signature
        ));
        assert!(!verify_signature(
            &created.public_key(),
            b"messagf",
            &signature
        ));
        assert!(!format!("{loaded:?}").contains("pkcs8"));
        Ok(())
    }

    #[test]
    fn racing_creators_agree_on_one_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.key");
        let keys: Vec<[u8; 32]> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| NodeSigner::load_or_create(&path).map(|(k, _)| k.public_key()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("panicked"))?)
                .collect::<anyhow::Result<_>>()
        })?;
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(NodeSigner::load(&path)?.public_key(), keys[0]);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn a_damaged_key_file_is_an_error_not_a_new_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.key");
        std::fs::write(&path, b"not a key")?;
        assert!(NodeSigner::load_or_create(&path).is_err());
        Ok(())
    }

    #[test]
    fn pseudonyms_depend_on_the_cluster_token_only() {
        let a = SubjectKey::from_cluster_token("cluster-secret");
        let b = SubjectKey::from_cluster_token("cluster-secret\n");
        let c = SubjectKey::from_cluster_token("other-secret");
        assert_eq!(a.pseudonym("alice"), b.pseudonym("alice"));
        assert_eq!(a.id(), b.id());
        assert_ne!(a.pseudonym("alice"), a.pseudonym("bob"));
        assert_ne!(a.pseudonym("alice"), c.pseudonym("alice"));
        assert_ne!(a.id(), c.id());
        assert!(!format!("{a:?}").contains("cluster-secret"));
    }
}
