//! Tollgate's wire contracts: the generated tonic/prost code for the edge API
//! (`tollgate.v1.Edge`), the admin API (`tollgate.v1.Admin`) and the Raft
//! transport between cluster members (`tollgate.v1.Raft`).
//!
//! This crate holds no logic; conversions to and from domain types live in
//! the node, next to the code that serves them.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `tollgate.v1`: the edge, admin and Raft services and their messages.
pub mod v1 {
    tonic::include_proto!("tollgate.v1");
}
