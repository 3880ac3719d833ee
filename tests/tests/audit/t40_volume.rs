use std::collections::HashSet;
use std::sync::Arc;

use tollgate_node::audit::record::{Body, Record};
use tollgate_node::audit::store::Frame;
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_tests::TestNode;

const N_DECISIONS: usize = 100_000;
const N_WORKERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_decisions_make_a_hundred_thousand_records() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let state = Arc::clone(&n.node.state);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..N_WORKERS {
        let state = Arc::clone(&state);
        workers.spawn(async move {
            let mut ids = Vec::with_capacity(N_DECISIONS / N_WORKERS);
            for i in (w..N_DECISIONS).step_by(N_WORKERS) {
                let mut req = CheckRequest::new("tg_demo_key", "demo-classifier", "2.1.0");
                req.meters.push(Meter {
                    metric: "inferences".into(),
                    quantity: 1,
                });
                req.dry_run = true;
                req.subject = Some(format!("user-{}", i % 100));
                let d = state.check(req).await?;
                ids.push(d.decision_id);
            }
            anyhow::Ok(ids)
        });
    }
    let mut issued = HashSet::with_capacity(N_DECISIONS);
    while let Some(ids) = workers.join_next().await {
        issued.extend(ids??);
    }
    assert_eq!(issued.len(), N_DECISIONS, "decision ids are unique");

    let audit = n.wait_audited(N_DECISIONS as u64).await?;
    assert_eq!(audit["shed"], 0, "{audit}");
    // Every record, read straight from the node's log.
    let store = state
        .audit
        .store()
        .ok_or_else(|| anyhow::anyhow!("audit is on"))?;
    let last_seq = audit["last_seq"].as_u64().unwrap_or(0);
    let mut recorded = HashSet::with_capacity(N_DECISIONS);
    let mut seq = 1;
    while seq <= last_seq {
        let frames = store.scan(seq, 4096)?;
        anyhow::ensure!(!frames.is_empty(), "records end before {last_seq}");
        for frame in frames {
            let Frame::Record { seq: s, value } = frame else {
                anyhow::bail!("a damaged frame after record {seq}");
            };
            seq = s + 1;
            if let Body::Decision(d) = Record::decode(&value[32..])?.body {
                assert!(d.dry_run);
                recorded.insert(d.decision_id);
            }
        }
    }
    assert_eq!(recorded.len(), N_DECISIONS);
    assert_eq!(recorded, issued);

    let (status, report) = n
        .get_text("/v1/audit/verify", Some(&n.auditor_token))
        .await?;
    assert_eq!(status, 200);
    let report: serde_json::Value = serde_json::from_str(&report)?;
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["n_records"], last_seq);
    assert!(report["n_checkpoints"].as_u64().unwrap_or(0) >= (N_DECISIONS / 1000) as u64);
    n.node.shutdown().await?;
    Ok(())
}
