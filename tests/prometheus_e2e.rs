//! The shipped rules and dashboard against a live Prometheus. Four agent processes on
//! 127.0.0.61–64 probe each other as static neighbours in two zones; a real `prometheus` server
//! (Debian package `prometheus`, the one that provides `promtool`) scrapes them every second and
//! evaluates `deploy/prometheus/kubenurse-rules.yaml` with its `for:` durations and range windows
//! shortened. One agent is stopped with SIGSTOP: the kernel still accepts connections into its
//! listen queue, but nothing answers. The destination alert must fire for exactly that node, the
//! source alert for nobody, the zone-pair alert not at all (the stopped node's own zone fails as
//! much as the pair). Then every query of the Grafana dashboard, its variables substituted, must
//! return data from that Prometheus. Everything listens and connects on loopback only.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::get;
use common::process::free_port;
use serde_json::Value;

const NODES: usize = 4;
/// The node whose agent is stopped.
const STOPPED: usize = 3;
/// Range windows of the rules become this, `for:` durations become [`FOR`].
const WINDOW: &str = "15s";
const FOR: &str = "3s";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ip(i: usize) -> String {
    format!("127.0.0.{}", 61 + i)
}

fn zone(i: usize) -> &'static str {
    if i < NODES / 2 {
        "zone-a"
    } else {
        "zone-b"
    }
}

/// The child processes of the test: stopped ones are continued, then all are killed and
/// reaped, also when an assertion fails.
#[derive(Default)]
struct Processes {
    children: Vec<Child>,
    stopped: Vec<u32>,
}

impl Processes {
    fn signal(pid: u32, signal: &str) {
        let status = Command::new("kill").args([format!("-{signal}"), pid.to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    fn stop(&mut self, pid: u32) {
        Self::signal(pid, "STOP");
        self.stopped.push(pid);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for pid in self.stopped.drain(..) {
            let _ = Command::new("kill").args(["-CONT".to_owned(), pid.to_string()]).status();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port free on every agent address (they all listen on the same port).
fn common_port() -> u16 {
    for _ in 0..20 {
        let port = free_port(&ip(0));
        if (1..NODES).all(|i| std::net::TcpListener::bind((ip(i).as_str(), port)).is_ok()) {
            return port;
        }
    }
    panic!("no port free on all of 127.0.0.61-64");
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).expect("log file")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The shipped rules with every `for:` set to [`FOR`] and every `[<n>m]` range to [`WINDOW`],
/// so the alerts fire within seconds. Counts the replacements, so a change in how the rules
/// are written cannot silently leave a 5-minute window in place.
fn shortened_rules(text: &str) -> (String, usize, usize) {
    let (mut fors, mut ranges) = (0, 0);
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("for: ") {
            assert!(rest.trim().ends_with('m'), "unexpected `for:` value in the rules: {line}");
            out.push_str(&line[..line.len() - trimmed.len()]);
            out.push_str("for: ");
            out.push_str(FOR);
            fors += 1;
        } else {
            let mut rest = line;
            while let Some(open) = rest.find('[') {
                out.push_str(&rest[..open]);
                let after = &rest[open + 1..];
                let digits = after.chars().take_while(char::is_ascii_digit).count();
                if digits > 0 && after[digits..].starts_with("m]") {
                    out.push('[');
                    out.push_str(WINDOW);
                    out.push(']');
                    rest = &after[digits + 2..];
                    ranges += 1;
                } else {
                    out.push('[');
                    rest = after;
                }
            }
            out.push_str(rest);
        }
        out.push('\n');
    }
    (out, fors, ranges)
}

fn prometheus_config(rules: &Path, port: u16) -> String {
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: kubenurse\n    static_configs:\n",
        rules.display()
    );
    for i in 0..NODES {
        config.push_str(&format!(
            "      - targets: ['{}:{port}']\n        labels: {{node: node-{i}, pod: kubenurse-{i}, namespace: kubenurse}}\n",
            ip(i)
        ));
    }
    config
}

/// Percent-encoding of a query parameter value (RFC 3986 unreserved characters kept).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    async fn api(&self, path: &str) -> Value {
        let (status, body) = get(self.addr, path).await;
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {status} {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}\nprometheus log:\n{}", tail(&self.log));
        v
    }

    /// The result vector of an instant query.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let v = self.api(&format!("/api/v1/query?query={}", encode(expr))).await;
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    async fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts").await["data"]["alerts"].as_array().cloned().unwrap_or_default()
    }
}

/// Label `label` of the alerts named `name` in state `state`.
fn alert_labels(alerts: &[Value], name: &str, state: &str, label: &str) -> BTreeSet<String> {
    alerts
        .iter()
        .filter(|a| a["labels"]["alertname"] == name && a["state"] == state)
        .map(|a| a["labels"][label].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Every query of the dashboard with its variables substituted (`.*` for the template
/// variables, short durations for Grafana's built-in ones): panel queries, and for each
/// `label_values(<selector>, <label>)` variable a query of that selector by that label.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, Option<String>)> {
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let substitute = |expr: &str| {
        let mut e = expr.replace("$__rate_interval", WINDOW).replace("$__interval", "1s").replace("$__range", "1m");
        for name in &variables {
            e = e.replace(&format!("${{{name}}}"), ".*").replace(&format!("${name}"), ".*");
        }
        assert!(!e.contains("$__"), "a Grafana variable this test does not know: {e}");
        e
    };
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().expect("panels").iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let title = panel["title"].as_str().unwrap_or("?");
            out.push((format!("panel {title:?} {}", target["refId"]), substitute(expr), None));
        }
    }
    for v in dashboard["templating"]["list"].as_array().expect("list") {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).expect("variable query");
        let inner = q.trim().strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')).expect("label_values");
        let (selector, label) = inner.rsplit_once(',').expect("label_values(<selector>, <label>)");
        let label = label.trim().to_owned();
        out.push((
            format!("variable {}", v["name"]),
            format!("count by ({label}) ({})", substitute(selector)),
            Some(label),
        ));
    }
    out.sort();
    out
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, log: &Path, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {limit:?}; last: {last}\nprometheus log:\n{}", tail(log))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_alert_fires_for_the_stopped_node_only_and_the_dashboard_has_data() {
    let version = Command::new("prometheus").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "this test runs a Prometheus server: install the Debian package `prometheus` \
         (apt-get install prometheus; scripts/test.sh does): {version:?}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut processes = Processes::default();

    // The mesh: every agent probes the three others, nodes 0-1 in zone-a, 2-3 in zone-b.
    let port = common_port();
    let neighbours = |me: usize| -> String {
        (0..NODES)
            .filter(|j| *j != me)
            .map(|j| format!("node-{j}@{}={}:{port}", zone(j), ip(j)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut agent_pids = Vec::new();
    for i in 0..NODES {
        let child = Command::new(env!("CARGO_BIN_EXE_kubenurse"))
            .env_clear()
            .envs([
                ("KUBENURSE_LISTEN_ADDR", format!("{}:{port}", ip(i))),
                ("KUBENURSE_NEIGHBOURS", neighbours(i)),
                ("KUBENURSE_ZONE", zone(i).to_owned()),
                ("KUBENURSE_POD_NAME", format!("kubenurse-{i}")),
                ("KUBENURSE_NODE_NAME", format!("node-{i}")),
                ("KUBENURSE_CHECK_INTERVAL", "1s".to_owned()),
                ("KUBENURSE_CHECK_TIMEOUT", "500ms".to_owned()),
                ("KUBENURSE_SHUTDOWN_DURATION", "0s".to_owned()),
                ("RUST_LOG", "warn".to_owned()),
            ])
            .stdout(Stdio::null())
            .stderr(log_file(dir.path(), &format!("agent-{i}.log")))
            .spawn()
            .expect("spawn agent");
        agent_pids.push(child.id());
        processes.children.push(child);
    }
    for i in 0..NODES {
        let addr: SocketAddr = format!("{}:{port}", ip(i)).parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() && get(addr, "/ready").await.0 == 200 {
                break;
            }
            let exited = processes.children[i].try_wait().expect("try_wait");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "agent {i} never became ready ({exited:?}):\n{}",
                tail(&dir.path().join(format!("agent-{i}.log")))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Prometheus with the shipped rules, shortened.
    let shipped = std::fs::read_to_string(repo().join("deploy/prometheus/kubenurse-rules.yaml")).expect("rules");
    let (rules, fors, ranges) = shortened_rules(&shipped);
    assert!(fors >= 10 && ranges >= 10, "rewrote {fors} `for:` and {ranges} ranges only");
    let rules_path = dir.path().join("rules.yaml");
    std::fs::write(&rules_path, rules).expect("write rules");
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, prometheus_config(&rules_path, port)).expect("write config");
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let log = dir.path().join("prometheus.log");
    processes.children.push(
        Command::new("prometheus")
            .env_clear()
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log_file(dir.path(), "prometheus.log"))
            .spawn()
            .expect("spawn prometheus"),
    );
    let prom = Prometheus { addr: prom_addr, log: log.clone() };
    wait_until("Prometheus ready", Duration::from_secs(60), &log, || async {
        if tokio::net::TcpStream::connect(prom_addr).await.is_err() {
            return Err("not listening".to_owned());
        }
        match get(prom_addr, "/-/ready").await {
            (200, _) => Ok(()),
            (status, body) => Err(format!("{status} {body}")),
        }
    })
    .await;

    // Steady state: all 12 pairs recorded, none failing; the four zone pairs recorded.
    wait_until("every pair probed without errors", Duration::from_secs(60), &log, || async {
        let ok = prom.query("kubenurse:neighbour_error_ratio:rate5m == 0").await.len();
        let zones = prom.query("kubenurse:zone_pair_requests:rate5m > 0").await.len();
        if ok == NODES * (NODES - 1) && zones == 4 {
            Ok(())
        } else {
            Err(format!("{ok} pairs at 0 errors, {zones} zone pairs"))
        }
    })
    .await;

    // Black-hole node-3: its listener stops answering.
    processes.stop(agent_pids[STOPPED]);
    let stopped = format!("node-{STOPPED}");
    wait_until("KubenurseNodeUnreachable firing for node-3", Duration::from_secs(90), &log, || async {
        let alerts = prom.alerts().await;
        let sources = alert_labels(&alerts, "KubenurseNodeCannotReachNeighbours", "firing", "node");
        assert!(sources.is_empty(), "the source alert fired for {sources:?}: {alerts:#?}");
        let targets = alert_labels(&alerts, "KubenurseNodeUnreachable", "firing", "target_node");
        if targets.contains(&stopped) {
            Ok(())
        } else {
            Err(format!("firing for {targets:?}"))
        }
    })
    .await;
    // A few evaluations later (longer than `for:`): still exactly that node, still no source
    // fault, and the zone pair is not blamed (zone-b fails as much inside as from zone-a).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let alerts = prom.alerts().await;
    let targets = alert_labels(&alerts, "KubenurseNodeUnreachable", "firing", "target_node");
    assert_eq!(targets, BTreeSet::from([stopped.clone()]), "{alerts:#?}");
    for name in ["KubenurseNodeCannotReachNeighbours", "KubenurseZonePairErrorsHigh"] {
        for state in ["firing", "pending"] {
            let labels = alert_labels(&alerts, name, state, "alertname");
            assert!(labels.is_empty(), "{name} is {state}: {alerts:#?}");
        }
    }
    let unreachable =
        alerts.iter().find(|a| a["labels"]["alertname"] == "KubenurseNodeUnreachable").expect("the destination alert");
    let description = unreachable["annotations"]["description"].as_str().unwrap_or("");
    assert!(description.starts_with("3 of the 3 agents that probe node node-3"), "{description}");

    // Every dashboard query returns data from this Prometheus.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/kubenurse-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries found in the dashboard", queries.len());
    let mut empty = Vec::new();
    for (what, expr, label) in &queries {
        let result = prom.query(expr).await;
        let has_label =
            |r: &Value| label.as_ref().is_none_or(|l| r["metric"][l].as_str().is_some_and(|v| !v.is_empty()));
        if result.is_empty() || !result.iter().all(has_label) {
            empty.push(format!("{what}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));
    drop(processes);
}
