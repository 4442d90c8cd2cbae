//! Series per agent, counted on a live `/metrics`, for both metric profiles: an in-cluster
//! agent (fake apiserver: `api_server_direct` and `api_server_dns` over HTTPS, `me_service`
//! by name over HTTP) probing neighbours that answer (`kubenurse demo` agents), once with the
//! default neighbour limit (10 of 10 neighbours) and once with no limit (49 neighbours).
//!
//! `cargo bench --bench series`; `cargo test --benches` smoke-tests it.

#[allow(dead_code)]
#[path = "../tests/common/fake_apiserver.rs"]
mod fake_apiserver;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fake_apiserver::{node, pod, FakeApiServer};
use support::*;

const LABELS: &[(&str, &str)] = &[("app.kubernetes.io/name", "kubenurse")];

fn main() {
    let cases: &[(u8, usize)] = if full_run() { &[(10, 10), (50, 0)] } else { &[(3, 10)] };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let api = runtime.block_on(FakeApiServer::start());
    let _guard = runtime.enter();
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    api.upsert_node(node("node-self"));
    api.upsert_pod(pod("kubenurse-self", "kubenurse", LABELS, "node-self", "127.0.0.100", "Running"));

    let service = service_on_localhost();
    println!("series: a live /metrics, every probe answering; lines that are not comments");
    for &(nodes, limit) in cases {
        let port = free_port("127.0.0.2");
        let demo = Running(Some(demo_neighbours(nodes, port)));
        for i in 0..nodes {
            let addr: SocketAddr = format!("127.0.0.{}:{port}", i + 2).parse().expect("addr");
            wait_ok(addr, "/alwayshappy", Duration::from_secs(20));
            let name = format!("node-{}", i + 1);
            api.upsert_node(node(&name));
            let ip = addr.ip().to_string();
            api.upsert_pod(pod(&format!("kubenurse-{}", i + 1), "kubenurse", LABELS, &name, &ip, "Running"));
        }
        let probed = if limit == 0 { nodes as usize } else { limit.min(nodes as usize) };
        for detail in ["full", "lean"] {
            let (total, by_kind) = count(&api, dir.path(), port, service, limit, detail, probed);
            let neighbour = by_kind.iter().filter(|(k, _)| k.starts_with("path_")).map(|(_, n)| *n).max().unwrap_or(0);
            let fixed: usize = by_kind.iter().filter(|(k, _)| !k.starts_with("path_")).map(|(_, n)| n).sum();
            let limit_text = if limit == 0 { "no limit".to_owned() } else { format!("limit {limit}") };
            println!(
                "  {detail:4}, {limit_text}, {probed} neighbours probed: {total} series per agent \
                 ({neighbour} per neighbour, {fixed} for the fixed probes {:?}, {} without a type)",
                by_kind.iter().filter(|(k, _)| !k.starts_with("path_")).collect::<BTreeMap<_, _>>(),
                total - fixed - by_kind.iter().filter(|(k, _)| k.starts_with("path_")).map(|(_, n)| n).sum::<usize>(),
            );
        }
        for i in 0..nodes {
            api.delete_pod("kubenurse", &format!("kubenurse-{}", i + 1));
            api.delete_node(&format!("node-{}", i + 1));
        }
        drop(demo);
    }
}

/// A stand-in for the agents' Service, reached by name (`localhost`) as a Service is: it
/// answers every request with 200. Returns its port.
fn service_on_localhost() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut head = [0u8; 4096];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = stream.read(&mut head);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    port
}

/// Runs one agent until every probe of a round answered; its series: total, and per type.
fn count(
    api: &FakeApiServer,
    sa_dir: &std::path::Path,
    port: u16,
    service: u16,
    limit: usize,
    detail: &str,
    probed: usize,
) -> (usize, BTreeMap<String, usize>) {
    let listen: SocketAddr = format!("127.0.0.100:{}", free_port("127.0.0.100")).parse().expect("addr");
    let child = Running(Some(agent(&[
        ("KUBENURSE_LISTEN_ADDR", listen.to_string()),
        ("KUBENURSE_CHECK_INTERVAL", "500ms".into()),
        ("KUBENURSE_DISCOVERY_JITTER", "0s".into()),
        ("KUBENURSE_POD_NAME", "kubenurse-self".into()),
        ("KUBENURSE_NODE_NAME", "node-self".into()),
        ("KUBENURSE_NEIGHBOUR_PORT", port.to_string()),
        ("KUBENURSE_NEIGHBOUR_LIMIT", limit.to_string()),
        ("KUBENURSE_METRICS_DETAIL", detail.into()),
        ("KUBENURSE_SERVICE_URL", format!("http://localhost:{service}")),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
        ("KUBERNETES_SERVICE_PORT", api.port().to_string()),
        ("KUBERNETES_SERVICE_DNS", "localhost".into()),
        ("KUBENURSE_SERVICE_ACCOUNT_DIR", sa_dir.display().to_string()),
    ])));
    wait_ok(listen, "/ready", Duration::from_secs(60));
    // Healthy: /alive answers 200 once every probe of a round was ok.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alive = http_get(listen, "/alive");
        let paths = alive.as_ref().map_or(0, |(_, body)| body.matches("\"path_").count());
        if alive.as_ref().is_some_and(|(status, _)| *status == 200) && paths >= probed {
            break;
        }
        assert!(Instant::now() < deadline, "no healthy round with {probed} neighbours: {alive:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, text) = http_get(listen, "/metrics").expect("metrics");
    drop(child);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let mut by_kind = BTreeMap::new();
    for l in &lines {
        if let Some(kind) = l.split("type=\"").nth(1).and_then(|r| r.split('"').next()) {
            *by_kind.entry(kind.to_owned()).or_default() += 1;
        }
    }
    (lines.len(), by_kind)
}

/// A child process, stopped when this is dropped: also when a check fails on the way.
struct Running(Option<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            stop(child);
        }
    }
}
