//! `kubenurse demo`: several agents in one process on loopback addresses, probing each other
//! through static neighbours, with a per-pair status table every round.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::agent::Agent;
use crate::config::{Config, DemoArgs, StaticNeighbour, StaticNeighbours};
use crate::probe::Outcome;
use crate::scheduler::RoundReport;

/// The node name and address of demo agent `i` (0-based).
fn node(i: u8, port: u16) -> (String, SocketAddr) {
    (format!("node-{}", i + 1), SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i + 2)), port))
}

/// Runs the demo until Ctrl-C (or `args.rounds`); returns the exit status.
pub async fn run(args: DemoArgs, base: Config) -> i32 {
    let nodes: Vec<(String, SocketAddr)> = (0..args.nodes).map(|i| node(i, args.port)).collect();
    let zone = |i: usize| (args.zones > 0).then(|| format!("zone-{}", i % usize::from(args.zones) + 1));
    let mut agents = Vec::new();
    for (i, (name, addr)) in nodes.iter().enumerate() {
        let mut config = base.clone();
        config.zone = zone(i);
        config.listen_addr = *addr;
        config.pod_name = Some(name.clone());
        config.node_name = Some(name.clone());
        config.check_interval = args.interval;
        config.check_timeout = config.check_timeout.min(args.interval);
        config.shutdown_duration = Duration::ZERO;
        config.kubernetes_service_host = None;
        config.kubeconfig = None;
        config.use_tls = false;
        config.neighbours = Some(StaticNeighbours(
            nodes
                .iter()
                .enumerate()
                .filter(|(_, (other, _))| other != name)
                .map(|(j, (other, a))| StaticNeighbour {
                    node: other.clone(),
                    zone: zone(j),
                    addresses: vec![(a.ip().to_string(), a.port())],
                })
                .collect(),
        ));
        // Bind every listener before any agent starts probing, so round 1 finds its peers.
        match Agent::bind(config).await {
            Ok(bound) => agents.push(bound),
            Err(e) => {
                eprintln!("demo: cannot start agent {name} on {addr}: {e}");
                return 1;
            }
        }
    }
    let agents: Vec<Agent> = agents.into_iter().map(crate::agent::Bound::run).collect();
    println!(
        "kubenurse demo: {} agents on {}…; /metrics and /alive on each, e.g. http://{}/alive",
        nodes.len(),
        nodes[0].1.ip(),
        nodes[0].1
    );
    let mut first = agents[0].reports();
    let mut printed = 0;
    let interrupted = loop {
        tokio::select! {
            changed = first.changed() => if changed.is_err() { break false },
            _ = tokio::signal::ctrl_c() => break true,
        }
        // Give the other agents' rounds (started at about the same time) a moment to finish.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reports: Vec<_> = agents.iter().map(|a| a.reports().borrow().clone()).collect();
        print!("{}", table(&nodes, &reports));
        printed += 1;
        if args.rounds > 0 && printed >= args.rounds {
            break false;
        }
    };
    if interrupted {
        println!("stopping");
    }
    for agent in agents {
        agent.stop().await;
    }
    0
}

/// One row per probing agent, one column per probed agent: latency or the failing phase.
pub fn table(nodes: &[(String, SocketAddr)], reports: &[Option<std::sync::Arc<RoundReport>>]) -> String {
    let width = nodes.iter().map(|(n, _)| n.len()).max().unwrap_or(6).max(12);
    let mut out = String::new();
    let round = reports.first().and_then(|r| r.as_ref()).map_or(0, |r| r.number);
    let _ = write!(out, "\nround {round:<5} {:>width$}", "from \\ to");
    for (name, _) in nodes {
        let _ = write!(out, " {name:>width$}");
    }
    out.push('\n');
    for ((name, _), report) in nodes.iter().zip(reports) {
        let _ = write!(out, "{:>w$}", name, w = width + 12);
        for (target, _) in nodes {
            let cell = if target == name { "-".to_owned() } else { cell(report.as_deref(), &format!("path_{target}")) };
            let _ = write!(out, " {cell:>width$}");
        }
        out.push('\n');
    }
    out
}

fn cell(report: Option<&RoundReport>, kind: &str) -> String {
    let Some(result) = report.and_then(|r| r.results.iter().find(|p| p.target.kind == kind)) else {
        return "…".to_owned();
    };
    match &result.outcome {
        Outcome::Response { status: 200 } | Outcome::Reached => {
            format!("{:.2} ms", result.elapsed.as_secs_f64() * 1000.0)
        }
        Outcome::Response { status } => format!("HTTP {status}"),
        Outcome::Failed { phase, .. } => phase.label().to_owned(),
    }
}
