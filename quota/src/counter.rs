//! The replicated state of one usage counter, and escrow arithmetic.
//!
//! A [`Counter`] is a state-based CRDT: every field is a map of grow-only
//! entries merged by per-entry max (plus `members`, which is fixed when the
//! counter is created), so merging is commutative, associative and
//! idempotent, and a node may receive states late, twice or out of order.
//!
//! - **Soft** quotas use `slots` alone: a G-Counter with one slot per node.
//! - **Strict** quotas and **seats** are bounded counters (escrow, after
//!   Balegas et al., SRDS 2015). The limit is split among `members` as
//!   initial rights; `transfers[from][to]` records rights moved between
//!   nodes. A node's rights are its share plus what it received minus what it
//!   gave. Only node `n` ever raises `slots[n]`, `released[n]`, `starved[n]`
//!   or `transfers[n][_]`, and it does so only within its own available
//!   rights, so the sum of consumption can never exceed the limit, whatever
//!   the other nodes have or have not heard yet.
//! - Seats give units back: `released[n]` counts seats node `n` freed, so
//!   the units in use are `slots - released`.
//! - `starved[n]` counts units node `n` refused for lack of rights: the demand
//!   signal that makes other nodes move rights to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Replicated state of one counter. Fields are never skipped when
/// serialized: gossip encodes it with postcard, which is not self-describing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Units consumed, per node.
    pub slots: BTreeMap<u64, u64>,
    /// Units given back, per node (seats).
    #[serde(default)]
    pub released: BTreeMap<u64, u64>,
    /// Rights moved: `transfers[from][to]` is the running total.
    #[serde(default)]
    pub transfers: BTreeMap<u64, BTreeMap<u64, u64>>,
    /// Units refused for lack of rights, per node (demand signal).
    #[serde(default)]
    pub starved: BTreeMap<u64, u64>,
    /// The nodes the limit is split among, sorted; empty for soft counters.
    /// Fixed at creation; see [`Counter::merge`] for concurrent creation.
    #[serde(default)]
    pub members: Vec<u64>,
}

fn merge_map(into: &mut BTreeMap<u64, u64>, from: &BTreeMap<u64, u64>) -> bool {
    let mut changed = false;
    for (&node, &value) in from {
        let slot = into.entry(node).or_insert(0);
        if value > *slot {
            *slot = value;
            changed = true;
        }
    }
    changed
}

fn bump(map: &mut BTreeMap<u64, u64>, node: u64, by: u64) {
    let slot = map.entry(node).or_insert(0);
    *slot = slot.saturating_add(by);
}

fn sum(map: &BTreeMap<u64, u64>) -> u64 {
    map.values().fold(0u64, |acc, v| acc.saturating_add(*v))
}

impl Counter {
    /// An escrow counter whose limit is split among `members`.
    pub fn escrow(members: &[u64]) -> Self {
        let mut members = members.to_vec();
        members.sort_unstable();
        members.dedup();
        Self {
            members,
            ..Self::default()
        }
    }

    /// Whether this is an escrow (strict or seat) counter.
    pub fn is_escrow(&self) -> bool {
        !self.members.is_empty()
    }

    /// Joins `other` into `self`; returns whether anything changed.
    ///
    /// `members` is set once; if two nodes created the same counter with
    /// different member lists (a membership change racing the first use of
    /// a window), the lexicographically smaller list wins everywhere, so all
    /// replicas still agree on one split.
    pub fn merge(&mut self, other: &Counter) -> bool {
        let mut changed = merge_map(&mut self.slots, &other.slots);
        changed |= merge_map(&mut self.released, &other.released);
        changed |= merge_map(&mut self.starved, &other.starved);
        for (from, to_map) in other.transfers.iter().filter(|(_, m)| !m.is_empty()) {
            changed |= merge_map(self.transfers.entry(*from).or_default(), to_map);
        }
        if !other.members.is_empty() && (self.members.is_empty() || other.members < self.members) {
            self.members = other.members.clone();
            changed = true;
        }
        changed
    }

    /// Units consumed by every node, minus units given back.
    pub fn value(&self) -> u64 {
        sum(&self.slots).saturating_sub(sum(&self.released))
    }

    /// Units consumed by every node, ignoring releases.
    pub fn consumed(&self) -> u64 {
        sum(&self.slots)
    }

    /// One node's slot.
    pub fn slot(&self, node: u64) -> u64 {
        self.slots.get(&node).copied().unwrap_or(0)
    }

    /// Units `node` holds in use (consumed minus released).
    pub fn in_use(&self, node: u64) -> u64 {
        self.slot(node)
            .saturating_sub(self.released.get(&node).copied().unwrap_or(0))
    }

    /// `node`'s share of `limit` before any transfer: an even split among
    /// `members`, the remainder going one unit each to the lowest ids.
    pub fn share(&self, node: u64, limit: u64) -> u64 {
        let Some(idx) = self.members.iter().position(|&m| m == node) else {
            return 0;
        };
        let n = self.members.len() as u64;
        limit / n + u64::from((idx as u64) < limit % n)
    }

    /// Rights received by `node` from others.
    pub fn received(&self, node: u64) -> u64 {
        self.transfers
            .iter()
            .filter(|(from, _)| **from != node)
            .filter_map(|(_, to)| to.get(&node))
            .fold(0u64, |acc, v| acc.saturating_add(*v))
    }

    /// Rights `node` gave to others.
    pub fn given(&self, node: u64) -> u64 {
        self.transfers.get(&node).map_or(0, |to| {
            to.iter()
                .filter(|(to, _)| **to != node)
                .fold(0u64, |acc, (_, v)| acc.saturating_add(*v))
        })
    }

    /// Rights `node` holds under `limit`: share + received - given. Signed:
    /// a lowered limit can leave a node owing rights.
    pub fn rights(&self, node: u64, limit: u64) -> i128 {
        i128::from(self.share(node, limit)) + i128::from(self.received(node))
            - i128::from(self.given(node))
    }

    /// Rights `node` may still consume: rights minus units in use, floored at 0.
    pub fn available(&self, node: u64, limit: u64) -> u64 {
        let free = self.rights(node, limit) - i128::from(self.in_use(node));
        u64::try_from(free.max(0)).unwrap_or(u64::MAX)
    }

    /// Adds `by` to `node`'s consumption (saturating).
    pub fn consume(&mut self, node: u64, by: u64) {
        bump(&mut self.slots, node, by);
    }

    /// Gives `by` units back from `node` (seats), never more than it holds.
    pub fn release(&mut self, node: u64, by: u64) {
        let by = by.min(self.in_use(node));
        bump(&mut self.released, node, by);
    }

    /// Records `by` units refused at `node` for lack of rights.
    pub fn starve(&mut self, node: u64, by: u64) {
        bump(&mut self.starved, node, by);
    }

    /// Moves `amount` rights from `from` to `to`. The caller must be `from`
    /// and must hold them ([`Self::available`]); escrow safety rests on it.
    pub fn transfer(&mut self, from: u64, to: u64, amount: u64) {
        if from != to && amount > 0 {
            bump(self.transfers.entry(from).or_default(), to, amount);
        }
    }

    /// Every node this counter mentions, sorted.
    pub fn nodes(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .members
            .iter()
            .chain(self.slots.keys())
            .chain(self.starved.keys())
            .chain(self.transfers.keys())
            .chain(self.transfers.values().flat_map(|to| to.keys()))
            .copied()
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The demand signal of `node`: units it consumed plus units it was refused.
    pub fn demand(&self, node: u64) -> u64 {
        self.slot(node)
            .saturating_add(self.starved.get(&node).copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_the_limit_exactly() {
        let c = Counter::escrow(&[3, 1, 2]);
        assert_eq!(c.members, vec![1, 2, 3]);
        let shares: Vec<u64> = [1, 2, 3].iter().map(|&n| c.share(n, 10)).collect();
        assert_eq!(shares, vec![4, 3, 3]);
        assert_eq!(c.share(9, 10), 0);
    }

    #[test]
    fn rights_follow_transfers_and_consumption() {
        let mut c = Counter::escrow(&[1, 2]);
        assert_eq!(c.available(1, 10), 5);
        c.consume(1, 2);
        c.transfer(1, 2, 3);
        assert_eq!(c.available(1, 10), 0);
        assert_eq!(c.available(2, 10), 8);
        c.release(1, 5);
        assert_eq!(c.in_use(1), 0);
        assert_eq!(c.available(1, 10), 2);
        assert_eq!(c.value(), 0);
    }

    #[test]
    fn members_converge_to_one_list() {
        let mut a = Counter::escrow(&[1, 2, 3]);
        let mut b = Counter::escrow(&[1, 2]);
        let (a0, b0) = (a.clone(), b.clone());
        a.merge(&b0);
        b.merge(&a0);
        assert_eq!(a.members, b.members);
        let mut soft = Counter::default();
        assert!(soft.merge(&a));
        assert_eq!(soft.members, a.members);
    }

    #[test]
    fn old_stored_format_still_reads() {
        let c: Counter = serde_json::from_str(r#"{"slots":{"1":5,"2":3}}"#).expect("reads");
        assert_eq!(c.value(), 8);
        assert!(!c.is_escrow());
    }
}
