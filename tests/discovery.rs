//! Neighbour discovery against a fake kube-apiserver speaking the real wire protocol, from
//! the agents' EndpointSlices (the default) and from pods and nodes (`--discovery=pods`):
//! pods and nodes come and go, nodes get cordoned, the apiserver fails, refuses, throttles,
//! serves or refuses streaming lists, and recovers, and discovery says so truthfully;
//! start-up names what is broken.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::agent::{get, metric, probed_nodes, results, start, wait_metrics, wait_report};
use common::fake_apiserver::{
    cordoned, in_zone, node, not_ready, pod, terminating, with_second_ip, FakeApiServer, Fault, StreamingLists,
};
use common::targets::Target;
use kubenurse::agent::Agent;
use kubenurse::config::Config;

const NS: &str = "kubenurse";
const LABELS: &[(&str, &str)] = &[("app", "kubenurse")];
const PODS_MODE: &str = "--discovery=pods";

struct Cluster {
    api: FakeApiServer,
    _dir: tempfile::TempDir,
    targets: Vec<Target>,
    agent: Agent,
}

/// Neighbour agents are plain targets on 127.0.0.11… sharing one port. The pods are the
/// endpoints of the fake's Service `kubenurse`. Discovery starts at once; failed watches are
/// retried after 100 ms, doubling up to 1 s, so outages clear quickly.
async fn cluster(extra_args: &[&str]) -> Cluster {
    cluster_with(extra_args, |_| {}).await
}

/// [`cluster`], with `prepare` run on the apiserver before the agent starts.
async fn cluster_with(extra_args: &[&str], prepare: impl FnOnce(&FakeApiServer)) -> Cluster {
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
    for default in ["--discovery-backoff-base=100ms", "--discovery-backoff-max=1s", "--discovery-jitter=0s"] {
        let flag = default.split('=').next().unwrap_or_default();
        if !extra_args.iter().any(|a| a.starts_with(flag)) {
            args.push(default.into());
        }
    }
    args.extend(extra_args.iter().map(|a| a.to_string()));
    prepare(&api);
    let agent = start(&args).await;
    Cluster { api, _dir: dir, targets, agent }
}

#[tokio::test]
async fn neighbours_follow_pods_and_nodes() {
    let c = cluster(&[PODS_MODE]).await;
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
    assert!(c.api.requests_to("/endpointslices").is_empty());
    c.agent.stop().await;
}

#[tokio::test]
async fn own_node_cordoned_or_gone_makes_the_agent_unready() {
    let c = cluster(&[PODS_MODE]).await;
    wait_report(&c.agent, "first round", |r| probed_nodes(r).len() == 2).await;
    let addr = c.agent.local_addr;
    assert_eq!(get(addr, "/ready").await.0, 200);

    c.api.upsert_node(cordoned(node("node-self")));
    assert!(eventually_ready(addr, 503).await, "cordoned own node must make /ready 503");
    assert_eq!(get(addr, "/livez").await.0, 200, "a restart does not uncordon a node: /livez stays 200");
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
    for mode in [PODS_MODE, "--discovery=endpointslices"] {
        an_apiserver_outage_keeps_the_last_neighbours_and_recovers_in(mode).await;
    }
}

async fn an_apiserver_outage_keeps_the_last_neighbours_and_recovers_in(mode: &str) {
    let c = cluster_with(&[mode], |api| assert!(api.delete_pod(NS, "kubenurse-c"))).await;
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
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Running"));
    c.api.set_fault(Fault::None);
    wait_report(&c.agent, "c is discovered after recovery", |r| {
        probed_nodes(r) == ["node-a", "node-b", "node-c"] && r.neighbourhood.state == "ok"
    })
    .await;
    c.agent.stop().await;
}

#[tokio::test]
async fn an_expired_watch_relists_once_and_keeps_the_set() {
    an_expired_watch_relists_once_and_keeps_the_set_in(PODS_MODE, "/pods").await;
}

#[tokio::test]
async fn an_expired_slice_watch_relists_once_and_keeps_the_set() {
    an_expired_watch_relists_once_and_keeps_the_set_in("--discovery=endpointslices", "/endpointslices").await;
}

async fn an_expired_watch_relists_once_and_keeps_the_set_in(mode: &str, agents: &str) {
    let logs = Logs::capture();
    let c = cluster_with(&[mode], |api| assert!(api.delete_pod(NS, "kubenurse-c"))).await;
    wait_report(&c.agent, "a and b are probed", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    c.api.expire_watches();
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Running"));
    wait_report(&c.agent, "c after the re-list", |r| probed_nodes(r) == ["node-a", "node-b", "node-c"]).await;
    assert_eq!(c.api.list_calls(agents), 2, "one list at start, one re-list after 410");
    assert_eq!(c.api.list_calls("/nodes"), 2);
    // Expiry is routine, not a failure.
    assert!(logs.lines_with(&["kubernetes watch"]).is_empty(), "{:#?}", logs.lines_with(&["kubernetes watch"]));
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
    // EndpointSlices are forbidden, so pods are read instead: they are forbidden too.
    let report =
        wait_report(&agent, "the 403 is reported", |r| r.neighbourhood.state.contains("pods: forbidden")).await;
    let state = &report.neighbourhood.state;
    assert!(state.contains("RBAC permission to list and watch pods in namespace kubenurse"), "{state}");
    assert!(state.starts_with("pods mode: the agent pods are read because endpointslices are forbidden"), "{state}");
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

/// Log lines of the agents started on this thread while the capture lives. One process-wide
/// subscriber writes each line into the buffer of the thread that logged it (the tests run on
/// current-thread runtimes, so an agent's tasks log on its test's thread); a single global
/// subscriber keeps tracing's per-callsite caches stable across tests running in parallel.
struct Logs(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { std::cell::RefCell::new(None) };
}

struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(buffer) = c.borrow().as_ref() {
                buffer.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture() -> Self {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(|| ThreadWriter)
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        });
        let buffer = Arc::new(Mutex::new(Vec::new()));
        CAPTURE.with(|c| *c.borrow_mut() = Some(buffer.clone()));
        Logs(buffer)
    }

    /// The lines that contain every one of `words`.
    fn lines_with(&self, words: &[&str]) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
        text.lines().filter(|l| words.iter().all(|w| l.contains(w))).map(str::to_owned).collect()
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        CAPTURE.with(|c| *c.borrow_mut() = None);
    }
}

/// Waits (bounded) until the apiserver has seen `n` requests ending with `path_suffix`.
async fn wait_requests(api: &FakeApiServer, path_suffix: &str, n: usize) {
    for _ in 0..600 {
        if api.requests_to(path_suffix).len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} requests to {path_suffix}: {:?}", api.requests_to(path_suffix));
}

const NODE_RBAC: &str = concat!(
    "forbidden: the service account lacks RBAC permission to list and watch nodes cluster-wide: ",
    r#"add a ClusterRole rule {apiGroups: [""], resources: ["nodes"], verbs: ["list","watch"]} bound to it"#
);

#[tokio::test]
async fn a_forbidden_node_watch_is_reported_once_and_does_not_hide_the_neighbours() {
    a_forbidden_node_watch_is_reported_once_and_does_not_hide_the_neighbours_in(PODS_MODE).await;
}

#[tokio::test]
async fn a_forbidden_cordoned_node_watch_is_reported_once_and_does_not_hide_the_endpoints() {
    a_forbidden_node_watch_is_reported_once_and_does_not_hide_the_neighbours_in("--discovery=endpointslices").await;
}

async fn a_forbidden_node_watch_is_reported_once_and_does_not_hide_the_neighbours_in(mode: &str) {
    let logs = Logs::capture();
    let c = cluster_with(&[mode], |api| {
        api.set_resource_fault("nodes", Fault::Forbidden);
        assert!(api.delete_pod(NS, "kubenurse-c"));
    })
    .await;
    let report = wait_report(&c.agent, "the refused node watch is reported", |r| {
        r.neighbourhood.state.contains("nodes: forbidden")
    })
    .await;
    assert!(report.neighbourhood.state.contains(NODE_RBAC), "{}", report.neighbourhood.state);
    // Nodes were never listed: the pods are not filtered by them, rather than all dropped.
    assert_eq!(probed_nodes(&report), ["node-a", "node-b"]);
    let (status, alive) = get(c.agent.local_addr, "/alive").await;
    assert_eq!(status, 500, "{alive}");
    assert!(alive.contains("ClusterRole rule"), "{alive}");

    // Several refused attempts, one log line (reminders come minutes apart).
    wait_requests(&c.api, "/nodes", 3).await;
    let lines = logs.lines_with(&["kubernetes watch failed", "ClusterRole rule", "resource=nodes"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(logs.lines_with(&["still failing"]).is_empty());
    c.agent.stop().await;
}

#[tokio::test]
async fn a_failing_node_watch_shows_until_the_nodes_are_listed_again() {
    let c = cluster(&[PODS_MODE]).await;
    wait_report(&c.agent, "a and b are probed", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    c.api.set_resource_fault("nodes", Fault::ServerError);
    c.api.expire_watches(); // both watches end; pods re-list, the node watch gets 500s
    let report = wait_report(&c.agent, "the failing node watch is reported", |r| {
        r.neighbourhood.state.contains("nodes: watch nodes failed: 500")
    })
    .await;
    assert!(!report.neighbourhood.state.contains("pods"), "the pod re-list worked: {}", report.neighbourhood.state);
    assert_eq!(probed_nodes(&report), ["node-a", "node-b"], "the last known nodes stay in use");
    assert_eq!(get(c.agent.local_addr, "/alive").await.0, 500);

    // Back: the resumed watch is too old (410), so nodes are listed again, which clears it.
    let lists = c.api.list_calls("/nodes");
    c.api.set_resource_fault("nodes", Fault::None);
    wait_report(&c.agent, "the state clears once nodes are listed", |r| r.neighbourhood.state == "ok").await;
    assert_eq!(c.api.list_calls("/nodes"), lists + 1);
    assert_eq!(get(c.agent.local_addr, "/alive").await.0, 200);
    c.agent.stop().await;
}

#[tokio::test]
async fn after_an_outage_the_state_clears_without_any_change_in_the_cluster() {
    let c = cluster(&[PODS_MODE]).await;
    wait_report(&c.agent, "healthy", |r| probed_nodes(r) == ["node-a", "node-b"] && r.neighbourhood.state == "ok")
        .await;
    let lists = c.api.list_calls("/pods") + c.api.list_calls("/nodes");
    c.api.set_fault(Fault::Outage);
    wait_report(&c.agent, "both watches fail", |r| {
        r.neighbourhood.state.contains("pods: ") && r.neighbourhood.state.contains("nodes: ")
    })
    .await;
    // Back, and nothing changes in the cluster: no event will ever arrive, the watches
    // simply resume and stay open.
    c.api.set_fault(Fault::None);
    let report = wait_report(&c.agent, "the state clears", |r| r.neighbourhood.state == "ok").await;
    assert_eq!(probed_nodes(&report), ["node-a", "node-b"]);
    assert_eq!(c.api.list_calls("/pods") + c.api.list_calls("/nodes"), lists, "resumed without a re-list");
    assert!(c.api.watch_calls("/pods") >= 2 && c.api.watch_calls("/nodes") >= 2);
    c.agent.stop().await;
}

#[tokio::test]
async fn refused_lists_back_off_exponentially_and_recover_only_after_a_list() {
    let logs = Logs::capture();
    let c = cluster_with(&[PODS_MODE, "--discovery-backoff-base=100ms", "--discovery-backoff-max=800ms"], |api| {
        api.set_resource_fault("nodes", Fault::Forbidden);
        let throttled = Fault::TooManyRequests { retry_after_secs: 2 };
        let (forbidden, error) = (Fault::Forbidden, Fault::ServerError);
        api.queue_faults("nodes", [forbidden, error, forbidden, error, forbidden, error, throttled, forbidden]);
    })
    .await;
    wait_requests(&c.api, "/nodes", 9).await;
    assert!(logs.lines_with(&["recovered"]).is_empty(), "{:#?}", logs.lines_with(&["recovered"]));
    // Every attempt is a streaming list (a watch): the apiserver refused it before saying
    // whether it serves them.
    let requests = c.api.requests_to("/nodes");
    assert!(requests.iter().take(9).all(|r| r.query.contains("sendInitialEvents") && r.status != 200), "{requests:#?}");
    let gaps: Vec<Duration> = requests.windows(2).take(8).map(|w| w[1].at - w[0].at).collect();
    // Waits of 100, 200, 400 ms, then the 800 ms cap (each up to a quarter shorter): every
    // wait at least doubles the one two steps before, until the cap stops the growth.
    assert!(gaps[2] > gaps[0] * 2 && gaps[3] > gaps[1] * 2, "doubling: {gaps:?}");
    assert!(gaps[5] < gaps[3] * 2 && gaps[7] < gaps[4] * 2, "capped: {gaps:?}");
    // The seventh answer was 429 with Retry-After: 2, a longer wait than the cap.
    assert!([3, 4, 5, 7].iter().all(|i| gaps[6] > gaps[*i]), "Retry-After honoured: {gaps:?}");

    c.api.set_resource_fault("nodes", Fault::None);
    wait_report(&c.agent, "nodes listed at last", |r| r.neighbourhood.state == "ok").await;
    let recovered = logs.lines_with(&["kubernetes watch recovered"]);
    assert_eq!(recovered.len(), 1, "{recovered:#?}");
    assert!(recovered[0].contains("resource=nodes") && recovered[0].contains("a list completed"), "{recovered:?}");
    assert!(c.api.requests_to("/nodes").iter().any(|r| !r.watch && r.status == 200));
    c.agent.stop().await;
}

#[tokio::test]
async fn two_agent_pods_on_one_node_are_one_neighbour_the_ready_one_then_the_newest() {
    let c = cluster(&[PODS_MODE]).await;
    wait_report(&c.agent, "a and b are probed", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    // A DaemonSet surge: the new pod on node-a runs but is not Ready yet.
    let newer = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1);
    let mut surge = pod("kubenurse-a-surge", NS, LABELS, "node-a", "127.0.0.14", "Running");
    surge.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(newer));
    let mut unready = surge.clone();
    let conditions = unready.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions");
    conditions[0].status = "False".into();
    c.api.upsert_pod(unready);
    let chosen = |r: &kubenurse::scheduler::RoundReport| {
        let on_a: Vec<&str> = r
            .neighbourhood
            .neighbours
            .iter()
            .filter(|n| n.node_name == "node-a")
            .map(|n| n.pod_name.as_str())
            .collect();
        on_a.join(",")
    };
    let report = wait_report(&c.agent, "the surge pod is known", |r| {
        c.api.watch_calls("/pods") > 0 && r.neighbourhood.neighbours.len() == 2 && chosen(r) == "kubenurse-a"
    })
    .await;
    assert_eq!(probed_nodes(&report), ["node-a", "node-b"], "one probe per node");

    // Once Ready, the newer pod takes over.
    c.api.upsert_pod(surge);
    let report = wait_report(&c.agent, "the newest Ready pod is chosen", |r| chosen(r) == "kubenurse-a-surge").await;
    assert_eq!(probed_nodes(&report), ["node-a", "node-b"]);
    assert_eq!(results(&report).get("path_node-a").map(String::as_str), Some("ok"));
    c.agent.stop().await;
}

#[tokio::test]
async fn an_unknown_own_node_is_said_at_start_and_in_alive() {
    let logs = Logs::capture();
    let c = cluster_with(&[PODS_MODE], |api| assert!(api.delete_pod(NS, "kubenurse-self"))).await;
    let report =
        wait_report(&c.agent, "the unknown node is reported", |r| r.neighbourhood.state.contains("own node unknown"))
            .await;
    let state = &report.neighbourhood.state;
    assert!(state.contains("kubenurse-self") && state.contains("KUBENURSE_NODE_NAME is not set"), "{state}");
    assert_eq!(report.neighbourhood.own_node, None);
    let (status, alive) = get(c.agent.local_addr, "/alive").await;
    assert_eq!(status, 500);
    assert!(alive.contains("own node unknown"), "{alive}");
    assert_eq!(logs.lines_with(&["the own node is unknown", "KUBENURSE_NODE_NAME"]).len(), 1);

    // The own pod appears (it was not scheduled yet): all is well.
    c.api.upsert_pod(pod("kubenurse-self", NS, LABELS, "node-self", "127.0.0.10", "Running"));
    let report = wait_report(&c.agent, "the own node is known", |r| r.neighbourhood.state == "ok").await;
    assert_eq!(report.neighbourhood.own_node.as_deref(), Some("node-self"));
    c.agent.stop().await;
}

#[tokio::test]
async fn without_neighbour_probes_the_own_node_is_still_watched_for_ready() {
    for node_name in [None, Some("--node-name=node-self")] {
        let args: Vec<&str> = ["--check-neighbourhood=false"].into_iter().chain(node_name).collect();
        let c = cluster(&args).await;
        let report = wait_report(&c.agent, "first round", |r| r.number >= 1).await;
        assert!(probed_nodes(&report).is_empty());
        let addr = c.agent.local_addr;
        assert!(eventually_ready(addr, 200).await);
        c.api.upsert_node(cordoned(node("node-self")));
        assert!(eventually_ready(addr, 503).await, "cordoned own node must make /ready 503 ({node_name:?})");
        c.api.upsert_node(node("node-self"));
        assert!(eventually_ready(addr, 200).await);

        // Only the own node, and only the own pod when the node name had to be read from it.
        let nodes = c.api.requests_to("/nodes");
        assert!(!nodes.is_empty() && nodes.iter().all(|r| r.query.contains("metadata.name%3Dnode-self")), "{nodes:#?}");
        let pods = c.api.requests_to("/pods");
        match node_name {
            None => assert!(
                !pods.is_empty() && pods.iter().all(|r| r.query.contains("metadata.name%3Dkubenurse-self")),
                "{pods:#?}"
            ),
            Some(_) => assert!(pods.is_empty(), "{pods:#?}"),
        }
        c.agent.stop().await;
    }
}

// ---- EndpointSlices (the default) ----

#[tokio::test]
async fn neighbours_are_the_endpoints_ready_or_not_minus_terminating_ones_and_cordoned_nodes() {
    // Two endpoints per slice (100 in a real cluster): the agent pods span several slices.
    let c = cluster_with(&[], |api| api.set_max_endpoints_per_slice(2)).await;
    // kubenurse-c is Pending with an IP: an endpoint, not ready, and a neighbour.
    let report = wait_report(&c.agent, "a, b and c are probed", |r| {
        probed_nodes(r) == ["node-a", "node-b", "node-c"] && r.neighbourhood.state == "ok"
    })
    .await;
    assert!(c.api.endpoint_slices(NS).len() >= 2, "several slices");
    assert_eq!(report.neighbourhood.own_node.as_deref(), Some("node-self"), "read from the own endpoint");
    let (_, alive) = get(c.agent.local_addr, "/alive").await;
    assert!(alive.contains(r#""HostIP": """#) && !alive.contains(r#""HostIP": "127"#), "{alive}");

    // A pod that turns NotReady (its node died) stays probed.
    c.api.upsert_pod(not_ready(pod("kubenurse-a", NS, LABELS, "node-a", "127.0.0.11", "Running")));
    wait_report(&c.agent, "a is NotReady in the slices", |r| {
        c.api.endpoint_slices(NS).iter().flat_map(|s| &s.endpoints).any(|e| {
            e.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some("kubenurse-a")
                && e.conditions.as_ref().and_then(|c| c.ready) == Some(false)
        }) && r.number > report.number
    })
    .await;
    let report = wait_report(&c.agent, "a round after", |r| r.number > report.number + 2).await;
    assert_eq!(probed_nodes(&report), ["node-a", "node-b", "node-c"], "not ready is still a neighbour");

    // A terminating pod is not; nor is a pod on a cordoned node, until it is uncordoned.
    c.api.upsert_pod(terminating(pod("kubenurse-b", NS, LABELS, "node-b", "127.0.0.12", "Running")));
    wait_report(&c.agent, "b (terminating) leaves", |r| probed_nodes(r) == ["node-a", "node-c"]).await;
    c.api.upsert_node(cordoned(node("node-c")));
    wait_report(&c.agent, "c (cordoned) leaves", |r| probed_nodes(r) == ["node-a"]).await;
    c.api.upsert_node(node("node-c"));
    wait_report(&c.agent, "c is back", |r| probed_nodes(r) == ["node-a", "node-c"]).await;
    // A finished pod has no endpoint.
    c.api.upsert_pod(pod("kubenurse-a", NS, LABELS, "node-a", "127.0.0.11", "Failed"));
    wait_report(&c.agent, "a (failed) leaves", |r| probed_nodes(r) == ["node-c"]).await;

    // One list of slices and one of cordoned nodes at start, then only watches; pods and the
    // other nodes are never read.
    assert_eq!(c.api.list_calls("/endpointslices"), 1, "{:#?}", c.api.requests());
    let nodes = c.api.requests_to("/nodes");
    assert!(nodes.iter().all(|r| r.query.contains("fieldSelector=spec.unschedulable%3Dtrue")), "{nodes:#?}");
    assert_eq!(c.api.list_calls("/nodes"), 1);
    assert!(c.api.requests_to("/pods").is_empty());
    c.agent.stop().await;
}

/// A dual-stack neighbour (`::1` is its IPv6 address) in another zone, and a single-stack one
/// in the own zone, found through `mode`'s watches.
async fn dual_stack_and_zones(mode: &[&str]) {
    let c = cluster_with(mode, |api| {
        assert!(api.delete_pod(NS, "kubenurse-c"));
        for (name, zone) in [("node-self", "zone-1"), ("node-a", "zone-2"), ("node-b", "zone-1")] {
            api.upsert_node(in_zone(node(name), zone));
        }
        api.upsert_pod(with_second_ip(pod("kubenurse-a", NS, LABELS, "node-a", "127.0.0.11", "Running"), "::1"));
    })
    .await;
    let port = c.targets[0].addr.port();
    let ipv6 = Target::http_at(SocketAddr::new("::1".parse().expect("ip"), port)).await;
    let report = wait_report(&c.agent, "a over both families, and b", |r| {
        probed_nodes(r) == ["node-a", "node-a_ipv6", "node-b"] && results(r).values().all(|v| v == "ok")
    })
    .await;
    let a = report.neighbourhood.neighbours.iter().find(|n| n.pod_name == "kubenurse-a").expect("a");
    assert_eq!(a.pod_ip(), "127.0.0.11", "IPv4 is the primary family");
    assert_eq!(a.zone.as_deref(), Some("zone-2"));
    assert_eq!(report.neighbourhood.own_zone.as_deref(), Some("zone-1"));
    let urls: std::collections::BTreeMap<String, String> =
        report.results.iter().map(|r| (r.target.kind.clone(), r.target.url.to_string())).collect();
    assert_eq!(urls["path_node-a"], format!("http://127.0.0.11:{port}/alwayshappy"));
    assert_eq!(urls["path_node-a_ipv6"], format!("http://[::1]:{port}/alwayshappy"));
    assert!(ipv6.hits.load(std::sync::atomic::Ordering::SeqCst) > 0, "the IPv6 address was probed");
    assert!(c.targets[0].hits.load(std::sync::atomic::Ordering::SeqCst) > 0, "the IPv4 address was probed");

    let text = wait_metrics(c.agent.local_addr, "zone series", |t| {
        metric(t, "kubenurse_zone_requests_total", &[("source_zone", "zone-1"), ("target_zone", "zone-2")])
            .is_some_and(|n| n >= 2.0)
    })
    .await;
    let same = [("source_zone", "zone-1"), ("target_zone", "zone-1")];
    assert!(metric(&text, "kubenurse_zone_requests_total", &same).is_some_and(|n| n >= 1.0), "{text}");
    assert!(metric(&text, "kubenurse_zone_request_duration_seconds_count", &same).is_some_and(|n| n >= 1.0));
    assert!(metric(&text, "kubenurse_zone_errors_total", &same).is_none(), "nothing failed");
    assert!(
        metric(&text, "kubenurse_httpclient_requests_total", &[("type", "path_node-a_ipv6"), ("code", "200")])
            .is_some_and(|n| n >= 1.0),
        "the second family has its own type"
    );
    c.agent.stop().await;
}

#[tokio::test]
async fn dual_stack_endpoints_are_probed_over_both_families_with_zones_from_slices() {
    dual_stack_and_zones(&[]).await;
}

#[tokio::test]
async fn dual_stack_pods_are_probed_over_both_families_with_zones_from_node_labels() {
    dual_stack_and_zones(&[PODS_MODE]).await;
}

#[tokio::test]
async fn a_cordoned_own_node_makes_the_agent_unready_with_endpoint_slices() {
    let c = cluster(&[]).await;
    wait_report(&c.agent, "first round", |r| r.neighbourhood.state == "ok").await;
    let addr = c.agent.local_addr;
    assert!(eventually_ready(addr, 200).await);
    c.api.upsert_node(cordoned(node("node-self")));
    assert!(eventually_ready(addr, 503).await, "cordoned own node must make /ready 503");
    c.api.upsert_node(node("node-self"));
    assert!(eventually_ready(addr, 200).await);
    assert!(c.api.requests_to("/pods").is_empty(), "the own node is read from the own endpoint");
    c.agent.stop().await;
}

#[tokio::test]
async fn allowing_unschedulable_nodes_watches_no_node_at_all() {
    let c = cluster_with(&["--allow-unschedulable=true"], |api| {
        api.upsert_node(cordoned(node("node-a")));
        api.upsert_node(cordoned(node("node-self")));
    })
    .await;
    wait_report(&c.agent, "a (cordoned) is probed too", |r| {
        probed_nodes(r) == ["node-a", "node-b", "node-c"] && r.neighbourhood.state == "ok"
    })
    .await;
    assert!(eventually_ready(c.agent.local_addr, 200).await, "the own cordon is not watched");
    assert!(c.api.requests_to("/nodes").is_empty() && c.api.requests_to("/pods").is_empty());
    c.agent.stop().await;
}

#[tokio::test]
async fn forbidden_endpoint_slices_fall_back_to_pods_said_once_and_in_alive() {
    let logs = Logs::capture();
    let c = cluster_with(&[], |api| api.set_resource_fault("endpointslices", Fault::Forbidden)).await;
    // Pods mode: the Pending kubenurse-c is not a neighbour.
    let report = wait_report(&c.agent, "neighbours from the pods", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    let state = &report.neighbourhood.state;
    assert!(state.starts_with("pods mode: the agent pods are read because endpointslices are forbidden"), "{state}");
    let rule = r#"add a Role rule {apiGroups: ["discovery.k8s.io"], resources: ["endpointslices"], verbs: ["get","list","watch"]} in namespace kubenurse"#;
    assert!(state.contains(rule) && state.ends_with("or set KUBENURSE_DISCOVERY=pods"), "{state}");
    let (status, alive) = get(c.agent.local_addr, "/alive").await;
    assert_eq!(status, 500, "{alive}");
    assert!(alive.contains("pods mode") && alive.contains("endpointslices"), "{alive}");

    // One refused request, one log line; neighbours keep following the pods.
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Running"));
    wait_report(&c.agent, "c joins", |r| probed_nodes(r) == ["node-a", "node-b", "node-c"]).await;
    assert_eq!(c.api.requests_to("/endpointslices").len(), 1);
    assert_eq!(logs.lines_with(&["EndpointSlices are forbidden", "KUBENURSE_DISCOVERY=pods"]).len(), 1);
    // The cordoned-node watch of endpointslices mode stays.
    assert!(c.api.requests_to("/nodes").iter().all(|r| r.query.contains("spec.unschedulable")));
    c.agent.stop().await;
}

#[tokio::test]
async fn refused_streaming_lists_fall_back_to_paginated_lists_once() {
    let logs = Logs::capture();
    let c = cluster(&[]).await;
    wait_report(&c.agent, "healthy", |r| r.neighbourhood.state == "ok" && probed_nodes(r).len() == 3).await;
    for resource in ["/endpointslices", "/nodes"] {
        let requests = c.api.requests_to(resource);
        let (lists, watches): (Vec<_>, Vec<_>) = requests.iter().partition(|r| !r.watch);
        assert_eq!(lists.len(), 1, "{resource}: one paginated list: {requests:#?}");
        // At most one refused streaming list per watch: the two watches may both ask
        // before either learns the answer.
        let refused = watches.iter().filter(|r| r.status == 422).count();
        assert!(refused <= 1 && watches.iter().all(|r| r.status == 422 || r.status == 200), "{requests:#?}");
    }
    let refused = c.api.requests().iter().filter(|r| r.status == 422).count();
    assert!(refused >= 1);
    assert_eq!(logs.lines_with(&["refuses streaming lists"]).len(), 1, "said once for all watches");
    c.agent.stop().await;
}

#[tokio::test]
async fn served_streaming_lists_need_no_list_request_at_all() {
    let c = cluster_with(&[], |api| api.set_streaming_lists(StreamingLists::Accepted)).await;
    wait_report(&c.agent, "healthy", |r| r.neighbourhood.state == "ok" && probed_nodes(r).len() == 3).await;
    c.api.expire_watches();
    c.api.upsert_pod(pod("kubenurse-c", NS, LABELS, "node-c", "127.0.0.13", "Failed"));
    wait_report(&c.agent, "c leaves after the watches expired", |r| probed_nodes(r) == ["node-a", "node-b"]).await;
    assert_eq!(c.api.list_calls("/endpointslices") + c.api.list_calls("/nodes"), 0, "{:#?}", c.api.requests());
    let streaming = |r: &&common::fake_apiserver::RequestRecord| r.query.contains("sendInitialEvents=true");
    assert!(c.api.requests_to("/endpointslices").iter().filter(streaming).count() >= 2, "at start and after 410");
    c.agent.stop().await;
}

#[tokio::test]
async fn discovery_starts_after_its_random_delay_and_the_first_round_does_not_wait() {
    // A delay of up to an hour: the first round runs at once with the other probes.
    let c = cluster(&["--discovery-jitter=1h"]).await;
    let report = wait_report(&c.agent, "the first round", |r| r.number >= 1).await;
    assert!(probed_nodes(&report).is_empty());
    assert_eq!(results(&report).get("api_server_direct").map(String::as_str), Some("ok"));
    assert!(report.neighbourhood.state.contains("endpointslices: waiting for the first list"));
    assert!(eventually_ready(c.agent.local_addr, 200).await);
    let discovery = |r: &common::fake_apiserver::RequestRecord| r.path != "/version";
    assert!(!c.api.requests().iter().any(discovery), "nothing listed yet: {:#?}", c.api.requests());
    c.agent.stop().await;
}

/// A config for an in-cluster agent talking to `api` with the service account in `dir`.
fn in_cluster_config(api: &FakeApiServer, dir: &std::path::Path) -> Config {
    let mut args = vec!["--listen-addr=127.0.0.10:0".to_owned()];
    args.extend(api.agent_args(dir));
    Config::from_flags(args).expect("config")
}

async fn start_error(config: Config) -> String {
    match Agent::start(config).await {
        Ok(agent) => {
            agent.stop().await;
            panic!("the agent started")
        }
        Err(e) => {
            assert!(e.is_config(), "{e}");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn a_broken_service_account_mount_is_named_at_start() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n").expect("write");
    let error = start_error(in_cluster_config(&api, dir.path())).await;
    assert!(error.contains(&ca.display().to_string()) && !error.contains("KUBENURSE_EXTRA_CA"), "{error}");

    api.write_service_account_dir(dir.path());
    let token = dir.path().join("token");
    std::fs::remove_file(&token).expect("remove token");
    let error = start_error(in_cluster_config(&api, dir.path())).await;
    assert!(error.contains(&token.display().to_string()), "{error}");
    assert!(error.starts_with("KUBENURSE_SERVICE_ACCOUNT_DIR="), "{error}");
}

#[tokio::test]
async fn kubeconfig_lists_several_files_and_they_are_merged_as_kubectl_does() {
    // Provides the pods (kubenurse-c not yet scheduled), nodes and neighbour targets.
    let c = cluster_with(&[], |api| assert!(api.delete_pod(NS, "kubenurse-c"))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &c.api.ca_pem).expect("write ca");
    // The first file names the context; the cluster, user and context come from the second.
    let first = dir.path().join("first.yaml");
    std::fs::write(&first, "apiVersion: v1\nkind: Config\ncurrent-context: fake\n").expect("write");
    let second = dir.path().join("second.yaml");
    let second_yaml = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: elsewhere\n\
         clusters:\n- name: fake\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: nurse\n  user:\n    token: {}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nurse\n    namespace: {NS}\n",
        c.api.url(),
        ca.display(),
        c.api.token()
    );
    std::fs::write(&second, second_yaml).expect("write");
    let missing = dir.path().join("missing.yaml");
    let paths = std::env::join_paths([&missing, &first, &second]).expect("paths");
    let port = c.targets[0].addr.port();
    let agent = start(&[
        "--listen-addr=127.0.0.10:0".into(),
        "--check-interval=200ms".into(),
        "--neighbour-filter=app=kubenurse".into(),
        "--pod-name=kubenurse-self".into(),
        format!("--neighbour-port={port}"),
        "--discovery-jitter=0s".into(),
        format!("--kubeconfig={}", paths.to_string_lossy()),
    ])
    .await;
    wait_report(&agent, "neighbours found through the merged kubeconfig", |r| {
        probed_nodes(r) == ["node-a", "node-b"] && r.neighbourhood.state == "ok"
    })
    .await;
    agent.stop().await;
    c.agent.stop().await;

    let nowhere = std::env::join_paths([&missing, &dir.path().join("gone.yaml")]).expect("paths");
    let config = Config::from_flags([
        "--listen-addr=127.0.0.10:0".to_owned(),
        format!("--kubeconfig={}", nowhere.to_string_lossy()),
    ])
    .expect("config");
    let error = start_error(config).await;
    assert!(error.starts_with("KUBECONFIG=") && error.contains("none of these files exists"), "{error}");
}
