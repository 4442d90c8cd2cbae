//! Agents probing each other: three on 127.0.0.21–23 discover each other through the fake
//! apiserver, one is killed and the others count `connect_done` errors for it; and a static
//! dual-stack neighbour probed over both families.

mod common;

use std::net::SocketAddr;

use common::agent::{get, metric, probed_nodes, results, start, wait_report};
use common::fake_apiserver::{node, pod, FakeApiServer};
use kubenurse::agent::Agent;

const NS: &str = "kubenurse";
const LABELS: &[(&str, &str)] = &[("app.kubernetes.io/name", "kubenurse")];

#[tokio::test]
async fn agents_probe_each_other_and_notice_a_dead_peer() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.21:0").expect("bind").local_addr().expect("addr").port();
    let ips = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];
    for (i, ip) in ips.iter().enumerate() {
        api.upsert_node(node(&format!("node-{i}")));
        api.upsert_pod(pod(&format!("kubenurse-{i}"), NS, LABELS, &format!("node-{i}"), ip, "Running"));
    }
    let mut agents: Vec<Agent> = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        agents.push(
            start(
                &[
                    api.agent_args(dir.path()),
                    vec![
                        format!("--listen-addr={ip}:{port}"),
                        "--check-interval=250ms".into(),
                        "--check-timeout=2s".into(),
                        "--neighbour-filter=app.kubernetes.io/name=kubenurse".into(),
                        format!("--pod-name=kubenurse-{i}"),
                        format!("--neighbour-port={port}"),
                    ],
                ]
                .concat(),
            )
            .await,
        );
    }
    for (i, agent) in agents.iter().enumerate() {
        let others: Vec<String> = (0..3).filter(|j| *j != i).map(|j| format!("node-{j}")).collect();
        let report = wait_report(agent, "both peers probed ok", |r| {
            probed_nodes(r) == others && results(r).values().all(|v| v == "ok")
        })
        .await;
        assert_eq!(report.neighbourhood.own_node.as_deref(), Some(format!("node-{i}").as_str()));
    }
    // Everyone probed everyone: each agent saw two distinct origins.
    for agent in &agents {
        let (_, text) = get(agent.local_addr, "/metrics").await;
        assert_eq!(metric(&text, "kubenurse_neighbourhood_incoming_checks", &[]), Some(2.0));
    }

    // Kill node-2's agent (its pod stays Running in the apiserver, as after a crash).
    let dead = agents.pop().expect("third agent");
    let dead_addr: SocketAddr = dead.local_addr;
    dead.stop().await;
    for agent in &agents {
        wait_report(agent, "node-2 fails at connect", |r| {
            results(r).get("path_node-2").is_some_and(|v| v.contains("connect"))
        })
        .await;
        let (_, text) = get(agent.local_addr, "/metrics").await;
        let errors = metric(&text, "kubenurse_errors_total", &[("type", "path_node-2"), ("event", "connect_done")]);
        assert!(errors.is_some_and(|n| n >= 1.0), "{text}");
        let (status, _) = get(agent.local_addr, "/alive").await;
        assert_eq!(status, 500);
    }
    assert!(tokio::net::TcpStream::connect(dead_addr).await.is_err());
    for agent in agents {
        agent.stop().await;
    }
}

/// A static dual-stack neighbour: node-b answers on 127.0.0.25 and on `::1` (two agents stand
/// for its two addresses). Both families are probed every round under their own types, and a
/// failure of one family shows only under its type.
#[tokio::test]
async fn a_dual_stack_neighbour_is_probed_over_both_families() {
    let b4 = start(&["--listen-addr=127.0.0.25:0".into(), "--check-interval=250ms".into()]).await;
    let b6 = start(&["--listen-addr=[::1]:0".into(), "--check-interval=250ms".into()]).await;
    let a = start(&[
        "--listen-addr=127.0.0.24:0".into(),
        "--check-interval=250ms".into(),
        "--check-timeout=2s".into(),
        "--zone=zone-1".into(),
        format!("--neighbours=node-b@zone-2={}+{}", b4.local_addr, b6.local_addr),
    ])
    .await;
    let report = wait_report(&a, "node-b over both families", |r| {
        probed_nodes(r) == ["node-b", "node-b_ipv6"] && results(r).values().all(|v| v == "ok")
    })
    .await;
    let urls: Vec<String> = report.results.iter().map(|r| r.target.url.to_string()).collect();
    assert_eq!(
        urls,
        [format!("http://{}/alwayshappy", b4.local_addr), format!("http://{}/alwayshappy", b6.local_addr)]
    );
    let (status, alive) = get(a.local_addr, "/alive").await;
    assert_eq!(status, 200, "{alive}");
    let alive: serde_json::Value = serde_json::from_str(&alive).expect("json");
    let checks = &alive["last_check_result"];
    assert_eq!(checks["path_node-b"], "ok");
    assert_eq!(checks["path_node-b_ipv6"], "ok");
    assert_eq!(checks["neighbourhood"][0]["Zone"], "zone-2");
    assert_eq!(checks["neighbourhood"][0]["PodIP"], "127.0.0.25");

    // The IPv6 side goes away: only its type fails.
    b6.stop().await;
    wait_report(&a, "only the IPv6 path fails", |r| {
        let res = results(r);
        res.get("path_node-b_ipv6").is_some_and(|v| v.contains("connect")) && res["path_node-b"] == "ok"
    })
    .await;
    let (_, text) = get(a.local_addr, "/metrics").await;
    let v6 = [("type", "path_node-b_ipv6"), ("event", "connect_done")];
    assert!(metric(&text, "kubenurse_errors_total", &v6).is_some_and(|n| n >= 1.0), "{text}");
    assert!(metric(&text, "kubenurse_errors_total", &[("type", "path_node-b"), ("event", "connect_done")]).is_none());
    let zones = [("source_zone", "zone-1"), ("target_zone", "zone-2")];
    assert!(metric(&text, "kubenurse_zone_errors_total", &zones).is_some_and(|n| n >= 1.0), "{text}");
    a.stop().await;
    b4.stop().await;
}
