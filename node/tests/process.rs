//! The `tollgate` binary as a real process: `up` (a 3-node local cluster in
//! one process), SIGKILL, `up` again; JSON logs that never carry a token.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

const DEMO_TINY: &str = r#"{"key":"tg_demo_tiny","model":"demo-classifier","model_version":"2.1.0","environment":"production","region":"local-a","meters":[{"metric":"inferences","quantity":1}]}"#;

/// Kills the node if the test fails before stopping it.
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_up(dir: &Path) -> anyhow::Result<NodeProcess> {
    spawn_up_with(dir, &[])
}

fn spawn_up_with(dir: &Path, args: &[&str]) -> anyhow::Result<NodeProcess> {
    // A restart reads cluster.json for the cluster's addresses; readiness
    // is a /healthz answer, which a killed process cannot give.
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["up", "--data-dir"])
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(NodeProcess)
        .context("spawning tollgate up")
}

/// Sends SIGINT and waits for a clean exit.
async fn interrupt(child: &mut NodeProcess) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -INT failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "node did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    anyhow::ensure!(exit.success(), "exit status {exit}");
    Ok(())
}

/// Polls until a new `<dir>/cluster.json` names a node
/// whose /healthz answers.
async fn wait_ready(dir: &Path, client: &reqwest::Client) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "node did not become ready");
        let path = dir.join("cluster.json");
        if path.exists() {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            let http = format!(
                "http://{}",
                v["nodes"][0]["http_addr"].as_str().unwrap_or_default()
            );
            if let Ok(r) = client.get(format!("{http}/healthz")).send().await
                && r.status().is_success()
            {
                return Ok(http);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn check(client: &reqwest::Client, http: &str) -> anyhow::Result<serde_json::Value> {
    Ok(client
        .post(format!("{http}/v1/check"))
        .body(DEMO_TINY)
        .send()
        .await?
        .json()
        .await?)
}

/// A node's `/v1/status`.
async fn status(client: &reqwest::Client, http: &str) -> anyhow::Result<serde_json::Value> {
    Ok(client
        .get(format!("{http}/v1/status"))
        .send()
        .await?
        .json()
        .await?)
}

/// `tollgate bench` comparing the first nodes of clusters `a` and `b`.
fn bench_compare(a: &Path, b: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["bench", "--cluster-dir"])
        .arg(a)
        .arg("--compare-cluster-dir")
        .arg(b)
        .args(args)
        .output()
        .context("running tollgate bench")
}

/// `bench --compare-cluster-dir`: the load alternates between two nodes,
/// each gets its share of the schedule, and the report compares them.
#[tokio::test]
async fn bench_compares_two_nodes_in_alternating_slices() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let _node_a = spawn_up_with(&a, &["--nodes", "1"])?;
    let _node_b = spawn_up_with(&b, &["--nodes", "1", "--no-audit"])?;
    let client = reqwest::Client::new();
    let http_a = wait_ready(&a, &client).await?;
    let http_b = wait_ready(&b, &client).await?;
    let out = bench_compare(
        &a,
        &b,
        &[
            "--rps",
            "400",
            "--duration",
            "2",
            "--slice",
            "0.5",
            "--warmup",
            "0.25",
            "--concurrency",
            "1",
        ],
    )?;
    anyhow::ensure!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // Four slices of 0.5 s: two per node, 200 requests each.
    assert_eq!(r["slices"], 2, "{r}");
    for side in ["target", "compare"] {
        let s = &r[side];
        assert_eq!(s["requests"], 400, "{side}: {s}");
        assert_eq!(s["errors"], 0, "{side}: {s}");
        assert_eq!(s["allowed"], 400, "{side}: {s}");
        assert!(s["p99_us"].as_u64().unwrap_or(0) > 0, "{side}: {s}");
    }
    for key in ["p50_ratio", "p99_ratio", "p99_paired_ratio_median"] {
        let x = r[key].as_f64().unwrap_or(0.0);
        assert!(x.is_finite() && x > 0.0, "{key}: {r}");
    }
    // Each node answered its own share (and the warm-up's); only the one
    // with the trail recorded them.
    let (sa, sb) = (
        status(&client, &http_a).await?,
        status(&client, &http_b).await?,
    );
    for s in [&sa, &sb] {
        let allowed = s["decisions"]["allow"].as_u64().unwrap_or(0);
        assert!((400..=600).contains(&allowed), "{}", s["decisions"]);
    }
    assert!(
        sa["audit"]["queued"].as_u64().unwrap_or(0) >= 400,
        "{}",
        sa["audit"]
    );
    assert_eq!(sb["audit"]["enabled"], false, "{}", sb["audit"]);
    // Bad input is refused with a reason, not a panic.
    let bad = bench_compare(&a, &b, &["--rps", "100", "--duration", "1", "--slice=-1"])?;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--slice"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn usage_survives_sigkill_and_restart_and_sigint_stops_cleanly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let client = reqwest::Client::new();
    let mut child = spawn_up(dir.path())?;
    let http = wait_ready(dir.path(), &client).await?;
    for i in 1..=5 {
        let d = check(&client, &http).await?;
        assert_eq!(d["decision"], "allow", "check {i}: {d}");
    }
    let d = check(&client, &http).await?;
    assert_eq!(d["decision"], "deny", "check 6: {d}");
    assert_eq!(d["reasons"][0]["code"], "quota_exceeded");

    // The documented loss window is one flush interval: wait until the node
    // says the accepted usage is on disk, then kill it without warning.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&client, &http).await?;
        if s["usage"]["unflushed"] == false {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "usage never flushed: {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.0.kill()?; // SIGKILL
    child.0.wait()?;

    let mut child = spawn_up(dir.path())?;
    let http = wait_ready(dir.path(), &client).await?;
    let d = check(&client, &http).await?;
    assert_eq!(d["decision"], "deny", "check 7 after SIGKILL: {d}");
    assert_eq!(d["reasons"][0]["code"], "quota_exceeded");
    assert_eq!(d["quotas"][0]["used"], 5);

    // Ctrl-C (SIGINT) stops the node cleanly.
    interrupt(&mut child).await
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_never_carry_a_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["up", "--log-format", "json", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info,tollgate_node=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(NodeProcess)
        .context("spawning tollgate up")?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let http = wait_ready(dir.path(), &client).await?;
    let viewer = std::fs::read_to_string(dir.path().join("viewer.token"))?
        .trim()
        .to_string();
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))?
        .trim()
        .to_string();

    // Requests that carry tokens every way the node accepts them.
    let r = client
        .get(format!("{http}/dashboard?token={viewer}"))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 303);
    let r = client
        .get(format!("{http}/v1/licenses"))
        .bearer_auth(&admin)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(format!("{http}/metrics"))
        .bearer_auth(&viewer)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let d = check(&client, &http).await?;
    assert_eq!(d["decision"], "allow", "{d}");
    interrupt(&mut child).await?;

    let text = std::fs::read_to_string(&log_path)?;
    let mut messages = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("a log line that is not JSON: {line}"))?;
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        messages.push(v["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(messages.iter().any(|m| m == "node serving"), "{text}");
    for secret in [&viewer, &admin] {
        assert!(
            !text.contains(secret.as_str()),
            "a token in the logs:\n{text}"
        );
    }
    Ok(())
}

#[cfg(not(feature = "otlp"))]
#[test]
fn otlp_export_is_refused_by_a_build_without_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "up",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--features tollgate-node/otlp"), "{stderr}");
    Ok(())
}
