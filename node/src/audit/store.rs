//! Where the audit log lives: one tree (`audit`) of the node's storage
//! engine, so sled in production and the in-memory engine under the
//! simulator, with the same durability contract as usage.
//!
//! Layout, one tree so that a record batch, its checkpoint and the head
//! move together in one atomic write:
//!
//! - `r` + seq (8 bytes, big-endian): a record, stored as its 32-byte hash
//!   followed by its canonical bytes (see `record`);
//! - `c` + seq: the checkpoint of record `seq`;
//! - `m` + name: bookkeeping: `head` (seq and hash of the last record),
//!   `config` (the last Raft index recorded), `node`, `key` (the public key
//!   of the current signing key).
//!
//! This module reads and writes bytes; it must not decide what goes in.

use std::ops::Bound;
use std::sync::Arc;

use tollgate_consensus::storage::{BatchOp, Storage, StorageError, Tree};

use super::record::{CHECKPOINT_BYTES, Checkpoint, Hash, Record};

/// Name of the tree.
pub const AUDIT_TREE: &str = "audit";

const RECORD_PREFIX: u8 = b'r';
const CHECKPOINT_PREFIX: u8 = b'c';
const META_HEAD: &[u8] = b"mhead";
const META_CONFIG_INDEX: &[u8] = b"mconfig";
const META_NODE: &[u8] = b"mnode";
const META_KEY: &[u8] = b"mkey";

/// The last record written: its seq and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Its sequence number (0: the log is empty).
    pub seq: u64,
    /// Its hash ([`super::record::GENESIS_PREV`] when empty).
    pub hash: Hash,
}

/// One record as stored.
#[derive(Clone, Debug)]
pub struct StoredRecord {
    /// The seq in its key.
    pub seq: u64,
    /// The whole stored value: hash then canonical bytes.
    pub value: Vec<u8>,
}

/// What one write adds.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Records: (seq, hash, canonical bytes), consecutive.
    pub records: Vec<(u64, Hash, Vec<u8>)>,
    /// Checkpoints to store.
    pub checkpoints: Vec<Checkpoint>,
    /// The highest Raft index recorded so far, if it moved.
    pub config_index: Option<u64>,
    /// How many of `records` are queued decisions (for the backlog count).
    pub n_events: u64,
}

/// The audit tree of one node.
#[derive(Clone)]
pub struct AuditStore {
    tree: Arc<dyn Tree>,
}

/// The key of record `seq`.
pub fn record_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = RECORD_PREFIX;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn checkpoint_key(seq: u64) -> [u8; 9] {
    let mut k = record_key(seq);
    k[0] = CHECKPOINT_PREFIX;
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    (key.len() == 9).then(|| u64::from_be_bytes(bytes))
}

fn u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl AuditStore {
    /// Opens the audit tree of `storage`.
    pub fn open(storage: &dyn Storage) -> Result<Self, StorageError> {
        Ok(Self {
            tree: storage.tree(AUDIT_TREE)?,
        })
    }

    /// The head as bookkept, if the log was ever written.
    pub fn head(&self) -> Result<Option<Head>, StorageError> {
        Ok(self.tree.get(META_HEAD)?.and_then(|v| {
            let seq = u64_value(v.get(..8)?)?;
            let hash: Hash = v.get(8..40)?.try_into().ok()?;
            Some(Head { seq, hash })
        }))
    }

    /// The highest Raft index recorded (`None`: none yet; the first
    /// membership entry has index 0).
    pub fn config_index(&self) -> Result<Option<u64>, StorageError> {
        Ok(self
            .tree
            .get(META_CONFIG_INDEX)?
            .and_then(|v| u64_value(&v)))
    }

    /// The node id the log belongs to, once set.
    pub fn node(&self) -> Result<Option<u64>, StorageError> {
        Ok(self.tree.get(META_NODE)?.and_then(|v| u64_value(&v)))
    }

    /// The public key of the signing key last used.
    pub fn public_key(&self) -> Result<Option<[u8; 32]>, StorageError> {
        Ok(self
            .tree
            .get(META_KEY)?
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()))
    }

    /// Records the node id and signing key (at writer start).
    pub fn set_identity(&self, node: u64, public_key: &[u8; 32]) -> Result<(), StorageError> {
        self.tree.apply_batch(vec![
            BatchOp::Insert {
                key: META_NODE.to_vec(),
                value: node.to_be_bytes().to_vec(),
            },
            BatchOp::Insert {
                key: META_KEY.to_vec(),
                value: public_key.to_vec(),
            },
        ])
    }

    /// Writes `batch` atomically (records, checkpoints and the new head
    /// together). Not durable until [`AuditStore::flush`].
    pub fn write(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let mut ops = Vec::with_capacity(batch.records.len() + batch.checkpoints.len() + 2);
        for (seq, hash, bytes) in &batch.records {
            let mut value = Vec::with_capacity(32 + bytes.len());
            value.extend_from_slice(hash);
            value.extend_from_slice(bytes);
            ops.push(BatchOp::Insert {
                key: record_key(*seq).to_vec(),
                value,
            });
        }
        for cp in &batch.checkpoints {
            ops.push(BatchOp::Insert {
                key: checkpoint_key(cp.seq).to_vec(),
                value: cp.encode(),
            });
        }
        if let Some((seq, hash, _)) = batch.records.last() {
            let mut head = Vec::with_capacity(40);
            head.extend_from_slice(&seq.to_be_bytes());
            head.extend_from_slice(hash);
            ops.push(BatchOp::Insert {
                key: META_HEAD.to_vec(),
                value: head,
            });
        }
        if let Some(index) = batch.config_index {
            ops.push(BatchOp::Insert {
                key: META_CONFIG_INDEX.to_vec(),
                value: index.to_be_bytes().to_vec(),
            });
        }
        self.tree.apply_batch(ops)
    }

    /// Makes every write so far durable (fsync on sled).
    pub fn flush(&self) -> Result<(), StorageError> {
        self.tree.flush()
    }

    /// Up to `max` stored records from `from_seq` on, in order. A key that
    /// is not a record key is skipped (the verifier finds the gap).
    pub fn records(&self, from_seq: u64, max: usize) -> Result<Vec<StoredRecord>, StorageError> {
        let start = record_key(from_seq);
        let end = record_key(from_seq.saturating_add(max as u64));
        let pairs = if from_seq.checked_add(max as u64).is_some() {
            self.tree
                .range(Bound::Included(&start[..]), Bound::Excluded(&end[..]))?
        } else {
            self.tree.range(
                Bound::Included(&start[..]),
                Bound::Excluded(&[RECORD_PREFIX + 1][..]),
            )?
        };
        Ok(pairs
            .into_iter()
            .filter_map(|(k, value)| {
                Some(StoredRecord {
                    seq: seq_of(&k)?,
                    value,
                })
            })
            .collect())
    }

    /// The stored value of record `seq`.
    pub fn record(&self, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        self.tree.get(&record_key(seq))
    }

    /// The seq of the last record key present (0 when none).
    pub fn last_record_seq(&self) -> Result<u64, StorageError> {
        let end = [RECORD_PREFIX + 1];
        // Records are the only keys between `r` and `s`; a reverse scan is
        // not in the storage contract, so look at the last key overall and,
        // if it is not a record, search.
        let pairs = self.tree.range(
            Bound::Included(&record_key(self.head()?.map_or(0, |h| h.seq))[..]),
            Bound::Excluded(&end[..]),
        )?;
        Ok(pairs.last().and_then(|(k, _)| seq_of(k)).unwrap_or(0))
    }

    /// Every checkpoint with seq in `[from_seq, to_seq]`, in order; entries
    /// that do not parse are returned as `Err(seq)`.
    pub fn checkpoints(
        &self,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<Result<Checkpoint, u64>>, StorageError> {
        let start = checkpoint_key(from_seq);
        let end = checkpoint_key(to_seq);
        Ok(self
            .tree
            .range(Bound::Included(&start[..]), Bound::Included(&end[..]))?
            .into_iter()
            .filter_map(|(k, v)| {
                let seq = seq_of(&k)?;
                Some(match Checkpoint::decode(&v) {
                    Some(cp) if v.len() == CHECKPOINT_BYTES => Ok(cp),
                    _ => Err(seq),
                })
            })
            .collect())
    }

    /// The last checkpoint, if any.
    pub fn last_checkpoint(&self) -> Result<Option<Checkpoint>, StorageError> {
        let start = [CHECKPOINT_PREFIX];
        let end = [CHECKPOINT_PREFIX + 1];
        // Checkpoints are few (one per many records); scanning their keys
        // is cheap next to the records.
        let pairs = self
            .tree
            .range(Bound::Included(&start[..]), Bound::Excluded(&end[..]))?;
        Ok(pairs.last().and_then(|(_, v)| Checkpoint::decode(v)))
    }

    /// Decodes record `seq`'s time, if it is readable.
    fn at_ms(&self, seq: u64) -> Result<Option<i64>, StorageError> {
        Ok(self
            .record(seq)?
            .and_then(|v| Record::decode(v.get(32..)?).ok())
            .map(|r| r.at_ms))
    }

    /// The first seq whose record may be at or after `since_ms`: a binary
    /// search over record times (which follow the order decisions were
    /// queued in, so they are nearly sorted), moved back by `slack_ms` of
    /// records so that a record queued slightly out of time order is not
    /// skipped. Callers filter by time from there.
    pub fn first_seq_near(&self, since_ms: i64, slack_ms: i64) -> Result<u64, StorageError> {
        let Some(head) = self.head()? else {
            return Ok(1);
        };
        let target = since_ms.saturating_sub(slack_ms);
        let (mut lo, mut hi) = (1u64, head.seq + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.at_ms(mid)? {
                Some(t) if t < target => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }
}
