//! Shared pieces of the benchmarks: running the release binary, reading what it reports and
//! what it costs the machine. Everything runs on loopback.
#![allow(dead_code)]

#[path = "../../tests/common/process.rs"]
mod process;
#[allow(unused_imports)] // each benchmark uses a different subset
pub use process::{cpu_time, free_port, rss_kib};

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `cargo bench` passes `--bench`; `cargo test --benches` does not: then the benchmark runs
/// a short smoke version so its code is exercised without taking minutes.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Starts the agent binary with `envs` (nothing else from the environment).
pub fn agent(envs: &[(&str, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubenurse")
}

/// `kubenurse demo` agents on 127.0.0.2… as neighbours that only serve (1 h interval).
pub fn demo_neighbours(n: u8, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kubenurse"))
        .env_clear()
        .args(["demo", "--nodes", &n.to_string(), "--port", &port.to_string(), "--interval", "1h"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo")
}

/// Blocking HTTP GET (status, body) with a fresh connection.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// The value of an unlabelled series in a Prometheus exposition.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Rounds done so far, from `/metrics`.
pub fn rounds(addr: SocketAddr) -> f64 {
    http_get(addr, "/metrics").and_then(|(_, t)| series(&t, "kubenurse_round_lateness_seconds_count")).unwrap_or(0.0)
}

/// Waits until `rounds(addr) >= n` (bounded by `limit`).
pub fn wait_rounds(addr: SocketAddr, n: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while rounds(addr) < n {
        assert!(Instant::now() < deadline, "{n} rounds not reached in {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `path` answers 200 (bounded); returns how long that took.
pub fn wait_ok(addr: SocketAddr, path: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while http_get(addr, path).map(|(s, _)| s) != Some(200) {
        assert!(start.elapsed() < limit, "{path} not 200 within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}
