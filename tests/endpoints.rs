//! The HTTP endpoints of SPEC §4 on a running agent.

mod common;

use common::agent::{get, get_with, metric, start, wait_round};
use common::targets::Target;

#[tokio::test]
async fn readiness_and_alive_follow_the_first_round() {
    let target = Target::http("127.0.0.1").await;
    // The first round takes ~1 s (a slow target and a 1 s deadline): long enough to look.
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=1s".into(),
        format!("--extra-checks=slow:{}", target.url("/slow")),
    ])
    .await;
    assert_eq!(get(agent.local_addr, "/ready").await.0, 503, "not ready before the first round");
    assert_eq!(get(agent.local_addr, "/alive").await.0, 500, "no results before the first round");
    assert_eq!(get(agent.local_addr, "/alwayshappy").await, (200, String::new()));

    wait_round(&agent, 1).await;
    assert_eq!(get(agent.local_addr, "/ready").await.0, 200);
    let (status, body) = get(agent.local_addr, "/alive").await;
    assert_eq!(status, 500, "a failed probe makes /alive 500");
    assert!(body.starts_with("{\n \"hostname\""), "pretty JSON with a one-space indent: {body}");

    agent.start_draining();
    assert_eq!(get(agent.local_addr, "/ready").await.0, 503, "draining");
    assert_eq!(get(agent.local_addr, "/alwayshappy").await.0, 200, "still serving while draining");
    agent.stop().await;
}

#[tokio::test]
async fn alive_is_200_when_everything_is_ok_or_skipped() {
    let target = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        format!("--extra-checks=ok:{}", target.url("/ok")),
    ])
    .await;
    wait_round(&agent, 1).await;
    let (status, body) = get_with(agent.local_addr, "/alive?x=1", &[("user-agent", "probe-test/1")]).await;
    assert_eq!(status, 200, "{body}");
    let alive: serde_json::Value = serde_json::from_str(&body).expect("json");
    let keys: Vec<&str> = alive.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, ["hostname", "headers", "user_agent", "request_uri", "remote_addr", "last_check_result"]);
    assert_eq!(alive["user_agent"], "probe-test/1");
    assert_eq!(alive["request_uri"], "/alive?x=1");
    assert_eq!(alive["headers"]["User-Agent"][0], "probe-test/1");
    assert!(alive["remote_addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")));
    let results = &alive["last_check_result"];
    assert_eq!(results["ok"], "ok");
    for skipped in ["api_server_direct", "api_server_dns", "me_ingress", "me_service", "neighbourhood_state"] {
        assert_eq!(results[skipped], "skipped", "{skipped}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn root_redirects_to_alive() {
    let agent = start(&["--listen-addr=127.0.0.1:0".into(), "--check-interval=1h".into()]).await;
    let (status, _) = get(agent.local_addr, "/").await;
    assert_eq!(status, 301);
    agent.stop().await;
}

#[tokio::test]
async fn incoming_checks_count_distinct_origins() {
    let agent = start(&["--listen-addr=127.0.0.1:0".into(), "--check-interval=1h".into()]).await;
    for origin in ["kubenurse-a", "kubenurse-b", "kubenurse-a", "kubenurse-c"] {
        let (status, _) = get_with(agent.local_addr, "/alwayshappy", &[("KUBENURSE-NEIGHBOUR-ORIGIN", origin)]).await;
        assert_eq!(status, 200);
    }
    // Made-up, oversized origins are answered but not counted.
    let long = "x".repeat(300);
    assert_eq!(get_with(agent.local_addr, "/alwayshappy", &[("KUBENURSE-NEIGHBOUR-ORIGIN", &long)]).await.0, 200);
    let (_, text) = get(agent.local_addr, "/metrics").await;
    assert_eq!(metric(&text, "kubenurse_neighbourhood_incoming_checks", &[]), Some(3.0), "{text}");
    agent.stop().await;
}

#[tokio::test]
async fn metrics_pass_promtool_and_carry_no_scope_labels() {
    let target = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        format!("--extra-checks=ok:{}|bad:{}", target.url("/ok"), target.url("/status/503")),
    ])
    .await;
    wait_round(&agent, 1).await;
    let (status, text) = get(agent.local_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(!text.contains("otel_scope"), "scope labels leak into /metrics");
    assert!(!text.contains("target_info"));
    // Default buckets are Prometheus' classic ones.
    let bounds: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("kubenurse_httpclient_request_duration_seconds_bucket{type=\"ok\""))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(bounds, ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"]);

    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed: .ci/run installs it");
    use std::io::Write;
    let mut child = promtool;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    agent.stop().await;
}

#[tokio::test]
async fn tls_agents_serve_https_and_probe_each_other_over_it() {
    use common::targets::TestCa;
    let ca = TestCa::new("cluster test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = ca.leaf_pem(&["127.0.0.31", "127.0.0.32"]);
    let paths = [("cert.pem", cert), ("key.pem", key), ("ca.pem", ca.cert_pem.clone())];
    for (name, pem) in &paths {
        std::fs::write(dir.path().join(name), pem).expect("write pem");
    }
    let port = std::net::TcpListener::bind("127.0.0.31:0").expect("bind").local_addr().expect("addr").port();
    let tls_port = std::net::TcpListener::bind("127.0.0.31:0").expect("bind").local_addr().expect("addr").port();
    let mut agents = Vec::new();
    for (me, other) in [("127.0.0.31", "127.0.0.32"), ("127.0.0.32", "127.0.0.31")] {
        agents.push(
            start(&[
                format!("--listen-addr={me}:{port}"),
                format!("--tls-listen-addr={me}:{tls_port}"),
                "--use-tls=true".into(),
                format!("--cert-file={}", dir.path().join("cert.pem").display()),
                format!("--cert-key={}", dir.path().join("key.pem").display()),
                format!("--extra-ca={}", dir.path().join("ca.pem").display()),
                format!("--neighbours=node-{other}={other}:{tls_port}"),
                "--check-interval=200ms".into(),
            ])
            .await,
        );
    }
    for agent in &agents {
        assert!(agent.tls_local_addr.is_some());
        let report = common::agent::wait_report(agent, "the TLS neighbour answers", |r| {
            r.results.iter().any(|p| p.target.kind.starts_with("path_") && p.is_ok())
        })
        .await;
        let probe = report.results.iter().find(|p| p.target.kind.starts_with("path_")).expect("path probe");
        assert_eq!(probe.target.url.scheme_str(), Some("https"));
        assert!(probe.event(kubenurse::probe::Event::TlsHandshakeDone).is_some());
    }
    for agent in agents {
        agent.stop().await;
    }
}

/// A peer that answers every request with the status line `HTTP/1.1 <path> X`, whatever
/// the code: hyper accepts any three digits, and refuses the rest.
async fn raw_status_peer() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let code = head.split(' ').nth(1).unwrap_or("/500").trim_start_matches('/').to_owned();
                let answer = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn status_codes_a_peer_makes_up_do_not_become_label_values() {
    let (peer, task) = raw_status_peer().await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        format!(
            "--extra-checks=c404:http://{peer}/404|c600:http://{peer}/600|c999:http://{peer}/999|c42:http://{peer}/42"
        ),
    ])
    .await;
    wait_round(&agent, 1).await;
    let (_, text) = get(agent.local_addr, "/metrics").await;
    for kind in ["c600", "c999"] {
        let requests = metric(&text, "kubenurse_httpclient_requests_total", &[("type", kind), ("code", "other")]);
        assert_eq!(requests, Some(1.0), "{kind}: {text}");
        let errors = metric(&text, "kubenurse_errors_total", &[("type", kind), ("event", "status_code_other")]);
        assert_eq!(errors, Some(1.0), "{kind}: {text}");
    }
    assert_eq!(metric(&text, "kubenurse_httpclient_requests_total", &[("type", "c404"), ("code", "404")]), Some(1.0));
    // Two digits are no HTTP status line: a malformed answer.
    let malformed = metric(&text, "kubenurse_errors_total", &[("type", "c42"), ("event", "round_trip_error")]);
    assert_eq!(malformed, Some(1.0), "{text}");
    for made_up in ["600", "999", "42"] {
        assert!(!text.contains(&format!("\"{made_up}\"")), "{made_up} became a label value: {text}");
        assert!(!text.contains(&format!("status_code_{made_up}")), "{made_up} became an event: {text}");
    }
    agent.stop().await;
    task.abort();
}

#[tokio::test]
async fn the_lean_profile_drops_per_event_series_of_neighbours_only() {
    let target = Target::http("127.0.0.1").await;
    let mut series = Vec::new();
    for detail in ["full", "lean"] {
        let agent = start(&[
            "--listen-addr=127.0.0.1:0".into(),
            "--check-interval=1h".into(),
            format!("--metrics-detail={detail}"),
            format!("--neighbours=node-a={}", target.addr),
            format!("--extra-checks=ok:{}", target.url("/ok")),
        ])
        .await;
        wait_round(&agent, 1).await;
        let (_, text) = get(agent.local_addr, "/metrics").await;
        let families = |kind: &str| -> std::collections::BTreeSet<String> {
            text.lines()
                .filter(|l| !l.starts_with('#') && l.contains(&format!("type=\"{kind}\"")))
                .filter_map(|l| l.split('{').next().map(str::to_owned))
                .collect()
        };
        let (fixed, neighbour) = (families("ok"), families("path_node-a"));
        let trace = "kubenurse_httpclient_trace_request_duration_seconds_count";
        assert!(fixed.contains(trace), "{detail}: fixed probes keep per-event durations");
        assert_eq!(neighbour.contains(trace), detail == "full", "{detail}: {neighbour:?}");
        for kept in ["kubenurse_httpclient_request_duration_seconds_count", "kubenurse_httpclient_requests_total"] {
            assert!(neighbour.contains(kept), "{detail}: {kept} of neighbours");
        }
        series.push(text.lines().filter(|l| !l.starts_with('#')).count());
        agent.stop().await;
    }
    assert!(series[1] < series[0], "lean has fewer series: {series:?}");
}

#[tokio::test]
async fn livez_fails_once_rounds_stop_whatever_the_probes_found() {
    let target = Target::http("127.0.0.1").await;
    // Rounds every second, a 2 s deadline: /livez allows 6 s without a finished round.
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1s".into(),
        "--check-timeout=2s".into(),
        format!("--extra-checks=bad:{}", target.url("/status/500")),
    ])
    .await;
    wait_round(&agent, 1).await;
    assert_eq!(get(agent.local_addr, "/alive").await.0, 500, "a failing probe");
    assert_eq!(get(agent.local_addr, "/livez").await, (200, String::new()), "failing probes need no restart");

    agent.start_draining();
    let draining_since = agent.reports().borrow().as_ref().map_or(0, |r| r.number);
    wait_round(&agent, draining_since + 2).await;
    assert_eq!(get(agent.local_addr, "/ready").await.0, 503);
    assert_eq!(get(agent.local_addr, "/livez").await.0, 200, "rounds go on while draining");

    // The prober dies, the listeners stay: only /livez tells.
    agent.stop_probing();
    let mut livez = (0, String::new());
    for _ in 0..300 {
        livez = get(agent.local_addr, "/livez").await;
        if livez.0 == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(livez.0, 503, "/livez still 200 30 s after the rounds stopped: {}", livez.1);
    assert!(livez.1.starts_with("no probe round finished for ") && livez.1.contains("(limit 6s)"), "{}", livez.1);
    assert_eq!(get(agent.local_addr, "/alwayshappy").await.0, 200, "/alwayshappy cannot tell");
    assert_eq!(get(agent.local_addr, "/alive").await.0, 500, "the last results stay");
    agent.stop().await;
}

#[tokio::test]
async fn metrics_carry_the_process_series_and_the_build() {
    let agent = start(&["--listen-addr=127.0.0.1:0".into(), "--check-interval=1h".into()]).await;
    let (status, text) = get(agent.local_addr, "/metrics").await;
    assert_eq!(status, 200);
    let types: std::collections::BTreeMap<&str, &str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' ')).collect();
    for (family, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("kubenurse_build_info", "gauge"),
    ] {
        assert_eq!(types.get(family), Some(&kind), "{family}: {text}");
    }
    for positive in
        ["process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_start_time_seconds"]
    {
        assert!(metric(&text, positive, &[]).is_some_and(|v| v > 0.0), "{positive}: {text}");
    }
    let build = [("version", env!("CARGO_PKG_VERSION")), ("revision", kubenurse::metrics::REVISION)];
    assert_eq!(metric(&text, "kubenurse_build_info", &build), Some(1.0), "{text}");
    agent.stop().await;
}
