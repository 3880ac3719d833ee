//! The replicated state machine: the license [`Config`] with the log id it
//! was applied up to, its snapshots, and the lock-free publication of each
//! new config to readers.
//!
//! This module owns applying committed entries (deterministically, through
//! `Config::apply`), building and installing snapshots, and persisting the
//! current snapshot in the `raft_snapshot` tree so a restarted node resumes
//! from it and openraft re-applies only the log after it. It must not know
//! about the decision hot path: readers only ever see an `Arc<Config>`
//! swapped in after each applied batch.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use openraft::storage::SnapshotSignature;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tollgate_quota::config::{ApplyOutcome, Config};

use crate::applied::{AppliedChange, AppliedEntry, AppliedFeed};
use crate::codec::{self, CodecError};
use crate::error::ConsensusError;
use crate::log_store::LogStore;
use crate::storage::{BatchOp, Storage, Tree};
use crate::types::{Entry, LogId, RaftStorageError, SnapshotMeta, StoredMembership, TypeConfig};

/// Name of the tree holding the current snapshot.
pub const SNAPSHOT_TREE: &str = "raft_snapshot";

const KEY_META: &[u8] = b"meta";
const KEY_DATA: &[u8] = b"data";

/// What a snapshot's data holds. `last_applied` and `last_membership`
/// duplicate the snapshot meta so the data is self-describing on its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    config: Config,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

/// The persisted current snapshot, shared by the state machine and its
/// builders (which run on their own tasks).
struct SnapshotFile {
    tree: Arc<dyn Tree>,
    // Serializes "compare with the stored snapshot, then replace it", so a
    // slow builder cannot overwrite a newer installed snapshot.
    write_lock: Mutex<()>,
    n_built: AtomicU64,
}

impl SnapshotFile {
    fn load(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, ConsensusError> {
        let (Some(meta), Some(data)) = (self.tree.get(KEY_META)?, self.tree.get(KEY_DATA)?) else {
            return Ok(None);
        };
        let meta: SnapshotMeta = codec::decode("snapshot meta", &meta)?;
        Ok(Some((meta, data)))
    }

    /// Stores `meta`/`data` durably unless a newer snapshot is already stored.
    fn save(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), ConsensusError> {
        let _guard = self.write_lock.lock();
        if let Some(bytes) = self.tree.get(KEY_META)? {
            let stored: SnapshotMeta = codec::decode("snapshot meta", &bytes)?;
            if stored.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        self.tree.apply_batch(vec![
            BatchOp::Insert {
                key: KEY_META.to_vec(),
                value: codec::encode("snapshot meta", meta)?,
            },
            BatchOp::Insert {
                key: KEY_DATA.to_vec(),
                value: data.to_vec(),
            },
        ])?;
        // openraft purges the log right after a snapshot is reported built,
        // so the snapshot must be on disk first.
        self.tree.flush()?;
        Ok(())
    }
}

fn snapshot_io_err(
    signature: Option<SnapshotSignature<u64>>,
    write: bool,
) -> impl FnOnce(ConsensusError) -> RaftStorageError {
    move |e| {
        if write {
            StorageIOError::write_snapshot(signature, &e).into()
        } else {
            StorageIOError::read_snapshot(signature, &e).into()
        }
    }
}

/// openraft's state machine for the license config.
pub struct StateMachineStore {
    state: SnapshotPayload,
    published: Arc<ArcSwap<Config>>,
    snapshots: Arc<SnapshotFile>,
    applied: Arc<AppliedFeed>,
    alive: Arc<()>,
}

impl StateMachineStore {
    /// Opens the snapshot tree in `storage`, restores the state from the
    /// persisted snapshot if there is one, and publishes it to `published`.
    /// Every entry applied from then on is also pushed to `applied`.
    /// `alive` is a liveness token (see `LogStore::open`).
    pub(crate) fn open(
        storage: &dyn Storage,
        published: Arc<ArcSwap<Config>>,
        applied: Arc<AppliedFeed>,
        alive: Arc<()>,
    ) -> Result<Self, ConsensusError> {
        let snapshots = open_snapshots(storage)?;
        let state = load_state(&snapshots)?;
        published.store(Arc::new(state.config.clone()));
        Ok(Self {
            state,
            published,
            snapshots,
            applied,
            alive,
        })
    }

    fn publish(&self) {
        self.published.store(Arc::new(self.state.config.clone()));
    }
}

fn open_snapshots(storage: &dyn Storage) -> Result<Arc<SnapshotFile>, ConsensusError> {
    Ok(Arc::new(SnapshotFile {
        tree: storage.tree(SNAPSHOT_TREE)?,
        write_lock: Mutex::new(()),
        n_built: AtomicU64::new(0),
    }))
}

/// The state of the persisted snapshot, or the empty state without one.
fn load_state(snapshots: &SnapshotFile) -> Result<SnapshotPayload, ConsensusError> {
    Ok(match snapshots.load()? {
        Some((_meta, data)) => decode_payload(&data)?,
        None => SnapshotPayload {
            config: Config::default(),
            last_applied: None,
            last_membership: StoredMembership::default(),
        },
    })
}

/// The config a stopped node's storage holds: its snapshot, plus every
/// committed log entry after it applied in order, as a restart would. For
/// offline tools (the audit verifier reads node keys from it); never call
/// it on the storage of a running node.
pub fn recover_config(storage: &dyn Storage) -> Result<Config, ConsensusError> {
    let snapshots = open_snapshots(storage)?;
    let mut state = load_state(&snapshots)?;
    let log = LogStore::open(storage, Arc::new(()))?;
    let after = state.last_applied.map(|l| l.index);
    for entry in log
        .committed_entries_after(after)
        .map_err(|e| ConsensusError::Fatal(format!("reading the raft log: {e}")))?
    {
        let index = entry.log_id.index;
        match entry.payload {
            EntryPayload::Normal(cmd) => {
                state.config.apply(&cmd, index);
            }
            EntryPayload::Blank | EntryPayload::Membership(_) => {
                state.config.bump_version(index);
            }
        }
    }
    Ok(state.config)
}

fn decode_payload(data: &[u8]) -> Result<SnapshotPayload, CodecError> {
    let mut payload: SnapshotPayload = codec::decode("snapshot data", data)?;
    // The key-hash index is derived and not serialized.
    payload.config.rebuild_indexes();
    Ok(payload)
}

/// Builds a snapshot of the state as it was when the builder was created,
/// so building runs on its own task without blocking `apply`.
pub struct SnapshotBuilder {
    payload: SnapshotPayload,
    snapshots: Arc<SnapshotFile>,
    _alive: Arc<()>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let data = codec::encode("snapshot data", &self.payload)
            .map_err(|e| snapshot_io_err(None, true)(e.into()))?;
        let n_built = self.snapshots.n_built.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match self.payload.last_applied {
            Some(log_id) => format!("{}-{}-{}", log_id.leader_id.term, log_id.index, n_built),
            None => format!("0-0-{n_built}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.payload.last_applied,
            last_membership: self.payload.last_membership.clone(),
            snapshot_id,
        };
        self.snapshots
            .save(&meta, &data)
            .map_err(snapshot_io_err(Some(meta.signature()), true))?;
        tracing::info!(snapshot = %meta.snapshot_id, "built config snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        Ok((self.state.last_applied, self.state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyOutcome>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries = entries.into_iter();
        let mut outcomes = Vec::with_capacity(entries.size_hint().0);
        for entry in entries {
            let index = entry.log_id.index;
            let term = entry.log_id.leader_id.term;
            self.state.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Normal(cmd) => {
                    let outcome = self.state.config.apply(&cmd, index);
                    self.applied.push(AppliedEntry {
                        index,
                        term,
                        change: AppliedChange::Command {
                            command: Arc::new(cmd),
                            outcome: outcome.clone(),
                        },
                    });
                    outcome
                }
                EntryPayload::Blank => {
                    self.state.config.bump_version(index);
                    ApplyOutcome::Applied { version: index }
                }
                EntryPayload::Membership(membership) => {
                    self.applied.push(AppliedEntry {
                        index,
                        term,
                        change: AppliedChange::Membership {
                            voters: membership.voter_ids().collect(),
                            learners: membership.learner_ids().collect(),
                        },
                    });
                    self.state.last_membership =
                        StoredMembership::new(Some(entry.log_id), membership);
                    self.state.config.bump_version(index);
                    ApplyOutcome::Applied { version: index }
                }
            };
            outcomes.push(outcome);
        }
        // One publication per batch, not per entry: readers only need the
        // latest state, and each publication clones the config's maps.
        self.publish();
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            payload: self.state.clone(),
            snapshots: self.snapshots.clone(),
            _alive: self.alive.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_inner();
        let mut payload = decode_payload(&data)
            .map_err(|e| snapshot_io_err(Some(meta.signature()), false)(e.into()))?;
        // The meta is what openraft reasons with; make the state agree with it.
        payload.last_applied = meta.last_log_id;
        payload.last_membership = meta.last_membership.clone();
        self.snapshots
            .save(meta, &data)
            .map_err(snapshot_io_err(Some(meta.signature()), true))?;
        self.state = payload;
        self.publish();
        if let Some(log_id) = meta.last_log_id {
            self.applied.push(AppliedEntry {
                index: log_id.index,
                term: log_id.leader_id.term,
                change: AppliedChange::Snapshot,
            });
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let loaded = self
            .snapshots
            .load()
            .map_err(snapshot_io_err(None, false))?;
        Ok(loaded.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
