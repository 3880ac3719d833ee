//! Escrow safety: under any interleaving of consumption, transfers, merges,
//! lost, reordered and duplicated deliveries, the units consumed across all
//! nodes never exceed the limit.

use proptest::prelude::*;
use tollgate_quota::config::{Config, ConfigCommand, ConfigOp};
use tollgate_quota::decision::{Outcome, ReasonCode};
use tollgate_quota::escrow::RebalancePolicy;
use tollgate_quota::license::parse_license;
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_quota::seats::SeatRequest;
use tollgate_quota::usage::{Counter, CounterKey, Usage, Window, seats_key};

/// One step of a run on `n` nodes.
#[derive(Clone, Debug)]
enum Op {
    /// Node consumes `q` units if it holds the rights.
    Consume { node: usize, q: u64 },
    /// Node gives up to `amount` of its rights to `to`.
    Transfer { node: usize, to: usize, amount: u64 },
    /// Node gives back up to `q` units it holds (seats).
    Release { node: usize, q: u64 },
    /// Node snapshots its state onto the wire for `to`.
    Send { node: usize, to: usize },
    /// The message at `idx` (mod in-flight count) arrives; `keep` leaves a
    /// copy in flight, so it can arrive again (duplicate delivery).
    Deliver { idx: usize, keep: bool },
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..n, 1u64..6).prop_map(|(node, q)| Op::Consume { node, q }),
        2 => (0..n, 0..n, 1u64..20).prop_map(|(node, to, amount)| Op::Transfer { node, to, amount }),
        1 => (0..n, 1u64..3).prop_map(|(node, q)| Op::Release { node, q }),
        3 => (0..n, 0..n).prop_map(|(node, to)| Op::Send { node, to }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(idx, keep)| Op::Deliver { idx, keep }),
    ]
}

fn run() -> impl Strategy<Value = (usize, u64, Vec<Op>)> {
    (2usize..6, 1u64..120).prop_flat_map(|(n, limit)| {
        (
            Just(n),
            Just(limit),
            proptest::collection::vec(op(n), 1..200),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn escrow_never_exceeds_the_limit((n, limit, ops) in run()) {
        let members: Vec<u64> = (0..n as u64).collect();
        let mut replicas: Vec<Counter> = (0..n).map(|_| Counter::escrow(&members)).collect();
        let mut wire: Vec<(usize, Counter)> = Vec::new();
        let mut granted = 0u64;
        let mut released = 0u64;
        for op in ops {
            match op {
                Op::Consume { node, q } => {
                    let c = &mut replicas[node];
                    if c.available(node as u64, limit) >= q {
                        c.consume(node as u64, q);
                        granted += q;
                    }
                }
                Op::Transfer { node, to, amount } => {
                    let c = &mut replicas[node];
                    let amount = amount.min(c.available(node as u64, limit));
                    c.transfer(node as u64, to as u64, amount);
                }
                Op::Release { node, q } => {
                    let c = &mut replicas[node];
                    let q = q.min(c.in_use(node as u64));
                    c.release(node as u64, q);
                    released += q;
                }
                Op::Send { node, to } => wire.push((to, replicas[node].clone())),
                Op::Deliver { idx, keep } => {
                    if wire.is_empty() {
                        continue;
                    }
                    let idx = idx % wire.len();
                    let (to, state) = if keep { wire[idx].clone() } else { wire.swap_remove(idx) };
                    replicas[to].merge(&state);
                }
            }
            // Each node is the authority on its own consumption.
            let in_use: u64 = (0..n).map(|i| replicas[i].in_use(i as u64)).sum();
            prop_assert_eq!(in_use, granted - released);
            prop_assert!(in_use <= limit, "{} units in use, limit {}", in_use, limit);
        }
        // Once every state reaches everyone, all replicas agree and the
        // merged count is what was granted.
        let mut all = Counter::default();
        for r in &replicas {
            all.merge(r);
        }
        for r in &mut replicas {
            r.merge(&all);
            prop_assert_eq!(&*r, &all);
        }
        prop_assert_eq!(all.value(), granted - released);
        prop_assert!(all.value() <= limit);
    }
}

const NOW_MS: i64 = 1_780_000_000_000;

fn strict_config(limit: u64, max_instances: u32) -> Config {
    let text = format!(
        "apiVersion: tollgate/v1\nkind: License\nid: s\ncustomer: S\nkeys: [{{key: k}}]\nmodels: [{{model: m}}]\nmax_instances: {max_instances}\nseat_lease_ttl: 10s\nquotas:\n  - {{id: q, metric: inferences, limit: {limit}, window: month, mode: strict}}\n"
    );
    let license = parse_license(&text).expect("valid");
    let mut config = Config::default();
    config.apply(
        &ConfigCommand {
            request_id: None,
            actor: "p".into(),
            reason: None,
            at_ms: 0,
            op: ConfigOp::PutLicense(license),
        },
        1,
    );
    config
}

/// `n` nodes (ids 1..=n) that know each other as members.
fn cluster(n: usize) -> Vec<Usage> {
    let members: Vec<u64> = (1..=n as u64).collect();
    members
        .iter()
        .map(|&id| {
            let mut u = Usage::new(id);
            u.set_members(&members);
            u
        })
        .collect()
}

fn check(q: u64) -> CheckRequest {
    let mut req = CheckRequest::new("k", "m", "1.0.0");
    req.meters = vec![Meter {
        metric: "inferences".into(),
        quantity: q,
    }];
    req
}

fn quota_key() -> CounterKey {
    CounterKey {
        license: "s".into(),
        quota: "q".into(),
        epoch: Window::Month.epoch(NOW_MS),
        scope: String::new(),
    }
}

/// A step of a whole-node run: decisions, rebalancing and gossip.
#[derive(Clone, Debug)]
enum NodeOp {
    Check { node: usize, q: u64 },
    Rebalance { node: usize },
    Send { node: usize, to: usize },
    Deliver { idx: usize, keep: bool },
    Tick,
}

fn node_op(n: usize) -> impl Strategy<Value = NodeOp> {
    prop_oneof![
        5 => (0..n, 1u64..4).prop_map(|(node, q)| NodeOp::Check { node, q }),
        2 => (0..n).prop_map(|node| NodeOp::Rebalance { node }),
        3 => (0..n, 0..n).prop_map(|(node, to)| NodeOp::Send { node, to }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(idx, keep)| NodeOp::Deliver { idx, keep }),
        1 => Just(NodeOp::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The real decision function and rebalancer on `n` nodes: the allow
    /// decisions across all nodes never add up to more than the limit.
    #[test]
    fn strict_decisions_and_rebalancing_never_exceed_the_limit(
        (n, limit, ops) in (2usize..6, 1u64..100).prop_flat_map(|(n, limit)| {
            (Just(n), Just(limit), proptest::collection::vec(node_op(n), 1..300))
        })
    ) {
        let config = strict_config(limit, 0);
        let mut nodes = cluster(n);
        let key = quota_key();
        let policy = RebalancePolicy::default();
        let mut wire: Vec<(usize, Counter)> = Vec::new();
        let mut allowed = 0u64;
        let mut now = NOW_MS;
        for op in ops {
            match op {
                NodeOp::Check { node, q } => {
                    let d = nodes[node].check(&config, &check(q), now, String::new());
                    match d.outcome {
                        Outcome::Allow => allowed += q,
                        _ => prop_assert!(matches!(
                            d.code(),
                            Some(ReasonCode::QuotaExceeded | ReasonCode::QuotaRightsUnavailable)
                        )),
                    }
                }
                NodeOp::Rebalance { node } => {
                    nodes[node].rebalance(&config, now, &policy);
                }
                NodeOp::Send { node, to } => {
                    if let Some(c) = nodes[node].counter(&key) {
                        wire.push((to, c.clone()));
                    }
                }
                NodeOp::Deliver { idx, keep } => {
                    if wire.is_empty() {
                        continue;
                    }
                    let idx = idx % wire.len();
                    let (to, state) = if keep { wire[idx].clone() } else { wire.swap_remove(idx) };
                    nodes[to].merge_remote(&config, now, &key, &state);
                }
                NodeOp::Tick => now += 50,
            }
            prop_assert!(allowed <= limit, "{} allowed, limit {}", allowed, limit);
        }
    }

    /// Seats: acquisitions, releases, expiries and rebalancing on `n` nodes
    /// never hold more than `max_instances` seats at once.
    #[test]
    fn seats_never_exceed_max_instances(
        (n, max, ops) in (2usize..5, 1u32..6).prop_flat_map(|(n, max)| {
            (Just(n), Just(max), proptest::collection::vec((0..n, 0u8..5, any::<usize>(), any::<bool>()), 1..200))
        })
    ) {
        let config = strict_config(1_000, max);
        let mut nodes = cluster(n);
        let key = seats_key("s");
        let policy = RebalancePolicy::default();
        let mut wire: Vec<(usize, Counter)> = Vec::new();
        let mut now = NOW_MS;
        let mut next = 0u64;
        for (node, action, idx, flag) in ops {
            match action {
                0 => {
                    next += 1;
                    let req = SeatRequest { key: "k".into(), instance: format!("i{next}"), ..SeatRequest::default() };
                    nodes[node].acquire_seat(&config, &req, now, format!("{:x}.{next}", node + 1));
                }
                1 => {
                    let lease = nodes[node].leases().map(|(id, _)| id.clone()).nth(idx % 4);
                    if let Some(lease_id) = lease {
                        let req = SeatRequest { key: "k".into(), lease_id, ..SeatRequest::default() };
                        let d = nodes[node].release_seat(&config, &req, now);
                        prop_assert!(d.reasons.is_empty(), "{:?}", d.reasons);
                    }
                }
                2 => {
                    nodes[node].rebalance(&config, now, &policy);
                    now += if flag { 50 } else { 4_000 };
                }
                3 => {
                    if let Some(c) = nodes[node].counter(&key) {
                        wire.push((idx % n, c.clone()));
                    }
                }
                _ => {
                    if !wire.is_empty() {
                        let i = idx % wire.len();
                        let (to, state) = if flag { wire[i].clone() } else { wire.swap_remove(i) };
                        nodes[to].merge_remote(&config, now, &key, &state);
                    }
                }
            }
            for u in &mut nodes {
                u.expire_seats(now);
            }
            let held: usize = nodes.iter().map(|u| u.leases().count()).sum();
            prop_assert!(held as u64 <= u64::from(max), "{} leases, max {}", held, max);
        }
    }
}

#[test]
fn rights_move_to_the_node_with_demand() {
    let config = strict_config(100, 0);
    let members = [1u64, 2];
    let mut a = Usage::new(1);
    let mut b = Usage::new(2);
    a.set_members(&members);
    b.set_members(&members);
    let key = quota_key();
    let policy = RebalancePolicy::default();
    let mut now = NOW_MS;
    // Node 1 uses its 50, then is refused for lack of rights.
    let mut allowed = 0;
    for _ in 0..60 {
        if a.check(&config, &check(1), now, String::new()).outcome == Outcome::Allow {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 50);
    let d = a.check(&config, &check(1), now, String::new());
    assert_eq!(d.code(), Some(ReasonCode::QuotaRightsUnavailable));
    assert_eq!(d.retry_after_ms, Some(a.rights_retry_ms()));
    // Node 2 sees the demand over a few ticks and gives rights.
    let mut gave = 0;
    for _ in 0..5 {
        let state = a.counter(&key).cloned().expect("counter");
        b.merge_remote(&config, now, &key, &state);
        gave += b
            .rebalance(&config, now, &policy)
            .iter()
            .map(|t| t.amount)
            .sum::<u64>();
        now += 50;
        for _ in 0..10 {
            a.check(&config, &check(1), now, String::new());
        }
    }
    assert!(gave > 0, "node 2 gave no rights");
    let state = b.counter(&key).cloned().expect("counter");
    a.merge_remote(&config, now, &key, &state);
    assert_eq!(
        a.check(&config, &check(1), now, String::new()).outcome,
        Outcome::Allow
    );
    // Whatever moved, the two never exceed the limit together.
    let mut all = a.counter(&key).cloned().expect("a");
    all.merge(b.counter(&key).expect("b"));
    assert!(all.value() <= 100);
}

#[test]
fn a_window_that_is_over_is_not_merged_into() {
    let config = strict_config(100, 0);
    let mut u = Usage::new(1);
    let mut old = quota_key();
    old.epoch -= 1;
    let mut state = Counter::escrow(&[2]);
    state.consume(2, 7);
    assert!(!u.merge_remote(&config, NOW_MS, &old, &state));
    assert!(u.counter(&old).is_none());
    assert_eq!(u.counter_value(&quota_key()), 0);
}

#[test]
fn a_quota_that_turns_strict_mid_window_counts_its_soft_usage_against_the_share() {
    let soft = {
        let text = "apiVersion: tollgate/v1\nkind: License\nid: s\ncustomer: S\nkeys: [{key: k}]\nmodels: [{model: m}]\nquotas:\n  - {id: q, metric: inferences, limit: 100, window: month}\n";
        let mut config = Config::default();
        config.apply(
            &ConfigCommand {
                request_id: None,
                actor: "p".into(),
                reason: None,
                at_ms: 0,
                op: ConfigOp::PutLicense(parse_license(text).expect("valid")),
            },
            1,
        );
        config
    };
    let strict = strict_config(100, 0);
    let mut u = Usage::new(1);
    u.set_members(&[1, 2, 3]);
    for _ in 0..30 {
        assert_eq!(
            u.check(&soft, &check(1), NOW_MS, String::new()).outcome,
            Outcome::Allow
        );
    }
    // Now strict: this node's share is 34, of which it used 30.
    let mut allowed = 0;
    for _ in 0..10 {
        if u.check(&strict, &check(1), NOW_MS, String::new()).outcome == Outcome::Allow {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 4);
    assert!(u.counter(&quota_key()).is_some_and(Counter::is_escrow));
}

#[test]
fn a_lease_from_before_max_instances_does_not_free_a_counted_seat() {
    let unlimited = strict_config(100, 0);
    let one = strict_config(100, 1);
    let mut u = Usage::new(1);
    let seat = |i: &str| SeatRequest {
        key: "k".into(),
        instance: i.into(),
        ..SeatRequest::default()
    };
    assert!(
        u.acquire_seat(&unlimited, &seat("a"), NOW_MS, "1.a".into())
            .granted
    );
    assert!(
        u.acquire_seat(&one, &seat("b"), NOW_MS, "1.b".into())
            .granted
    );
    let release = SeatRequest {
        key: "k".into(),
        lease_id: "1.a".into(),
        ..SeatRequest::default()
    };
    assert!(u.release_seat(&one, &release, NOW_MS).reasons.is_empty());
    let c = u.acquire_seat(&one, &seat("c"), NOW_MS, "1.c".into());
    assert_eq!(c.code(), Some(ReasonCode::SeatLimitReached), "{c:?}");
}

#[test]
fn counters_of_a_license_the_config_lacks_survive_gc_for_a_grace_period() {
    let config = strict_config(100, 0);
    let mut u = Usage::new(1);
    let key = CounterKey {
        license: "not-yet-applied".into(),
        quota: "q".into(),
        epoch: Window::Month.epoch(NOW_MS),
        scope: String::new(),
    };
    let mut state = Counter::default();
    state.consume(2, 5);
    assert!(u.merge_remote(&config, NOW_MS, &key, &state));
    assert!(u.gc(&config, NOW_MS).is_empty());
    assert!(u.gc(&config, NOW_MS + 60_000).is_empty());
    assert_eq!(
        u.gc(
            &config,
            NOW_MS + tollgate_quota::usage::UNKNOWN_LICENSE_GRACE_MS
        ),
        vec![key]
    );
}

#[test]
fn near_a_soft_limit_a_node_takes_its_share_of_the_rest_per_sync() {
    let text = "apiVersion: tollgate/v1\nkind: License\nid: s\ncustomer: S\nkeys: [{key: k}]\nmodels: [{model: m}]\nquotas:\n  - {id: q, metric: inferences, limit: 1000, window: month}\n";
    let mut config = Config::default();
    config.apply(
        &ConfigCommand {
            request_id: None,
            actor: "p".into(),
            reason: None,
            at_ms: 0,
            op: ConfigOp::PutLicense(parse_license(text).expect("valid")),
        },
        1,
    );
    let mut u = Usage::new(1);
    u.set_members(&[1, 2, 3, 4, 5]);
    // The other four nodes used 970 between them: close to the limit, 30
    // remain, half an even share is 3.
    let mut others = Counter::default();
    for n in 2..=5 {
        others.consume(n, 242 + u64::from(n == 2) * 2);
    }
    assert_eq!(others.value(), 970);
    assert!(u.merge_remote(&config, NOW_MS, &quota_key(), &others));
    let mut allowed = 0;
    for _ in 0..10 {
        let d = u.check(&config, &check(1), NOW_MS, String::new());
        if d.outcome == Outcome::Allow {
            allowed += 1;
        } else {
            assert_eq!(d.code(), Some(ReasonCode::QuotaRightsUnavailable));
            assert!(d.retry_after_ms.is_some());
        }
    }
    assert_eq!(allowed, 3, "half an even share of the 30 left");
    // Once this node's usage is flushed (and so gossiped), it may go on.
    u.take_dirty();
    assert_eq!(
        u.check(&config, &check(1), NOW_MS, String::new()).outcome,
        Outcome::Allow
    );
}

#[test]
fn a_closed_window_takes_late_usage_during_its_grace_and_not_after() {
    let config = strict_config(100, 0);
    let mut u = Usage::new(1);
    let (_, end) = Window::Month.bounds(Window::Month.epoch(NOW_MS));
    let end = end.unwrap_or(NOW_MS);
    let key = CounterKey {
        license: "s".into(),
        quota: "q".into(),
        epoch: Window::Month.epoch(NOW_MS),
        scope: String::new(),
    };
    // A peer whose clock runs behind counted into the window after it ended here.
    let mut late = Counter::default();
    late.consume(2, 5);
    assert!(u.merge_remote(&config, end + 1_000, &key, &late));
    assert_eq!(u.counter(&key).map(|c| c.value()), Some(5));
    // Once the grace is over, the window's count is final here.
    let grace = tollgate_quota::usage::CLOSED_WINDOW_GRACE_MS;
    late.consume(2, 1);
    assert!(!u.merge_remote(&config, end + grace, &key, &late));
    assert_eq!(u.gc(&config, end + grace), vec![key]);
}

#[test]
fn transfers_end_soon_after_demand_stops_and_replicas_agree() {
    let config = strict_config(10_000, 0);
    let mut nodes = cluster(2);
    let key = quota_key();
    let policy = RebalancePolicy::default();
    let mut now = NOW_MS;
    let exchange = |nodes: &mut Vec<Usage>, now: i64, from: usize, to: usize| {
        if let Some(state) = nodes[from].counter(&key).cloned() {
            nodes[to].merge_remote(&config, now, &key, &state);
        }
    };
    // Both nodes are busy, then their load winds down. Each hears of the
    // other's demand a tick late, so each sees the other's (older, higher)
    // demand above its own: their rankings disagree.
    for round in 0..20u64 {
        let sent: Vec<Option<Counter>> = nodes.iter().map(|n| n.counter(&key).cloned()).collect();
        for n in nodes.iter_mut() {
            for _ in 0..(40 - 2 * round) {
                n.check(&config, &check(1), now, String::new());
            }
        }
        for (to, state) in [(1, &sent[0]), (0, &sent[1])] {
            if let Some(state) = state {
                nodes[to].merge_remote(&config, now, &key, state);
            }
        }
        for n in nodes.iter_mut() {
            n.rebalance(&config, now, &policy);
        }
        now += 50;
    }
    // The load stops. Within active_ms (plus a tick to hear of it) every
    // transfer has ended, although the decaying estimates stay above
    // min_rate much longer.
    let stopped = now;
    let quiet_after = stopped + RebalancePolicy::default().active_ms + 100;
    let mut last_transfer = 0;
    while now < quiet_after + 2_000 {
        exchange(&mut nodes, now, 0, 1);
        exchange(&mut nodes, now, 1, 0);
        for n in nodes.iter_mut() {
            if !n.rebalance(&config, now, &policy).is_empty() {
                last_transfer = now;
            }
        }
        now += 50;
    }
    assert!(
        last_transfer < quiet_after,
        "rights still moved {} ms after demand stopped",
        last_transfer - stopped
    );
    exchange(&mut nodes, now, 0, 1);
    exchange(&mut nodes, now, 1, 0);
    assert_eq!(nodes[0].counter(&key), nodes[1].counter(&key));
    let demand = nodes[0].rights_status(&config, now)[0].demand.clone();
    assert!(
        demand.values().any(|r| *r >= policy.min_rate),
        "the estimates decayed below min_rate, so the test shows nothing: {demand:?}"
    );
}
