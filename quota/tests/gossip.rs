//! The gossip state machine on a simulated network: states spread to every
//! node, lost messages are resent, a partition heals within a few ticks,
//! messages stay under the size bound and hostile bytes change nothing.

use std::collections::BTreeSet;

use proptest::prelude::*;
use tollgate_quota::config::{Config, ConfigCommand, ConfigOp};
use tollgate_quota::gossip::{DrainProgress, Gossip, GossipSettings, Outgoing, PeerInfo, decode};
use tollgate_quota::license::parse_license;
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_quota::usage::{CounterKey, Usage};

const NOW_MS: i64 = 1_780_000_000_000;

fn config(n_licenses: usize) -> Config {
    let mut config = Config::default();
    for i in 0..n_licenses {
        let text = format!(
            "apiVersion: tollgate/v1\nkind: License\nid: l{i}\ncustomer: C\nkeys: [{{key: k{i}}}]\nmodels: [{{model: m}}]\nquotas:\n  - {{id: q, metric: inferences, limit: 1000000, window: month, scope: subject}}\n"
        );
        let license = parse_license(&text).expect("valid");
        config.apply(
            &ConfigCommand {
                request_id: None,
                actor: "t".into(),
                reason: None,
                at_ms: 0,
                op: ConfigOp::PutLicense(license),
            },
            i as u64 + 1,
        );
    }
    config
}

struct Node {
    usage: Usage,
    gossip: Gossip,
}

/// `n` nodes on a network that delivers everything except what `cut` says.
struct Net {
    nodes: Vec<Node>,
    config: Config,
    now: i64,
    cut: BTreeSet<usize>,
    queue: Vec<(usize, Outgoing)>,
    max_seen: usize,
}

impl Net {
    fn new(n: usize, config: Config, settings: GossipSettings) -> Self {
        let peers: Vec<PeerInfo> = (1..=n as u64)
            .map(|id| PeerInfo {
                id,
                region: format!("r{}", id % 2),
            })
            .collect();
        let nodes = (1..=n as u64)
            .map(|id| {
                let mut gossip =
                    Gossip::new(id, format!("r{}", id % 2), settings.clone(), id * 1_000);
                gossip.set_peers(&peers, NOW_MS);
                Node {
                    usage: Usage::new(id),
                    gossip,
                }
            })
            .collect();
        Self {
            nodes,
            config,
            now: NOW_MS,
            cut: BTreeSet::new(),
            queue: Vec::new(),
            max_seen: 0,
        }
    }

    /// Node `i` allows one use for `subject` of license `l` and publishes
    /// it (as the node does after a flush).
    fn use_once(&mut self, i: usize, license: usize, subject: &str) {
        let mut req = CheckRequest::new(&format!("k{license}"), "m", "1.0.0");
        req.subject = Some(subject.to_string());
        req.meters = vec![Meter {
            metric: "inferences".into(),
            quantity: 1,
        }];
        let node = &mut self.nodes[i];
        let d = node
            .usage
            .check(&self.config, &req, self.now, String::new());
        assert_eq!(d.outcome, tollgate_quota::decision::Outcome::Allow);
        let dirty = node.usage.take_dirty();
        node.gossip.publish(dirty, self.now);
    }

    fn blocked(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&a) != self.cut.contains(&b)
    }

    /// One tick on every node, then deliver until quiet.
    fn tick(&mut self) {
        self.now += 50;
        for i in 0..self.nodes.len() {
            let out = self.nodes[i].gossip.on_tick(self.now, i as u64);
            self.queue.extend(out.into_iter().map(|o| (i, o)));
        }
        self.deliver();
    }

    fn deliver(&mut self) {
        while let Some((from, msg)) = self.queue.pop() {
            self.max_seen = self.max_seen.max(msg.bytes.len());
            let to = msg.to as usize - 1;
            if self.blocked(from, to) {
                continue;
            }
            let node = &mut self.nodes[to];
            let replies = node.gossip.on_message(
                from as u64 + 1,
                &msg.bytes,
                self.now,
                &mut node.usage,
                &self.config,
            );
            self.queue.extend(replies.into_iter().map(|o| (to, o)));
        }
    }

    fn views(&self) -> Vec<Vec<(CounterKey, u64)>> {
        self.nodes
            .iter()
            .map(|n| {
                let mut v: Vec<(CounterKey, u64)> = n
                    .usage
                    .counters()
                    .map(|(k, c)| (k.clone(), c.value()))
                    .collect();
                v.sort();
                v
            })
            .collect()
    }

    fn converged(&self) -> bool {
        let views = self.views();
        views.windows(2).all(|w| w[0] == w[1])
    }
}

#[test]
fn usage_spreads_to_every_node() {
    let mut net = Net::new(5, config(1), GossipSettings::default());
    for i in 0..5 {
        for _ in 0..=i {
            net.use_once(i, 0, "");
        }
    }
    for _ in 0..3 {
        net.tick();
    }
    assert!(net.converged(), "{:?}", net.views());
    assert_eq!(net.views()[0][0].1, 15);
    // Nothing left to send once everyone has acked.
    net.tick();
    let idle = net.nodes[0].gossip.status(net.now);
    assert!(
        idle.iter().all(|p| p.pending == 0 && p.in_flight == 0),
        "{idle:?}"
    );
}

#[test]
fn a_healed_partition_converges_within_three_ticks() {
    let mut net = Net::new(5, config(1), GossipSettings::default());
    net.use_once(0, 0, "");
    net.tick();
    net.tick();
    assert!(net.converged());
    // Cut node 5 off; both sides keep counting.
    net.cut.insert(4);
    for round in 0..10 {
        net.use_once(round % 4, 0, "");
        net.use_once(4, 0, "");
        net.tick();
    }
    assert!(!net.converged());
    net.cut.clear();
    let mut ticks = 0;
    while !net.converged() {
        net.tick();
        ticks += 1;
        assert!(
            ticks <= 3,
            "not converged after {ticks} ticks: {:?}",
            net.views()
        );
    }
    assert_eq!(net.views()[4][0].1, 21);
}

#[test]
fn many_counters_travel_in_bounded_messages_and_digests_heal_lost_ones() {
    let settings = GossipSettings {
        max_message_bytes: 300,
        ..GossipSettings::default()
    };
    let mut net = Net::new(3, config(4), settings);
    // Node 1 records 200 counters (subjects) while cut off; its deltas to
    // the others time out, and the others learn everything after the heal.
    net.cut.insert(0);
    for s in 0..200 {
        net.use_once(0, s % 4, &format!("subject-{s}"));
    }
    for _ in 0..5 {
        net.tick();
    }
    net.cut.clear();
    for _ in 0..40 {
        net.tick();
        if net.converged() {
            break;
        }
    }
    assert!(net.converged());
    assert_eq!(net.views()[2].len(), 200);
    assert!(net.max_seen <= 300, "a message of {} bytes", net.max_seen);
}

#[test]
fn a_new_peer_gets_everything_through_its_digest() {
    let mut net = Net::new(3, config(1), GossipSettings::default());
    net.use_once(0, 0, "a");
    net.use_once(1, 0, "b");
    // Node 3 knew no peers until now, as on a fresh start.
    net.nodes[2].gossip.set_peers(&[], net.now);
    net.tick();
    let peers: Vec<PeerInfo> = (1..=3)
        .map(|id| PeerInfo {
            id,
            region: "r".into(),
        })
        .collect();
    net.nodes[2].gossip.set_peers(&peers, net.now);
    net.tick();
    net.tick();
    assert!(net.converged(), "{:?}", net.views());
}

proptest! {
    #[test]
    fn hostile_bytes_change_nothing(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let config = config(1);
        let mut gossip = Gossip::new(1, "r", GossipSettings::default(), 1);
        gossip.set_peers(&[PeerInfo { id: 2, region: "r".into() }], NOW_MS);
        let mut usage = Usage::new(1);
        let before = usage.clone();
        let out = gossip.on_message(2, &bytes, NOW_MS, &mut usage, &config);
        if decode(&bytes).is_err() {
            prop_assert!(out.is_empty());
            prop_assert_eq!(&usage, &before);
            prop_assert_eq!(gossip.n_malformed(), 1);
        }
    }
}

fn peer_infos(ids: &[u64]) -> Vec<PeerInfo> {
    ids.iter()
        .map(|&id| PeerInfo {
            id,
            region: format!("r{}", id % 2),
        })
        .collect()
}

fn slot_of(net: &Net, i: usize, node: u64) -> u64 {
    net.nodes[i]
        .usage
        .counters()
        .map(|(_, c)| c.slot(node))
        .sum()
}

#[test]
fn a_removed_node_drains_to_peers_that_already_dropped_it() {
    let mut net = Net::new(3, config(2), GossipSettings::default());
    // Node 3 counts uses nobody else has heard of yet.
    for k in 0..5 {
        net.use_once(2, k % 2, &format!("s{k}"));
    }
    // Nodes 1 and 2 applied the removal: node 3 is no peer of theirs.
    for i in 0..2 {
        net.nodes[i].gossip.set_peers(&peer_infos(&[1, 2]), net.now);
    }
    let started = net.now;
    net.nodes[2].gossip.begin_drain(started);
    let before = net.nodes[2].gossip.drain_progress();
    assert_eq!(before.silent, vec![1, 2], "{before:?}");
    assert!(!before.is_complete(0, 1_000));

    let mut ticks = 0;
    while !net.nodes[2]
        .gossip
        .drain_progress()
        .is_complete(net.now - started, 1_000)
    {
        ticks += 1;
        assert!(ticks <= 3, "{:?}", net.nodes[2].gossip.drain_progress());
        net.tick();
    }
    // Both peers acked, although they no longer list node 3 as a peer.
    assert_eq!(net.nodes[2].gossip.drain_progress().caught_up, vec![1, 2]);
    for i in 0..2 {
        assert_eq!(slot_of(&net, i, 3), 5, "node {} lacks node 3's uses", i + 1);
    }
}

#[test]
fn a_drain_cut_off_from_every_peer_never_completes() {
    let mut net = Net::new(3, config(1), GossipSettings::default());
    net.use_once(2, 0, "s");
    net.cut.insert(2);
    net.nodes[2].gossip.begin_drain(net.now);
    let started = net.now;
    for _ in 0..20 {
        net.tick();
    }
    let progress = net.nodes[2].gossip.drain_progress();
    assert_eq!(progress.silent, vec![1, 2], "{progress:?}");
    assert!(!progress.is_complete(net.now - started, 100));
    // Healed: the resends get through and are acked.
    net.cut.clear();
    for _ in 0..5 {
        net.tick();
    }
    let progress = net.nodes[2].gossip.drain_progress();
    assert!(progress.is_complete(net.now - started, 100), "{progress:?}");
    assert_eq!(slot_of(&net, 0, 3), 1);
}

#[test]
fn a_drain_serves_every_peer_each_tick_not_just_fanout() {
    let settings = GossipSettings {
        fanout: 1,
        ..GossipSettings::default()
    };
    let mut net = Net::new(5, config(1), settings);
    net.use_once(4, 0, "s");
    net.nodes[4].gossip.begin_drain(net.now);
    let out = net.nodes[4].gossip.on_tick(net.now + 50, 0);
    let deltas: BTreeSet<u64> = out
        .iter()
        .filter(|o| {
            matches!(
                decode(&o.bytes),
                Ok(tollgate_quota::gossip::Message::Delta { .. })
            )
        })
        .map(|o| o.to)
        .collect();
    assert_eq!(deltas, BTreeSet::from([1, 2, 3, 4]));
}

fn check_complete(progress: DrainProgress, elapsed_ms: i64, expected: bool) {
    assert_eq!(
        progress.is_complete(elapsed_ms, 500),
        expected,
        "{progress:?} after {elapsed_ms} ms"
    );
}

#[test]
fn when_a_drain_is_complete() {
    let p = |caught_up: &[u64], behind: &[u64], silent: &[u64]| DrainProgress {
        caught_up: caught_up.to_vec(),
        behind: behind.to_vec(),
        silent: silent.to_vec(),
    };
    // No peers: nobody to hand usage to.
    check_complete(p(&[], &[], &[]), 0, true);
    check_complete(p(&[1, 2], &[], &[]), 0, true);
    // A silent peer is waited for during the grace, then given up on.
    check_complete(p(&[1], &[], &[2]), 100, false);
    check_complete(p(&[1], &[], &[2]), 500, true);
    // A peer that answers but still misses state is always waited for.
    check_complete(p(&[1], &[2], &[]), 10_000, false);
    // Nobody holds everything: never complete (the timeout ends it).
    check_complete(p(&[], &[], &[1, 2]), 10_000, false);
    check_complete(p(&[], &[1], &[]), 10_000, false);
}
