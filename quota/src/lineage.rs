//! The lineage graph: which model versions a license's allowed uses ran,
//! and which dataset releases fed them, with counts.
//!
//! Edges are counted in ordinary usage counters ([`crate::counter::Counter`],
//! soft, so G-Counters with one slot per node), under the reserved quota id
//! [`LINEAGE_QUOTA`] and window `total`; the counter's scope encodes the edge
//! (see [`LineageEdge`]). They therefore converge, persist and travel
//! exactly like usage: a node counts in its own slot, the flush writes the
//! counter, gossip merges it by per-entry max everywhere else. An allowed,
//! non-dry-run Check that names lineage adds one to its license -> model
//! version edge and one to each model version -> dataset release edge;
//! nothing else adds edges.
//!
//! This module owns the edge encoding and the graph read back from the
//! counters. It must not render export formats (the node does) nor read
//! the clock.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::usage::{CounterKey, Usage};

/// The quota id under which lineage edges are counted. Quota ids are
/// `[a-z0-9._-]`, so this can never clash with one.
pub const LINEAGE_QUOTA: &str = "@lineage";

/// One edge of a license's lineage graph, as a counter scope encodes it:
/// `model@version` for license -> model version, and
/// `model@version>dataset@release` for model version -> dataset release.
/// Model and dataset ids are `[a-z0-9._-]`, semantic versions and release
/// ids hold neither `@` nor `>`, so the encoding is unambiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineageEdge<'a> {
    /// The license ran this model version.
    ModelVersion {
        /// Model id.
        model: &'a str,
        /// Model version.
        version: &'a str,
    },
    /// This dataset release fed that model version (under the license).
    DatasetRelease {
        /// Model id.
        model: &'a str,
        /// Model version.
        version: &'a str,
        /// Dataset id.
        dataset: &'a str,
        /// Dataset release.
        release: &'a str,
    },
}

impl<'a> LineageEdge<'a> {
    /// The counter scope that encodes this edge, in one exact-size allocation.
    pub fn scope(&self) -> String {
        match *self {
            LineageEdge::ModelVersion { model, version } => {
                let mut out = String::with_capacity(model.len() + version.len() + 1);
                push_pair(&mut out, model, version);
                out
            }
            LineageEdge::DatasetRelease {
                model,
                version,
                dataset,
                release,
            } => {
                let mut out = String::with_capacity(
                    model.len() + version.len() + dataset.len() + release.len() + 3,
                );
                push_pair(&mut out, model, version);
                out.push('>');
                push_pair(&mut out, dataset, release);
                out
            }
        }
    }

    /// The counter key of this edge under `license`.
    pub fn key(&self, license: &str) -> CounterKey {
        CounterKey {
            license: license.to_string(),
            quota: LINEAGE_QUOTA.to_string(),
            epoch: 0,
            scope: self.scope(),
        }
    }

    /// Parses a scope written by [`Self::scope`]; `None` for anything else
    /// (a counter from a newer or hostile peer is skipped, not trusted).
    pub fn parse(scope: &'a str) -> Option<Self> {
        let pair = |text: &'a str| {
            let (a, b) = text.split_once('@')?;
            (!a.is_empty() && !b.is_empty() && !b.contains('@')).then_some((a, b))
        };
        match scope.split_once('>') {
            None => {
                let (model, version) = pair(scope)?;
                Some(LineageEdge::ModelVersion { model, version })
            }
            Some((left, right)) => {
                let (model, version) = pair(left)?;
                let (dataset, release) = pair(right)?;
                if release.contains('>') {
                    return None;
                }
                Some(LineageEdge::DatasetRelease {
                    model,
                    version,
                    dataset,
                    release,
                })
            }
        }
    }
}

fn push_pair(out: &mut String, id: &str, version: &str) {
    out.push_str(id);
    out.push('@');
    out.push_str(version);
}

/// One license's lineage graph as this node knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LineageGraph {
    /// License id.
    pub license: String,
    /// The model versions its allowed uses ran, by (model, version).
    pub model_versions: Vec<ModelVersionUse>,
}

/// A model version in a lineage graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelVersionUse {
    /// Model id.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Allowed uses with lineage of this version under the license.
    pub count: u64,
    /// The dataset releases that fed it, by (dataset, release).
    pub datasets: Vec<DatasetReleaseUse>,
}

/// A dataset release feeding a model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DatasetReleaseUse {
    /// Dataset id.
    pub dataset: String,
    /// Release.
    pub release: String,
    /// Allowed uses it fed.
    pub count: u64,
}

impl LineageGraph {
    /// Builds `license`'s graph from its lineage counters' (scope, value)
    /// pairs; scopes that do not parse are skipped. A dataset edge whose
    /// model version edge has not arrived yet (each counter travels on its
    /// own) shows that version with count 0. Sorted, so two nodes holding
    /// the same counters build equal graphs.
    pub fn from_counts<'a>(
        license: &str,
        counts: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Self {
        type Versions = BTreeMap<(String, String), (u64, BTreeMap<(String, String), u64>)>;
        let mut versions: Versions = BTreeMap::new();
        for (scope, count) in counts {
            match LineageEdge::parse(scope) {
                Some(LineageEdge::ModelVersion { model, version }) => {
                    versions
                        .entry((model.to_string(), version.to_string()))
                        .or_default()
                        .0 += count;
                }
                Some(LineageEdge::DatasetRelease {
                    model,
                    version,
                    dataset,
                    release,
                }) => {
                    *versions
                        .entry((model.to_string(), version.to_string()))
                        .or_default()
                        .1
                        .entry((dataset.to_string(), release.to_string()))
                        .or_default() += count;
                }
                None => {}
            }
        }
        LineageGraph {
            license: license.to_string(),
            model_versions: versions
                .into_iter()
                .map(|((model, version), (count, datasets))| ModelVersionUse {
                    model,
                    version,
                    count,
                    datasets: datasets
                        .into_iter()
                        .map(|((dataset, release), count)| DatasetReleaseUse {
                            dataset,
                            release,
                            count,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Whether the graph has no edge.
    pub fn is_empty(&self) -> bool {
        self.model_versions.is_empty()
    }
}

impl Usage {
    /// The (scope, value) of every lineage counter of `license`. Walks every
    /// counter: an admin read, never on the hot path.
    pub fn lineage_counts(&self, license: &str) -> Vec<(String, u64)> {
        self.counters()
            .filter(|(k, _)| k.quota == LINEAGE_QUOTA && k.license == license)
            .map(|(k, c)| (k.scope.clone(), c.value()))
            .collect()
    }

    /// `license`'s lineage graph as this node knows it.
    pub fn lineage_graph(&self, license: &str) -> LineageGraph {
        let counts = self.lineage_counts(license);
        LineageGraph::from_counts(license, counts.iter().map(|(s, n)| (s.as_str(), *n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_round_trip_through_their_scope() {
        let edges = [
            LineageEdge::ModelVersion {
                model: "demo-classifier",
                version: "2.1.0-rc.1+build.5",
            },
            LineageEdge::DatasetRelease {
                model: "m",
                version: "1.0.0",
                dataset: "web-reviews",
                release: "2025.1",
            },
        ];
        for edge in edges {
            let scope = edge.scope();
            assert_eq!(LineageEdge::parse(&scope), Some(edge), "{scope}");
            assert_eq!(scope.len(), scope.capacity());
        }
        for bad in [
            "",
            "m",
            "m@",
            "@1",
            "m@1>d",
            "m@1>d@",
            "m@1>d@r>x@y",
            "m@1@2",
        ] {
            assert_eq!(LineageEdge::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn graph_groups_and_sorts_edges() {
        let g = LineageGraph::from_counts(
            "l",
            [
                ("m@2.0.0>b@1", 2),
                ("m@1.0.0", 5),
                ("m@2.0.0", 3),
                ("m@2.0.0>a@9", 3),
                ("m@1.0.0>a@1", 5),
                ("garbage", 7),
                ("n@1.0.0>a@1", 1),
            ],
        );
        type Flat = (String, u64, Vec<(String, u64)>);
        let flat: Vec<Flat> = g
            .model_versions
            .iter()
            .map(|v| {
                (
                    format!("{}@{}", v.model, v.version),
                    v.count,
                    v.datasets
                        .iter()
                        .map(|d| (format!("{}@{}", d.dataset, d.release), d.count))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            flat,
            vec![
                ("m@1.0.0".into(), 5, vec![("a@1".into(), 5)]),
                (
                    "m@2.0.0".into(),
                    3,
                    vec![("a@9".into(), 3), ("b@1".into(), 2)]
                ),
                ("n@1.0.0".into(), 0, vec![("a@1".into(), 1)]),
            ]
        );
    }
}
