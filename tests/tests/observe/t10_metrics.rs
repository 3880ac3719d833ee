use tollgate_proto::v1 as pb;
use tollgate_proto::v1::edge_client::EdgeClient;
use tollgate_tests::TestNode;

use crate::{Tally, fast_sampling, known_workload, scrape, scrape_until};

/// Every `tollgate_decisions_total` series, keyed like a [`Tally`].
fn scraped_decisions(s: &crate::Scraped) -> Tally {
    s.series("tollgate_decisions_total")
        .into_iter()
        .map(|(labels, v)| {
            let key = (
                labels.get("kind").cloned().unwrap_or_default(),
                labels.get("outcome").cloned().unwrap_or_default(),
                labels.get("reason").cloned().unwrap_or_default(),
            );
            (key, v as u64)
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

#[tokio::test]
async fn metrics_parse_and_decision_counters_match_the_decisions_made() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start_with(dir.path(), fast_sampling).await?;
    let mut tally = known_workload(&n).await?;

    // One more Check over gRPC: both APIs count alike.
    let mut edge = EdgeClient::connect(n.grpc.clone()).await?;
    let r = edge
        .check(pb::CheckRequest {
            key: "tg_demo_key".into(),
            model: "demo-classifier".into(),
            model_version: "2.1.0".into(),
            meters: vec![pb::Meter {
                metric: "inferences".into(),
                quantity: 1,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(r.decision, "allow");
    *tally
        .entry(("check".into(), "allow".into(), "none".into()))
        .or_default() += 1;

    // The workload is what it claims to be, so the figures below are known.
    let expected: Tally = [
        (("check", "allow", "none"), 8),
        (("check", "deny", "quota_exceeded"), 1),
        (("check", "deny", "unknown_key"), 2),
        (("check", "deny", "model_version_not_allowed"), 1),
        (("report", "allow", "none"), 1),
    ]
    .into_iter()
    .map(|((k, o, r), v)| ((k.into(), o.into(), r.into()), v))
    .collect();
    assert_eq!(tally, expected);

    // Utilisation is sampled: wait for demo-tiny's 5 of 5 to show.
    let s = scrape_until(&n, None, "demo-tiny's quota to show as exhausted", |s| {
        s.value("tollgate_quotas_by_utilization", &[("band", "exhausted")]) == Some(1.0)
    })
    .await?;

    assert_eq!(scraped_decisions(&s), tally, "{}", s.text);
    for (reason, n_decisions) in [
        ("quota_exceeded", 1.0),
        ("unknown_key", 2.0),
        ("model_version_not_allowed", 1.0),
        ("rate_limited", 0.0),
    ] {
        assert_eq!(
            s.value(
                "tollgate_decision_reasons_total",
                &[("outcome", "deny"), ("reason", reason)]
            ),
            Some(n_decisions),
            "{reason}"
        );
    }
    assert_eq!(s.value("tollgate_requests_invalid_total", &[]), Some(1.0));

    // Latency: one record per Check answered (12), none for the Report.
    assert_eq!(
        s.value("tollgate_check_latency_seconds_count", &[]),
        Some(12.0)
    );
    assert_eq!(
        s.value("tollgate_check_duration_seconds_count", &[]),
        Some(12.0)
    );
    let hist = s
        .scrape
        .samples
        .iter()
        .find(|x| x.metric == "tollgate_check_duration_seconds")
        .map(|x| x.value.clone());
    let Some(prometheus_parse::Value::Histogram(buckets)) = hist else {
        anyhow::bail!("no latency histogram in\n{}", s.text);
    };
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(buckets.last().map(|b| b.count), Some(12.0));
    let summary = s
        .scrape
        .samples
        .iter()
        .find(|x| x.metric == "tollgate_check_latency_seconds")
        .map(|x| x.value.clone());
    let Some(prometheus_parse::Value::Summary(quantiles)) = summary else {
        anyhow::bail!("no latency summary in\n{}", s.text);
    };
    assert_eq!(quantiles.len(), 4);
    assert!(
        quantiles.iter().all(|q| q.count > 0.0 && q.count < 5.0),
        "{quantiles:?}"
    );

    // Quotas in aggregate only: no license id anywhere by default.
    assert_eq!(
        s.value("tollgate_quota_utilization_max_ratio", &[]),
        Some(1.0)
    );
    assert!(
        s.scrape
            .samples
            .iter()
            .all(|x| !x.labels.contains_key("license")),
        "a license label without metrics.per_license_labels:\n{}",
        s.text
    );

    // Raft and the rest of the node: a one-node cluster leads itself.
    assert_eq!(s.value("tollgate_raft_is_leader", &[]), Some(1.0));
    assert_eq!(s.value("tollgate_raft_leader_id", &[]), Some(1.0));
    assert_eq!(
        s.value("tollgate_raft_state", &[("state", "leader")]),
        Some(1.0)
    );
    assert!(s.value("tollgate_raft_term", &[]).unwrap_or(0.0) >= 1.0);
    let applied = s.value("tollgate_raft_applied_index", &[]).unwrap_or(0.0);
    assert!(applied >= 1.0);
    assert_eq!(s.value("tollgate_config_version", &[]), Some(applied));
    let n_licenses = n.admin_ok(reqwest::Method::GET, "/v1/licenses", "").await?["licenses"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(s.value("tollgate_licenses", &[]), Some(n_licenses as f64));
    assert_eq!(s.value("tollgate_gossip_lag_max_seconds", &[]), Some(0.0));
    assert_eq!(s.value("tollgate_audit_backlog_records", &[]), Some(0.0));
    assert_eq!(
        s.value(
            "tollgate_node_info",
            &[("node_id", "1"), ("region", "local-a")]
        ),
        Some(1.0)
    );
    n.node.shutdown().await
}

#[tokio::test]
async fn per_license_labels_and_the_token_requirement_are_settings() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start_with(dir.path(), |s| {
        fast_sampling(s);
        s.metrics.per_license_labels = true;
        s.metrics.require_token = true;
    })
    .await?;
    known_workload(&n).await?;

    let (status, _) = n.get_text("/metrics", None).await?;
    assert_eq!(status, 401);
    let (status, _) = n.get_text("/metrics", Some("not-a-token")).await?;
    assert_eq!(status, 401);

    let viewer = n.viewer_token.clone();
    let s = scrape_until(&n, Some(&viewer), "demo-tiny's quota per license", |s| {
        s.value(
            "tollgate_quota_used",
            &[("license", "demo-tiny"), ("quota", "daily")],
        ) == Some(5.0)
    })
    .await?;
    assert_eq!(
        s.value(
            "tollgate_quota_limit",
            &[("license", "demo-tiny"), ("quota", "daily")]
        ),
        Some(5.0)
    );
    assert_eq!(
        s.value(
            "tollgate_quota_utilization_ratio",
            &[("license", "demo-tiny"), ("quota", "daily")]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.value(
            "tollgate_quota_limit",
            &[("license", "demo-seats"), ("quota", "@seats")]
        ),
        Some(3.0)
    );
    for (license, outcome, expected) in [
        ("demo-tiny", "allow", 5.0),
        ("demo-tiny", "deny", 1.0),
        ("demo", "allow", 3.0),
        ("demo", "deny", 1.0),
    ] {
        assert_eq!(
            s.value(
                "tollgate_license_decisions_total",
                &[("license", license), ("outcome", outcome)]
            ),
            Some(expected),
            "{license} {outcome}"
        );
    }
    // Decisions of unknown keys have no license to count under.
    assert!(
        s.series("tollgate_license_decisions_total")
            .iter()
            .all(|(l, _)| l.get("license").is_some_and(|l| l.starts_with("demo"))),
        "{}",
        s.text
    );
    // An admin token reads metrics too (roles are ordered).
    let token = n.token.clone();
    scrape(&n, Some(&token)).await?;
    n.node.shutdown().await
}
