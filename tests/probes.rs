//! Probe outcomes as an operator sees them on `/metrics`, `/alive` and in the log: local
//! targets that answer 200, 404, 500, too slowly, refuse, black-hole, present an untrusted
//! certificate, or whose name a local DNS server does not resolve; dialling several
//! addresses; the service-account token and TLS verification; failure log lines.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::agent::{get, ip, metric, start, wait_report, wait_round, DURATION, ERRORS, REQUESTS, TRACE};
use common::dns::{Answer, DnsServer};
use common::targets::{refused_addr, BlackHole, SilentPeer, Target, TestCa};
use kubenurse::agent::Agent;
use kubenurse::config::{Config, DnsServers};
use kubenurse::probe::Resolver;

#[tokio::test]
async fn each_failure_is_counted_once_at_its_phase() {
    let plain = Target::http("127.0.0.1").await;
    let trusted_ca = TestCa::new("trusted test CA");
    let untrusted_ca = TestCa::new("untrusted test CA");
    let trusted = Target::https("127.0.0.1", &trusted_ca).await;
    let untrusted = Target::https("127.0.0.1", &untrusted_ca).await;
    let refused = refused_addr("127.0.0.1").await;
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("nowhere.kubenurse.test", Answer::NxDomain);
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
        "nodns:http://nowhere.kubenurse.test:80/ok".to_owned(),
    ]
    .join("|");
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=1s".into(),
        dns.flag(),
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
    assert!(dns.queries().iter().all(|q| !q.starts_with("localhost")), "localhost comes from the hosts file");

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
    assert!(results["nodns"].as_str().is_some_and(|e| e.contains("nowhere.kubenurse.test")), "{}", results["nodns"]);
    assert!(plain.hits.load(Ordering::SeqCst) >= 4);
    assert_eq!(plain.with_token.load(Ordering::SeqCst), 0, "the token leaked to an extra check");
    assert_eq!(trusted.with_token.load(Ordering::SeqCst), 0, "the token leaked to an extra check");
    agent.stop().await;
}

#[tokio::test]
async fn a_deadline_counts_at_the_phase_still_open() {
    let slow = Target::http("127.0.0.1").await;
    let hole = BlackHole::start("127.0.0.1").await;
    let silent = SilentPeer::start("127.0.0.1").await;
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("silent.kubenurse.test", Answer::Silent);
    dns.answer("servfail.kubenurse.test", Answer::ServFail);
    let checks = [
        "dns_silent:http://silent.kubenurse.test/x".to_owned(),
        "dns_servfail:http://servfail.kubenurse.test/x".to_owned(),
        format!("connect:http://{}/x", hole.addr),
        format!("tls:https://{}/x", silent.addr),
        format!("response:{}", slow.url("/slow")),
    ];
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=800ms".into(),
        dns.flag(),
        format!("--extra-checks={}", checks.join("|")),
    ])
    .await;
    wait_round(&agent, 1).await;
    let (_, text) = get(agent.local_addr, "/metrics").await;
    let trace = |kind: &str, event: &str| metric(&text, TRACE, &[("type", kind), ("event", event)]);
    let errors = |kind: &str, event: &str| metric(&text, ERRORS, &[("type", kind), ("event", event)]);
    // The phase that started and never finished is the one counted.
    for (kind, started, failed) in [
        ("dns_silent", "dns_start", "dns_done"),
        ("dns_servfail", "dns_start", "dns_done"),
        ("connect", "connect_start", "connect_done"),
        ("tls", "tls_handshake_start", "tls_handshake_done"),
        ("response", "got_conn", "round_trip_error"),
    ] {
        assert_eq!(trace(kind, started), Some(1.0), "{kind}: {started}");
        assert_eq!(errors(kind, failed), Some(1.0), "{kind}: {failed}");
        assert_eq!(metric(&text, REQUESTS, &[("type", kind), ("code", "round_trip_error")]), Some(1.0), "{kind}");
    }
    assert_eq!(trace("dns_silent", "dns_done"), None);
    assert_eq!(trace("connect", "connect_done"), None);
    assert_eq!(trace("tls", "connect_done"), Some(1.0), "the silent peer accepts the connection");
    assert_eq!(trace("tls", "tls_handshake_done"), None);
    assert_eq!(trace("response", "got_first_resp_byte"), None);
    assert!(dns.asked("silent.kubenurse.test", "A") >= 1, "the silent server was asked");
    agent.stop().await;
}

#[tokio::test]
async fn names_resolve_through_the_configured_server_on_every_probe() {
    let target = Target::http("127.0.0.1").await;
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("nurse.kubenurse.test", Answer::Addresses(vec![ip("127.0.0.1")]));
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=100ms".into(),
        dns.flag(),
        format!("--extra-checks=named:http://nurse.kubenurse.test:{}/ok", target.addr.port()),
    ])
    .await;
    let report = wait_report(&agent, "three rounds", |r| r.number >= 3).await;
    assert!(report.results.iter().all(|r| r.is_ok()), "{:?}", report.results);
    // No cache: each round's probe measured a lookup of its own.
    assert!(dns.asked("nurse.kubenurse.test", "A") >= 3, "{:?}", dns.queries());
    agent.stop().await;
}

#[tokio::test]
async fn addresses_of_one_family_are_dialled_in_turn_each_with_a_share_of_the_deadline() {
    // The first address black-holes; with the whole deadline spent on it, the probe would fail.
    let target = Target::http("127.0.0.62").await;
    let _hole = BlackHole::start_at(SocketAddr::new(ip("127.0.0.61"), target.addr.port())).await;
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("two.kubenurse.test", Answer::Addresses(vec![ip("127.0.0.61"), ip("127.0.0.62")]));
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=2s".into(),
        dns.flag(),
        format!("--extra-checks=two:http://two.kubenurse.test:{}/ok", target.addr.port()),
    ])
    .await;
    wait_round(&agent, 1).await;
    let report = agent.reports().borrow().clone().expect("report");
    let result = &report.results[0];
    assert!(result.is_ok(), "{}", result.summary());
    assert_eq!(target.hits.load(Ordering::SeqCst), 1);
    agent.stop().await;
}

#[tokio::test]
async fn the_other_address_family_is_raced_when_the_first_does_not_connect() {
    // IPv4 comes first and black-holes; IPv6 answers. Dialled one family after the other, the
    // IPv4 address would take the whole deadline.
    let target = Target::http("::1").await;
    let _hole = BlackHole::start_at(SocketAddr::new(ip("127.0.0.63"), target.addr.port())).await;
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("dual.kubenurse.test", Answer::Addresses(vec![ip("127.0.0.63"), ip("::1")]));
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=3s".into(),
        dns.flag(),
        format!("--extra-checks=dual:http://dual.kubenurse.test:{}/ok", target.addr.port()),
    ])
    .await;
    wait_round(&agent, 1).await;
    let report = agent.reports().borrow().clone().expect("report");
    assert!(report.results[0].is_ok(), "{}", report.results[0].summary());
    assert_eq!(target.hits.load(Ordering::SeqCst), 1);
    agent.stop().await;
}

#[tokio::test]
async fn the_search_list_ndots_and_hosts_file_apply_as_in_resolv_conf() {
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("short.cluster.test", Answer::Addresses(vec![ip("127.0.0.21")]));
    dns.answer("a.b", Answer::Addresses(vec![ip("127.0.0.22")]));
    let servers = DnsServers(vec![dns.addr]);
    let resolver = Resolver::new(
        b"nameserver 127.0.0.254\nsearch cluster.test\noptions ndots:2\n",
        b"127.0.0.23 pinned.test\n",
        Some(&servers),
    )
    .expect("resolver");

    assert_eq!(resolver.lookup("short").await.expect("short"), [ip("127.0.0.21")]);
    assert_eq!(dns.asked("short", "A"), 0, "found through the search list first");
    // Fewer dots than ndots: the search list is tried before the name as given.
    assert_eq!(resolver.lookup("a.b").await.expect("a.b"), [ip("127.0.0.22")]);
    let queries = dns.queries();
    let at = |q: &str| queries.iter().position(|x| x == q).unwrap_or_else(|| panic!("{q} not asked: {queries:?}"));
    assert!(at("a.b.cluster.test A") < at("a.b A"), "{queries:?}");
    // The hosts file answers alone; the server is not asked.
    assert_eq!(resolver.lookup("pinned.test").await.expect("pinned"), [ip("127.0.0.23")]);
    assert!(dns.queries().iter().all(|q| !q.starts_with("pinned")), "{:?}", dns.queries());
    // An unknown name is an error naming it.
    let error = resolver.lookup("nowhere.test").await.expect_err("nxdomain").to_string();
    assert!(error.contains("nowhere.test"), "{error}");
}

#[tokio::test]
async fn the_token_only_travels_over_verified_tls_even_when_insecure() {
    let cluster_ca = TestCa::new("cluster CA");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), "secret-token").expect("write token");
    std::fs::write(dir.path().join("ca.crt"), &cluster_ca.cert_pem).expect("write ca");
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("kubernetes.default.svc.cluster.local", Answer::Addresses(vec![ip("127.0.0.1")]));
    let agent_for = |apiserver: &Target| {
        vec![
            "--listen-addr=127.0.0.1:0".to_owned(),
            "--check-interval=1h".into(),
            "--insecure=true".into(),
            // No discovery: nothing but the probes talks to the apiserver address.
            "--check-neighbourhood=false".into(),
            "--allow-unschedulable=true".into(),
            "--kubernetes-service-host=127.0.0.1".into(),
            format!("--kubernetes-service-port={}", apiserver.addr.port()),
            format!("--service-account-dir={}", dir.path().display()),
            dns.flag(),
            format!("--extra-checks=extra:{}", apiserver.https_url("127.0.0.1", "/ok")),
        ]
    };

    // Something that is not the apiserver answers its address with a certificate the
    // cluster CA did not sign: the apiserver probes refuse it before any request.
    let impostor = Target::https("127.0.0.1", &TestCa::new("impostor CA")).await;
    let agent = start(&agent_for(&impostor)).await;
    wait_round(&agent, 1).await;
    let (_, text) = get(agent.local_addr, "/metrics").await;
    for kind in ["api_server_direct", "api_server_dns"] {
        assert_eq!(metric(&text, ERRORS, &[("type", kind), ("event", "tls_handshake_done")]), Some(1.0), "{kind}");
    }
    // KUBENURSE_INSECURE still applies to the other targets.
    assert_eq!(metric(&text, REQUESTS, &[("type", "extra"), ("code", "200")]), Some(1.0));
    assert_eq!(impostor.hits.load(Ordering::SeqCst), 1, "only the extra check got through");
    assert_eq!(impostor.with_token.load(Ordering::SeqCst), 0, "the token went to an unverified peer");
    agent.stop().await;

    // The real apiserver, verified against the service-account CA, gets the token.
    let names = ["127.0.0.1", "kubernetes.default.svc.cluster.local"];
    let apiserver = Target::https_for("127.0.0.1", &cluster_ca, &names).await;
    let agent = start(&agent_for(&apiserver)).await;
    wait_round(&agent, 1).await;
    let (_, text) = get(agent.local_addr, "/metrics").await;
    for kind in ["api_server_direct", "api_server_dns", "extra"] {
        assert_eq!(metric(&text, REQUESTS, &[("type", kind), ("code", "200")]), Some(1.0), "{kind}");
    }
    assert_eq!(apiserver.with_token.load(Ordering::SeqCst), 2, "both apiserver probes, and only they, carry it");
    agent.stop().await;
}

#[tokio::test]
async fn an_unreadable_token_fails_the_apiserver_probe_without_a_request() {
    let cluster_ca = TestCa::new("cluster CA");
    let apiserver = Target::https("127.0.0.1", &cluster_ca).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "secret-token").expect("write token");
    std::fs::write(dir.path().join("ca.crt"), &cluster_ca.cert_pem).expect("write ca");
    let config = Config::from_flags([
        "--listen-addr=127.0.0.1:0".to_owned(),
        "--check-interval=1h".into(),
        "--check-neighbourhood=false".into(),
        "--allow-unschedulable=true".into(),
        "--check-api-server-dns=false".into(),
        "--kubernetes-service-host=127.0.0.1".into(),
        format!("--kubernetes-service-port={}", apiserver.addr.port()),
        format!("--service-account-dir={}", dir.path().display()),
    ])
    .expect("config");
    let bound = Agent::bind(config).await.expect("bind");
    // The token disappears after start-up (a broken projected volume).
    std::fs::remove_file(&token_file).expect("remove token");
    let agent = bound.run();
    wait_round(&agent, 1).await;
    let report = agent.reports().borrow().clone().expect("report");
    let result = report.results.iter().find(|r| r.target.kind == "api_server_direct").expect("result");
    assert_eq!(result.error_event().as_deref(), Some("round_trip_error"));
    assert!(
        result.summary().contains(&format!("cannot read service-account token {}", token_file.display())),
        "{}",
        result.summary()
    );
    assert!(result.events.is_empty(), "the clock never started");
    assert_eq!(apiserver.hits.load(Ordering::SeqCst), 0);
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

/// Log lines written while the test runs, as JSON objects.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    /// Lines at `level` with `message` about probe `kind`.
    fn count(&self, level: &str, message: &str, kind: &str) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["level"] == level && l["fields"]["message"] == message && l["fields"]["probe"] == kind)
            .count()
    }
}

/// The agent runs on this test's single thread, so a subscriber set for the thread sees
/// every line it logs.
#[tokio::test]
async fn a_failing_probe_logs_one_warning_and_one_line_when_it_recovers() {
    let log = Captured::default();
    let subscriber =
        tracing_subscriber::fmt().json().with_writer(log.clone()).with_max_level(tracing::Level::INFO).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let down = refused_addr("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=50ms".into(),
        format!("--extra-checks=flaky:http://{down}/ok"),
    ])
    .await;
    wait_round(&agent, 6).await;
    assert_eq!(log.count("WARN", "probe failed", "flaky"), 1, "one line for six failed rounds");
    assert_eq!(log.count("WARN", "probe still failing", "flaky"), 0, "no reminder within minutes");

    let _up = Target::http_at(down).await;
    let recovered = wait_report(&agent, "flaky recovered", |r| r.results.iter().all(|r| r.is_ok())).await;
    wait_round(&agent, recovered.number + 3).await;
    assert_eq!(log.count("INFO", "probe recovered", "flaky"), 1, "one line on recovery");
    assert_eq!(log.count("WARN", "probe failed", "flaky"), 1, "nothing more while it is fine");
    agent.stop().await;
}
