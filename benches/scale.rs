//! Scale, side by side by discovery mode: the fake apiserver holds 5,000 kubenurse pods of
//! realistic size (~5 KB of JSON each), their EndpointSlices (50 of 100 endpoints) and 5,000
//! nodes of realistic size (each lists 100 container images, ~24 KB of JSON). One agent at a
//! time, three ways: `pods` (every agent pod and every node, as the Go agent), and
//! `endpointslices` against an apiserver that refuses streaming lists (a default 1.33: the
//! first list is paginated) and one that serves them (1.32, 1.34+: no LIST at all).
//! Measured: the requests and bytes the agent costs the apiserver until it is ready, its RSS,
//! its CPU per round in steady state, and the LIST calls in steady state (must be zero).
//!
//! `cargo bench --bench scale` (three runs per mode, medians); `cargo test --benches`
//! smoke-tests it.

#[allow(dead_code)]
#[path = "../tests/common/fake_apiserver.rs"]
mod fake_apiserver;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use fake_apiserver::{node_with_images, realistic_pod, FakeApiServer, StreamingLists};
use support::*;

const LABELS: &[(&str, &str)] = &[("app.kubernetes.io/name", "kubenurse")];

/// One way of discovering the same cluster.
struct Mode {
    name: &'static str,
    discovery: &'static str,
    streaming: StreamingLists,
}

const MODES: [Mode; 3] = [
    Mode { name: "pods (as the Go agent)", discovery: "pods", streaming: StreamingLists::Refused },
    Mode { name: "endpointslices, paginated list", discovery: "endpointslices", streaming: StreamingLists::Refused },
    Mode { name: "endpointslices, streaming list", discovery: "endpointslices", streaming: StreamingLists::Accepted },
];

#[derive(Default)]
struct Runs {
    ready: Vec<f64>,
    rss: Vec<f64>,
    start_mib: Vec<f64>,
    start_requests: Vec<f64>,
    start_lists: Vec<f64>,
    steady_lists: Vec<f64>,
    steady_requests: Vec<f64>,
    steady_kib: Vec<f64>,
    cpu_per_round: Vec<f64>,
}

fn main() {
    let full = full_run();
    let (runs, objects, images, steady) = if full { (3, 5000, 100, 30) } else { (1, 200, 10, 2) };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let api = runtime.block_on(FakeApiServer::start());
    let _guard = runtime.enter();
    for i in 0..objects {
        let name = format!("ip-10-0-{}-{}.eu-west-1.compute.internal", i / 250, i % 250);
        api.upsert_node(node_with_images(&name, images));
        // Pod IPs on loopback where nothing listens: the probes are refused at once.
        let ip = format!("127.2.{}.{}", i / 250, i % 250 + 1);
        api.upsert_pod(realistic_pod(&format!("kubenurse-{i:05}"), "kubenurse", LABELS, &name, &ip));
    }
    let node_bytes =
        serde_json::to_vec(&node_with_images("ip-10-0-0-0.eu-west-1.compute.internal", images)).expect("json").len();
    let pod_bytes = serde_json::to_vec(&realistic_pod("kubenurse-00000", "kubenurse", LABELS, "n", "127.2.0.1"))
        .expect("json")
        .len();
    let slices = api.endpoint_slices("kubenurse");
    let slice_bytes = serde_json::to_vec(&slices[0]).expect("json").len();
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());

    println!(
        "scale: {objects} kubenurse pods ({:.1} KB JSON each) + {objects} nodes ({:.1} KB each) + {} EndpointSlices \
         ({:.1} KB each, {} endpoints); {runs} runs per mode, {steady} s of steady state at a 1 s interval",
        pod_bytes as f64 / 1000.0,
        node_bytes as f64 / 1000.0,
        slices.len(),
        slice_bytes as f64 / 1000.0,
        slices[0].endpoints.len(),
    );
    for mode in &MODES {
        api.set_streaming_lists(mode.streaming);
        let mut r = Runs::default();
        for _ in 0..runs {
            measure(&api, dir.path(), mode, steady, &mut r);
        }
        println!("  {}:", mode.name);
        println!("    time to ready:            median {:.2} s {:?}", median(r.ready.clone()), r.ready);
        println!("    agent RSS (steady):       median {:.1} MiB {:?}", median(r.rss.clone()), r.rss);
        println!(
            "    apiserver until ready:    median {:.2} MiB in {:.0} requests ({:.0} LIST) {:?}",
            median(r.start_mib.clone()),
            median(r.start_requests.clone()),
            median(r.start_lists.clone()),
            r.start_mib
        );
        println!(
            "    CPU per round (steady):   median {:.2} ms {:?}",
            median(r.cpu_per_round.clone()),
            r.cpu_per_round
        );
        println!(
            "    steady state:             LIST {:?}, other discovery requests {:?}, {:.1} KiB (GET /version included)",
            r.steady_lists,
            r.steady_requests,
            median(r.steady_kib.clone())
        );
    }
}

/// Starts one agent, waits until it is ready, keeps it in steady state for `steady` seconds.
fn measure(api: &FakeApiServer, sa_dir: &std::path::Path, mode: &Mode, steady: u64, r: &mut Runs) {
    api.clear_requests();
    let listen: SocketAddr = format!("127.0.0.100:{}", free_port("127.0.0.100")).parse().expect("addr");
    let mut envs = vec![
        ("KUBENURSE_LISTEN_ADDR", listen.to_string()),
        ("KUBENURSE_CHECK_INTERVAL", "1s".into()),
        ("KUBENURSE_CHECK_TIMEOUT", "1s".into()),
        ("KUBENURSE_DISCOVERY", mode.discovery.into()),
        ("KUBENURSE_DISCOVERY_JITTER", "0s".into()),
        ("KUBENURSE_POD_NAME", "kubenurse-00000".into()),
        ("KUBENURSE_NODE_NAME", "ip-10-0-0-0.eu-west-1.compute.internal".into()),
        ("KUBENURSE_NEIGHBOUR_PORT", "9".into()),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
        ("KUBERNETES_SERVICE_PORT", api.port().to_string()),
        ("KUBERNETES_SERVICE_DNS", "localhost".into()),
        ("KUBENURSE_SERVICE_ACCOUNT_DIR", sa_dir.display().to_string()),
    ];
    if mode.discovery == "pods" {
        envs.push(("KUBENURSE_NEIGHBOUR_FILTER", "app.kubernetes.io/name=kubenurse".into()));
    }
    let child = agent(&envs);
    let pid = child.id();
    r.ready.push(wait_ok(listen, "/ready", Duration::from_secs(120)).as_secs_f64());
    let discovery = |r: &&fake_apiserver::RequestRecord| r.path != "/version";
    let lists = || api.requests().iter().filter(discovery).filter(|r| !r.watch).count();
    r.start_mib.push(api.response_bytes() as f64 / 1024.0 / 1024.0);
    r.start_requests.push(api.requests().iter().filter(discovery).count() as f64);
    r.start_lists.push(lists() as f64);
    let (requests_at_ready, lists_at_ready, bytes_at_ready) = (api.requests().len(), lists(), api.response_bytes());
    let (rounds0, cpu0) = (rounds(listen), cpu_time(pid));
    std::thread::sleep(Duration::from_secs(steady));
    let (cpu1, rounds1) = (cpu_time(pid), rounds(listen));
    r.cpu_per_round.push((cpu1 - cpu0).as_secs_f64() * 1000.0 / (rounds1 - rounds0).max(1.0));
    r.steady_lists.push((lists() - lists_at_ready) as f64);
    let since: Vec<_> = api.requests().into_iter().skip(requests_at_ready).filter(|r| r.path != "/version").collect();
    r.steady_requests.push(since.len() as f64);
    r.steady_kib.push((api.response_bytes() - bytes_at_ready) as f64 / 1024.0);
    r.rss.push(rss_kib(pid) as f64 / 1024.0);
    let (_, alive) = http_get(listen, "/alive").expect("alive");
    assert!(alive.contains("\"neighbourhood_state\": \"ok\""), "discovery not ok: {alive}");
    stop(child);
}
