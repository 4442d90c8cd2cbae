//! What a round spends on the neighbourhood, in-process, at 5,000 neighbours (limit 10):
//! reading it from discovery and checking that it did not change (every round), and
//! choosing the neighbours again (only when it changed), against what rounds did before:
//! copy the neighbourhood, hash every node name, choose.
//!
//! `cargo bench --bench rounds`; `cargo test --benches` smoke-tests it.

mod support;

use std::sync::Arc;
use std::time::Instant;

use kubenurse::config::{Config, StaticNeighbour, StaticNeighbours};
use kubenurse::discovery::{Discovery, Source};
use kubenurse::selection::{nearest, ring_hash, select};
use kubenurse::targets::Targets;
use support::*;

/// Median microseconds of `runs` calls of `f`.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    let times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    median(times)
}

fn main() {
    let runs = if full_run() { 500 } else { 5 };
    let nodes = 5000;
    let list = (0..nodes)
        .map(|i| StaticNeighbour {
            node: format!("ip-10-{}-{}-{}.eu-west-1.compute.internal", i / 65536, (i / 256) % 256, i % 256),
            zone: None,
            addresses: vec![(format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256), 8080)],
        })
        .collect();
    let discovery = Discovery::start(Source::Static(StaticNeighbours(list), None));
    let targets = Targets::from_config(&Config::from_flags(["--neighbour-limit=10"]).expect("config"));
    let own = "ip-10-0-0-7.eu-west-1.compute.internal";
    let last = discovery.shared_neighbourhood();

    let read = time(runs, || {
        let hood = discovery.shared_neighbourhood();
        assert!(std::hint::black_box(Arc::ptr_eq(&hood, &last)), "unchanged");
    });
    let neighbours = &last.neighbours[..];
    let choose = time(runs, || {
        let hashes: Vec<u64> = neighbours.iter().map(|n| n.node_hash).collect();
        let chosen: Vec<_> = nearest(ring_hash(own), 10, &hashes)
            .into_iter()
            .flat_map(|i| targets.neighbour(&neighbours[i], None))
            .collect();
        assert_eq!(std::hint::black_box(chosen).len(), 10);
    });
    let before = time(runs, || {
        let copy = discovery.neighbourhood();
        let chosen = select(own, 10, copy.neighbours.clone(), |n| n.node_name.as_str());
        let chosen: Vec<_> = chosen.iter().flat_map(|n| targets.neighbour(n, None)).collect();
        assert_eq!(std::hint::black_box(chosen).len(), 10);
    });
    println!("rounds: the neighbourhood's share of a round, {nodes} neighbours, limit 10, {runs} runs (medians)");
    println!("  every round: read it and see it unchanged (one shared pointer): {read:.2} µs");
    println!("  when it changed: choose again from the kept node hashes:     {choose:.0} µs");
    println!("  before, every round: copy it, hash every node name, choose:   {before:.0} µs");
}
