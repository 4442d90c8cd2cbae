//! OTLP to collectors behind TLS: gRPC and HTTP/protobuf verified with a private CA,
//! schemeless gRPC endpoints (TLS unless insecure), mutual TLS, and a wrong CA: one clear
//! log line, the agent unharmed, and once the CA file is fixed the push resumes with
//! everything counted meanwhile.

mod common;

use std::time::Duration;

use common::agent::{get, start};
use common::otlp::OtlpReceiver;
use common::process::{free_port, Spawned};
use common::secret::{replace_file, SecretDir};
use common::targets::{Target, TestCa};
use opentelemetry_proto::tonic::metrics::v1::metric;

const WAIT: Duration = Duration::from_secs(30);

fn any_addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn has_metric(receiver: &OtlpReceiver, name: &str) -> bool {
    receiver
        .metrics()
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .any(|m| m.name == name)
}

/// The first pushed value of the `kubenurse_httpclient_requests` point of probe `kind`.
fn first_requests(receiver: &OtlpReceiver, kind: &str) -> Option<f64> {
    receiver
        .metrics()
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .filter(|m| m.name == "kubenurse_httpclient_requests")
        .filter_map(|m| match &m.data {
            Some(metric::Data::Sum(sum)) => Some(sum.data_points.clone()),
            _ => None,
        })
        .flatten()
        .find(|p| p.attributes.iter().any(|a| a.key == "type" && format!("{:?}", a.value).contains(kind)))
        .and_then(|p| match p.value {
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(v)) => Some(v as f64),
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(v)) => Some(v),
            None => None,
        })
}

fn base_args(target: &Target) -> Vec<String> {
    vec![
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=100ms".into(),
        format!("--extra-checks=ok:{}", target.url("/ok")),
        "--otlp-metric-export-interval=200".into(),
        "--otel-traces-exporter=none".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_is_verified_with_the_given_ca_and_carries_the_headers() {
    let ca = TestCa::new("collector ca");
    let receiver = OtlpReceiver::grpc_tls(any_addr(), ca.server_config(&["localhost"])).await;
    let secret = SecretDir::new(&[("ca.crt", &ca.cert_pem)]);
    let target = Target::http("127.0.0.1").await;
    let mut args = base_args(&target);
    args.extend([
        format!("--otlp-endpoint={}", receiver.tls_endpoint("localhost")),
        "--otlp-protocol=grpc".into(),
        "--otlp-compression=gzip".into(),
        "--otlp-headers=authorization=Bearer%20s3cret".into(),
        format!("--otlp-certificate={}", secret.path("ca.crt")),
    ]);
    let agent = start(&args).await;
    receiver.wait_for("metrics over TLS", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    let arrival = receiver.arrivals().pop().expect("arrival");
    assert_eq!(arrival.headers.get("authorization").map(String::as_str), Some("Bearer s3cret"));
    assert!(arrival.compressed);
    assert_eq!(receiver.handshakes().1, 0, "no failed handshake");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_endpoint_without_scheme_uses_tls_unless_insecure() {
    let ca = TestCa::new("collector ca");
    let secure = OtlpReceiver::grpc_tls(any_addr(), ca.server_config(&["localhost"])).await;
    let plain = OtlpReceiver::grpc(any_addr()).await;
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).expect("write");
    let target = Target::http("127.0.0.1").await;

    let mut args = base_args(&target);
    args.extend([
        format!("--otlp-endpoint=localhost:{}", secure.addr.port()),
        "--otlp-protocol=grpc".into(),
        format!("--otlp-certificate={}", ca_file.display()),
    ]);
    let agent = start(&args).await;
    secure.wait_for("metrics over TLS", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    agent.stop().await;

    let mut args = base_args(&target);
    args.extend([
        format!("--otlp-endpoint=localhost:{}", plain.addr.port()),
        "--otlp-protocol=grpc".into(),
        "--otlp-insecure=true".into(),
    ]);
    let agent = start(&args).await;
    plain.wait_for("metrics in plain text", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_mutual_tls_needs_the_client_certificate() {
    let ca = TestCa::new("collector ca");
    let clients = TestCa::new("client ca");
    let receiver =
        OtlpReceiver::http_tls(any_addr(), ca.server_config_requiring_clients(&["localhost"], &clients)).await;
    let (cert, key) = clients.leaf_pem(&["kubenurse"]);
    let secret = SecretDir::new(&[("ca.crt", &ca.cert_pem), ("tls.crt", &cert), ("tls.key", &key)]);
    let target = Target::http("127.0.0.1").await;

    // Without a client certificate the receiver refuses every handshake.
    let mut args = base_args(&target);
    args.extend([
        format!("--otlp-endpoint={}", receiver.tls_endpoint("localhost")),
        format!("--otlp-certificate={}", secret.path("ca.crt")),
    ]);
    let agent = start(&args).await;
    receiver.wait_for("refused handshakes", WAIT, |r| r.handshakes().1 >= 2).await;
    assert!(receiver.metrics().is_empty());
    agent.stop().await;

    args.extend([
        format!("--otlp-client-certificate={}", secret.path("tls.crt")),
        format!("--otlp-client-key={}", secret.path("tls.key")),
    ]);
    let agent = start(&args).await;
    receiver.wait_for("metrics over mTLS", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    let arrival = receiver.arrivals().pop().expect("arrival");
    assert_eq!(arrival.headers.get("content-type").map(String::as_str), Some("application/x-protobuf"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_is_presented_on_the_next_connection() {
    let ca = TestCa::new("collector ca");
    let clients = TestCa::new("client ca");
    let strangers = TestCa::new("unknown client ca");
    let receiver =
        OtlpReceiver::http_tls(any_addr(), ca.server_config_requiring_clients(&["localhost"], &clients)).await;
    let (bad_cert, bad_key) = strangers.leaf_pem(&["kubenurse"]);
    let mut secret = SecretDir::new(&[("ca.crt", &ca.cert_pem), ("tls.crt", &bad_cert), ("tls.key", &bad_key)]);
    let target = Target::http("127.0.0.1").await;
    let mut args = base_args(&target);
    args.extend([
        "--reload-interval=100ms".into(),
        format!("--otlp-endpoint={}", receiver.tls_endpoint("localhost")),
        format!("--otlp-certificate={}", secret.path("ca.crt")),
        format!("--otlp-client-certificate={}", secret.path("tls.crt")),
        format!("--otlp-client-key={}", secret.path("tls.key")),
    ]);
    let agent = start(&args).await;
    receiver.wait_for("refused handshakes", WAIT, |r| r.handshakes().1 >= 2).await;
    assert!(receiver.metrics().is_empty());
    let (cert, key) = clients.leaf_pem(&["kubenurse"]);
    secret.update(&[("ca.crt", &ca.cert_pem), ("tls.crt", &cert), ("tls.key", &key)]);
    receiver.wait_for("metrics after rotation", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    agent.stop().await;
}

/// The real binary, so that its log is what an operator reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_one_clear_log_line_and_once_fixed_nothing_was_lost() {
    let ca = TestCa::new("collector ca");
    let wrong = TestCa::new("some other ca");
    let receiver = OtlpReceiver::grpc_tls(any_addr(), ca.server_config(&["localhost"])).await;
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = dir.path().join("ca.pem").display().to_string();
    std::fs::write(&ca_file, &wrong.cert_pem).expect("write");
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let agent = Spawned::start(&[
        ("KUBENURSE_LISTEN_ADDR", &listen),
        ("KUBENURSE_CHECK_INTERVAL", "50ms"),
        ("KUBENURSE_SHUTDOWN_DURATION", "0s"),
        ("KUBENURSE_DNS_SERVERS", "127.0.0.1:1"),
        ("KUBENURSE_RELOAD_INTERVAL", "100ms"),
        ("KUBENURSE_EXTRA_CHECKS", &format!("self:http://{listen}/alwayshappy")),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.tls_endpoint("localhost")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
        ("OTEL_TRACES_EXPORTER", "none"),
    ]);
    receiver.wait_for("several refused handshakes", WAIT, |r| r.handshakes().1 >= 5).await;
    assert!(receiver.metrics().is_empty());
    assert_eq!(get(listen.parse().expect("addr"), "/alive").await.0, 200, "the agent runs on");
    let failures = agent.lines_with("OTLP export failed");
    assert_eq!(failures.len(), 1, "one line for the whole streak:\n{}", agent.stderr());
    assert!(failures[0].contains("UnknownIssuer"), "the cause is named: {}", failures[0]);

    // What the agent counted while the collector was unreachable.
    let (_, text) = get(listen.parse().expect("addr"), "/metrics").await;
    let before =
        common::agent::metric(&text, "kubenurse_httpclient_requests_total", &[("type", "self"), ("code", "200")])
            .expect("requests counted");
    assert!(before > 0.0);
    replace_file(&ca_file, &ca.cert_pem);
    receiver.wait_for("metrics once the CA is fixed", WAIT, |r| has_metric(r, "kubenurse_httpclient_requests")).await;
    let first = first_requests(&receiver, "self").expect("the self probe pushed");
    assert!(first >= before, "the first push carries everything counted before: {first} < {before}");
    agent.wait_line("OTLP export recovered", WAIT).await;
    let (code, stderr) = agent.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("reloaded changed certificate files")).count(), 1, "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("OTLP export failed")).count(), 1, "{stderr}");
}

/// Files that cannot work stop the agent at start, exit 64, naming the variable.
#[test]
fn unusable_tls_files_are_a_configuration_error() {
    let ca = TestCa::new("collector ca");
    let (cert, _) = ca.leaf_pem(&["kubenurse"]);
    let (_, other_key) = ca.leaf_pem(&["kubenurse"]);
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        path.display().to_string()
    };
    let (garbage, cert, other_key, ca_file) =
        (write("garbage", "not pem"), write("cert", &cert), write("key", &other_key), write("ca", &ca.cert_pem));
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("OTEL_EXPORTER_OTLP_CERTIFICATE", &garbage)], "OTEL_EXPORTER_OTLP_CERTIFICATE"),
        (
            &[("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "/nonexistent/ca.pem")],
            "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert), ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &other_key)],
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file), ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert)],
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        ),
    ];
    for (env, variable) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kubenurse"))
            .env_clear()
            .envs([
                ("KUBENURSE_LISTEN_ADDR", "127.0.0.1:0"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:1"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ])
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{env:?}: {stderr}");
        let line = stderr.lines().find(|l| l.starts_with("invalid configuration:")).unwrap_or_default();
        assert!(line.contains(variable), "{env:?}: {stderr}");
    }
}
