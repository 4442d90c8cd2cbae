//! Scale: the fake apiserver holds 5,000 kubenurse pods and 5,000 nodes of realistic size
//! (each node lists 100 container images, ~30 KB of JSON). Measured: agent RSS, the requests
//! and bytes the agent costs the apiserver at start and in steady state (LIST calls after
//! start must be zero), and the time to ready.
//!
//! `cargo bench --bench scale` (three runs, medians); `cargo test --benches` smoke-tests it.

#[allow(dead_code)]
#[path = "../tests/common/fake_apiserver.rs"]
mod fake_apiserver;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use fake_apiserver::{node_with_images, pod, FakeApiServer};
use support::*;

fn main() {
    let full = full_run();
    let (runs, objects, images, steady) = if full { (3, 5000, 100, 60) } else { (1, 200, 10, 2) };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let api = runtime.block_on(FakeApiServer::start());
    let _guard = runtime.enter();
    for i in 0..objects {
        let name = format!("ip-10-0-{}-{}.eu-west-1.compute.internal", i / 250, i % 250);
        api.upsert_node(node_with_images(&name, images));
        // Pod IPs on loopback where nothing listens: the probes are refused at once.
        let ip = format!("127.2.{}.{}", i / 250, i % 250 + 1);
        let pod_name = format!("kubenurse-{i:05}");
        api.upsert_pod(pod(&pod_name, "kubenurse", &[("app.kubernetes.io/name", "kubenurse")], &name, &ip, "Running"));
    }
    let node_bytes =
        serde_json::to_vec(&node_with_images("ip-10-0-0-0.eu-west-1.compute.internal", images)).expect("json").len();
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());

    let (
        mut rss,
        mut ready,
        mut start_bytes,
        mut start_requests,
        mut steady_lists,
        mut steady_requests,
        mut steady_bytes,
    ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        api.clear_requests();
        let listen: SocketAddr = format!("127.0.0.100:{}", free_port("127.0.0.100")).parse().expect("addr");
        let child = agent(&[
            ("KUBENURSE_LISTEN_ADDR", listen.to_string()),
            ("KUBENURSE_CHECK_INTERVAL", "5s".into()),
            ("KUBENURSE_CHECK_TIMEOUT", "1s".into()),
            ("KUBENURSE_NEIGHBOUR_FILTER", "app.kubernetes.io/name=kubenurse".into()),
            ("KUBENURSE_POD_NAME", "kubenurse-00000".into()),
            ("KUBENURSE_NEIGHBOUR_PORT", "9".into()),
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT", api.port().to_string()),
            ("KUBERNETES_SERVICE_DNS", "localhost".into()),
            ("KUBENURSE_SERVICE_ACCOUNT_DIR", dir.path().display().to_string()),
        ]);
        let pid = child.id();
        ready.push(wait_ok(listen, "/ready", Duration::from_secs(120)).as_secs_f64());
        start_bytes.push(api.response_bytes() as f64 / 1024.0 / 1024.0);
        start_requests.push(api.requests().iter().filter(|r| r.path != "/version").count() as f64);
        let lists_at_ready = api.list_calls("/pods") + api.list_calls("/nodes");
        let requests_at_ready = api.requests().len();
        let bytes_at_ready = api.response_bytes();
        std::thread::sleep(Duration::from_secs(steady));
        steady_lists.push((api.list_calls("/pods") + api.list_calls("/nodes") - lists_at_ready) as f64);
        // Requests other than the apiserver probes' GET /version.
        let since: Vec<_> =
            api.requests().into_iter().skip(requests_at_ready).filter(|r| r.path != "/version").collect();
        steady_requests.push(since.len() as f64);
        steady_bytes.push((api.response_bytes() - bytes_at_ready) as f64 / 1024.0);
        rss.push(rss_kib(pid) as f64 / 1024.0);
        let (_, alive) = http_get(listen, "/alive").expect("alive");
        assert!(alive.contains("\"neighbourhood_state\": \"ok\""), "discovery not ok");
        stop(child);
    }
    println!(
        "scale: {objects} kubenurse pods + {objects} nodes ({} KB JSON per node), {runs} runs, steady state {steady} s",
        node_bytes / 1024
    );
    println!("  time to ready:                   median {:.2} s {ready:?}", median(ready.clone()));
    println!("  agent RSS (steady):              median {:.1} MiB {rss:?}", median(rss.clone()));
    println!(
        "  apiserver cost until ready:      median {:.1} MiB in {:.0} requests",
        median(start_bytes.clone()),
        median(start_requests.clone())
    );
    println!("  LIST calls in steady state:      {steady_lists:?}");
    println!("  other requests in steady state:  {steady_requests:?} ({:.1} KiB)", median(steady_bytes.clone()));
}
