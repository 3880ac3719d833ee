//! Jepsen-style checkers: each reads a run's history and gives a verdict
//! with the first counterexample it found.
//!
//! This module owns the invariants the cluster promises and how each is
//! read from a history. It must not run anything.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{Lic, Op, Outcome};
use crate::run::{GOSSIP_INTERVAL_MS, Run};

/// Names of every checker, in report order.
pub const CHECKERS: &[&str] = &[
    "strict-quota-safety",
    "soft-quota-counter",
    "convergence",
    "config-linearizability",
    "durability",
    "seat-safety",
    "liveness",
    "audit-chain",
];

/// One checker's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// The checker.
    pub checker: &'static str,
    /// Whether the invariant held.
    pub ok: bool,
    /// The first counterexample, when it did not.
    pub counterexample: Option<String>,
}

impl Verdict {
    fn pass(checker: &'static str) -> Self {
        Self {
            checker,
            ok: true,
            counterexample: None,
        }
    }

    fn fail(checker: &'static str, why: String) -> Self {
        Self {
            checker,
            ok: false,
            counterexample: Some(why),
        }
    }

    fn from(checker: &'static str, r: Result<(), String>) -> Self {
        match r {
            Ok(()) => Self::pass(checker),
            Err(why) => Self::fail(checker, why),
        }
    }
}

/// Figures the summary aggregates across seeds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Figures {
    /// Time from the last heal until every live node agreed (ms).
    pub convergence_ms: Option<u64>,
    /// Soft-quota overshoot: allowed units past the limit, worst window.
    pub soft_overshoot: u64,
    /// Strict units allowed, worst window.
    pub strict_allowed: u64,
}

/// Runs every checker on `run`.
pub fn check(run: &Run) -> (Vec<Verdict>, Figures) {
    let mut figures = Figures::default();
    let verdicts = vec![
        Verdict::from(
            "strict-quota-safety",
            strict_quota_safety(run, &mut figures),
        ),
        Verdict::from("soft-quota-counter", soft_quota_counter(run, &mut figures)),
        Verdict::from("convergence", convergence(run, &mut figures)),
        Verdict::from("config-linearizability", config_linearizability(run)),
        Verdict::from("durability", durability(run)),
        Verdict::from("seat-safety", seat_safety(run)),
        Verdict::from("liveness", liveness(run)),
        Verdict::from("audit-chain", audit_chain(run)),
    ];
    (verdicts, figures)
}

/// Allowed strict units, per window, never exceed the limit: neither as
/// clients saw them nor as any node counted them at any sample.
fn strict_quota_safety(run: &Run, figures: &mut Figures) -> Result<(), String> {
    let limit = run.scenario.workload.strict_limit;
    let mut allowed: BTreeMap<i64, u64> = BTreeMap::new();
    for c in &run.history.calls {
        if let (
            Op::Check {
                lic: Lic::Strict,
                quantity,
                window,
            },
            Outcome::Allow,
        ) = (&c.op, &c.outcome)
        {
            let n = allowed.entry(*window).or_default();
            *n += quantity;
            figures.strict_allowed = figures.strict_allowed.max(*n);
            if *n > limit {
                return Err(format!(
                    "client {} was allowed strict unit {} of a limit of {limit} (window {window}) by node {} at {} ms",
                    c.client, n, c.node, c.done_ms
                ));
            }
        }
    }
    for s in &run.history.samples {
        for (window, used) in &s.strict_used {
            if *used > limit {
                return Err(format!(
                    "node {} counted {used} strict units of a limit of {limit} (window {window}) at {} ms",
                    s.node, s.at_ms
                ));
            }
        }
    }
    Ok(())
}

/// Jepsen's counter: the converged value of every counter lies between the
/// acknowledged increments and those plus the ones with unknown outcome;
/// and the soft quota's overshoot stays within the documented bound.
fn soft_quota_counter(run: &Run, figures: &mut Figures) -> Result<(), String> {
    // (license, window) -> acknowledged units
    let mut bounds: BTreeMap<(Lic, i64), u64> = BTreeMap::new();
    let mut unknown_any: BTreeMap<Lic, u64> = BTreeMap::new();
    for c in &run.history.calls {
        let Some((lic, quantity, window)) = c.op.counted() else {
            continue;
        };
        match &c.outcome {
            Outcome::Allow => *bounds.entry((lic, window)).or_default() += quantity,
            // The window of an unanswered call is unknown: it may count in
            // any window.
            Outcome::Unknown(_) => *unknown_any.entry(lic).or_default() += quantity,
            Outcome::Deny(_) => {}
        }
    }
    if run.converged_at_ms.is_none() {
        // Without agreement there is no final value to judge; convergence
        // reports that failure.
        return Ok(());
    }
    for (&(lic, window), &acked) in &bounds {
        let value = run.final_usage.get(&(lic, window)).copied().unwrap_or(0);
        let unknown = unknown_any.get(&lic).copied().unwrap_or(0);
        if value < acked {
            return Err(format!(
                "{lic:?} window {window}: the nodes agree on {value}, but clients were acknowledged {acked}"
            ));
        }
        if value > acked + unknown {
            return Err(format!(
                "{lic:?} window {window}: the nodes agree on {value}, more than the {acked} acknowledged plus {unknown} unanswered"
            ));
        }
    }
    // Overshoot of the soft quota: cut-off sides each spend what they
    // believe remains, so the bound is one limit per extra side, plus one
    // use per node per push interval when nothing is cut.
    let limit = run.scenario.workload.soft_limit;
    let nodes = run.scenario.all_node_ids().len() as u64;
    let sides = run.max_components.max(1) as u64;
    let bound = limit * (sides - 1) + nodes + limit / 100;
    for (&(lic, window), &acked) in &bounds {
        if lic != Lic::Soft {
            continue;
        }
        let over = acked.saturating_sub(limit);
        figures.soft_overshoot = figures.soft_overshoot.max(over);
        if over > bound {
            return Err(format!(
                "soft quota window {window}: {acked} allowed of a limit of {limit}, an overshoot of {over} past the bound of {bound} ({sides} sides at most)"
            ));
        }
    }
    Ok(())
}

/// Every live node agrees on all usage within N gossip intervals of the
/// last heal, or, when the heal restarted nodes, of their serving again.
fn convergence(run: &Run, figures: &mut Figures) -> Result<(), String> {
    let within = run.scenario.converge_within_intervals * GOSSIP_INTERVAL_MS;
    match run.converged_at_ms {
        Some(t) => {
            let from = run.healed_at_ms.max(run.serving_at_ms);
            let took = t.saturating_sub(from);
            figures.convergence_ms = Some(took);
            if took > within {
                return Err(format!(
                    "nodes agreed {took} ms after the heal at {} ms (every node serving at {} ms), past the bound of {within} ms",
                    run.healed_at_ms, run.serving_at_ms
                ));
            }
            Ok(())
        }
        None => Err(format!(
            "live nodes {:?} never agreed on usage after the heal at {} ms",
            run.live_nodes, run.healed_at_ms
        )),
    }
}

/// Committed admin writes are never lost; every node's config version only
/// grows while it runs; acknowledged writes are on every node after the
/// heal.
fn config_linearizability(run: &Run) -> Result<(), String> {
    let mut last: BTreeMap<(u64, u32), (u64, u64)> = BTreeMap::new();
    for s in &run.history.samples {
        let key = (s.node, s.incarnation);
        if let Some(&(at, v)) = last.get(&key)
            && s.config_version < v
        {
            return Err(format!(
                "node {} went back from config version {v} (at {at} ms) to {} (at {} ms)",
                s.node, s.config_version, s.at_ms
            ));
        }
        last.insert(key, (s.at_ms, s.config_version));
    }
    let acked: Vec<(u64, &str, u64)> = run
        .history
        .calls
        .iter()
        .filter_map(|c| match (&c.op, &c.outcome) {
            (Op::Admin { action, version }, Outcome::Allow) => {
                Some((*version, action.as_str(), c.done_ms))
            }
            _ => None,
        })
        .collect();
    for (node, fc) in &run.final_configs {
        for &(version, action, at) in &acked {
            if fc.version < version {
                return Err(format!(
                    "node {node} ended at config version {}, below the {action} acknowledged as version {version} at {at} ms",
                    fc.version
                ));
            }
            if !fc.churn_versions.contains(&version) {
                return Err(format!(
                    "node {node}'s history of the churned license lacks version {version} ({action} acknowledged at {at} ms)"
                ));
            }
        }
    }
    Ok(())
}

/// Usage a node acknowledged before it crashed is still counted after it
/// restarted: the final agreed value covers every acknowledged unit.
///
/// Read per crash: the units a crashed node acknowledged before its crash
/// must be within the final value (which the counter checker bounds
/// globally); here the failure names the crash.
fn durability(run: &Run) -> Result<(), String> {
    if run.converged_at_ms.is_none() {
        return Ok(());
    }
    let crashes: Vec<(u64, u64)> = run
        .history
        .faults
        .iter()
        .filter_map(|f| {
            let id = f.what.strip_prefix("crash ")?.parse().ok()?;
            Some((id, f.at_ms))
        })
        .collect();
    for (node, at) in crashes {
        let mut acked: BTreeMap<(Lic, i64), u64> = BTreeMap::new();
        for c in &run.history.calls {
            if c.node != node || c.done_ms > at {
                continue;
            }
            let Some((lic, q, window)) = c.op.counted() else {
                continue;
            };
            if c.outcome == Outcome::Allow {
                *acked.entry((lic, window)).or_default() += q;
            }
        }
        for ((lic, window), n) in acked {
            let value = run.final_usage.get(&(lic, window)).copied().unwrap_or(0);
            if value < n {
                return Err(format!(
                    "node {node} acknowledged {n} {lic:?} units (window {window}) before its crash at {at} ms; the cluster ended with {value}"
                ));
            }
        }
    }
    Ok(())
}

/// Never more live leases than `max_instances`, as clients hold them: a
/// lease lives from its grant until its release was sent, or until its
/// TTL (less the largest clock skew) after the last grant or renewal was
/// sent.
fn seat_safety(run: &Run) -> Result<(), String> {
    let max = run.scenario.workload.max_instances;
    let ttl = run.scenario.workload.seat_ttl_s * 1000;
    let margin = run.max_skew_ms;
    // lease -> (start, end)
    let mut leases: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for c in &run.history.calls {
        match (&c.op, &c.outcome) {
            (Op::Acquire { lease }, Outcome::Allow) => {
                leases.insert(
                    lease.clone(),
                    (c.done_ms, (c.sent_ms + ttl).saturating_sub(margin)),
                );
            }
            (Op::Renew { lease }, Outcome::Allow) => {
                if let Some(l) = leases.get_mut(lease) {
                    l.1 = l.1.max((c.sent_ms + ttl).saturating_sub(margin));
                }
            }
            (Op::Release { lease }, _) => {
                if let Some(l) = leases.get_mut(lease) {
                    l.1 = l.1.min(c.sent_ms);
                }
            }
            _ => {}
        }
    }
    let mut edges: Vec<(u64, i64, &str)> = Vec::new();
    for (id, &(start, end)) in &leases {
        if end > start {
            edges.push((start, 1, id));
            edges.push((end, -1, id));
        }
    }
    // Ends before starts at the same instant.
    edges.sort_by_key(|&(t, d, _)| (t, d));
    let mut live: BTreeSet<&str> = BTreeSet::new();
    for (t, d, id) in edges {
        if d > 0 {
            live.insert(id);
            if live.len() as u64 > max {
                return Err(format!(
                    "{} leases live at {t} ms, max_instances is {max}: {live:?}",
                    live.len()
                ));
            }
        } else {
            live.remove(id);
        }
    }
    Ok(())
}

/// Every live node's audit log verifies at the end (chain, checkpoints
/// signed by the key its config registered), crashes and restarts included,
/// and holds records.
fn audit_chain(run: &Run) -> Result<(), String> {
    for (node, verdict) in &run.audit {
        match verdict {
            Ok(0) => return Err(format!("node {node}'s audit log is empty")),
            Ok(_) => {}
            Err(e) => return Err(format!("node {node}'s audit log: {e}")),
        }
    }
    Ok(())
}

/// After the heal every node serves again: each answered a probe, and an
/// admin write committed.
fn liveness(run: &Run) -> Result<(), String> {
    if let Some(f) = run.node_failures.first() {
        return Err(f.clone());
    }
    let probed: BTreeSet<u64> = run
        .history
        .calls
        .iter()
        .filter(|c| c.client == "probe" && c.op == Op::Probe)
        .map(|c| c.node)
        .collect();
    let expected: BTreeSet<u64> = run
        .scenario
        .all_node_ids()
        .into_iter()
        .filter(|id| !run.removed.contains(id))
        .collect();
    let down: Vec<u64> = expected
        .iter()
        .copied()
        .filter(|id| !run.live_nodes.contains(id))
        .collect();
    if !down.is_empty() {
        return Err(format!("nodes {down:?} were not serving at the end"));
    }
    let missing: Vec<u64> = expected
        .iter()
        .copied()
        .filter(|id| !probed.contains(id))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "nodes {missing:?} answered no Check within {} ms of the heal",
            run.scenario.settle_ms
        ));
    }
    let admin_ok = run.history.calls.iter().any(|c| {
        c.client == "probe" && matches!(c.op, Op::Admin { .. }) && c.outcome == Outcome::Allow
    });
    if !admin_ok {
        return Err(format!(
            "no admin write committed within {} ms of the heal",
            run.scenario.settle_ms
        ));
    }
    if run.live_nodes.len() < expected.len() {
        return Err(format!(
            "only nodes {:?} were running at the end",
            run.live_nodes
        ));
    }
    Ok(())
}
