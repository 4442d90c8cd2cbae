//! The `tcp://` and `dns://` extra checks as an operator sees them on `/metrics`, `/alive`
//! and in spans: a port that listens or refuses; a local DNS server that answers, says
//! NXDOMAIN, SERVFAIL, answers without an address, or never answers, asked directly
//! (`dns://name@server`) or through the system configuration with its search list.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::agent::{get, ip, metric, start, wait_round, DURATION, ERRORS, REQUESTS, TRACE};
use common::dns::{Answer, DnsServer};
use common::otlp::OtlpReceiver;
use common::targets::{refused_addr, Target};
use kubenurse::config::DnsServers;
use kubenurse::probe::{DnsQuery, Resolver};

/// The agent's `/metrics` after its first round, and `/alive`'s `last_check_result`.
async fn first_round(args: Vec<String>) -> (String, serde_json::Value) {
    let mut args = args;
    args.extend(["--listen-addr=127.0.0.1:0".into(), "--check-interval=1h".into()]);
    let agent = start(&args).await;
    wait_round(&agent, 1).await;
    let (status, text) = get(agent.local_addr, "/metrics").await;
    assert_eq!(status, 200);
    let (status, body) = get(agent.local_addr, "/alive").await;
    assert_eq!(status, 500, "a failed check makes /alive 500");
    let alive: serde_json::Value = serde_json::from_str(&body).expect("alive json");
    agent.stop().await;
    (text, alive["last_check_result"].clone())
}

/// Asserts the series of a check that succeeded: `code="ok"`, a duration, no error, and
/// exactly these phase events.
fn assert_ok(text: &str, kind: &str, events: &[&str]) {
    assert_eq!(metric(text, REQUESTS, &[("type", kind), ("code", "ok")]), Some(1.0), "{kind}");
    assert_eq!(metric(text, DURATION, &[("type", kind)]), Some(1.0), "{kind}: a duration");
    assert!(series(text, ERRORS, kind).next().is_none(), "{kind} has errors");
    let mut observed: Vec<&str> =
        series(text, TRACE, kind).filter_map(|l| l.split("event=\"").nth(1)?.split('"').next()).collect();
    let mut expected = events.to_vec();
    expected.sort_unstable();
    observed.sort_unstable();
    assert_eq!(observed, expected, "{kind}: phase events");
    for event in events {
        assert_eq!(metric(text, TRACE, &[("type", kind), ("event", event)]), Some(1.0), "{kind} {event}");
    }
}

/// Asserts the series of a check that failed at `event`: one request with
/// `code="round_trip_error"`, one error at `event` and at no other event, no duration.
fn assert_failed(text: &str, kind: &str, event: &str) {
    assert_eq!(metric(text, REQUESTS, &[("type", kind), ("code", "round_trip_error")]), Some(1.0), "{kind}");
    assert_eq!(metric(text, ERRORS, &[("type", kind), ("event", event)]), Some(1.0), "{kind}: {event}");
    assert_eq!(series(text, ERRORS, kind).count(), 1, "{kind} is counted under one event only");
    assert_eq!(series(text, REQUESTS, kind).count(), 1, "{kind} is one request");
    assert_eq!(metric(text, DURATION, &[("type", kind)]), None, "{kind}: no duration");
    assert_eq!(metric(text, TRACE, &[("type", kind), ("event", event)]), None, "{kind}: {event} is not done");
}

/// The lines of the series `name` of probe type `kind`.
fn series<'a>(text: &'a str, name: &'a str, kind: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let wanted = format!("type=\"{kind}\"");
    text.lines().filter(move |l| l.starts_with(&format!("{name}{{")) && l.contains(&wanted))
}

#[tokio::test]
async fn tcp_checks_connect_and_send_nothing() {
    let listening = Target::http("127.0.0.1").await;
    let refused = refused_addr("127.0.0.1").await;
    let checks = [
        format!("tcp_ok:tcp://{}", listening.addr),
        format!("tcp_named:tcp://localhost:{}", listening.addr.port()),
        format!("tcp_refused:tcp://{refused}"),
    ];
    let (text, alive) =
        first_round(vec!["--check-timeout=2s".into(), format!("--extra-checks={}", checks.join("|"))]).await;

    assert_ok(&text, "tcp_ok", &["connect_start", "connect_done"]);
    assert_ok(&text, "tcp_named", &["dns_start", "dns_done", "connect_start", "connect_done"]);
    assert_failed(&text, "tcp_refused", "connect_done");
    assert_eq!(metric(&text, TRACE, &[("type", "tcp_refused"), ("event", "connect_start")]), Some(1.0));

    assert_eq!(alive["tcp_ok"], "ok");
    assert_eq!(alive["tcp_named"], "ok");
    let error = alive["tcp_refused"].as_str().expect("text");
    assert!(error.starts_with(&format!("tcp://{refused}: connect {refused}: ")), "{error}");
    assert!(error.to_lowercase().contains("refused"), "{error}");
    assert_eq!(listening.hits.load(Ordering::SeqCst), 0, "a TCP check sends no request");
}

/// A DNS server on `ip` that answers the names of these tests.
async fn dns_server(ip: &str) -> DnsServer {
    let dns = DnsServer::start(ip).await;
    dns.answer("v4.kubenurse.test", Answer::Addresses(vec![self::ip("127.0.0.7")]));
    dns.answer("v6.kubenurse.test", Answer::Addresses(vec![self::ip("::1")]));
    dns.answer("nx.kubenurse.test", Answer::NxDomain);
    dns.answer("servfail.kubenurse.test", Answer::ServFail);
    dns.answer("silent.kubenurse.test", Answer::Silent);
    dns.answer("empty.kubenurse.test", Answer::Addresses(Vec::new()));
    dns
}

#[tokio::test]
async fn dns_checks_against_a_given_server() {
    let dns = dns_server("127.0.0.35").await;
    dns.answer("single", Answer::Addresses(vec![ip("127.0.0.8")]));
    // One address is enough, even when the other query is never answered.
    let a_only = Answer::ByType(Box::new(Answer::Addresses(vec![ip("127.0.0.7")])), Box::new(Answer::Silent));
    dns.answer("a-only.kubenurse.test", a_only);
    let mixed = Answer::ByType(Box::new(Answer::ServFail), Box::new(Answer::Addresses(Vec::new())));
    dns.answer("mixed.kubenurse.test", mixed);
    let server = dns.addr;
    let names = ["v4", "v6", "a-only", "nx", "servfail", "silent", "empty", "mixed"];
    let mut checks: Vec<String> = names.iter().map(|n| format!("{n}:dns://{n}.kubenurse.test@{server}")).collect();
    checks.push(format!("single:dns://single@{server}"));
    // No --dns-servers of its own: the agent's resolver asks a closed port, which these
    // checks must not touch.
    let (text, alive) =
        first_round(vec!["--check-timeout=1s".into(), format!("--extra-checks={}", checks.join("|"))]).await;

    for kind in ["v4", "v6", "a-only", "single"] {
        assert_ok(&text, kind, &["dns_start", "dns_done"]);
        assert_eq!(alive[kind], "ok", "{kind}");
    }
    for (kind, what) in [
        ("nx", "NXDOMAIN"),
        ("servfail", "SERVFAIL"),
        ("silent", "timed out after 1s"),
        ("empty", "no address"),
        ("mixed", "A: SERVFAIL, AAAA: no address"),
    ] {
        assert_failed(&text, kind, "dns_done");
        assert_eq!(metric(&text, TRACE, &[("type", kind), ("event", "dns_start")]), Some(1.0), "{kind}");
        assert_eq!(
            alive[kind].as_str().expect("text"),
            format!("dns://{kind}.kubenurse.test@{server}: lookup {kind}.kubenurse.test: {what}")
        );
    }

    // One A and one AAAA query, once: no retry, no search list, the name as absolute.
    for name in ["v4.kubenurse.test", "nx.kubenurse.test", "servfail.kubenurse.test", "empty.kubenurse.test", "single"]
    {
        assert_eq!((dns.asked(name, "A"), dns.asked(name, "AAAA")), (1, 1), "{name}: {:?}", dns.queries());
    }
    assert!(
        dns.queries().iter().all(|q| q.starts_with("single ") || q.contains(".kubenurse.test ")),
        "{:?}",
        dns.queries()
    );
}

#[tokio::test]
async fn dns_checks_through_the_system_configuration() {
    let dns = dns_server("127.0.0.36").await;
    let names = ["v4", "nx", "servfail", "silent"];
    let checks: Vec<String> = names.iter().map(|n| format!("{n}:dns://{n}.kubenurse.test")).collect();
    let (text, alive) =
        first_round(vec!["--check-timeout=1s".into(), dns.flag(), format!("--extra-checks={}", checks.join("|"))])
            .await;

    assert_ok(&text, "v4", &["dns_start", "dns_done"]);
    assert_eq!(alive["v4"], "ok");
    for kind in ["nx", "servfail", "silent"] {
        assert_failed(&text, kind, "dns_done");
    }
    // The machine's search list may add names (all NXDOMAIN here), so only the name as given
    // is certain; its SERVFAIL or silence outweighs the NXDOMAIN of the others.
    let text_of = |kind: &str| alive[kind].as_str().expect("text").to_owned();
    assert!(text_of("nx").starts_with("dns://nx.kubenurse.test: lookup nx.kubenurse.test"), "{}", text_of("nx"));
    assert!(text_of("nx").contains(": NXDOMAIN"), "{}", text_of("nx"));
    assert!(
        text_of("servfail").starts_with("dns://servfail.kubenurse.test: lookup servfail.kubenurse.test: SERVFAIL"),
        "{}",
        text_of("servfail")
    );
    assert!(text_of("silent").contains("timed out after 1s"), "{}", text_of("silent"));
    assert_eq!(dns.asked("servfail.kubenurse.test", "A"), 1, "one attempt: {:?}", dns.queries());
}

#[tokio::test]
async fn the_system_form_walks_the_search_list_and_a_server_takes_the_name_as_absolute() {
    let dns = DnsServer::start("127.0.0.37").await;
    dns.answer("kubernetes.default.svc.cluster.test", Answer::Addresses(vec![ip("127.0.0.9")]));
    dns.answer("broken.ns.svc.cluster.test", Answer::ServFail);
    let resolver = Resolver::new(
        b"nameserver 127.0.0.254\nsearch ns.svc.cluster.test svc.cluster.test\noptions ndots:5\n",
        b"127.0.0.23 pinned.kubenurse.test\n",
        Some(&DnsServers(vec![dns.addr])),
    )
    .expect("resolver");
    let timeout = Duration::from_secs(2);
    let check = |name: &str, server: Option<SocketAddr>| {
        let query = DnsQuery { name: name.into(), server };
        let resolver = resolver.clone();
        async move { resolver.check_name(&query, tokio::time::Instant::now() + timeout, timeout).await }
    };

    // Fewer dots than ndots: the search list first, until a name has an address.
    let found = check("kubernetes.default", None).await.expect("found through the search list");
    assert_eq!(found, [ip("127.0.0.9")]);
    let mut queries = dns.queries();
    assert_eq!(queries.len(), 4, "{queries:?}");
    // A and AAAA go out together, so only the order of the names is certain.
    queries[..2].sort();
    queries[2..].sort();
    assert_eq!(
        queries,
        [
            "kubernetes.default.ns.svc.cluster.test A",
            "kubernetes.default.ns.svc.cluster.test AAAA",
            "kubernetes.default.svc.cluster.test A",
            "kubernetes.default.svc.cluster.test AAAA"
        ]
    );

    // A SERVFAIL on the way is the failure reported, not the NXDOMAIN of the last name.
    let error = check("broken", None).await.expect_err("no address");
    assert_eq!(error.cause, Some("servfail"));
    assert_eq!(error.to_string(), "lookup broken.ns.svc.cluster.test: SERVFAIL (3 names tried with the search list)");

    // With a server, the name as given, absolute: no search list.
    let error = check("kubernetes.default", Some(dns.addr)).await.expect_err("not absolute");
    assert_eq!((error.cause, error.to_string().as_str()), (Some("nxdomain"), "lookup kubernetes.default: NXDOMAIN"));
    assert_eq!(dns.asked("kubernetes.default", "A"), 1);

    // The hosts file is not a DNS server: a DNS check asks the servers.
    let error = check("pinned.kubenurse.test.", None).await.expect_err("hosts file not read");
    assert_eq!(error.cause, Some("nxdomain"));
}

#[tokio::test]
async fn failed_tcp_and_dns_checks_become_spans_with_their_error_type() {
    let receiver = OtlpReceiver::http("127.0.0.1:0".parse().expect("addr")).await;
    let dns = dns_server("127.0.0.38").await;
    let refused = refused_addr("127.0.0.1").await;
    let server = dns.addr;
    let checks = [
        format!("tcp_refused:tcp://{refused}"),
        format!("nx:dns://nx.kubenurse.test@{server}"),
        format!("servfail:dns://servfail.kubenurse.test@{server}"),
        format!("silent:dns://silent.kubenurse.test@{server}"),
        format!("v4:dns://v4.kubenurse.test@{server}"),
    ];
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=500ms".into(),
        format!("--extra-checks={}", checks.join("|")),
        format!("--otlp-endpoint={}", receiver.endpoint()),
        "--otel-metrics-exporter=none".into(),
    ])
    .await;
    let spans = |r: &OtlpReceiver| -> BTreeMap<String, BTreeMap<String, String>> {
        r.traces()
            .iter()
            .flat_map(|t| &t.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .map(|s| (s.name.clone(), attributes(&s.attributes)))
            .collect()
    };
    let wanted = ["probe tcp_refused", "probe nx", "probe servfail", "probe silent"];
    receiver
        .wait_for("the failed checks' spans", Duration::from_secs(20), |r| {
            let names = spans(r);
            wanted.iter().all(|w| names.contains_key(*w))
        })
        .await;
    wait_round(&agent, 1).await;
    agent.stop().await;

    let spans = spans(&receiver);
    assert!(!spans.contains_key("probe v4"), "a fast healthy check made a span");
    for (name, phase, error_type) in [
        ("probe tcp_refused", "connect_done", "refused"),
        ("probe nx", "dns_done", "nxdomain"),
        ("probe servfail", "dns_done", "servfail"),
        ("probe silent", "dns_done", "timeout"),
    ] {
        let attrs = &spans[name];
        assert_eq!(attrs["kubenurse.failed_phase"], phase, "{name}");
        assert_eq!(attrs["error.type"], error_type, "{name}");
        assert!(!attrs.contains_key("http.request.method"), "{name}: not an HTTP request");
    }
    let nx = &spans["probe nx"];
    assert_eq!(nx["dns.question.name"], "nx.kubenurse.test");
    assert_eq!(nx["server.address"], server.ip().to_string());
    assert_eq!(nx["server.port"], server.port().to_string());
    assert_eq!(nx["url.full"], format!("dns://nx.kubenurse.test@{server}"));
    assert_eq!(spans["probe tcp_refused"]["url.full"], format!("tcp://{refused}"));
}

fn attributes(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> BTreeMap<String, String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    attrs
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            Value::IntValue(i) => Some((kv.key.clone(), i.to_string())),
            _ => None,
        })
        .collect()
}
