//! Property tests: CRDT laws, dry runs change nothing, multi-meter atomicity,
//! config diffs describe exactly the change between two values.

use proptest::prelude::*;
use serde_json::{Map, Value};
use tollgate_quota::config::{Config, ConfigCommand, ConfigOp};
use tollgate_quota::decision::{Outcome, decide};
use tollgate_quota::history::{Change, DiffEntry, diff_values};
use tollgate_quota::license::parse_license;
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_quota::usage::{Counter, CounterKey, Usage, Window};

fn node_map() -> impl Strategy<Value = std::collections::BTreeMap<u64, u64>> {
    proptest::collection::btree_map(0u64..5, 0u64..1_000, 0..5)
}

/// Any counter state: soft (no members) or escrow, with every field set.
fn counter() -> impl Strategy<Value = Counter> {
    (
        node_map(),
        node_map(),
        proptest::collection::btree_map(
            0u64..5,
            proptest::collection::btree_map(0u64..5, 1u64..1_000, 1..4),
            0..3,
        ),
        node_map(),
        prop_oneof![
            Just(Vec::new()),
            proptest::collection::btree_set(0u64..5, 1..4).prop_map(|s| s.into_iter().collect()),
        ],
    )
        .prop_map(|(slots, released, transfers, starved, members)| Counter {
            slots,
            released,
            transfers,
            starved,
            members,
        })
}

fn merged(a: &Counter, b: &Counter) -> Counter {
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
            request_id: None,
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

/// JSON values from a small alphabet, so two draws often share structure.
/// Keys include `.`, `[`, `"` and the empty string to exercise path quoting.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0i64..3).prop_map(Value::from),
        Just(Value::from(0.5)),
        "[xy]{0,1}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[ab.\\[\"]{0,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One step of a diff path.
#[derive(Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// Parses a diff path (`a.b[2]["x.y"]`) back into steps.
fn parse_path(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            if after.starts_with('"') {
                let mut stream = serde_json::Deserializer::from_str(after).into_iter::<String>();
                let key = stream.next().expect("a key").expect("a JSON string");
                let used = stream.byte_offset();
                steps.push(Step::Key(key));
                rest = after[used..].strip_prefix(']').expect("closing bracket");
            } else {
                let (digits, tail) = after.split_once(']').expect("closing bracket");
                steps.push(Step::Index(digits.parse().expect("an index")));
                rest = tail;
            }
        } else {
            let plain = rest.strip_prefix('.').unwrap_or(rest);
            let end = plain.find(['.', '[']).unwrap_or(plain.len());
            steps.push(Step::Key(plain[..end].to_string()));
            rest = &plain[end..];
        }
    }
    steps
}

fn lookup<'v>(value: &'v Value, steps: &[Step]) -> Option<&'v Value> {
    steps.iter().try_fold(value, |v, step| match step {
        Step::Key(key) => v.as_object()?.get(key),
        Step::Index(idx) => v.as_array()?.get(*idx),
    })
}

/// Applies `diff` to `base`. Array tails are added and removed in index
/// order, so a removal truncates and an addition appends.
fn patch(base: &Value, diff: &[DiffEntry]) -> Value {
    let mut out = base.clone();
    for entry in diff {
        let steps = parse_path(&entry.path);
        let Some((last, parents)) = steps.split_last() else {
            match &entry.change {
                Change::Changed { new, .. } => out = new.clone(),
                other => panic!("{other:?} at the root"),
            }
            continue;
        };
        let mut parent = &mut out;
        for step in parents {
            parent = match step {
                Step::Key(key) => parent.get_mut(key.as_str()).expect("parent key"),
                Step::Index(idx) => parent.get_mut(*idx).expect("parent index"),
            };
        }
        match (&entry.change, last, parent) {
            (Change::Removed { .. }, Step::Key(key), Value::Object(map)) => {
                map.remove(key);
            }
            (Change::Removed { .. }, Step::Index(idx), Value::Array(items)) => items.truncate(*idx),
            (
                Change::Added { new } | Change::Changed { new, .. },
                Step::Key(key),
                Value::Object(map),
            ) => {
                map.insert(key.clone(), new.clone());
            }
            (Change::Added { new }, Step::Index(idx), Value::Array(items)) => {
                assert_eq!(*idx, items.len(), "additions come in index order");
                items.push(new.clone());
            }
            (Change::Changed { new, .. }, Step::Index(idx), Value::Array(items)) => {
                items[*idx] = new.clone();
            }
            (change, step, parent) => panic!("{change:?} at {step:?} of {parent}"),
        }
    }
    out
}

proptest! {
    #[test]
    fn diff_of_a_value_with_itself_is_empty(a in json_value()) {
        prop_assert!(diff_values(&a, &a).is_empty());
    }

    #[test]
    fn diff_is_empty_exactly_when_equal(a in json_value(), b in json_value()) {
        prop_assert_eq!(diff_values(&a, &b).is_empty(), a == b);
    }

    #[test]
    fn diff_names_values_where_they_are(a in json_value(), b in json_value()) {
        for entry in diff_values(&a, &b) {
            let steps = parse_path(&entry.path);
            let (old, new) = (lookup(&a, &steps), lookup(&b, &steps));
            match &entry.change {
                Change::Added { new: added } => {
                    prop_assert_eq!(old, None);
                    prop_assert_eq!(new, Some(added));
                }
                Change::Removed { old: removed } => {
                    prop_assert_eq!(old, Some(removed));
                    prop_assert_eq!(new, None);
                }
                Change::Changed { old: before, new: after } => {
                    prop_assert_eq!(old, Some(before));
                    prop_assert_eq!(new, Some(after));
                    prop_assert_ne!(before, after);
                }
            }
        }
    }

    #[test]
    fn patching_with_the_diff_gives_the_new_value(a in json_value(), b in json_value()) {
        let diff = diff_values(&a, &b);
        prop_assert_eq!(patch(&a, &diff), b.clone());
        // The reverse diff undoes it, and round trips through JSON.
        let reverse = diff_values(&b, &a);
        let text = serde_json::to_string(&reverse).expect("serializes");
        let reverse: Vec<DiffEntry> = serde_json::from_str(&text).expect("deserializes");
        prop_assert_eq!(patch(&b, &reverse), a);
    }

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
    fn merge_only_grows(a in counter(), b in counter()) {
        let m = merged(&a, &b);
        prop_assert!(m.consumed() >= a.consumed().max(b.consumed()));
        for node in 0u64..5 {
            prop_assert!(m.slot(node) >= a.slot(node).max(b.slot(node)));
            prop_assert!(m.given(node) >= a.given(node).max(b.given(node)));
        }
        // Merging reports a change exactly when the state changed.
        let mut c = a.clone();
        prop_assert_eq!(c.merge(&b), c != a);
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
