//! The edge and admin APIs over real loopback sockets, one in-process node
//! per test: checks, quotas, bad input, admin, seats, dataset lineage.

mod t10_check;
mod t20_quota;
mod t30_bad_input;
mod t40_admin;
mod t50_seats;
mod t60_alerts;
mod t60_lineage;
mod t70_exceptions;
mod t80_escalations;
