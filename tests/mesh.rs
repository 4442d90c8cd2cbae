//! Three agents on 127.0.0.21–23 discover each other through the fake apiserver and probe
//! each other; one is killed and the others count `connect_done` errors for it.

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
