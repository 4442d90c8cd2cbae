//! A long run: 10,000 rounds at a 5 ms interval while neighbours come and go, each coming
//! back on a node with a new name, as nodes of an autoscaled cluster do. Memory and open file
//! descriptors must stay flat. (Series of departed nodes are bounded by the SDK's
//! per-instrument limit; the count is printed, not asserted.)

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::agent::{get, metric};
use common::fake_apiserver::{cordoned, node, pod, FakeApiServer};
use common::process::{free_port, open_fds, rss_kib};
use common::targets::Target;

fn proc_stats(pid: u32) -> (u64, usize) {
    (rss_kib(pid), open_fds(pid))
}

fn series(text: &str) -> usize {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_rounds_with_churn_keep_memory_fds_and_series_flat() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    let first = Target::http("127.0.0.51").await;
    let port = first.addr.port();
    let mut targets = vec![first];
    for i in 2..=6 {
        targets.push(Target::http_at(SocketAddr::new(format!("127.0.0.5{i}").parse().expect("ip"), port)).await);
    }
    api.upsert_node(node("node-self"));
    for i in 1..=6 {
        api.upsert_node(node(&format!("node-{i}")));
        api.upsert_pod(pod(
            &format!("kubenurse-{i}"),
            "kubenurse",
            &[("app", "kubenurse")],
            &format!("node-{i}"),
            &format!("127.0.0.5{i}"),
            "Running",
        ));
    }
    let listen = format!("127.0.0.50:{}", free_port("127.0.0.50"));
    let addr: SocketAddr = listen.parse().expect("addr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .envs([
            ("KUBENURSE_LISTEN_ADDR", listen.as_str()),
            ("KUBENURSE_CHECK_INTERVAL", "5ms"),
            ("KUBENURSE_CHECK_TIMEOUT", "1s"),
            ("KUBENURSE_NEIGHBOUR_LIMIT", "3"),
            ("KUBENURSE_NEIGHBOUR_FILTER", "app=kubenurse"),
            ("KUBENURSE_POD_NAME", "kubenurse-self"),
            ("KUBENURSE_NODE_NAME", "node-self"),
            ("KUBENURSE_NEIGHBOUR_PORT", &port.to_string()),
            ("KUBENURSE_CHECK_API_SERVER_DIRECT", "false"),
            ("KUBENURSE_CHECK_API_SERVER_DNS", "false"),
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &api.port().to_string()),
            ("KUBENURSE_SERVICE_ACCOUNT_DIR", &dir.path().display().to_string()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();

    let rounds = || async {
        let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
        else {
            return (0.0, String::new());
        };
        drop(stream);
        let (_, text) = get(addr, "/metrics").await;
        (metric(&text, "kubenurse_round_lateness_seconds_count", &[]).unwrap_or(0.0), text)
    };
    // Churn: every 100 ms one neighbour, in turn, stops running; is deleted with its node;
    // comes back on a node with a new name; or has its node cordoned. At most 3,000 changes
    // and 10 minutes.
    let churn_api = std::sync::Arc::new(api);
    let churner = {
        let api = churn_api.clone();
        tokio::spawn(async move {
            let mut generation = [0u32; 7];
            for step in 0..3000u32 {
                let i = (step % 6 + 1) as usize;
                let ip = format!("127.0.0.5{i}");
                let names = |g: u32| {
                    if g == 0 {
                        (format!("kubenurse-{i}"), format!("node-{i}"))
                    } else {
                        (format!("kubenurse-{i}-{g}"), format!("node-{i}-{g}"))
                    }
                };
                let (name, node_name) = names(generation[i]);
                match (step / 6) % 4 {
                    0 => api.upsert_pod(pod(&name, "kubenurse", &[("app", "kubenurse")], &node_name, &ip, "Failed")),
                    1 => {
                        api.delete_pod("kubenurse", &name);
                        api.delete_node(&node_name);
                    }
                    2 => {
                        generation[i] += 1;
                        let (name, node_name) = names(generation[i]);
                        api.upsert_node(node(&node_name));
                        api.upsert_pod(pod(&name, "kubenurse", &[("app", "kubenurse")], &node_name, &ip, "Running"));
                    }
                    _ => api.upsert_node(cordoned(node(&node_name))),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut warm = None;
    let final_text = loop {
        let (n, text) = rounds().await;
        if warm.is_none() && n >= 1_000.0 {
            warm = Some((proc_stats(pid), series(&text)));
        }
        if n >= 10_000.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "10,000 rounds did not finish in 10 minutes (at {n})");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ((rss_warm, fds_warm), series_warm) = warm.expect("warm-up measured");
    let (rss_end, fds_end) = proc_stats(pid);
    let series_end = series(&final_text);
    churner.abort();
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("after 1,000 rounds: {rss_warm} KiB, {fds_warm} fds, {series_warm} series; after 10,000: {rss_end} KiB, {fds_end} fds, {series_end} series");
    assert!(rss_end <= rss_warm + 2048, "RSS grew from {rss_warm} KiB to {rss_end} KiB");
    assert!(fds_end <= fds_warm + 8, "open descriptors grew from {fds_warm} to {fds_end}");
    assert!(series_end > series_warm, "new node names were probed: {series_warm} → {series_end} series");
}
