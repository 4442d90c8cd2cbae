//! The exporters see the agent's resolved configuration and nothing else: a flag wins over
//! its variable, a signal's own headers replace the common ones, and what else the process
//! environment holds (proxies, `OTEL_*` values overridden by flags) does not reach the
//! collector. The real binary runs with a polluted environment to show it.

mod common;

use std::time::Duration;

use common::otlp::OtlpReceiver;
use common::process::{free_port, Spawned};
use common::targets::refused_addr;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_sees_the_resolved_configuration_and_not_the_rest_of_the_environment() {
    let receiver = OtlpReceiver::http("127.0.0.1:0".parse().expect("addr")).await;
    let proxy = refused_addr("127.0.0.1").await;
    let refused = refused_addr("127.0.0.1").await;
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let proxy = format!("http://{proxy}");
    // A failing probe, so that spans are exported too.
    let checks = format!("refused:http://{refused}/");
    let env = [
        ("KUBENURSE_LISTEN_ADDR", listen.as_str()),
        ("KUBENURSE_CHECK_INTERVAL", "100ms"),
        ("KUBENURSE_SHUTDOWN_DURATION", "0s"),
        ("KUBENURSE_DNS_SERVERS", "127.0.0.1:1"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ("KUBENURSE_EXTRA_CHECKS", &checks),
        // Overridden by flags below.
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-bogus=from-the-environment,x-from=variable"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        // The traces' own headers replace the common ones.
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-signal=traces"),
        // Nothing the agent reads; an HTTP client that honoured them would fail every export.
        ("HTTP_PROXY", &proxy),
        ("HTTPS_PROXY", &proxy),
        ("ALL_PROXY", &proxy),
        ("http_proxy", &proxy),
        // SDK settings the agent gives itself.
        ("OTEL_TRACES_SAMPLER", "always_off"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_SPAN_EVENT_COUNT_LIMIT", "0"),
    ];
    let endpoint = receiver.endpoint();
    let agent = Spawned::start_with_args(
        &env,
        &[
            &format!("--otlp-endpoint={endpoint}"),
            "--otlp-protocol=http/protobuf",
            "--otlp-headers=x-from=flag",
            "--otlp-compression=none",
        ],
    );
    receiver
        .wait_for("metrics and spans", WAIT, |r| {
            let arrivals = r.arrivals();
            arrivals.iter().any(|a| a.signal == "metrics") && arrivals.iter().any(|a| a.signal == "traces")
        })
        .await;
    let arrivals = receiver.arrivals();
    for arrival in &arrivals {
        assert!(!arrival.compressed, "--otlp-compression=none wins over the variable: {arrival:?}");
        assert!(!arrival.headers.contains_key("x-bogus"), "a header of the overridden variable: {arrival:?}");
        match arrival.signal {
            "metrics" => assert_eq!(arrival.headers.get("x-from").map(String::as_str), Some("flag"), "{arrival:?}"),
            _ => {
                assert_eq!(arrival.headers.get("x-signal").map(String::as_str), Some("traces"), "{arrival:?}");
                assert!(!arrival.headers.contains_key("x-from"), "replaced, not merged: {arrival:?}");
            }
        }
    }
    // Span events were not cut by OTEL_SPAN_EVENT_COUNT_LIMIT.
    let span = receiver
        .traces()
        .into_iter()
        .flat_map(|t| t.resource_spans)
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .next()
        .expect("a span");
    assert!(!span.events.is_empty(), "{span:?}");
    let (code, stderr) = agent.stop().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("OTLP export failed"), "{stderr}");
}
