//! Where the audit log lives: one tree (`audit`) of the node's storage
//! engine, so sled in production and the in-memory engine under the
//! simulator, with the same durability contract as usage.
//!
//! Records are stored in segments, one per write, because a storage insert
//! costs far more than a record: at 10,000 decisions a second, one insert
//! per record would cost more than the decisions themselves.
//!
//! Layout, one tree so that a segment, its checkpoints and the head move
//! together in one atomic write:
//!
//! - `r` + the seq of its last record (8 bytes, big-endian): a segment, the
//!   frames of consecutive records, each `seq` (8 bytes, big-endian), `len`
//!   (4 bytes, big-endian), the record's 32-byte hash, then its `len`
//!   canonical bytes (see `record`);
//! - `c` + seq: the checkpoint of record `seq`;
//! - `m` + name: bookkeeping: `head` (seq and hash of the last record),
//!   `config` (the last Raft index recorded), `node`, `key` (the public key
//!   of the current signing key).
//!
//! Each frame names its own seq, and each record its own hash, so a damaged
//! byte anywhere in a segment is traced to the record it belongs to. This
//! module reads and writes bytes; it must not decide what goes in.

use std::ops::{Bound, Range};
use std::sync::Arc;

use tollgate_consensus::storage::{BatchOp, Storage, StorageError, Tree};

use crate::persist::Flushes;

use super::record::{CHECKPOINT_BYTES, Checkpoint, Hash, Record};

/// Name of the tree.
pub const AUDIT_TREE: &str = "audit";

const SEGMENT_PREFIX: u8 = b'r';
const CHECKPOINT_PREFIX: u8 = b'c';
const META_HEAD: &[u8] = b"mhead";
const META_CONFIG_INDEX: &[u8] = b"mconfig";
const META_NODE: &[u8] = b"mnode";
const META_KEY: &[u8] = b"mkey";

/// Bytes of a frame before the record's hash: seq and length.
const FRAME_HEADER_BYTES: usize = 8 + 4;
/// Segments read per storage call.
const SCAN_SEGMENTS: usize = 16;
/// Most records in one segment, so that reading a few segments stays small.
pub const MAX_SEGMENT_RECORDS: usize = 4096;

/// The last record written: its seq and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Its sequence number (0: the log is empty).
    pub seq: u64,
    /// Its hash ([`super::record::GENESIS_PREV`] when empty).
    pub hash: Hash,
}

/// One frame of a segment as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A record: the seq its frame names, and the stored value (the
    /// record's hash followed by its bytes; shorter if the frame was
    /// damaged).
    Record {
        /// The seq in the frame.
        seq: u64,
        /// Hash then canonical bytes.
        value: Vec<u8>,
    },
    /// The rest of the segment does not parse as frames (a damaged header).
    Damaged {
        /// The key (last seq) of the segment.
        segment_last_seq: u64,
    },
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

/// The key of the segment whose last record is `seq`.
pub fn segment_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = SEGMENT_PREFIX;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn checkpoint_key(seq: u64) -> [u8; 9] {
    let mut k = segment_key(seq);
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

/// Encodes records as one segment.
fn encode_segment(records: &[(u64, Hash, Vec<u8>)]) -> Vec<u8> {
    let size = records
        .iter()
        .map(|(_, _, b)| FRAME_HEADER_BYTES + 32 + b.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    for (seq, hash, bytes) in records {
        out.extend_from_slice(&seq.to_be_bytes());
        // A record is far below 4 GiB (its fields are bounded).
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(hash);
        out.extend_from_slice(bytes);
    }
    out
}

/// The frames of a segment: each record's seq and the byte range of its
/// whole frame, header included; a header that does not fit ends the list
/// with the range of what is left and no seq.
pub fn frame_spans(segment: &[u8]) -> Vec<(Option<u64>, Range<usize>)> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < segment.len() {
        let header = segment.get(at..at + FRAME_HEADER_BYTES);
        let Some(header) = header else {
            spans.push((None, at..segment.len()));
            break;
        };
        let seq = u64_value(&header[..8]);
        let len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let end = at + FRAME_HEADER_BYTES + 32 + len;
        if end > segment.len() {
            spans.push((None, at..segment.len()));
            break;
        }
        spans.push((seq, at..end));
        at = end;
    }
    spans
}

/// The frames of the segment `last_seq`.
fn decode_segment(last_seq: u64, segment: &[u8]) -> Vec<Frame> {
    frame_spans(segment)
        .into_iter()
        .map(|(seq, span)| match seq {
            Some(seq) => Frame::Record {
                seq,
                value: segment[span.start + FRAME_HEADER_BYTES..span.end].to_vec(),
            },
            None => Frame::Damaged {
                segment_last_seq: last_seq,
            },
        })
        .collect()
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

    /// Writes `batch` atomically (its records as segments of at most
    /// [`MAX_SEGMENT_RECORDS`], its checkpoints and the new head together). Not durable until
    /// [`AuditStore::flush`].
    pub fn write(&self, batch: &WriteBatch) -> Result<(), StorageError> {
        let mut ops = Vec::with_capacity(batch.checkpoints.len() + 3);
        for segment in batch.records.chunks(MAX_SEGMENT_RECORDS) {
            if let Some((last_seq, _, _)) = segment.last() {
                ops.push(BatchOp::Insert {
                    key: segment_key(*last_seq).to_vec(),
                    value: encode_segment(segment),
                });
            }
        }
        if let Some((last_seq, last_hash, _)) = batch.records.last() {
            let mut head = Vec::with_capacity(40);
            head.extend_from_slice(&last_seq.to_be_bytes());
            head.extend_from_slice(last_hash);
            ops.push(BatchOp::Insert {
                key: META_HEAD.to_vec(),
                value: head,
            });
        }
        for cp in &batch.checkpoints {
            ops.push(BatchOp::Insert {
                key: checkpoint_key(cp.seq).to_vec(),
                value: cp.encode(),
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

    /// Makes every write so far durable (fsync on sled), counted in
    /// `flushes`.
    pub fn flush(&self, flushes: &Flushes) -> Result<(), StorageError> {
        flushes.flush(self.tree.as_ref())
    }

    /// Frames in log order from the segment holding `from_seq` on, up to
    /// about `max` records (whole segments are read): records before
    /// `from_seq` are left out; a damaged frame is returned as is.
    pub fn scan(&self, from_seq: u64, max: usize) -> Result<Vec<Frame>, StorageError> {
        let end = [SEGMENT_PREFIX + 1];
        let mut from: Bound<Vec<u8>> = Bound::Included(segment_key(from_seq).to_vec());
        let mut out = Vec::new();
        loop {
            let segments = self.tree.range_limit(
                from.as_ref().map(Vec::as_slice),
                Bound::Excluded(&end[..]),
                SCAN_SEGMENTS,
            )?;
            let Some((last_key, _)) = segments.last() else {
                break;
            };
            from = Bound::Excluded(last_key.clone());
            for (key, value) in &segments {
                let Some(last_seq) = seq_of(key) else {
                    continue;
                };
                for frame in decode_segment(last_seq, value) {
                    match &frame {
                        Frame::Record { seq, .. } if *seq < from_seq => {}
                        _ => out.push(frame),
                    }
                }
            }
            if out.len() >= max || segments.len() < SCAN_SEGMENTS {
                break;
            }
        }
        Ok(out)
    }

    /// The stored value (hash then bytes) of record `seq`, if present.
    pub fn record(&self, seq: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let end = [SEGMENT_PREFIX + 1];
        let start = segment_key(seq);
        let segments =
            self.tree
                .range_limit(Bound::Included(&start[..]), Bound::Excluded(&end[..]), 1)?;
        Ok(segments.into_iter().find_map(|(key, value)| {
            decode_segment(seq_of(&key)?, &value)
                .into_iter()
                .find_map(|f| match f {
                    Frame::Record { seq: s, value } if s == seq => Some(value),
                    _ => None,
                })
        }))
    }

    /// The last segment's key seq (0 when there is none): where the
    /// records end, whatever the head says.
    pub fn last_segment_seq(&self) -> Result<u64, StorageError> {
        // Segments are the only keys between `r` and `s`; the storage has
        // no reverse scan, so start from the head and read what follows.
        let end = [SEGMENT_PREFIX + 1];
        let mut from = segment_key(self.head()?.map_or(0, |h| h.seq)).to_vec();
        let mut last = 0;
        loop {
            let segments = self.tree.range_limit(
                Bound::Included(&from[..]),
                Bound::Excluded(&end[..]),
                SCAN_SEGMENTS,
            )?;
            let Some((key, _)) = segments.last() else {
                return Ok(last);
            };
            last = seq_of(key).unwrap_or(last);
            if segments.len() < SCAN_SEGMENTS {
                return Ok(last);
            }
            from = segment_key(last.saturating_add(1)).to_vec();
        }
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

#[cfg(test)]
mod tests {
    use tollgate_consensus::storage::MemStorage;

    use super::*;

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> WriteBatch {
        WriteBatch {
            records: seqs
                .map(|s| (s, [s as u8; 32], vec![s as u8; s as usize % 5 + 1]))
                .collect(),
            ..WriteBatch::default()
        }
    }

    #[test]
    fn segments_read_back_by_seq_across_writes() -> anyhow::Result<()> {
        let store = AuditStore::open(&MemStorage::new())?;
        for range in [1..=3, 4..=4, 5..=200] {
            store.write(&batch(range))?;
        }
        assert_eq!(store.head()?.map(|h| h.seq), Some(200));
        assert_eq!(store.last_segment_seq()?, 200);
        let frames = store.scan(2, 10_000)?;
        let seqs: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Record { seq, .. } => Some(*seq),
                Frame::Damaged { .. } => None,
            })
            .collect();
        assert_eq!(seqs, (2..=200).collect::<Vec<_>>());
        // A bounded scan reads whole segments, at least `max` records.
        assert!(store.scan(5, 3)?.len() >= 3);
        let mut value = vec![7u8; 32];
        value.extend(vec![7u8; 7 % 5 + 1]);
        assert_eq!(store.record(7)?, Some(value));
        assert_eq!(store.record(201)?, None);
        Ok(())
    }

    #[test]
    fn frame_spans_cover_the_segment_and_stop_at_a_damaged_header() {
        let segment = encode_segment(&batch(1..=3).records);
        let spans = frame_spans(&segment);
        assert_eq!(spans.len(), 3);
        assert_eq!(spans[2].1.end, segment.len());
        let mut damaged = segment.clone();
        damaged[spans[1].1.start + 8] = 0xff; // A length far past the end.
        let spans = frame_spans(&damaged);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[1].0, None);
    }
}
