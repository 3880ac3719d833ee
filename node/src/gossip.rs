//! Usage gossip over QUIC, and the loop that owns usage I/O.
//!
//! One task per node ([`run`]) drives everything that moves usage in or
//! out: batched flushes to disk, the sans-I/O gossip state machine
//! (`tollgate_quota::gossip`), escrow rebalancing, seat expiry and window
//! GC. Running them on one task gives the ordering escrow safety needs: a
//! counter state is handed to gossip only after the flush that wrote it
//! completed, so no peer ever holds a transfer of rights (or usage of this
//! node) that this node's disk lacks.
//!
//! The peer set and addresses come from the Raft membership; bytes move over
//! `quic` (mutual TLS from the cluster CA).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tollgate_consensus::storage::Storage;
use tollgate_quota::counter::Counter;
use tollgate_quota::escrow::RebalancePolicy;
use tollgate_quota::gossip::{
    Gossip, GossipSettings, Outgoing, PeerGossipStatus, PeerInfo, RemoteSink,
};
use tollgate_quota::usage::{CounterKey, NEAR_LIMIT_DIVISOR, window_is_open};

use crate::persist::{self, UsageTrees};
use crate::quic::{Inbound, PeerStats, QuicTransport};
use crate::state::NodeState;

/// How often soft counters near their limit are pushed from memory.
pub const HOT_PUSH_INTERVAL_MS: u64 = 2;

/// How often expired window epochs are dropped.
pub const GC_INTERVAL_MS: u64 = 60_000;

/// Default of `gossip.drain_timeout_ms`.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 5_000;

/// During a drain the protocol ticks at least this often, whatever
/// `gossip.interval_ms` says: a leaving node sends what is pending at once.
pub const DRAIN_TICK_MS: u64 = 10;

/// During a drain, a peer not heard from at all is given up on after this
/// many ack timeouts, once another peer holds everything: it is down or cut
/// off, and waiting for it would only delay leaving.
pub const DRAIN_SILENT_GRACE_ACK_TIMEOUTS: u64 = 4;

/// Gossip settings as the node's settings file spells them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// Delta propagation interval (ms).
    pub interval_ms: u64,
    /// Peers per tick.
    pub fanout: usize,
    /// Digest (anti-entropy) interval (ms).
    pub anti_entropy_ms: u64,
    /// How long a leaving node (removed, or shutting down) waits for its
    /// peers to ack its whole usage before it gives up and reports a
    /// timed-out drain (ms). 0: no drain; the node leaves at once.
    pub drain_timeout_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        let d = GossipSettings::default();
        Self {
            interval_ms: d.interval_ms,
            fanout: d.fanout,
            anti_entropy_ms: d.anti_entropy_ms,
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
        }
    }
}

impl GossipConfig {
    /// The protocol settings.
    pub fn protocol(&self) -> GossipSettings {
        GossipSettings {
            interval_ms: self.interval_ms.max(1),
            fanout: self.fanout.max(1),
            anti_entropy_ms: self.anti_entropy_ms.max(self.interval_ms).max(1),
            // Three ticks without an ack: lost.
            ack_timeout_ms: self.interval_ms.max(1) * 3,
            ..GossipSettings::default()
        }
    }
}

/// The gossip side of one node: protocol state, transport, peer addresses.
pub struct GossipNode {
    protocol: Mutex<Gossip>,
    transport: QuicTransport,
    peers: Mutex<Vec<(u64, SocketAddr)>>,
    fault_injection: bool,
    n_send_errors: std::sync::atomic::AtomicU64,
    drain_timeout_ms: u64,
}

impl GossipNode {
    /// Wraps a bound transport.
    pub fn new(
        node_id: u64,
        region: &str,
        config: &GossipConfig,
        transport: QuicTransport,
        fault_injection: bool,
    ) -> Self {
        Self {
            protocol: Mutex::new(Gossip::new(
                node_id,
                region,
                config.protocol(),
                // Small (a 5-byte varint), yet unlikely to repeat a
                // previous run's numbers.
                u64::from(tollgate_consensus::runtime::random_u64() as u32),
            )),
            transport,
            peers: Mutex::new(Vec::new()),
            fault_injection,
            n_send_errors: std::sync::atomic::AtomicU64::new(0),
            drain_timeout_ms: config.drain_timeout_ms,
        }
    }

    /// How long a drain may take (ms); 0: no drain.
    pub fn drain_timeout_ms(&self) -> u64 {
        self.drain_timeout_ms
    }

    /// Where gossip listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }

    /// Whether the node was started with `--enable-fault-injection`.
    pub fn fault_injection(&self) -> bool {
        self.fault_injection
    }

    /// Drops all gossip to and from `peers` (empty: heal). Test hook.
    pub fn set_dropped(&self, peers: BTreeSet<u64>) {
        self.transport.set_dropped(peers);
    }

    /// The peers traffic is dropped for.
    pub fn dropped(&self) -> BTreeSet<u64> {
        self.transport.dropped()
    }

    fn send(&self, out: Vec<Outgoing>) {
        if out.is_empty() {
            return;
        }
        let peers = self.peers.lock().clone();
        for msg in out {
            let sent = match peers.iter().find(|(id, _)| *id == msg.to) {
                Some((_, addr)) => self.transport.send(msg.to, *addr, Bytes::from(msg.bytes)),
                // Not a member (any more): a node that was removed and is
                // draining its usage to us. Its acks go back on the
                // connection it opened; nothing is dialled for it.
                None => self.transport.reply(msg.to, Bytes::from(msg.bytes)),
            };
            // A message that cannot go now is not retried here: the
            // protocol resends what is not acked.
            if sent.is_err() {
                self.n_send_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Updates the peer set from the Raft membership; true if it changed.
    fn refresh_peers(&self, state: &NodeState, now: i64) -> bool {
        let mut infos = Vec::new();
        let mut addrs = Vec::new();
        let mut ids = Vec::new();
        for m in state.consensus.members() {
            ids.push(m.id);
            if m.id == state.node_id {
                continue;
            }
            // Members recorded before gossip existed have no gossip
            // address: they listen on the default, the gRPC port + 200.
            let addr = match m.info.gossip_addr.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => match m.info.grpc_addr.parse::<SocketAddr>() {
                    Ok(g) => crate::settings::default_gossip_addr(g),
                    Err(_) => continue,
                },
            };
            infos.push(PeerInfo {
                id: m.id,
                region: m.info.region.clone(),
            });
            addrs.push((m.id, addr));
        }
        addrs.sort_unstable();
        let changed = *self.peers.lock() != addrs;
        if changed {
            *self.peers.lock() = addrs;
            self.protocol.lock().set_peers(&infos, now);
            state.with_usage(|u| u.set_members(&ids));
        }
        changed
    }

    /// Each peer's gossip lag (ms): how long it has been missing some of
    /// this node's state.
    pub fn peer_lags(&self, now: i64) -> Vec<(u64, i64)> {
        self.protocol
            .lock()
            .status(now)
            .into_iter()
            .map(|p| (p.id, p.lag_ms))
            .collect()
    }

    /// Gossip figures for status, metrics and the dashboard.
    pub fn figures(&self, now: i64) -> GossipFigures {
        let (peers, malformed, oversize, published) = {
            let p = self.protocol.lock();
            (
                p.status(now),
                p.n_malformed(),
                p.n_oversize(),
                p.n_published(),
            )
        };
        GossipFigures {
            peers,
            wire: self.transport.stats(),
            malformed_messages: malformed,
            oversize_counters: oversize,
            published_counters: published,
            send_errors: self
                .n_send_errors
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Gossip figures for the status API.
    pub fn status_json(&self, now: i64) -> serde_json::Value {
        let f = self.figures(now);
        let mut bytes_sent = 0u64;
        let mut bytes_received = 0u64;
        let peers: Vec<serde_json::Value> = f
            .peers
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                if let Some(w) = f.wire_of(p.id) {
                    bytes_sent += w.bytes_sent;
                    bytes_received += w.bytes_received;
                    if let (Some(obj), Ok(serde_json::Value::Object(w))) =
                        (v.as_object_mut(), serde_json::to_value(w))
                    {
                        for (k, val) in w {
                            obj.entry(k).or_insert(val);
                        }
                    }
                }
                v
            })
            .collect();
        serde_json::json!({
            "listen_addr": self.local_addr().to_string(),
            "peers": peers,
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
            "counters": f.published_counters,
            "malformed_messages": f.malformed_messages,
            "oversize_counters": f.oversize_counters,
            "send_errors": f.send_errors,
            "fault_injection": self.fault_injection,
            "dropped_peers": self.dropped(),
        })
    }
}

/// One reading of this node's gossip: protocol and wire figures per peer,
/// and totals.
#[derive(Clone, Debug)]
pub struct GossipFigures {
    /// Per peer, from the protocol: last heard, lag, pending, in flight.
    pub peers: Vec<PeerGossipStatus>,
    /// Per peer, from the transport: connection and bytes on the wire.
    pub wire: Vec<PeerStats>,
    /// Messages that did not decode.
    pub malformed_messages: u64,
    /// Counter states too large for any message.
    pub oversize_counters: u64,
    /// Counters this node gossips.
    pub published_counters: usize,
    /// Messages that could not be handed to the transport.
    pub send_errors: u64,
}

impl GossipFigures {
    /// The wire figures of peer `id`.
    pub fn wire_of(&self, id: u64) -> Option<&PeerStats> {
        self.wire.iter().find(|w| w.id == id)
    }

    /// The largest lag of any peer (ms).
    pub fn max_lag_ms(&self) -> i64 {
        self.peers.iter().map(|p| p.lag_ms).max().unwrap_or(0)
    }
}

/// Merges received states into the node's usage, taking the usage lock per
/// state: digests, pulls and acks never touch it, and a big delta does not
/// hold up Checks for its whole length.
struct NodeSink<'a> {
    state: &'a NodeState,
    config: Arc<tollgate_quota::config::Config>,
    now_ms: i64,
}

impl RemoteSink for NodeSink<'_> {
    fn merge(&mut self, key: &CounterKey, counter: &Counter) -> bool {
        if !window_is_open(&self.config, self.now_ms, key) {
            return false;
        }
        self.state
            .with_usage(|u| u.merge_remote(&self.config, self.now_ms, key, counter));
        true
    }
}

/// Counters within `limit / NEAR_LIMIT_DIVISOR` of their limit: gossiped
/// right after each flush, to every peer, instead of on the next tick; near
/// the limit, a tick of lag is overshoot.
fn near_limit(state: &NodeState, keys: &[CounterKey]) -> Vec<CounterKey> {
    let config = state.config();
    let now = state.now_ms();
    state.with_usage(|u| {
        keys.iter()
            .filter(|k| {
                let Some(limit) = config.license(&k.license).and_then(|l| {
                    l.quotas
                        .iter()
                        .find(|q| q.id == k.quota)
                        .map(|q| config.quota_limit(&l.id, q, now))
                        .or_else(|| {
                            (k.quota == tollgate_quota::usage::SEATS_QUOTA)
                                .then_some(u64::from(l.max_instances))
                        })
                }) else {
                    return false;
                };
                let used = u.counter_value(k);
                let margin = limit.div_ceil(NEAR_LIMIT_DIVISOR).max(1);
                limit.saturating_sub(used) <= margin
            })
            .cloned()
            .collect()
    })
}

/// Flushes usage to disk, then hands what was written to gossip. Counters
/// near their limit go to every peer at once, and soft ones among them
/// become `hot`.
async fn flush_and_publish(
    state: &NodeState,
    gossip: &GossipNode,
    trees: &UsageTrees,
    hot: &mut BTreeSet<CounterKey>,
) {
    match persist::flush(state, trees).await {
        Ok(written) if !written.is_empty() => {
            let now = state.now_ms();
            let soft: BTreeSet<CounterKey> = written
                .iter()
                .filter(|(_, c)| !c.is_escrow())
                .map(|(k, _)| k.clone())
                .collect();
            let changed = gossip.protocol.lock().publish(written, now);
            let eager = near_limit(state, &changed);
            if !eager.is_empty() {
                hot.extend(eager.iter().filter(|k| soft.contains(*k)).cloned());
                let out = gossip.protocol.lock().push_now(&eager, now);
                gossip.send(out);
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "usage flush failed; will retry"),
    }
}

/// Pushes the hot soft counters that changed since their last push to every
/// peer, from memory: near a soft limit the lag between nodes is overshoot.
/// (A soft counter needs no flush first; only escrow transfers do.)
fn push_hot(state: &NodeState, gossip: &GossipNode, hot: &mut BTreeSet<CounterKey>) {
    let keys: Vec<CounterKey> = hot.iter().cloned().collect();
    let fresh = state.with_usage(|u| {
        hot.retain(|k| u.counter(k).is_some());
        u.take_unsynced_soft(&keys)
    });
    if fresh.is_empty() {
        return;
    }
    let now = state.now_ms();
    let changed: Vec<CounterKey> = fresh.iter().map(|(k, _)| k.clone()).collect();
    let mut protocol = gossip.protocol.lock();
    protocol.publish(fresh, now);
    let out = protocol.push_now(&changed, now);
    drop(protocol);
    gossip.send(out);
}

/// A drain under way in the gossip loop.
struct Draining {
    deadline: tokio::time::Instant,
    started_ms: i64,
    grace_ms: i64,
}

/// Starts handing this node's usage to its peers: flushes what was
/// accepted (the hot path refuses usage from now on, see `drain`),
/// re-publishes everything to every peer and sends at once. With a zero
/// timeout there is no drain: it is reported over at once.
async fn begin_drain(
    state: &NodeState,
    gossip: &GossipNode,
    trees: &UsageTrees,
    hot: &mut BTreeSet<CounterKey>,
) -> Option<Draining> {
    let now = state.now_ms();
    if gossip.drain_timeout_ms == 0 {
        tracing::warn!("leaving without a drain (gossip.drain_timeout_ms is 0)");
        state
            .drain
            .finish(true, gossip.protocol.lock().drain_progress(), now);
        return None;
    }
    flush_and_publish(state, gossip, trees, hot).await;
    let now = state.now_ms();
    // The peers as the membership names them now, not at the last tick.
    gossip.refresh_peers(state, now);
    let random = tollgate_consensus::runtime::random_u64();
    let (out, peers, ack_timeout_ms) = {
        let mut protocol = gossip.protocol.lock();
        protocol.begin_drain(now);
        let out = protocol.on_tick(now, random);
        (out, protocol.peer_ids(), protocol.settings().ack_timeout_ms)
    };
    gossip.send(out);
    tracing::info!(
        reason = ?state.drain.reason(),
        ?peers,
        timeout_ms = gossip.drain_timeout_ms,
        "draining: handing this node's usage to its peers"
    );
    Some(Draining {
        deadline: tokio::time::Instant::now() + Duration::from_millis(gossip.drain_timeout_ms),
        started_ms: now,
        grace_ms: i64::try_from(ack_timeout_ms.saturating_mul(DRAIN_SILENT_GRACE_ACK_TIMEOUTS))
            .unwrap_or(i64::MAX),
    })
}

/// Ends the drain if every live peer acked everything this node counted,
/// or if its deadline passed. Returns whether it ended.
async fn poll_drain(
    state: &NodeState,
    gossip: &GossipNode,
    trees: &UsageTrees,
    hot: &mut BTreeSet<CounterKey>,
    drain: &Draining,
) -> bool {
    // Usage accepted just before the drain began, or a seat released
    // since: on disk and published before it counts as handed over.
    if state.usage_unflushed() {
        flush_and_publish(state, gossip, trees, hot).await;
    }
    let now = state.now_ms();
    let progress = gossip.protocol.lock().drain_progress();
    let elapsed_ms = now.saturating_sub(drain.started_ms);
    let complete = !state.usage_unflushed() && progress.is_complete(elapsed_ms, drain.grace_ms);
    if complete {
        tracing::info!(
            elapsed_ms,
            caught_up = ?progress.caught_up,
            silent = ?progress.silent,
            "drained: peers hold all of this node's usage"
        );
        state.drain.finish(true, progress, now);
        return true;
    }
    if tokio::time::Instant::now() >= drain.deadline {
        tracing::warn!(
            elapsed_ms,
            caught_up = ?progress.caught_up,
            behind = ?progress.behind,
            silent = ?progress.silent,
            unflushed = state.usage_unflushed(),
            "drain timed out: some usage may exist only on this node"
        );
        state.drain.finish(false, progress, now);
        return true;
    }
    false
}

/// Runs flushes, gossip, rebalancing, seat expiry and GC until `shutdown`
/// flips, then flushes once more. When the node's drain begins, hands its
/// usage to its peers and reports the outcome (see `crate::drain`).
pub async fn run(
    state: Arc<NodeState>,
    gossip: Arc<GossipNode>,
    mut inbound: mpsc::Receiver<Inbound>,
    storage: Arc<dyn Storage>,
    flush_interval_ms: u64,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let trees = UsageTrees::open(storage.as_ref())?;
    let interval_ms = gossip.protocol.lock().settings().interval_ms;
    state.with_usage(|u| u.set_rights_retry_ms(interval_ms * 2));
    // Everything already on disk may be gossiped; peers get it, and their
    // digests bring back what they hold for this node.
    let now = state.now_ms();
    let stored: Vec<_> =
        state.with_usage(|u| u.counters().map(|(k, c)| (k.clone(), c.clone())).collect());
    gossip.protocol.lock().publish(stored, now);
    gossip.refresh_peers(&state, now);

    let tick = |ms: u64| {
        let mut t = tokio::time::interval(Duration::from_millis(ms.max(1)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut flush_tick = tick(flush_interval_ms);
    let mut hot_tick = tick(HOT_PUSH_INTERVAL_MS);
    let mut hot: BTreeSet<CounterKey> = BTreeSet::new();
    let mut gossip_tick = tick(interval_ms);
    // Not at start: the config may still be catching up with the log.
    let mut gc_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(GC_INTERVAL_MS),
        Duration::from_millis(GC_INTERVAL_MS),
    );
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let policy = RebalancePolicy::default();
    let mut drain_tick = tick(interval_ms.min(DRAIN_TICK_MS));
    let mut drain_phase = state.drain.subscribe();
    let mut drain_started = false;
    let mut draining: Option<Draining> = None;
    loop {
        // A drain that began before this loop started is seen at once.
        if !drain_started && !state.drain.accepts_usage() {
            drain_started = true;
            draining = begin_drain(&state, &gossip, &trees, &mut hot).await;
            // A node without peers is done at once.
            if let Some(d) = &draining
                && poll_drain(&state, &gossip, &trees, &mut hot, d).await
            {
                draining = None;
            }
        }
        let deadline = draining.as_ref().map(|d| d.deadline);
        tokio::select! {
            _ = drain_phase.changed(), if !drain_started => {}
            _ = drain_tick.tick(), if draining.is_some() => {
                let now = state.now_ms();
                let random = tollgate_consensus::runtime::random_u64();
                let out = gossip.protocol.lock().on_tick(now, random);
                gossip.send(out);
            }
            // Only wakes the loop: the drain is polled below.
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {}
            _ = flush_tick.tick() => flush_and_publish(&state, &gossip, &trees, &mut hot).await,
            // Someone waits for durability (strict quotas, seats, or
            // `durable_usage_ack`): flush now instead of at the next tick.
            _ = state.flush_wanted.notified() => {
                flush_and_publish(&state, &gossip, &trees, &mut hot).await;
                flush_tick.reset();
            }
            _ = hot_tick.tick(), if !hot.is_empty() => push_hot(&state, &gossip, &mut hot),
            _ = gossip_tick.tick() => {
                let now = state.now_ms();
                gossip.refresh_peers(&state, now);
                let config = state.config();
                state.with_usage(|u| {
                    u.expire_seats(now);
                    u.rebalance(&config, now, &policy);
                });
                let random = tollgate_consensus::runtime::random_u64();
                let out = gossip.protocol.lock().on_tick(now, random);
                gossip.send(out);
            }
            Some(msg) = inbound.recv() => {
                let now = state.now_ms();
                let mut sink = NodeSink {
                    state: &state,
                    config: state.config(),
                    now_ms: now,
                };
                let out = gossip
                    .protocol
                    .lock()
                    .on_message_with(msg.from, &msg.bytes, now, &mut sink);
                gossip.send(out);
            }
            _ = gc_tick.tick() => {
                let config = state.config();
                let removed = state.with_usage(|u| u.gc(&config, state.now_ms()));
                for k in &removed {
                    hot.remove(k);
                }
                gossip.protocol.lock().forget(&removed);
                persist::delete_counters(&trees, &removed).await;
            }
            _ = shutdown.changed() => break,
        }
        // Whatever woke the loop (an ack, a tick, a flush) may have ended
        // the drain.
        if let Some(d) = &draining
            && poll_drain(&state, &gossip, &trees, &mut hot, d).await
        {
            draining = None;
        }
    }
    let result = persist::flush(&state, &trees).await.map(|_| ());
    gossip.transport.close().await;
    result
}
