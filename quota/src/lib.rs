//! Tollgate's domain core, sans-I/O.
//!
//! This crate owns the license document schema and its validation, the model
//! and dataset registries, the replicated configuration state machine's data and its change
//! history (decision records with structural diffs, point-in-time lookup and
//! rollback), the request signals, the decision function, the usage
//! counters and the lineage graph counted in them. It performs no I/O,
//! spawns no tasks and never reads the clock: time and randomness are
//! arguments. That is what keeps it fast, property-testable and simulable.
//!
//! Call order on the hot path: [`request::CheckRequest::validate`], then
//! [`usage::Usage::check`] (which is [`decision::decide`] followed by
//! [`usage::Usage::commit`]), then periodically [`usage::Usage::take_dirty`]
//! to persist and gossip changed counters.
//!
//! On the admin path: [`config::Config::apply`] takes one
//! [`config::ConfigCommand`] at a log index and appends a
//! [`history::ChangeRecord`] for every applied license change;
//! [`config::Config::license_history`] and [`config::Config::license_as_of`]
//! read that history back, and [`config::ConfigOp::RollbackLicense`] writes
//! an earlier version back through the log. Quota exceptions and escalation
//! records ([`governance`]) are replicated the same way; approved exceptions
//! raise a limit through [`config::Config::quota_limit`], which `decide`
//! reads with `now_ms`. [`alerts`] says when a threshold crossing, a
//! deny-rate spike or an escalation is due; node/ delivers them.

pub mod alerts;
pub mod config;
pub mod counter;
pub mod dataset;
pub mod decision;
pub mod escrow;
pub mod gossip;
pub mod governance;
pub mod hashing;
pub mod history;
pub mod keys;
pub mod license;
pub mod lineage;
pub mod planted;
pub mod request;
pub mod seats;
pub mod usage;
pub mod utilization;

pub use decision::{Decision, Outcome, ReasonCode, decide};
