//! Footprint: RSS of one agent probing 10 neighbours (plus 5 extra checks, ~15 probes per
//! round, fresh connections) at a 1 s interval after 60 rounds, and CPU time per round.
//!
//! `cargo bench --bench footprint` (three runs, medians); `cargo test --benches` smoke-tests it.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

fn main() {
    let full = full_run();
    let (runs, interval_ms, measured_rounds) = if full { (3, 1000, 60.0) } else { (1, 50, 16.0) };
    let port = free_port("127.0.0.2");
    let neighbours = demo_neighbours(10, port);
    for i in 2..12u8 {
        let addr: SocketAddr = format!("127.0.0.{i}:{port}").parse().expect("addr");
        wait_ok(addr, "/alwayshappy", Duration::from_secs(20));
    }
    let static_list: Vec<String> = (2..12u8).map(|i| format!("node-{}=127.0.0.{i}:{port}", i - 1)).collect();
    let extra: Vec<String> = (2..7u8).map(|i| format!("extra{i}:http://127.0.0.{i}:{port}/alwayshappy")).collect();

    let mut rss = Vec::new();
    let mut cpu_per_round = Vec::new();
    for _ in 0..runs {
        let listen: SocketAddr = format!("127.0.0.100:{}", free_port("127.0.0.100")).parse().expect("addr");
        let child = agent(&[
            ("KUBENURSE_LISTEN_ADDR", listen.to_string()),
            ("KUBENURSE_CHECK_INTERVAL", format!("{interval_ms}ms")),
            ("KUBENURSE_NEIGHBOURS", static_list.join(",")),
            ("KUBENURSE_EXTRA_CHECKS", extra.join("|")),
        ]);
        let pid = child.id();
        wait_ok(listen, "/ready", Duration::from_secs(20));
        // CPU from round 10 on (start-up excluded), RSS after the last round.
        wait_rounds(listen, 10.0, Duration::from_secs(120));
        // No polling while measuring: one /metrics read at each end.
        let (r0, cpu0) = (rounds(listen), cpu_time(pid));
        std::thread::sleep(Duration::from_millis(interval_ms * (measured_rounds as u64 - 10)));
        let (cpu1, r1) = (cpu_time(pid), rounds(listen));
        rss.push(rss_kib(pid) as f64 / 1024.0);
        cpu_per_round.push((cpu1 - cpu0).as_secs_f64() * 1000.0 / (r1 - r0).max(1.0));
        let (_, alive) = http_get(listen, "/alive").expect("alive");
        assert!(alive.contains("\"path_node-10\": \"ok\""), "neighbour probes failing: {alive}");
        stop(child);
    }
    stop(neighbours);
    println!(
        "footprint: 10 neighbours + 5 extra checks, {interval_ms} ms interval, {measured_rounds} rounds, {runs} runs"
    );
    println!("  RSS after the last round: median {:.1} MiB (runs: {:?})", median(rss.clone()), rss);
    println!("  CPU per round:            median {:.2} ms (runs: {:?})", median(cpu_per_round.clone()), cpu_per_round);
}
