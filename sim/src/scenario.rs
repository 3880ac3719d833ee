//! Scenario files: what cluster to build, what load to put on it and which
//! faults to inject when.
//!
//! This module owns the scenario format (YAML, one file per scenario in
//! `sim/scenarios/`) and its validation. The format names nodes by id and
//! faults by kind, with times in milliseconds from the start of the run, so
//! that the chaos tool can read the same files against a real cluster. It
//! must not run anything: `run` executes a scenario, `check` judges it.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The scenarios shipped with the simulator, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "region-partition-during-load",
        include_str!("../scenarios/region-partition-during-load.yaml"),
    ),
    (
        "leader-kill-during-writes",
        include_str!("../scenarios/leader-kill-during-writes.yaml"),
    ),
    (
        "crash-restart-loses-unsynced",
        include_str!("../scenarios/crash-restart-loses-unsynced.yaml"),
    ),
    (
        "clock-skew-at-window-boundary",
        include_str!("../scenarios/clock-skew-at-window-boundary.yaml"),
    ),
    ("oneway-loss", include_str!("../scenarios/oneway-loss.yaml")),
    (
        "membership-churn",
        include_str!("../scenarios/membership-churn.yaml"),
    ),
    (
        "hold-and-release",
        include_str!("../scenarios/hold-and-release.yaml"),
    ),
    (
        "ring-partition",
        include_str!("../scenarios/ring-partition.yaml"),
    ),
    (
        "raft-silent-partition",
        include_str!("../scenarios/raft-silent-partition.yaml"),
    ),
    (
        "escrow-ping-pong",
        include_str!("../scenarios/escrow-ping-pong.yaml"),
    ),
    (
        "late-usage-after-window-end",
        include_str!("../scenarios/late-usage-after-window-end.yaml"),
    ),
    (
        "removed-node-drains",
        include_str!("../scenarios/removed-node-drains.yaml"),
    ),
];

/// A scenario file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// No built-in scenario has that name.
    #[error("no scenario named {name:?}; known: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The known names.
        known: String,
    },
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse.
    #[error("scenario {name}: {source}")]
    Parse {
        /// The scenario.
        name: String,
        /// Why.
        #[source]
        source: serde_yaml::Error,
    },
    /// The scenario parses but is not runnable.
    #[error("scenario {name}: {reason}")]
    Invalid {
        /// The scenario.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// One scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The scenario's name (the file name without `.yaml`).
    pub name: String,
    /// What it exercises.
    #[serde(default)]
    pub description: String,
    /// Nodes founding the cluster: ids 1..=nodes.
    pub nodes: u64,
    /// Region of each node, cycled (node 1 gets the first).
    #[serde(default = "default_regions")]
    pub regions: Vec<String>,
    /// Wall-clock time at the start of the run (RFC 3339), e.g. just before
    /// a window boundary.
    #[serde(default = "default_epoch")]
    pub epoch: String,
    /// How long clients send load, in simulated milliseconds.
    pub duration_ms: u64,
    /// After the load ends and every fault is healed, how long the cluster
    /// has to converge and serve again.
    #[serde(default = "default_settle")]
    pub settle_ms: u64,
    /// Convergence must happen within this many gossip intervals of the
    /// last heal.
    #[serde(default = "default_converge_intervals")]
    pub converge_within_intervals: u64,
    /// Message latency bounds on every link.
    #[serde(default)]
    pub latency_ms: LatencyRange,
    /// The load.
    #[serde(default)]
    pub workload: Workload,
    /// Faults, in time order.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Every node's `gossip.drain_timeout_ms`; 0 turns the drain off (a
    /// removed node reports its drain over at once and is stopped).
    /// Default: the node's default.
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

/// Minimum and maximum one-way latency.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyRange {
    /// Lower bound (ms).
    pub min: u64,
    /// Upper bound (ms).
    pub max: u64,
}

impl Default for LatencyRange {
    fn default() -> Self {
        Self { min: 1, max: 5 }
    }
}

/// Clients and what they send; a field left out takes its default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Client hosts; client k talks to node ((k - 1) mod nodes) + 1 and
    /// fails over to the next on errors.
    pub clients: u64,
    /// Mean pause between one client's calls (ms); drawn from the seed.
    pub think_ms: u64,
    /// Relative weights of the operations.
    pub mix: Mix,
    /// One admin client applies, revokes and rolls back licenses this often
    /// (ms); 0 disables it.
    pub admin_every_ms: u64,
    /// Limit of the soft quota.
    pub soft_limit: u64,
    /// Limit of the strict quota.
    pub strict_limit: u64,
    /// `max_instances` of the seat license.
    pub max_instances: u64,
    /// Seat lease TTL (s).
    pub seat_ttl_s: u64,
    /// Requests per second of the rate-limited license, per key.
    pub rate_per_second: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            clients: 3,
            think_ms: 20,
            mix: Mix::default(),
            admin_every_ms: 1_500,
            soft_limit: 400,
            strict_limit: 300,
            max_instances: 2,
            seat_ttl_s: 4,
            rate_per_second: 20,
        }
    }
}

/// Relative weights of the client operations.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    /// Check against the soft quota.
    pub soft: u32,
    /// Check against the strict quota.
    pub strict: u32,
    /// Report (usage measured after the fact) against the soft quota.
    pub report: u32,
    /// Seat acquire / renew / release.
    pub seat: u32,
    /// Check against the rate-limited license.
    pub rate: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            soft: 4,
            strict: 4,
            report: 1,
            seat: 2,
            rate: 1,
        }
    }
}

/// A time: fixed, or drawn from the seed within a range.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum At {
    /// Exactly this many ms after the start.
    Exact(u64),
    /// Uniformly within `[lo, hi]`.
    Range([u64; 2]),
}

/// Which node(s) a fault hits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// This node.
    Node(u64),
    /// The current Raft leader (as the nodes see it).
    Leader,
    /// A node other than the leader, drawn from the seed.
    Follower,
    /// Any running node, drawn from the seed.
    Random,
}

/// One fault step.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// When.
    pub at_ms: At,
    /// What.
    #[serde(flatten)]
    pub kind: FaultKind,
}

/// What a fault does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Cuts every link between the groups (both ways). Nodes not listed
    /// stay connected to everyone.
    Partition {
        /// Groups of node ids; `regions: true` groups by region instead.
        #[serde(default)]
        groups: Vec<Vec<u64>>,
        /// Group the nodes by region.
        #[serde(default)]
        regions: bool,
    },
    /// Cuts node i from node i+1 (mod n) for every i: a ring of cuts where
    /// every node still reaches someone.
    Ring,
    /// Cuts the links from `from` to `to` only (messages the other way
    /// still flow).
    OneWay {
        /// Senders whose messages are dropped.
        from: Vec<u64>,
        /// Receivers.
        to: Vec<u64>,
    },
    /// Holds messages between the groups (delivered later, in a burst, at
    /// `release`).
    Hold {
        /// Groups of node ids.
        groups: Vec<Vec<u64>>,
    },
    /// Delivers everything held.
    Release,
    /// Drops messages on the links from `from` to `to` with probability
    /// `rate` (one way).
    Loss {
        /// Senders.
        from: Vec<u64>,
        /// Receivers.
        to: Vec<u64>,
        /// Drop probability in [0, 1].
        rate: f64,
    },
    /// Sets the latency of every link of `nodes`.
    Latency {
        /// Nodes.
        nodes: Vec<u64>,
        /// One-way latency (ms).
        ms: u64,
    },
    /// Repairs every cut, loss and latency change, and releases holds.
    HealAll,
    /// Kills a node: its process state is gone and writes it had not synced
    /// are lost.
    Crash {
        /// Which node.
        target: Target,
    },
    /// Starts a crashed node again on its storage.
    Restart {
        /// Which node (`random` picks a crashed one).
        target: Target,
    },
    /// Moves a node's wall clock by `ms` (negative: behind).
    Skew {
        /// Which node.
        target: Target,
        /// Offset from true time (ms).
        ms: i64,
    },
    /// Starts a new node with this id; it joins through a running member.
    AddNode {
        /// The new node's id.
        id: u64,
    },
    /// Removes a node from the membership (through a running member) and
    /// stops it.
    RemoveNode {
        /// Which node.
        target: Target,
    },
}

fn default_regions() -> Vec<String> {
    vec!["eu".into(), "us".into(), "ap".into()]
}
fn default_epoch() -> String {
    "2026-11-23T12:00:00Z".into()
}
fn default_settle() -> u64 {
    6_000
}
fn default_converge_intervals() -> u64 {
    20
}

impl Scenario {
    /// A built-in scenario by name.
    pub fn builtin(name: &str) -> Result<Self, ScenarioError> {
        let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) else {
            return Err(ScenarioError::Unknown {
                name: name.to_string(),
                known: BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        Self::parse(name, text)
    }

    /// Every built-in scenario, in the order of [`BUILTIN`].
    pub fn all_builtin() -> Result<Vec<Self>, ScenarioError> {
        BUILTIN.iter().map(|(n, t)| Self::parse(n, t)).collect()
    }

    /// Reads a scenario file.
    pub fn from_file(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::parse(&name, &text)
    }

    /// Parses and validates scenario text.
    pub fn parse(name: &str, text: &str) -> Result<Self, ScenarioError> {
        let scenario: Self = serde_yaml::from_str(text).map_err(|source| ScenarioError::Parse {
            name: name.to_string(),
            source,
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// The epoch in Unix milliseconds.
    pub fn epoch_ms(&self) -> Result<i64, ScenarioError> {
        chrono::DateTime::parse_from_rfc3339(&self.epoch)
            .map(|t| t.timestamp_millis())
            .map_err(|e| self.invalid(format!("epoch {:?}: {e}", self.epoch)))
    }

    /// Every node id that can ever exist in this scenario.
    pub fn all_node_ids(&self) -> BTreeSet<u64> {
        let mut ids: BTreeSet<u64> = (1..=self.nodes).collect();
        for f in &self.faults {
            if let FaultKind::AddNode { id } = f.kind {
                ids.insert(id);
            }
        }
        ids
    }

    /// The region of node `id`.
    pub fn region_of(&self, id: u64) -> String {
        let n = self.regions.len().max(1) as u64;
        self.regions
            .get(((id.saturating_sub(1)) % n) as usize)
            .cloned()
            .unwrap_or_else(|| "local".into())
    }

    fn invalid(&self, reason: String) -> ScenarioError {
        ScenarioError::Invalid {
            name: self.name.clone(),
            reason,
        }
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        if self.nodes == 0 || self.nodes > 9 {
            return Err(self.invalid(format!("nodes must be 1..=9, not {}", self.nodes)));
        }
        if self.regions.is_empty() {
            return Err(self.invalid("regions must not be empty".into()));
        }
        if self.latency_ms.min > self.latency_ms.max {
            return Err(self.invalid("latency_ms.min exceeds latency_ms.max".into()));
        }
        if self.workload.clients == 0 || self.workload.clients > 16 {
            return Err(self.invalid("workload.clients must be 1..=16".into()));
        }
        self.epoch_ms()?;
        let ids = self.all_node_ids();
        if ids.len() > 9 || ids.iter().any(|&id| id == 0 || id > 9) {
            return Err(self.invalid("node ids must be 1..=9".into()));
        }
        let known = |id: &u64| ids.contains(id);
        for (i, f) in self.faults.iter().enumerate() {
            let at = match f.at_ms {
                At::Exact(t) => t,
                At::Range([lo, hi]) => {
                    if lo > hi {
                        return Err(self.invalid(format!("faults[{i}]: at_ms range is inverted")));
                    }
                    hi
                }
            };
            if at > self.duration_ms {
                return Err(self.invalid(format!(
                    "faults[{i}] at {at} ms is after the load ends ({} ms)",
                    self.duration_ms
                )));
            }
            let listed: Vec<u64> = match &f.kind {
                FaultKind::Partition { groups, .. } | FaultKind::Hold { groups } => {
                    groups.iter().flatten().copied().collect()
                }
                FaultKind::OneWay { from, to } | FaultKind::Loss { from, to, .. } => {
                    from.iter().chain(to).copied().collect()
                }
                FaultKind::Latency { nodes, .. } => nodes.clone(),
                FaultKind::Crash {
                    target: Target::Node(n),
                }
                | FaultKind::Restart {
                    target: Target::Node(n),
                }
                | FaultKind::Skew {
                    target: Target::Node(n),
                    ..
                }
                | FaultKind::RemoveNode {
                    target: Target::Node(n),
                } => vec![*n],
                _ => Vec::new(),
            };
            if let Some(bad) = listed.iter().find(|id| !known(id)) {
                return Err(
                    self.invalid(format!("faults[{i}] names node {bad}, which never exists"))
                );
            }
            if let FaultKind::Loss { rate, .. } = f.kind
                && !(0.0..=1.0).contains(&rate)
            {
                return Err(self.invalid(format!("faults[{i}]: loss rate {rate} is not in [0, 1]")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_scenario_parses() {
        let all = Scenario::all_builtin().expect("builtin scenarios parse");
        assert_eq!(all.len(), BUILTIN.len());
        for (s, (name, _)) in all.iter().zip(BUILTIN) {
            assert_eq!(&s.name, name, "the file's name field matches its file name");
        }
    }

    #[test]
    fn a_fault_on_a_node_that_never_exists_is_refused() {
        let text = "name: x\nnodes: 3\nduration_ms: 1000\nfaults:\n  - at_ms: 10\n    crash: {target: {node: 7}}\n";
        let err = Scenario::parse("x", text).expect_err("node 7 does not exist");
        assert!(err.to_string().contains("node 7"), "{err}");
    }
}
