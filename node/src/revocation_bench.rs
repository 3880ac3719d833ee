//! `tollgate bench --scenario revocation`: how long a key revocation takes
//! to reach every node.
//!
//! Each round issues a fresh key on the leader, waits until every node
//! resolves it, then revokes it on the leader while one poller per node
//! sends dry-run Checks with it back to back. A node's propagation time is
//! from just before the revoke call until its first Check that no longer
//! resolves the key; the round's figure is the slowest node's. Dry runs
//! consume nothing and revoked keys are removed. Each round adds two records
//! to the license's history, so by default the bench uses a license of its
//! own (`revocation-bench`, created if missing) rather than a real one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tollgate_proto::v1 as pb;
use tollgate_proto::v1::admin_client::AdminClient;
use tollgate_proto::v1::edge_client::EdgeClient;
use tonic::transport::{Channel, Endpoint};

use crate::bench::endpoint_uri;
use crate::client::{Target, authed, status_err};

/// The license the bench creates and uses unless told otherwise.
pub const BENCH_LICENSE: &str = "revocation-bench";

/// Creates [`BENCH_LICENSE`] (demo-classifier 2.x, no quotas) if missing.
async fn ensure_bench_license(
    admin: &mut AdminClient<Channel>,
    header: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
) -> anyhow::Result<()> {
    let exists = admin
        .get_license(authed(
            pb::GetLicenseRequest {
                id: BENCH_LICENSE.to_string(),
            },
            header,
        ))
        .await;
    match exists {
        Ok(_) => return Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(status_err(s)),
    }
    let document = format!(
        "apiVersion: tollgate/v1\nkind: License\nid: {BENCH_LICENSE}\ncustomer: Revocation benchmark\nmodels:\n  - {{ model: demo-classifier, versions: {{ major: 2 }} }}\n"
    );
    admin
        .put_license(authed(
            pb::PutLicenseRequest {
                id: BENCH_LICENSE.to_string(),
                document,
                reason: "revocation benchmark license".into(),
            },
            header,
        ))
        .await
        .map_err(status_err)?;
    Ok(())
}

/// How long one round may wait for a key to appear or disappear everywhere.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// Quantiles of a set of durations, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Smallest.
    pub min: f64,
}

impl Summary {
    /// Nearest-rank quantiles of `values` (which it sorts).
    pub fn of(values: &mut [f64]) -> Self {
        values.sort_by(f64::total_cmp);
        let q = |p: f64| -> f64 {
            if values.is_empty() {
                return 0.0;
            }
            let n = values.len();
            // Nearest rank: the smallest value with at least p of the set at or below it.
            let rank = (p * n as f64).ceil().max(1.0) as usize;
            values[rank.min(n) - 1]
        };
        Self {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            max: values.last().copied().unwrap_or(0.0),
            min: values.first().copied().unwrap_or(0.0),
        }
    }
}

/// The result, printed as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct RevocationReport {
    /// Always "revocation".
    pub scenario: &'static str,
    /// Revocations measured.
    pub count: usize,
    /// Nodes polled.
    pub nodes: usize,
    /// The leader the keys were issued and revoked on.
    pub leader: u64,
    /// Time until every node denied the key, per revocation (ms).
    pub all_nodes_deny_ms: Summary,
    /// Median time until each node denied the key (ms), by node id.
    pub per_node_p50_ms: BTreeMap<u64, f64>,
    /// Duration of the revoke call itself (commit on the leader), ms.
    pub revoke_call_ms: Summary,
}

struct Node {
    id: u64,
    edge: EdgeClient<Channel>,
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let uri = endpoint_uri(addr);
    Endpoint::from_shared(uri.clone())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))
}

fn probe(key: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        key: key.to_string(),
        model: "demo-classifier".into(),
        model_version: "2.1.0".into(),
        environment: "production".into(),
        region: "local-a".into(),
        meters: vec![pb::Meter {
            metric: "inferences".into(),
            quantity: 1,
        }],
        dry_run: true,
        ..Default::default()
    }
}

/// Whether `node` resolves `key` to a license right now.
async fn resolves(node: &mut EdgeClient<Channel>, key: &str) -> anyhow::Result<bool> {
    let d = node
        .check(probe(key))
        .await
        .map_err(status_err)?
        .into_inner();
    Ok(!d.license_id.is_empty())
}

/// Polls until `node` resolves `key` (`want` true) or no longer does.
async fn until(
    mut edge: EdgeClient<Channel>,
    key: String,
    want: bool,
    started: Instant,
) -> anyhow::Result<Duration> {
    loop {
        if resolves(&mut edge, &key).await? == want {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < ROUND_TIMEOUT,
            "key still {} after {ROUND_TIMEOUT:?}",
            if want { "unknown" } else { "accepted" }
        );
    }
}

async fn everywhere(
    nodes: &[Node],
    key: &str,
    want: bool,
    started: Instant,
) -> anyhow::Result<Vec<(u64, Duration)>> {
    let mut set = tokio::task::JoinSet::new();
    for n in nodes {
        let (id, edge, key) = (n.id, n.edge.clone(), key.to_string());
        set.spawn(async move { until(edge, key, want, started).await.map(|d| (id, d)) });
    }
    let mut out = Vec::with_capacity(nodes.len());
    while let Some(r) = set.join_next().await {
        out.push(r.context("poller panicked")??);
    }
    Ok(out)
}

/// Runs `count` revocation rounds on `license` against the cluster `target`
/// names.
pub async fn run(target: &Target, license: &str, count: usize) -> anyhow::Result<RevocationReport> {
    anyhow::ensure!(count > 0, "--count must be at least 1");
    let (mut any_admin, header) = target.admin().await?;
    let status = any_admin
        .cluster_status(authed(pb::ClusterStatusRequest {}, &header))
        .await
        .map_err(status_err)?
        .into_inner();
    let cluster: serde_json::Value = serde_json::from_str(&status.cluster_json)?;
    let leader = cluster["leader"]
        .as_u64()
        .context("the cluster has no leader right now")?;
    let mut nodes = Vec::new();
    let mut leader_addr = None;
    for n in cluster["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let (Some(id), Some(addr)) = (n["id"].as_u64(), n["grpc_addr"].as_str()) else {
            continue;
        };
        if id == leader {
            leader_addr = Some(addr.to_string());
        }
        nodes.push(Node {
            id,
            edge: EdgeClient::new(connect(addr).await?),
        });
    }
    let leader_addr = leader_addr.context("the leader is not in the member list")?;
    let mut admin = AdminClient::new(connect(&leader_addr).await?);
    if license == BENCH_LICENSE {
        ensure_bench_license(&mut admin, &header).await?;
    }

    let mut all_nodes = Vec::with_capacity(count);
    let mut revoke_calls = Vec::with_capacity(count);
    let mut per_node: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let run_id = std::process::id();
    for round in 0..count {
        let name = format!("revocation-bench-{run_id}-{round}");
        let issued = admin
            .issue_key(authed(
                pb::IssueKeyRequest {
                    license_id: license.to_string(),
                    name: name.clone(),
                    reason: "revocation benchmark".into(),
                },
                &header,
            ))
            .await
            .map_err(status_err)?
            .into_inner();
        everywhere(&nodes, &issued.key, true, Instant::now()).await?;

        let started = Instant::now();
        let pollers = everywhere(&nodes, &issued.key, false, started);
        let revoke = async {
            let t = Instant::now();
            admin
                .revoke_key(authed(
                    pb::RevokeKeyRequest {
                        license_id: license.to_string(),
                        key_id: name.clone(),
                        reason: "revocation benchmark".into(),
                    },
                    &header,
                ))
                .await
                .map_err(status_err)?;
            anyhow::Ok(t.elapsed())
        };
        let (seen, call) = tokio::join!(pollers, revoke);
        let seen = seen?;
        revoke_calls.push(call?.as_secs_f64() * 1e3);
        let slowest = seen.iter().map(|(_, d)| *d).max().unwrap_or_default();
        all_nodes.push(slowest.as_secs_f64() * 1e3);
        for (id, d) in seen {
            per_node.entry(id).or_default().push(d.as_secs_f64() * 1e3);
        }
    }
    Ok(RevocationReport {
        scenario: "revocation",
        count,
        nodes: nodes.len(),
        leader,
        all_nodes_deny_ms: Summary::of(&mut all_nodes),
        per_node_p50_ms: per_node
            .into_iter()
            .map(|(id, mut v)| (id, Summary::of(&mut v).p50))
            .collect(),
        revoke_call_ms: Summary::of(&mut revoke_calls),
    })
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn nearest_rank_quantiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.reverse();
        let s = Summary::of(&mut v);
        assert_eq!(
            (s.p50, s.p90, s.p99, s.max, s.min),
            (50.0, 90.0, 99.0, 100.0, 1.0)
        );
        let s = Summary::of(&mut [7.0]);
        assert_eq!((s.p50, s.p99, s.max), (7.0, 7.0, 7.0));
    }
}
