//! The deployment artifacts (`deploy/`, `otel-collector/`) against each other and against the
//! agent: the collector configuration is complete and ordered, the agent's OTLP endpoint in the
//! DaemonSet reaches the collector's receiver, and the dashboard and the alerts query only
//! metric families a running agent exports. Schema validation of the manifests is
//! `scripts/validate-deploy.sh`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::agent::{get, get_with, start, wait_round};
use common::targets::Target;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file, as JSON values.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&read(path)).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn yaml_doc(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one YAML document", path.display());
    docs.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

fn keys(v: Option<&Value>) -> BTreeSet<String> {
    v.and_then(Value::as_object).map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().map(|s| s.as_str().expect("a list of strings").to_owned()).collect())
        .unwrap_or_default()
}

/// `memory_limiter/foo` → `memory_limiter`.
fn component_type(id: &str) -> &str {
    id.split('/').next().unwrap_or(id)
}

/// The port of a `host:port` listen address.
fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {endpoint}"))
}

/// `${env:NAME}` references in the string values of a configuration (not in its comments).
fn env_references(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => out.extend(
            s.split("${env:")
                .skip(1)
                .filter_map(|rest| rest.split_once('}'))
                .map(|(name, _)| name.split(":-").next().unwrap_or(name).to_owned()),
        ),
        Value::Array(items) => items.iter().for_each(|i| env_references(i, out)),
        Value::Object(map) => map.values().for_each(|i| env_references(i, out)),
        _ => {}
    }
}

struct Collector {
    env: BTreeSet<String>,
    otlp_grpc_port: u16,
    otlp_http_port: u16,
    metrics_exporters: Vec<String>,
}

/// The collector's merge of configuration files given as several `--config`: maps merge,
/// anything else (lists included) is replaced by the later file.
fn merge_config(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (k, v) in over {
                match base.get_mut(&k) {
                    Some(existing) => merge_config(existing, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// `otel-collector/config.yaml` with the files an overlay adds after it, merged.
fn collector_config_files(extra: &[&str]) -> Value {
    let mut config = yaml_doc(&repo().join("otel-collector/config.yaml"));
    for file in extra {
        merge_config(&mut config, yaml_doc(&repo().join(file)));
    }
    config
}

/// Checks `otel-collector/config.yaml` for consistency; returns the OTLP receiver ports.
fn collector_config() -> Collector {
    check_collector(&collector_config_files(&[]), &[])
}

/// Checks a collector configuration for consistency; components listed in `displaced` may be
/// defined without a pipeline using them (an overlay's file took their place).
fn check_collector(config: &Value, displaced: &[&str]) -> Collector {
    let service = config.get("service").expect("service section");

    let mut defined: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for section in ["receivers", "processors", "exporters", "extensions", "connectors"] {
        defined.insert(section, keys(config.get(section)));
    }
    let mut used: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();

    let extensions = strings(service.get("extensions"));
    for ext in &extensions {
        assert!(defined["extensions"].contains(ext), "service.extensions: {ext} is not defined under extensions");
    }
    used.entry("extensions").or_default().extend(extensions);

    let pipelines = service.get("pipelines").and_then(Value::as_object).expect("service.pipelines");
    let signals: BTreeSet<&str> = pipelines.keys().map(|k| component_type(k)).collect();
    assert!(
        signals.contains("metrics") && signals.contains("traces"),
        "the agents push metrics and traces: both need a pipeline, got {signals:?}"
    );
    for (name, pipeline) in pipelines {
        for section in ["receivers", "processors", "exporters"] {
            for id in strings(pipeline.get(section)) {
                // A connector is an exporter of one pipeline and a receiver of another.
                let known =
                    defined[section].contains(&id) || (section != "processors" && defined["connectors"].contains(&id));
                assert!(known, "pipeline {name}: {section} {id} is not defined");
                used.entry(section).or_default().insert(id);
            }
        }
        assert!(!strings(pipeline.get("receivers")).is_empty(), "pipeline {name}: no receiver");
        assert!(!strings(pipeline.get("exporters")).is_empty(), "pipeline {name}: no exporter");
        let processors = strings(pipeline.get("processors"));
        assert_eq!(
            processors.first().map(|p| component_type(p)),
            Some("memory_limiter"),
            "pipeline {name}: memory_limiter must come first, got {processors:?}"
        );
        assert_eq!(
            processors.last().map(|p| component_type(p)),
            Some("batch"),
            "pipeline {name}: batch must come last, got {processors:?}"
        );
    }
    for section in ["receivers", "processors", "exporters", "extensions"] {
        let unused: Vec<&String> = defined[section]
            .difference(used.entry(section).or_default())
            .filter(|id| !displaced.contains(&id.as_str()))
            .collect();
        assert!(unused.is_empty(), "{section} defined but used by no pipeline: {unused:?}");
    }
    let connectors_used = used.get("receivers").into_iter().chain(used.get("exporters")).flatten();
    let connectors_used: BTreeSet<&String> = connectors_used.filter(|id| defined["connectors"].contains(*id)).collect();
    assert_eq!(connectors_used.len(), defined["connectors"].len(), "every connector is used");

    // Prometheus-bound exporters keep the agents' identity (resource attributes → labels).
    for (name, pipeline) in pipelines.iter().filter(|(k, _)| component_type(k) == "metrics") {
        for id in strings(pipeline.get("exporters")) {
            if matches!(component_type(&id), "prometheus" | "prometheusremotewrite") {
                let conversion = config.pointer(&format!("/exporters/{id}/resource_to_telemetry_conversion/enabled"));
                assert_eq!(
                    conversion,
                    Some(&Value::Bool(true)),
                    "pipeline {name}: exporter {id} needs resource_to_telemetry_conversion.enabled"
                );
            }
        }
    }

    let otlp_grpc_port = port_of(str_at(config, "/receivers/otlp/protocols/grpc/endpoint"));
    let otlp_http_port = port_of(str_at(config, "/receivers/otlp/protocols/http/endpoint"));
    for pipeline in pipelines.values() {
        assert!(strings(pipeline.get("receivers")).iter().any(|r| r == "otlp"), "every pipeline receives OTLP");
    }
    let mut env = BTreeSet::new();
    env_references(config, &mut env);
    Collector { env, otlp_grpc_port, otlp_http_port, metrics_exporters: metrics_exporters(config) }
}

fn metrics_exporters(config: &Value) -> Vec<String> {
    strings(config.pointer("/service/pipelines/metrics/exporters"))
}

#[test]
fn collector_config_is_complete_and_ordered() {
    let collector = collector_config();
    assert_eq!((collector.otlp_grpc_port, collector.otlp_http_port), (4317, 4318));
    assert_eq!(
        collector.env,
        BTreeSet::from(["TRACES_BACKEND_ENDPOINT".to_owned()]),
        "config.yaml takes the traces backend from the environment, nothing else"
    );
    // One metrics path by default: Prometheus scrapes :8889, nothing is remote-written.
    assert_eq!(collector.metrics_exporters, ["prometheus"]);
    let port = port_of(str_at(&collector_config_files(&[]), "/exporters/prometheus/endpoint"));
    assert_eq!(port, 8889);
}

#[test]
fn the_remote_write_overlay_replaces_the_scrape_path() {
    let config = collector_config_files(&["deploy/overlays/remote-write/remote-write.yaml"]);
    let collector = check_collector(&config, &["prometheus"]);
    assert_eq!(collector.metrics_exporters, ["prometheusremotewrite"], "one path out: remote-write only");
    assert!(collector.env.contains("PROMETHEUS_REMOTE_WRITE_ENDPOINT"), "{:?}", collector.env);
    assert_eq!(strings(config.pointer("/service/pipelines/traces/exporters")), ["otlp"], "traces unchanged");
}

const CLUSTER_SCOPED: [&str; 4] = ["Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"];

/// The resources of a kustomization: its `resources` (files, or directories holding a
/// kustomization, followed recursively), with its `namespace` applied to namespaced kinds.
/// Enough of kustomize for the plain bases of this repository.
fn kustomize_resources(dir: &Path) -> Vec<Value> {
    let kustomization = yaml_doc(&dir.join("kustomization.yaml"));
    let mut out = Vec::new();
    for resource in strings(kustomization.get("resources")) {
        let path = dir.join(&resource);
        if path.is_dir() {
            out.extend(kustomize_resources(&path));
        } else {
            out.extend(yaml_docs(&path));
        }
    }
    if let Some(ns) = kustomization.get("namespace").and_then(Value::as_str) {
        for doc in &mut out {
            if !CLUSTER_SCOPED.contains(&str_at(doc, "/kind")) {
                doc["metadata"]["namespace"] = Value::String(ns.to_owned());
            }
        }
    }
    out
}

fn find<'a>(docs: &'a [Value], kind: &str, namespace: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind && d["metadata"]["name"] == name && d["metadata"]["namespace"].as_str() == Some(namespace)
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} in deploy/base"))
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)?.get("value")?.as_str()
}

/// `http://svc.ns.svc.cluster.local:port/...` → (scheme, service, namespace, port).
fn service_url(url: &str) -> (String, String, String, u16) {
    let (scheme, rest) = url.split_once("://").unwrap_or_else(|| panic!("{url}: no scheme"));
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').unwrap_or_else(|| panic!("{url}: no explicit port"));
    let labels: Vec<&str> = host.split('.').collect();
    assert!(
        labels.len() >= 2 && (labels.len() == 2 || labels[2] == "svc"),
        "{url}: not a <service>.<namespace>[.svc[.cluster.local]] name"
    );
    (scheme.to_owned(), labels[0].to_owned(), labels[1].to_owned(), port.parse().expect("numeric port"))
}

/// The container port a Service port leads to, in the workload the Service selects.
fn service_target(docs: &[Value], service: &Value, port: u16) -> (u16, &'static str) {
    let ns = str_at(service, "/metadata/namespace");
    let svc_port = service["spec"]["ports"]
        .as_array()
        .expect("service ports")
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .unwrap_or_else(|| panic!("service {} exposes no port {port}", service["metadata"]["name"]));
    let selector = service["spec"]["selector"].as_object().expect("service selector");
    let selected: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
        .filter(|d| d["metadata"]["namespace"].as_str() == Some(ns))
        .filter(|d| selector.iter().all(|(k, v)| &d["spec"]["template"]["metadata"]["labels"][k] == v))
        .collect();
    assert_eq!(selected.len(), 1, "service {} selects exactly one workload", service["metadata"]["name"]);
    let target = svc_port.get("targetPort").unwrap_or(&svc_port["port"]);
    for container in selected[0]["spec"]["template"]["spec"]["containers"].as_array().expect("containers") {
        for p in container["ports"].as_array().into_iter().flatten() {
            if &p["name"] == target || p["containerPort"] == *target {
                let kind = if selected[0]["kind"] == "DaemonSet" { "DaemonSet" } else { "Deployment" };
                return (p["containerPort"].as_u64().expect("containerPort") as u16, kind);
            }
        }
    }
    panic!("service {}: targetPort {target} is no container port of the selected workload", service["metadata"]["name"])
}

#[test]
fn agent_pushes_to_the_collector_service_receiver() {
    let collector = collector_config();
    let docs = kustomize_resources(&repo().join("deploy/base"));
    let agent = find(&docs, "DaemonSet", "kubenurse", "kubenurse");
    let container = agent["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "kubenurse"))
        .expect("kubenurse container");

    // OTLP: the agent's default protocol is http/protobuf, so the port must be the HTTP receiver's.
    let endpoint = env_value(container, "OTEL_EXPORTER_OTLP_ENDPOINT").expect("OTEL_EXPORTER_OTLP_ENDPOINT is set");
    let protocol = env_value(container, "OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or("http/protobuf");
    let (scheme, name, namespace, port) = service_url(endpoint);
    assert_eq!(scheme, "http", "the bundled collector's receivers have no TLS");
    let service = find(&docs, "Service", &namespace, &name);
    let (container_port, kind) = service_target(&docs, service, port);
    assert_eq!(kind, "Deployment", "{endpoint} leads to the collector Deployment");
    let receiver_port = if protocol == "grpc" { collector.otlp_grpc_port } else { collector.otlp_http_port };
    assert_eq!(
        container_port, receiver_port,
        "{endpoint} ({protocol}) reaches container port {container_port}, the collector's {protocol} receiver listens on {receiver_port}"
    );

    // The collector Service targets both OTLP receivers.
    for receiver_port in [collector.otlp_grpc_port, collector.otlp_http_port] {
        let exposed = service["spec"]["ports"].as_array().expect("ports").iter().any(|p| {
            let port = p["port"].as_u64().expect("port") as u16;
            service_target(&docs, service, port).0 == receiver_port
        });
        assert!(exposed, "service {name} exposes no port leading to the receiver on {receiver_port}");
    }

    // The collector Deployment: the configuration it is started with is otel-collector/config.yaml,
    // and every ${env:VAR} of that file is set.
    let deployment = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && service["spec"]["selector"]
                    .as_object()
                    .expect("selector")
                    .iter()
                    .all(|(k, v)| &d["spec"]["template"]["metadata"]["labels"][k] == v)
        })
        .expect("collector deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let collector_container = &pod["containers"][0];
    let args = strings(collector_container.get("args"));
    let config_arg = args.iter().find_map(|a| a.strip_prefix("--config=")).expect("--config=<file> argument");
    let mount = collector_container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| config_arg.starts_with(&format!("{}/", str_at(m, "/mountPath").trim_end_matches('/'))))
        .unwrap_or_else(|| panic!("{config_arg} is on no volume mount"));
    let file = config_arg.rsplit('/').next().expect("file name");
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("mounted volume");
    let config_map = str_at(volume, "/configMap/name");
    let kustomization = yaml_doc(&repo().join("otel-collector/kustomization.yaml"));
    let generator = kustomization["configMapGenerator"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == config_map))
        .unwrap_or_else(|| panic!("config map {config_map} is not generated by otel-collector/kustomization.yaml"));
    assert!(
        strings(generator.get("files")).iter().any(|f| f == "config.yaml" && file == "config.yaml"),
        "config map {config_map} carries config.yaml, read as {config_arg}"
    );
    for var in &collector.env {
        let set = collector_container["env"].as_array().into_iter().flatten().any(|e| e["name"] == **var);
        assert!(set, "config.yaml reads ${{env:{var}}}, which the collector Deployment does not set");
    }

    // me_service: the agent's own Service leads back to the agent's listener.
    let service_url_value = env_value(container, "KUBENURSE_SERVICE_URL").expect("KUBENURSE_SERVICE_URL");
    let (_, name, namespace, port) = service_url(service_url_value);
    let (agent_port, kind) = service_target(&docs, find(&docs, "Service", &namespace, &name), port);
    assert_eq!((agent_port, kind), (8080, "DaemonSet"), "{service_url_value} reaches the agents' port 8080");
}

/// `kubenurse_*` tokens of a query, with the histogram series suffixes removed.
fn kubenurse_metrics(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("kubenurse_") {
        let boundary = rest[..at].chars().next_back().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let token: String =
            rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
        rest = &rest[at + token.len()..];
        if boundary {
            out.insert(token);
        }
    }
    out
}

fn family(series: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|s| series.strip_suffix(s)).unwrap_or(series)
}

/// Every `expr` (and variable query) of a Grafana dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains("kubenurse_") => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    // An agent with one passing and one failing check, and one answering and one failing
    // neighbour in zones, so every family (the zone ones too) has samples.
    let target = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        format!("--extra-checks=ok:{}|fail:{}", target.url("/ok"), target.url("/status/500")),
        "--zone=zone-a".into(),
        format!("--neighbours=node-b@zone-b={},node-c@zone-b=127.0.0.1:1", target.addr),
    ])
    .await;
    wait_round(&agent, 1).await;
    let origin = [("KUBENURSE-NEIGHBOUR-ORIGIN", "kubenurse-neighbour")];
    assert_eq!(get_with(agent.local_addr, "/alwayshappy", &origin).await.0, 200);
    let (status, scrape) = get(agent.local_addr, "/metrics").await;
    assert_eq!(status, 200);
    agent.stop().await;

    // Families and kinds from the `# TYPE` lines.
    let families: BTreeMap<String, String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with("kubenurse_"))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect();
    assert!(families.len() >= 6, "the scrape has the kubenurse families: {families:?}\n{scrape}");

    let check = |what: &str, exprs: &[String]| -> BTreeSet<String> {
        assert!(!exprs.is_empty(), "{what}: no queries found");
        let mut used = BTreeSet::new();
        for expr in exprs {
            for series in kubenurse_metrics(expr) {
                let name = family(&series);
                let kind = families.get(name).unwrap_or_else(|| {
                    panic!("{what}: `{series}` in `{expr}` is not exported by the agent (families: {families:?})")
                });
                if series != name {
                    assert_eq!(kind, "histogram", "{what}: `{series}` on a {kind}");
                }
                used.insert(name.to_owned());
            }
        }
        used
    };

    let dashboard_path = repo().join("deploy/grafana/kubenurse-dashboard.json");
    let dashboard: Value = serde_json::from_str(&read(&dashboard_path)).expect("dashboard JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let used = check("dashboard", &exprs);
    let unused: Vec<&String> = families.keys().filter(|f| !used.contains(*f)).collect();
    assert!(unused.is_empty(), "the dashboard shows no panel for {unused:?}");

    // The plain rules file; scripts/validate-deploy.sh checks that the PrometheusRule carries
    // the same groups.
    let rules_path = repo().join("deploy/prometheus/kubenurse-rules.yaml");
    let rules = yaml_doc(&rules_path);
    let rules: Vec<Value> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    let rule_exprs: Vec<String> = rules.iter().map(|r| str_at(r, "/expr").to_owned()).collect();
    check("rules", &rule_exprs);

    // The recorded names the dashboard reads (`kubenurse:…`) are recorded by those rules.
    let recorded: BTreeSet<&str> = rules.iter().filter_map(|r| r["record"].as_str()).collect();
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if word.starts_with("kubenurse:") {
                assert!(recorded.contains(word), "dashboard: `{word}` in `{expr}` is recorded by no rule");
            }
        }
    }
}
