//! The usage gossip protocol, sans-I/O.
//!
//! [`Gossip`] decides what to send to whom; the node moves the bytes. Events
//! go in: the peer set ([`Gossip::set_peers`], from the Raft membership),
//! counter states this node has made durable ([`Gossip::publish`]), bytes
//! received from a peer ([`Gossip::on_message`]) and timer ticks
//! ([`Gossip::on_tick`]). Messages to send come out as [`Outgoing`].
//!
//! **What is sent.** Whole [`Counter`] states, never increments: merge is a
//! per-entry max, so a state received late, twice or out of order changes
//! nothing it should not (this sidesteps the op-ordering gap of op-based
//! maps, where an op older than the clock is silently dropped). Only states
//! handed to [`Gossip::publish`] are sent, and the node publishes a counter
//! only after writing it to disk, so whatever a peer holds for this node is
//! also on this node's disk: on restart, max(disk, peers) is disk, and
//! escrow rights this node gave away can never be given twice.
//!
//! **Deltas.** Every change marks the counter pending for every peer. Each
//! tick, up to `fanout` peers with pending counters get them, least recently
//! served first, peers in this node's region ahead of others. A peer acks
//! each delta, on the next delta it sends back or, failing one, in an ack of
//! its own at its next tick; a delta not acked within `ack_timeout_ms` is
//! pending again.
//! States received from a peer are relayed the same way, so news spreads
//! epidemically.
//!
//! **Anti-entropy.** Every `anti_entropy_ms`, one peer (in turn) gets a
//! digest: a 64-bit hash of every counter key and state, in key-hash ranges
//! that fit a message. The peer answers with its state of every counter
//! that differs or that the digest lacks, and pulls the ones it lacks.
//!
//! **Size.** No message exceeds `max_message_bytes`; larger batches are
//! split. Encoding is postcard (varints), decoding never panics.
//!
//! **Drain.** A node about to leave (removed from the membership, or
//! stopping) calls [`Gossip::begin_drain`]: every published counter becomes
//! pending for every peer again, and from then on each tick serves every
//! peer rather than `fanout` of them. [`Gossip::drain_progress`] says which
//! peers have acked this node's whole published state since, which are
//! behind, and which have not been heard from since the drain began; the
//! acks are the ordinary delta acks above. Call order: `begin_drain`, then
//! `on_tick` / `on_message_with` as usual, reading `drain_progress` after
//! each.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::counter::Counter;
use crate::hashing::FastState;
use crate::usage::{CounterKey, Usage, window_is_open};

/// Where received counter states go: the node's usage. The node may take a
/// lock per call, so digests, pulls and acks never hold it.
pub trait RemoteSink {
    /// Merges a peer's state of `key`. Returns false if the state was
    /// ignored (its window is over here): it is then neither kept nor relayed.
    fn merge(&mut self, key: &CounterKey, counter: &Counter) -> bool;
}

/// A [`RemoteSink`] over a `Usage` the caller already holds.
pub struct UsageSink<'a> {
    /// The usage state.
    pub usage: &'a mut Usage,
    /// The config (windows).
    pub config: &'a Config,
    /// Now, unix ms.
    pub now_ms: i64,
}

impl RemoteSink for UsageSink<'_> {
    fn merge(&mut self, key: &CounterKey, counter: &Counter) -> bool {
        if !window_is_open(self.config, self.now_ms, key) {
            return false;
        }
        self.usage
            .merge_remote(self.config, self.now_ms, key, counter);
        true
    }
}

/// Tuning of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipSettings {
    /// Tick interval (ms).
    pub interval_ms: u64,
    /// Peers sent deltas per tick.
    pub fanout: usize,
    /// Interval between digests (ms).
    pub anti_entropy_ms: u64,
    /// Largest message (bytes).
    pub max_message_bytes: usize,
    /// When an unacked delta counts as lost (ms).
    pub ack_timeout_ms: u64,
    /// Most delta messages to one peer per tick.
    pub max_messages_per_tick: usize,
}

impl Default for GossipSettings {
    fn default() -> Self {
        Self {
            interval_ms: 50,
            fanout: 2,
            anti_entropy_ms: 1_000,
            max_message_bytes: 1_100,
            ack_timeout_ms: 150,
            max_messages_per_tick: 16,
        }
    }
}

/// Most acks carried by one delta.
const MAX_ACKS_PER_MESSAGE: usize = 16;

/// A peer as the membership names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Node id.
    pub id: u64,
    /// Region label.
    pub region: String,
}

/// A gossip message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Counter states. `seq` 0 wants no ack.
    Delta {
        /// Sequence number to ack.
        seq: u64,
        /// Deltas of the receiver that arrived here (acks ride along).
        acks: Vec<u64>,
        /// The states.
        entries: Vec<(CounterKey, Counter)>,
    },
    /// Deltas that arrived, when no delta was going back to ride on.
    Ack {
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// (key hash, state hash) of every counter whose key hash is in [lo, hi].
    Digest {
        /// Range start (inclusive).
        lo: u64,
        /// Range end (inclusive).
        hi: u64,
        /// The hashes, sorted by key hash.
        entries: Vec<(u64, u64)>,
    },
    /// Send me these counters (by key hash).
    Pull {
        /// Key hashes.
        keys: Vec<u64>,
    },
}

/// Why bytes were not a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed gossip message: {0}")]
pub struct DecodeError(String);

/// Encodes a message.
pub fn encode(msg: &Message) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail.
    postcard::to_stdvec(msg).unwrap_or_default()
}

/// Decodes a message; never panics on hostile input.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    postcard::from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))
}

/// Bytes to send to one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The peer.
    pub to: u64,
    /// One encoded [`Message`].
    pub bytes: Vec<u8>,
}

/// FNV-1a, 64 bit: a stable hash every node computes alike.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The digest hash of a counter key.
pub fn key_hash(key: &CounterKey) -> u64 {
    fnv(&key.to_bytes())
}

/// The digest hash of a counter state (maps are ordered, so it is canonical).
pub fn state_hash(counter: &Counter) -> u64 {
    fnv(&postcard::to_stdvec(counter).unwrap_or_default())
}

#[derive(Clone, Debug)]
struct PeerState {
    region: String,
    // Counters to send, with when each first became pending.
    pending: BTreeMap<CounterKey, i64>,
    // Sent, unacked: seq -> (sent at, counters with their pending-since).
    in_flight: BTreeMap<u64, (i64, Vec<(CounterKey, i64)>)>,
    last_sent_ms: i64,
    last_heard_ms: Option<i64>,
    // Its deltas that arrived here and are not acked yet.
    acks_due: Vec<u64>,
    n_deltas_sent: u64,
    n_acked: u64,
    n_received: u64,
}

impl PeerState {
    fn new(region: String) -> Self {
        Self {
            region,
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            last_sent_ms: i64::MIN,
            last_heard_ms: None,
            acks_due: Vec::new(),
            n_deltas_sent: 0,
            n_acked: 0,
            n_received: 0,
        }
    }

    fn mark(&mut self, key: &CounterKey, since_ms: i64) {
        match self.pending.get_mut(key) {
            Some(t) => *t = (*t).min(since_ms),
            None => {
                self.pending.insert(key.clone(), since_ms);
            }
        }
    }

    /// Since when the peer has been missing a change (oldest pending or unacked).
    fn behind_since(&self) -> Option<i64> {
        let pending = self.pending.values().copied().min();
        let flying = self
            .in_flight
            .values()
            .flat_map(|(_, keys)| keys.iter().map(|(_, t)| *t))
            .min();
        match (pending, flying) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One peer as gossip sees it, for the status API.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerGossipStatus {
    /// Peer id.
    pub id: u64,
    /// Peer region.
    pub region: String,
    /// Milliseconds since anything arrived from the peer (`None`: never).
    pub last_heard_ms_ago: Option<i64>,
    /// How long the peer has been missing some of this node's state (0: up
    /// to date as far as acks tell).
    pub lag_ms: i64,
    /// Counters waiting to be sent to it.
    pub pending: usize,
    /// Deltas sent and not yet acked.
    pub in_flight: usize,
    /// Deltas sent.
    pub deltas_sent: u64,
    /// Deltas it acked.
    pub deltas_acked: u64,
    /// Messages received from it.
    pub messages_received: u64,
}

/// The gossip state machine of one node.
#[derive(Clone, Debug)]
pub struct Gossip {
    me: u64,
    region: String,
    settings: GossipSettings,
    published: HashMap<CounterKey, Counter, FastState>,
    // Key hash -> keys with that hash (collisions are possible, if rare).
    by_hash: BTreeMap<u64, Vec<CounterKey>>,
    peers: BTreeMap<u64, PeerState>,
    // Peers that should get a digest at the next tick (new peers, start-up).
    digest_due: BTreeSet<u64>,
    next_seq: u64,
    last_anti_entropy_ms: i64,
    anti_entropy_turn: usize,
    n_malformed: u64,
    n_oversize: u64,
    // When this node began draining (it is leaving the cluster).
    draining_since_ms: Option<i64>,
}

/// Where a drain stands: which peers hold everything this node published.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrainProgress {
    /// Peers that acked every published state since the drain began (or
    /// that there was nothing to send to).
    pub caught_up: Vec<u64>,
    /// Peers heard from since the drain began that still miss some state.
    pub behind: Vec<u64>,
    /// Peers not heard from since the drain began.
    pub silent: Vec<u64>,
}

impl DrainProgress {
    /// Whether the drain is done: at least one peer holds everything, and
    /// every other peer either holds everything too or has been silent for
    /// `grace_ms` or more since the drain began (`elapsed_ms` ago). A node
    /// without peers has nobody to drain to and is done at once.
    pub fn is_complete(&self, elapsed_ms: i64, grace_ms: i64) -> bool {
        if self.caught_up.is_empty() {
            return self.behind.is_empty() && self.silent.is_empty();
        }
        self.behind.is_empty() && (self.silent.is_empty() || elapsed_ms >= grace_ms)
    }
}

impl Gossip {
    /// A node's gossip state; `region` orders peers (same region first).
    /// `seq_start` (random) starts the delta numbering, so a late ack for a
    /// delta of this node's previous run does not clear a new one.
    pub fn new(
        me: u64,
        region: impl Into<String>,
        settings: GossipSettings,
        seq_start: u64,
    ) -> Self {
        Self {
            me,
            region: region.into(),
            settings,
            published: HashMap::default(),
            by_hash: BTreeMap::new(),
            peers: BTreeMap::new(),
            digest_due: BTreeSet::new(),
            next_seq: seq_start.max(1),
            last_anti_entropy_ms: i64::MIN,
            anti_entropy_turn: 0,
            n_malformed: 0,
            n_oversize: 0,
            draining_since_ms: None,
        }
    }

    /// Starts a drain (see the module doc): everything published becomes
    /// pending for every peer, and ticks serve every peer. Calling it again
    /// changes nothing.
    pub fn begin_drain(&mut self, now_ms: i64) {
        if self.draining_since_ms.is_some() {
            return;
        }
        self.draining_since_ms = Some(now_ms);
        for peer in self.peers.values_mut() {
            for key in self.published.keys() {
                peer.mark(key, now_ms);
            }
        }
    }

    /// When the drain began, if one did.
    pub fn draining_since_ms(&self) -> Option<i64> {
        self.draining_since_ms
    }

    /// Which peers hold this node's whole published state (nothing pending
    /// or in flight to them), and of the others, which were heard from
    /// since the drain began. Meaningful only after [`Self::begin_drain`];
    /// before, every peer counts as silent.
    pub fn drain_progress(&self) -> DrainProgress {
        let mut progress = DrainProgress::default();
        let Some(since) = self.draining_since_ms else {
            progress.silent = self.peers.keys().copied().collect();
            return progress;
        };
        for (id, peer) in &self.peers {
            // Nothing pending or in flight after `begin_drain` marked
            // everything pending means every state went out and was acked
            // (or there was nothing to send).
            if peer.pending.is_empty() && peer.in_flight.is_empty() {
                progress.caught_up.push(*id);
            } else if peer.last_heard_ms.is_some_and(|t| t >= since) {
                progress.behind.push(*id);
            } else {
                progress.silent.push(*id);
            }
        }
        progress
    }

    /// The settings.
    pub fn settings(&self) -> &GossipSettings {
        &self.settings
    }

    /// Replaces the peer set (this node is ignored if listed). A new peer
    /// gets everything published so far, and a digest to pull what it has.
    pub fn set_peers(&mut self, peers: &[PeerInfo], now_ms: i64) {
        let wanted: BTreeMap<u64, &PeerInfo> = peers
            .iter()
            .filter(|p| p.id != self.me)
            .map(|p| (p.id, p))
            .collect();
        self.peers.retain(|id, _| wanted.contains_key(id));
        self.digest_due.retain(|id| wanted.contains_key(id));
        for (id, info) in wanted {
            match self.peers.get_mut(&id) {
                Some(p) => p.region = info.region.clone(),
                None => {
                    let mut state = PeerState::new(info.region.clone());
                    for key in self.published.keys() {
                        state.mark(key, now_ms);
                    }
                    self.peers.insert(id, state);
                    self.digest_due.insert(id);
                }
            }
        }
    }

    /// Peer ids.
    pub fn peer_ids(&self) -> Vec<u64> {
        self.peers.keys().copied().collect()
    }

    /// Makes counter states eligible to send (call after they are durable).
    /// Returns the keys whose published state changed.
    pub fn publish(
        &mut self,
        entries: impl IntoIterator<Item = (CounterKey, Counter)>,
        now_ms: i64,
    ) -> Vec<CounterKey> {
        let mut changed = Vec::new();
        for (key, counter) in entries {
            if self.merge_published(&key, &counter) {
                for peer in self.peers.values_mut() {
                    peer.mark(&key, now_ms);
                }
                changed.push(key);
            }
        }
        changed
    }

    fn merge_published(&mut self, key: &CounterKey, counter: &Counter) -> bool {
        match self.published.get_mut(key) {
            Some(c) => c.merge(counter),
            None => {
                self.published.insert(key.clone(), counter.clone());
                self.by_hash
                    .entry(key_hash(key))
                    .or_default()
                    .push(key.clone());
                true
            }
        }
    }

    /// Published keys whose hash is in `range`.
    fn keys_in(&self, range: std::ops::RangeInclusive<u64>) -> impl Iterator<Item = &CounterKey> {
        self.by_hash.range(range).flat_map(|(_, keys)| keys.iter())
    }

    /// Stops gossiping these counters (garbage-collected windows).
    pub fn forget(&mut self, keys: &[CounterKey]) {
        for key in keys {
            self.published.remove(key);
            let h = key_hash(key);
            if let Some(list) = self.by_hash.get_mut(&h) {
                list.retain(|k| k != key);
                if list.is_empty() {
                    self.by_hash.remove(&h);
                }
            }
            for peer in self.peers.values_mut() {
                peer.pending.remove(key);
            }
        }
    }

    /// Sends the published state of `keys` to every peer now, outside the
    /// tick (a counter close to its limit, where a tick of lag is overshoot).
    pub fn push_now(&mut self, keys: &[CounterKey], now_ms: i64) -> Vec<Outgoing> {
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        let mut out = Vec::new();
        for id in ids {
            let keys: Vec<CounterKey> = keys
                .iter()
                .filter(|k| self.published.contains_key(*k))
                .cloned()
                .collect();
            let keys: Vec<(CounterKey, i64)> = match self.peers.get_mut(&id) {
                Some(peer) => keys
                    .into_iter()
                    .map(|k| {
                        let since = peer.pending.remove(&k).unwrap_or(now_ms);
                        (k, since)
                    })
                    .collect(),
                None => continue,
            };
            self.send_deltas(id, keys, now_ms, usize::MAX, &mut out);
        }
        out
    }

    /// Handles bytes from peer `from` with the node's usage already in hand
    /// (see [`Self::on_message_with`]).
    pub fn on_message(
        &mut self,
        from: u64,
        bytes: &[u8],
        now_ms: i64,
        usage: &mut Usage,
        config: &Config,
    ) -> Vec<Outgoing> {
        let mut sink = UsageSink {
            usage,
            config,
            now_ms,
        };
        self.on_message_with(from, bytes, now_ms, &mut sink)
    }

    /// Handles bytes from peer `from`: merges states into `sink` (which
    /// ignores windows that are over) and into what this node relays, and
    /// returns acks and answers. Malformed bytes are counted and dropped.
    pub fn on_message_with(
        &mut self,
        from: u64,
        bytes: &[u8],
        now_ms: i64,
        sink: &mut dyn RemoteSink,
    ) -> Vec<Outgoing> {
        let msg = match decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.n_malformed += 1;
                return Vec::new();
            }
        };
        let timeout = i64::try_from(self.settings.ack_timeout_ms).unwrap_or(i64::MAX);
        if let Some(peer) = self.peers.get_mut(&from) {
            // A peer heard again after a silence (a heal, a restart): what
            // is in flight to it was surely lost, so it is pending again at
            // once, and it gets a digest to pull what it missed.
            let silent = peer
                .last_heard_ms
                .is_none_or(|t| now_ms.saturating_sub(t) > timeout);
            if silent {
                for (_, keys) in std::mem::take(&mut peer.in_flight).into_values() {
                    for (key, t) in keys {
                        peer.mark(&key, t);
                    }
                }
                self.digest_due.insert(from);
            }
            peer.last_heard_ms = Some(now_ms);
            peer.n_received += 1;
        }
        let mut out = Vec::new();
        match msg {
            Message::Delta { seq, acks, entries } => {
                self.acked(from, &acks);
                for (key, counter) in entries {
                    if !sink.merge(&key, &counter) {
                        // A window that is over here: neither kept nor relayed.
                        continue;
                    }
                    if self.merge_published(&key, &counter) {
                        let ours_differs = self.published.get(&key) != Some(&counter);
                        for (id, peer) in self.peers.iter_mut() {
                            if *id != from || ours_differs {
                                peer.mark(&key, now_ms);
                            }
                        }
                    } else if self.published.get(&key) != Some(&counter)
                        && let Some(peer) = self.peers.get_mut(&from)
                    {
                        // The sender is behind us on this counter.
                        peer.mark(&key, now_ms);
                    }
                }
                if seq != 0 {
                    match self.peers.get_mut(&from) {
                        // Acked with the next message to it, at the latest
                        // at the next tick.
                        Some(peer) => peer.acks_due.push(seq),
                        None => out.push(Outgoing {
                            to: from,
                            bytes: encode(&Message::Ack { seqs: vec![seq] }),
                        }),
                    }
                }
            }
            Message::Ack { seqs } => self.acked(from, &seqs),
            Message::Digest { lo, hi, entries } => {
                if lo > hi {
                    return out;
                }
                let theirs: HashMap<u64, u64> = entries.into_iter().collect();
                let mut send = Vec::new();
                let mut pull = Vec::new();
                for key in self.keys_in(lo..=hi) {
                    let Some(counter) = self.published.get(key) else {
                        continue;
                    };
                    let kh = key_hash(key);
                    match theirs.get(&kh) {
                        Some(sh) if *sh == state_hash(counter) => {}
                        Some(_) => {
                            // Either side may be ahead: send ours, pull theirs.
                            send.push((key.clone(), now_ms));
                            pull.push(kh);
                        }
                        None => send.push((key.clone(), now_ms)),
                    }
                }
                pull.extend(
                    theirs
                        .keys()
                        .filter(|kh| (lo..=hi).contains(*kh) && !self.by_hash.contains_key(*kh)),
                );
                pull.sort_unstable();
                pull.dedup();
                send.sort();
                self.send_deltas(from, send, now_ms, usize::MAX, &mut out);
                self.send_pulls(from, pull, &mut out);
            }
            Message::Pull { keys } => {
                let mut send: Vec<(CounterKey, i64)> = Vec::new();
                for kh in keys {
                    if let Some(list) = self.by_hash.get(&kh) {
                        send.extend(list.iter().map(|k| (k.clone(), now_ms)));
                    }
                }
                send.sort();
                send.dedup();
                self.send_deltas(from, send, now_ms, usize::MAX, &mut out);
            }
        }
        out
    }

    fn acked(&mut self, from: u64, seqs: &[u64]) {
        if let Some(peer) = self.peers.get_mut(&from) {
            for seq in seqs {
                if peer.in_flight.remove(seq).is_some() {
                    peer.n_acked += 1;
                }
            }
        }
    }

    fn send_pulls(&self, to: u64, keys: Vec<u64>, out: &mut Vec<Outgoing>) {
        // A varint hash is at most 10 bytes.
        let per_message = (self.settings.max_message_bytes.saturating_sub(16) / 10).max(1);
        for chunk in keys.chunks(per_message) {
            out.push(Outgoing {
                to,
                bytes: encode(&Message::Pull {
                    keys: chunk.to_vec(),
                }),
            });
        }
    }

    /// Packs `keys`' published states into deltas to `to`, acked and
    /// tracked; keys that do not fit in `max_messages` go back to pending.
    fn send_deltas(
        &mut self,
        to: u64,
        keys: Vec<(CounterKey, i64)>,
        now_ms: i64,
        max_messages: usize,
        out: &mut Vec<Outgoing>,
    ) {
        // Header, and the acks that may ride along (at most 10 bytes each).
        let budget = self
            .settings
            .max_message_bytes
            .saturating_sub(16 + 10 * MAX_ACKS_PER_MESSAGE);
        let mut batch: Vec<(CounterKey, Counter)> = Vec::new();
        let mut since: Vec<(CounterKey, i64)> = Vec::new();
        let mut size = 0usize;
        let mut n_messages = 0usize;
        let mut leftover = Vec::new();
        for (key, t) in keys {
            let Some(counter) = self.published.get(&key) else {
                continue;
            };
            if n_messages >= max_messages {
                leftover.push((key, t));
                continue;
            }
            let entry = (key, counter.clone());
            let len = postcard::to_stdvec(&entry).map_or(usize::MAX, |b| b.len());
            if len > budget {
                // Fits no message; counted nowhere else, so say so in status.
                self.n_oversize += 1;
                continue;
            }
            if size + len > budget && !batch.is_empty() {
                let full = std::mem::take(&mut batch);
                self.emit_delta(to, full, std::mem::take(&mut since), now_ms, out);
                n_messages += 1;
                size = 0;
                if n_messages >= max_messages {
                    leftover.push((entry.0, t));
                    continue;
                }
            }
            size += len;
            since.push((entry.0.clone(), t));
            batch.push(entry);
        }
        if !batch.is_empty() {
            self.emit_delta(to, batch, since, now_ms, out);
        }
        if let Some(peer) = self.peers.get_mut(&to) {
            for (key, t) in leftover {
                peer.mark(&key, t);
            }
        }
    }

    fn emit_delta(
        &mut self,
        to: u64,
        entries: Vec<(CounterKey, Counter)>,
        since: Vec<(CounterKey, i64)>,
        now_ms: i64,
        out: &mut Vec<Outgoing>,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let acks = self
            .peers
            .get_mut(&to)
            .map(|p| {
                let n = p.acks_due.len().min(MAX_ACKS_PER_MESSAGE);
                p.acks_due.drain(..n).collect()
            })
            .unwrap_or_default();
        out.push(Outgoing {
            to,
            bytes: encode(&Message::Delta { seq, acks, entries }),
        });
        if let Some(peer) = self.peers.get_mut(&to) {
            peer.in_flight.insert(seq, (now_ms, since));
            peer.last_sent_ms = now_ms;
            peer.n_deltas_sent += 1;
        }
    }

    /// One timer tick: lost deltas become pending again, up to `fanout`
    /// peers get their pending counters, and digests go out when due.
    /// `random` picks where the anti-entropy turn starts (pass any value;
    /// determinism in tests comes from passing a fixed one).
    pub fn on_tick(&mut self, now_ms: i64, random: u64) -> Vec<Outgoing> {
        let timeout = i64::try_from(self.settings.ack_timeout_ms).unwrap_or(i64::MAX);
        for peer in self.peers.values_mut() {
            let lost: Vec<u64> = peer
                .in_flight
                .iter()
                .filter(|(_, (sent, _))| now_ms.saturating_sub(*sent) >= timeout)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in lost {
                if let Some((_, keys)) = peer.in_flight.remove(&seq) {
                    for (key, t) in keys {
                        peer.mark(&key, t);
                    }
                }
            }
        }
        // Least recently served first; a peer in another region counts as
        // served `interval` later, so same-region peers come first on ties.
        let interval = i64::try_from(self.settings.interval_ms).unwrap_or(0);
        let mut candidates: Vec<(i64, u64)> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.pending.is_empty())
            .map(|(id, p)| {
                let penalty = if p.region == self.region { 0 } else { interval };
                (p.last_sent_ms.saturating_add(penalty), *id)
            })
            .collect();
        candidates.sort_unstable();
        let mut out = Vec::new();
        // A draining node hands its state to every peer at once: it is
        // about to leave and cannot wait for epidemic spread.
        let fanout = if self.draining_since_ms.is_some() {
            usize::MAX
        } else {
            self.settings.fanout
        };
        for (_, id) in candidates.into_iter().take(fanout) {
            let keys: Vec<(CounterKey, i64)> = match self.peers.get_mut(&id) {
                Some(p) => std::mem::take(&mut p.pending).into_iter().collect(),
                None => continue,
            };
            self.send_deltas(
                id,
                keys,
                now_ms,
                self.settings.max_messages_per_tick,
                &mut out,
            );
        }
        let ae = i64::try_from(self.settings.anti_entropy_ms).unwrap_or(i64::MAX);
        if !self.peers.is_empty() && now_ms.saturating_sub(self.last_anti_entropy_ms) >= ae {
            self.last_anti_entropy_ms = now_ms;
            let ids: Vec<u64> = self.peers.keys().copied().collect();
            let turn = self
                .anti_entropy_turn
                .wrapping_add(usize::try_from(random % 2).unwrap_or(0));
            self.anti_entropy_turn = turn.wrapping_add(1);
            self.digest_due.insert(ids[turn % ids.len()]);
        }
        for id in std::mem::take(&mut self.digest_due) {
            self.send_digest(id, &mut out);
        }
        // Acks that found no delta to ride on go alone.
        for (id, peer) in self.peers.iter_mut() {
            for chunk in peer.acks_due.chunks(MAX_ACKS_PER_MESSAGE * 4) {
                out.push(Outgoing {
                    to: *id,
                    bytes: encode(&Message::Ack {
                        seqs: chunk.to_vec(),
                    }),
                });
            }
            peer.acks_due.clear();
        }
        out
    }

    fn send_digest(&self, to: u64, out: &mut Vec<Outgoing>) {
        let mut hashes: Vec<(u64, u64)> = self
            .published
            .iter()
            .map(|(k, c)| (key_hash(k), state_hash(c)))
            .collect();
        hashes.sort_unstable();
        // Two varint u64s are at most 20 bytes.
        let per_message = (self.settings.max_message_bytes.saturating_sub(32) / 20).max(1);
        if hashes.is_empty() {
            out.push(Outgoing {
                to,
                bytes: encode(&Message::Digest {
                    lo: 0,
                    hi: u64::MAX,
                    entries: Vec::new(),
                }),
            });
            return;
        }
        let chunks: Vec<&[(u64, u64)]> = hashes.chunks(per_message).collect();
        let n = chunks.len();
        let mut lo = 0u64;
        for (idx, chunk) in chunks.into_iter().enumerate() {
            let hi = if idx + 1 == n {
                u64::MAX
            } else {
                chunk.last().map_or(u64::MAX, |(kh, _)| *kh)
            };
            out.push(Outgoing {
                to,
                bytes: encode(&Message::Digest {
                    lo,
                    hi,
                    entries: chunk.to_vec(),
                }),
            });
            lo = hi.saturating_add(1);
        }
    }

    /// Every peer's standing.
    pub fn status(&self, now_ms: i64) -> Vec<PeerGossipStatus> {
        self.peers
            .iter()
            .map(|(id, p)| PeerGossipStatus {
                id: *id,
                region: p.region.clone(),
                last_heard_ms_ago: p.last_heard_ms.map(|t| now_ms.saturating_sub(t)),
                lag_ms: p
                    .behind_since()
                    .map_or(0, |t| now_ms.saturating_sub(t).max(0)),
                pending: p.pending.len(),
                in_flight: p.in_flight.len(),
                deltas_sent: p.n_deltas_sent,
                deltas_acked: p.n_acked,
                messages_received: p.n_received,
            })
            .collect()
    }

    /// Messages that did not decode.
    pub fn n_malformed(&self) -> u64 {
        self.n_malformed
    }

    /// Counter states too large for any message (not gossiped).
    pub fn n_oversize(&self) -> u64 {
        self.n_oversize
    }

    /// Counters this node gossips.
    pub fn n_published(&self) -> usize {
        self.published.len()
    }
}
