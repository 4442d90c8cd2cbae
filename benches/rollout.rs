//! Rollout: many agent processes (one per loopback address 127.3.0.x) start at once against
//! one fake apiserver that holds 5,000 nodes of realistic size (~24 KB of JSON each) and
//! 5,000 agent pods of realistic size (~5 KB each, so 50 EndpointSlices of 100 endpoints), as
//! when a DaemonSet rolls out. Measured per discovery mode, with the start jitter off and at
//! its default (one check interval): the bytes and requests the apiserver serves until every
//! agent is ready, the most lists it answers at once, and its own CPU time (the fake runs in
//! this process). Then, with every agent watching: agent pods are replaced one by one with the
//! pod changes a rolling update makes (the old pod: terminating, stopped, gone; the new one:
//! created, scheduled, given an IP, running, ready), and nodes post their status as kubelets
//! do: the watch bytes each replacement and each node update cost per agent. Per-agent bytes
//! are extrapolated to 5,000 agents.
//!
//! `cargo bench --bench rollout`; `cargo test --benches` smoke-tests it with a few agents.

#[allow(dead_code)]
#[path = "../tests/common/fake_apiserver.rs"]
mod fake_apiserver;
mod support;

use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};

use fake_apiserver::{node_with_images, not_ready, pending, realistic_pod, terminating, FakeApiServer};
use support::*;

const NS: &str = "kubenurse";
const LABELS: &[(&str, &str)] = &[("app.kubernetes.io/name", "kubenurse")];
/// The cluster size the per-agent figures are extrapolated to.
const CLUSTER: f64 = 5000.0;

struct Scenario {
    discovery: &'static str,
    jitter: &'static str,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario { discovery: "pods", jitter: "0s" },
    Scenario { discovery: "pods", jitter: "5s" },
    Scenario { discovery: "endpointslices", jitter: "0s" },
    Scenario { discovery: "endpointslices", jitter: "5s" },
];

fn node_name(i: usize) -> String {
    format!("ip-10-0-{}-{}.eu-west-1.compute.internal", i / 250, i % 250)
}

/// The first `agents` pods are the agents started here (on 127.3.0.x); the others have
/// loopback addresses where nothing listens, so probes to them are refused at once.
fn pod_ip(i: usize, agents: usize) -> String {
    if i < agents {
        format!("127.3.0.{}", i + 1)
    } else {
        format!("127.4.{}.{}", i / 250, i % 250 + 1)
    }
}

fn main() {
    let full = full_run();
    let (agents, objects, images, replaced, updated) = if full { (40, 5000, 100, 20, 50) } else { (4, 100, 10, 2, 5) };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let api = runtime.block_on(FakeApiServer::start());
    let _guard = runtime.enter();
    for i in 0..objects {
        api.upsert_node(node_with_images(&node_name(i), images));
        api.upsert_pod(realistic_pod(&format!("kubenurse-{i:05}"), NS, LABELS, &node_name(i), &pod_ip(i, agents)));
    }
    let slices = api.endpoint_slices(NS).len();
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    let port = free_port("127.3.0.1");

    println!(
        "rollout: {agents} agents started at once; the apiserver holds {objects} nodes ({images} images each), \
         {objects} agent pods, {slices} EndpointSlices; 5 s interval; then {replaced} agent pods replaced one by one, \
         {updated} node status updates"
    );
    // The current name of each agent pod: a replaced pod comes back under a new name.
    let mut names: Vec<String> = (0..objects).map(|i| format!("kubenurse-{i:05}")).collect();
    let mut generation = 0;
    for s in &SCENARIOS {
        api.clear_requests();
        let cpu0 = cpu_time(std::process::id());
        let children: Vec<(Child, SocketAddr)> = (0..agents).map(|i| start(&api, dir.path(), s, i, port)).collect();
        let slowest = wait_all_ready(&children, Duration::from_secs(if full { 900 } else { 120 }));
        let apiserver_cpu = cpu_time(std::process::id()) - cpu0;
        let discovery: Vec<_> = api.requests().into_iter().filter(|r| r.path != "/version").collect();
        let lists = discovery.iter().filter(|r| !r.watch).count();
        // A list starts with its first page, or with a streaming list's watch (not a refused one).
        let starts: Vec<Instant> = discovery
            .iter()
            .filter(|r| r.status == 200)
            .filter(|r| (!r.watch && !r.query.contains("continue=")) || r.query.contains("sendInitialEvents=true"))
            .map(|r| r.at.into_std())
            .collect();
        let bytes = api.response_bytes() as f64;
        let per_agent = bytes / agents as f64;
        println!("  {} mode, jitter {}:", s.discovery, s.jitter);
        println!(
            "    until all ready:  {:.1} MiB in {} requests ({lists} LIST), peak {} lists in progress at once, \
             {} lists begun within one second at most, apiserver CPU {:.1} s, slowest agent ready after {:.1} s \
             (informative: 2 cores)",
            bytes / 1048576.0,
            discovery.len(),
            api.peak_concurrent_lists(),
            most_within(&starts, Duration::from_secs(1)),
            apiserver_cpu.as_secs_f64(),
            slowest.as_secs_f64(),
        );
        println!(
            "    per agent:        {:.2} MiB -> {:.0} GiB for a rollout of {CLUSTER} agents",
            per_agent / 1048576.0,
            per_agent * CLUSTER / 1073741824.0
        );

        // A rolling update of agent pods that are not among the running agents, one at a time.
        let bytes0 = api.response_bytes();
        let started_churn = Instant::now();
        for k in 0..replaced {
            let i = objects - 1 - k;
            generation += 1;
            let new = format!("kubenurse-{i:05}-g{generation}");
            let old = std::mem::replace(&mut names[i], new.clone());
            let (ip, node) = (pod_ip(i, agents), node_name(i));
            let old_pod = || realistic_pod(&old, NS, LABELS, &node, &ip);
            let new_pod = |node: &str, ip: &str| realistic_pod(&new, NS, LABELS, node, ip);
            for change in [terminating(old_pod()), not_ready(terminating(old_pod()))] {
                api.upsert_pod(change);
                settle();
            }
            api.delete_pod(NS, &old);
            settle();
            let created = [pending(new_pod("", "")), pending(new_pod(&node, "")), pending(new_pod(&node, &ip))];
            for change in created.into_iter().chain([not_ready(new_pod(&node, &ip)), new_pod(&node, &ip)]) {
                api.upsert_pod(change);
                settle();
            }
        }
        // Let the last events reach every agent.
        std::thread::sleep(Duration::from_secs(2));
        let churn = (api.response_bytes() - bytes0) as f64;
        let per_replacement = churn / replaced as f64 / agents as f64;
        println!(
            "    rolling update:   {:.1} KiB of watch events per replaced pod per agent (in {:.0} s) -> \
             {:.0} GiB for all {CLUSTER} pods replaced, {CLUSTER} agents watching",
            per_replacement / 1024.0,
            started_churn.elapsed().as_secs_f64(),
            per_replacement * CLUSTER * CLUSTER / 1073741824.0
        );

        // Kubelets post their node's status when it changes, and every 5 minutes regardless.
        let bytes0 = api.response_bytes();
        for k in 0..updated {
            generation += 1;
            let mut node = node_with_images(&node_name(k), images);
            let heartbeat = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + generation).expect("time");
            let conditions = node.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions");
            conditions[0].last_heartbeat_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(heartbeat));
            api.upsert_node(node);
            settle();
        }
        std::thread::sleep(Duration::from_secs(2));
        let per_update = (api.response_bytes() - bytes0) as f64 / updated as f64 / agents as f64;
        println!(
            "    node status:      {:.1} KiB of watch events per node update per agent -> {:.0} GiB per hour \
             for {CLUSTER} nodes reporting every 5 min to {CLUSTER} agents",
            per_update / 1024.0,
            per_update * CLUSTER * 12.0 * CLUSTER / 1073741824.0
        );
        for (child, addr) in children {
            let (_, alive) = http_get(addr, "/alive").expect("alive");
            assert!(alive.contains("\"neighbourhood_state\": \"ok\""), "discovery not ok: {alive}");
            stop(child);
        }
    }
}

/// The most of `instants` that fall within any `window`.
fn most_within(instants: &[Instant], window: Duration) -> usize {
    let mut sorted = instants.to_vec();
    sorted.sort();
    let mut most = 0;
    for (i, first) in sorted.iter().enumerate() {
        most = most.max(sorted[i..].iter().take_while(|t| **t < *first + window).count());
    }
    most
}

/// Gives the watchers time to see one change by itself (the EndpointSlice controller would
/// publish it on its own too).
fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}

fn start(api: &FakeApiServer, sa_dir: &std::path::Path, s: &Scenario, i: usize, port: u16) -> (Child, SocketAddr) {
    let addr: SocketAddr = format!("127.3.0.{}:{port}", i + 1).parse().expect("addr");
    let mut envs = vec![
        ("KUBENURSE_LISTEN_ADDR", addr.to_string()),
        ("KUBENURSE_CHECK_INTERVAL", "5s".into()),
        ("KUBENURSE_CHECK_TIMEOUT", "1s".into()),
        ("KUBENURSE_DISCOVERY", s.discovery.into()),
        ("KUBENURSE_DISCOVERY_JITTER", s.jitter.into()),
        ("KUBENURSE_POD_NAME", format!("kubenurse-{i:05}")),
        ("KUBENURSE_NODE_NAME", node_name(i)),
        ("KUBENURSE_NEIGHBOUR_PORT", port.to_string()),
        ("KUBENURSE_CHECK_API_SERVER_DIRECT", "false".into()),
        ("KUBENURSE_CHECK_API_SERVER_DNS", "false".into()),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
        ("KUBERNETES_SERVICE_PORT", api.port().to_string()),
        ("KUBENURSE_SERVICE_ACCOUNT_DIR", sa_dir.display().to_string()),
    ];
    if s.discovery == "pods" {
        envs.push(("KUBENURSE_NEIGHBOUR_FILTER", "app.kubernetes.io/name=kubenurse".into()));
    }
    (agent(&envs), addr)
}

/// Waits until every agent's discovery is ok and it answers `/ready`; returns when the last one
/// got there.
fn wait_all_ready(children: &[(Child, SocketAddr)], limit: Duration) -> Duration {
    let start = Instant::now();
    let mut pending: Vec<SocketAddr> = children.iter().map(|(_, a)| *a).collect();
    while !pending.is_empty() {
        assert!(start.elapsed() < limit, "{} agents not ready within {limit:?}", pending.len());
        pending.retain(|addr| {
            let ready = http_get(*addr, "/ready").is_some_and(|(s, _)| s == 200);
            let ok =
                ready && http_get(*addr, "/alive").is_some_and(|(_, b)| b.contains("\"neighbourhood_state\": \"ok\""));
            !ok
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}
