//! Neighbour selection: time to pick 10 of 10,000 nodes, and churn when one node of 1,000
//! leaves (how many other agents change their set).
//!
//! `cargo bench --bench selection`; `cargo test --benches` smoke-tests it.

mod support;

use std::collections::BTreeSet;
use std::time::Instant;

use kubenurse::selection::select;
use support::*;

fn main() {
    let runs = if full_run() { 500 } else { 5 };
    let nodes: Vec<String> = (0..10_000)
        .map(|i| format!("ip-10-{}-{}-{}.eu-west-1.compute.internal", i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let mut times = Vec::new();
    for r in 0..runs {
        let own = &nodes[r % nodes.len()];
        let candidates: Vec<&str> = nodes.iter().map(String::as_str).filter(|n| n != own).collect();
        let start = Instant::now();
        let chosen = select(own, 10, candidates, |n| n);
        times.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(chosen.len(), 10);
    }
    println!("selection: 10 of 10,000 nodes (hashing included), {runs} runs: median {:.0} µs", median(times));

    let cluster: Vec<&str> = nodes[..1000].iter().map(String::as_str).collect();
    let sets = |members: &[&str]| -> Vec<BTreeSet<String>> {
        members
            .iter()
            .map(|own| {
                select(own, 10, members.iter().copied().filter(|n| n != own).collect(), |n| n)
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    };
    let before = sets(&cluster);
    let leaving = cluster[500];
    let remaining: Vec<&str> = cluster.iter().copied().filter(|n| *n != leaving).collect();
    let after = sets(&remaining);
    let changed =
        cluster.iter().zip(&before).filter(|(n, _)| **n != leaving).zip(&after).filter(|((_, b), a)| b != a).count();
    println!(
        "  churn: one node of 1,000 leaves -> {changed} of 999 agents change their set (the {changed} that probed it)"
    );
    assert_eq!(changed, 10);
}
