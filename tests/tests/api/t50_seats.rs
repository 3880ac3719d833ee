use reqwest::Method;
use tollgate_proto::v1 as pb;
use tollgate_proto::v1::edge_client::EdgeClient;
use tollgate_tests::{TestNode, demo_check};

#[tokio::test]
async fn seats_over_grpc_and_http_share_one_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let mut edge = EdgeClient::connect(n.grpc.clone()).await?;
    let seat = |instance: &str| pb::SeatRequest {
        key: "tg_demo_seats".into(),
        instance: instance.into(),
        ..Default::default()
    };
    let a = edge.acquire_seat(seat("a")).await?.into_inner();
    assert!(a.granted, "{a:?}");
    assert_eq!((a.in_use, a.max_instances), (1, 3));
    assert!(a.expires_at_ms > 0 && !a.lease_id.is_empty());
    for i in ["b", "c"] {
        let (status, d) = n
            .post(
                "/v1/seats/acquire",
                &format!(r#"{{"key":"tg_demo_seats","instance":"{i}"}}"#),
            )
            .await?;
        assert_eq!((status, d["granted"].as_bool()), (200, Some(true)), "{d}");
    }
    let full = edge.acquire_seat(seat("d")).await?.into_inner();
    assert!(!full.granted);
    assert_eq!(full.reasons[0].code, "seat_limit_reached", "{full:?}");
    assert_eq!(full.in_use, 3);
    // The same instance asking again keeps its lease rather than taking a seat.
    let again = edge.acquire_seat(seat("a")).await?.into_inner();
    assert_eq!(again.lease_id, a.lease_id);
    let renewed = edge
        .renew_seat(pb::SeatRequest {
            key: "tg_demo_seats".into(),
            lease_id: a.lease_id.clone(),
            ttl_ms: 5_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(renewed.granted, "{renewed:?}");
    let (status, d) = n
        .post(
            "/v1/seats/release",
            &format!(r#"{{"key":"tg_demo_seats","lease_id":"{}"}}"#, a.lease_id),
        )
        .await?;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["in_use"], 2, "{d}");
    assert!(edge.acquire_seat(seat("d")).await?.into_inner().granted);
    // A released lease is gone: renewing it says so.
    let gone = edge
        .renew_seat(pb::SeatRequest {
            key: "tg_demo_seats".into(),
            lease_id: a.lease_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(gone.reasons[0].code, "seat_lease_unknown", "{gone:?}");
    // Another license's key cannot touch this lease.
    let (_, d) = n
        .post(
            "/v1/seats/release",
            &format!(r#"{{"key":"tg_demo_key","lease_id":"{}"}}"#, again.lease_id),
        )
        .await?;
    assert_eq!(d["reasons"][0]["code"], "seat_lease_unknown", "{d}");
    n.node.shutdown().await
}

#[tokio::test]
async fn bad_seat_and_usage_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    for (path, body) in [
        ("/v1/seats/acquire", r#"{"key":"tg_demo_seats"}"#),
        (
            "/v1/seats/acquire",
            r#"{"key":"tg_demo_seats","instance":"a","extra":1}"#,
        ),
        (
            "/v1/seats/renew",
            r#"{"key":"tg_demo_seats","instance":"a"}"#,
        ),
        ("/v1/seats/release", "not json"),
    ] {
        let (status, d) = n.post(path, body).await?;
        assert_eq!(status, 400, "{path} {body}: {d}");
        assert_eq!(d["error"]["code"], "invalid_argument", "{d}");
    }
    let mut edge = EdgeClient::connect(n.grpc.clone()).await?;
    let err = edge
        .acquire_seat(pb::SeatRequest {
            key: "tg_demo_seats".into(),
            ..Default::default()
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(err, Some(tonic::Code::InvalidArgument));
    // No seat was taken by any of them.
    let (_, d) = n
        .post(
            "/v1/seats/acquire",
            r#"{"key":"tg_demo_seats","instance":"x"}"#,
        )
        .await?;
    assert_eq!(d["in_use"], 1, "{d}");
    // Usage needs the admin token; with it, the counted Check shows up.
    let (status, _) = n.admin(Method::GET, "/v1/usage", None, "").await?;
    assert_eq!(status, 401);
    n.post("/v1/check", &demo_check("tg_demo_key")).await?;
    let v = n
        .admin_ok(Method::GET, "/v1/usage?license=demo", "")
        .await?;
    assert_eq!(v["counters"][0]["value"], 1, "{v}");
    assert_eq!(v["counters"][0]["slots"]["1"], 1, "{v}");
    n.node.shutdown().await
}
