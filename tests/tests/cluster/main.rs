//! A Raft cluster of real nodes on loopback: replication, forwarding,
//! restart, join by snapshot, history and rollback, key revocation, loss of
//! quorum, usage gossip, the lineage graph, exceptions and escalations. Every
//! node runs in this process with its own ports and sled directory; clients
//! talk HTTP to them like any other client.

mod t10_replication;
mod t20_restart;
mod t30_join;
mod t40_history;
mod t50_quorum;
mod t60_gossip;
mod t70_governance;
mod t70_lineage;
mod t80_drain;
