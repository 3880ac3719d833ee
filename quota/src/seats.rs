//! Seats: concurrently running instances of a license, held as leases.
//!
//! A seat is a lease granted by one node with a TTL; the caller renews it
//! while the instance runs and releases it when it stops, and a lease that
//! is not renewed in time lapses by itself ([`Usage::expire_seats`]). The
//! number of seats in use is an escrow counter per license
//! ([`crate::usage::seats_key`], limit `max_instances`), so the limit holds
//! across the whole cluster: a node grants a seat only from rights it holds,
//! gives a unit back on release or expiry, and gets rights from other nodes
//! when it has demand and they have spare ones.
//!
//! Leases live at the node that granted them (their id starts with its id
//! in hex); renew and release go to that node.

use serde::Serialize;

use crate::config::Config;
use crate::decision::{Reason, ReasonCode, Warning, status_reasons};
use crate::license::License;
use crate::usage::{Lease, Usage, seats_key};

/// Longest instance label accepted.
pub const MAX_INSTANCE_LEN: usize = 256;

/// A seat call: acquire (with `instance`), renew or release (with `lease_id`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeatRequest {
    /// The API key.
    pub key: String,
    /// Instance label (acquire); one live lease per label and node.
    pub instance: String,
    /// The lease (renew, release).
    pub lease_id: String,
    /// Requested lease length; capped by the license's `seat_lease_ttl`.
    pub ttl_ms: Option<u64>,
}

/// The answer to a seat call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeatDecision {
    /// Whether the seat is held after the call (false after a release).
    pub granted: bool,
    /// Why not, when refused.
    pub reasons: Vec<Reason>,
    /// Non-blocking notices (grace period).
    pub warnings: Vec<Warning>,
    /// The lease.
    pub lease_id: Option<String>,
    /// When the lease lapses unless renewed (unix ms).
    pub expires_at_ms: Option<i64>,
    /// Seats in use across the cluster, as this node knows it.
    pub in_use: u64,
    /// `max_instances` (0: unlimited).
    pub max_instances: u32,
    /// When to retry a refused acquire.
    pub retry_after_ms: Option<u64>,
    /// The license.
    pub license_id: Option<String>,
    /// Config version the call was decided against.
    pub policy_version: u64,
}

impl SeatDecision {
    fn new(config: &Config) -> Self {
        Self {
            granted: false,
            reasons: Vec::new(),
            warnings: Vec::new(),
            lease_id: None,
            expires_at_ms: None,
            in_use: 0,
            max_instances: 0,
            retry_after_ms: None,
            license_id: None,
            policy_version: config.version,
        }
    }

    fn refuse(mut self, code: ReasonCode, rule: &str, message: String) -> Self {
        self.granted = false;
        self.reasons.push(Reason {
            code,
            message,
            rule: rule.to_string(),
        });
        self
    }

    /// The first reason's code, if any.
    pub fn code(&self) -> Option<ReasonCode> {
        self.reasons.first().map(|r| r.code)
    }
}

/// Why a seat request is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SeatRequestError {
    /// A required field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A field is too long.
    #[error("{0} is longer than {1} bytes")]
    TooLong(&'static str, usize),
}

impl SeatRequest {
    /// Checks the fields an acquire (`acquire = true`) or renew/release needs.
    pub fn validate(&self, acquire: bool) -> Result<(), SeatRequestError> {
        if self.key.is_empty() {
            return Err(SeatRequestError::Missing("key"));
        }
        if self.key.len() > MAX_INSTANCE_LEN {
            return Err(SeatRequestError::TooLong("key", MAX_INSTANCE_LEN));
        }
        let (name, value) = if acquire {
            ("instance", &self.instance)
        } else {
            ("lease_id", &self.lease_id)
        };
        if value.is_empty() {
            return Err(SeatRequestError::Missing(name));
        }
        if value.len() > MAX_INSTANCE_LEN {
            return Err(SeatRequestError::TooLong(name, MAX_INSTANCE_LEN));
        }
        Ok(())
    }
}

/// The node id a lease id names (its hex prefix before the first `.`).
pub fn lease_node(lease_id: &str) -> Option<u64> {
    let (node, _) = lease_id.split_once('.')?;
    u64::from_str_radix(node, 16).ok()
}

impl Usage {
    /// Looks up the license and checks that it is in force.
    fn seat_license<'c>(
        &self,
        config: &'c Config,
        key: &str,
        now_ms: i64,
        d: &mut SeatDecision,
    ) -> Option<&'c License> {
        let Some(license) = config.license_by_key(key) else {
            d.reasons.push(Reason {
                code: ReasonCode::UnknownKey,
                message: "the API key is not recognised".to_string(),
                rule: "keys".to_string(),
            });
            return None;
        };
        d.license_id = Some(license.id.clone());
        d.max_instances = license.max_instances;
        d.in_use = self.counter_value(&seats_key(&license.id));
        let (reasons, warnings) = status_reasons(license, now_ms);
        d.warnings = warnings;
        if !reasons.is_empty() {
            d.reasons = reasons;
            return None;
        }
        Some(license)
    }

    fn lease_ttl(license: &License, requested: Option<u64>) -> i64 {
        let max = license.seat_lease_ttl_ms();
        let ttl = requested.map_or(max, |r| r.clamp(1_000, max));
        i64::try_from(ttl).unwrap_or(i64::MAX)
    }

    /// Grants a seat lease (`lease_id` is a fresh id from the caller, which
    /// owns randomness), or renews this instance's live lease at this node.
    pub fn acquire_seat(
        &mut self,
        config: &Config,
        req: &SeatRequest,
        now_ms: i64,
        lease_id: String,
    ) -> SeatDecision {
        let mut d = SeatDecision::new(config);
        self.expire_seats(now_ms);
        let Some(license) = self.seat_license(config, &req.key, now_ms, &mut d) else {
            return d;
        };
        let expires = now_ms.saturating_add(Self::lease_ttl(license, req.ttl_ms));
        let existing = self
            .leases
            .iter()
            .find(|(_, l)| l.license == license.id && l.instance == req.instance)
            .map(|(id, _)| id.clone());
        if let Some(id) = existing {
            if let Some(lease) = self.leases.get_mut(&id) {
                lease.expires_ms = expires;
            }
            self.dirty_leases.insert(id.clone());
            d.granted = true;
            d.lease_id = Some(id);
            d.expires_at_ms = Some(expires);
            return d;
        }
        let max = u64::from(license.max_instances);
        if max > 0 {
            let key = seats_key(&license.id);
            let in_use = self.counter_value(&key);
            if self.escrow_available(&key, max) == 0 {
                if in_use < max {
                    let retry = self.rights_retry_ms();
                    let node = self.node_id();
                    self.update_counter(&key, true, |c| c.starve(node, 1));
                    d.retry_after_ms = Some(retry);
                    return d.refuse(
                        ReasonCode::QuotaRightsUnavailable,
                        "max_instances",
                        format!(
                            "{in_use} of {max} seats are in use across the cluster, but the free ones are held by other nodes; they move here on demand, retry in {retry} ms"
                        ),
                    );
                }
                d.retry_after_ms = self
                    .leases
                    .values()
                    .filter(|l| l.license == license.id)
                    .map(|l| u64::try_from(l.expires_ms.saturating_sub(now_ms)).unwrap_or(0))
                    .min()
                    .map(|ms| ms.max(1));
                return d.refuse(
                    ReasonCode::SeatLimitReached,
                    "max_instances",
                    format!(
                        "all {max} seats of license {} are in use; one frees when an instance releases it or its lease lapses",
                        license.id
                    ),
                );
            }
            let node = self.node_id();
            self.update_counter(&key, true, |c| c.consume(node, 1));
            d.in_use = self.counter_value(&key);
        }
        self.leases.insert(
            lease_id.clone(),
            Lease {
                license: license.id.clone(),
                instance: req.instance.clone(),
                expires_ms: expires,
                counted: max > 0,
            },
        );
        self.dirty_leases.insert(lease_id.clone());
        d.granted = true;
        d.lease_id = Some(lease_id);
        d.expires_at_ms = Some(expires);
        d
    }

    /// The live lease `lease_id` of the key's license.
    fn own_lease(&self, license: &License, lease_id: &str) -> Option<Lease> {
        self.leases
            .get(lease_id)
            .filter(|l| l.license == license.id)
            .cloned()
    }

    /// The refusal for a lease this node does not hold.
    fn unknown_lease(&self, license: &License, lease_id: &str, d: SeatDecision) -> SeatDecision {
        let elsewhere = lease_node(lease_id)
            .filter(|n| *n != self.node_id())
            .map(|n| format!("; it was granted by node {n}, so renew or release it there"))
            .unwrap_or_default();
        d.refuse(
            ReasonCode::SeatLeaseUnknown,
            "max_instances",
            format!(
                "no live seat lease {lease_id:?} for license {} on this node{elsewhere}; acquire a new seat",
                license.id
            ),
        )
    }

    /// Extends a live lease by its TTL.
    pub fn renew_seat(&mut self, config: &Config, req: &SeatRequest, now_ms: i64) -> SeatDecision {
        let mut d = SeatDecision::new(config);
        self.expire_seats(now_ms);
        let Some(license) = self.seat_license(config, &req.key, now_ms, &mut d) else {
            return d;
        };
        let Some(lease) = self.own_lease(license, &req.lease_id) else {
            return self.unknown_lease(license, &req.lease_id, d);
        };
        let expires = now_ms.saturating_add(Self::lease_ttl(license, req.ttl_ms));
        self.leases.insert(
            req.lease_id.clone(),
            Lease {
                expires_ms: expires,
                ..lease
            },
        );
        self.dirty_leases.insert(req.lease_id.clone());
        d.granted = true;
        d.lease_id = Some(req.lease_id.clone());
        d.expires_at_ms = Some(expires);
        d
    }

    /// Gives a seat back. Releasing works on a revoked or expired license
    /// too: freeing a seat is always allowed.
    pub fn release_seat(
        &mut self,
        config: &Config,
        req: &SeatRequest,
        now_ms: i64,
    ) -> SeatDecision {
        let mut d = SeatDecision::new(config);
        self.expire_seats(now_ms);
        if self
            .seat_license(config, &req.key, now_ms, &mut d)
            .is_none()
            && d.code() == Some(ReasonCode::UnknownKey)
        {
            return d;
        }
        d.reasons.clear();
        let Some(license) = config.license_by_key(&req.key) else {
            return d;
        };
        if self.own_lease(license, &req.lease_id).is_none() {
            return self.unknown_lease(license, &req.lease_id, d);
        }
        self.drop_lease(&req.lease_id);
        d.in_use = self.counter_value(&seats_key(&license.id));
        d.lease_id = Some(req.lease_id.clone());
        d
    }

    fn drop_lease(&mut self, lease_id: &str) {
        if let Some(lease) = self.leases.remove(lease_id) {
            self.dirty_leases.insert(lease_id.to_string());
            let key = seats_key(&lease.license);
            if lease.counted && self.counter(&key).is_some() {
                let node = self.node_id();
                self.update_counter(&key, true, |c| c.release(node, 1));
            }
        }
    }

    /// Lets every lease that was not renewed in time lapse, freeing its
    /// seat. Returns how many lapsed.
    pub fn expire_seats(&mut self, now_ms: i64) -> usize {
        let lapsed: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &lapsed {
            self.drop_lease(id);
        }
        lapsed.len()
    }

    /// Leases held at this node.
    pub fn leases(&self) -> impl Iterator<Item = (&String, &Lease)> {
        self.leases.iter()
    }

    /// Leases changed since the last call: (id, `Some(lease)` to store or
    /// `None` to delete).
    pub fn take_dirty_leases(&mut self) -> Vec<(String, Option<Lease>)> {
        let dirty = std::mem::take(&mut self.dirty_leases);
        dirty
            .into_iter()
            .map(|id| {
                let lease = self.leases.get(&id).cloned();
                (id, lease)
            })
            .collect()
    }

    /// Loads a stored lease at start-up.
    pub fn restore_lease(&mut self, id: String, lease: Lease) {
        self.leases.insert(id, lease);
    }

    /// Hands back what [`Self::take_dirty_leases`] returned when writing failed.
    pub fn restore_leases_dirty(&mut self, ids: impl IntoIterator<Item = String>) {
        self.dirty_leases.extend(ids);
    }
}
