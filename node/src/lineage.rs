//! Exports of a license's lineage graph: JSON (nodes and edges), Graphviz
//! DOT, and OpenLineage RunEvents.
//!
//! The graph itself ([`LineageGraph`]) is read from usage counters by
//! quota/; this module only renders it, filling in what the config says of
//! the license and of each dataset release. It holds no rules and keeps no
//! state; the time stamped on OpenLineage events is an argument.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_quota::config::Config;
use tollgate_quota::dataset::DatasetRelease;
use tollgate_quota::lineage::LineageGraph;

use crate::api::ApiError;

/// The OpenLineage schema the events follow.
pub const OPENLINEAGE_SCHEMA_URL: &str =
    "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";

/// The standard dataset version facet's schema.
const DATASET_VERSION_FACET_SCHEMA_URL: &str = "https://openlineage.io/spec/facets/1-0-1/DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet";

/// Who produced the events (OpenLineage `producer`, a URI).
pub const OPENLINEAGE_PRODUCER: &str = concat!("urn:tollgate:", env!("CARGO_PKG_VERSION"));

/// The namespace of jobs (license x model version) in OpenLineage events.
pub const JOB_NAMESPACE: &str = "tollgate";

/// The namespace of registered datasets in OpenLineage events.
pub const DATASET_NAMESPACE: &str = "tollgate-datasets";

/// An export format of `GET /v1/lineage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{license, nodes, edges}`.
    Json,
    /// Graphviz DOT.
    Dot,
    /// A JSON array of OpenLineage RunEvents, one per model version.
    OpenLineage,
}

impl Format {
    /// Parses `?format=`; absent means JSON.
    pub fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        match text.unwrap_or("json") {
            "json" => Ok(Format::Json),
            "dot" => Ok(Format::Dot),
            "openlineage" => Ok(Format::OpenLineage),
            other => Err(ApiError::InvalidArgument(format!(
                "format: unknown {other:?}; expected json, dot or openlineage"
            ))),
        }
    }
}

fn license_node_id(license: &str) -> String {
    format!("license:{license}")
}

fn model_node_id(model: &str, version: &str) -> String {
    format!("model:{model}@{version}")
}

fn dataset_node_id(dataset: &str, release: &str) -> String {
    format!("dataset:{dataset}@{release}")
}

/// The registered release `release` of `dataset`, if the config holds it.
fn release_of<'c>(config: &'c Config, dataset: &str, release: &str) -> Option<&'c DatasetRelease> {
    config.dataset(dataset)?.release(release)
}

/// The graph as `{license, policy_version, node_id, nodes, edges}`. Nodes
/// are the license, each model version and each dataset release (with its
/// source, categories and license expression when registered); edges carry
/// the count of allowed uses.
pub fn to_json(graph: &LineageGraph, config: &Config, node_id: u64) -> Value {
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    let mut edges = Vec::new();
    let root = license_node_id(&graph.license);
    let mut license_node = json!({"id": root, "kind": "license", "license": graph.license});
    if let Some(l) = config.license(&graph.license) {
        license_node["customer"] = l.customer.clone().into();
        license_node["status"] = l.status.label().into();
    }
    nodes.insert(root.clone(), license_node);
    for mv in &graph.model_versions {
        let model_id = model_node_id(&mv.model, &mv.version);
        nodes.insert(
            model_id.clone(),
            json!({"id": model_id, "kind": "model_version", "model": mv.model, "version": mv.version}),
        );
        edges.push(json!({"from": root, "to": model_id, "count": mv.count}));
        for ds in &mv.datasets {
            let data_id = dataset_node_id(&ds.dataset, &ds.release);
            nodes.entry(data_id.clone()).or_insert_with(|| {
                let mut node = json!({
                    "id": data_id, "kind": "dataset_release",
                    "dataset": ds.dataset, "release": ds.release,
                    "registered": false,
                });
                if let Some(r) = release_of(config, &ds.dataset, &ds.release) {
                    node["registered"] = true.into();
                    node["source"] = r.source.clone().into();
                    node["categories"] = json!(r.categories);
                    node["license"] = r.license.as_str().into();
                }
                node
            });
            edges.push(json!({"from": model_id, "to": data_id, "count": ds.count}));
        }
    }
    json!({
        "license": graph.license,
        "node_id": node_id,
        "policy_version": config.version,
        "nodes": nodes.into_values().collect::<Vec<_>>(),
        "edges": edges,
    })
}

/// Quotes `text` as a DOT string: `"` and `\` are escaped and line breaks
/// become `\n`, so no text can end the string or the statement.
fn dot_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' | '\r' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The graph in Graphviz DOT: boxes for the license, ellipses for model
/// versions, cylinders for dataset releases, edges labelled with counts.
pub fn to_dot(graph: &LineageGraph, config: &Config) -> String {
    let mut out = String::new();
    let root = license_node_id(&graph.license);
    out.push_str(&format!(
        "digraph {} {{\n  rankdir=LR;\n",
        dot_quote(&format!("lineage:{}", graph.license))
    ));
    let customer = config
        .license(&graph.license)
        .map(|l| format!("\n{}", l.customer))
        .unwrap_or_default();
    out.push_str(&format!(
        "  {} [shape=box, label={}];\n",
        dot_quote(&root),
        dot_quote(&format!("license {}{customer}", graph.license))
    ));
    let mut datasets: BTreeMap<String, String> = BTreeMap::new();
    let mut edges = String::new();
    for mv in &graph.model_versions {
        let model_id = model_node_id(&mv.model, &mv.version);
        out.push_str(&format!(
            "  {} [shape=ellipse, label={}];\n",
            dot_quote(&model_id),
            dot_quote(&format!("{} {}", mv.model, mv.version))
        ));
        edges.push_str(&format!(
            "  {} -> {} [label={}];\n",
            dot_quote(&root),
            dot_quote(&model_id),
            dot_quote(&mv.count.to_string())
        ));
        for ds in &mv.datasets {
            let data_id = dataset_node_id(&ds.dataset, &ds.release);
            datasets.entry(data_id.clone()).or_insert_with(|| {
                let mut label = format!("{} {}", ds.dataset, ds.release);
                if let Some(r) = release_of(config, &ds.dataset, &ds.release) {
                    label.push_str(&format!("\nsource: {}", r.source));
                    if !r.categories.is_empty() {
                        let names: Vec<&str> = r.categories.iter().map(|c| c.as_str()).collect();
                        label.push_str(&format!("\n{}", names.join(", ")));
                    }
                    label.push_str(&format!("\n{}", r.license));
                }
                format!(
                    "  {} [shape=cylinder, label={}];\n",
                    dot_quote(&data_id),
                    dot_quote(&label)
                )
            });
            edges.push_str(&format!(
                "  {} -> {} [label={}];\n",
                dot_quote(&model_id),
                dot_quote(&data_id),
                dot_quote(&ds.count.to_string())
            ));
        }
    }
    for line in datasets.values() {
        out.push_str(line);
    }
    out.push_str(&edges);
    out.push_str("}\n");
    out
}

/// A stable run id for (license, model version): a UUID (version 8,
/// name-based) from SHA-256, so every export names the same run and a
/// lineage store updates it instead of adding a new one each time.
fn run_id(license: &str, model: &str, version: &str) -> String {
    let mut h = Sha256::new();
    for part in ["tollgate-lineage", license, model, version] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A custom facet's required `_producer` and `_schemaURL`, plus `fields`.
fn facet(name: &str, fields: Value) -> Value {
    let mut facet = json!({
        "_producer": OPENLINEAGE_PRODUCER,
        "_schemaURL": format!("urn:tollgate:openlineage:{name}:1"),
    });
    if let (Some(out), Value::Object(fields)) = (facet.as_object_mut(), fields) {
        out.extend(fields);
    }
    facet
}

/// The license's terms as a facet: the license document without its key
/// hashes, and the policy version it was read at.
fn license_terms_facet(graph: &LineageGraph, config: &Config) -> Value {
    let terms = config
        .license(&graph.license)
        .and_then(|l| serde_json::to_value(&**l).ok())
        .map(|mut v| {
            if let Some(obj) = v.as_object_mut() {
                obj.remove("keys");
                obj.remove("apiVersion");
                obj.remove("kind");
            }
            v
        })
        .unwrap_or(Value::Null);
    facet(
        "LicenseTermsRunFacet",
        json!({
            "license": graph.license,
            "policyVersion": config.version,
            "terms": terms,
        }),
    )
}

/// One OpenLineage RunEvent per model version of the graph, as a JSON
/// array. The job is (license, model version); its inputs are the dataset
/// releases that fed it, each with the standard `datasetVersion` facet, a
/// `tollgate_datasetRelease` facet (source, categories, SPDX license) and
/// an input facet with the count of uses it fed. The run carries the
/// `tollgate_licenseTerms` facet and the count of uses.
pub fn to_openlineage(graph: &LineageGraph, config: &Config, now_ms: i64) -> Value {
    let event_time = DateTime::from_timestamp_millis(now_ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default();
    let terms = license_terms_facet(graph, config);
    let events: Vec<Value> = graph
        .model_versions
        .iter()
        .map(|mv| {
            let inputs: Vec<Value> = mv
                .datasets
                .iter()
                .map(|ds| {
                    let mut facets = json!({
                        "datasetVersion": {
                            "_producer": OPENLINEAGE_PRODUCER,
                            "_schemaURL": DATASET_VERSION_FACET_SCHEMA_URL,
                            "datasetVersion": ds.release,
                        },
                    });
                    if let Some(r) = release_of(config, &ds.dataset, &ds.release) {
                        let mut fields = json!({
                            "release": r.version,
                            "source": r.source,
                            "categories": r.categories,
                            "license": r.license.as_str(),
                        });
                        if let Some(date) = r.date_published {
                            fields["datePublished"] = date.to_string().into();
                        }
                        facets["tollgate_datasetRelease"] =
                            facet("DatasetReleaseDatasetFacet", fields);
                    }
                    json!({
                        "namespace": DATASET_NAMESPACE,
                        "name": ds.dataset,
                        "facets": facets,
                        "inputFacets": {
                            "tollgate_uses": facet("UsesInputDatasetFacet", json!({"count": ds.count})),
                        },
                    })
                })
                .collect();
            json!({
                "eventType": "RUNNING",
                "eventTime": event_time,
                "producer": OPENLINEAGE_PRODUCER,
                "schemaURL": OPENLINEAGE_SCHEMA_URL,
                "run": {
                    "runId": run_id(&graph.license, &mv.model, &mv.version),
                    "facets": {
                        "tollgate_licenseTerms": terms,
                        "tollgate_uses": facet("UsesRunFacet", json!({"count": mv.count})),
                    },
                },
                "job": {
                    "namespace": JOB_NAMESPACE,
                    "name": format!("{}/{}@{}", graph.license, mv.model, mv.version),
                    "facets": {},
                },
                "inputs": inputs,
                "outputs": [],
            })
        })
        .collect();
    Value::Array(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_stable_version_8_uuids() {
        let a = run_id("l", "m", "1.0.0");
        assert_eq!(a, run_id("l", "m", "1.0.0"));
        assert_ne!(a, run_id("l", "m", "1.0.1"));
        // The separator keeps model m1 version 0 apart from m version 10.
        assert_ne!(run_id("l", "m1", "0"), run_id("l", "m", "10"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('8'), "{a}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{a}");
    }

    #[test]
    fn dot_strings_cannot_be_broken_out_of() {
        assert_eq!(dot_quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(dot_quote("x\u{0}y"), "\"xy\"");
    }

    #[test]
    fn formats() {
        assert_eq!(Format::parse(None).ok(), Some(Format::Json));
        assert_eq!(Format::parse(Some("dot")).ok(), Some(Format::Dot));
        assert_eq!(
            Format::parse(Some("openlineage")).ok(),
            Some(Format::OpenLineage)
        );
        assert!(Format::parse(Some("svg")).is_err());
    }
}
