//! What happened in one run: every client call with its outcome, every
//! fault, and samples of the nodes' state, each stamped with simulated time.
//!
//! This module owns the record and its hash (the trace hash that proves a
//! seed replays). Checkers read it; nothing here judges it.

use std::hash::{Hash, Hasher};

use serde::Serialize;

/// Which license an operation used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Lic {
    /// The soft-quota license (Checks only).
    Soft,
    /// The strict-quota license.
    Strict,
    /// The metered license (Reports only).
    Metered,
    /// The seat license.
    Seats,
    /// The rate-limited license.
    Rate,
}

/// How a call ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The node answered `allow` (or granted a seat).
    Allow,
    /// The node answered with a denial (reason code).
    Deny(String),
    /// No answer: the call may or may not have taken effect.
    Unknown(String),
}

/// One client call.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Call {
    /// Client host name.
    pub client: String,
    /// Node the call went to.
    pub node: u64,
    /// Simulated ms when the call was sent.
    pub sent_ms: u64,
    /// Simulated ms when it ended.
    pub done_ms: u64,
    /// The operation.
    pub op: Op,
    /// Its outcome.
    pub outcome: Outcome,
}

/// A client operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A Check of `quantity` units; `window` is the reset time the node
    /// reported for the quota (identifies the window), 0 when unknown.
    Check {
        /// License.
        lic: Lic,
        /// Units.
        quantity: u64,
        /// Window id (reset time, ms), when answered.
        window: i64,
    },
    /// A Report of `quantity` units.
    Report {
        /// Units.
        quantity: u64,
        /// Window id, when answered.
        window: i64,
    },
    /// A seat acquire; `lease` is the granted lease id.
    Acquire {
        /// The lease granted, if any.
        lease: String,
    },
    /// A lease renewal.
    Renew {
        /// The lease.
        lease: String,
    },
    /// A lease release.
    Release {
        /// The lease.
        lease: String,
    },
    /// An admin write of the churned license; `version` is the committed
    /// config version when acknowledged.
    Admin {
        /// What was written: `put`, `revoke` or `rollback`.
        action: String,
        /// The committed version (0 when not acknowledged).
        version: u64,
    },
    /// A dry-run Check sent to prove a node serves (liveness).
    Probe,
}

impl Op {
    /// The counted units of a Check or Report, with the license counted
    /// and the window id: what the counter checkers add up.
    pub fn counted(&self) -> Option<(Lic, u64, i64)> {
        match self {
            Op::Check {
                lic,
                quantity,
                window,
            } if matches!(lic, Lic::Soft | Lic::Strict) => Some((*lic, *quantity, *window)),
            Op::Report { quantity, window } => Some((Lic::Metered, *quantity, *window)),
            _ => None,
        }
    }
}

/// A fault the driver injected, or a node lifecycle event.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct FaultEvent {
    /// Simulated ms.
    pub at_ms: u64,
    /// What, e.g. `crash 3` or `partition [1,2] | [3,4,5]`.
    pub what: String,
}

/// A sample of one node's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Sample {
    /// Simulated ms.
    pub at_ms: u64,
    /// Node id.
    pub node: u64,
    /// Incarnation (restarts so far).
    pub incarnation: u32,
    /// Config version.
    pub config_version: u64,
    /// Highest strict-quota usage this node sees, per window.
    pub strict_used: Vec<(i64, u64)>,
}

/// Everything recorded in one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct History {
    /// Client calls, in completion order.
    pub calls: Vec<Call>,
    /// Faults and lifecycle events, in order.
    pub faults: Vec<FaultEvent>,
    /// Node samples, in order.
    pub samples: Vec<Sample>,
}

impl History {
    /// A hash of the whole record: equal for two runs exactly when they
    /// recorded the same calls, outcomes, faults and samples at the same
    /// simulated times.
    pub fn trace_hash(&self) -> u64 {
        // FNV-1a through `Hash`: stable across processes, unlike std's
        // randomly keyed SipHash.
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        self.calls.hash(&mut h);
        self.faults.hash(&mut h);
        self.samples.hash(&mut h);
        h.finish()
    }
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
