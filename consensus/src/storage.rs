//! A small key-value storage abstraction: named trees of bytes, atomic
//! batches and an explicit durability point (`flush`).
//!
//! This module owns the engine boundary: sled in production ([`SledStorage`])
//! and a BTreeMap engine for tests and the deterministic simulator
//! ([`MemStorage`]), because sled runs its own threads and cannot be made
//! deterministic under turmoil. Both engines give the same durability
//! contract: a write is visible at once and survives a crash only once a
//! `flush` (of any tree of the same engine) has returned after it;
//! [`MemStorage::crash`] plays the crash. It must not know what the bytes
//! mean: the Raft log, vote, snapshots and the node's usage counters all
//! encode their own values on top of it.

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
    /// Whether another handle holds the database's lock (sled's `db` file
    /// lock): another process, or an instance in this one whose last
    /// handles are still being dropped.
    pub fn is_locked(&self) -> bool {
        match self {
            // sled reports it as an `Other` I/O error with this text.
            Self::Sled {
                source: sled::Error::Io(e),
                ..
            } => e.to_string().starts_with("could not acquire lock"),
            Self::Sled { .. } => false,
        }
    }

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

    /// Whether [`Tree::flush`] (and large writes) may block the calling
    /// thread on disk I/O, so an async caller should run them on a blocking
    /// thread (`tokio::task::spawn_blocking`). Engines that answer `false`
    /// must be called inline instead: a blocking thread is a real OS thread
    /// whose scheduling the simulator cannot control.
    fn needs_blocking_thread(&self) -> bool;
}

/// An ordered map from byte keys to byte values. Keys are compared
/// lexicographically, so integers must be stored big-endian to scan in order.
///
/// Writes are visible to readers at once but durable only after
/// [`Tree::flush`] returns: anything acknowledged to a peer (Raft log
/// entries, votes) must be flushed first. A flush makes every earlier write
/// to every tree of the engine durable, not only this tree's (sled flushes
/// its whole database). Each flush writes to disk even when little is new
/// (sled writes out its current buffer), so a caller that wrote several
/// trees flushes once.
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
    /// The first `limit` pairs with a key inside `(start, end)`, in key
    /// order: a bounded scan, for trees too large to read in one go.
    fn range_limit(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, StorageError>;
    /// The pair with the smallest key.
    fn first(&self) -> Result<Option<KvPair>, StorageError>;
    /// The pair with the greatest key.
    fn last(&self) -> Result<Option<KvPair>, StorageError>;
    /// Applies every op atomically: after a crash either all or none are
    /// present (once flushed).
    fn apply_batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError>;
    /// Makes every write so far, to any tree of this engine, durable
    /// (fsync). Blocks until done; see [`Storage::needs_blocking_thread`].
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

    fn needs_blocking_thread(&self) -> bool {
        // A flush is an fsync.
        true
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

    fn range_limit(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, StorageError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        collect_sled(
            self.tree.range::<&[u8], _>((start, end)).take(limit),
            "range",
        )
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
        // sled's `Tree::flush` flushes the page cache shared by every tree
        // of the database, which is the whole-engine durability point the
        // `Tree` contract promises.
        self.tree.flush().map_err(StorageError::sled("flush"))?;
        Ok(())
    }
}

/// An in-memory engine for tests and the simulator, with sled's crash
/// semantics.
///
/// Every write is visible at once; [`MemStorage::crash`] throws away every
/// write (insert, remove or batch, to any tree) made since the last
/// [`Tree::flush`] of any tree of this engine, as power loss would. A flush
/// is whole-engine, as in sled. Each tree keeps, for every key written since
/// the last flush, the value the key had at that flush: a flush forgets
/// these (cost proportional to the writes since the last flush, not to the
/// data), a crash puts them back.
///
/// The data lives as long as any clone of this value or any tree handle.
/// Handles stay valid across a crash and see the rolled-back data; the
/// simulator still drops every handle of a crashed node (with its tasks) and
/// reopens the trees, which see the same durable state.
///
/// Flush and crash never block on I/O, so
/// [`Storage::needs_blocking_thread`] is `false` and callers run them inline.
#[derive(Clone, Default)]
pub struct MemStorage {
    db: Arc<MemDb>,
}

/// The trees of one [`MemStorage`].
///
/// Lock order: `trees` first, then the trees' states in name order. Tree
/// operations take only their own tree's lock, so they cannot deadlock
/// against a flush or a crash.
#[derive(Default)]
struct MemDb {
    trees: Mutex<BTreeMap<String, Arc<RwLock<MemTreeState>>>>,
}

impl MemDb {
    /// Runs `f` on every tree's state with every tree locked at once, so a
    /// flush or crash is one cut across all trees: the durable state is
    /// always some prefix of the writes, as after a real crash.
    fn for_each_tree(&self, mut f: impl FnMut(&mut MemTreeState)) {
        let trees = self.trees.lock();
        let mut states: Vec<_> = trees.values().map(|tree| tree.write()).collect();
        for state in &mut states {
            f(state);
        }
    }
}

impl MemStorage {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a crash of the machine holding this engine: every write
    /// made since the last flush, to any tree, is rolled back; flushed data
    /// stays. Call it while nothing writes (the simulator crashes a node by
    /// stopping its tasks first); the engine is usable again at once.
    pub fn crash(&self) {
        self.db.for_each_tree(MemTreeState::roll_back);
    }
}

impl std::fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.db.trees.lock().keys().cloned().collect();
        f.debug_struct("MemStorage").field("trees", &names).finish()
    }
}

impl Storage for MemStorage {
    fn tree(&self, name: &str) -> Result<Arc<dyn Tree>, StorageError> {
        let state = self
            .db
            .trees
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        Ok(Arc::new(MemTree {
            db: self.db.clone(),
            state,
        }))
    }

    fn needs_blocking_thread(&self) -> bool {
        false
    }
}

/// The contents of one in-memory tree and what a crash would undo.
#[derive(Default)]
struct MemTreeState {
    /// What readers see.
    live: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For each key written since the last flush, its value at that flush
    /// (`None`: absent). `live` with these put back is the durable state.
    undo: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl MemTreeState {
    /// Sets `key` to `value` (`None` removes it), remembering the durable
    /// value on the first write since the last flush.
    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        if !self.undo.contains_key(&key) {
            let durable = self.live.get(&key).cloned();
            self.undo.insert(key.clone(), durable);
        }
        match value {
            Some(value) => self.live.insert(key, value),
            None => self.live.remove(&key),
        };
    }

    /// Makes the live state durable.
    fn make_durable(&mut self) {
        self.undo.clear();
    }

    /// Returns to the durable state.
    fn roll_back(&mut self) {
        for (key, durable) in std::mem::take(&mut self.undo) {
            match durable {
                Some(value) => self.live.insert(key, value),
                None => self.live.remove(&key),
            };
        }
    }
}

/// A handle onto one tree of a [`MemStorage`]. Readers never see half a
/// batch, and a flush or crash never cuts one, because a batch holds the
/// tree's write lock throughout.
struct MemTree {
    db: Arc<MemDb>,
    state: Arc<RwLock<MemTreeState>>,
}

impl Tree for MemTree {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.state.read().live.get(key).cloned())
    }

    fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.state.write().set(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn remove(&self, key: &[u8]) -> Result<(), StorageError> {
        self.state.write().set(key.to_vec(), None);
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KvPair>, StorageError> {
        let state = self.state.read();
        Ok(state
            .live
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> Result<Vec<KvPair>, StorageError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let state = self.state.read();
        Ok(state
            .live
            .range::<[u8], _>((start, end))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn range_limit(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, StorageError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let state = self.state.read();
        Ok(state
            .live
            .range::<[u8], _>((start, end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn first(&self) -> Result<Option<KvPair>, StorageError> {
        let state = self.state.read();
        Ok(state
            .live
            .first_key_value()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn last(&self) -> Result<Option<KvPair>, StorageError> {
        let state = self.state.read();
        Ok(state
            .live
            .last_key_value()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn apply_batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        let mut state = self.state.write();
        for op in ops {
            match op {
                BatchOp::Insert { key, value } => state.set(key, Some(value)),
                BatchOp::Remove { key } => state.set(key, None),
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.db.for_each_tree(MemTreeState::make_durable);
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
        // A bounded scan stops at its limit.
        assert_eq!(
            keys(
                t.range_limit(Bound::Excluded(b"a"), Bound::Unbounded, 2)
                    .expect("range_limit")
            ),
            vec![b"b".to_vec(), b"c".to_vec()]
        );
        assert!(
            t.range_limit(Bound::Included(b"c"), Bound::Included(b"a"), 5)
                .expect("inverted range_limit")
                .is_empty()
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

    #[test]
    fn a_second_open_while_the_first_is_held_reports_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = SledStorage::open(dir.path()).expect("open sled");
        let err = SledStorage::open(dir.path()).expect_err("the directory is locked");
        assert!(err.is_locked(), "{err}");
        drop(held);
        assert!(SledStorage::open(dir.path()).is_ok(), "released on drop");
    }

    #[test]
    fn only_sled_needs_a_blocking_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            SledStorage::open(dir.path())
                .expect("open sled")
                .needs_blocking_thread()
        );
        assert!(!MemStorage::new().needs_blocking_thread());
    }

    fn insert_op(key: &[u8], value: &[u8]) -> BatchOp {
        BatchOp::Insert {
            key: key.to_vec(),
            value: value.to_vec(),
        }
    }

    /// Every pair of `tree`, for comparing whole states.
    fn contents(tree: &dyn Tree) -> Vec<KvPair> {
        tree.range(Bound::Unbounded, Bound::Unbounded)
            .expect("full range")
    }

    fn pairs(items: &[(&[u8], &[u8])]) -> Vec<KvPair> {
        items
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn mem_crash_keeps_flushed_writes_and_drops_the_rest() {
        let storage = MemStorage::new();
        let t = storage.tree("t").expect("tree");
        t.insert(b"kept", b"1").expect("insert");
        t.insert(b"overwritten", b"old").expect("insert");
        t.insert(b"removed", b"r").expect("insert");
        t.apply_batch(vec![insert_op(b"batched", b"b")])
            .expect("batch");
        t.flush().expect("flush");

        // Unflushed: an insert of a new key, an overwrite (twice), a remove,
        // a batch mixing both, and a key inserted then removed.
        t.insert(b"new", b"n").expect("insert");
        t.insert(b"overwritten", b"mid").expect("insert");
        t.insert(b"overwritten", b"new").expect("insert");
        t.remove(b"removed").expect("remove");
        t.apply_batch(vec![
            insert_op(b"batch-new", b"x"),
            BatchOp::Remove {
                key: b"batched".to_vec(),
            },
        ])
        .expect("batch");
        t.insert(b"fleeting", b"f").expect("insert");
        t.remove(b"fleeting").expect("remove");
        // Visible before the crash.
        assert_eq!(t.get(b"new").expect("get"), Some(b"n".to_vec()));
        assert_eq!(t.get(b"removed").expect("get"), None);

        storage.crash();
        let durable = pairs(&[
            (b"batched", b"b"),
            (b"kept", b"1"),
            (b"overwritten", b"old"),
            (b"removed", b"r"),
        ]);
        // The handle kept across the crash and a reopened one agree.
        assert_eq!(contents(t.as_ref()), durable);
        let reopened = storage.tree("t").expect("reopen");
        assert_eq!(contents(reopened.as_ref()), durable);

        // A second crash with nothing written changes nothing.
        storage.crash();
        assert_eq!(contents(reopened.as_ref()), durable);
    }

    #[test]
    fn mem_writes_after_a_crash_follow_the_same_rules() {
        let storage = MemStorage::new();
        let t = storage.tree("t").expect("tree");
        t.insert(b"a", b"1").expect("insert");
        storage.crash();
        assert_eq!(t.get(b"a").expect("get"), None);

        t.insert(b"a", b"2").expect("insert");
        t.flush().expect("flush");
        t.remove(b"a").expect("remove");
        storage.crash();
        assert_eq!(t.get(b"a").expect("get"), Some(b"2".to_vec()));

        t.remove(b"a").expect("remove");
        t.flush().expect("flush");
        storage.crash();
        assert_eq!(t.get(b"a").expect("get"), None);
    }

    #[test]
    fn mem_flush_of_one_tree_makes_every_tree_durable() {
        let storage = MemStorage::new();
        let log = storage.tree("log").expect("tree");
        let meta = storage.tree("meta").expect("tree");
        log.insert(b"1", b"entry").expect("insert");
        meta.insert(b"vote", b"v").expect("insert");
        // As in sled, one flush covers the whole engine.
        meta.flush().expect("flush");
        log.insert(b"2", b"lost").expect("insert");
        storage.crash();

        assert_eq!(contents(log.as_ref()), pairs(&[(b"1", b"entry")]));
        assert_eq!(contents(meta.as_ref()), pairs(&[(b"vote", b"v")]));
    }

    #[test]
    fn mem_tree_created_since_the_last_flush_is_empty_after_a_crash() {
        let storage = MemStorage::new();
        storage
            .tree("old")
            .expect("tree")
            .insert(b"k", b"v")
            .expect("insert");
        storage.tree("old").expect("tree").flush().expect("flush");
        let fresh = storage.tree("fresh").expect("tree");
        fresh
            .apply_batch(vec![insert_op(b"a", b"1"), insert_op(b"b", b"2")])
            .expect("batch");
        storage.crash();

        assert!(contents(storage.tree("fresh").expect("reopen").as_ref()).is_empty());
        assert_eq!(
            contents(storage.tree("old").expect("reopen").as_ref()),
            pairs(&[(b"k", b"v")])
        );
    }

    #[test]
    fn mem_batch_is_all_or_nothing_across_a_crash() {
        let storage = MemStorage::new();
        let t = storage.tree("t").expect("tree");
        let batch: Vec<BatchOp> = (0..50u8).map(|i| insert_op(&[i], &[i])).collect();
        t.apply_batch(batch.clone()).expect("batch");
        storage.crash();
        assert!(contents(t.as_ref()).is_empty());

        t.apply_batch(batch).expect("batch");
        t.flush().expect("flush");
        storage.crash();
        assert_eq!(contents(t.as_ref()).len(), 50);
    }

    #[test]
    fn mem_clones_share_data_and_crashes() {
        let storage = MemStorage::new();
        let clone = storage.clone();
        storage
            .tree("t")
            .expect("tree")
            .insert(b"k", b"v")
            .expect("insert");
        let t = clone.tree("t").expect("tree");
        assert_eq!(t.get(b"k").expect("get"), Some(b"v".to_vec()));
        clone.crash();
        assert_eq!(
            storage.tree("t").expect("tree").get(b"k").expect("get"),
            None
        );
    }
}
