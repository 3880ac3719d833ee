//! The full-queue policies. The tests run on one thread: a loop of Checks
//! that never waits lets the writer run only where a Check yields, which is
//! exactly where `block` waits and `shed` does not.

use tollgate_node::audit::OnFull;
use tollgate_quota::request::{CheckRequest, Meter};
use tollgate_tests::TestNode;

use crate::{lines, of_type};

fn dry_check() -> CheckRequest {
    let mut req = CheckRequest::new("tg_demo_key", "demo-classifier", "2.1.0");
    req.meters.push(Meter {
        metric: "inferences".into(),
        quantity: 1,
    });
    req.dry_run = true;
    req
}

#[tokio::test(flavor = "current_thread")]
async fn shed_drops_records_when_full_counts_them_and_says_so_in_the_log() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start_with(dir.path(), |s| {
        s.audit.on_full = OnFull::Shed;
        s.audit.queue_capacity = 2;
    })
    .await?;
    let before = n.wait_audited(1).await?;
    let appended_before = before["appended"].as_u64().unwrap_or(0);
    let state = &n.node.state;
    for _ in 0..10 {
        let d = state.check(dry_check()).await?;
        assert_eq!(d.outcome.as_str(), "allow");
    }
    // Two fit in the queue; eight were shed, and decisions went on.
    assert_eq!(
        state
            .audit
            .stats
            .n_shed
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );
    let audit = n.wait_audited(appended_before + 3).await?;
    assert_eq!(audit["shed"], 8, "{audit}");
    assert_eq!(audit["on_full"], "shed");
    let (_, text) = n.get_text("/v1/audit", Some(&n.auditor_token)).await?;
    let all = lines(&text)?;
    assert_eq!(of_type(&all, "decision").len(), 2);
    let shed = of_type(&all, "shed");
    assert_eq!(shed.len(), 1, "{text}");
    assert_eq!(shed[0]["n_records"], 8);
    n.node.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn block_waits_for_room_and_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start_with(dir.path(), |s| {
        s.audit.on_full = OnFull::Block;
        s.audit.queue_capacity = 2;
        s.audit.block_timeout_ms = 60_000;
    })
    .await?;
    let appended_before = n.wait_audited(1).await?["appended"].as_u64().unwrap_or(0);
    let state = &n.node.state;
    for _ in 0..10 {
        state.check(dry_check()).await?;
    }
    let blocked = state
        .audit
        .stats
        .n_blocked
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(blocked >= 1, "a full queue made a caller wait");
    let audit = n.wait_audited(appended_before + 10).await?;
    assert_eq!(audit["shed"], 0, "{audit}");
    let (_, text) = n.get_text("/v1/audit", Some(&n.auditor_token)).await?;
    assert_eq!(of_type(&lines(&text)?, "decision").len(), 10);
    n.node.shutdown().await?;
    Ok(())
}
