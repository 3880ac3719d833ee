//! A small key-value storage abstraction: named trees of bytes, atomic
//! batches and an explicit durability point (`flush`).
//!
//! This module owns the engine boundary: sled in production ([`SledStorage`])
//! and a BTreeMap engine for tests and the deterministic simulator
//! ([`MemStorage`]), because sled runs its own threads and cannot be made
//! deterministic under turmoil. It must not know what the bytes mean: the
//! Raft log, vote, snapshots and the node's usage counters all encode their
//! own values on top of it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

/// One key/value pair as returned by scans.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// Failure of the storage engine itself (I/O, corruption detected by the
/// engine, a closed database). Decoding of values is the caller's concern.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// sled reported an error while performing `op`.
    #[error("sled {op} failed: {source}")]
    Sled {
        /// The operation that failed, e.g. `"insert"` or `"flush"`.
        op: &'static str,
        /// The engine's error.
        #[source]
        source: sled::Error,
    },
}

impl StorageError {
    fn sled(op: &'static str) -> impl FnOnce(sled::Error) -> Self {
        move |source| Self::Sled { op, source }
    }
}

/// One write inside an atomic [`Tree::apply_batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOp {
    /// Set `key` to `value`.
    Insert {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Delete `key` (a missing key is not an error).
    Remove {
        /// The key.
        key: Vec<u8>,
    },
}

/// A storage engine: a set of named, independent, ordered trees.
pub trait Storage: Send + Sync + 'static {
    /// Opens (creating if needed) the tree called `name`. Opening the same
    /// name twice yields handles onto the same data.
    fn tree(&self, name: &str) -> Result<Arc<dyn Tree>, StorageError>;
}

/// An ordered map from byte keys to byte values. Keys are compared
/// lexicographically, so integers must be stored big-endian to scan in order.
///
/// Writes are visible to readers at once but durable only after
/// [`Tree::flush`] returns: anything acknowledged to a peer (Raft log
/// entries, votes) must be flushed first.
pub trait Tree: Send + Sync {
    /// The value of `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Sets `key` to `value`.
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError>;
    /// Deletes `key`; a missing key is not an error.
    fn remove(&self, key: &[u8]) -> Result<(), StorageError>;
    /// Every pair whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KvPair>, StorageError>;
    /// Every pair with a key inside `(start, end)`, in key order. An empty or
    /// inverted range yields nothing (never a panic).
    fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> Result<Vec<KvPair>, StorageError>;
    /// The pair with the smallest key.
    fn first(&self) -> Result<Option<KvPair>, StorageError>;
    /// The pair with the greatest key.
    fn last(&self) -> Result<Option<KvPair>, StorageError>;
    /// Applies every op atomically: after a crash either all or none are
    /// present (once flushed).
    fn apply_batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError>;
    /// Makes every write so far durable (fsync). Blocks until done.
    fn flush(&self) -> Result<(), StorageError>;
}

/// True when `(start, end)` can contain no key. Both engines panic (BTreeMap)
/// or misbehave on such ranges, and openraft may legitimately ask for an
/// empty range, so it is answered here.
fn range_is_empty(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e))
        | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        _ => false,
    }
}

/// The production engine: one sled database holding every tree.
///
/// sled locks its directory; the lock is released only when every handle
/// (this value and every [`Tree`] it gave out) has been dropped.
#[derive(Clone)]
pub struct SledStorage {
    db: sled::Db,
}

impl SledStorage {
    /// Opens or creates the database in directory `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let db = sled::open(path).map_err(StorageError::sled("open"))?;
        Ok(Self { db })
    }
}

impl std::fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStorage").finish_non_exhaustive()
    }
}

impl Storage for SledStorage {
    fn tree(&self, name: &str) -> Result<Arc<dyn Tree>, StorageError> {
        let tree = self
            .db
            .open_tree(name)
            .map_err(StorageError::sled("open_tree"))?;
        Ok(Arc::new(SledTree { tree }))
    }
}

/// A [`Tree`] backed by one sled tree.
struct SledTree {
    tree: sled::Tree,
}

fn collect_sled(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    op: &'static str,
) -> Result<Vec<KvPair>, StorageError> {
    iter.map(|item| {
        item.map(|(k, v)| (k.to_vec(), v.to_vec()))
            .map_err(StorageError::sled(op))
    })
    .collect()
}

impl Tree for SledTree {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let value = self.tree.get(key).map_err(StorageError::sled("get"))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.tree
            .insert(key, value)
            .map_err(StorageError::sled("insert"))?;
        Ok(())
    }

    fn remove(&self, key: &[u8]) -> Result<(), StorageError> {
        self.tree
            .remove(key)
            .map_err(StorageError::sled("remove"))?;
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KvPair>, StorageError> {
        collect_sled(self.tree.scan_prefix(prefix), "scan_prefix")
    }

    fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> Result<Vec<KvPair>, StorageError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        collect_sled(self.tree.range::<&[u8], _>((start, end)), "range")
    }

    fn first(&self) -> Result<Option<KvPair>, StorageError> {
        let pair = self.tree.first().map_err(StorageError::sled("first"))?;
        Ok(pair.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn last(&self) -> Result<Option<KvPair>, StorageError> {
        let pair = self.tree.last().map_err(StorageError::sled("last"))?;
        Ok(pair.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn apply_batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                BatchOp::Insert { key, value } => batch.insert(key, value),
                BatchOp::Remove { key } => batch.remove(key),
            }
        }
        self.tree
            .apply_batch(batch)
            .map_err(StorageError::sled("apply_batch"))
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.tree.flush().map_err(StorageError::sled("flush"))?;
        Ok(())
    }
}

/// An in-memory engine for tests and the simulator.
///
/// Every write is immediately "durable": `flush` is a no-op, and the data
/// lives as long as any clone of this value. Crash semantics (dropping
/// writes made since the last `flush`, as the design asks of the simulator)
/// are not modelled yet; a later change can keep a flushed copy per tree and
/// add a `crash()` that rolls back to it.
#[derive(Clone, Default)]
pub struct MemStorage {
    trees: Arc<Mutex<BTreeMap<String, Arc<MemTree>>>>,
}

impl MemStorage {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.trees.lock().keys().cloned().collect();
        f.debug_struct("MemStorage").field("trees", &names).finish()
    }
}

impl Storage for MemStorage {
    fn tree(&self, name: &str) -> Result<Arc<dyn Tree>, StorageError> {
        let tree = self
            .trees
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        Ok(tree)
    }
}

/// A [`Tree`] held in a `BTreeMap` behind a lock; readers never see half a
/// batch because a batch holds the write lock throughout.
#[derive(Default)]
struct MemTree {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Tree for MemTree {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.map.read().get(key).cloned())
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.map.write().insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn remove(&self, key: &[u8]) -> Result<(), StorageError> {
        self.map.write().remove(key);
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KvPair>, StorageError> {
        let map = self.map.read();
        Ok(map
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> Result<Vec<KvPair>, StorageError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let map = self.map.read();
        Ok(map
            .range::<[u8], _>((start, end))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn first(&self) -> Result<Option<KvPair>, StorageError> {
        let map = self.map.read();
        Ok(map.first_key_value().map(|(k, v)| (k.clone(), v.clone())))
    }

    fn last(&self) -> Result<Option<KvPair>, StorageError> {
        let map = self.map.read();
        Ok(map.last_key_value().map(|(k, v)| (k.clone(), v.clone())))
    }

    fn apply_batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let mut map = self.map.write();
        for op in ops {
            match op {
                BatchOp::Insert { key, value } => {
                    map.insert(key, value);
                }
                BatchOp::Remove { key } => {
                    map.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract every engine must meet; run against each one.
    fn check_tree_contract(storage: &dyn Storage) {
        let t = storage.tree("contract").expect("open tree");
        assert_eq!(t.get(b"a").expect("get"), None);
        assert_eq!(t.first().expect("first"), None);
        assert_eq!(t.last().expect("last"), None);

        t.insert(b"b", b"2").expect("insert");
        t.insert(b"a", b"1").expect("insert");
        t.insert(b"c", b"3").expect("insert");
        t.insert(b"pre/x", b"x").expect("insert");
        t.insert(b"pre/y", b"y").expect("insert");
        t.insert(b"a", b"1bis").expect("overwrite");
        assert_eq!(t.get(b"a").expect("get"), Some(b"1bis".to_vec()));

        // A second handle onto the same name sees the same data.
        let again = storage.tree("contract").expect("reopen tree");
        assert_eq!(again.get(b"b").expect("get"), Some(b"2".to_vec()));
        // Other trees are independent.
        let other = storage.tree("other").expect("open other");
        assert_eq!(other.get(b"b").expect("get"), None);

        let keys = |pairs: Vec<KvPair>| pairs.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(t.scan_prefix(b"pre/").expect("scan")),
            vec![b"pre/x".to_vec(), b"pre/y".to_vec()]
        );
        assert_eq!(
            keys(
                t.range(Bound::Included(b"a"), Bound::Excluded(b"c"))
                    .expect("range")
            ),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(
            keys(
                t.range(Bound::Excluded(b"a"), Bound::Unbounded)
                    .expect("range")
            )
            .len(),
            4
        );
        // Empty and inverted ranges yield nothing instead of panicking.
        assert!(
            t.range(Bound::Excluded(b"b"), Bound::Excluded(b"b"))
                .expect("empty range")
                .is_empty()
        );
        assert!(
            t.range(Bound::Included(b"c"), Bound::Included(b"a"))
                .expect("inverted range")
                .is_empty()
        );
        assert_eq!(
            t.first().expect("first"),
            Some((b"a".to_vec(), b"1bis".to_vec()))
        );
        assert_eq!(
            t.last().expect("last"),
            Some((b"pre/y".to_vec(), b"y".to_vec()))
        );

        t.remove(b"b").expect("remove");
        t.remove(b"missing").expect("remove missing");
        assert_eq!(t.get(b"b").expect("get"), None);

        t.apply_batch(vec![
            BatchOp::Insert {
                key: b"d".to_vec(),
                value: b"4".to_vec(),
            },
            BatchOp::Remove { key: b"a".to_vec() },
            BatchOp::Insert {
                key: b"d".to_vec(),
                value: b"4bis".to_vec(),
            },
        ])
        .expect("batch");
        assert_eq!(t.get(b"a").expect("get"), None);
        assert_eq!(t.get(b"d").expect("get"), Some(b"4bis".to_vec()));
        t.flush().expect("flush");
    }

    #[test]
    fn mem_storage_meets_tree_contract() {
        check_tree_contract(&MemStorage::new());
    }

    #[test]
    fn sled_storage_meets_tree_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        check_tree_contract(&SledStorage::open(dir.path()).expect("open sled"));
    }

    #[test]
    fn sled_storage_persists_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let storage = SledStorage::open(dir.path()).expect("open sled");
            let t = storage.tree("t").expect("tree");
            t.insert(b"k", b"v").expect("insert");
            t.flush().expect("flush");
        }
        let storage = SledStorage::open(dir.path()).expect("reopen sled");
        let t = storage.tree("t").expect("tree");
        assert_eq!(t.get(b"k").expect("get"), Some(b"v".to_vec()));
    }
}
