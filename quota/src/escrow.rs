//! Escrow rebalancing: moving strict-quota and seat rights to where the
//! demand is.
//!
//! Every node runs [`Usage::rebalance`] on a timer (the gossip interval).
//! It only ever gives away rights it holds itself, which is what keeps the
//! escrow safe however stale its view of the others is. The policy:
//!
//! 1. **Demand.** For each node, demand is the growth of what it consumed
//!    plus what it refused for lack of rights ([`Counter::demand`]),
//!    smoothed as units per second with a half-life
//!    ([`RebalancePolicy::half_life_ms`]). A node cut off from this one
//!    shows no growth here, so its estimated demand decays to zero and it is
//!    not sent rights it could not receive.
//! 2. **Target.** The rights still free across the cluster are divided among
//!    the nodes in proportion to their demand.
//! 3. **Reserve.** A node with recent demand keeps at least
//!    `reserve_fraction x limit / members` of its own rights (or all of them
//!    if it holds fewer), so a region that gets cut off still has something
//!    to serve with. A node without demand keeps no reserve: idle rights
//!    move to busy nodes.
//! 4. **Give.** What this node holds above max(target, reserve) (target
//!    rounded down) goes to the nodes with demand that are at least one
//!    unit below their targets, largest shortfall first. A node holding
//!    nothing gets a unit on a smaller shortfall only if its demand exceeds
//!    this node's, so a last unit moves to demand but never ping-pongs.
//! 5. **Only to live demand.** A node receives rights only while its demand
//!    is still growing: it grew here within [`RebalancePolicy::active_ms`].
//!    Each node estimates every node's rate from when it saw the counts, so
//!    two nodes can rank each other's demand the other way round; once
//!    demand stops, those rankings stay frozen while the rates decay, and
//!    each would keep handing the other its surplus. Requiring growth ends
//!    every transfer soon after the load does, and the replicas agree.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::counter::Counter;
use crate::usage::{CounterKey, DemandRate, SEATS_QUOTA, Usage, window_of};

/// Tuning of [`Usage::rebalance`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalancePolicy {
    /// Share of `limit / members` a node with demand keeps for itself.
    pub reserve_fraction: f64,
    /// Half-life of the demand estimate (ms).
    pub half_life_ms: f64,
    /// Demand below this many units per second counts as none.
    pub min_rate: f64,
    /// A node whose demand has not grown for this long (ms) receives no
    /// rights.
    pub active_ms: i64,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        Self {
            reserve_fraction: 0.1,
            half_life_ms: 1_000.0,
            min_rate: 0.05,
            active_ms: 300,
        }
    }
}

/// Rights this node gave away in one rebalance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The counter.
    pub key: CounterKey,
    /// The receiving node.
    pub to: u64,
    /// Units of rights.
    pub amount: u64,
}

/// Where this node stands on one escrow counter, for the status API.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RightsStatus {
    /// License id.
    pub license: String,
    /// Quota id (`@seats` for seats).
    pub quota: String,
    /// Window epoch.
    pub epoch: u64,
    /// Scope value.
    pub scope: String,
    /// The limit.
    pub limit: u64,
    /// Consumed (in use, for seats) across the cluster, as known here.
    pub used: u64,
    /// Rights this node may still consume.
    pub held: u64,
    /// Smoothed demand per node (units per second).
    pub demand: BTreeMap<u64, f64>,
}

/// The escrow limit of `key` under `config`, if it is a current escrow counter.
fn escrow_limit(config: &Config, key: &CounterKey, now_ms: i64) -> Option<u64> {
    let license = config.license(&key.license)?;
    if key.quota == SEATS_QUOTA {
        return (license.max_instances > 0).then_some(u64::from(license.max_instances));
    }
    let quota = license.quotas.iter().find(|q| q.id == key.quota)?;
    let window = window_of(config, key)?;
    (key.epoch == window.epoch(now_ms)).then(|| config.quota_limit(&license.id, quota, now_ms))
}

fn update_rate(rate: &mut DemandRate, counter: &Counter, now_ms: i64, half_life_ms: f64) {
    let nodes = counter.nodes();
    if rate.last_ms == 0 || now_ms <= rate.last_ms {
        if rate.last_ms == 0 {
            rate.last = nodes.iter().map(|&n| (n, counter.demand(n))).collect();
            rate.last_ms = now_ms;
        }
        return;
    }
    let dt = (now_ms - rate.last_ms) as f64;
    let alpha = 1.0 - 0.5f64.powf(dt / half_life_ms.max(1.0));
    for &n in &nodes {
        let now_demand = counter.demand(n);
        let before = rate.last.get(&n).copied().unwrap_or(now_demand);
        let instant = now_demand.saturating_sub(before) as f64 * 1_000.0 / dt;
        let r = rate.rate.entry(n).or_insert(0.0);
        *r += alpha * (instant - *r);
        rate.last.insert(n, now_demand);
        if now_demand > before {
            rate.grew_ms.insert(n, now_ms);
        }
    }
    rate.last_ms = now_ms;
}

impl Usage {
    /// Updates demand estimates and gives this node's surplus rights on
    /// every current escrow counter to the nodes that need them (see the
    /// module docs). Transfers are applied to this node's state and marked
    /// dirty; returns them.
    pub fn rebalance(
        &mut self,
        config: &Config,
        now_ms: i64,
        policy: &RebalancePolicy,
    ) -> Vec<Transfer> {
        let me = self.node_id();
        let keys: Vec<(CounterKey, u64)> = self
            .counters()
            .filter(|(_, c)| c.is_escrow())
            .filter_map(|(k, _)| escrow_limit(config, k, now_ms).map(|l| (k.clone(), l)))
            .collect();
        let mut out = Vec::new();
        for (key, limit) in keys {
            let Some(counter) = self.counter(&key).cloned() else {
                continue;
            };
            let rate = self.rates.entry(key.clone()).or_default();
            update_rate(rate, &counter, now_ms, policy.half_life_ms);
            let live: Vec<u64> = rate
                .grew_ms
                .iter()
                .filter(|(_, t)| now_ms.saturating_sub(**t) <= policy.active_ms)
                .map(|(n, _)| *n)
                .collect();
            let rates: BTreeMap<u64, f64> = rate
                .rate
                .iter()
                .filter(|(_, r)| **r >= policy.min_rate)
                .map(|(n, r)| (*n, *r))
                .collect();
            let total_rate: f64 = rates.values().sum();
            let my_rate = rates.get(&me).copied().unwrap_or(0.0);
            if total_rate <= 0.0 {
                continue;
            }
            let mine = counter.available(me, limit);
            if mine == 0 {
                continue;
            }
            let mut nodes = counter.nodes();
            nodes.extend_from_slice(self.members());
            nodes.sort_unstable();
            nodes.dedup();
            let free: u64 = nodes
                .iter()
                .map(|&n| counter.available(n, limit))
                .fold(0u64, u64::saturating_add);
            let target = |n: u64| free as f64 * rates.get(&n).copied().unwrap_or(0.0) / total_rate;
            let n_members = counter.members.len().max(1) as f64;
            let reserve = if my_rate > 0.0 {
                ((policy.reserve_fraction * limit as f64 / n_members).floor() as u64).min(mine)
            } else {
                0
            };
            let keep = (target(me).floor() as u64).max(reserve);
            let mut surplus = mine.saturating_sub(keep);
            if surplus == 0 {
                continue;
            }
            // Nodes below their target by at least one unit, by shortfall.
            // A smaller shortfall moves a unit only to a node that holds
            // nothing and has more demand than this one: with few rights
            // left (seats), the last unit must be able to move, but never
            // back and forth between two nodes whose targets are fractions
            // of a unit (that ping-pong kept replicas from ever agreeing
            // while demand decayed; found by the simulator).
            let mut short: Vec<(u64, f64)> = nodes
                .iter()
                .filter(|&&n| n != me && rates.contains_key(&n) && live.contains(&n))
                .map(|&n| (n, target(n) - counter.available(n, limit) as f64))
                .filter(|&(n, gap)| {
                    gap >= 1.0
                        || (gap > 0.0
                            && counter.available(n, limit) == 0
                            && rates.get(&n).copied().unwrap_or(0.0) > my_rate)
                })
                .collect();
            short.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for (to, gap) in short {
                if surplus == 0 {
                    break;
                }
                let amount = (gap.round() as u64).max(1).min(surplus);
                surplus -= amount;
                self.update_counter(&key, true, |c| c.transfer(me, to, amount));
                out.push(Transfer {
                    key: key.clone(),
                    to,
                    amount,
                });
            }
        }
        self.rates
            .retain(|k, _| escrow_limit(config, k, now_ms).is_some());
        out
    }

    /// This node's position on every current escrow counter.
    pub fn rights_status(&self, config: &Config, now_ms: i64) -> Vec<RightsStatus> {
        let me = self.node_id();
        let mut out: Vec<RightsStatus> = self
            .counters()
            .filter(|(_, c)| c.is_escrow())
            .filter_map(|(k, c)| {
                let limit = escrow_limit(config, k, now_ms)?;
                Some(RightsStatus {
                    license: k.license.clone(),
                    quota: k.quota.clone(),
                    epoch: k.epoch,
                    scope: k.scope.clone(),
                    limit,
                    used: c.value(),
                    held: c.available(me, limit),
                    demand: self
                        .rates
                        .get(k)
                        .map(|r| r.rate.clone())
                        .unwrap_or_default(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.license, &a.quota, a.epoch).cmp(&(&b.license, &b.quota, b.epoch)));
        out
    }
}
