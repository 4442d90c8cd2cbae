//! Footprint: RSS of one agent probing 10 neighbours (plus 5 extra checks, 15 probes per
//! round, fresh connections) at a 1 s interval after 60 rounds, and CPU time per round; then
//! the same agent with 5,000 static neighbours (still 10 probed), so the cost of a large
//! neighbourhood shows apart from discovery.
//!
//! `cargo bench --bench footprint` (three runs each, medians); `cargo test --benches`
//! smoke-tests it.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

fn main() {
    let full = full_run();
    let (runs, interval_ms, measured_rounds) = if full { (3, 1000, 60) } else { (1, 50, 16) };
    let port = free_port("127.0.0.2");
    let neighbours = Running(Some(demo_neighbours(10, port)));
    for i in 2..12u8 {
        let addr: SocketAddr = format!("127.0.0.{i}:{port}").parse().expect("addr");
        wait_ok(addr, "/alwayshappy", Duration::from_secs(20));
    }
    let extra: Vec<String> = (2..7u8).map(|i| format!("extra{i}:http://127.0.0.{i}:{port}/alwayshappy")).collect();
    let ten: Vec<String> = (2..12u8).map(|i| format!("node-{}=127.0.0.{i}:{port}", i - 1)).collect();
    // Short names keep the variable under the kernel's 128 KiB limit for one string; every
    // entry points at one of the serving agents, so whichever 10 the ring picks answer.
    let many: Vec<String> = (0..5000u32).map(|i| format!("n{i}=127.0.0.{}:{port}", 2 + i % 10)).collect();

    let variants = [("10 neighbours", ten.join(",")), ("5,000 neighbours, 10 probed", many.join(","))];
    let mut results = Vec::new();
    for (name, list) in &variants {
        let mut rss = Vec::new();
        let mut cpu_per_round = Vec::new();
        for _ in 0..runs {
            let (r, c) = run(list, &extra, interval_ms, measured_rounds);
            rss.push(r);
            cpu_per_round.push(c);
        }
        results.push((name, rss, cpu_per_round));
    }
    drop(neighbours);
    println!(
        "footprint: 5 extra checks + 10 probed neighbours (15 probes, fresh connections), {interval_ms} ms interval, \
         {measured_rounds} rounds, {runs} runs"
    );
    for (name, rss, cpu) in results {
        println!("  {name}:");
        println!("    RSS after the last round: median {:.1} MiB (runs: {rss:.2?})", median(rss.clone()));
        println!("    CPU per round:            median {:.2} ms (runs: {cpu:.2?})", median(cpu.clone()));
    }
}

/// One agent with `neighbours` (a `KUBENURSE_NEIGHBOURS` value) and `extra` checks: its RSS
/// after the last round (MiB) and its CPU time per round from round 10 on (ms).
fn run(neighbours: &str, extra: &[String], interval_ms: u64, measured_rounds: u64) -> (f64, f64) {
    let listen: SocketAddr = format!("127.0.0.100:{}", free_port("127.0.0.100")).parse().expect("addr");
    let child = Running(Some(agent(&[
        ("KUBENURSE_LISTEN_ADDR", listen.to_string()),
        ("KUBENURSE_CHECK_INTERVAL", format!("{interval_ms}ms")),
        ("KUBENURSE_NEIGHBOURS", neighbours.to_owned()),
        ("KUBENURSE_EXTRA_CHECKS", extra.join("|")),
    ])));
    let pid = child.id();
    wait_ok(listen, "/ready", Duration::from_secs(20));
    // CPU from round 10 on (start-up excluded), RSS after the last round.
    wait_rounds(listen, 10.0, Duration::from_secs(120));
    // No polling while measuring: one /metrics read at each end.
    let (r0, cpu0) = (rounds(listen), cpu_time(pid));
    std::thread::sleep(Duration::from_millis(interval_ms * (measured_rounds - 10)));
    let (cpu1, r1) = (cpu_time(pid), rounds(listen));
    let rss = rss_kib(pid) as f64 / 1024.0;
    let cpu = (cpu1 - cpu0).as_secs_f64() * 1000.0 / (r1 - r0).max(1.0);
    let (_, alive) = http_get(listen, "/alive").expect("alive");
    let ok = alive.matches("\": \"ok\"").count();
    assert!(ok >= 15, "probes failing: {ok} ok in {}", &alive[..alive.len().min(2000)]);
    drop(child);
    (rss, cpu)
}

/// A child process, stopped when this is dropped: also when a check fails on the way.
struct Running(Option<std::process::Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            stop(child);
        }
    }
}
