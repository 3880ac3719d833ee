//! The one task that writes the audit log.
//!
//! It takes queued decisions and the consensus feed of applied config
//! changes, turns each into a record chained to the one before, signs a
//! checkpoint every `checkpoint_every_records` records or
//! `checkpoint_interval_ms`, and writes what accumulated at most once per
//! `flush_interval_ms` (one segment, its checkpoints and the head in one
//! atomic write). A write counts as appended once it is durable: once a
//! flush of the storage engine begun after it has finished. While
//! decisions are counted that is the usage flusher's flush of the same
//! tick (one flush covers every tree), so the trail adds no flush of its
//! own; the writer flushes itself only when none came by before its next
//! write (or at shutdown). A failed
//! write keeps the batch, already chained, and retries it with backoff;
//! while it fails the writer stops taking from the queue, so memory stays
//! bounded and `on_full` decides what callers see.
//!
//! The task wakes once per flush interval while busy, not once per
//! decision. For sled (a flush is an fsync) the work runs on two OS
//! threads of the writer's own, away from the threads that answer
//! decisions:
//!
//! - `tollgate-audit` builds the records (encoding, hashing, signing) under
//!   `SCHED_IDLE` on Linux: it runs only on a core nothing else wants, so
//!   it never delays a decision, not even by a wake-up;
//! - `tollgate-audit-write` writes them to storage. A write holds sled's
//!   batch lock, which every other storage call (the Raft log's too)
//!   waits on, so it must not be left waiting long for an idle core. Where
//!   the process may raise a thread out of `SCHED_IDLE` again
//!   (`CAP_SYS_NICE`, or an `RLIMIT_NICE` that allows it), writes run under
//!   `SCHED_IDLE` as well, and one that has not finished within
//!   [`WRITE_STALL`] is raised to `SCHED_BATCH` until it is done;
//!   elsewhere writes run under `SCHED_BATCH` (its fair share, no wake-up
//!   preemption). The write thread also builds the records while the
//!   queue is falling behind (a quarter full, until it is back under a
//!   sixteenth): on a saturated machine an idle-priority builder would
//!   starve, and with `on_full: block` that would only turn into blocked
//!   callers.
//!
//! With `on_full: shed` (the operator chose decision latency over a
//! complete trail) the write thread also runs at nice +10, so on a
//! saturated machine the trail waits for the cores rather than decisions
//! waiting for it. Without privileges a thread cannot be raised out of
//! `SCHED_IDLE`, hence two threads rather than one that changes class. On
//! the in-memory engine the work runs inline, so the simulator's single
//! thread drives this task like any other.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tollgate_consensus::storage::StorageError;
use tollgate_consensus::{AppliedChange, AppliedEntry, AppliedFeed};

use super::keys::{NodeSigner, SubjectKey};
use super::record::{
    Body, Checkpoint, ConfigRecord, DecisionRecord, FORMAT_VERSION, MembershipRecord, Record,
    SeatRecord, StartRecord, hash_bytes,
};
use super::store::{AuditStore, Head, WriteBatch};
use super::{AuditConfig, AuditStats, Event, MAX_BATCH_RECORDS, OnFull};
use crate::persist::{Flushes, run_storage};
use crate::state::NodeState;

/// Records built but not yet durable, beyond which the writer stops taking
/// decisions off the queue (a failing disk): the queue, not this buffer,
/// is where back-pressure shows.
const MAX_PENDING_RECORDS: usize = 4 * MAX_BATCH_RECORDS;
/// First wait after a failed write; doubles up to [`MAX_RETRY_BACKOFF_MS`].
const FIRST_RETRY_BACKOFF_MS: u64 = 10;
/// Longest wait between retries of a failed write.
const MAX_RETRY_BACKOFF_MS: u64 = 1_000;

/// How much lower than the node's other threads the audit write thread
/// runs with `on_full: shed` (a nice increment; +10 gives it about a tenth
/// of a busy core's share).
const AUDIT_THREAD_NICE: libc::c_int = 10;

/// A job for an audit thread.
type Job = Box<dyn FnOnce() + Send>;

/// An audit thread's scheduling policy (its nice value stays through a
/// change of policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    /// `SCHED_IDLE`: runs only on an otherwise idle core.
    Idle,
    /// `SCHED_BATCH`: a fair share, no wake-up preemption.
    Batch,
}

/// One of the writer's own OS threads, for an engine whose writes block
/// (sled). It stops when the writer drops it.
struct AuditThread {
    jobs: std::sync::mpsc::Sender<Job>,
    /// The thread's kernel id, to change its class from outside (0 where
    /// there is none).
    tid: i32,
}

impl AuditThread {
    /// Starts a thread under `policy`, `nice` lower than the node's other
    /// threads if set.
    fn spawn(name: &str, policy: Policy, nice: Option<libc::c_int>) -> anyhow::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Scheduling first: whoever spawned the thread may change
                // it once it has the id.
                schedule_self(policy, nice);
                let _ = tid_tx.send(current_tid());
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .context("starting an audit thread")?;
        let tid = tid_rx.recv().context("starting an audit thread")?;
        Ok(Self { jobs, tid })
    }

    /// Hands `f` to the thread.
    fn send<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<tokio::sync::oneshot::Receiver<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow::anyhow!("the audit thread stopped"))?;
        Ok(rx)
    }

    /// Runs `f` on the thread and waits (without blocking) for its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        self.send(f)?.await.context("the audit thread stopped")
    }

    /// Runs `f` on this idle-priority thread; if it has not finished
    /// within [`WRITE_STALL`] (it holds storage locks and found no idle
    /// core), moves the thread to `SCHED_BATCH` until it has.
    async fn run_unstalled<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let done = self.send(f)?;
        tokio::pin!(done);
        let mut raised = false;
        let result = tokio::select! {
            r = &mut done => r,
            () = tokio::time::sleep(WRITE_STALL) => {
                raised = set_policy(self.tid, Policy::Batch);
                done.await
            }
        };
        if raised {
            set_policy(self.tid, Policy::Idle);
        }
        result.context("the audit thread stopped")
    }
}

/// How long a write may wait on the idle-priority thread before that
/// thread is raised to `SCHED_BATCH` until it is done.
const WRITE_STALL: Duration = Duration::from_millis(5);

/// The two audit threads (see the module docs).
struct AuditThreads {
    build: AuditThread,
    write: AuditThread,
    /// Whether writes run at idle priority too, raised when they stall
    /// (only where this process may raise a thread out of `SCHED_IDLE`).
    idle_writes: bool,
    /// Whether the queue is falling behind, so the write thread builds too.
    behind: std::sync::atomic::AtomicBool,
}

impl AuditThreads {
    fn spawn(on_full: OnFull) -> anyhow::Result<Self> {
        let idle_writes = can_leave_idle();
        let write_policy = if idle_writes {
            Policy::Idle
        } else {
            Policy::Batch
        };
        let write_nice = (on_full == OnFull::Shed).then_some(AUDIT_THREAD_NICE);
        Ok(Self {
            build: AuditThread::spawn("tollgate-audit", Policy::Idle, None)?,
            write: AuditThread::spawn("tollgate-audit-write", write_policy, write_nice)?,
            idle_writes,
            behind: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs a write job on the write thread.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        if self.idle_writes {
            self.write.run_unstalled(f).await
        } else {
            self.write.run(f).await
        }
    }

    /// Runs a build job: on the idle-priority thread, or on the write
    /// thread while the queue falls behind (`queued` of `capacity`).
    async fn build<T: Send + 'static>(
        &self,
        queued: usize,
        capacity: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        if self.falling_behind(queued, capacity) {
            self.write(f).await
        } else {
            self.build.run(f).await
        }
    }

    /// Whether the queue is falling behind: from a quarter full until
    /// back under a sixteenth.
    fn falling_behind(&self, queued: usize, capacity: usize) -> bool {
        let behind = if queued >= capacity / FALLING_BEHIND_DIVISOR {
            true
        } else if queued <= capacity / CAUGHT_UP_DIVISOR {
            false
        } else {
            self.behind.load(Ordering::Relaxed)
        };
        self.behind.store(behind, Ordering::Relaxed);
        behind
    }
}

/// From this fraction of the queue's capacity (1/N) the write thread also
/// builds records.
const FALLING_BEHIND_DIVISOR: usize = 4;
/// Below this fraction (1/N) the idle-priority thread builds again.
const CAUGHT_UP_DIVISOR: usize = 16;

/// Puts the calling thread under `policy`, and lowers its priority by
/// `nice` if set. On Linux scheduling policy and nice value belong to a
/// thread, not the process, so the node's other threads keep theirs. Best
/// effort: a refusal is logged.
fn schedule_self(policy: Policy, nice: Option<libc::c_int>) {
    let tid = current_tid();
    if !set_policy(tid, policy) {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            ?policy,
            "could not set an audit thread's scheduling policy"
        );
    }
    if let Some(nice) = nice
        && !lower_priority(tid, nice)
    {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower an audit thread's priority"
        );
    }
}

/// Moves thread `tid` to `policy`; whether that worked.
#[cfg(target_os = "linux")]
fn set_policy(tid: i32, policy: Policy) -> bool {
    let policy = match policy {
        Policy::Idle => libc::SCHED_IDLE,
        Policy::Batch => libc::SCHED_BATCH,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; `tid`
    // is one of this process's threads, alive while its AuditThread is.
    tid != 0 && unsafe { libc::sched_setscheduler(tid, policy, &raw const param) } == 0
}

#[cfg(not(target_os = "linux"))]
fn set_policy(_tid: i32, _policy: Policy) -> bool {
    false
}

/// Sets thread `tid`'s nice value; whether that worked.
#[cfg(target_os = "linux")]
fn lower_priority(tid: i32, nice: libc::c_int) -> bool {
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return false;
    };
    // SAFETY: setpriority takes and returns plain integers and touches no
    // memory of ours.
    tid != 0 && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } == 0
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_tid: i32, _nice: libc::c_int) -> bool {
    false
}

/// The calling thread's kernel id.
#[cfg(target_os = "linux")]
fn current_tid() -> i32 {
    // SAFETY: gettid takes nothing and cannot fail.
    unsafe { libc::gettid() }
}

#[cfg(not(target_os = "linux"))]
fn current_tid() -> i32 {
    0
}

/// Whether this process may move a thread out of `SCHED_IDLE` again (it
/// needs `CAP_SYS_NICE`, or an `RLIMIT_NICE` that allows its nice value),
/// tried once on a thread of its own.
fn can_leave_idle() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        std::thread::Builder::new()
            .name("tollgate-probe".into())
            .spawn(|| {
                let tid = current_tid();
                set_policy(tid, Policy::Idle) && set_policy(tid, Policy::Batch)
            })
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(false)
    })
}

/// What the writer needs besides the node state.
pub(crate) struct WriterParts {
    pub store: AuditStore,
    pub signer: NodeSigner,
    pub subject_key: SubjectKey,
    pub feed: Arc<AppliedFeed>,
    pub rx: mpsc::Receiver<Event>,
    pub config: AuditConfig,
    pub blocking: bool,
}

struct Writer {
    node: u64,
    store: AuditStore,
    signer: NodeSigner,
    subject_key: SubjectKey,
    stats: Arc<AuditStats>,
    config: AuditConfig,
    /// The last record built (durable or pending).
    built: Head,
    /// Built, not yet written.
    pending: WriteBatch,
    /// Written, not yet known durable: the batch and the flush mark taken
    /// after writing it.
    unsynced: Option<(WriteBatch, u64)>,
    /// The storage engine's flushes, shared with the usage flusher.
    flushes: Arc<Flushes>,
    config_index: Option<u64>,
    last_checkpoint_seq: u64,
    last_checkpoint_at: Instant,
    n_shed_recorded: u64,
    n_feed_dropped_recorded: u64,
    /// After a failed write, how long the next wait is.
    retry_backoff: Option<Duration>,
    /// No write before this: the flush interval after the last write, or
    /// the backoff after a failed one.
    next_write_at: Instant,
}

/// Runs the writer until `shutdown`; then records what is queued, signs a
/// last checkpoint and writes it all.
pub(crate) async fn run(
    state: Arc<NodeState>,
    parts: WriterParts,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let WriterParts {
        store,
        signer,
        subject_key,
        feed,
        mut rx,
        config,
        blocking,
    } = parts;
    let mut w = Box::new(Writer::open(&state, store, signer, subject_key, config, blocking).await?);
    let threads = if blocking {
        Some(AuditThreads::spawn(w.config.on_full)?)
    } else {
        None
    };
    let threads = threads.as_ref();
    w.append(
        state.now_ms(),
        Body::Start(StartRecord {
            policy_version: state.config().version,
            public_key: w.signer.public_key(),
            subject_key_id: w.subject_key.id(),
            software: env!("CARGO_PKG_VERSION").to_string(),
        }),
    );
    let mut events = Vec::with_capacity(MAX_BATCH_RECORDS);
    loop {
        // Idle: wait for the first thing to do. Busy: do not wake per
        // event (a wake-up per decision costs more than its record); let
        // events gather in the queue until the next write is due.
        if !w.has_work() && rx.is_empty() {
            let checkpoint_due = w.last_checkpoint_at + w.config.interval();
            tokio::select! {
                _ = shutdown.changed() => break,
                n = rx.recv_many(&mut events, MAX_BATCH_RECORDS) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = feed.ready() => {}
                _ = tokio::time::sleep_until(checkpoint_due) => {}
            }
        }
        if Instant::now() < w.next_write_at && rx.len() < MAX_BATCH_RECORDS {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep_until(w.next_write_at) => {}
            }
        }
        // Take what is queued now; while writes fail, only up to the bound.
        while w.pending.records.len() + events.len() < MAX_PENDING_RECORDS {
            match rx.try_recv() {
                Ok(event) => events.push(event),
                Err(_) => break,
            }
        }
        let queued = rx.len() + events.len();
        w = cycle(
            w,
            threads,
            (queued, rx.max_capacity()),
            &state,
            &feed,
            std::mem::take(&mut events),
            false,
        )
        .await?;
    }
    // Shutting down: what is already queued still goes in.
    rx.close();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    w.next_write_at = Instant::now();
    let queued = events.len();
    let w = cycle(w, threads, (queued, queued), &state, &feed, events, true).await?;
    let n_left = w.pending.records.len() + w.unsynced.as_ref().map_or(0, |(b, _)| b.records.len());
    if n_left > 0 {
        tracing::warn!(
            n_records = n_left,
            "audit records could not be made durable before shutdown"
        );
    }
    Ok(())
}

/// Builds the records of `events` and of what the feed holds, signs what
/// is due and writes. The encoding, hashing and signing run on an audit
/// thread (sled: see the module docs) or inline (in memory), never on the
/// threads that answer decisions. `queue` is how many events are queued
/// and the queue's capacity.
async fn cycle(
    mut w: Box<Writer>,
    threads: Option<&AuditThreads>,
    queue: (usize, usize),
    state: &NodeState,
    feed: &Arc<AppliedFeed>,
    events: Vec<Event>,
    last: bool,
) -> anyhow::Result<Box<Writer>> {
    let now = state.now_ms();
    let feed = Arc::clone(feed);
    let build = move || {
        w.take(now, &feed, events);
        w.maybe_checkpoint(now, last);
        w
    };
    let Some(threads) = threads else {
        let mut w = build();
        w.write(last);
        return Ok(w);
    };
    let mut w = threads
        .build(queue.0, queue.1, build)
        .await
        .context("the audit writer stopped")?;
    if !w.write_due() {
        return Ok(w);
    }
    threads
        .write(move || {
            w.write(last);
            w
        })
        .await
        .context("the audit writer stopped")
}

impl Writer {
    async fn open(
        state: &NodeState,
        store: AuditStore,
        signer: NodeSigner,
        subject_key: SubjectKey,
        config: AuditConfig,
        blocking: bool,
    ) -> anyhow::Result<Self> {
        let node = state.node_id;
        let public_key = signer.public_key();
        let s = store.clone();
        let (head, config_index, last_checkpoint) = run_storage(blocking, move || {
            s.set_identity(node, &public_key)?;
            Ok::<_, StorageError>((s.head()?, s.config_index()?, s.last_checkpoint()?))
        })
        .await??;
        let built = head.unwrap_or(Head {
            seq: 0,
            hash: super::record::GENESIS_PREV,
        });
        let stats = Arc::clone(&state.audit.stats);
        stats.last_seq.store(built.seq, Ordering::Relaxed);
        let last_checkpoint_seq = last_checkpoint.map_or(0, |c| c.seq);
        stats
            .last_checkpoint_seq
            .store(last_checkpoint_seq, Ordering::Relaxed);
        Ok(Self {
            node,
            store,
            signer,
            subject_key,
            stats,
            config,
            built,
            pending: WriteBatch::default(),
            unsynced: None,
            flushes: Arc::clone(&state.storage_flushes),
            config_index,
            last_checkpoint_seq,
            last_checkpoint_at: Instant::now(),
            n_shed_recorded: 0,
            n_feed_dropped_recorded: 0,
            retry_backoff: None,
            next_write_at: Instant::now(),
        })
    }

    /// Chains `body` after the last built record.
    fn append(&mut self, at_ms: i64, body: Body) {
        let record = Record {
            format: FORMAT_VERSION,
            seq: self.built.seq + 1,
            prev: self.built.hash,
            at_ms,
            node: self.node,
            body,
        };
        match record.encode() {
            Ok(bytes) => {
                let hash = hash_bytes(&bytes);
                self.pending.records.push((record.seq, hash, bytes));
                self.built = Head {
                    seq: record.seq,
                    hash,
                };
                if self.built.seq - self.last_checkpoint_seq >= self.config.every_records() {
                    self.checkpoint(at_ms);
                }
            }
            // Our own types always encode; if one ever does not, the chain
            // stays whole and the gap shows as a missing decision.
            Err(e) => tracing::error!(error = %e, "an audit record could not be encoded"),
        }
    }

    /// Builds the records for newly shed decisions, config changes and
    /// queued events.
    fn take(&mut self, now: i64, feed: &AppliedFeed, events: Vec<Event>) {
        let n_shed = self.stats.n_shed.load(Ordering::Relaxed);
        if n_shed > self.n_shed_recorded {
            let n_records = n_shed - self.n_shed_recorded;
            self.n_shed_recorded = n_shed;
            self.append(now, Body::Shed { n_records });
        }
        let n_dropped = feed.n_dropped();
        if n_dropped > self.n_feed_dropped_recorded {
            let n_entries = n_dropped - self.n_feed_dropped_recorded;
            self.n_feed_dropped_recorded = n_dropped;
            self.append(now, Body::ConfigGap { n_entries });
        }
        for entry in feed.drain() {
            self.take_applied(now, entry);
        }
        for event in events {
            let (at_ms, body) = self.body_of(event);
            self.append(at_ms, body);
            self.pending.n_events += 1;
        }
    }

    fn take_applied(&mut self, now: i64, entry: AppliedEntry) {
        // Entries re-applied after a restart were recorded before.
        if self
            .config_index
            .is_some_and(|recorded| entry.index <= recorded)
        {
            return;
        }
        self.config_index = Some(entry.index);
        self.pending.config_index = Some(entry.index);
        let body = match entry.change {
            AppliedChange::Command { command, outcome } => {
                let json = serde_json::to_vec(&*command).unwrap_or_default();
                Body::Config(ConfigRecord {
                    index: entry.index,
                    term: entry.term,
                    actor: command.actor.clone(),
                    op: command.op.kind().to_string(),
                    targets: command.op.targets(),
                    command_sha256: Sha256::digest(&json).into(),
                    applied: matches!(
                        outcome,
                        tollgate_quota::config::ApplyOutcome::Applied { .. }
                    ),
                })
            }
            AppliedChange::Membership { voters, learners } => Body::Membership(MembershipRecord {
                index: entry.index,
                term: entry.term,
                voters,
                learners,
            }),
            AppliedChange::Snapshot => Body::Snapshot { index: entry.index },
        };
        self.append(now, body);
    }

    fn body_of(&self, event: Event) -> (i64, Body) {
        match event {
            Event::Decision(d) => (
                d.at_ms,
                Body::Decision(DecisionRecord {
                    op: d.op,
                    decision_id: d.decision_id,
                    license: d.license,
                    subject: d.subject.as_deref().map(|s| self.subject_key.pseudonym(s)),
                    model: d.model,
                    model_version: d.model_version,
                    verdict: d.verdict,
                    reasons: d.reasons.into_iter().map(str::to_string).collect(),
                    policy_version: d.policy_version,
                    // Validated as hex before the decision; a value that
                    // still does not decode is left out, never stored raw.
                    input_hash: d.input_hash.and_then(|h| hex::decode(h).ok()),
                    output_hash: d.output_hash.and_then(|h| hex::decode(h).ok()),
                    request_id: d.request_id,
                    dry_run: d.dry_run,
                }),
            ),
            Event::Seat(s) => (
                s.at_ms,
                Body::Seat(SeatRecord {
                    call: s.call,
                    decision_id: s.decision_id,
                    license: s.license,
                    lease_id: s.lease_id,
                    granted: s.granted,
                    reasons: s.reasons.into_iter().map(str::to_string).collect(),
                    policy_version: s.policy_version,
                }),
            ),
        }
    }

    /// Signs a checkpoint of the last built record when the interval went
    /// by (or `force`, at shutdown); `append` signs one every
    /// `checkpoint_every_records`.
    fn maybe_checkpoint(&mut self, now_ms: i64, force: bool) {
        let since = self.built.seq - self.last_checkpoint_seq;
        let timer_due = self.last_checkpoint_at.elapsed() >= self.config.interval();
        if timer_due {
            // Restart the interval even when nothing is due, so an idle
            // writer does not wake up in a loop.
            self.last_checkpoint_at = Instant::now();
        }
        if since > 0 && (force || timer_due) {
            self.checkpoint(now_ms);
        }
    }

    /// Signs a checkpoint of the last built record.
    fn checkpoint(&mut self, now_ms: i64) {
        let cp = Checkpoint::sign(
            &self.signer,
            self.node,
            self.built.seq,
            self.built.hash,
            now_ms,
        );
        self.pending.checkpoints.push(cp);
        self.last_checkpoint_seq = self.built.seq;
        self.last_checkpoint_at = Instant::now();
    }

    fn has_pending(&self) -> bool {
        !self.pending.records.is_empty()
            || !self.pending.checkpoints.is_empty()
            || self.pending.config_index.is_some()
    }

    /// Whether [`Writer::write`] has anything to do now.
    fn write_due(&self) -> bool {
        self.has_work() && Instant::now() >= self.next_write_at
    }

    /// Whether anything built is not yet known durable.
    fn has_work(&self) -> bool {
        self.has_pending() || self.unsynced.is_some()
    }

    /// Settles the last write, then writes what is pending; at shutdown
    /// (`last`) settles that write too. A write is settled once a flush
    /// begun after it finished: usually the usage flusher's of the same
    /// tick, otherwise one of ours. Only then does it count as appended.
    /// On failure keeps everything for a retry after a backoff. May block
    /// on an fsync.
    fn write(&mut self, last: bool) {
        if !self.write_due() {
            return;
        }
        if let Err(e) = self.settle() {
            self.back_off(&e);
            return;
        }
        if self.has_pending() {
            if let Err(e) = self.store.write(&self.pending) {
                // Kept as built: the next write carries it, and what was
                // chained after it, in order.
                self.back_off(&e);
                return;
            }
            let batch = std::mem::take(&mut self.pending);
            self.unsynced = Some((batch, self.flushes.mark()));
        }
        if last && let Err(e) = self.settle() {
            self.back_off(&e);
            return;
        }
        self.retry_backoff = None;
        self.next_write_at = Instant::now() + self.config.flush_interval();
    }

    /// Counts the last write as appended once it is durable, flushing if
    /// no flush since has covered it.
    fn settle(&mut self) -> Result<(), StorageError> {
        let Some((_, mark)) = &self.unsynced else {
            return Ok(());
        };
        if !self.flushes.covers(*mark) {
            self.store.flush(&self.flushes)?;
        }
        if let Some((batch, _)) = self.unsynced.take() {
            self.count_appended(&batch);
        }
        Ok(())
    }

    fn count_appended(&self, batch: &WriteBatch) {
        let n = batch.records.len() as u64;
        self.stats.n_appended.fetch_add(n, Ordering::Relaxed);
        self.stats
            .n_recorded
            .fetch_add(batch.n_events, Ordering::Relaxed);
        if let Some((seq, _, _)) = batch.records.last() {
            self.stats.last_seq.store(*seq, Ordering::Relaxed);
        }
        if let Some(cp) = batch.checkpoints.last() {
            self.stats
                .n_checkpoints
                .fetch_add(batch.checkpoints.len() as u64, Ordering::Relaxed);
            self.stats
                .last_checkpoint_seq
                .store(cp.seq, Ordering::Relaxed);
        }
    }

    /// After a failed write or flush: counts it and waits longer each time
    /// before the next try.
    fn back_off(&mut self, e: &StorageError) {
        self.stats.n_write_errors.fetch_add(1, Ordering::Relaxed);
        let backoff = self
            .retry_backoff
            .map_or(Duration::from_millis(FIRST_RETRY_BACKOFF_MS), |b| {
                (b * 2).min(Duration::from_millis(MAX_RETRY_BACKOFF_MS))
            });
        if self.retry_backoff.is_none() {
            tracing::warn!(error = %e, "audit write failed; retrying");
        }
        self.retry_backoff = Some(backoff);
        self.next_write_at = Instant::now() + backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_built_on_the_idle_thread_until_the_queue_falls_behind()
    -> anyhow::Result<()> {
        let threads = AuditThreads::spawn(OnFull::Block)?;
        let capacity = 1024;
        assert!(!threads.falling_behind(0, capacity));
        assert!(!threads.falling_behind(255, capacity));
        // A quarter full: the write thread builds, until under a sixteenth.
        assert!(threads.falling_behind(256, capacity));
        assert!(threads.falling_behind(100, capacity));
        assert!(threads.falling_behind(65, capacity));
        assert!(!threads.falling_behind(64, capacity));
        assert!(!threads.falling_behind(100, capacity));
        Ok(())
    }

    /// The calling thread's scheduling policy and nice value.
    #[cfg(target_os = "linux")]
    fn class() -> (i32, i32) {
        // SAFETY: sched_getscheduler and getpriority read the calling
        // thread's scheduling and touch no memory of ours.
        unsafe {
            let tid = libc::id_t::try_from(libc::gettid()).unwrap_or(0);
            (
                libc::sched_getscheduler(0),
                libc::getpriority(libc::PRIO_PROCESS, tid),
            )
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_build_thread_runs_at_idle_priority_and_writes_at_idle_only_if_they_can_be_raised()
    -> anyhow::Result<()> {
        let base_nice = class().1;
        let threads = AuditThreads::spawn(OnFull::Block)?;
        assert_eq!(threads.build.run(class).await?.0, libc::SCHED_IDLE);
        let shed = AuditThreads::spawn(OnFull::Shed)?;
        let shed_nice = (base_nice + AUDIT_THREAD_NICE).min(19);
        if can_leave_idle() {
            assert!(threads.idle_writes);
            assert_eq!(
                threads.write.run(class).await?,
                (libc::SCHED_IDLE, base_nice)
            );
            assert_eq!(shed.write.run(class).await?, (libc::SCHED_IDLE, shed_nice));
        } else {
            assert!(!threads.idle_writes);
            assert_eq!(
                threads.write.run(class).await?,
                (libc::SCHED_BATCH, base_nice)
            );
            assert_eq!(shed.write.run(class).await?, (libc::SCHED_BATCH, shed_nice));
        }
        Ok(())
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_stalled_write_is_raised_to_batch_until_it_is_done() -> anyhow::Result<()> {
        if !can_leave_idle() {
            // Writes run under SCHED_BATCH from the start (tested above).
            return Ok(());
        }
        let threads = AuditThreads::spawn(OnFull::Block)?;
        // The job outlasts the stall bound, then reports the class it ran
        // in by then; it waits for the raise, so the outcome does not
        // depend on how fast this machine is.
        let seen = threads
            .write(|| {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let mut seen = class().0;
                while seen != libc::SCHED_BATCH && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                    seen = class().0;
                }
                seen
            })
            .await?;
        assert_eq!(seen, libc::SCHED_BATCH, "raised while it ran");
        assert_eq!(
            threads.write.run(class).await?.0,
            libc::SCHED_IDLE,
            "back to idle once done"
        );
        Ok(())
    }
}
