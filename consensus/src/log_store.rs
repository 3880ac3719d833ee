//! The Raft log and vote, stored in two [`Tree`]s: `raft_log` (key =
//! big-endian index, value = JSON entry) and `raft_meta` (vote, last purged
//! log id, committed log id).
//!
//! This module owns durability of the log: an append is acknowledged to
//! openraft (`LogFlushed::log_io_completed`) only after the tree was flushed
//! to disk, and a vote is flushed before `save_vote` returns. It must not
//! interpret entries; applying them is the state machine's job.

// openraft's trait fixes the error type (`StorageError`, ~224 bytes); the
// private helpers return it too so `?` works without conversions. Errors
// here are rare (disk failure), so the size costs nothing on a hot path.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError};

use crate::codec;
use crate::storage::{BatchOp, Storage, StorageError, Tree};
use crate::types::{Entry, LogId, RaftStorageError, TypeConfig, Vote};

/// Name of the tree holding log entries.
pub const LOG_TREE: &str = "raft_log";
/// Name of the tree holding the vote and log bookkeeping.
pub const META_TREE: &str = "raft_meta";

const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";

/// openraft's log storage over a [`Storage`] engine. Cheap to clone; clones
/// share the same trees (the clone is also the log reader).
#[derive(Clone)]
pub struct LogStore {
    log: Arc<dyn Tree>,
    meta: Arc<dyn Tree>,
    // Held so the owner can tell when every clone living inside Raft tasks
    // has been dropped (and with it every engine handle).
    _alive: Arc<()>,
}

impl LogStore {
    /// Opens the log trees in `storage`. `alive` is a liveness token whose
    /// strong count tells the owner whether any clone still exists.
    pub(crate) fn open(storage: &dyn Storage, alive: Arc<()>) -> Result<Self, StorageError> {
        Ok(Self {
            log: storage.tree(LOG_TREE)?,
            meta: storage.tree(META_TREE)?,
            _alive: alive,
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, RaftStorageError> {
        let Some(bytes) = self.meta.get(key).map_err(read_err)? else {
            return Ok(None);
        };
        codec::decode(what, &bytes).map(Some).map_err(read_err)
    }

    fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, RaftStorageError> {
        let index = codec::log_index(key).map_err(read_err)?;
        let entry: Entry = codec::decode("log entry", value).map_err(read_err)?;
        // A key/value mismatch means the tree was damaged or written by
        // something else; replaying it would corrupt the state machine.
        if entry.log_id.index != index {
            return Err(StorageIOError::read_log_at_index(
                index,
                openraft::AnyError::error(format!(
                    "entry under key {index} has index {}",
                    entry.log_id.index
                )),
            )
            .into());
        }
        Ok(entry)
    }

    fn flush(&self, tree: &dyn Tree) -> Result<(), RaftStorageError> {
        tree.flush().map_err(write_err)
    }

    /// Every entry after index `after` up to the persisted commit index, in
    /// order: what a restart re-applies. Empty when no commit index was
    /// saved.
    pub(crate) fn committed_entries_after(
        &self,
        after: Option<u64>,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let Some(committed) = self.read_meta::<LogId>(KEY_COMMITTED, "committed log id")? else {
            return Ok(Vec::new());
        };
        let start = match after {
            Some(index) => Bound::Excluded(index.to_be_bytes()),
            None => Bound::Unbounded,
        };
        let end = Bound::Included(committed.index.to_be_bytes());
        let pairs = self
            .log
            .range(as_slice(&start), as_slice(&end))
            .map_err(read_err)?;
        pairs
            .iter()
            .map(|(k, v)| Self::decode_entry(k, v))
            .collect()
    }
}

fn read_err<E: std::error::Error + 'static>(e: E) -> RaftStorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err<E: std::error::Error + 'static>(e: E) -> RaftStorageError {
    StorageIOError::write_logs(&e).into()
}

fn bound_key(bound: Bound<&u64>) -> Bound<[u8; 8]> {
    match bound {
        Bound::Included(i) => Bound::Included(codec::log_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(codec::log_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn as_slice(bound: &Bound<[u8; 8]>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let start = bound_key(range.start_bound());
        let end = bound_key(range.end_bound());
        let pairs = self
            .log
            .range(as_slice(&start), as_slice(&end))
            .map_err(read_err)?;
        pairs
            .iter()
            .map(|(k, v)| Self::decode_entry(k, v))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged: Option<LogId> = self.read_meta(KEY_LAST_PURGED, "last purged log id")?;
        let last = match self.log.last().map_err(read_err)? {
            Some((k, v)) => Some(Self::decode_entry(&k, &v)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            // An empty log after a purge still ends where the purge ended.
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), RaftStorageError> {
        let bytes = codec::encode("vote", vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.meta
            .insert(KEY_VOTE, &bytes)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        // A vote must survive a crash, or this node could vote twice in a term.
        self.meta
            .flush()
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, RaftStorageError> {
        let Some(bytes) = self
            .meta
            .get(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(&e))?
        else {
            return Ok(None);
        };
        let vote = codec::decode("vote", &bytes).map_err(|e| StorageIOError::read_vote(&e))?;
        Ok(Some(vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        // Not flushed on purpose: losing it only means a restarted node
        // re-learns the commit index from the leader (or its own election)
        // before re-applying, which is safe.
        let key_op = match committed {
            Some(log_id) => BatchOp::Insert {
                key: KEY_COMMITTED.to_vec(),
                value: codec::encode("committed log id", &log_id).map_err(write_err)?,
            },
            None => BatchOp::Remove {
                key: KEY_COMMITTED.to_vec(),
            },
        };
        self.meta.apply_batch(vec![key_op]).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        self.read_meta(KEY_COMMITTED, "committed log id")
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let ops = entries
            .into_iter()
            .map(|entry| {
                let value = codec::encode("log entry", &entry)
                    .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
                Ok(BatchOp::Insert {
                    key: codec::log_key(entry.log_id.index).to_vec(),
                    value,
                })
            })
            .collect::<Result<Vec<_>, RaftStorageError>>()?;
        let written = self.log.apply_batch(ops).and_then(|()| self.log.flush());
        // The flush above runs inline on purpose: it is the durability point
        // openraft waits for anyway, and keeping it on the calling task keeps
        // the in-memory engine deterministic under the simulator.
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        let from = codec::log_key(log_id.index);
        let keys = self
            .log
            .range(Bound::Included(from.as_slice()), Bound::Unbounded)
            .map_err(read_err)?;
        let ops = keys
            .into_iter()
            .map(|(key, _)| BatchOp::Remove { key })
            .collect();
        self.log.apply_batch(ops).map_err(write_err)?;
        self.flush(self.log.as_ref())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        // Record the purge point first and durably: if we crash between the
        // two steps, get_log_state still reports a consistent purge boundary
        // and the leftover entries are simply purged again later.
        let bytes = codec::encode("last purged log id", &log_id).map_err(write_err)?;
        self.meta
            .insert(KEY_LAST_PURGED, &bytes)
            .map_err(write_err)?;
        self.flush(self.meta.as_ref())?;

        let upto = codec::log_key(log_id.index);
        let keys = self
            .log
            .range(Bound::Unbounded, Bound::Included(upto.as_slice()))
            .map_err(read_err)?;
        let ops = keys
            .into_iter()
            .map(|(key, _)| BatchOp::Remove { key })
            .collect();
        self.log.apply_batch(ops).map_err(write_err)?;
        self.flush(self.log.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::storage::MemStorage;

    fn store(storage: &MemStorage) -> LogStore {
        LogStore::open(storage, Arc::new(())).expect("open log store")
    }

    fn blank(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn corrupt_entry_is_an_error_not_a_panic() {
        let storage = MemStorage::new();
        let mut log = store(&storage);
        let tree = storage.tree(LOG_TREE).expect("tree");
        tree.insert(&codec::log_key(1), b"not json")
            .expect("insert");
        assert!(log.get_log_state().await.is_err());
        assert!(log.try_get_log_entries(0..10).await.is_err());
    }

    #[tokio::test]
    async fn entry_under_wrong_key_is_an_error() {
        let storage = MemStorage::new();
        let mut log = store(&storage);
        let tree = storage.tree(LOG_TREE).expect("tree");
        let bytes = codec::encode("log entry", &blank(7)).expect("encode");
        tree.insert(&codec::log_key(3), &bytes).expect("insert");
        assert!(log.try_get_log_entries(..).await.is_err());
        tree.insert(b"short", &bytes).expect("insert");
        assert!(log.get_log_state().await.is_err());
    }

    #[tokio::test]
    async fn corrupt_vote_is_an_error() {
        let storage = MemStorage::new();
        let mut log = store(&storage);
        let meta = storage.tree(META_TREE).expect("tree");
        meta.insert(KEY_VOTE, b"\xff").expect("insert");
        assert!(log.read_vote().await.is_err());
        log.save_vote(&Vote::new(2, 1)).await.expect("save vote");
        assert_eq!(log.read_vote().await.expect("read"), Some(Vote::new(2, 1)));
    }
}
