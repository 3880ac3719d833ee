//! Criterion benchmark of `decide()` on a license with ~10 rules and warm usage.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate_quota::config::{Config, ConfigCommand, ConfigOp};
use tollgate_quota::decision::{Outcome, decide};
use tollgate_quota::license::parse_documents;
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_quota::usage::Usage;

const DOCS: &str = r#"
apiVersion: tollgate/v1
kind: Model
id: demo-classifier
versions:
  - { version: 2.0.0, released: 2026-01-15 }
  - { version: 2.1.0, released: 2026-06-01 }
---
apiVersion: tollgate/v1
kind: License
id: bench
customer: Bench Corp
valid_until: 2036-01-01T00:00:00Z
grace_period: 7d
keys: [{ key: tg_bench }]
models: [{ model: demo-classifier, versions: { major: 2 } }]
features: [classify, explain]
environments: [production, staging]
regions: { allow: ["eu-*", "us-*"], deny: ["eu-east-*"] }
hardware: { max_devices: 100 }
rate_limits:
  - id: burst
    per_second: 1000000
    burst: 1000000
    schedule: { timezone: Europe/Berlin, peak: { hours: "08-20", per_second: 1000000, burst: 1000000 } }
quotas:
  - { id: daily, metric: inferences, limit: 1000000000, window: day, alert_thresholds: [0.8] }
  - { id: monthly, metric: inferences, limit: 1000000000, window: month }
  - { id: tokens, metric: tokens, limit: 1000000000, window: day, scope: subject }
"#;

const NOW_MS: i64 = 1_780_000_000_000;

fn bench(c: &mut Criterion) {
    let mut config = Config::default();
    for (idx, doc) in parse_documents(DOCS)
        .expect("valid")
        .into_iter()
        .enumerate()
    {
        let op = ConfigOp::from(doc);
        config.apply(
            &ConfigCommand {
                request_id: None,
                actor: "b".into(),
                reason: None,
                at_ms: 0,
                op,
            },
            idx as u64 + 1,
        );
    }
    let mut req = CheckRequest::new("tg_bench", "demo-classifier", "2.1.0");
    req.feature = Some("classify".into());
    req.environment = Some("production".into());
    req.region = Some("eu-west-1".into());
    req.hardware_id = Some("gpu-7".into());
    req.subject = Some("alice".into());
    req.meters = vec![
        Meter {
            metric: "inferences".into(),
            quantity: 1,
        },
        Meter {
            metric: "tokens".into(),
            quantity: 200,
        },
    ];
    let mut usage = Usage::new(1);
    for i in 0..1_000 {
        let d = usage.check(&config, &req, NOW_MS + i, String::new());
        assert_eq!(d.outcome, Outcome::Allow);
    }
    c.bench_function("decide_10_rules_warm", |b| {
        b.iter(|| {
            decide(
                black_box(&config),
                black_box(&usage),
                black_box(&req),
                NOW_MS + 2_000,
                String::new(),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
