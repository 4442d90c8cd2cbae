//! Measurement fidelity: the request duration the agent reports for a loopback target,
//! against a minimal baseline doing the same TCP connect + HTTP GET in a tight loop; then the
//! same while two busy processes load both cores, together with the agent's own round
//! lateness, so a starved prober is visible instead of looking like network latency.
//!
//! `cargo bench --bench fidelity`; `cargo test --benches` smoke-tests it.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubenurse::probe::{Check, Prober, ProberSettings, Resolver, Target};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 server on its own thread and runtime: 200, empty body, then close.
fn target_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                });
            }
        });
    });
    addr
}

/// The baseline: connect, write a GET, read until the end of the response head.
async fn baseline(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 1024];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    start.elapsed()
}

fn busy(n: usize) -> Vec<Child> {
    (0..n).map(|_| Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("busy loop")).collect()
}

fn stats(label: &str, agent: &mut [f64], base: &mut [f64]) {
    let (a50, a99) = (percentile(agent, 0.5), percentile(agent, 0.99));
    let (b50, b99) = (percentile(base, 0.5), percentile(base, 0.99));
    println!(
        "  {label}: agent p50 {a50:.1} µs p99 {a99:.1} µs | baseline p50 {b50:.1} µs p99 {b99:.1} µs | overhead p50 {:.1} µs p99 {:.1} µs",
        a50 - b50,
        a99 - b99
    );
}

/// Mean round lateness of an agent binary over `window`, from its own histogram.
fn lateness(addr: SocketAddr, window: Duration) -> (f64, f64) {
    let read = || {
        let (_, t) = http_get(addr, "/metrics").expect("metrics");
        (series(&t, "kubenurse_round_lateness_seconds_sum").unwrap_or(0.0), rounds(addr))
    };
    let (s0, n0) = read();
    std::thread::sleep(window);
    let (s1, n1) = read();
    ((s1 - s0) / (n1 - n0).max(1.0) * 1000.0, n1 - n0)
}

fn main() {
    let full = full_run();
    let (samples, window) = if full { (3000, Duration::from_secs(10)) } else { (30, Duration::from_millis(500)) };
    let addr = target_server();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let tls =
        kubenurse::tls::probe_tls(Path::new("/nonexistent/ca.crt"), None, false, &mut kubenurse::tls::Reloader::new())
            .expect("tls");
    let prober = Prober::new(ProberSettings {
        tls,
        resolver: Resolver::new(b"", b"", None).expect("resolver"),
        timeout: Duration::from_secs(5),
        token_file: "/nonexistent/token".into(),
        own_pod: "bench".into(),
        reuse_connections: false,
    });
    let target = Arc::new(Target {
        kind: "bench".into(),
        url: format!("http://{addr}/ok").parse().expect("url"),
        check: Check::Http,
        bearer_token: false,
        peer: None,
    });
    let measure = |n: usize| {
        rt.block_on(async {
            let (mut agent, mut base) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for _ in 0..n {
                let r = prober.probe(target.clone()).await;
                assert!(r.is_ok(), "{}", r.summary());
                agent.push(r.response_after.expect("response").as_secs_f64() * 1e6);
                base.push(baseline(addr).await.as_secs_f64() * 1e6);
            }
            (agent, base)
        })
    };
    let _ = SystemTime::now();
    measure(samples / 10); // warm-up
    println!("fidelity: {samples} fresh-connection GETs to a loopback target, alternating agent probe and baseline");
    let (mut a, mut b) = measure(samples);
    stats("idle  ", &mut a, &mut b);
    let load = busy(2);
    let (mut a, mut b) = measure(samples);
    stats("loaded", &mut a, &mut b);
    for mut c in load {
        let _ = c.kill();
        let _ = c.wait();
    }

    // Round lateness reported by an agent process (100 ms interval), idle and with both cores busy.
    let listen: SocketAddr = format!("127.0.0.100:{}", free_port("127.0.0.100")).parse().expect("addr");
    let child = agent(&[
        ("KUBENURSE_LISTEN_ADDR", listen.to_string()),
        ("KUBENURSE_CHECK_INTERVAL", "100ms".into()),
        ("KUBENURSE_EXTRA_CHECKS", format!("bench:http://{addr}/ok")),
    ]);
    wait_ok(listen, "/ready", Duration::from_secs(20));
    let (idle, n_idle) = lateness(listen, window);
    let load = busy(4);
    let (loaded, n_loaded) = lateness(listen, window);
    for mut c in load {
        let _ = c.kill();
        let _ = c.wait();
    }
    stop(child);
    println!("  round lateness (agent's own histogram, 100 ms interval): idle mean {idle:.2} ms over {n_idle} rounds, 4 busy processes mean {loaded:.2} ms over {n_loaded} rounds");
}
