use tollgate_tests::cluster::TestCluster;
use tollgate_tests::demo_check;

use crate::{fast_sampling, scrape, scrape_until};

#[tokio::test]
async fn a_cluster_exposes_gossip_per_peer_and_agrees_on_the_leader() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, fast_sampling).await?;
    let leader = cluster.leader().await?;
    for i in cluster.running() {
        let (status, d) = cluster
            .node(i)?
            .post("/v1/check", &demo_check("tg_demo_tiny"))
            .await?;
        assert_eq!(status, 200, "{d}");
        assert_eq!(d["decision"], "allow", "{d}");
    }

    // Every node gossips its use to both peers: bytes move on every link
    // and the usage reaches every node's sampled utilisation.
    for i in cluster.running() {
        let n = cluster.node(i)?;
        let me = (i + 1).to_string();
        let peers: Vec<String> = (1..=3)
            .map(|p| p.to_string())
            .filter(|p| *p != me)
            .collect();
        let s = scrape_until(n, None, "gossip on every link and converged usage", |s| {
            peers.iter().all(|p| {
                s.value("tollgate_gossip_bytes_sent_total", &[("peer", p)])
                    .is_some_and(|b| b > 0.0)
                    && s.value("tollgate_gossip_bytes_received_total", &[("peer", p)])
                        .is_some_and(|b| b > 0.0)
                    && s.value("tollgate_gossip_peer_connected", &[("peer", p)]) == Some(1.0)
            }) && s.value("tollgate_quota_utilization_max_ratio", &[]) == Some(3.0 / 5.0)
        })
        .await?;
        assert!(
            s.value("tollgate_gossip_peer_lag_seconds", &[("peer", &me)])
                .is_none(),
            "a node is not its own peer"
        );
        assert_eq!(s.value("tollgate_raft_members", &[]), Some(3.0));
        assert_eq!(s.value("tollgate_raft_voters", &[]), Some(3.0));
        assert_eq!(
            s.value("tollgate_raft_leader_id", &[]),
            Some((leader + 1) as f64)
        );
        assert_eq!(
            s.value("tollgate_raft_is_leader", &[]),
            Some(if i == leader { 1.0 } else { 0.0 })
        );
    }

    // The dashboard's cluster table lists every member and the leader.
    let n = cluster.node(0)?;
    let (status, page) = n.get_text("/dashboard", Some(cluster.token())).await?;
    assert_eq!(status, 200);
    for id in 1..=3 {
        assert!(page.contains(&format!("<tr data-node=\"{id}\">")), "{page}");
    }
    assert!(page.contains(&format!(
        "<tr data-node=\"{}\"><td>{}</td><td>local-",
        leader + 1,
        leader + 1
    )));
    assert!(page.contains("aria-label=\"Gossip lag per peer in milliseconds\""));
    scrape(n, None).await?;
    Ok(())
}
