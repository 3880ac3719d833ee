use reqwest::Method;
use tollgate_tests::TestNode;

use crate::{lines, of_type};

const SUBJECT: &str = "alice@example.com";
const LICENSE: &str = r#"{"apiVersion":"tollgate/v1","kind":"License","id":"audited","customer":"Confidential Customer Ltd","keys":[{"key":"tg_audited_secret_key"}],"models":[{"model":"demo-classifier","versions":{"major":2}}]}"#;

fn check_body(key: &str, input_hash: &str) -> String {
    format!(
        r#"{{"key":"{key}","subject":"{SUBJECT}","model":"demo-classifier","model_version":"2.1.0","environment":"production","region":"local-a","meters":[{{"metric":"inferences","quantity":1}}],"request_id":"req-7","input_hash":"{input_hash}","output_hash":"{}"}}"#,
        "CD".repeat(32)
    )
}

#[tokio::test]
async fn decisions_and_config_changes_are_recorded_with_ids_and_hashes_only() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let n = TestNode::start_with(dir.path(), |s| s.audit.checkpoint_every_records = 4).await?;
    let input_hash = "ab".repeat(32);

    let (status, allowed) = n
        .post("/v1/check", &check_body("tg_demo_key", &input_hash))
        .await?;
    assert_eq!(status, 200, "{allowed}");
    let (status, denied) = n
        .post("/v1/check", &check_body("tg_no_such_key", &input_hash))
        .await?;
    assert_eq!(status, 200, "{denied}");
    assert_eq!(denied["decision"], "deny");
    let (status, reported) = n
        .post("/v1/report", &check_body("tg_demo_key", &input_hash))
        .await?;
    assert_eq!(status, 200, "{reported}");
    let (status, seat) = n
        .post(
            "/v1/seats/acquire",
            r#"{"key":"tg_demo_seats","instance":"gpu-7"}"#,
        )
        .await?;
    assert_eq!(status, 200, "{seat}");
    let put = n
        .admin_ok(Method::PUT, "/v1/licenses/audited", LICENSE)
        .await?;
    let version = put["version"].as_u64().unwrap_or(0);

    // Start, the membership, the seed batch, the node key, 4 decisions, the
    // put: at least 9. The put's record is the one to wait for: the
    // writer takes applied config changes from their own feed, so it may
    // come after records that were queued later.
    n.wait_audited(9).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (text, all) = loop {
        let (status, text) = n.get_text("/v1/audit", Some(&n.auditor_token)).await?;
        assert_eq!(status, 200, "{text}");
        let all = lines(&text)?;
        if all
            .iter()
            .any(|r| r["type"] == "config" && r["index"] == version)
            || std::time::Instant::now() >= deadline
        {
            break (text, all);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };

    // Payload-free: no key, no raw subject, no document content.
    for secret in [
        "tg_demo_key",
        "tg_no_such_key",
        "tg_audited_secret_key",
        SUBJECT,
        "Confidential Customer",
    ] {
        assert!(!text.contains(secret), "the export holds {secret:?}");
    }

    let decisions = of_type(&all, "decision");
    assert_eq!(decisions.len(), 3, "{text}");
    let allow = decisions
        .iter()
        .find(|d| d["decision_id"] == allowed["decision_id"])
        .ok_or_else(|| anyhow::anyhow!("no record of {}", allowed["decision_id"]))?;
    assert_eq!(allow["op"], "check");
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["license"], "demo");
    assert_eq!(allow["model"], "demo-classifier");
    assert_eq!(allow["model_version"], "2.1.0");
    assert_eq!(allow["policy_version"], allowed["policy_version"]);
    assert_eq!(allow["input_hash"], input_hash);
    assert_eq!(allow["output_hash"], "cd".repeat(32));
    assert_eq!(allow["request_id"], "req-7");
    let pseudonym = allow["subject"].as_str().unwrap_or_default();
    assert_eq!(pseudonym.len(), 64, "HMAC-SHA256, hex");
    let deny = decisions
        .iter()
        .find(|d| d["decision_id"] == denied["decision_id"])
        .ok_or_else(|| anyhow::anyhow!("no record of the denial"))?;
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["reasons"][0], "unknown_key");
    assert_eq!(deny["license"], serde_json::Value::Null);
    assert_eq!(deny["subject"], pseudonym, "one subject, one pseudonym");
    assert!(
        decisions
            .iter()
            .any(|d| d["op"] == "report" && d["decision_id"] == reported["decision_id"])
    );

    let seats = of_type(&all, "seat");
    assert_eq!(seats.len(), 1, "{text}");
    assert_eq!(seats[0]["op"], "seat_acquire");
    assert_eq!(seats[0]["granted"], true);
    assert_eq!(seats[0]["lease_id"], seat["lease_id"]);

    let configs = of_type(&all, "config");
    let put_record = configs
        .iter()
        .find(|c| c["index"] == version)
        .ok_or_else(|| anyhow::anyhow!("no record of config version {version}: {text}"))?;
    assert_eq!(put_record["op"], "put_license");
    assert_eq!(put_record["actor"], "admin");
    assert_eq!(
        put_record["targets"],
        serde_json::json!(["license:audited"])
    );
    assert_eq!(put_record["applied"], true);
    assert_eq!(
        put_record["command_sha256"].as_str().map(str::len),
        Some(64)
    );
    assert!(
        configs
            .iter()
            .any(|c| c["op"] == "batch" && c["actor"] == "bootstrap")
    );
    assert!(
        configs
            .iter()
            .any(|c| c["op"] == "register_node_key" && c["targets"][0] == "node:1")
    );
    assert!(!of_type(&all, "membership").is_empty());
    let start = of_type(&all, "start");
    assert_eq!(start.len(), 1);

    // One chain: seq 1.., each record linked to the one before.
    let records: Vec<_> = all.iter().filter(|l| l["type"] != "checkpoint").collect();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1, "{r}");
        if i > 0 {
            assert_eq!(r["prev"], records[i - 1]["hash"], "{r}");
        }
    }
    // Checkpoints every 4 records, each after the record it signs, with
    // the key the replicated config holds for this node.
    let checkpoints = of_type(&all, "checkpoint");
    assert!(!checkpoints.is_empty(), "{text}");
    let key = start[0]["public_key"].clone();
    for cp in &checkpoints {
        assert_eq!(cp["public_key"], key);
        let signed = records
            .iter()
            .find(|r| r["seq"] == cp["seq"])
            .ok_or_else(|| anyhow::anyhow!("checkpoint of a missing record"))?;
        assert_eq!(signed["hash"], cp["hash"]);
    }
    let status = n.status().await?;
    assert_eq!(status["audit"]["public_key"], key);

    // The node's own verification: intact, against the registered key.
    let (code, report) = n
        .get_text("/v1/audit/verify", Some(&n.auditor_token))
        .await?;
    assert_eq!(code, 200, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report)?;
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["n_records"], records.len() as u64);
    assert!(
        report["key_sources"][0]
            .as_str()
            .is_some_and(|s| s.contains("replicated config")),
        "{report}"
    );
    n.node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn export_pages_by_seq_and_filters_by_time() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    for _ in 0..5 {
        let (status, d) = n
            .post("/v1/check", &tollgate_tests::demo_check("tg_demo_key"))
            .await?;
        assert_eq!(status, 200, "{d}");
    }
    let audit = n.wait_audited(5).await?;
    let last_seq = audit["last_seq"].as_u64().unwrap_or(0);
    let token = n.auditor_token.clone();

    let (_, first) = n.get_text("/v1/audit?limit=2", Some(&token)).await?;
    let first = lines(&first)?;
    let seqs: Vec<_> = first
        .iter()
        .filter(|l| l["type"] != "checkpoint")
        .map(|l| l["seq"].clone())
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    let (_, rest) = n
        .get_text("/v1/audit?after_seq=2&limit=100000", Some(&token))
        .await?;
    let rest = lines(&rest)?;
    let rest_seqs: Vec<u64> = rest
        .iter()
        .filter(|l| l["type"] != "checkpoint")
        .filter_map(|l| l["seq"].as_u64())
        .collect();
    assert_eq!(rest_seqs.first(), Some(&3));
    assert_eq!(rest_seqs.last(), Some(&last_seq));

    // Since a time after the last record: nothing; since long ago: all.
    let (_, none) = n
        .get_text("/v1/audit?since=2999-01-01T00:00:00Z", Some(&token))
        .await?;
    assert!(none.is_empty(), "{none}");
    let (_, all) = n.get_text("/v1/audit?since=0", Some(&token)).await?;
    assert_eq!(
        lines(&all)?
            .iter()
            .filter(|l| l["type"] != "checkpoint")
            .count() as u64,
        last_seq
    );
    // Since the time of the last decision, in RFC 3339.
    let last_at = rest
        .iter()
        .rev()
        .find(|l| l["type"] == "decision")
        .map(|l| l["at_ms"].as_i64().unwrap_or(0))
        .unwrap_or(0);
    let (_, recent) = n
        .get_text(&format!("/v1/audit?since={last_at}"), Some(&token))
        .await?;
    let recent = lines(&recent)?;
    assert!(!recent.is_empty());
    assert!(
        recent
            .iter()
            .all(|l| l["at_ms"].as_i64().unwrap_or(0) >= last_at),
        "{recent:?}"
    );
    n.node.shutdown().await?;
    Ok(())
}
