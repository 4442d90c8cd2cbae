//! OTLP push: metrics over gRPC and HTTP/protobuf into in-process receivers, names that
//! survive the OTLP → Prometheus translation, and spans for slow or failed probes only.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::agent::{get, metric, start, wait_round};
use common::otlp::OtlpReceiver;
use common::targets::{refused_addr, Target};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, AggregationTemporality, Metric};

const WAIT: Duration = Duration::from_secs(20);

/// The one exception to "the push carries exactly the families of `/metrics`": the process
/// series (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...) come from the
/// `prometheus` crate's process collector on the `/metrics` registry, and no well-kept crate
/// provides them as OpenTelemetry instruments, so they are not pushed.
const SCRAPE_ONLY_PREFIX: &str = "process_";

fn any_addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn string_attrs(attrs: &[KeyValue]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            any_value::Value::IntValue(i) => Some((kv.key.clone(), i.to_string())),
            _ => None,
        })
        .collect()
}

/// Every metric of every export received so far, latest last.
fn metrics(receiver: &OtlpReceiver) -> Vec<Metric> {
    receiver
        .metrics()
        .into_iter()
        .flat_map(|r| r.resource_metrics)
        .flat_map(|rm| rm.scope_metrics)
        .flat_map(|sm| sm.metrics)
        .collect()
}

fn has_metric(receiver: &OtlpReceiver, name: &str) -> bool {
    metrics(receiver).iter().any(|m| m.name == name)
}

/// The Prometheus name the standard OTLP → Prometheus translation gives a metric
/// (OpenTelemetry's Prometheus compatibility specification, as collectors implement it).
fn prometheus_name(m: &Metric) -> String {
    let mut name: String =
        m.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == ':' { c } else { '_' }).collect();
    let unit = if m.unit.starts_with('{') { "" } else { m.unit.as_str() };
    let suffix = match unit {
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        "By" => Some("bytes"),
        "1" if matches!(m.data, Some(metric::Data::Gauge(_))) => Some("ratio"),
        "" | "1" => None,
        other => panic!("unit {other:?} has no rule in this test"),
    };
    if let Some(suffix) = suffix {
        if !name.ends_with(suffix) {
            name = format!("{name}_{suffix}");
        }
    }
    if let Some(metric::Data::Sum(sum)) = &m.data {
        if sum.is_monotonic && !name.ends_with("_total") {
            name.push_str("_total");
        }
    }
    name
}

/// Series families of a push: Prometheus name → the label sets of its points, and the
/// histogram bounds.
fn families(ms: &[Metric]) -> BTreeMap<String, (BTreeSet<Vec<String>>, Vec<f64>)> {
    let mut out: BTreeMap<String, (BTreeSet<Vec<String>>, Vec<f64>)> = BTreeMap::new();
    for m in ms {
        let entry = out.entry(prometheus_name(m)).or_default();
        let mut keys = |attrs: &[KeyValue]| {
            let mut k: Vec<String> = attrs.iter().map(|a| a.key.clone()).collect();
            k.sort();
            entry.0.insert(k);
        };
        match m.data.as_ref().expect("data") {
            metric::Data::Histogram(h) => {
                for p in &h.data_points {
                    keys(&p.attributes);
                    entry.1 = p.explicit_bounds.clone();
                }
            }
            metric::Data::Sum(s) => s.data_points.iter().for_each(|p| keys(&p.attributes)),
            metric::Data::Gauge(g) => g.data_points.iter().for_each(|p| keys(&p.attributes)),
            other => panic!("unexpected data {other:?}"),
        }
    }
    out
}

/// The same view of a `/metrics` scrape.
fn scraped_families(text: &str) -> BTreeMap<String, (BTreeSet<Vec<String>>, Vec<f64>)> {
    let mut types = BTreeMap::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = line.split(' ');
        types.insert(parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned());
    }
    let mut out: BTreeMap<String, (BTreeSet<Vec<String>>, Vec<f64>)> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, _) = line.rsplit_once(' ').expect("value");
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name)
            .to_owned();
        let mut keys = Vec::new();
        let mut le = None;
        for pair in labels.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect("label");
            if k == "le" {
                le = Some(v.trim_matches('"').to_owned());
            } else {
                keys.push(k.to_owned());
            }
        }
        keys.sort();
        let entry = out.entry(family).or_default();
        entry.0.insert(keys);
        if let Some(le) = le.filter(|l| l != "+Inf") {
            let bound: f64 = le.parse().expect("le");
            if !entry.1.contains(&bound) {
                entry.1.push(bound);
            }
        }
    }
    out
}

#[tokio::test]
async fn grpc_push_carries_names_units_labels_buckets_and_resource() {
    let receiver = OtlpReceiver::grpc(any_addr()).await;
    let target = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=200ms".into(),
        "--pod-name=kubenurse-abc12".into(),
        "--node-name=node-7".into(),
        "--namespace=kube-system".into(),
        format!("--extra-checks=ok:{}|bad:{}", target.url("/ok"), target.url("/status/500")),
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otlp-protocol=grpc".into(),
        "--otlp-compression=gzip".into(),
        "--otlp-headers=authorization=Bearer%20s3cret,x-scope-orgid=platform".into(),
        "--otlp-metric-export-interval=300".into(),
        "--otel-resource-attributes=k8s.cluster.name=prod-eu,deployment.environment=prod".into(),
        // Two neighbours in another zone, one answering and one refusing: the zone series.
        format!("--neighbours=node-b@zone-b={},node-c@zone-b=127.0.0.1:1", target.addr),
        "--zone=zone-a".into(),
    ])
    .await;
    receiver
        .wait_for("pushed error counts", WAIT, |r| {
            has_metric(r, "kubenurse_errors") && has_metric(r, "kubenurse_httpclient_requests")
        })
        .await;

    // Resource: the agent's identity plus OTEL_RESOURCE_ATTRIBUTES.
    let request = receiver.metrics().pop().expect("a request");
    let resource = string_attrs(&request.resource_metrics[0].resource.as_ref().expect("resource").attributes);
    for (k, v) in [
        ("service.name", "kubenurse"),
        ("service.version", env!("CARGO_PKG_VERSION")),
        ("service.instance.id", "kubenurse-abc12"),
        ("k8s.pod.name", "kubenurse-abc12"),
        ("k8s.node.name", "node-7"),
        ("k8s.namespace.name", "kube-system"),
        ("k8s.cluster.name", "prod-eu"),
        ("deployment.environment", "prod"),
        ("cloud.availability_zone", "zone-a"),
    ] {
        assert_eq!(resource.get(k).map(String::as_str), Some(v), "resource {k}: {resource:?}");
    }
    // The SDK's own attributes, and the instrumentation scope with its version.
    assert_eq!(resource.get("telemetry.sdk.language").map(String::as_str), Some("rust"), "{resource:?}");
    assert_eq!(resource.get("telemetry.sdk.name").map(String::as_str), Some("opentelemetry"), "{resource:?}");
    assert!(resource.contains_key("telemetry.sdk.version"), "{resource:?}");
    let scope = request.resource_metrics[0].scope_metrics[0].scope.as_ref().expect("scope");
    assert_eq!((scope.name.as_str(), scope.version.as_str()), ("kubenurse", env!("CARGO_PKG_VERSION")));
    // Transport: gzip and the configured headers on every export.
    let arrivals = receiver.arrivals();
    assert!(arrivals.iter().all(|a| a.compressed), "not gzip-compressed");
    assert!(arrivals.iter().all(|a| a.headers.get("authorization").map(String::as_str) == Some("Bearer s3cret")));
    assert!(arrivals.iter().all(|a| a.headers.get("x-scope-orgid").map(String::as_str) == Some("platform")));

    // Instruments: units, kinds, temporality, bounds, attributes.
    let ms = metrics(&receiver);
    let find = |name: &str| ms.iter().rev().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} pushed"));
    let duration = find("kubenurse_httpclient_request_duration");
    assert_eq!(duration.unit, "s");
    let Some(metric::Data::Histogram(h)) = &duration.data else { panic!("histogram") };
    assert_eq!(h.aggregation_temporality, AggregationTemporality::Cumulative as i32);
    assert_eq!(h.data_points[0].explicit_bounds, [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
    let errors = find("kubenurse_errors");
    let Some(metric::Data::Sum(sum)) = &errors.data else { panic!("sum") };
    assert!(sum.is_monotonic);
    let points: Vec<BTreeMap<String, String>> = sum.data_points.iter().map(|p| string_attrs(&p.attributes)).collect();
    assert!(
        points.contains(&BTreeMap::from([("type".into(), "bad".into()), ("event".into(), "status_code_500".into())]))
    );
    let Some(metric::Data::Gauge(_)) = &find("kubenurse_neighbourhood_incoming_checks").data else { panic!("gauge") };

    // After the standard translation, the push has exactly the names, labels and bounds of /metrics.
    wait_round(&agent, 2).await;
    let (_, text) = get(agent.local_addr, "/metrics").await;
    let latest = receiver.metrics().pop().expect("latest");
    let latest: Vec<Metric> =
        latest.resource_metrics.into_iter().flat_map(|r| r.scope_metrics).flat_map(|s| s.metrics).collect();
    let mut scraped = scraped_families(&text);
    let process_only: Vec<String> = scraped.keys().filter(|f| f.starts_with(SCRAPE_ONLY_PREFIX)).cloned().collect();
    assert!(process_only.len() >= 6, "/metrics has the process series: {process_only:?}");
    scraped.retain(|family, _| !family.starts_with(SCRAPE_ONLY_PREFIX));
    assert_eq!(families(&latest), scraped);
    for name in [
        "kubenurse_httpclient_request_duration_seconds",
        "kubenurse_httpclient_trace_request_duration_seconds",
        "kubenurse_httpclient_requests_total",
        "kubenurse_errors_total",
        "kubenurse_neighbourhood_incoming_checks",
        "kubenurse_metric_overflow_total",
        "kubenurse_zone_request_duration_seconds",
        "kubenurse_zone_requests_total",
        "kubenurse_zone_errors_total",
        "kubenurse_build_info",
    ] {
        assert!(families(&latest).contains_key(name), "{name} after translation");
    }
    let zones = vec!["source_zone".to_owned(), "target_zone".to_owned()];
    assert!(families(&latest)["kubenurse_zone_errors_total"].0.contains(&zones), "{:?}", families(&latest));
    let errors = [("source_zone", "zone-a"), ("target_zone", "zone-b")];
    assert!(metric(&text, "kubenurse_zone_errors_total", &errors).is_some_and(|n| n >= 1.0), "{text}");
    agent.stop().await;
}

#[tokio::test]
async fn http_push_with_delta_temporality() {
    let receiver = OtlpReceiver::http(any_addr()).await;
    let target = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=200ms".into(),
        format!("--extra-checks=ok:{}", target.url("/ok")),
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otlp-protocol=http/protobuf".into(),
        "--otlp-compression=gzip".into(),
        "--otlp-metrics-headers=x-tenant=sre".into(),
        "--otlp-metric-export-interval=300".into(),
        "--otlp-temporality=delta".into(),
        "--otel-service-name=nurse-eu".into(),
    ])
    .await;
    receiver.wait_for("pushed requests", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    let arrival = receiver.arrivals().pop().expect("arrival");
    assert!(arrival.compressed);
    assert_eq!(arrival.headers.get("x-tenant").map(String::as_str), Some("sre"));
    assert_eq!(arrival.headers.get("content-type").map(String::as_str), Some("application/x-protobuf"));
    let ms = metrics(&receiver);
    let requests = ms.iter().find(|m| m.name == "kubenurse_httpclient_requests").expect("requests");
    let Some(metric::Data::Sum(sum)) = &requests.data else { panic!("sum") };
    assert_eq!(sum.aggregation_temporality, AggregationTemporality::Delta as i32);
    let request = receiver.metrics().pop().expect("request");
    let resource = string_attrs(&request.resource_metrics[0].resource.as_ref().expect("resource").attributes);
    assert_eq!(resource["service.name"], "nurse-eu", "OTEL_SERVICE_NAME wins");
    agent.stop().await;
}

#[tokio::test]
async fn exponential_histograms_go_to_otlp_while_metrics_keep_buckets() {
    let receiver = OtlpReceiver::grpc(any_addr()).await;
    let target = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=200ms".into(),
        format!("--extra-checks=ok:{}", target.url("/ok")),
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otlp-protocol=grpc".into(),
        "--otlp-metric-export-interval=300".into(),
        "--otlp-histogram=exponential".into(),
    ])
    .await;
    receiver.wait_for("a pushed duration", WAIT, |r| has_metric(r, "kubenurse_httpclient_request_duration")).await;
    let ms = metrics(&receiver);
    let duration = ms.iter().find(|m| m.name == "kubenurse_httpclient_request_duration").expect("duration");
    assert!(matches!(duration.data, Some(metric::Data::ExponentialHistogram(_))), "{:?}", duration.data);
    let (_, text) = get(agent.local_addr, "/metrics").await;
    assert!(text.contains("kubenurse_httpclient_request_duration_seconds_bucket{type=\"ok\",le=\"0.005\"}"));
    agent.stop().await;
}

#[tokio::test]
async fn slow_and_failed_probes_become_spans_and_fast_ones_do_not() {
    let receiver = OtlpReceiver::http(any_addr()).await;
    let target = Target::http("127.0.0.1").await;
    let refused = refused_addr("127.0.0.1").await;
    let gone = refused_addr("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=300ms".into(),
        "--slow-threshold=150ms".into(),
        format!("--neighbours=node-gone@zone-b={gone}"),
        "--zone=zone-a".into(),
        format!(
            "--extra-checks=fast:{}|slow:http://localhost:{}/delay/400|refused:http://{refused}/ok",
            target.url("/ok"),
            target.addr.port()
        ),
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otel-metrics-exporter=none".into(),
    ])
    .await;
    let span_names = |r: &OtlpReceiver| -> Vec<String> {
        r.traces()
            .iter()
            .flat_map(|t| &t.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .map(|s| s.name.clone())
            .collect()
    };
    receiver
        .wait_for("slow and refused spans", WAIT, |r| {
            let names = span_names(r);
            names.contains(&"probe slow".to_owned())
                && names.contains(&"probe refused".to_owned())
                && names.contains(&"probe path".to_owned())
        })
        .await;
    wait_round(&agent, 5).await;
    assert!(!span_names(&receiver).contains(&"probe fast".to_owned()), "a fast healthy probe made a span");
    assert!(receiver.metrics().is_empty(), "OTEL_METRICS_EXPORTER=none");

    let traces = receiver.traces();
    let resource = string_attrs(&traces[0].resource_spans[0].resource.as_ref().expect("resource").attributes);
    assert_eq!(resource["service.name"], "kubenurse");
    let spans: Vec<_> =
        traces.iter().flat_map(|t| &t.resource_spans).flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans).collect();

    let slow = spans.iter().find(|s| s.name == "probe slow").expect("slow span");
    let attrs = string_attrs(&slow.attributes);
    assert_eq!(attrs["kubenurse.probe.type"], "slow");
    assert_eq!(attrs["server.address"], "localhost");
    assert_eq!(attrs["http.response.status_code"], "200");
    let events: Vec<&str> = slow.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        events,
        ["dns_start", "dns_done", "connect_start", "connect_done", "got_conn", "wrote_request", "got_first_resp_byte"]
    );
    // The span runs on the probe's own instants: events inside it, the wait for the first byte ≥ 400 ms.
    assert!(slow
        .events
        .iter()
        .all(|e| e.time_unix_nano >= slow.start_time_unix_nano && e.time_unix_nano <= slow.end_time_unix_nano));
    // The server's delay shows as the longest wait: between wrote_request and the first byte.
    let gaps: Vec<u64> = slow.events.windows(2).map(|w| w[1].time_unix_nano - w[0].time_unix_nano).collect();
    let longest = gaps.iter().enumerate().max_by_key(|(_, g)| **g).map(|(i, _)| i).expect("gaps");
    assert_eq!(slow.events[longest + 1].name, "got_first_resp_byte", "{gaps:?}");

    let refused = spans.iter().find(|s| s.name == "probe refused").expect("refused span");
    let attrs = string_attrs(&refused.attributes);
    assert_eq!(attrs["kubenurse.failed_phase"], "connect_done");
    let status = refused.status.as_ref().expect("status");
    assert_eq!(status.code, 2, "error status");
    assert!(status.message.contains("connect"), "{}", status.message);
    let events: Vec<&str> = refused.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(events, ["connect_start"]);

    // Neighbour spans share one name; the node is an attribute.
    let path = spans.iter().find(|s| s.name == "probe path").expect("neighbour span");
    let attrs = string_attrs(&path.attributes);
    assert_eq!(attrs["kubenurse.peer.node"], "node-gone");
    assert_eq!(attrs["kubenurse.probe.type"], "path_node-gone");
    assert_eq!(attrs["kubenurse.source.zone"], "zone-a");
    assert_eq!(attrs["kubenurse.peer.zone"], "zone-b");
    assert_eq!(resource["cloud.availability_zone"], "zone-a");
    assert!(span_names(&receiver).iter().all(|n| !n.contains("node-gone")), "a node in a span name");

    // Five rounds of the same failure: one span per target, not one per round.
    agent.stop().await;
    let names = span_names(&receiver);
    for name in ["probe refused", "probe path"] {
        assert_eq!(names.iter().filter(|n| *n == name).count(), 1, "{name}: {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejecting_or_slow_collector_does_not_touch_probing_and_export_resumes() {
    let receiver = OtlpReceiver::http(any_addr()).await;
    let target = Target::http("127.0.0.1").await;
    receiver.set_rejecting(true);
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=100ms".into(),
        format!("--extra-checks=ok:{}", target.url("/ok")),
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otlp-metric-export-interval=100".into(),
        "--otlp-timeout=200".into(),
    ])
    .await;
    wait_round(&agent, 10).await;
    assert!(receiver.metrics().is_empty(), "the receiver rejected everything");
    assert_eq!(get(agent.local_addr, "/metrics").await.0, 200);

    // Slow: the receiver holds every export far beyond its 200 ms deadline; rounds go on
    // while not one export is answered.
    receiver.set_rejecting(false);
    receiver.set_delay(Duration::from_secs(30));
    let received = receiver.received();
    let round = agent.reports().borrow().as_ref().map_or(0, |r| r.number);
    wait_round(&agent, round + 10).await;
    assert!(receiver.received() > received, "exports kept being attempted");
    assert!(receiver.metrics().is_empty(), "no export was answered meanwhile");
    let report = agent.reports().borrow().clone().expect("report");
    assert!(report.results.iter().all(|r| r.is_ok()));

    receiver.set_delay(Duration::ZERO);
    receiver.wait_for("export resumes", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    agent.stop().await;
}

/// A neighbour that leaves (its pod and node deleted) takes its series with it, from
/// `/metrics` and from the push, once the series reset interval has passed; a neighbour that
/// is still selected but dead keeps its series, and so do the fixed probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_neighbours_leave_metrics_and_push_while_dead_ones_stay() {
    use common::agent::{probe_types, probed_nodes, pushed_types, wait_metrics, wait_report};
    use common::fake_apiserver::{node, pod, FakeApiServer};
    let receiver = OtlpReceiver::grpc(any_addr()).await;
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    let gone = Target::http("127.0.0.62").await;
    let port = gone.addr.port();
    let labels = &[("app", "kubenurse")];
    for (name, ip) in [("self", "127.0.0.60"), ("gone", "127.0.0.62"), ("dead", "127.0.0.63")] {
        api.upsert_node(node(&format!("node-{name}")));
        api.upsert_pod(pod(&format!("kubenurse-{name}"), "kubenurse", labels, &format!("node-{name}"), ip, "Running"));
    }
    let mut args = vec![
        "--listen-addr=127.0.0.60:0".to_owned(),
        "--check-interval=200ms".into(),
        "--check-timeout=2s".into(),
        "--pod-name=kubenurse-self".into(),
        "--node-name=node-self".into(),
        format!("--neighbour-port={port}"),
        "--discovery-jitter=0s".into(),
        "--series-reset-interval=1s".into(),
        format!("--extra-checks=fixed:{}", gone.url("/ok")),
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otlp-protocol=grpc".into(),
        "--otlp-metric-export-interval=300".into(),
    ];
    args.extend(api.agent_args(dir.path()));
    let agent = start(&args).await;
    wait_report(&agent, "both neighbours probed, the dead one failing", |r| {
        probed_nodes(r) == ["node-dead", "node-gone"]
            && r.results.iter().any(|p| p.target.kind == "path_node-gone" && p.is_ok())
    })
    .await;
    let both = |types: &BTreeSet<String>| types.contains("path_node-gone") && types.contains("path_node-dead");
    wait_metrics(agent.local_addr, "both neighbours have series", |t| both(&probe_types(t))).await;
    receiver.wait_for("both neighbours pushed", WAIT, |r| r.metrics().iter().any(|m| both(&pushed_types(m)))).await;

    api.delete_pod("kubenurse", "kubenurse-gone");
    api.delete_node("node-gone");
    wait_report(&agent, "node-gone no longer probed", |r| probed_nodes(r) == ["node-dead"]).await;
    let text = wait_metrics(agent.local_addr, "node-gone's series are gone", |t| {
        !probe_types(t).contains("path_node-gone") && probe_types(t).contains("path_node-dead")
    })
    .await;
    assert!(probe_types(&text).is_superset(&["api_server_direct", "api_server_dns", "fixed"].map(String::from).into()));
    assert!(
        common::agent::metric(
            &text,
            "kubenurse_errors_total",
            &[("type", "path_node-dead"), ("event", "connect_done")]
        )
        .is_some(),
        "the dead neighbour's failures stay: {text}"
    );

    // The push follows: once an export without node-gone arrived, later ones stay without it
    // (the replaced provider pushed its last interval when it was shut down).
    let without_gone = |types: &BTreeSet<String>| !types.contains("path_node-gone") && types.contains("path_node-dead");
    receiver
        .wait_for("an export without node-gone", WAIT, |r| {
            r.metrics().last().is_some_and(|m| without_gone(&pushed_types(m)))
        })
        .await;
    let seen = receiver.metrics().len();
    receiver.wait_for("three more exports", WAIT, |r| r.metrics().len() >= seen + 3).await;
    let latest = receiver.metrics().pop().expect("an export");
    assert!(without_gone(&pushed_types(&latest)), "{:?}", pushed_types(&latest));
    agent.stop().await;
}
