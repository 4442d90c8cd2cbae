//! A long run: 10,000 rounds at a 5 ms interval while neighbours come and go, each coming
//! back on a node with a new name, as nodes of an autoscaled cluster do. Memory and open file
//! descriptors must stay flat, and so must the series: with a 2 s series reset interval, the
//! series of departed nodes leave `/metrics` and the OTLP push instead of piling up.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::agent::{get, metric, probe_types, pushed_types};
use common::fake_apiserver::{cordoned, node, pod, FakeApiServer};
use common::otlp::OtlpReceiver;
use common::process::{free_port, open_fds, status_kib};
use common::targets::Target;

/// Anonymous resident memory (heap and stacks) and open descriptors. File-backed pages are
/// left out: the debug binary's code alone is over 20 MiB, and code first run late in the
/// run (an occasional path) pages in without anything leaking.
fn proc_stats(pid: u32) -> (u64, usize) {
    (status_kib(pid, "RssAnon"), open_fds(pid))
}

fn series(text: &str) -> usize {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
}

/// The most `path_*` types one generation may hold: the 3 neighbours probed at a time, plus
/// one more for each churn step (every 100 ms) within the 2 s reset interval and the round
/// that notices a departure, with room to spare. Without resets the count grows with every
/// new node name (hundreds over the run).
const MAX_PATH_TYPES: usize = 3 + 25;

fn path_types<'a>(types: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
    types.into_iter().filter(|t| t.starts_with("path_")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_rounds_with_churn_keep_memory_fds_and_series_flat() {
    let receiver = OtlpReceiver::grpc("127.0.0.1:0".parse().expect("addr")).await;
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
            ("KUBENURSE_DISCOVERY_JITTER", "0s"),
            ("KUBENURSE_SERIES_RESET_INTERVAL", "2s"),
            // As deploy/ runs the agent.
            ("MALLOC_ARENA_MAX", "2"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();

    // Rounds done, from the lateness histogram's count; it restarts with every series reset,
    // so the count is followed as Prometheus' increase() follows a counter.
    let mut counted = (0.0, 0.0);
    let mut rounds = |text: &str| {
        let n = metric(text, "kubenurse_round_lateness_seconds_count", &[]).unwrap_or(0.0);
        let (last, total) = counted;
        counted = (n, total + if n < last { n } else { n - last });
        counted.1
    };
    let scrape = || async {
        let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
        else {
            return String::new();
        };
        drop(stream);
        get(addr, "/metrics").await.1
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
    // (rounds, anonymous RSS KiB, descriptors, series) every half second.
    let mut samples: Vec<(f64, u64, usize, usize)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut most_path_types = 0;
    loop {
        let text = scrape().await;
        let n = rounds(&text);
        let types = probe_types(&text);
        most_path_types = most_path_types.max(path_types(&types).len());
        seen.extend(types);
        let (rss, fds) = proc_stats(pid);
        samples.push((n, rss, fds, series(&text)));
        if n >= 10_000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "10,000 rounds did not finish in 10 minutes (at {n})");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    churner.abort();
    let _ = child.kill();
    let _ = child.wait();
    // Memory moves by a megabyte or so while a replaced generation is shut down, and the heap
    // settles over the first half of the run (connection pools, the span pipeline, allocator
    // free lists: 1-3 MiB of anonymous memory, levelling off around round 6,000). A leak keeps
    // growing: the medians over rounds 5,000-7,500 and 7,500-10,000 show a trend after the
    // warm-up, and descriptors their peak.
    let window = |from: f64, to: f64| -> (u64, usize, usize) {
        let mut w: Vec<_> = samples.iter().filter(|s| s.0 >= from && s.0 < to).collect();
        assert!(!w.is_empty(), "no sample between rounds {from} and {to}");
        w.sort_by_key(|s| s.1);
        (w[w.len() / 2].1, w.iter().map(|s| s.2).max().unwrap_or(0), w.iter().map(|s| s.3).max().unwrap_or(0))
    };
    let (rss_warm, fds_warm, series_warm) = window(5_000.0, 7_500.0);
    let (rss_end, fds_end, series_end) = window(7_500.0, 10_001.0);
    let pushes = receiver.metrics();
    let most_pushed = pushes.iter().map(|p| path_types(&pushed_types(p)).len()).max().unwrap_or(0);
    let probed = path_types(&seen).len();
    eprintln!(
        "rounds 5,000-7,500: anonymous RSS median {rss_warm} KiB, at most {fds_warm} fds and {series_warm} series; rounds \
         7,500-10,000: median {rss_end} KiB, at most {fds_end} fds and {series_end} series; {probed} node names \
         probed, at most {most_path_types} at once on /metrics and {most_pushed} in one of {} pushes",
        pushes.len()
    );
    assert!(rss_end <= rss_warm + 1536, "anonymous RSS grew from {rss_warm} KiB to {rss_end} KiB");
    assert!(fds_end <= fds_warm + 8, "open descriptors grew from {fds_warm} to {fds_end}");
    assert!(probed > MAX_PATH_TYPES, "churn probed more node names than the bound: {probed}");
    assert!(most_path_types <= MAX_PATH_TYPES, "/metrics held {most_path_types} neighbours' series at once");
    assert!(!pushes.is_empty(), "metrics were pushed");
    assert!(most_pushed <= MAX_PATH_TYPES, "one push held {most_pushed} neighbours' series");
}
