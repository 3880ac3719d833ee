//! The canonical example file parses and its demo licenses allow a Check.

use tollgate_quota::config::{ApplyOutcome, Config, ConfigCommand, ConfigOp};
use tollgate_quota::decision::{Outcome, ReasonCode};
use tollgate_quota::license::{Document, parse_documents};
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_quota::usage::Usage;

const QUICKSTART: &str = include_str!("../../examples/quickstart.yaml");
const NOW_MS: i64 = 1_780_000_000_000; // 2026-05-28T20:26:40Z

fn config() -> Config {
    let mut config = Config::default();
    let docs = parse_documents(QUICKSTART).expect("quickstart parses");
    assert_eq!(docs.len(), 3);
    for (idx, doc) in docs.into_iter().enumerate() {
        let op = match doc {
            Document::License(l) => ConfigOp::PutLicense(l),
            Document::Model(m) => ConfigOp::PutModel(m),
        };
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
}
