//! The audit record format: what one record holds, its canonical encoding
//! and hash, and the signed checkpoints over the chain.
//!
//! A record holds ids, codes and hashes only: never a key, a raw subject, a
//! license document or any inference content. Each record carries the hash
//! of the one before it (`prev`), so changing, removing or inserting a
//! record breaks every link after it; a checkpoint signs the hash of one
//! record with the node's Ed25519 key, so rewriting the chain from some
//! point on needs that key too.
//!
//! The encoding is postcard (fields in declaration order, varints, enum
//! variants by index): one byte string per record, the same on every
//! platform and every run. That byte string is what is stored and what is
//! hashed, so verifying never depends on re-serialising. Fields and enum
//! variants are only ever appended; `format` names the layout.
//!
//! This module is pure: no storage, no clock.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::keys::{NodeSigner, verify_signature};

/// The record layout this code writes.
pub const FORMAT_VERSION: u8 = 1;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev` of the first record.
pub const GENESIS_PREV: Hash = [0; 32];

/// Hashed before a record's bytes, so a record hash can never be confused
/// with any other SHA-256 the product computes.
const RECORD_DOMAIN: &[u8] = b"tollgate/audit/record/v1\0";
/// Signed before a checkpoint's fields, for the same reason.
const CHECKPOINT_DOMAIN: &[u8] = b"tollgate/audit/checkpoint/v1\0";

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// [`FORMAT_VERSION`] when written.
    pub format: u8,
    /// Position in this node's log, from 1, without gaps.
    pub seq: u64,
    /// Hash of record `seq - 1` ([`GENESIS_PREV`] for the first).
    pub prev: Hash,
    /// When it happened, unix ms on the node's clock.
    pub at_ms: i64,
    /// The node that wrote it.
    pub node: u64,
    /// What happened.
    pub body: Body,
}

/// What a record is about. Variants are only ever appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// The writer started (node start): the keys it works with.
    Start(StartRecord),
    /// A Check or Report decision.
    Decision(DecisionRecord),
    /// A seat acquire, renew or release.
    Seat(SeatRecord),
    /// A config command the state machine applied (or rejected).
    Config(ConfigRecord),
    /// A membership change.
    Membership(MembershipRecord),
    /// The config was replaced by a snapshot up to `index`; the changes it
    /// covers are not recorded one by one on this node.
    Snapshot {
        /// Last log index the snapshot covers.
        index: u64,
    },
    /// Records dropped because the writer's queue was full (`on_full:
    /// shed`, or a `block` wait that timed out) since the last such record.
    Shed {
        /// How many.
        n_records: u64,
    },
    /// Config changes the node could not record because it fell behind
    /// the state machine by more than its feed holds.
    ConfigGap {
        /// How many applied entries were not recorded.
        n_entries: u64,
    },
}

/// The first record of each start of the writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The config version applied when the writer started.
    pub policy_version: u64,
    /// The Ed25519 key this run signs checkpoints with.
    pub public_key: [u8; 32],
    /// Fingerprint of the key subject pseudonyms are made with.
    pub subject_key_id: [u8; 8],
    /// The node's software version.
    pub software: String,
}

/// Which edge call a decision answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecisionOp {
    /// Check (before an inference).
    Check,
    /// Report (usage measured after one).
    Report,
}

/// A decision's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
    /// Throttled.
    Throttle,
}

impl Verdict {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Throttle => "throttle",
        }
    }
}

/// One Check or Report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Check or Report.
    pub op: DecisionOp,
    /// The decision id returned to the caller.
    pub decision_id: String,
    /// The license the key resolved to (none for an unknown key).
    pub license: Option<String>,
    /// HMAC-SHA256 of the subject under the cluster's subject key.
    pub subject: Option<Hash>,
    /// Model id as sent.
    pub model: String,
    /// Model version as sent.
    pub model_version: String,
    /// The outcome.
    pub verdict: Verdict,
    /// Codes of every failing rule.
    pub reasons: Vec<String>,
    /// The config version the decision used.
    pub policy_version: u64,
    /// The caller's digest of the inference input.
    pub input_hash: Option<Vec<u8>>,
    /// The caller's digest of the inference output.
    pub output_hash: Option<Vec<u8>>,
    /// The caller's request id.
    pub request_id: Option<String>,
    /// Whether nothing was consumed.
    pub dry_run: bool,
}

/// Which seat call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeatCall {
    /// Acquire.
    Acquire,
    /// Renew.
    Renew,
    /// Release.
    Release,
}

impl SeatCall {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SeatCall::Acquire => "seat_acquire",
            SeatCall::Renew => "seat_renew",
            SeatCall::Release => "seat_release",
        }
    }
}

/// One seat call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatRecord {
    /// Which call.
    pub call: SeatCall,
    /// An id for this call (seat answers carry none of their own).
    pub decision_id: String,
    /// The license.
    pub license: Option<String>,
    /// The lease involved.
    pub lease_id: Option<String>,
    /// Whether the seat is held after the call.
    pub granted: bool,
    /// Codes of every failing rule.
    pub reasons: Vec<String>,
    /// The config version used.
    pub policy_version: u64,
}

/// One applied config command: who, what kind, on which ids, and a hash of
/// the command (never its content).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    /// Raft log index (the policy version it produced).
    pub index: u64,
    /// Term of the leader that wrote it.
    pub term: u64,
    /// The admin token name (or `bootstrap`, `node-N`) that made it.
    pub actor: String,
    /// The op's kind, e.g. `put_license`.
    pub op: String,
    /// What it touched, as `kind:id`.
    pub targets: Vec<String>,
    /// SHA-256 of the command's JSON encoding.
    pub command_sha256: Hash,
    /// Whether the state machine applied it (else it was rejected and
    /// changed nothing).
    pub applied: bool,
}

/// One membership change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRecord {
    /// Raft log index.
    pub index: u64,
    /// Term of the leader that wrote it.
    pub term: u64,
    /// Voters after it.
    pub voters: Vec<u64>,
    /// Learners after it.
    pub learners: Vec<u64>,
}

/// Encoding or decoding a record failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// postcard refused the value or the bytes.
    #[error("record encoding: {0}")]
    Encoding(#[from] postcard::Error),
}

/// The hash of a record's stored bytes.
pub fn hash_bytes(bytes: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(bytes);
    h.finalize().into()
}

impl Record {
    /// The canonical bytes (what is stored and hashed).
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        Ok(postcard::to_allocvec(self)?)
    }

    /// Decodes canonical bytes; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let (record, rest) = postcard::take_from_bytes::<Record>(bytes)?;
        if !rest.is_empty() {
            return Err(RecordError::Encoding(
                postcard::Error::DeserializeBadEncoding,
            ));
        }
        Ok(record)
    }
}

/// A signed statement that record `seq` of node `node`'s log has hash
/// `hash`: everything up to it is fixed unless the signing key is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The node.
    pub node: u64,
    /// The record it covers (and, through the chain, all before it).
    pub seq: u64,
    /// That record's hash.
    pub hash: Hash,
    /// When it was made (the node's clock).
    pub at_ms: i64,
    /// The signing key.
    pub public_key: [u8; 32],
    /// Ed25519 signature of [`Checkpoint::message`].
    pub signature: [u8; 64],
}

/// Encoded size of a checkpoint: format, node, seq, hash, time, key,
/// signature.
pub const CHECKPOINT_BYTES: usize = 1 + 8 + 8 + 32 + 8 + 32 + 64;

impl Checkpoint {
    /// Signs a checkpoint of record `seq` with hash `hash`.
    pub fn sign(signer: &NodeSigner, node: u64, seq: u64, hash: Hash, at_ms: i64) -> Self {
        let public_key = signer.public_key();
        let signature = signer.sign(&Self::message(node, seq, &hash, at_ms, &public_key));
        Self {
            node,
            seq,
            hash,
            at_ms,
            public_key,
            signature,
        }
    }

    /// The bytes signed.
    pub fn message(node: u64, seq: u64, hash: &Hash, at_ms: i64, public_key: &[u8; 32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + 8 + 32 + 8 + 32);
        m.extend_from_slice(CHECKPOINT_DOMAIN);
        m.extend_from_slice(&node.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(hash);
        m.extend_from_slice(&at_ms.to_be_bytes());
        m.extend_from_slice(public_key);
        m
    }

    /// Whether the signature is the embedded key's. Whether that key is
    /// one to trust is the verifier's question.
    pub fn signature_is_valid(&self) -> bool {
        let message = Self::message(
            self.node,
            self.seq,
            &self.hash,
            self.at_ms,
            &self.public_key,
        );
        verify_signature(&self.public_key, &message, &self.signature)
    }

    /// The stored form (fixed size, [`CHECKPOINT_BYTES`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHECKPOINT_BYTES);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.node.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses the stored form; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != CHECKPOINT_BYTES || bytes[0] != FORMAT_VERSION {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            b
        };
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[17..49]);
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&bytes[57..89]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[89..153]);
        Some(Self {
            node: u64::from_be_bytes(u64_at(1)),
            seq: u64::from_be_bytes(u64_at(9)),
            hash,
            at_ms: i64::from_be_bytes(u64_at(49)),
            public_key,
            signature,
        })
    }

    /// The checkpoint as one JSON object (an export line).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "checkpoint",
            "seq": self.seq,
            "hash": hex::encode(self.hash),
            "at": crate::api::rfc3339_ms(self.at_ms),
            "at_ms": self.at_ms,
            "node": self.node,
            "public_key": hex::encode(self.public_key),
            "signature": hex::encode(self.signature),
        })
    }
}

fn hex_opt(bytes: Option<&[u8]>) -> serde_json::Value {
    bytes.map_or(serde_json::Value::Null, |b| hex::encode(b).into())
}

impl Record {
    /// The record as one JSON object (an export line), with its hash.
    pub fn to_json(&self, hash: &Hash) -> serde_json::Value {
        let mut v = serde_json::json!({
            "seq": self.seq,
            "hash": hex::encode(hash),
            "prev": hex::encode(self.prev),
            "at": crate::api::rfc3339_ms(self.at_ms),
            "at_ms": self.at_ms,
            "node": self.node,
        });
        let fields = match &self.body {
            Body::Start(s) => serde_json::json!({
                "type": "start",
                "policy_version": s.policy_version,
                "public_key": hex::encode(s.public_key),
                "subject_key_id": hex::encode(s.subject_key_id),
                "software": s.software,
            }),
            Body::Decision(d) => serde_json::json!({
                "type": "decision",
                "op": match d.op { DecisionOp::Check => "check", DecisionOp::Report => "report" },
                "decision_id": d.decision_id,
                "license": d.license,
                "subject": hex_opt(d.subject.as_ref().map(|s| &s[..])),
                "model": d.model,
                "model_version": d.model_version,
                "decision": d.verdict.as_str(),
                "reasons": d.reasons,
                "policy_version": d.policy_version,
                "input_hash": hex_opt(d.input_hash.as_deref()),
                "output_hash": hex_opt(d.output_hash.as_deref()),
                "request_id": d.request_id,
                "dry_run": d.dry_run,
            }),
            Body::Seat(s) => serde_json::json!({
                "type": "seat",
                "op": s.call.as_str(),
                "decision_id": s.decision_id,
                "license": s.license,
                "lease_id": s.lease_id,
                "granted": s.granted,
                "reasons": s.reasons,
                "policy_version": s.policy_version,
            }),
            Body::Config(c) => serde_json::json!({
                "type": "config",
                "index": c.index,
                "term": c.term,
                "actor": c.actor,
                "op": c.op,
                "targets": c.targets,
                "command_sha256": hex::encode(c.command_sha256),
                "applied": c.applied,
            }),
            Body::Membership(m) => serde_json::json!({
                "type": "membership",
                "index": m.index,
                "term": m.term,
                "voters": m.voters,
                "learners": m.learners,
            }),
            Body::Snapshot { index } => serde_json::json!({"type": "snapshot", "index": index}),
            Body::Shed { n_records } => serde_json::json!({"type": "shed", "n_records": n_records}),
            Body::ConfigGap { n_entries } => {
                serde_json::json!({"type": "config_gap", "n_entries": n_entries})
            }
        };
        if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
            obj.extend(extra);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn decision(seq: u64, prev: Hash) -> Record {
        Record {
            format: FORMAT_VERSION,
            seq,
            prev,
            at_ms: 1_700_000_000_000 + seq as i64,
            node: 1,
            body: Body::Decision(DecisionRecord {
                op: DecisionOp::Check,
                decision_id: format!("1-{seq:x}-00000000"),
                license: Some("demo".into()),
                subject: Some([7; 32]),
                model: "demo-classifier".into(),
                model_version: "2.1.0".into(),
                verdict: Verdict::Deny,
                reasons: vec!["quota_exceeded".into()],
                policy_version: 9,
                input_hash: Some(vec![0xab; 32]),
                output_hash: None,
                request_id: Some("r-1".into()),
                dry_run: false,
            }),
        }
    }

    #[test]
    fn encoding_round_trips_and_is_stable() -> anyhow::Result<()> {
        let r = decision(3, [1; 32]);
        let bytes = r.encode()?;
        assert_eq!(Record::decode(&bytes)?, r);
        assert_eq!(r.encode()?, bytes, "same record, same bytes");
        assert_eq!(hash_bytes(&bytes), hash_bytes(&r.encode()?));
        // Trailing garbage is not a record.
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
        Ok(())
    }

    #[test]
    fn the_json_form_holds_ids_and_hashes_only() {
        let r = decision(3, [1; 32]);
        let v = r.to_json(&[2; 32]);
        assert_eq!(v["type"], "decision");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["subject"], hex::encode([7u8; 32]));
        assert_eq!(v["input_hash"], hex::encode([0xabu8; 32]));
        assert_eq!(v["output_hash"], serde_json::Value::Null);
        assert_eq!(v["prev"], hex::encode([1u8; 32]));
    }

    #[test]
    fn checkpoints_round_trip_and_their_signatures_bind_every_field() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (signer, _) = NodeSigner::load_or_create(&dir.path().join("k"))?;
        let cp = Checkpoint::sign(&signer, 1, 42, [9; 32], 1_700_000_000_000);
        assert!(cp.signature_is_valid());
        let decoded = Checkpoint::decode(&cp.encode());
        assert_eq!(decoded.as_ref(), Some(&cp));
        for tamper in [
            |c: &mut Checkpoint| c.seq += 1,
            |c: &mut Checkpoint| c.node += 1,
            |c: &mut Checkpoint| c.hash[0] ^= 1,
            |c: &mut Checkpoint| c.at_ms += 1,
            |c: &mut Checkpoint| c.signature[10] ^= 1,
        ] {
            let mut bad = cp.clone();
            tamper(&mut bad);
            assert!(!bad.signature_is_valid());
        }
        assert!(Checkpoint::decode(&cp.encode()[1..]).is_none());
        Ok(())
    }
}
