//! The gossip state machine on a simulated network: states spread to every
//! node, lost messages are resent, a partition heals within a few ticks,
//! messages stay under the size bound and hostile bytes change nothing.

use std::collections::BTreeSet;

use proptest::prelude::*;
use tollgate_quota::config::{Config, ConfigCommand, ConfigOp};
use tollgate_quota::gossip::{Gossip, GossipSettings, Outgoing, PeerInfo, decode};
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
