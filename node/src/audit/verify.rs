//! Verifying an audit log: every record intact and linked to the one
//! before, no gaps, every checkpoint signed by a trusted key over the hash
//! the record really has, and the head where the records end.
//!
//! The first problem, in sequence order, is named: which record (or
//! checkpoint) and why. Runs against the tree of a running node (the
//! records before the head it read are immutable) or of a stopped one.

use serde::Serialize;
use tollgate_consensus::storage::StorageError;

use super::record::{GENESIS_PREV, Hash, Record, hash_bytes};
use super::store::{AuditStore, Frame};

/// Records read per storage call.
const VERIFY_CHUNK_RECORDS: usize = 4096;

/// The public keys checkpoints may be signed with, and where each came from.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: Vec<([u8; 32], String)>,
}

impl TrustedKeys {
    /// Trusts `key`, naming its `source` in reports.
    pub fn add(&mut self, key: [u8; 32], source: impl Into<String>) {
        if !self.keys.iter().any(|(k, _)| *k == key) {
            self.keys.push((key, source.into()));
        }
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn source_of(&self, key: &[u8; 32]) -> Option<&str> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s.as_str())
    }
}

/// What is broken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokenPart {
    /// A record.
    Record,
    /// The checkpoint of a record.
    Checkpoint,
}

/// The first problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// The sequence number of the record (or of the record the checkpoint
    /// covers).
    pub seq: u64,
    /// Record or checkpoint.
    pub part: BrokenPart,
    /// Why, in one sentence.
    pub reason: String,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Whether every record and checkpoint verified.
    pub intact: bool,
    /// The node whose log this is, if recorded.
    pub node: Option<u64>,
    /// Records read and found intact (up to the first problem).
    pub n_records: u64,
    /// Checkpoints found valid.
    pub n_checkpoints: u64,
    /// Seq of the last intact record.
    pub last_seq: u64,
    /// Hash of the last intact record, hex.
    pub last_hash: Option<String>,
    /// Seq of the last valid checkpoint.
    pub last_checkpoint_seq: Option<u64>,
    /// Intact records after the last checkpoint (not yet signed).
    pub n_unsigned: u64,
    /// Where the trusted keys came from.
    pub key_sources: Vec<String>,
    /// The first problem, if any.
    pub broken: Option<Broken>,
}

impl VerifyReport {
    /// Whether the log verified.
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }

    /// A few lines for people.
    pub fn render(&self) -> String {
        let who = self.node.map_or_else(
            || "audit log".to_string(),
            |n| format!("audit log of node {n}"),
        );
        let mut out = match &self.broken {
            None => format!("{who}: intact\n"),
            Some(b) => format!(
                "{who}: BROKEN at {} {}: {}\n",
                match b.part {
                    BrokenPart::Record => "record",
                    BrokenPart::Checkpoint => "the checkpoint of record",
                },
                b.seq,
                b.reason
            ),
        };
        let intact = if self.broken.is_some() {
            " intact before it"
        } else {
            ""
        };
        out.push_str(&format!("records: {}{intact}\n", self.n_records));
        match self.last_checkpoint_seq {
            Some(seq) => out.push_str(&format!(
                "checkpoints: {} (last at record {seq}; {} records after it not yet signed)\n",
                self.n_checkpoints, self.n_unsigned
            )),
            None => out.push_str(&format!(
                "checkpoints: 0 ({} records not yet signed)\n",
                self.n_unsigned
            )),
        }
        out.push_str(&format!(
            "last hash: {}\n",
            self.last_hash.as_deref().unwrap_or("-")
        ));
        if self.key_sources.is_empty() {
            out.push_str(
                "keys: none trusted; checkpoint signatures checked against their own key only\n",
            );
        } else {
            out.push_str(&format!("keys: {}\n", self.key_sources.join("; ")));
        }
        out
    }
}

/// Verifies the whole log in `store` against `trusted` keys. With no
/// trusted key, a checkpoint only has to carry a valid signature of its
/// own key (the report says so).
pub fn verify(store: &AuditStore, trusted: &TrustedKeys) -> Result<VerifyReport, StorageError> {
    let head = store.head()?;
    let mut report = VerifyReport {
        intact: false,
        node: store.node()?,
        n_records: 0,
        n_checkpoints: 0,
        last_seq: 0,
        last_hash: None,
        last_checkpoint_seq: None,
        n_unsigned: 0,
        key_sources: trusted
            .keys
            .iter()
            .map(|(k, s)| format!("{s} (ed25519 {})", &hex::encode(k)[..16]))
            .collect(),
        broken: None,
    };
    let checkpoints = store.checkpoints(0, u64::MAX)?;
    let mut checkpoints = checkpoints.into_iter().peekable();
    let mut prev: Hash = GENESIS_PREV;
    let mut next_seq = 1u64;
    let fail = |report: &mut VerifyReport, seq, part, reason: String| {
        report.broken = Some(Broken { seq, part, reason });
    };
    loop {
        let frames = store.scan(next_seq, VERIFY_CHUNK_RECORDS)?;
        if frames.is_empty() {
            break;
        }
        for frame in frames {
            let seq = next_seq;
            let value = match frame {
                Frame::Record { seq: s, value } if s == seq => value,
                Frame::Record { seq: s, .. } if s > seq => {
                    fail(
                        &mut report,
                        seq,
                        BrokenPart::Record,
                        "missing: the log has a gap here (the record was removed)".into(),
                    );
                    return Ok(finish(report));
                }
                Frame::Record { seq: s, .. } => {
                    fail(
                        &mut report,
                        seq,
                        BrokenPart::Record,
                        format!(
                            "its frame names record {s}: the frame was altered or records were moved"
                        ),
                    );
                    return Ok(finish(report));
                }
                Frame::Damaged { .. } => {
                    fail(
                        &mut report,
                        seq,
                        BrokenPart::Record,
                        "its frame is damaged: the bytes that delimit it were altered".into(),
                    );
                    return Ok(finish(report));
                }
            };
            if let Some(reason) = check_record(seq, &value, &prev) {
                fail(&mut report, seq, BrokenPart::Record, reason);
                return Ok(finish(report));
            }
            let hash: Hash = value[..32].try_into().unwrap_or([0; 32]);
            // Checkpoints at or before this record.
            while let Some(cp) = checkpoints.next_if(|c| match c {
                Ok(c) => c.seq <= seq,
                Err(s) => *s <= seq,
            }) {
                let reason = match cp {
                    Err(s) => Some((s, "unreadable: not a checkpoint".to_string())),
                    Ok(c) if c.seq != seq => {
                        Some((c.seq, "covers a record that is not in the log".to_string()))
                    }
                    Ok(c) => check_checkpoint(&c, &hash, report.node, trusted).map(|r| (c.seq, r)),
                };
                if let Some((cp_seq, reason)) = reason {
                    fail(&mut report, cp_seq, BrokenPart::Checkpoint, reason);
                    return Ok(finish(report));
                }
                report.n_checkpoints += 1;
                report.last_checkpoint_seq = Some(seq);
            }
            prev = hash;
            report.n_records += 1;
            report.last_seq = seq;
            report.last_hash = Some(hex::encode(hash));
            next_seq += 1;
        }
    }
    // The head is written in the same atomic batch as the records it ends.
    let head_seq = head.map_or(0, |h| h.seq);
    if report.last_seq < head_seq {
        let reason = format!(
            "missing: the log ends at record {} but its head says {head_seq} (records were removed)",
            report.last_seq
        );
        let seq = report.last_seq + 1;
        fail(&mut report, seq, BrokenPart::Record, reason);
        return Ok(finish(report));
    }
    if let Some(cp) = checkpoints.next() {
        let seq = match cp {
            Ok(c) => c.seq,
            Err(s) => s,
        };
        let reason = format!(
            "covers a record that is not in the log (it ends at record {})",
            report.last_seq
        );
        fail(&mut report, seq, BrokenPart::Checkpoint, reason);
        return Ok(finish(report));
    }
    if report.last_seq > head_seq {
        fail(
            &mut report,
            head_seq + 1,
            BrokenPart::Record,
            "it lies beyond the head the log recorded: records were appended by something else"
                .into(),
        );
    } else if let Some(h) = head
        && h.seq > 0
        && Some(hex::encode(h.hash)) != report.last_hash
    {
        fail(
            &mut report,
            h.seq,
            BrokenPart::Record,
            "its hash differs from the head the log recorded".into(),
        );
    }
    Ok(finish(report))
}

fn finish(mut report: VerifyReport) -> VerifyReport {
    report.n_unsigned = report.last_seq - report.last_checkpoint_seq.unwrap_or(0);
    report.intact = report.broken.is_none();
    report
}

/// The keys to check node `node`'s checkpoints against: the ones the
/// replicated config registered for it when there are any (the authority
/// no one with only this node's disk can change), else this node's own
/// (`local`: its key file, the key the log recorded), named as such.
pub fn trusted_keys_for(
    config: Option<&tollgate_quota::config::Config>,
    node: Option<u64>,
    local: Vec<([u8; 32], String)>,
) -> TrustedKeys {
    let mut trusted = TrustedKeys::default();
    if let (Some(config), Some(node)) = (config, node) {
        for k in config.node_keys(node) {
            let mut key = [0u8; 32];
            if hex::decode_to_slice(&k.public_key, &mut key).is_ok() {
                trusted.add(
                    key,
                    format!(
                        "registered for node {node} in the replicated config at version {}",
                        k.since_version
                    ),
                );
            }
        }
    }
    if trusted.is_empty() {
        for (key, source) in local {
            trusted.add(
                key,
                format!("{source} (not registered in the replicated config)"),
            );
        }
    }
    trusted
}

/// Why the stored value of record `seq` is broken, if it is.
fn check_record(seq: u64, value: &[u8], prev: &Hash) -> Option<String> {
    if value.len() < 32 {
        return Some("truncated: shorter than its hash".into());
    }
    let (stored_hash, bytes) = value.split_at(32);
    if hash_bytes(bytes) != stored_hash {
        return Some(
            "its content does not match its hash: the record was altered after it was written"
                .into(),
        );
    }
    let record = match Record::decode(bytes) {
        Ok(r) => r,
        Err(e) => return Some(format!("unreadable ({e})")),
    };
    if record.encode().ok().as_deref() != Some(bytes) {
        return Some("not in canonical form: the record was rewritten".into());
    }
    if record.seq != seq {
        return Some(format!(
            "it says it is record {}: records were moved",
            record.seq
        ));
    }
    if record.prev != *prev {
        return Some(if seq == 1 {
            "the first record does not start the chain: records before it were removed".into()
        } else {
            format!(
                "it does not link to record {}: that record, or this link, was rewritten",
                seq - 1
            )
        });
    }
    None
}

/// Why checkpoint `c` of a record with hash `hash` is not valid, if it is not.
fn check_checkpoint(
    c: &super::record::Checkpoint,
    hash: &Hash,
    node: Option<u64>,
    trusted: &TrustedKeys,
) -> Option<String> {
    if c.hash != *hash {
        return Some("it signs a different hash than the record has: the record was rewritten after it was signed".into());
    }
    if node.is_some_and(|n| n != c.node) {
        return Some(format!(
            "it was made by node {}, not this log's node",
            c.node
        ));
    }
    if !trusted.is_empty() && trusted.source_of(&c.public_key).is_none() {
        return Some(format!(
            "signed by key {} which is not trusted for this node",
            &hex::encode(c.public_key)[..16]
        ));
    }
    if !c.signature_is_valid() {
        return Some("its signature is invalid".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use tollgate_consensus::storage::{MemStorage, Storage, Tree};

    use super::super::keys::NodeSigner;
    use super::super::record::{Body, Checkpoint, FORMAT_VERSION, Record};
    use super::super::store::{AUDIT_TREE, WriteBatch, frame_spans, segment_key};
    use super::*;

    /// Records per segment in these logs.
    const SEGMENT: u64 = 4;

    /// A log of `n` records on node 1, written `SEGMENT` at a time, with a
    /// checkpoint every `every`.
    fn log(
        n: u64,
        every: u64,
    ) -> anyhow::Result<(MemStorage, AuditStore, NodeSigner, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        let (signer, _) = NodeSigner::load_or_create(&dir.path().join("audit.key"))?;
        let storage = MemStorage::new();
        let store = AuditStore::open(&storage)?;
        store.set_identity(1, &signer.public_key())?;
        let mut batch = WriteBatch::default();
        let mut prev = GENESIS_PREV;
        for seq in 1..=n {
            let r = Record {
                format: FORMAT_VERSION,
                seq,
                prev,
                at_ms: 1_000 + seq as i64,
                node: 1,
                body: Body::Shed { n_records: seq },
            };
            let bytes = r.encode()?;
            let hash = hash_bytes(&bytes);
            batch.records.push((seq, hash, bytes));
            if seq % every == 0 {
                batch
                    .checkpoints
                    .push(Checkpoint::sign(&signer, 1, seq, hash, 5_000));
            }
            prev = hash;
            if seq % SEGMENT == 0 || seq == n {
                store.write(&std::mem::take(&mut batch))?;
            }
        }
        Ok((storage, store, signer, dir))
    }

    fn trusted(signer: &NodeSigner) -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add(signer.public_key(), "test key");
        t
    }

    type Found = Option<(u64, BrokenPart, String)>;

    fn broken(store: &AuditStore, keys: &TrustedKeys) -> anyhow::Result<Found> {
        let r = verify(store, keys)?;
        assert_eq!(r.intact, r.broken.is_none());
        Ok(r.broken.map(|b| (b.seq, b.part, b.reason)))
    }

    fn tree(storage: &MemStorage) -> anyhow::Result<std::sync::Arc<dyn Tree>> {
        Ok(storage.tree(AUDIT_TREE)?)
    }

    /// The segment holding records `last - SEGMENT + 1 ..= last`.
    fn segment(t: &dyn Tree, last: u64) -> anyhow::Result<Vec<u8>> {
        t.get(&segment_key(last))?
            .ok_or_else(|| anyhow::anyhow!("no segment {last}"))
    }

    #[test]
    fn an_intact_log_verifies_with_its_summary() -> anyhow::Result<()> {
        let (_storage, store, signer, _dir) = log(25, 10)?;
        let r = verify(&store, &trusted(&signer))?;
        assert!(r.intact, "{}", r.render());
        assert_eq!((r.n_records, r.n_checkpoints, r.last_seq), (25, 2, 25));
        assert_eq!((r.last_checkpoint_seq, r.n_unsigned), (Some(20), 5));
        assert!(r.render().contains("intact"));
        // An empty log is intact too.
        let empty = AuditStore::open(&MemStorage::new())?;
        assert!(verify(&empty, &TrustedKeys::default())?.intact);
        Ok(())
    }

    #[test]
    fn every_single_byte_flip_names_the_record_it_belongs_to() -> anyhow::Result<()> {
        let (storage, store, signer, _dir) = log(12, 5)?;
        let keys = trusted(&signer);
        let t = tree(&storage)?;
        let original = segment(t.as_ref(), 8)?;
        let spans = frame_spans(&original);
        assert_eq!(spans.len(), 4);
        for idx in 0..original.len() {
            let owner = spans
                .iter()
                .find(|(_, span)| span.contains(&idx))
                .and_then(|(seq, _)| *seq)
                .ok_or_else(|| anyhow::anyhow!("byte {idx} in no frame"))?;
            let mut bad = original.clone();
            bad[idx] ^= 0x01;
            t.insert(&segment_key(8), &bad)?;
            let got = broken(&store, &keys)?;
            assert_eq!(
                got.as_ref().map(|g| (g.0, &g.1)),
                Some((owner, &BrokenPart::Record)),
                "byte {idx}: {got:?}"
            );
        }
        t.insert(&segment_key(8), &original)?;
        assert_eq!(broken(&store, &keys)?, None);
        Ok(())
    }

    #[test]
    fn removed_moved_and_rewritten_records_are_named() -> anyhow::Result<()> {
        let (storage, store, signer, _dir) = log(12, 100)?;
        let keys = trusted(&signer);
        let t = tree(&storage)?;
        let middle = segment(t.as_ref(), 8)?;
        let spans = frame_spans(&middle);
        let frame = |i: usize| middle[spans[i].1.clone()].to_vec();

        // A whole segment removed.
        t.remove(&segment_key(8))?;
        let got = broken(&store, &keys)?;
        assert!(
            matches!(&got, Some((5, BrokenPart::Record, why)) if why.contains("missing")),
            "{got:?}"
        );

        // One record cut out of its segment.
        let without_6 = [frame(0), frame(2), frame(3)].concat();
        t.insert(&segment_key(8), &without_6)?;
        let got = broken(&store, &keys)?;
        assert!(
            matches!(&got, Some((6, BrokenPart::Record, why)) if why.contains("missing")),
            "{got:?}"
        );

        // Record 5 copied over record 6.
        let moved = [frame(0), frame(0), frame(2), frame(3)].concat();
        t.insert(&segment_key(8), &moved)?;
        let got = broken(&store, &keys)?;
        assert!(
            matches!(&got, Some((6, BrokenPart::Record, why)) if why.contains("names record 5")),
            "{got:?}"
        );

        // Record 6 rewritten with its hash recomputed: record 7's link
        // breaks.
        let old = frame(1);
        let mut rec = Record::decode(&old[12 + 32..])?;
        rec.at_ms += 1;
        let bytes = rec.encode()?;
        let mut rewritten = old[..12].to_vec();
        rewritten.extend_from_slice(&hash_bytes(&bytes));
        rewritten.extend_from_slice(&bytes);
        let forged = [frame(0), rewritten, frame(2), frame(3)].concat();
        t.insert(&segment_key(8), &forged)?;
        let got = broken(&store, &keys)?;
        assert!(
            matches!(&got, Some((7, BrokenPart::Record, why)) if why.contains("link to record 6")),
            "{got:?}"
        );
        t.insert(&segment_key(8), &middle)?;
        assert_eq!(broken(&store, &keys)?, None);

        // The tail cut off: the head names where the log should end.
        t.remove(&segment_key(12))?;
        let got = broken(&store, &keys)?;
        assert!(
            matches!(&got, Some((9, BrokenPart::Record, why)) if why.contains("head says 12")),
            "{got:?}"
        );
        Ok(())
    }

    #[test]
    fn checkpoints_must_match_and_be_signed_by_a_trusted_key() -> anyhow::Result<()> {
        let (storage, store, signer, dir) = log(12, 5)?;
        let t = tree(&storage)?;
        let mut cp_key = segment_key(10);
        cp_key[0] = b'c';
        let cp = t.get(&cp_key)?.unwrap_or_default();

        // Another key, even with a valid signature of its own.
        let (other, _) = NodeSigner::load_or_create(&dir.path().join("other.key"))?;
        let got = broken(&store, &trusted(&other))?;
        assert!(
            matches!(&got, Some((5, BrokenPart::Checkpoint, why)) if why.contains("not trusted")),
            "{got:?}"
        );
        // No trusted key: self-consistency only.
        assert_eq!(broken(&store, &TrustedKeys::default())?, None);

        let mut bad = cp.clone();
        bad[120] ^= 1; // In the signature.
        t.insert(&cp_key, &bad)?;
        let got = broken(&store, &trusted(&signer))?;
        assert!(
            matches!(&got, Some((10, BrokenPart::Checkpoint, why)) if why.contains("signature")),
            "{got:?}"
        );

        // A checkpoint beyond the end of the log.
        t.insert(&cp_key, &cp)?;
        let mut far = segment_key(99);
        far[0] = b'c';
        let beyond = Checkpoint::sign(&signer, 1, 99, [0; 32], 1).encode();
        t.insert(&far, &beyond)?;
        let got = broken(&store, &trusted(&signer))?;
        assert!(
            matches!(&got, Some((99, BrokenPart::Checkpoint, _))),
            "{got:?}"
        );
        Ok(())
    }
}
