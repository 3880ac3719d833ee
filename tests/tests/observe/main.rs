//! Observability over real loopback sockets: `/metrics` scraped and parsed
//! as the Prometheus text format, the dashboard in a real headless
//! Chromium, and both on a cluster.

mod t10_metrics;
mod t20_dashboard;
mod t30_cluster;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prometheus_parse::{LineInfo, Scrape, Value};
use tollgate_node::settings::NodeSettings;
use tollgate_tests::{TestNode, demo_check};

/// How long a test polls for a sampled figure before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Samples fast enough that tests see utilisation within a moment.
pub fn fast_sampling(s: &mut NodeSettings) {
    s.metrics.sample_interval_ms = 100;
}

/// Decisions a test made, by (kind, outcome, first reason or `none`), as
/// the node answered them.
pub type Tally = BTreeMap<(String, String, String), u64>;

/// A Check body for `key` with `version`.
pub fn check_body(key: &str, version: &str) -> String {
    demo_check(key).replace("\"2.1.0\"", &format!("\"{version}\""))
}

/// Sends `body` to `path` (`/v1/check` or `/v1/report`) and tallies the
/// answer under its kind, decision and first reason code.
pub async fn decide(n: &TestNode, tally: &mut Tally, path: &str, body: &str) -> anyhow::Result<()> {
    let (status, v) = n.post(path, body).await?;
    anyhow::ensure!(status == 200, "{path}: HTTP {status}: {v}");
    let kind = if path.ends_with("report") {
        "report"
    } else {
        "check"
    };
    let outcome = v["decision"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no decision in {v}"))?;
    let reason = v["reasons"][0]["code"].as_str().unwrap_or("none");
    *tally
        .entry((kind.into(), outcome.into(), reason.into()))
        .or_default() += 1;
    Ok(())
}

/// The known workload: 7 Checks allowed (2 on `demo`, 5 on `demo-tiny`,
/// which uses its quota up), 4 denied (1 `quota_exceeded`, 2
/// `unknown_key`, 1 `model_version_not_allowed`), 1 Report allowed and 1
/// malformed request.
pub async fn known_workload(n: &TestNode) -> anyhow::Result<Tally> {
    let mut tally = Tally::new();
    for _ in 0..2 {
        decide(n, &mut tally, "/v1/check", &demo_check("tg_demo_key")).await?;
    }
    for _ in 0..6 {
        decide(n, &mut tally, "/v1/check", &demo_check("tg_demo_tiny")).await?;
    }
    for _ in 0..2 {
        decide(n, &mut tally, "/v1/check", &demo_check("tg_nope")).await?;
    }
    decide(
        n,
        &mut tally,
        "/v1/check",
        &check_body("tg_demo_key", "1.4.0"),
    )
    .await?;
    decide(n, &mut tally, "/v1/report", &demo_check("tg_demo_key")).await?;
    let (status, _) = n.post("/v1/check", "{not json").await?;
    anyhow::ensure!(status == 400, "a malformed body gets 400, got {status}");
    Ok(tally)
}

/// A scrape: the raw text and what the parser made of it.
pub struct Scraped {
    pub text: String,
    pub scrape: Scrape,
}

impl Scraped {
    /// Parses `text` with the Prometheus text-format parser, and checks
    /// that the parser understood every line: each one is a `# HELP`, a
    /// `# TYPE` or a sample of a family that declared its type.
    pub fn parse(text: String) -> anyhow::Result<Self> {
        let mut typed: Vec<String> = Vec::new();
        for line in text.lines() {
            match LineInfo::parse(line) {
                LineInfo::Doc { .. } => {}
                LineInfo::Type {
                    metric_name,
                    metric_alias,
                    ..
                } => {
                    typed.push(metric_alias.unwrap_or(metric_name));
                }
                LineInfo::Sample {
                    metric_name, value, ..
                } => {
                    anyhow::ensure!(
                        value.to_lowercase().parse::<f64>().is_ok(),
                        "sample value that is not a number: {line}"
                    );
                    let family = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| metric_name.strip_suffix(s))
                        .filter(|f| typed.iter().any(|t| t == f))
                        .unwrap_or(metric_name);
                    anyhow::ensure!(
                        typed.iter().any(|t| t == family),
                        "sample of an undeclared family: {line}"
                    );
                }
                LineInfo::Empty | LineInfo::Ignored => {
                    anyhow::bail!("line the parser does not understand: {line:?}")
                }
            }
        }
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
        Ok(Self { text, scrape })
    }

    /// The value of the sample `metric` whose labels include `labels`;
    /// None if there is none. Counters, gauges and untyped samples only.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .find_map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    /// Every sample of `metric` with its labels, as (labels, value).
    pub fn series(&self, metric: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter_map(|s| {
                let v = match s.value {
                    Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                    _ => return None,
                };
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Some((labels, v))
            })
            .collect()
    }
}

/// Scrapes `/metrics` (with `token` as bearer if given), checks the
/// content type and parses it.
pub async fn scrape(n: &TestNode, token: Option<&str>) -> anyhow::Result<Scraped> {
    let mut req = n.client.get(format!("{}/metrics", n.http));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await?;
    anyhow::ensure!(r.status() == 200, "/metrics: HTTP {}", r.status());
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type}"
    );
    Scraped::parse(r.text().await?)
}

/// Scrapes until `ok` holds for a scrape, or fails after [`WAIT`] with the
/// last scrape.
pub async fn scrape_until(
    n: &TestNode,
    token: Option<&str>,
    what: &str,
    ok: impl Fn(&Scraped) -> bool,
) -> anyhow::Result<Scraped> {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(n, token).await?;
        if ok(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}; last scrape:\n{}", s.text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
