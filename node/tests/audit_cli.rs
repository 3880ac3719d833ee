//! `tollgate audit verify` and `tollgate audit export` as an operator runs
//! them: against a real `tollgate serve` process over HTTP while it runs,
//! and against its data dir once it is stopped, including a data dir whose
//! audit log had one byte flipped.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Context;
use common::ProcCluster;
use tollgate_consensus::storage::{SledStorage, Storage};
use tollgate_node::audit::store::{AUDIT_TREE, frame_spans};

const N_CHECKS: usize = 200;

fn tollgate(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .context("running tollgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The record lines (not checkpoints) of an export.
fn records(export: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for line in export.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["type"] != "checkpoint" {
            out.push(v);
        }
    }
    Ok(out)
}

/// Flips one bit of the byte in the middle of the audit log of a stopped
/// node (the middle byte of its middle segment) and returns the seq of the
/// record that byte belongs to, as the frame it lies in names it before
/// the flip.
fn flip_middle_byte(db: &Path) -> anyhow::Result<u64> {
    let storage = SledStorage::open(db)?;
    let tree = storage.tree(AUDIT_TREE)?;
    let segments: Vec<_> = tree
        .scan_prefix(b"r")?
        .into_iter()
        .filter(|(k, _)| k.len() == 9)
        .collect();
    let (key, mut value) = segments
        .get(segments.len() / 2)
        .cloned()
        .context("no audit segments")?;
    let middle = value.len() / 2;
    let owner = frame_spans(&value)
        .into_iter()
        .find(|(_, span)| span.contains(&middle))
        .and_then(|(seq, _)| seq)
        .context("the middle byte is in no frame")?;
    value[middle] ^= 0x01;
    tree.insert(&key, &value)?;
    tree.flush()?;
    Ok(owner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_and_verify_on_a_real_node_and_a_flipped_byte_is_named() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut cluster = ProcCluster::start(dir.path(), 1)?;
    cluster.wait_seeded().await?;
    let client = reqwest::Client::new();
    for i in 0..N_CHECKS {
        let body = format!(
            r#"{{"key":"tg_demo_key","subject":"user-{i}@example.com","model":"demo-classifier","model_version":"2.1.0","environment":"production","region":"local-a","meters":[{{"metric":"inferences","quantity":1}}],"input_hash":"{}"}}"#,
            "0f".repeat(32)
        );
        let r = client
            .post(cluster.url(0, "/v1/check"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "check {i}: {}", r.status());
    }
    // Every decision durable before anything is read.
    let deadline = std::time::Instant::now() + common::WAIT;
    let last_seq = loop {
        let audit = cluster.status(0).await.map(|s| s["audit"].clone());
        if let Some(a) = audit
            && a["recorded"].as_u64() == Some(N_CHECKS as u64)
            && a["backlog"].as_u64() == Some(0)
        {
            break a["last_seq"].as_u64().unwrap_or(0);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "decisions never all recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    // Export over HTTP from the running node.
    let url = format!("http://{}", cluster.nodes[0].http);
    let online = tollgate(&[
        "audit",
        "export",
        "--url",
        &url,
        "--token",
        &cluster.token,
        "--since",
        "2020-01-01T00:00:00Z",
    ])?;
    anyhow::ensure!(online.status.success(), "export: {}", text(&online.stderr));
    let online = text(&online.stdout);
    let online_records = records(&online)?;
    assert_eq!(
        online_records
            .iter()
            .filter(|r| r["type"] == "decision")
            .count(),
        N_CHECKS
    );
    assert!(!online.contains("tg_demo_key") && !online.contains("@example.com"));
    // An unknown token is refused with the server's reason.
    let refused = tollgate(&["audit", "export", "--url", &url, "--token", "tga_wrong"])?;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("401"),
        "{}",
        text(&refused.stderr)
    );

    cluster.stop(0)?;
    let data_dir = dir.path().join("node-1");
    let data_dir = data_dir.to_str().context("utf-8 path")?;

    // Intact: a summary, exit 0.
    let ok = tollgate(&["audit", "verify", "--data-dir", data_dir])?;
    let out = text(&ok.stdout);
    assert!(ok.status.success(), "{out}{}", text(&ok.stderr));
    assert!(out.contains("intact"), "{out}");
    assert!(
        out.contains("registered for node 1 in the replicated config"),
        "{out}"
    );
    let json = tollgate(&["audit", "verify", "--data-dir", data_dir, "--json"])?;
    let report: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(report["intact"], true);
    // A clean stop signs the tail and may record what shutdown applied.
    let n_records = report["n_records"].as_u64().unwrap_or(0);
    assert!(n_records >= last_seq, "{report}");
    assert_eq!(
        report["n_unsigned"], 0,
        "a clean stop signs the tail: {report}"
    );
    assert!(out.contains(&format!("records: {n_records}")), "{out}");

    // Offline export of the stopped node: the same records as over HTTP.
    let offline = tollgate(&["audit", "export", "--data-dir", data_dir])?;
    anyhow::ensure!(offline.status.success(), "{}", text(&offline.stderr));
    let offline_records = records(&text(&offline.stdout))?;
    assert_eq!(
        &offline_records[..online_records.len()],
        &online_records[..]
    );

    // One byte flipped in the middle of the log: its record is named.
    let middle = flip_middle_byte(&Path::new(data_dir).join("db"))?;
    let bad = tollgate(&["audit", "verify", "--data-dir", data_dir])?;
    let out = text(&bad.stdout);
    assert!(!bad.status.success(), "{out}");
    assert!(
        out.contains(&format!("BROKEN at record {middle}:")),
        "{out}"
    );
    assert!(
        out.contains(&format!("records: {} intact before it", middle - 1)),
        "{out}"
    );
    assert!(text(&bad.stderr).contains(&format!("broken at record {middle}")));
    let json = tollgate(&["audit", "verify", "--data-dir", data_dir, "--json"])?;
    let report: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(report["broken"]["seq"], middle);
    assert_eq!(report["broken"]["part"], "record");

    // Flipped back: intact again.
    flip_middle_byte(&Path::new(data_dir).join("db"))?;
    assert!(
        tollgate(&["audit", "verify", "--data-dir", data_dir])?
            .status
            .success()
    );

    // Not a data dir: a clear error.
    let missing = tollgate(&[
        "audit",
        "verify",
        "--data-dir",
        dir.path().to_str().unwrap_or(""),
    ])?;
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("holds no node storage"),
        "{}",
        text(&missing.stderr)
    );
    Ok(())
}
