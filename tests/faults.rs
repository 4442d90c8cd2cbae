//! Faults and hostile input: peers that black-hole or reset, an apiserver that is down at
//! start or holds thousands of objects, SIGTERM mid-round, and clients that send oversized
//! headers, trickle bytes or hold idle connections.

mod common;

use std::time::{Duration, Instant};

use common::agent::{get, get_with, metric, probed_nodes, start, wait_report, wait_round};
use common::dns::{Answer, DnsServer};
use common::fake_apiserver::{node, pod, FakeApiServer, Fault};
use common::process::{free_port, rss_kib};
use common::targets::{refused_addr, resetting_peer, BlackHole, SilentPeer, Target, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn every_bad_peer_maps_to_one_event_and_the_round_ends_at_the_deadline() {
    let ok = Target::http("127.0.0.1").await;
    let hole = BlackHole::start("127.0.0.1").await;
    let silent = SilentPeer::start("127.0.0.1").await;
    let (reset, _reset_task) = resetting_peer("127.0.0.1").await;
    let refused = refused_addr("127.0.0.1").await;
    let untrusted = Target::https("127.0.0.1", &TestCa::new("nobody trusts me")).await;
    let dns = DnsServer::start("127.0.0.1").await;
    dns.answer("silent.kubenurse.test", Answer::Silent);
    let checks = [
        format!("ok:{}", ok.url("/ok")),
        format!("blackhole:http://{}/x", hole.addr),
        format!("silent_tls:https://{}/x", silent.addr),
        format!("silent_http:http://{}/x", silent.addr),
        format!("reset:http://{reset}/x"),
        format!("refused:http://{refused}/x"),
        format!("slow:{}", ok.url("/slow")),
        format!("error:{}", ok.url("/status/500")),
        format!("untrusted:{}", untrusted.https_url("127.0.0.1", "/ok")),
        "silent_dns:http://silent.kubenurse.test:80/x".to_owned(),
    ];
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=1h".into(),
        "--check-timeout=700ms".into(),
        dns.flag(),
        format!("--extra-checks={}", checks.join("|")),
    ])
    .await;
    wait_round(&agent, 1).await;
    let report = agent.reports().borrow().clone().expect("report");
    // The round ended although the black hole, the silent peer, the silent DNS server and the
    // slow target never answered: each of those probes was ended by its deadline.
    assert_eq!(report.results.len(), checks.len(), "every probe has its result");
    for kind in ["blackhole", "silent_tls", "silent_http", "slow", "silent_dns"] {
        let result = report.results.iter().find(|r| r.target.kind == kind).expect("result");
        assert!(result.summary().contains("timed out after 700ms"), "{kind}: {}", result.summary());
    }
    let (_, text) = get(agent.local_addr, "/metrics").await;
    // A deadline counts at the phase still open: the black-holed node at connect (as in the
    // Go agent), the silent TLS peer at the handshake, the silent DNS server at resolution;
    // only a written request left unanswered is a round-trip error.
    for (kind, event) in [
        ("blackhole", "connect_done"),
        ("silent_tls", "tls_handshake_done"),
        ("silent_http", "round_trip_error"),
        ("reset", "round_trip_error"),
        ("refused", "connect_done"),
        ("slow", "round_trip_error"),
        ("error", "status_code_500"),
        ("untrusted", "tls_handshake_done"),
        ("silent_dns", "dns_done"),
    ] {
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kubenurse_errors_total") && l.contains(&format!("type=\"{kind}\"")))
            .collect();
        assert_eq!(series.len(), 1, "{kind}: {series:?}");
        assert_eq!(metric(&text, "kubenurse_errors_total", &[("type", kind), ("event", event)]), Some(1.0), "{kind}");
        if kind != "error" {
            let code = [("type", kind), ("code", "round_trip_error")];
            assert_eq!(metric(&text, "kubenurse_httpclient_requests_total", &code), Some(1.0), "{kind}");
        }
    }
    assert_eq!(metric(&text, "kubenurse_httpclient_requests_total", &[("type", "ok"), ("code", "200")]), Some(1.0));
    agent.stop().await;
}

#[tokio::test]
async fn an_apiserver_down_at_start_is_survived_and_discovery_follows_once_it_is_back() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    api.set_fault(Fault::Outage);
    let neighbour = Target::http("127.0.0.41").await;
    let extra = Target::http("127.0.0.1").await;
    api.upsert_node(node("node-self"));
    api.upsert_node(node("node-a"));
    api.upsert_pod(pod("kubenurse-self", "kubenurse", &[("app", "kubenurse")], "node-self", "127.0.0.40", "Running"));
    api.upsert_pod(pod("kubenurse-a", "kubenurse", &[("app", "kubenurse")], "node-a", "127.0.0.41", "Running"));
    let agent = start(
        &[
            api.agent_args(dir.path()),
            vec![
                "--listen-addr=127.0.0.40:0".into(),
                "--check-interval=200ms".into(),
                "--discovery-backoff-base=100ms".into(),
                "--discovery-backoff-max=1s".into(),
                "--discovery=pods".into(),
                "--neighbour-filter=app=kubenurse".into(),
                "--pod-name=kubenurse-self".into(),
                format!("--neighbour-port={}", neighbour.addr.port()),
                format!("--extra-checks=extra:{}", extra.url("/ok")),
            ],
        ]
        .concat(),
    )
    .await;
    // It starts, probes what it can, and says why the neighbourhood is empty.
    let report = wait_report(&agent, "a round without the apiserver", |r| r.number >= 2).await;
    assert!(probed_nodes(&report).is_empty());
    assert!(report.results.iter().any(|r| r.target.kind == "extra" && r.is_ok()));
    let state = &report.neighbourhood.state;
    assert!(state.contains("pods: ") && state.contains("nodes: "), "both watches are failing: {state}");
    assert_eq!(get(agent.local_addr, "/ready").await.0, 200, "ready: the round ran");

    api.set_fault(Fault::None);
    wait_report(&agent, "node-a discovered after the apiserver came back", |r| {
        probed_nodes(r) == ["node-a"] && r.neighbourhood.state == "ok"
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn five_thousand_pods_and_nodes_are_listed_in_pages_and_ten_are_probed() {
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    api.write_service_account_dir(dir.path());
    for i in 0..5000 {
        let name = format!("node-{i:04}");
        api.upsert_node(node(&name));
        // Pod IPs in 127.0.0.0/8 only; nothing listens on them, so these probes are refused.
        let ip = format!("127.1.{}.{}", i / 250, i % 250 + 1);
        api.upsert_pod(pod(&format!("kubenurse-{i:04}"), "kubenurse", &[("app", "kubenurse")], &name, &ip, "Running"));
    }
    let agent = start(
        &[
            api.agent_args(dir.path()),
            vec![
                "--listen-addr=127.0.0.1:0".into(),
                "--check-interval=1h".into(),
                "--check-timeout=1s".into(),
                "--check-api-server-direct=false".into(),
                "--check-api-server-dns=false".into(),
                "--discovery=pods".into(),
                "--discovery-jitter=0s".into(),
                "--neighbour-filter=app=kubenurse".into(),
                "--pod-name=kubenurse-0000".into(),
                "--neighbour-port=9".into(),
            ],
        ]
        .concat(),
    )
    .await;
    let report = wait_report(&agent, "the first round", |r| r.number >= 1).await;
    assert_eq!(report.neighbourhood.neighbours.len(), 4999);
    let own = kubenurse::selection::ring_hash("node-0000");
    let mut expected: Vec<String> = (1..5000).map(|i| format!("node-{i:04}")).collect();
    expected.sort_by_key(|n| kubenurse::selection::ring_hash(n).wrapping_sub(own));
    expected.truncate(10);
    expected.sort();
    assert_eq!(probed_nodes(&report), expected);
    // Pods in pages of 500, nodes in pages of 100.
    assert_eq!(api.list_calls("/pods"), 10);
    assert_eq!(api.list_calls("/nodes"), 50);
    agent.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_refused_and_the_agent_goes_on() {
    let agent = start(&["--listen-addr=127.0.0.1:0".into(), "--check-interval=1h".into()]).await;
    let big = "x".repeat(100 * 1024);
    let mut stream = tokio::net::TcpStream::connect(agent.local_addr).await.expect("connect");
    let request = format!("GET /alive HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.expect("closed in time");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(get(agent.local_addr, "/alwayshappy").await.0, 200);
    agent.stop().await;
}

#[tokio::test]
async fn slow_loris_and_idle_connections_do_not_stop_serving_or_probing() {
    let target = Target::http("127.0.0.1").await;
    let agent = start(&[
        "--listen-addr=127.0.0.1:0".into(),
        "--check-interval=100ms".into(),
        format!("--extra-checks=ok:{}", target.url("/ok")),
    ])
    .await;
    // 300 idle connections from one address (the agent keeps its share of them open), and 50
    // that trickle a header one byte at a time from five others; requests come from a sixth.
    let connect_from = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(([127, 0, 0, last], 0).into()).expect("bind");
        socket.connect(agent.local_addr).await.expect("connect")
    };
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(connect_from(70).await);
    }
    let mut trickling = Vec::new();
    for i in 0..50u8 {
        let mut s = connect_from(71 + i % 5).await;
        s.write_all(b"GET /alive HTTP/1.1\r\nx-slow: ").await.expect("write");
        trickling.push(s);
    }
    let round = agent.reports().borrow().as_ref().map_or(0, |r| r.number);
    for _ in 0..20 {
        for s in &mut trickling {
            let _ = s.write_all(b"a").await;
        }
        assert_eq!(get(agent.local_addr, "/alwayshappy").await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Rounds go on meanwhile.
    wait_round(&agent, round + 5).await;
    // The trickling clients are cut off at the 10 s header deadline.
    let mut closed = 0;
    for mut s in trickling {
        let mut buf = [0u8; 1024];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 50, "slow-loris connections must be closed by the header deadline");
    drop(idle);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_round_still_exits_cleanly() {
    let slow = Target::http("127.0.0.1").await;
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .envs([
            ("KUBENURSE_LISTEN_ADDR", listen.as_str()),
            ("KUBENURSE_CHECK_INTERVAL", "100ms"),
            ("KUBENURSE_CHECK_TIMEOUT", "2s"),
            ("KUBENURSE_SHUTDOWN_DURATION", "0s"),
            ("KUBENURSE_EXTRA_CHECKS", &format!("slow:{}", slow.url("/slow"))),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until the first slow request is in flight, then signal mid-round.
    let deadline = Instant::now() + Duration::from_secs(20);
    while slow.hits.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the probe never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success());
    // The round in flight ends at its deadline and the agent exits cleanly (the limit only
    // stops a hang).
    let pid = child.id();
    let exit =
        tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(move || child.wait().expect("wait")))
            .await
            .unwrap_or_else(|_| {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                panic!("the agent did not exit after SIGTERM")
            })
            .expect("join");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_origins_keeps_memory_bounded() {
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .envs([("KUBENURSE_LISTEN_ADDR", listen.as_str()), ("KUBENURSE_CHECK_INTERVAL", "1s")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "agent did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss = || rss_kib(pid);
    // 100,000 distinct origins over 8 keep-alive connections (two halves), bounded in count and
    // time. A connection closed at the end of its lifetime is opened again, as clients do.
    let connect = move || async move {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        sender
    };
    let send = move |from: usize, count: usize| async move {
        let mut sender = connect().await;
        let mut reconnects = 0;
        for i in from..from + count {
            let origin = format!("made-up-origin-{i:06}-{}", "x".repeat(40));
            loop {
                let req = http::Request::get("/alwayshappy")
                    .header("host", "a")
                    .header("kubenurse-neighbour-origin", origin.as_str())
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("request");
                let answer = match sender.ready().await {
                    Ok(()) => sender.send_request(req).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(res) => {
                        assert_eq!(res.status(), 200);
                        break;
                    }
                    Err(e) => {
                        reconnects += 1;
                        assert!(reconnects <= 100, "connection closed too often: {e}");
                        sender = connect().await;
                    }
                }
            }
        }
    };
    let started = Instant::now();
    let flood: Vec<_> = (0..8).map(|c| tokio::spawn(send(c * 6_250, 6_250))).collect();
    for f in flood {
        tokio::time::timeout(Duration::from_secs(240), f).await.expect("flood finished in time").expect("flood task");
    }
    let after_first = rss();
    let flood: Vec<_> = (0..8).map(|c| tokio::spawn(send(50_000 + c * 6_250, 6_250))).collect();
    for f in flood {
        tokio::time::timeout(Duration::from_secs(240), f).await.expect("flood finished in time").expect("flood task");
    }
    let after_second = rss();
    let (_, text) = get(addr, "/metrics").await;
    // Capped at 16,384 (fewer if the first origins already aged out on a slow machine).
    let recorded = metric(&text, "kubenurse_neighbourhood_incoming_checks", &[]).expect("gauge");
    assert!(recorded > 0.0 && recorded <= 16_384.0, "the record is capped: {recorded}");
    assert!(after_second <= after_first + 2048, "RSS kept growing: {after_first} KiB then {after_second} KiB");
    assert!(after_second < 64 * 1024, "RSS {after_second} KiB");
    assert_eq!(get_with(addr, "/alwayshappy", &[("kubenurse-neighbour-origin", "real-one")]).await.0, 200);
    eprintln!("100,000 origin requests in {:?}; RSS {after_first} KiB then {after_second} KiB", started.elapsed());
    let _ = child.kill();
    let _ = child.wait();
}
