//! Serving: `/alwayshappy` and `/metrics` under load from wrk (requests/s, p99) while the
//! agent probes 10 neighbours every second, and its round lateness meanwhile; then the
//! `/metrics` render time at the largest series count the defaults allow.
//!
//! `cargo bench --bench serving` (needs `wrk`: apt-get install wrk); `cargo test --benches`
//! smoke-tests the render part and a short wrk run if wrk is there.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubenurse::incoming::IncomingChecks;
use kubenurse::metrics::Metrics;
use kubenurse::probe::{Check, Event, FailedPhase, Outcome, Peer, ProbeResult, Target};
use support::*;

fn wrk(url: &str, seconds: u64) -> (String, String) {
    let out = Command::new("wrk")
        .args(["-t2", "-c32", &format!("-d{seconds}s"), "--latency", url])
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).unwrap_or("?").trim().to_owned();
    let p99 = text.lines().find_map(|l| l.trim().strip_prefix("99%")).unwrap_or("?").trim().to_owned();
    (rps, p99)
}

/// One round's worth of results for every probe type the defaults allow: 4 fixed probes and
/// 10 neighbours, each with every event, under several outcomes.
fn synthetic_round() -> Vec<ProbeResult> {
    let mut kinds: Vec<(String, Option<Peer>)> = ["api_server_direct", "api_server_dns", "me_ingress", "me_service"]
        .iter()
        .map(|k| (k.to_string(), None))
        .collect();
    kinds.extend((0..10).map(|i| {
        (
            format!("path_ip-10-0-{i}-1.eu-west-1.compute.internal"),
            Some(Peer {
                node: format!("n{i}"),
                pod: format!("p{i}"),
                source_zone: "zone-a".into(),
                target_zone: "zone-b".into(),
            }),
        )
    }));
    let outcomes = [
        Outcome::Response { status: 200 },
        Outcome::Response { status: 500 },
        Outcome::Response { status: 503 },
        Outcome::Failed { phase: FailedPhase::Dns, error: String::new(), cause: None },
        Outcome::Failed { phase: FailedPhase::Connect, error: String::new(), cause: None },
        Outcome::Failed { phase: FailedPhase::Tls, error: String::new(), cause: None },
        Outcome::Failed { phase: FailedPhase::RoundTrip, error: String::new(), cause: None },
    ];
    let mut out = Vec::new();
    for (kind, peer) in kinds {
        let target = Arc::new(Target {
            kind,
            url: "https://10.0.0.1:8443/alwayshappy".parse().expect("url"),
            check: Check::Http,
            bearer_token: false,
            peer,
        });
        for outcome in &outcomes {
            out.push(ProbeResult {
                target: target.clone(),
                started: Instant::now(),
                started_at: SystemTime::now(),
                events: Event::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (*e, Duration::from_micros(100 * i as u64 + 50)))
                    .collect(),
                response_after: matches!(outcome, Outcome::Response { .. }).then_some(Duration::from_millis(2)),
                elapsed: Duration::from_millis(2),
                outcome: outcome.clone(),
            });
        }
    }
    out
}

fn main() {
    let full = full_run();
    // /metrics render time at the largest default series count.
    let metrics = Metrics::new(
        kubenurse::config::DEFAULT_BUCKETS.to_vec(),
        opentelemetry_sdk::Resource::builder_empty().build(),
        Arc::new(IncomingChecks::default()),
        None,
    )
    .expect("metrics");
    for r in synthetic_round() {
        metrics.record_probe(&r);
    }
    metrics.record_round_lateness(Duration::from_millis(1));
    let text = metrics.render().expect("render");
    let lines = text.lines().filter(|l| !l.starts_with('#')).count();
    let mut times = Vec::new();
    for _ in 0..if full { 300 } else { 5 } {
        let start = Instant::now();
        let t = metrics.render().expect("render");
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(t.len(), text.len());
    }
    println!("serving: /metrics render with 14 probe types x all events and outcomes = {lines} series ({} KiB): median {:.2} ms", text.len() / 1024, median(times));

    if Command::new("wrk").arg("--version").output().is_err() {
        println!("  wrk not installed: load part not run (apt-get install wrk)");
        assert!(!full, "the full benchmark needs wrk");
        return;
    }
    let port = free_port("127.0.0.2");
    let neighbours = demo_neighbours(10, port);
    let static_list: Vec<String> = (2..12u8).map(|i| format!("node-{}=127.0.0.{i}:{port}", i - 1)).collect();
    let listen: SocketAddr = format!("127.0.0.100:{}", free_port("127.0.0.100")).parse().expect("addr");
    let child = agent(&[
        ("KUBENURSE_LISTEN_ADDR", listen.to_string()),
        ("KUBENURSE_CHECK_INTERVAL", "1s".into()),
        ("KUBENURSE_NEIGHBOURS", static_list.join(",")),
    ]);
    wait_ok(listen, "/ready", Duration::from_secs(20));
    let seconds = if full { 15 } else { 1 };
    for path in ["/alwayshappy", "/metrics"] {
        let before = http_get(listen, "/metrics").map(|(_, t)| t).unwrap_or_default();
        let (rps, p99) = wrk(&format!("http://{listen}{path}"), seconds);
        let after = http_get(listen, "/metrics").map(|(_, t)| t).unwrap_or_default();
        let sum = |t: &str| series(t, "kubenurse_round_lateness_seconds_sum").unwrap_or(0.0);
        let count = |t: &str| series(t, "kubenurse_round_lateness_seconds_count").unwrap_or(0.0);
        let rounds = count(&after) - count(&before);
        let late = (sum(&after) - sum(&before)) / rounds.max(1.0) * 1000.0;
        println!("  {path}: {rps} requests/s, p99 {p99} (wrk -t2 -c32 -d{seconds}s); meanwhile {rounds} rounds, mean lateness {late:.2} ms");
    }
    stop(child);
    stop(neighbours);
}
