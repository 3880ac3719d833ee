//! The signals one Check (or Report) carries, and their bounds.
//!
//! This module owns the request shape and its cheap structural validation
//! (sizes, emptiness, duplicates). It must not look at licenses: whether a
//! well-formed request is allowed is the decision module's business.

use serde::{Deserialize, Serialize};

/// Most meters one request may carry.
pub const MAX_METERS: usize = 16;
/// Largest quantity one meter may carry; more is treated as a client bug.
pub const MAX_METER_QUANTITY: u64 = 1_000_000_000;
/// Longest allowed string field, in bytes.
pub const MAX_FIELD_BYTES: usize = 256;
/// Most lineage entries (dataset releases) one request may name.
pub const MAX_LINEAGE: usize = 16;
/// Shortest caller-supplied content hash, in hex characters (128 bits).
pub const MIN_CONTENT_HASH_HEX: usize = 32;
/// Longest caller-supplied content hash, in hex characters (512 bits).
pub const MAX_CONTENT_HASH_HEX: usize = 128;

/// One metered quantity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// Metric name, matched against `quotas[].metric`.
    pub metric: String,
    /// Amount used, 1..=`MAX_METER_QUANTITY`.
    pub quantity: u64,
}

/// One dataset release that feeds the use: its data lineage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageEntry {
    /// Dataset id, as registered by a `kind: Dataset` document.
    pub dataset: String,
    /// Release of that dataset (its `releases[].version`).
    pub release: String,
}

/// A request to use a model once (or a batch).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct CheckRequest {
    /// The plain API key (hashed before lookup; never logged).
    pub key: String,
    /// End user or service the use is for.
    #[serde(default)]
    pub subject: Option<String>,
    /// Model id.
    pub model: String,
    /// Requested model version (semver).
    pub model_version: String,
    /// Feature used.
    #[serde(default)]
    pub feature: Option<String>,
    /// Environment name; absent is treated as `production`.
    #[serde(default)]
    pub environment: Option<String>,
    /// Region the use happens in.
    #[serde(default)]
    pub region: Option<String>,
    /// Device id.
    #[serde(default)]
    pub hardware_id: Option<String>,
    /// Quantities to meter.
    #[serde(default)]
    pub meters: Vec<Meter>,
    /// The dataset releases that feed this use.
    #[serde(default)]
    pub lineage: Vec<LineageEntry>,
    /// Caller's idempotency/correlation id.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Decide without recording anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Caller-computed digest of the inference input, in hex (never the
    /// input itself); kept in the audit trail.
    #[serde(default)]
    pub input_hash: Option<String>,
    /// Caller-computed digest of the inference output, in hex.
    #[serde(default)]
    pub output_hash: Option<String>,
}

// Hand-written so the plain key never reaches logs.
impl std::fmt::Debug for CheckRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckRequest")
            .field("key", &"<redacted>")
            .field("subject", &self.subject)
            .field("model", &self.model)
            .field("model_version", &self.model_version)
            .field("feature", &self.feature)
            .field("environment", &self.environment)
            .field("region", &self.region)
            .field("hardware_id", &self.hardware_id)
            .field("meters", &self.meters)
            .field("lineage", &self.lineage)
            .field("request_id", &self.request_id)
            .field("dry_run", &self.dry_run)
            .field("input_hash", &self.input_hash)
            .field("output_hash", &self.output_hash)
            .finish()
    }
}

/// Why a request is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A required field is missing or empty.
    #[error("{field}: is required")]
    Missing {
        /// Field name.
        field: &'static str,
    },
    /// A string field is longer than `MAX_FIELD_BYTES`.
    #[error("{field}: longer than {MAX_FIELD_BYTES} bytes")]
    TooLong {
        /// Field name.
        field: &'static str,
    },
    /// More than `MAX_METERS` meters.
    #[error("meters: at most {MAX_METERS} meters, got {n_meters}")]
    TooManyMeters {
        /// How many were sent.
        n_meters: usize,
    },
    /// A quantity of 0 or above `MAX_METER_QUANTITY`.
    #[error(
        "meters[{index}].quantity: absurd quantity {quantity} (must be 1..={MAX_METER_QUANTITY})"
    )]
    AbsurdQuantity {
        /// Meter index.
        index: usize,
        /// The quantity sent.
        quantity: u64,
    },
    /// A meter with an empty or too long metric name.
    #[error("meters[{index}].metric: must be 1 to {MAX_FIELD_BYTES} bytes")]
    BadMetric {
        /// Meter index.
        index: usize,
    },
    /// A content hash that is not an even number of hex digits between
    /// `MIN_CONTENT_HASH_HEX` and `MAX_CONTENT_HASH_HEX`.
    #[error(
        "{field}: must be {MIN_CONTENT_HASH_HEX} to {MAX_CONTENT_HASH_HEX} hex digits (an even number), the digest of the content, never the content"
    )]
    BadContentHash {
        /// Field name.
        field: &'static str,
    },
    /// The same metric twice.
    #[error("meters[{index}].metric: duplicate metric {metric:?}")]
    DuplicateMeter {
        /// Meter index of the second occurrence.
        index: usize,
        /// The metric.
        metric: String,
    },
    /// More than `MAX_LINEAGE` lineage entries.
    #[error("lineage: at most {MAX_LINEAGE} dataset releases, got {n_entries}")]
    TooManyLineage {
        /// How many were sent.
        n_entries: usize,
    },
    /// A lineage entry with an empty or too long dataset or release.
    #[error("lineage[{index}].{field}: must be 1 to {MAX_FIELD_BYTES} bytes")]
    BadLineage {
        /// Entry index.
        index: usize,
        /// `dataset` or `release`.
        field: &'static str,
    },
    /// The same dataset release twice.
    #[error("lineage[{index}]: duplicate dataset release {dataset}@{release}")]
    DuplicateLineage {
        /// Entry index of the second occurrence.
        index: usize,
        /// The dataset id.
        dataset: String,
        /// The release.
        release: String,
    },
}

impl CheckRequest {
    /// A request with only the required fields set (handy for callers and tests).
    pub fn new(key: &str, model: &str, model_version: &str) -> Self {
        Self {
            key: key.to_string(),
            subject: None,
            model: model.to_string(),
            model_version: model_version.to_string(),
            feature: None,
            environment: None,
            region: None,
            hardware_id: None,
            meters: Vec::new(),
            lineage: Vec::new(),
            request_id: None,
            dry_run: false,
            input_hash: None,
            output_hash: None,
        }
    }

    /// Structural checks; a request that passes is safe to decide on.
    pub fn validate(&self) -> Result<(), RequestError> {
        for (field, value) in [
            ("key", &self.key),
            ("model", &self.model),
            ("model_version", &self.model_version),
        ] {
            if value.is_empty() {
                return Err(RequestError::Missing { field });
            }
            if value.len() > MAX_FIELD_BYTES {
                return Err(RequestError::TooLong { field });
            }
        }
        for (field, value) in [
            ("subject", &self.subject),
            ("feature", &self.feature),
            ("environment", &self.environment),
            ("region", &self.region),
            ("hardware_id", &self.hardware_id),
            ("request_id", &self.request_id),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > MAX_FIELD_BYTES) {
                return Err(RequestError::TooLong { field });
            }
        }
        for (field, value) in [
            ("input_hash", &self.input_hash),
            ("output_hash", &self.output_hash),
        ] {
            if value.as_deref().is_some_and(|h| !is_content_hash(h)) {
                return Err(RequestError::BadContentHash { field });
            }
        }
        if self.meters.len() > MAX_METERS {
            return Err(RequestError::TooManyMeters {
                n_meters: self.meters.len(),
            });
        }
        for (index, meter) in self.meters.iter().enumerate() {
            if meter.metric.is_empty() || meter.metric.len() > MAX_FIELD_BYTES {
                return Err(RequestError::BadMetric { index });
            }
            if meter.quantity == 0 || meter.quantity > MAX_METER_QUANTITY {
                return Err(RequestError::AbsurdQuantity {
                    index,
                    quantity: meter.quantity,
                });
            }
            // Quadratic, but bounded by MAX_METERS, and allocation-free.
            if self.meters[..index]
                .iter()
                .any(|m| m.metric == meter.metric)
            {
                return Err(RequestError::DuplicateMeter {
                    index,
                    metric: meter.metric.clone(),
                });
            }
        }
        if self.lineage.len() > MAX_LINEAGE {
            return Err(RequestError::TooManyLineage {
                n_entries: self.lineage.len(),
            });
        }
        for (index, entry) in self.lineage.iter().enumerate() {
            for (field, value) in [("dataset", &entry.dataset), ("release", &entry.release)] {
                if value.is_empty() || value.len() > MAX_FIELD_BYTES {
                    return Err(RequestError::BadLineage { index, field });
                }
            }
            // Quadratic, but bounded by MAX_LINEAGE, and allocation-free.
            if self.lineage[..index].contains(entry) {
                return Err(RequestError::DuplicateLineage {
                    index,
                    dataset: entry.dataset.clone(),
                    release: entry.release.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Whether `h` is a plausible digest: an even number of hex digits (either
/// case) between [`MIN_CONTENT_HASH_HEX`] and [`MAX_CONTENT_HASH_HEX`].
pub fn is_content_hash(h: &str) -> bool {
    (MIN_CONTENT_HASH_HEX..=MAX_CONTENT_HASH_HEX).contains(&h.len())
        && h.len() & 1 == 0
        && h.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mutate: impl FnOnce(&mut CheckRequest), expected: Option<&str>) {
        let mut req = CheckRequest::new("k", "m", "1.0.0");
        req.meters.push(Meter {
            metric: "inferences".into(),
            quantity: 1,
        });
        mutate(&mut req);
        let got = req.validate().err().map(|e| e.to_string());
        match expected {
            None => assert_eq!(got, None),
            Some(fragment) => {
                let got = got.unwrap_or_default();
                assert!(
                    got.contains(fragment),
                    "{got:?} should contain {fragment:?}"
                );
            }
        }
    }

    #[test]
    fn validation() {
        check(|_| {}, None);
        check(|r| r.key.clear(), Some("key: is required"));
        check(|r| r.model.clear(), Some("model: is required"));
        check(
            |r| r.model_version.clear(),
            Some("model_version: is required"),
        );
        check(|r| r.region = Some("x".repeat(257)), Some("region: longer"));
        check(|r| r.meters[0].quantity = 0, Some("absurd"));
        check(
            |r| r.meters[0].quantity = MAX_METER_QUANTITY + 1,
            Some("absurd"),
        );
        check(
            |r| {
                r.meters.push(Meter {
                    metric: "inferences".into(),
                    quantity: 1,
                })
            },
            Some("duplicate"),
        );
        check(
            |r| {
                r.meters = (0..17)
                    .map(|i| Meter {
                        metric: format!("m{i}"),
                        quantity: 1,
                    })
                    .collect();
            },
            Some("at most 16"),
        );
        let sha256 = "ab".repeat(32);
        check(|r| r.input_hash = Some(sha256.clone()), None);
        check(|r| r.output_hash = Some("AB".repeat(64)), None);
        check(
            |r| r.input_hash = Some("ab".repeat(15)),
            Some("input_hash: must be 32 to 128 hex digits"),
        );
        check(
            |r| r.output_hash = Some("ab".repeat(65)),
            Some("output_hash: must be"),
        );
        check(
            |r| r.input_hash = Some(format!("{}a", "ab".repeat(16))),
            Some("input_hash: must be"),
        );
        check(
            |r| r.input_hash = Some(format!("{}zz", "ab".repeat(16))),
            Some("input_hash: must be"),
        );
        check(
            |r| r.output_hash = Some(String::new()),
            Some("output_hash: must be"),
        );
    }

    fn entry(dataset: &str, release: &str) -> LineageEntry {
        LineageEntry {
            dataset: dataset.into(),
            release: release.into(),
        }
    }

    #[test]
    fn lineage_validation() {
        check(|r| r.lineage = vec![entry("a", "1"), entry("a", "2")], None);
        check(
            |r| r.lineage = vec![entry("a", "1"), entry("b", "1"), entry("a", "1")],
            Some("lineage[2]: duplicate dataset release a@1"),
        );
        check(
            |r| r.lineage = vec![entry("", "1")],
            Some("lineage[0].dataset: must be 1 to"),
        );
        check(
            |r| r.lineage = vec![entry("a", &"x".repeat(257))],
            Some("lineage[0].release: must be 1 to"),
        );
        check(
            |r| r.lineage = (0..17).map(|i| entry(&format!("d{i}"), "1")).collect(),
            Some("lineage: at most 16"),
        );
    }

    #[test]
    fn debug_redacts_key() {
        let req = CheckRequest::new("tg_secret", "m", "1.0.0");
        assert!(!format!("{req:?}").contains("tg_secret"));
    }

    #[test]
    fn json_defaults() {
        let req: CheckRequest =
            serde_json::from_str(r#"{"key":"k","model":"m","model_version":"1.0.0"}"#).unwrap();
        assert!(req.meters.is_empty());
        assert!(req.lineage.is_empty());
        assert!(!req.dry_run);
    }
}
