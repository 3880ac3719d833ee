//! Usage gossip between real `tollgate serve` processes on loopback (QUIC
//! with mTLS, certificates from `tollgate certs init`): soft quota
//! overshoot, strict quotas across a partition, convergence after a heal,
//! wire cost per increment, seats held cluster-wide, and usage of a
//! SIGKILLed node.
//!
//! Tests run one at a time (each starts its own cluster). The long
//! convergence run is ignored by default:
//!
//! `cargo test -p tollgate-node --test gossip_cluster -- --ignored convergence_50_heals --nocapture`

mod common;

#[allow(dead_code)]
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use common::{ClusterOptions, ProcCluster};
use serde_json::{Value, json};
use tollgate_node::gossip_bench;

/// Each test starts five processes; two clusters at once on a small
/// machine would measure the machine, not the nodes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The gossip tick the clusters run with.
const INTERVAL_MS: f64 = 50.0;

/// A license for the acceptance runs: demo-classifier 2.x and one monthly
/// quota on inferences.
fn quota_license(id: &str, key: &str, limit: u64, mode: &str) -> String {
    json!({
        "apiVersion": "tollgate/v1",
        "kind": "License",
        "id": id,
        "customer": "Acceptance",
        "keys": [{"key": key}],
        "models": [{"model": "demo-classifier", "versions": {"major": 2}}],
        "quotas": [{"id": "monthly", "metric": "inferences", "limit": limit, "window": "month", "mode": mode}],
    })
    .to_string()
}

fn check_body(key: &str) -> String {
    json!({
        "key": key,
        "model": "demo-classifier",
        "model_version": "2.1.0",
        "meters": [{"metric": "inferences", "quantity": 1}],
    })
    .to_string()
}

/// The outcome of a decision body ("allow", "deny", "throttle").
fn outcome(d: &Value) -> Option<&str> {
    d["decision"].as_str()
}

fn codes(d: &Value) -> Vec<String> {
    d["reasons"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["code"].as_str().map(str::to_string))
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Starts `n` nodes with gossip and fault injection, waits for the seed,
/// and proves gossip works end to end: one Check on every node, then every
/// node shows the same usage of the demo license.
async fn gossip_cluster(dir: &Path, n: usize, durable: bool) -> anyhow::Result<ProcCluster> {
    let mut opts = ClusterOptions::gossip();
    opts.durable_usage_ack = durable;
    gossip_cluster_with(dir, n, opts).await
}

async fn gossip_cluster_with(
    dir: &Path,
    n: usize,
    opts: ClusterOptions,
) -> anyhow::Result<ProcCluster> {
    let cluster = ProcCluster::start_with(dir, n, &opts)?;
    cluster.wait_seeded().await?;
    for i in 0..n {
        let d: Value = cluster
            .client
            .post(cluster.url(i, "/v1/check"))
            .body(check_body("tg_demo_key"))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(
            outcome(&d) == Some("allow"),
            "warm-up check on node {i}: {d}"
        );
    }
    cluster
        .wait_usage_converged("demo", Duration::from_secs(20))
        .await
        .context("gossip never carried the warm-up checks to every node")?;
    Ok(cluster)
}

/// What the load clients saw.
#[derive(Default)]
struct NodeTally {
    allowed: AtomicU64,
    denied: AtomicU64,
    /// The node could not be reached: nothing was sent.
    refused: AtomicU64,
    /// No decision came back (connection lost mid-request, bad reply): the
    /// Check may or may not have been counted.
    unknown: AtomicU64,
    /// Denials since this node last allowed a Check.
    denied_in_a_row: AtomicU64,
}

/// Closed-loop Check load: `clients_per_node` clients per node, each
/// sending its next Check when the last one was answered.
struct Load {
    nodes: Vec<NodeTally>,
    /// Denial reason codes by (node index, phase, code).
    codes: parking_lot::Mutex<BTreeMap<(usize, u8, String), u64>>,
    /// A label the test sets; denials are recorded under it.
    phase: AtomicU8,
    stop: AtomicBool,
}

impl Load {
    fn allowed(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.allowed.load(Ordering::Relaxed))
            .sum()
    }

    fn unknown(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.unknown.load(Ordering::Relaxed))
            .sum()
    }

    fn allowed_by_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.allowed.load(Ordering::Relaxed))
            .collect()
    }

    fn starving(&self, i: usize, at_least: u64) -> bool {
        self.nodes[i].denied_in_a_row.load(Ordering::Relaxed) >= at_least
    }

    /// Every code seen, with its count.
    fn code_totals(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((_, _, code), n) in self.codes.lock().iter() {
            *out.entry(code.clone()).or_insert(0) += n;
        }
        out
    }

    /// Starts the clients. With `stop_on_deny`, a client ends at its first
    /// denial.
    fn start(
        cluster: &ProcCluster,
        key: &str,
        clients_per_node: usize,
        stop_on_deny: bool,
    ) -> anyhow::Result<(Arc<Self>, tokio::task::JoinSet<()>)> {
        let n = cluster.nodes.len();
        let load = Arc::new(Self {
            nodes: (0..n).map(|_| NodeTally::default()).collect(),
            codes: parking_lot::Mutex::new(BTreeMap::new()),
            phase: AtomicU8::new(BEFORE),
            stop: AtomicBool::new(false),
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(clients_per_node)
            .build()?;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            for _ in 0..clients_per_node {
                set.spawn(client(
                    http.clone(),
                    cluster.url(i, "/v1/check"),
                    check_body(key),
                    i,
                    Arc::clone(&load),
                    stop_on_deny,
                ));
            }
        }
        Ok((load, set))
    }
}

async fn client(
    http: reqwest::Client,
    url: String,
    body: String,
    node: usize,
    load: Arc<Load>,
    stop_on_deny: bool,
) {
    let tally = &load.nodes[node];
    while !load.stop.load(Ordering::Relaxed) {
        let phase = load.phase.load(Ordering::Relaxed);
        let sent = http.post(&url).body(body.clone()).send().await;
        let reply = match sent {
            Ok(r) => r.json::<Value>().await.ok(),
            Err(e) if e.is_connect() => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_) => None,
        };
        let Some(d) = reply else {
            tally.unknown.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        match outcome(&d) {
            Some("allow") => {
                tally.allowed.fetch_add(1, Ordering::Relaxed);
                tally.denied_in_a_row.store(0, Ordering::Relaxed);
            }
            Some(_) => {
                tally.denied.fetch_add(1, Ordering::Relaxed);
                tally.denied_in_a_row.fetch_add(1, Ordering::Relaxed);
                {
                    let mut seen = load.codes.lock();
                    for code in codes(&d) {
                        *seen.entry((node, phase, code)).or_insert(0) += 1;
                    }
                }
                // Near a soft limit, or short of strict rights, a node asks
                // the caller to come back shortly (quota_rights_unavailable,
                // with a retry hint); only quota_exceeded is final.
                let exhausted = codes(&d).iter().any(|c| c == "quota_exceeded");
                if stop_on_deny && exhausted {
                    return;
                }
                let wait = if exhausted {
                    2
                } else {
                    d["retry_after_ms"].as_u64().unwrap_or(2).clamp(1, 200)
                };
                // A denial is cheap; do not spin on it.
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            None => {
                // An error body (no decision): nothing was counted.
                let code = d["error"]["code"].as_str().unwrap_or("no_decision");
                *load
                    .codes
                    .lock()
                    .entry((node, phase, format!("error:{code}")))
                    .or_insert(0) += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Polls `cond` every 5 ms until it holds; fails after `within`.
async fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !cond() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Stops the load and waits for every client to finish.
async fn stop(load: &Load, mut clients: tokio::task::JoinSet<()>) -> anyhow::Result<()> {
    load.stop.store(true, Ordering::Relaxed);
    while let Some(r) = clients.join_next().await {
        r.context("a load client panicked")?;
    }
    Ok(())
}

/// The value of the license's `monthly` counter in agreed usage.
fn monthly_value(counters: &[common::CounterView]) -> u64 {
    counters
        .iter()
        .filter(|c| c.quota == "monthly")
        .map(|c| c.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_quota_overshoot_is_within_one_percent() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let cluster = gossip_cluster(dir.path(), 5, false).await?;
    cluster
        .apply_license(
            0,
            "accept-soft",
            &quota_license("accept-soft", "tg_accept_soft", 10_000, "soft"),
        )
        .await?;

    let started = Instant::now();
    let (load, mut clients) = Load::start(&cluster, "tg_accept_soft", 4, true)?;
    // Every client ends at its first quota_exceeded.
    let finished = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(r) = clients.join_next().await {
            r.context("a load client panicked")?;
        }
        anyhow::Ok(())
    })
    .await;
    stop(&load, clients).await?;
    let finished = match finished {
        Ok(r) => r.map(|()| true)?,
        Err(_) => false,
    };
    let total = load.allowed();
    eprintln!(
        "soft quota: limit 10000, allowed {total} (overshoot {}), per node {:?}, in {:.1}s; codes {:?}",
        total.saturating_sub(10_000),
        load.allowed_by_node(),
        started.elapsed().as_secs_f64(),
        load.code_totals(),
    );
    assert!(finished, "some clients never saw a denial within 90s");
    assert_eq!(load.unknown(), 0, "checks without a decision");
    assert!(
        total >= 10_000,
        "a soft quota denied before its limit: {total}"
    );
    assert!(total <= 10_100, "overshoot above 1%: {total} allowed");
    let seen = load.code_totals();
    assert!(
        seen.keys()
            .all(|c| c == "quota_exceeded" || c == "quota_rights_unavailable"),
        "unexpected denial codes: {seen:?}"
    );
    // Every allowed Check is in the agreed usage, once.
    let agreed = cluster
        .wait_usage_converged("accept-soft", Duration::from_secs(10))
        .await?;
    assert_eq!(monthly_value(&agreed), total, "{agreed:?}");
    Ok(())
}

/// Phases of the strict run, recorded with each denial.
const BEFORE: u8 = 0;
const PARTITIONED: u8 = 1;
const HEALED: u8 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_quota_never_exceeds_the_limit_across_a_partition() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let cluster = gossip_cluster(dir.path(), 5, false).await?;
    cluster
        .apply_license(
            0,
            "accept-strict",
            &quota_license("accept-strict", "tg_accept_strict", 10_000, "strict"),
        )
        .await?;
    let victim = 4;
    let majority = 0..4;

    let (load, clients) = Load::start(&cluster, "tg_accept_strict", 3, false)?;
    let result = async {
        until(
            Duration::from_secs(60),
            "2000 allowed before the partition",
            || load.allowed() >= 2_000,
        )
        .await?;
        cluster.partition(victim).await?;
        load.phase.store(PARTITIONED, Ordering::Relaxed);
        let partitioned_at = Instant::now();
        let at_partition = load.allowed();
        // Both sides serve alone for a while; heal once one side has run
        // dry (its clients see nothing but denials) or after 5 s.
        let dry = |load: &Load| {
            load.starving(victim, 50) || majority.clone().all(|i| load.starving(i, 50))
        };
        while partitioned_at.elapsed() < Duration::from_secs(1)
            || (!dry(&load) && partitioned_at.elapsed() < Duration::from_secs(5))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let at_heal = load.allowed_by_node();
        let victim_dry = load.starving(victim, 50);
        load.phase.store(HEALED, Ordering::Relaxed);
        cluster.heal().await?;
        let healed_at = Instant::now();
        until(
            Duration::from_secs(30),
            "all 10000 units after the heal",
            || load.allowed() >= 10_000,
        )
        .await?;
        let reached = healed_at.elapsed();
        // Keep asking a little longer: nothing more may be allowed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        anyhow::Ok((at_partition, at_heal, victim_dry, reached))
    }
    .await;
    stop(&load, clients).await?;
    let total = load.allowed();
    let seen = load.codes.lock().clone();
    eprintln!(
        "strict quota: limit 10000, allowed {total}, per node {:?}; codes by (node, phase): {seen:?}",
        load.allowed_by_node()
    );
    let (at_partition, at_heal, victim_dry, reached) = result?;
    eprintln!(
        "strict quota: partitioned node {} at {at_partition} allowed; at the heal {at_heal:?} (sum {}, partitioned node ran dry: {victim_dry}); 10000 reached {:.0} ms after the heal",
        victim + 1,
        at_heal.iter().sum::<u64>(),
        reached.as_secs_f64() * 1e3
    );
    assert_eq!(total, 10_000, "strict quota: exactly the limit is allowed");
    assert_eq!(load.unknown(), 0, "checks without a decision");
    for ((node, phase, code), n) in &seen {
        assert!(
            code == "quota_rights_unavailable" || code == "quota_exceeded",
            "node {node} phase {phase}: {n} x {code}"
        );
        // Cut off, the node cannot know the quota is used up: it may only
        // say it lacks rights.
        if *node == victim && *phase == PARTITIONED {
            assert_eq!(
                code, "quota_rights_unavailable",
                "the partitioned node claimed the quota exhausted"
            );
        }
    }
    let agreed = cluster
        .wait_usage_converged("accept-strict", Duration::from_secs(10))
        .await?;
    assert_eq!(monthly_value(&agreed), 10_000, "{agreed:?}");
    Ok(())
}

fn bench_cluster(cluster: &ProcCluster) -> gossip_bench::BenchCluster {
    gossip_bench::BenchCluster {
        nodes: cluster
            .nodes
            .iter()
            .map(|a| gossip_bench::BenchNode {
                id: a.id,
                grpc_addr: a.grpc.clone(),
                http_addr: a.http.clone(),
            })
            .collect(),
        token: cluster.token.clone(),
    }
}

async fn convergence_run(heals: usize) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let cluster = gossip_cluster(dir.path(), 5, false).await?;
    let report =
        gossip_bench::convergence(&bench_cluster(&cluster), "tg_demo_key", heals, 5).await?;
    let summary = gossip_bench::convergence_summary(&report.heal_to_converged_ms);
    eprintln!("convergence after a heal ({INTERVAL_MS} ms gossip interval): {summary}");
    let p50 = summary["p50_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(
        p50 <= 3.0 * INTERVAL_MS,
        "median heal-to-agreement {p50} ms is over three gossip intervals"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_converges_within_three_gossip_intervals_over_50_heals() -> anyhow::Result<()> {
    convergence_run(50).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_costs_at_most_16_bytes_per_increment() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    // Audit off: its writer's CPU on a 2-core machine makes the load
    // generator shed, and fewer increments share the same keep-alives and
    // acks. The bytes measured are gossip's either way.
    let mut cluster_opts = ClusterOptions::gossip();
    cluster_opts.no_audit = true;
    let cluster = gossip_cluster_with(dir.path(), 5, cluster_opts).await?;
    let path = cluster.write_cluster_json()?;
    let opts = gossip_bench::GossipBenchOptions {
        duration_secs: 4,
        warmup_secs: 1,
        rate_per_node: 400,
        ..Default::default()
    };
    // The figure is defined at a steady 400 Checks/s per node. When the
    // machine cannot hold that rate (the load generator shares its cores
    // with five nodes), fewer increments share the same keep-alives and
    // acks and the run measured something else: it is run again, up to
    // three times, and a run that held the load is the one judged.
    let offered = opts.rate_per_node * opts.duration_secs * 5;
    let mut runs = Vec::new();
    let steady = loop {
        let report = gossip_bench::run(&path, opts.clone()).await?;
        eprintln!("gossip cost: {report}");
        let increments = report["increments"].as_u64().unwrap_or(0);
        if increments * 100 >= offered * 95 {
            break report;
        }
        runs.push(report);
        assert!(
            runs.len() < 3,
            "the load never held 95% of {offered} offered Checks in three runs: {runs:?}"
        );
    };
    let per_increment = steady["bytes_per_increment"].as_f64().unwrap_or(f64::MAX);
    assert!(
        per_increment <= gossip_bench::TARGET_BYTES_PER_INCREMENT,
        "{per_increment} wire bytes per increment: {steady}"
    );
    Ok(())
}

/// POST /v1/seats/{op} on node `i`; the decision body.
async fn seat(cluster: &ProcCluster, i: usize, op: &str, body: Value) -> anyhow::Result<Value> {
    let r = cluster
        .client
        .post(cluster.url(i, &format!("/v1/seats/{op}")))
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "seat {op} on node {i}: {status} {body}"
    );
    Ok(body)
}

const SEAT_KEY: &str = "tg_accept_seats";

fn acquire_body(instance: &str, ttl_ms: Option<u64>) -> Value {
    let mut b = json!({"key": SEAT_KEY, "instance": instance});
    if let Some(ttl) = ttl_ms {
        b["ttl_ms"] = json!(ttl);
    }
    b
}

/// How soon a free seat held by another node must be grantable: "within a
/// few gossip intervals", read generously for a loaded machine (40 ticks).
const SEAT_MOVE_WITHIN: Duration = Duration::from_secs(2);

/// Acquires on node `i`, retrying while rights are elsewhere (or this
/// node has not yet heard that a seat was freed); the grant. Waits up to
/// 15 s so that a slow move is measured rather than cut short.
async fn acquire_granted(
    cluster: &ProcCluster,
    i: usize,
    instance: &str,
    ttl_ms: Option<u64>,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let d = seat(cluster, i, "acquire", acquire_body(instance, ttl_ms)).await?;
        if d["granted"] == true {
            anyhow::ensure!(d["lease_id"].is_string(), "grant without a lease: {d}");
            return Ok(d);
        }
        let c = codes(&d);
        anyhow::ensure!(
            c.iter()
                .all(|c| c == "quota_rights_unavailable" || c == "seat_limit_reached"),
            "acquire {instance} on node {i}: {d}"
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "acquire {instance} on node {i} never granted: {d}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seats_hold_globally() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let cluster = gossip_cluster(dir.path(), 3, false).await?;
    let doc = json!({
        "apiVersion": "tollgate/v1",
        "kind": "License",
        "id": "accept-seats",
        "customer": "Acceptance",
        "keys": [{"key": SEAT_KEY}],
        "models": [{"model": "demo-classifier", "versions": {"major": 2}}],
        "max_instances": 3,
        "seat_lease_ttl": "30s",
    })
    .to_string();
    cluster.apply_license(0, "accept-seats", &doc).await?;

    // One seat on each node.
    let mut leases = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let d = acquire_granted(&cluster, i, name, None).await?;
        leases.push(d["lease_id"].as_str().unwrap_or_default().to_string());
    }

    // A fourth is refused everywhere, for the right reason once each node
    // has heard of all three.
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let d = seat(&cluster, i, "acquire", acquire_body("d", None)).await?;
            assert_ne!(d["granted"], true, "a fourth seat on node {i}: {d}");
            let c = codes(&d);
            if c.iter().any(|c| c == "seat_limit_reached") {
                assert_eq!(d["in_use"], 3, "{d}");
                assert_eq!(d["max_instances"], 3, "{d}");
                break;
            }
            assert!(
                c.iter().all(|c| c == "quota_rights_unavailable"),
                "node {i}: {d}"
            );
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {i} never said seat_limit_reached: {d}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Release node 1's seat; node 2 can take it.
    let r = seat(
        &cluster,
        0,
        "release",
        json!({"key": SEAT_KEY, "lease_id": leases[0]}),
    )
    .await?;
    assert_ne!(r["granted"], true, "released: {r}");
    let released_at = Instant::now();
    acquire_granted(&cluster, 1, "d", None).await?;
    let after_release = released_at.elapsed();
    eprintln!(
        "seats: a seat released on node 1 was granted on node 2 after {:.0} ms",
        after_release.as_secs_f64() * 1e3
    );

    // Free node 3's seat and take it back with a 1 s lease that is never
    // renewed.
    let r = seat(
        &cluster,
        2,
        "release",
        json!({"key": SEAT_KEY, "lease_id": leases[2]}),
    )
    .await?;
    assert_ne!(r["granted"], true, "released: {r}");
    let short = acquire_granted(&cluster, 2, "e", Some(1000)).await?;
    let granted_ms = now_ms();
    let expires = short["expires_at_ms"]
        .as_i64()
        .context("grant without expires_at_ms")?;
    assert!(
        expires - granted_ms <= 1_500,
        "a 1000 ms lease lasts until {expires}, granted at {granted_ms}"
    );

    // All three seats are taken until it lapses; then node 1 gets one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refused_before_expiry = 0;
    let after_expiry = loop {
        let d = seat(&cluster, 0, "acquire", acquire_body("f", None)).await?;
        let at = now_ms();
        if d["granted"] == true {
            assert!(
                at >= expires,
                "a seat granted at {at} while the lease until {expires} still held: {d}"
            );
            eprintln!(
                "seats: granted {} ms after the unrenewed lease expired",
                at - expires
            );
            break Duration::from_millis(u64::try_from(at - expires).unwrap_or(0));
        }
        if at < expires {
            refused_before_expiry += 1;
        }
        let c = codes(&d);
        assert!(
            c.iter()
                .all(|c| c == "quota_rights_unavailable" || c == "seat_limit_reached"),
            "{d}"
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "no seat after the lease expired: {d}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused_before_expiry > 0,
        "never asked while the short lease held"
    );
    // The lapsed lease is gone.
    let lease = short["lease_id"].as_str().unwrap_or_default();
    let renewed = seat(
        &cluster,
        2,
        "renew",
        json!({"key": SEAT_KEY, "lease_id": lease}),
    )
    .await?;
    assert_ne!(
        renewed["granted"], true,
        "a lapsed lease renewed: {renewed}"
    );
    // Free seats move to the node that asks within a few gossip intervals.
    assert!(
        after_release <= SEAT_MOVE_WITHIN,
        "a released seat took {after_release:?} to be grantable on another node"
    );
    assert!(
        after_expiry <= SEAT_MOVE_WITHIN,
        "a lapsed seat took {after_expiry:?} to be grantable on another node"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restores_its_usage_slot() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let mut cluster = gossip_cluster(dir.path(), 5, true).await?;
    cluster
        .apply_license(
            0,
            "accept-durable",
            &quota_license("accept-durable", "tg_accept_durable", 1_000_000, "soft"),
        )
        .await?;
    let victim = 2;
    let victim_id = cluster.nodes[victim].id;
    let license = "accept-durable";
    for i in cluster.running() {
        let s = cluster.status(i).await.unwrap_or_default();
        assert_eq!(s["usage"]["durable_ack"], true, "node {i}: {s}");
    }

    let (load, clients) = Load::start(&cluster, "tg_accept_durable", 3, false)?;
    let result = async {
        until(Duration::from_secs(30), "some usage on the victim", || {
            load.nodes[victim].allowed.load(Ordering::Relaxed) >= 300
        })
        .await?;
        cluster.kill(victim)?;
        // Every Check the victim acknowledged was before the kill.
        let acked = load.nodes[victim].allowed.load(Ordering::Relaxed);
        // What the peers hold for the victim, right after and a bit later.
        let mut peers_view = 0;
        for _ in 0..2 {
            for i in cluster.running() {
                let u = cluster.usage(i, Some(license)).await?;
                for c in common::counters(&u) {
                    peers_view = peers_view.max(c.slots.get(&victim_id).copied().unwrap_or(0));
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        cluster.spawn(victim)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let own = loop {
            if let Ok(u) = cluster.usage(victim, Some(license)).await {
                break common::counters(&u)
                    .iter()
                    .map(|c| c.slots.get(&victim_id).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the restarted node never answered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Load on the restarted node again, then stop.
        let again = load.nodes[victim].allowed.load(Ordering::Relaxed);
        until(
            Duration::from_secs(30),
            "checks on the restarted node",
            || load.nodes[victim].allowed.load(Ordering::Relaxed) >= again + 100,
        )
        .await?;
        anyhow::Ok((acked, peers_view, own))
    }
    .await;
    stop(&load, clients).await?;
    let (acked, peers_view, own) = result?;
    let total = load.allowed();
    let unknown = load.unknown();
    let agreed = cluster
        .wait_usage_converged(license, Duration::from_secs(15))
        .await?;
    let value = monthly_value(&agreed);
    eprintln!(
        "kill: node {victim_id} acknowledged {acked} before SIGKILL; peers held {peers_view} for it; it restarted with {own}; clients allowed {total} ({unknown} without a decision); agreed usage {value}"
    );
    assert!(
        own >= peers_view,
        "restored slot {own} < peers' {peers_view}"
    );
    assert!(own >= acked, "restored slot {own} < {acked} acknowledged");
    // Checks in flight at the kill have no answer; they may or may not
    // have been counted. Every answered allow is counted exactly once.
    assert!(
        value >= total && value <= total + unknown,
        "agreed usage {value}, allowed {total}, unanswered {unknown}"
    );
    Ok(())
}
