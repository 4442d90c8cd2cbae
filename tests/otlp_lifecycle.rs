//! The real binary and its collector: the last interval is flushed on SIGTERM, and a
//! collector that is down at start costs a couple of log lines, no memory, and no data once
//! it is back.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::otlp::OtlpReceiver;
use common::process::{free_port, rss_kib};

#[tokio::test]
async fn sigterm_flushes_the_last_interval_before_exit() {
    let receiver = OtlpReceiver::grpc("127.0.0.1:0".parse().expect("addr")).await;
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    // A one-hour export interval: only the shutdown flush can deliver anything.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .envs([
            ("KUBENURSE_LISTEN_ADDR", listen.as_str()),
            ("KUBENURSE_CHECK_INTERVAL", "100ms"),
            ("KUBENURSE_SHUTDOWN_DURATION", "300ms"),
            ("KUBENURSE_EXTRA_CHECKS", &format!("self:http://{listen}/alwayshappy")),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "3600000"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(receiver.metrics().is_empty(), "nothing is pushed before the interval or the shutdown");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(exit.code(), Some(0));
    let pushed: Vec<String> = receiver
        .metrics()
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| m.name.clone())
        .collect();
    assert!(pushed.contains(&"kubenurse_httpclient_requests".to_owned()), "final export missing: {pushed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_at_start_costs_few_log_lines_and_no_memory_then_receives() {
    let collector_port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .envs([
            ("KUBENURSE_LISTEN_ADDR", listen.as_str()),
            ("KUBENURSE_CHECK_INTERVAL", "50ms"),
            ("KUBENURSE_SHUTDOWN_DURATION", "0s"),
            ("KUBENURSE_EXTRA_CHECKS", &format!("self:http://{listen}/alwayshappy")),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://127.0.0.1:{collector_port}")),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
            // Metrics only: a probe slowed by a loaded machine must not add a span export line.
            ("OTEL_TRACES_EXPORTER", "none"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    // About 30 failed exports (metrics every 100 ms, spans for nothing: all probes are fast).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_early = rss_kib(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_late = rss_kib(pid);
    assert!(
        rss_late < rss_early + 4 * 1024,
        "RSS grew from {rss_early} KiB to {rss_late} KiB while the collector was down"
    );

    let receiver = OtlpReceiver::http(format!("127.0.0.1:{collector_port}").parse().expect("addr")).await;
    receiver.wait_for("data once the collector is up", Duration::from_secs(20), |r| !r.metrics().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let mut pipe = child.stderr.take().expect("stderr");
    let (stderr, exit) = tokio::task::spawn_blocking(move || {
        let mut stderr = String::new();
        pipe.read_to_string(&mut stderr).expect("read stderr");
        (stderr, child.wait().expect("wait"))
    })
    .await
    .expect("join");
    assert_eq!(exit.code(), Some(0));
    assert!(!stderr.contains("final metric export failed"), "{stderr}");
    let failures = stderr.lines().filter(|l| l.contains("OTLP export failed")).count();
    let recoveries = stderr.lines().filter(|l| l.contains("OTLP export recovered")).count();
    assert_eq!(failures, 1, "one line for a streak of ~40 failures:\n{stderr}");
    assert_eq!(recoveries, 1, "{stderr}");
    assert!(stderr.lines().count() < 20, "log is flooded:\n{stderr}");
}
