//! Probe outcomes as an operator sees them on `/metrics` and `/alive`: one round against
//! local targets that answer 200, 404, 500, too slowly, refuse, present an untrusted
//! certificate, or whose name does not resolve.

mod common;

use common::agent::{get, metric, start, wait_round};
use common::targets::{refused_addr, Target, TestCa};

const REQUESTS: &str = "kubenurse_httpclient_requests_total";
const ERRORS: &str = "kubenurse_errors_total";
const TRACE: &str = "kubenurse_httpclient_trace_request_duration_seconds_count";
const DURATION: &str = "kubenurse_httpclient_request_duration_seconds_count";

/// A name whose 64-character label the system resolver rejects locally: resolution fails
/// without sending a query anywhere.
fn unresolvable_host() -> String {
    format!("{}.invalid", "a".repeat(64))
}

#[tokio::test]
async fn each_failure_is_counted_once_at_its_phase() {
    let plain = Target::http("127.0.0.1").await;
    let trusted_ca = TestCa::new("trusted test CA");
    let untrusted_ca = TestCa::new("untrusted test CA");
    let trusted = Target::https("127.0.0.1", &trusted_ca).await;
    let untrusted = Target::https("127.0.0.1", &untrusted_ca).await;
    let refused = refused_addr("127.0.0.1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("extra-ca.pem");
    std::fs::write(&ca_file, &trusted_ca.cert_pem).expect("write ca");
    // A service-account token is present, but only apiserver probes may send it.
    std::fs::write(dir.path().join("token"), "not-for-you").expect("write token");

    let checks = [
        format!("ok:{}", plain.url("/ok")),
        format!("named:http://localhost:{}/ok", plain.addr.port()),
        format!("notfound:{}", plain.url("/status/404")),
        format!("broken:{}", plain.url("/status/500")),
        format!("slow:{}", plain.url("/slow")),
        format!("refused:http://{refused}/ok"),
        format!("tls_ok:{}", trusted.https_url("localhost", "/ok")),
        format!("tls_untrusted:{}", untrusted.https_url("127.0.0.1", "/ok")),
        format!("nodns:http://{}:80/ok", unresolvable_host()),
    ]
    .join("|");
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=1s".into(),
        format!("--extra-ca={}", ca_file.display()),
        format!("--service-account-dir={}", dir.path().display()),
        format!("--extra-checks={checks}"),
    ])
    .await;
    wait_round(&agent, 1).await;
    let (status, text) = get(agent.local_addr, "/metrics").await;
    assert_eq!(status, 200);

    let requests = |kind: &str, code: &str| metric(&text, REQUESTS, &[("type", kind), ("code", code)]);
    let errors = |kind: &str, event: &str| metric(&text, ERRORS, &[("type", kind), ("event", event)]);

    // Successes: a 200, no error series at all.
    for kind in ["ok", "named", "tls_ok"] {
        assert_eq!(requests(kind, "200"), Some(1.0), "{kind}");
        assert_eq!(metric(&text, DURATION, &[("type", kind)]), Some(1.0), "{kind}");
        assert!(
            !text.lines().any(|l| l.starts_with(ERRORS) && l.contains(&format!("type=\"{kind}\""))),
            "{kind} has errors"
        );
    }
    // Statuses other than 200 are responses (duration observed) and errors by status.
    assert_eq!(requests("notfound", "404"), Some(1.0));
    assert_eq!(errors("notfound", "status_code_404"), Some(1.0));
    assert_eq!(requests("broken", "500"), Some(1.0));
    assert_eq!(errors("broken", "status_code_500"), Some(1.0));
    assert_eq!(metric(&text, DURATION, &[("type", "broken")]), Some(1.0));
    // Failures without a response, each at its phase and counted exactly once.
    for (kind, event) in [
        ("slow", "round_trip_error"),
        ("refused", "connect_done"),
        ("tls_untrusted", "tls_handshake_done"),
        ("nodns", "dns_done"),
    ] {
        assert_eq!(requests(kind, "round_trip_error"), Some(1.0), "{kind}");
        assert_eq!(errors(kind, event), Some(1.0), "{kind}");
        let error_series =
            text.lines().filter(|l| l.starts_with(ERRORS) && l.contains(&format!("type=\"{kind}\""))).count();
        assert_eq!(error_series, 1, "{kind} is counted under one event only");
        assert_eq!(metric(&text, DURATION, &[("type", kind)]), None, "{kind}: no response, no duration");
    }

    // Per-phase events: DNS only for names, TLS only for https, all up to the first byte.
    let trace = |kind: &str, event: &str| metric(&text, TRACE, &[("type", kind), ("event", event)]);
    for event in ["connect_start", "connect_done", "got_conn", "wrote_request", "got_first_resp_byte"] {
        for kind in ["ok", "named", "tls_ok"] {
            assert_eq!(trace(kind, event), Some(1.0), "{kind} {event}");
        }
    }
    assert_eq!(trace("ok", "dns_start"), None, "an IP literal is not resolved");
    assert_eq!(trace("named", "dns_start"), Some(1.0));
    assert_eq!(trace("named", "dns_done"), Some(1.0));
    assert_eq!(trace("tls_ok", "tls_handshake_start"), Some(1.0));
    assert_eq!(trace("tls_ok", "tls_handshake_done"), Some(1.0));
    assert_eq!(trace("ok", "tls_handshake_done"), None);
    assert_eq!(trace("refused", "connect_start"), Some(1.0));
    assert_eq!(trace("refused", "connect_done"), None, "a failed phase is not observed as done");
    assert_eq!(trace("tls_untrusted", "tls_handshake_done"), None);
    assert_eq!(trace("nodns", "dns_start"), Some(1.0));
    assert_eq!(trace("nodns", "dns_done"), None);

    // /alive names each result; any failure makes it 500.
    let (status, body) = get(agent.local_addr, "/alive").await;
    assert_eq!(status, 500);
    let alive: serde_json::Value = serde_json::from_str(&body).expect("alive json");
    let results = &alive["last_check_result"];
    assert_eq!(results["ok"], "ok");
    assert_eq!(results["notfound"], "404 Not Found");
    assert_eq!(results["me_ingress"], "skipped");
    assert_eq!(results["neighbourhood_state"], "skipped");
    assert!(results["refused"].as_str().is_some_and(|e| e.contains("connect")), "{}", results["refused"]);
    assert!(results["slow"].as_str().is_some_and(|e| e.contains("timed out")), "{}", results["slow"]);
    assert!(plain.hits.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    assert_eq!(plain.with_token.load(std::sync::atomic::Ordering::SeqCst), 0, "the token leaked to an extra check");
    assert_eq!(trusted.with_token.load(std::sync::atomic::Ordering::SeqCst), 0, "the token leaked to an extra check");
    agent.stop().await;
}

#[tokio::test]
async fn the_slow_probe_never_delays_the_round_beyond_the_deadline() {
    let plain = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=300ms".into(),
        format!("--extra-checks=slow:{}|ok:{}", plain.url("/slow"), plain.url("/ok")),
    ])
    .await;
    wait_round(&agent, 1).await;
    let report = agent.reports().borrow().clone().expect("report");
    // The slow target answers after 3 s; the round ends at the 300 ms deadline.
    assert!(report.duration < std::time::Duration::from_secs(2), "round took {:?}", report.duration);
    agent.stop().await;
}

#[tokio::test]
async fn reused_connections_skip_dns_connect_and_tls_after_the_first_round() {
    let plain = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=200ms".into(),
        "--reuse-connections=true".into(),
        format!("--extra-checks=ok:http://localhost:{}/ok", plain.addr.port()),
    ])
    .await;
    wait_round(&agent, 3).await;
    let report = agent.reports().borrow().clone().expect("report");
    let result = report.results.iter().find(|r| r.target.kind == "ok").expect("ok result");
    assert!(result.is_ok());
    let events: Vec<&str> = result.events.iter().map(|(e, _)| e.label()).collect();
    assert_eq!(events, ["got_conn", "wrote_request", "got_first_resp_byte"], "a pooled probe only gets a connection");
    agent.stop().await;
}
