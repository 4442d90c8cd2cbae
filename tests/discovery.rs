//! Neighbour discovery against a fake kube-apiserver speaking the real wire protocol:
//! pods and nodes come and go, nodes get cordoned, the apiserver fails and recovers.

mod common;

use std::net::SocketAddr;

use common::agent::{get, probed_nodes, results, start, wait_report};
use common::fake_apiserver::{cordoned, node, pod, FakeApiServer, Fault};
use common::targets::Target;
use kubenurse::agent::Agent;

const NS: &str = "kubenurse";
const LABELS: &[(&str, &str)] = &[("app", "kubenurse")];

struct Cluster {
    api: FakeApiServer,
    _dir: tempfile::TempDir,
    targets: Vec<Target>,
    agent: Agent,
}

/// Neighbour agents are plain targets on 127.0.0.11… sharing one port.
async fn cluster(extra_args: &[&str]) -> Cluster {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    let first = Target::http("127.0.0.11").await;
    let port = first.addr.port();
    let mut targets = vec![first];
    for ip in ["127.0.0.12", "127.0.0.13", "127.0.0.14"] {
        targets.push(Target::http_at(SocketAddr::new(ip.parse().expect("ip"), port)).await);
    }
    for name in ["node-self", "node-a", "node-b", "node-c", "node-d"] {
        api.upsert_node(node(name));
    }
    api.upsert_pod(pod("kubenurse-self", NS, LABELS, "node-self", "127.0.0.10", "Running"));
    api.upsert_pod(pod("kubenurse-a", NS, LABELS, "node-a", "127.0.0.11", "Running"));
    api.upsert_pod(pod("kubenurse-b", NS, LABELS, "node-b", "127.0.0.12", "Running"));
    api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Pending"));
    api.upsert_pod(pod("other-app", NS, &[("app", "other")], "node-d", "127.0.0.14", "Running"));

    let mut args: Vec<String> = vec![
        "--listen-addr=127.0.0.10:0".into(),
        "--check-interval=200ms".into(),
        "--check-timeout=2s".into(),
        "--neighbour-filter=app=kubenurse".into(),
        "--pod-name=kubenurse-self".into(),
        format!("--neighbour-port={port}"),
    ];
    args.extend(api.agent_args(dir.path()));
    args.extend(extra_args.iter().map(|a| a.to_string()));
    let agent = start(&args).await;
    Cluster { api, _dir: dir, targets, agent }
}

#[tokio::test]
async fn neighbours_follow_pods_and_nodes() {
    let c = cluster(&[]).await;
    let report = wait_report(&c.agent, "a and b are probed", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    // The apiserver probes carry the service-account token (the fake rejects requests without).
    let res = results(&report);
    assert_eq!(res["api_server_direct"], "ok", "{res:?}");
    assert_eq!(res["api_server_dns"], "ok", "{res:?}");
    assert!(res.values().all(|v| v == "ok"), "{res:?}");
    assert_eq!(report.neighbourhood.state, "ok");

    // The token goes to the apiserver probes only: neighbours never see it.
    assert!(c.targets.iter().map(|t| t.hits.load(std::sync::atomic::Ordering::SeqCst)).sum::<usize>() > 0);
    assert_eq!(c.targets.iter().map(|t| t.with_token.load(std::sync::atomic::Ordering::SeqCst)).sum::<usize>(), 0);

    // The pending pod starts running.
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Running"));
    wait_report(&c.agent, "c joins", |r| probed_nodes(r) == ["node-a", "node-b", "node-c"]).await;

    // A cordoned node is left out, and comes back when uncordoned.
    c.api.upsert_node(cordoned(node("node-b")));
    wait_report(&c.agent, "b (cordoned) leaves", |r| probed_nodes(r) == ["node-a", "node-c"]).await;
    c.api.upsert_node(node("node-b"));
    wait_report(&c.agent, "b is back", |r| probed_nodes(r) == ["node-a", "node-b", "node-c"]).await;

    // A pod whose node is gone is left out.
    c.api.delete_node("node-c");
    wait_report(&c.agent, "c (node gone) leaves", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    c.api.upsert_node(node("node-c"));
    wait_report(&c.agent, "c is back", |r| probed_nodes(r) == ["node-a", "node-b", "node-c"]).await;

    // A pod that stops running, one being deleted, and one deleted.
    c.api.upsert_pod(pod("kubenurse-a", NS, LABELS, "node-a", "127.0.0.11", "Failed"));
    let mut deleting = pod("kubenurse-b", NS, LABELS, "node-b", "127.0.0.12", "Running");
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    c.api.upsert_pod(deleting);
    c.api.delete_pod(NS, "kubenurse-c");
    let report = wait_report(&c.agent, "nobody left", |r| probed_nodes(r).is_empty()).await;
    assert_eq!(report.neighbourhood.state, "ok");

    // Discovery is list-then-watch: no LIST after the start (one each for pods and nodes).
    assert_eq!(c.api.list_calls("/pods"), 1, "{:?}", c.api.requests());
    assert_eq!(c.api.list_calls("/nodes"), 1);
    c.agent.stop().await;
}

#[tokio::test]
async fn own_node_cordoned_or_gone_makes_the_agent_unready() {
    let c = cluster(&[]).await;
    wait_report(&c.agent, "first round", |r| probed_nodes(r).len() == 2).await;
    let addr = c.agent.local_addr;
    assert_eq!(get(addr, "/ready").await.0, 200);

    c.api.upsert_node(cordoned(node("node-self")));
    assert!(eventually_ready(addr, 503).await, "cordoned own node must make /ready 503");
    c.api.upsert_node(node("node-self"));
    assert!(eventually_ready(addr, 200).await);
    c.api.delete_node("node-self");
    assert!(eventually_ready(addr, 503).await, "own node gone must make /ready 503");
    c.agent.stop().await;
}

async fn eventually_ready(addr: SocketAddr, want: u16) -> bool {
    for _ in 0..100 {
        if get(addr, "/ready").await.0 == want {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn an_apiserver_outage_keeps_the_last_neighbours_and_recovers() {
    let c = cluster(&[]).await;
    wait_report(&c.agent, "a and b are probed", |r| probed_nodes(r) == ["node-a", "node-b"]).await;

    c.api.set_fault(Fault::Outage);
    let report = wait_report(&c.agent, "the outage is noticed", |r| {
        results(r).get("api_server_direct").is_some_and(|v| v != "ok")
    })
    .await;
    assert_eq!(probed_nodes(&report), ["node-a", "node-b"], "last known neighbours stay in use");
    // Several rounds later, still probing them.
    let later = report.number + 5;
    let report = wait_report(&c.agent, "five more rounds", |r| r.number >= later).await;
    assert_eq!(probed_nodes(&report), ["node-a", "node-b"]);
    assert!(results(&report).iter().filter(|(k, _)| k.starts_with("path_")).all(|(_, v)| v == "ok"));

    // Changes made while it was down arrive once it is back, without a restart.
    c.api.set_fault(Fault::None);
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Running"));
    wait_report(&c.agent, "c is discovered after recovery", |r| {
        probed_nodes(r) == ["node-a", "node-b", "node-c"] && r.neighbourhood.state == "ok"
    })
    .await;
    c.agent.stop().await;
}

#[tokio::test]
async fn an_expired_watch_relists_once_and_keeps_the_set() {
    let c = cluster(&[]).await;
    wait_report(&c.agent, "a and b are probed", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    c.api.expire_watches();
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Running"));
    wait_report(&c.agent, "c after the re-list", |r| probed_nodes(r) == ["node-a", "node-b", "node-c"]).await;
    assert_eq!(c.api.list_calls("/pods"), 2, "one list at start, one re-list after 410");
    c.agent.stop().await;
}

#[tokio::test]
async fn missing_rbac_is_reported_in_words_and_nothing_is_probed() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    api.set_fault(Fault::Forbidden);
    let agent = start(
        &[
            api.agent_args(dir.path()),
            vec![
                "--listen-addr=127.0.0.10:0".into(),
                "--check-interval=200ms".into(),
                "--check-api-server-direct=false".into(),
                "--check-api-server-dns=false".into(),
                "--allow-unschedulable=true".into(),
                "--pod-name=kubenurse-self".into(),
            ],
        ]
        .concat(),
    )
    .await;
    let report = wait_report(&agent, "the 403 is reported", |r| r.neighbourhood.state.contains("forbidden")).await;
    assert!(report.neighbourhood.state.contains("RBAC permission to list and watch pods in namespace kubenurse"));
    assert_eq!(get(agent.local_addr, "/alive").await.0, 500);
    agent.stop().await;
}

#[tokio::test]
async fn neighbour_limit_picks_the_ring_successors() {
    let c = cluster(&["--neighbour-limit=1", "--node-name=node-self"]).await;
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Running"));
    // The nearest of node-a, node-b, node-c after node-self on the SHA-256 ring.
    let own = kubenurse::selection::ring_hash("node-self");
    let nearest = ["node-a", "node-b", "node-c"]
        .into_iter()
        .min_by_key(|n| kubenurse::selection::ring_hash(n).wrapping_sub(own))
        .expect("a node");
    wait_report(&c.agent, "one neighbour, the ring successor", |r| probed_nodes(r) == [nearest]).await;
    c.agent.stop().await;
}
