//! The canonical example file parses and its demo licenses allow a Check.

use tollgate_quota::config::{ApplyOutcome, Config, ConfigCommand, ConfigOp};
use tollgate_quota::decision::{Outcome, ReasonCode};
use tollgate_quota::license::parse_documents;
use tollgate_quota::request::{CheckRequest, LineageEntry, Meter};
use tollgate_quota::seats::SeatRequest;
use tollgate_quota::usage::Usage;

const QUICKSTART: &str = include_str!("../../examples/quickstart.yaml");
const NOW_MS: i64 = 1_780_000_000_000; // 2026-05-28T20:26:40Z

fn config() -> Config {
    let mut config = Config::default();
    let docs = parse_documents(QUICKSTART).expect("quickstart parses");
    assert_eq!(docs.len(), 9);
    for (idx, doc) in docs.into_iter().enumerate() {
        let op = ConfigOp::from(doc);
        let cmd = ConfigCommand {
            request_id: None,
            actor: "test".into(),
            reason: None,
            at_ms: 0,
            op,
        };
        let index = idx as u64 + 1;
        assert_eq!(
            config.apply(&cmd, index),
            ApplyOutcome::Applied { version: index }
        );
    }
    config
}

fn request(key: &str) -> CheckRequest {
    let mut req = CheckRequest::new(key, "demo-classifier", "2.1.0");
    req.meters.push(Meter {
        metric: "inferences".into(),
        quantity: 1,
    });
    req
}

#[test]
fn demo_key_allows() {
    let config = config();
    assert_eq!(
        config
            .model("demo-classifier")
            .and_then(|m| m.latest())
            .map(|v| v.version.to_string()),
        Some("2.1.0".into())
    );
    let mut usage = Usage::new(1);
    let d = usage.check(&config, &request("tg_demo_key"), NOW_MS, "d1".into());
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    assert_eq!(d.license_id.as_deref(), Some("demo"));
    assert_eq!(d.quotas[0].limit, 1_000_000);
    assert_eq!(d.quotas[0].used, 1);
}

#[test]
fn demo_tiny_runs_out_after_five() {
    let config = config();
    let mut usage = Usage::new(1);
    for i in 0..5 {
        let d = usage.check(&config, &request("tg_demo_tiny"), NOW_MS, format!("d{i}"));
        assert_eq!(d.outcome, Outcome::Allow);
    }
    let d = usage.check(&config, &request("tg_demo_tiny"), NOW_MS, "d6".into());
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.code(), Some(ReasonCode::QuotaExceeded));
}

#[test]
fn plain_dev_keys_are_not_stored() {
    let config = config();
    let json = serde_json::to_string(&config).expect("serializes");
    assert!(!json.contains("tg_demo_key"));
    assert!(!json.contains("tg_demo_tiny"));
    assert!(!json.contains("tg_demo_strict"));
    assert!(!json.contains("tg_demo_seats"));
    assert!(!json.contains("tg_demo_lineage"));
}

#[test]
fn demo_lineage_enforces_its_dataset_constraints() {
    let config = config();
    assert_eq!(config.datasets.len(), 3);
    let mut usage = Usage::new(1);
    let with = |lineage: &[(&str, &str)]| {
        let mut req = request("tg_demo_lineage");
        req.lineage = lineage
            .iter()
            .map(|(dataset, release)| LineageEntry {
                dataset: dataset.to_string(),
                release: release.to_string(),
            })
            .collect();
        req
    };
    let mut decide = |req: CheckRequest| usage.check(&config, &req, NOW_MS, "d".into());
    assert_eq!(decide(with(&[])).code(), Some(ReasonCode::LineageRequired));
    assert_eq!(
        decide(with(&[("clinical-notes", "v3")])).code(),
        Some(ReasonCode::DatasetCategoryDenied)
    );
    assert_eq!(
        decide(with(&[
            ("crm-customers", "2026-01"),
            ("web-reviews", "2025.1")
        ]))
        .code(),
        Some(ReasonCode::DatasetCombinationForbidden)
    );
    let d = decide(with(&[("web-reviews", "2025.1")]));
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    // The other demo licenses carry no dataset constraints: lineage is
    // optional there, but must name registered releases.
    let mut req = request("tg_demo_key");
    assert_eq!(
        usage.check(&config, &req, NOW_MS, "d".into()).outcome,
        Outcome::Allow
    );
    req.lineage.push(LineageEntry {
        dataset: "clinical-notes".into(),
        release: "v3".into(),
    });
    assert_eq!(
        usage.check(&config, &req, NOW_MS, "d".into()).outcome,
        Outcome::Allow
    );
    assert_eq!(
        usage.lineage_graph("demo-lineage").model_versions[0].count,
        1
    );
}

#[test]
fn demo_strict_holds_exactly_its_limit_on_one_node() {
    let config = config();
    let mut usage = Usage::new(1);
    let mut allowed = 0;
    for i in 0..1_005 {
        let d = usage.check(&config, &request("tg_demo_strict"), NOW_MS, format!("d{i}"));
        if d.outcome == Outcome::Allow {
            allowed += 1;
        } else {
            assert_eq!(d.code(), Some(ReasonCode::QuotaExceeded));
        }
    }
    assert_eq!(allowed, 1_000);
}

#[test]
fn demo_seats_grants_three_leases() {
    let config = config();
    let mut usage = Usage::new(1);
    let seat = |i: u32| SeatRequest {
        key: "tg_demo_seats".into(),
        instance: format!("gpu-{i}"),
        ..SeatRequest::default()
    };
    for i in 0..3 {
        let d = usage.acquire_seat(&config, &seat(i), NOW_MS, format!("1.{i}"));
        assert!(d.granted, "{d:?}");
    }
    let d = usage.acquire_seat(&config, &seat(3), NOW_MS, "1.3".into());
    assert!(!d.granted);
    assert_eq!(d.code(), Some(ReasonCode::SeatLimitReached));
    // The same instance asking again keeps its seat instead of taking one.
    let again = usage.acquire_seat(&config, &seat(0), NOW_MS, "1.9".into());
    assert_eq!(again.lease_id.as_deref(), Some("1.0"));
    // A release frees a seat; a lease that lapses does too.
    let release = SeatRequest {
        key: "tg_demo_seats".into(),
        lease_id: "1.1".into(),
        ..SeatRequest::default()
    };
    assert!(
        usage
            .release_seat(&config, &release, NOW_MS)
            .reasons
            .is_empty()
    );
    assert!(
        usage
            .acquire_seat(&config, &seat(4), NOW_MS, "1.4".into())
            .granted
    );
    assert!(
        !usage
            .acquire_seat(&config, &seat(5), NOW_MS, "1.5".into())
            .granted
    );
    let later = NOW_MS + 31_000;
    assert!(
        usage
            .acquire_seat(&config, &seat(5), later, "1.5".into())
            .granted
    );
    let renew = SeatRequest {
        key: "tg_demo_seats".into(),
        lease_id: "1.0".into(),
        ..SeatRequest::default()
    };
    assert_eq!(
        usage.renew_seat(&config, &renew, later).code(),
        Some(ReasonCode::SeatLeaseUnknown)
    );
}
