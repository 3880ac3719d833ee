//! Dataset lineage over real sockets: the demo license's dataset
//! constraints deny with reasons naming the dataset and the clause (HTTP and
//! gRPC alike), allowed lineage shows up in the JSON, DOT and OpenLineage
//! exports, datasets are applied through the admin API, and bad input is
//! refused without changing anything.

use reqwest::Method;
use tollgate_proto::v1 as pb;
use tollgate_proto::v1::edge_client::EdgeClient;
use tollgate_tests::{TestNode, lineage_check};

const KEY: &str = "tg_demo_lineage";

async fn lineage(n: &TestNode, format: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    n.admin(
        Method::GET,
        &format!("/v1/lineage?license=demo-lineage{format}"),
        Some(&n.token),
        "",
    )
    .await
}

/// The reason with `code`, or a panic showing the decision.
fn reason<'a>(d: &'a serde_json::Value, code: &str) -> &'a serde_json::Value {
    d["reasons"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["code"] == code))
        .unwrap_or_else(|| panic!("no {code} reason: {d}"))
}

#[tokio::test]
async fn dataset_constraints_deny_with_the_dataset_and_the_clause() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;

    // (a) A release holding a denied category.
    let (s, d) = n
        .post(
            "/v1/check",
            &lineage_check(KEY, &["web-reviews@2025.1", "clinical-notes@v3"]),
        )
        .await?;
    assert_eq!((s, d["decision"].as_str()), (200, Some("deny")), "{d}");
    let r = reason(&d, "dataset_category_denied");
    let message = r["message"].as_str().unwrap_or_default();
    for named in ["clinical-notes", "v3", "medical"] {
        assert!(message.contains(named), "{named} not in {message:?}");
    }
    assert_eq!(r["rule"], "datasets.denied_categories", "{d}");
    assert_eq!(d["reasons"].as_array().map(Vec::len), Some(1), "{d}");

    // (b) A forbidden combination, through gRPC this time.
    let mut edge = EdgeClient::connect(n.grpc.clone()).await?;
    let entry = |dataset: &str, release: &str| pb::LineageEntry {
        dataset: dataset.into(),
        release: release.into(),
    };
    let r = edge
        .check(pb::CheckRequest {
            key: KEY.into(),
            model: "demo-classifier".into(),
            model_version: "2.1.0".into(),
            lineage: vec![
                entry("crm-customers", "2026-01"),
                entry("web-reviews", "2025.1"),
            ],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(r.decision, "deny");
    let codes: Vec<&str> = r.reasons.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(codes, ["dataset_combination_forbidden"], "{r:?}");
    assert_eq!(r.reasons[0].rule, "datasets.forbidden_combinations[0]");
    assert!(
        r.reasons[0].message.contains("crm-customers + web-reviews"),
        "{r:?}"
    );

    // require_lineage, and lineage naming nothing registered.
    let (_, d) = n.post("/v1/check", &lineage_check(KEY, &[])).await?;
    assert_eq!(
        reason(&d, "lineage_required")["rule"],
        "datasets.require_lineage"
    );
    let (_, d) = n
        .post(
            "/v1/check",
            &lineage_check(KEY, &["nope@1", "web-reviews@1999"]),
        )
        .await?;
    reason(&d, "dataset_unknown");
    reason(&d, "dataset_release_unknown");

    // None of the denials left a trace in the graph.
    let (s, g) = lineage(&n, "").await?;
    assert_eq!(s, 200, "{g}");
    assert_eq!(g["edges"], serde_json::json!([]), "{g}");
    n.node.shutdown().await
}

#[tokio::test]
async fn allowed_lineage_shows_in_json_dot_and_openlineage() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    for _ in 0..3 {
        let (_, d) = n
            .post("/v1/check", &lineage_check(KEY, &["web-reviews@2025.1"]))
            .await?;
        assert_eq!(d["decision"], "allow", "{d}");
    }
    let (_, d) = n
        .post("/v1/check", &lineage_check(KEY, &["crm-customers@2026-01"]))
        .await?;
    assert_eq!(d["decision"], "allow", "{d}");
    // A dry run is not counted.
    let dry = lineage_check(KEY, &["crm-customers@2026-01"])
        .replace("\"lineage\"", "\"dry_run\":true,\"lineage\"");
    let (_, d) = n.post("/v1/check", &dry).await?;
    assert_eq!(
        (d["decision"].as_str(), d["dry_run"].as_bool()),
        (Some("allow"), Some(true))
    );

    // JSON: nodes and edges with counts.
    let (s, g) = lineage(&n, "").await?;
    assert_eq!(s, 200, "{g}");
    let edges: Vec<(String, String, u64)> = g["edges"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap_or_default().to_string(),
                e["to"].as_str().unwrap_or_default().to_string(),
                e["count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let edge = |from: &str, to: &str, count: u64| (from.to_string(), to.to_string(), count);
    assert_eq!(
        edges,
        vec![
            edge("license:demo-lineage", "model:demo-classifier@2.1.0", 4),
            edge(
                "model:demo-classifier@2.1.0",
                "dataset:crm-customers@2026-01",
                1
            ),
            edge(
                "model:demo-classifier@2.1.0",
                "dataset:web-reviews@2025.1",
                3
            ),
        ],
        "{g}"
    );
    let nodes = g["nodes"].as_array().cloned().unwrap_or_default();
    let web = nodes
        .iter()
        .find(|n| n["id"] == "dataset:web-reviews@2025.1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(web["kind"], "dataset_release", "{g}");
    assert_eq!(web["source"], "licensed-vendor", "{g}");
    assert_eq!(web["categories"], serde_json::json!(["copyrighted"]), "{g}");
    assert_eq!(web["license"], "CC-BY-4.0", "{g}");
    assert_eq!(nodes.len(), 4, "{g}");

    // OpenLineage: one RunEvent per model version, the license terms in a
    // run facet, the dataset releases as inputs.
    let (s, events) = lineage(&n, "&format=openlineage").await?;
    assert_eq!(s, 200, "{events}");
    let events = events.as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    for field in [
        "eventTime",
        "producer",
        "schemaURL",
        "run",
        "job",
        "inputs",
        "outputs",
    ] {
        assert!(e.get(field).is_some(), "RunEvent without {field}: {e}");
    }
    assert_eq!(e["eventType"], "RUNNING");
    let run_id = e["run"]["runId"].as_str().unwrap_or_default();
    assert_eq!(run_id.len(), 36, "{e}");
    let terms = &e["run"]["facets"]["tollgate_licenseTerms"];
    assert!(
        terms["_producer"].is_string() && terms["_schemaURL"].is_string(),
        "{e}"
    );
    assert_eq!(terms["license"], "demo-lineage", "{e}");
    assert_eq!(terms["terms"]["datasets"]["require_lineage"], true, "{e}");
    assert_eq!(
        terms["terms"]["datasets"]["denied_categories"],
        serde_json::json!(["medical", "biometric"]),
        "{e}"
    );
    assert!(
        terms["terms"].get("keys").is_none(),
        "key hashes leaked: {e}"
    );
    assert_eq!(
        e["job"]["name"], "demo-lineage/demo-classifier@2.1.0",
        "{e}"
    );
    assert_eq!(e["run"]["facets"]["tollgate_uses"]["count"], 4, "{e}");
    let inputs = e["inputs"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = inputs.iter().filter_map(|i| i["name"].as_str()).collect();
    assert_eq!(names, ["crm-customers", "web-reviews"], "{e}");
    let web = &inputs[1];
    assert_eq!(web["facets"]["datasetVersion"]["datasetVersion"], "2025.1");
    assert_eq!(
        web["facets"]["tollgate_datasetRelease"]["license"],
        "CC-BY-4.0"
    );
    assert_eq!(web["inputFacets"]["tollgate_uses"]["count"], 3);
    // The run id is stable across exports.
    let (_, again) = lineage(&n, "&format=openlineage").await?;
    assert_eq!(again[0]["run"]["runId"], run_id);

    // DOT: well-formed, with every node and edge.
    let r = n
        .client
        .get(format!(
            "{}/v1/lineage?license=demo-lineage&format=dot",
            n.http
        ))
        .header("authorization", format!("Bearer {}", n.token))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/vnd.graphviz"),
        "{content_type}"
    );
    let dot = r.text().await?;
    let graph = parse_dot(&dot).unwrap_or_else(|e| panic!("malformed DOT ({e}):\n{dot}"));
    assert_eq!(graph.nodes.len(), 4, "{dot}");
    assert_eq!(
        graph.edges,
        vec![
            edge("license:demo-lineage", "model:demo-classifier@2.1.0", 4),
            edge(
                "model:demo-classifier@2.1.0",
                "dataset:crm-customers@2026-01",
                1
            ),
            edge(
                "model:demo-classifier@2.1.0",
                "dataset:web-reviews@2025.1",
                3
            ),
        ],
        "{dot}"
    );
    n.node.shutdown().await
}

#[tokio::test]
async fn datasets_are_applied_like_licenses_and_bad_input_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let token = Some(n.token.as_str());

    // The lineage export needs the admin token, a license and a known format.
    let (s, _) = n
        .admin(Method::GET, "/v1/lineage?license=demo-lineage", None, "")
        .await?;
    assert_eq!(s, 401);
    let (s, b) = n.admin(Method::GET, "/v1/lineage", token, "").await?;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_argument")),
        "{b}"
    );
    let (s, b) = lineage(&n, "&format=svg").await?;
    assert_eq!(s, 400, "{b}");
    let (s, b) = n
        .admin(Method::GET, "/v1/lineage?license=nope", token, "")
        .await?;
    assert_eq!(s, 404, "{b}");

    // A dataset and a license using it, in one apply.
    let docs = "apiVersion: tollgate/v1\nkind: License\nid: acme\ncustomer: Acme\nkeys: [{key: tg_acme}]\nmodels: [{model: demo-classifier}]\ndatasets: {denied_categories: [biometric]}\n---\napiVersion: tollgate/v1\nkind: Dataset\nid: faces\nreleases: [{version: v1, source: camera-feed, categories: [biometric, pii], license: LicenseRef-faces}]\n";
    let applied = n
        .admin_ok(Method::POST, "/v1/apply?reason=test", docs)
        .await?;
    let kinds: Vec<&str> = applied["applied"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["kind"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(kinds, ["Dataset", "License"], "{applied}");
    let (_, d) = n
        .post("/v1/check", &lineage_check("tg_acme", &["faces@v1"]))
        .await?;
    let r = reason(&d, "dataset_category_denied");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or_default()
            .contains("biometric"),
        "{d}"
    );

    // PUT, GET, history and DELETE of one dataset.
    let v2 = "apiVersion: tollgate/v1\nkind: Dataset\nid: faces\nreleases: [{version: v2, source: consented-panel, categories: [pii], license: CC-BY-NC-4.0}]\n";
    n.admin_ok(Method::PUT, "/v1/datasets/faces?reason=consented", v2)
        .await?;
    let got = n.admin_ok(Method::GET, "/v1/datasets/faces", "").await?;
    assert_eq!(
        got["dataset"]["releases"][0]["license"], "CC-BY-NC-4.0",
        "{got}"
    );
    let (_, d) = n
        .post("/v1/check", &lineage_check("tg_acme", &["faces@v2"]))
        .await?;
    assert_eq!(d["decision"], "allow", "{d}");
    let list = n.admin_ok(Method::GET, "/v1/datasets", "").await?;
    assert_eq!(list["datasets"].as_array().map(Vec::len), Some(4), "{list}");

    // Bad documents and bad lineage: 400 with a reason, nothing changes.
    let before = n.version().await?;
    let bad_spdx = v2.replace("CC-BY-NC-4.0", "CC-BY-NC-4.0 AND");
    let (s, b) = n
        .admin(Method::PUT, "/v1/datasets/faces", token, &bad_spdx)
        .await?;
    assert_eq!(s, 400, "{b}");
    assert!(
        b.to_string().contains("releases[0].license"),
        "no field path: {b}"
    );
    let (s, b) = n
        .admin(
            Method::PUT,
            "/v1/datasets/other",
            token,
            &v2.replace("categories: [pii]", "categories: [secret]"),
        )
        .await?;
    assert_eq!(s, 400, "{b}");
    let (s, b) = n
        .admin(
            Method::PUT,
            "/v1/licenses/acme",
            token,
            "apiVersion: tollgate/v1\nkind: License\nid: acme\ncustomer: Acme\ndatasets: {forbidden_combinations: [[faces]]}\n",
        )
        .await?;
    assert_eq!(s, 400, "{b}");
    assert!(
        b.to_string().contains("datasets.forbidden_combinations[0]"),
        "{b}"
    );
    let graph_before = lineage(&n, "").await?.1;
    for (body, needle) in [
        (
            lineage_check(KEY, &["web-reviews@2025.1", "web-reviews@2025.1"]),
            "duplicate dataset release",
        ),
        (
            lineage_check(KEY, &["web-reviews@2025.1"])
                .replace(r#""release":"2025.1""#, r#""relase":"2025.1""#),
            "relase",
        ),
        (
            lineage_check(
                KEY,
                &(0..17)
                    .map(|i| format!("d{i}@1"))
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            ),
            "at most 16",
        ),
        (lineage_check(KEY, &["@1"]), "lineage[0].dataset"),
    ] {
        let (s, b) = n.post("/v1/check", &body).await?;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(b.to_string().contains(needle), "`{needle}` not in {b}");
    }
    assert_eq!(lineage(&n, "").await?.1, graph_before);
    assert_eq!(n.version().await?, before);

    n.admin_ok(Method::DELETE, "/v1/datasets/faces?reason=retired", "")
        .await?;
    let (_, d) = n
        .post("/v1/check", &lineage_check("tg_acme", &["faces@v2"]))
        .await?;
    reason(&d, "dataset_unknown");
    let h = n
        .admin_ok(Method::GET, "/v1/datasets/faces/history", "")
        .await?;
    let actions: Vec<&str> = h["history"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["action"]["kind"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(actions, ["put", "put", "delete"], "{h}");
    n.node.shutdown().await
}

/// What [`parse_dot`] read: node ids and (from, to, count) edges.
struct DotGraph {
    nodes: Vec<String>,
    edges: Vec<(String, String, u64)>,
}

#[derive(Debug, PartialEq)]
enum Tok {
    Id(String),
    Arrow,
    Open,
    Close,
    LBracket,
    RBracket,
    Eq,
    Comma,
    Semi,
}

fn tokens(text: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '{' => out.push(Tok::Open),
            '}' => out.push(Tok::Close),
            '[' => out.push(Tok::LBracket),
            ']' => out.push(Tok::RBracket),
            '=' => out.push(Tok::Eq),
            ',' => out.push(Tok::Comma),
            ';' => out.push(Tok::Semi),
            '-' if chars.peek() == Some(&'>') => {
                chars.next();
                out.push(Tok::Arrow);
            }
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated string".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\')) => s.push(e),
                            Some('n') => s.push('\n'),
                            other => return Err(format!("bad escape {other:?}")),
                        },
                        Some('\n') => return Err("raw newline in a string".into()),
                        Some(c) => s.push(c),
                    }
                }
                out.push(Tok::Id(s));
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let mut s = String::from(c);
                while let Some(&n) = chars.peek() {
                    if !(n.is_ascii_alphanumeric() || n == '_' || n == '.') {
                        break;
                    }
                    s.push(n);
                    chars.next();
                }
                out.push(Tok::Id(s));
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok(out)
}

/// Parses the subset of the DOT language the lineage export writes
/// (`digraph ID { stmt* }`, statements `ID = ID;`, `ID [attrs];` and
/// `ID -> ID [attrs];`), failing on anything else, on an edge to an
/// undeclared node and on a node declared twice.
fn parse_dot(text: &str) -> Result<DotGraph, String> {
    let toks = tokens(text)?;
    let mut it = toks.into_iter().peekable();
    let id = |t: Option<Tok>| match t {
        Some(Tok::Id(s)) => Ok(s),
        other => Err(format!("expected an id, got {other:?}")),
    };
    if id(it.next())? != "digraph" {
        return Err("not a digraph".into());
    }
    id(it.next())?;
    if it.next() != Some(Tok::Open) {
        return Err("expected {".into());
    }
    let mut graph = DotGraph {
        nodes: Vec::new(),
        edges: Vec::new(),
    };
    loop {
        let first = match it.next() {
            Some(Tok::Close) => break,
            t => id(t)?,
        };
        let mut attrs = Vec::new();
        let mut to = None;
        let mut assignment = false;
        match it.next() {
            Some(Tok::Eq) => {
                id(it.next())?;
                assignment = true;
            }
            Some(Tok::Arrow) => {
                to = Some(id(it.next())?);
                if it.peek() == Some(&Tok::LBracket) {
                    it.next();
                    attrs = attr_list(&mut it)?;
                }
            }
            Some(Tok::LBracket) => attrs = attr_list(&mut it)?,
            other => return Err(format!("unexpected {other:?} after {first:?}")),
        }
        if it.next() != Some(Tok::Semi) {
            return Err(format!("statement starting {first:?} does not end with ;"));
        }
        if assignment {
            continue;
        }
        match to {
            Some(to) => {
                for end in [&first, &to] {
                    if !graph.nodes.contains(end) {
                        return Err(format!("edge to undeclared node {end:?}"));
                    }
                }
                let count = attrs
                    .iter()
                    .find(|(k, _)| k == "label")
                    .and_then(|(_, v)| v.parse().ok())
                    .ok_or("edge without a count label")?;
                graph.edges.push((first, to, count));
            }
            None => {
                if graph.nodes.contains(&first) {
                    return Err(format!("node {first:?} declared twice"));
                }
                graph.nodes.push(first);
            }
        }
    }
    if it.next().is_some() {
        return Err("text after the closing brace".into());
    }
    Ok(graph)
}

fn attr_list(
    it: &mut std::iter::Peekable<std::vec::IntoIter<Tok>>,
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    loop {
        match it.next() {
            Some(Tok::RBracket) => return Ok(out),
            Some(Tok::Comma) => {}
            Some(Tok::Id(k)) => {
                if it.next() != Some(Tok::Eq) {
                    return Err(format!("attribute {k:?} without ="));
                }
                match it.next() {
                    Some(Tok::Id(v)) => out.push((k, v)),
                    other => return Err(format!("attribute {k:?} without a value: {other:?}")),
                }
            }
            other => return Err(format!("unexpected {other:?} in attributes")),
        }
    }
}
