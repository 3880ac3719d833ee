//! Property tests: CRDT laws, dry runs change nothing, multi-meter atomicity.

use proptest::prelude::*;
use tollgate_quota::config::{Config, ConfigCommand, ConfigOp};
use tollgate_quota::decision::{Outcome, decide};
use tollgate_quota::license::parse_license;
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_quota::usage::{CounterKey, GCounter, Usage, Window};

fn counter() -> impl Strategy<Value = GCounter> {
    proptest::collection::btree_map(0u64..5, 0u64..1_000, 0..5).prop_map(|slots| GCounter { slots })
}

fn merged(a: &GCounter, b: &GCounter) -> GCounter {
    let mut out = a.clone();
    out.merge(b);
    out
}

const NOW_MS: i64 = 1_780_000_000_000;

fn config(limit_a: u64, limit_b: u64) -> Config {
    let text = format!(
        "apiVersion: tollgate/v1\nkind: License\nid: p\ncustomer: P\nkeys: [{{key: k}}]\nmodels: [{{model: m}}]\nhardware: {{max_devices: 3}}\nrate_limits: [{{id: r, per_second: 5, burst: 5}}]\nquotas:\n  - {{id: a, metric: inferences, limit: {limit_a}, window: day}}\n  - {{id: b, metric: tokens, limit: {limit_b}, window: month}}\n"
    );
    let license = parse_license(&text).expect("valid");
    let mut config = Config::default();
    config.apply(
        &ConfigCommand {
            actor: "p".into(),
            reason: None,
            at_ms: 0,
            op: ConfigOp::PutLicense(license),
        },
        1,
    );
    config
}

fn request(inferences: u64, tokens: u64, device: u8, dry_run: bool) -> CheckRequest {
    let mut req = CheckRequest::new("k", "m", "1.0.0");
    req.meters = vec![
        Meter {
            metric: "inferences".into(),
            quantity: inferences,
        },
        Meter {
            metric: "tokens".into(),
            quantity: tokens,
        },
    ];
    req.hardware_id = Some(format!("d{device}"));
    req.dry_run = dry_run;
    req
}

fn key(quota: &str, window: Window) -> CounterKey {
    CounterKey {
        license: "p".into(),
        quota: quota.into(),
        epoch: window.epoch(NOW_MS),
        scope: String::new(),
    }
}

proptest! {
    #[test]
    fn merge_is_commutative(a in counter(), b in counter()) {
        prop_assert_eq!(merged(&a, &b), merged(&b, &a));
    }

    #[test]
    fn merge_is_associative(a in counter(), b in counter(), c in counter()) {
        prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
    }

    #[test]
    fn merge_is_idempotent(a in counter(), b in counter()) {
        let once = merged(&a, &b);
        prop_assert_eq!(merged(&once, &b), once.clone());
        prop_assert_eq!(merged(&a, &a), a);
    }

    #[test]
    fn delta_twice_is_delta_once(a in counter(), node in 0u64..5, value in 0u64..2_000) {
        let mut once = a.clone();
        once.apply_delta(node, value);
        let mut twice = once.clone();
        twice.apply_delta(node, value);
        prop_assert_eq!(twice, once);
    }

    #[test]
    fn dry_run_never_changes_usage(
        limit_a in 1u64..20, limit_b in 1u64..200,
        steps in proptest::collection::vec((1u64..5, 1u64..50, 0u8..5, any::<bool>()), 1..20),
    ) {
        let config = config(limit_a, limit_b);
        let mut usage = Usage::new(1);
        for (idx, (inferences, tokens, device, dry_run)) in steps.into_iter().enumerate() {
            let req = request(inferences, tokens, device, dry_run);
            let before = usage.clone();
            let now_ms = NOW_MS + idx as i64 * 10;
            let d = usage.check(&config, &req, now_ms, String::new());
            if dry_run {
                prop_assert!(d.dry_run);
                prop_assert_eq!(&usage, &before);
            }
        }
    }

    #[test]
    fn multi_meter_is_all_or_nothing(
        limit_a in 1u64..20, limit_b in 1u64..200,
        steps in proptest::collection::vec((1u64..8, 1u64..80), 1..30),
    ) {
        let config = config(limit_a, limit_b);
        let mut usage = Usage::new(1);
        for (inferences, tokens) in steps {
            let (ka, kb) = (key("a", Window::Day), key("b", Window::Month));
            let (a0, b0) = (usage.counter_value(&ka), usage.counter_value(&kb));
            let req = request(inferences, tokens, 0, false);
            // decide is pure: deciding twice gives the same answer.
            let first = decide(&config, &usage, &req, NOW_MS, String::new());
            let d = usage.check(&config, &req, NOW_MS, String::new());
            prop_assert_eq!(&first, &d);
            let (a1, b1) = (usage.counter_value(&ka), usage.counter_value(&kb));
            if d.outcome == Outcome::Allow {
                prop_assert_eq!((a1, b1), (a0 + inferences, b0 + tokens));
            } else {
                prop_assert_eq!((a1, b1), (a0, b0));
            }
            prop_assert!(a1 <= limit_a && b1 <= limit_b);
        }
    }
}
