//! Property tests of dataset lineage: `decide` enforces a license's dataset
//! constraints exactly as a plain reading of them says, naming the dataset
//! and the clause; and the lineage graph counted on several nodes converges
//! to one graph whatever order the nodes' counter states are merged in.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tollgate_quota::config::{ApplyOutcome, Config, ConfigCommand, ConfigOp};
use tollgate_quota::dataset::DatasetCategory;
use tollgate_quota::decision::{Outcome, ReasonCode, decide};
use tollgate_quota::license::parse_documents;
use tollgate_quota::lineage::LINEAGE_QUOTA;
use tollgate_quota::request::{CheckRequest, LineageEntry};
use tollgate_quota::usage::Usage;

const NOW_MS: i64 = 1_780_000_000_000;
/// Registered datasets `d0..d4`, each with one release `r0`; `d5` and
/// release `r1` are never registered.
const N_DATASETS: usize = 5;
const SOURCES: [&str; 3] = ["s0", "s1", "s2"];

/// One registered dataset's release: its source index and categories.
#[derive(Clone, Debug)]
struct Release {
    source: usize,
    categories: Vec<DatasetCategory>,
}

#[derive(Clone, Debug)]
struct Constraints {
    require_lineage: bool,
    allowed_sources: Option<Vec<usize>>,
    denied: Vec<DatasetCategory>,
    combinations: Vec<Vec<usize>>,
}

fn categories() -> impl Strategy<Value = Vec<DatasetCategory>> {
    proptest::sample::subsequence(DatasetCategory::ALL.to_vec(), 0..3)
}

fn registry() -> impl Strategy<Value = Vec<Release>> {
    proptest::collection::vec(
        (0..SOURCES.len(), categories())
            .prop_map(|(source, categories)| Release { source, categories }),
        N_DATASETS,
    )
}

fn constraints() -> impl Strategy<Value = Option<Constraints>> {
    let some = (
        any::<bool>(),
        proptest::option::of(proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3)),
        categories(),
        // Dataset indexes up to 5: combinations may name an unregistered one.
        proptest::collection::vec(
            proptest::sample::subsequence((0..=N_DATASETS).collect::<Vec<_>>(), 2..=3),
            0..3,
        ),
    )
        .prop_map(
            |(require_lineage, allowed_sources, denied, combinations)| Constraints {
                require_lineage,
                allowed_sources,
                denied,
                combinations,
            },
        );
    proptest::option::of(some)
}

/// A request's lineage: distinct (dataset index 0..=5, release index 0..=1).
fn lineage() -> impl Strategy<Value = Vec<(usize, usize)>> {
    proptest::collection::btree_set(
        (
            0..=N_DATASETS,
            prop_oneof![4 => Just(0usize), 1 => Just(1usize)],
        ),
        0..5,
    )
    .prop_map(|s| s.into_iter().collect())
}

fn names(list: &[DatasetCategory]) -> String {
    list.iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn config(registry: &[Release], constraints: Option<&Constraints>) -> Config {
    let mut text = String::from(
        "apiVersion: tollgate/v1\nkind: Model\nid: m\nversions: [{ version: 1.0.0, released: 2025-01-01 }]\n",
    );
    for (idx, r) in registry.iter().enumerate() {
        text.push_str(&format!(
            "---\napiVersion: tollgate/v1\nkind: Dataset\nid: d{idx}\nreleases: [{{ version: r0, source: {}, categories: [{}], license: CC-BY-4.0 }}]\n",
            SOURCES[r.source],
            names(&r.categories)
        ));
    }
    text.push_str("---\napiVersion: tollgate/v1\nkind: License\nid: l\ncustomer: C\nkeys: [{key: k}]\nmodels: [{model: m}]\n");
    if let Some(c) = constraints {
        text.push_str(&format!(
            "datasets:\n  require_lineage: {}\n",
            c.require_lineage
        ));
        if let Some(allowed) = &c.allowed_sources {
            let allowed: Vec<&str> = allowed.iter().map(|i| SOURCES[*i]).collect();
            text.push_str(&format!("  allowed_sources: [{}]\n", allowed.join(", ")));
        }
        text.push_str(&format!("  denied_categories: [{}]\n", names(&c.denied)));
        let combos: Vec<String> = c
            .combinations
            .iter()
            .map(|combo| {
                let ids: Vec<String> = combo.iter().map(|i| format!("d{i}")).collect();
                format!("[{}]", ids.join(", "))
            })
            .collect();
        text.push_str(&format!(
            "  forbidden_combinations: [{}]\n",
            combos.join(", ")
        ));
    }
    let mut config = Config::default();
    for doc in parse_documents(&text).expect("valid documents") {
        let cmd = ConfigCommand {
            request_id: None,
            actor: "p".into(),
            reason: None,
            at_ms: 0,
            op: ConfigOp::from(doc),
        };
        let next = config.version + 1;
        assert_eq!(
            config.apply(&cmd, next),
            ApplyOutcome::Applied { version: next }
        );
    }
    config
}

fn request(lineage: &[(usize, usize)]) -> CheckRequest {
    let mut req = CheckRequest::new("k", "m", "1.0.0");
    req.lineage = lineage
        .iter()
        .map(|(d, r)| LineageEntry {
            dataset: format!("d{d}"),
            release: format!("r{r}"),
        })
        .collect();
    req
}

/// What a plain reading of the constraints says: one (code, dataset) per
/// violation, `""` where no single dataset is at fault.
fn expected(
    registry: &[Release],
    constraints: Option<&Constraints>,
    lineage: &[(usize, usize)],
) -> Vec<(ReasonCode, String)> {
    let mut out = Vec::new();
    if lineage.is_empty() {
        if constraints.is_some_and(|c| c.require_lineage) {
            out.push((ReasonCode::LineageRequired, String::new()));
        }
        return out;
    }
    for &(d, r) in lineage {
        let name = format!("d{d}");
        let Some(release) = registry.get(d) else {
            out.push((ReasonCode::DatasetUnknown, name));
            continue;
        };
        if r != 0 {
            out.push((ReasonCode::DatasetReleaseUnknown, name));
            continue;
        }
        let Some(c) = constraints else { continue };
        if c.allowed_sources
            .as_ref()
            .is_some_and(|a| !a.contains(&release.source))
        {
            out.push((ReasonCode::DatasetSourceNotAllowed, name.clone()));
        }
        for category in &release.categories {
            if c.denied.contains(category) {
                out.push((ReasonCode::DatasetCategoryDenied, name.clone()));
            }
        }
    }
    if let Some(c) = constraints {
        for combo in &c.combinations {
            if combo.iter().all(|d| lineage.iter().any(|(l, _)| l == d)) {
                out.push((ReasonCode::DatasetCombinationForbidden, String::new()));
            }
        }
    }
    out
}

proptest! {
    #[test]
    fn decide_enforces_dataset_constraints_as_written(
        registry in registry(),
        constraints in constraints(),
        lineage in lineage(),
    ) {
        let config = config(&registry, constraints.as_ref());
        let usage = Usage::new(1);
        let d = decide(&config, &usage, &request(&lineage), NOW_MS, String::new());
        let mut want = expected(&registry, constraints.as_ref(), &lineage);
        let mut got: Vec<(ReasonCode, String)> = d
            .reasons
            .iter()
            .map(|r| {
                let named = want
                    .iter()
                    .find(|(code, name)| *code == r.code && !name.is_empty() && r.message.contains(name.as_str()))
                    .map(|(_, name)| name.clone())
                    .unwrap_or_default();
                (r.code, named)
            })
            .collect();
        want.sort_by_key(|(c, n)| (c.as_str(), n.clone()));
        got.sort_by_key(|(c, n)| (c.as_str(), n.clone()));
        prop_assert_eq!(&got, &want, "reasons: {:#?}", d.reasons);
        prop_assert_eq!(d.outcome == Outcome::Allow, want.is_empty());
        // An allowed use with lineage adds its model edge and one edge per
        // dataset release; nothing else adds edges.
        let n_edges = if d.outcome == Outcome::Allow && !lineage.is_empty() { lineage.len() + 1 } else { 0 };
        prop_assert_eq!(d.effects.lineage.len(), n_edges);
    }

    #[test]
    fn lineage_graphs_converge_whatever_the_merge_order(
        // (node, lineage as dataset indexes 0..3, release r0) per use.
        uses in proptest::collection::vec(
            (0u64..3, proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3)),
            1..25,
        ),
        order in proptest::collection::vec((0usize..3, 0usize..3), 0..12),
    ) {
        let registry: Vec<Release> = (0..N_DATASETS)
            .map(|_| Release { source: 0, categories: Vec::new() })
            .collect();
        let config = config(&registry, None);
        let mut nodes: Vec<Usage> = (0..3).map(Usage::new).collect();
        // What every node must end up showing: uses per dataset release.
        let mut want: BTreeMap<String, u64> = BTreeMap::new();
        for (node, datasets) in &uses {
            let lineage: Vec<(usize, usize)> = datasets.iter().map(|d| (*d, 0)).collect();
            let d = nodes[*node as usize].check(&config, &request(&lineage), NOW_MS, String::new());
            prop_assert_eq!(d.outcome, Outcome::Allow);
            for ds in datasets {
                *want.entry(format!("d{ds}")).or_default() += 1;
            }
        }
        // Some partial exchanges in a random order, then everyone hears
        // everyone (twice: duplicates change nothing).
        let states = |u: &Usage| -> Vec<_> {
            u.counters().filter(|(k, _)| k.quota == LINEAGE_QUOTA).map(|(k, c)| (k.clone(), c.clone())).collect()
        };
        for (from, to) in order {
            for (k, c) in states(&nodes[from]) {
                nodes[to].merge_remote(&config, NOW_MS, &k, &c);
            }
        }
        for _ in 0..2 {
            for from in 0..3 {
                for (k, c) in states(&nodes[from]) {
                    for node in nodes.iter_mut() {
                        node.merge_remote(&config, NOW_MS, &k, &c);
                    }
                }
            }
        }
        let graphs: Vec<_> = nodes.iter().map(|u| u.lineage_graph("l")).collect();
        prop_assert_eq!(&graphs[0], &graphs[1]);
        prop_assert_eq!(&graphs[1], &graphs[2]);
        let g = &graphs[0];
        prop_assert_eq!(g.model_versions.len(), 1);
        prop_assert_eq!(g.model_versions[0].count, uses.len() as u64);
        let got: BTreeMap<String, u64> = g.model_versions[0].datasets.iter().map(|d| (d.dataset.clone(), d.count)).collect();
        prop_assert_eq!(got, want);
    }
}
