//! Tollgate's domain core, sans-I/O.
//!
//! This crate owns the license document schema and its validation, the model
//! registry, the replicated configuration state machine's data, the request
//! signals, the decision function and the usage counters. It performs no I/O,
//! spawns no tasks and never reads the clock: time and randomness are
//! arguments. That is what keeps it fast, property-testable and simulable.
//!
//! Call order on the hot path: [`request::CheckRequest::validate`], then
//! [`usage::Usage::check`] (which is [`decision::decide`] followed by
//! [`usage::Usage::commit`]), then periodically [`usage::Usage::take_dirty`]
//! to persist and gossip changed counters.

pub mod config;
pub mod decision;
pub mod keys;
pub mod license;
pub mod request;
pub mod usage;

pub use decision::{Decision, Outcome, ReasonCode, decide};
