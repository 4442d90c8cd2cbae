//! Starting an agent in-process and reading what a user reads: `/metrics`, `/alive`, `/ready`.

use std::time::Duration;

use kubenurse::agent::Agent;
use kubenurse::config::Config;

/// Starts an agent from command-line style arguments (no environment involved). Unless the
/// test names its own DNS server, lookups go to a closed loopback port, so no test can send a
/// query to the machine's resolver (names in /etc/hosts, such as `localhost`, still resolve).
pub async fn start(args: &[String]) -> Agent {
    let mut args = args.to_vec();
    if !args.iter().any(|a| a.starts_with("--dns-servers")) {
        args.push("--dns-servers=127.0.0.1:1".into());
    }
    let config = Config::from_flags(args.iter().cloned()).unwrap_or_else(|e| panic!("test config {args:?}: {e}"));
    Agent::start(config).await.unwrap_or_else(|e| panic!("agent start: {e}"))
}

/// Waits (bounded) until the agent has finished round `n`.
pub async fn wait_round(agent: &Agent, n: u64) {
    let mut reports = agent.reports();
    tokio::time::timeout(Duration::from_secs(20), reports.wait_for(|r| r.as_ref().is_some_and(|r| r.number >= n)))
        .await
        .unwrap_or_else(|_| panic!("round {n} did not finish in time"))
        .expect("reports channel open");
}

/// GET `http://addr/path`: status and body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    get_with(addr, path, &[]).await
}

/// GET with extra headers, over a fresh plain connection.
pub async fn get_with(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Empty::<bytes::Bytes>::new()).expect("request");
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the series `name{labels}` in a Prometheus text exposition, matching the
/// label set exactly.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)),
            None => (series, Vec::new()),
        };
        let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        want.sort();
        (series_name == name && series_labels == want).then(|| value.parse().ok()).flatten()
    })
}

/// All series names in an exposition.
pub fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = s
        .split("\",")
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect();
    out.sort();
    out
}

/// Waits (bounded) for a round report that satisfies `check`; returns it.
pub async fn wait_report(
    agent: &Agent,
    what: &str,
    check: impl Fn(&kubenurse::scheduler::RoundReport) -> bool,
) -> std::sync::Arc<kubenurse::scheduler::RoundReport> {
    let mut reports = agent.reports();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(report) = reports.borrow_and_update().clone() {
                if check(&report) {
                    return report;
                }
            }
            reports.changed().await.expect("reports channel open");
        }
    })
    .await;
    match found {
        Ok(report) => report,
        Err(_) => panic!("no round report where {what}; last: {:#?}", summarize(agent)),
    }
}

/// The probe types of a report with their summaries, for failure messages and assertions.
pub fn results(report: &kubenurse::scheduler::RoundReport) -> std::collections::BTreeMap<String, String> {
    report.results.iter().map(|r| (r.target.kind.clone(), r.summary())).collect()
}

fn summarize(agent: &Agent) -> Option<(std::collections::BTreeMap<String, String>, String)> {
    agent.reports().borrow().as_ref().map(|r| (results(r), r.neighbourhood.state.clone()))
}

/// The `path_<node>` probe types of a report.
pub fn probed_nodes(report: &kubenurse::scheduler::RoundReport) -> Vec<String> {
    let mut nodes: Vec<String> =
        report.results.iter().filter_map(|r| r.target.kind.strip_prefix("path_").map(str::to_owned)).collect();
    nodes.sort();
    nodes
}

/// The `type` label values of an exposition's series: the probe types that have series.
pub fn probe_types(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("type=\"").nth(1)?.split('"').next().map(str::to_owned))
        .collect()
}

/// Reads `/metrics` until `check` holds (bounded, every 100 ms); returns that text.
pub async fn wait_metrics(addr: std::net::SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        let (_, text) = get(addr, "/metrics").await;
        if check(&text) {
            return text;
        }
        last = text;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no /metrics where {what} within 30 s; last:\n{last}");
}

/// The `type` attribute values of the points of one OTLP metrics export.
pub fn pushed_types(
    request: &opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
) -> std::collections::BTreeSet<String> {
    use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let type_of = |attrs: &[KeyValue]| {
        attrs.iter().find(|kv| kv.key == "type").and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
    };
    let metrics = request.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics);
    let mut out = std::collections::BTreeSet::new();
    for m in metrics {
        match m.data.as_ref() {
            Some(Data::Histogram(h)) => out.extend(h.data_points.iter().filter_map(|p| type_of(&p.attributes))),
            Some(Data::ExponentialHistogram(h)) => {
                out.extend(h.data_points.iter().filter_map(|p| type_of(&p.attributes)))
            }
            Some(Data::Sum(s)) => out.extend(s.data_points.iter().filter_map(|p| type_of(&p.attributes))),
            _ => {}
        }
    }
    out
}

/// Series the probe tests count, by their Prometheus names.
pub const REQUESTS: &str = "kubenurse_httpclient_requests_total";
pub const ERRORS: &str = "kubenurse_errors_total";
pub const TRACE: &str = "kubenurse_httpclient_trace_request_duration_seconds_count";
pub const DURATION: &str = "kubenurse_httpclient_request_duration_seconds_count";

/// An IP address literal of a test.
pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("ip")
}
