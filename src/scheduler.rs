//! Probe rounds: every interval, all probes in parallel; a late round is measured, never
//! stacked on the next one. Each round's results are published for `/alive` and the demo.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::config::{bracket, Config};
use crate::discovery::{Discovery, Neighbour, Neighbourhood};
use crate::metrics::Metrics;
use crate::phase::{Peer, ProbeResult, Target};
use crate::probe::{pool_key, Prober};
use crate::selection::select;
use crate::telemetry::ProbeSpans;

/// A probe that is not run, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub kind: String,
    pub reason: String,
}

/// What one round found.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub number: u64,
    pub results: Vec<ProbeResult>,
    pub skipped: Vec<Skipped>,
    pub neighbourhood: Neighbourhood,
    /// How late the round started against its schedule.
    pub lateness: Duration,
    pub duration: Duration,
}

impl RoundReport {
    /// Every probe ok or skipped, and discovery fine.
    pub fn healthy(&self) -> bool {
        self.results.iter().all(ProbeResult::is_ok) && matches!(self.neighbourhood.state.as_str(), "ok" | "skipped")
    }
}

/// The fixed probes (apiserver, ingress, service, extra checks) and those that are skipped.
pub fn fixed_targets(config: &Config) -> (Vec<Arc<Target>>, Vec<Skipped>) {
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    let mut add = |kind: &str, enabled: bool, url: Option<String>, bearer_token: bool, missing: &str| {
        let target = match (enabled, url) {
            (false, _) => Err(format!("disabled by KUBENURSE_CHECK_{}=false", kind.to_ascii_uppercase())),
            (true, None) => Err(missing.to_owned()),
            (true, Some(url)) => url.parse::<http::Uri>().map_err(|e| format!("invalid URL {url}: {e}")),
        };
        match target {
            Ok(url) => targets.push(Arc::new(Target { kind: kind.to_owned(), url, bearer_token, peer: None })),
            Err(reason) => skipped.push(Skipped { kind: kind.to_owned(), reason }),
        }
    };
    let port = config.kubernetes_service_port;
    let api_direct = config.kubernetes_service_host.as_ref().map(|h| format!("https://{}:{port}/version", bracket(h)));
    let api_dns = config
        .kubernetes_service_host
        .as_ref()
        .map(|_| format!("https://{}:{port}/version", bracket(&config.kubernetes_service_dns)));
    let no_apiserver = "no apiserver configured (KUBERNETES_SERVICE_HOST is not set)";
    add("api_server_direct", config.check_api_server_direct, api_direct, true, no_apiserver);
    add("api_server_dns", config.check_api_server_dns, api_dns, true, no_apiserver);
    let ingress = config.ingress_url.as_ref().map(|u| format!("{u}/alwayshappy"));
    add("me_ingress", config.check_me_ingress, ingress, false, "KUBENURSE_INGRESS_URL is not set");
    let service = config.service_url.as_ref().map(|u| format!("{u}/alwayshappy"));
    add("me_service", config.check_me_service, service, false, "KUBENURSE_SERVICE_URL is not set");
    for check in config.extra_checks() {
        add(&check.name, true, Some(check.url.clone()), false, "");
    }
    (targets, skipped)
}

/// Runs the rounds.
pub struct Scheduler {
    pub interval: Duration,
    pub fixed: Vec<Arc<Target>>,
    pub skipped: Vec<Skipped>,
    pub check_neighbourhood: bool,
    pub neighbour_limit: usize,
    pub neighbour_port: u16,
    pub neighbour_tls: bool,
    pub own_node: Option<String>,
    pub discovery: Discovery,
    pub prober: Arc<Prober>,
    pub metrics: Arc<Metrics>,
    /// Slow and failed probes become spans when traces are exported.
    pub spans: Option<Arc<ProbeSpans>>,
    pub reports: watch::Sender<Option<Arc<RoundReport>>>,
}

impl Scheduler {
    /// Runs rounds until `stop` turns true; the round in flight is finished first.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        // The first round waits (a bounded time) for discovery, so it probes real neighbours.
        tokio::select! {
            _ = self.discovery.wait_synced(self.interval.max(Duration::from_secs(5))) => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut number = 0;
        loop {
            let scheduled = tokio::select! {
                at = ticker.tick() => at.into_std(),
                _ = crate::shutdown::stopped(&mut stop) => return,
            };
            number += 1;
            let lateness = Instant::now().saturating_duration_since(scheduled);
            self.metrics.record_round_lateness(lateness);
            let report = self.round(number, lateness).await;
            self.reports.send_replace(Some(Arc::new(report)));
        }
    }

    async fn round(&self, number: u64, lateness: Duration) -> RoundReport {
        let started = Instant::now();
        let neighbourhood = if self.check_neighbourhood {
            self.discovery.neighbourhood()
        } else {
            Neighbourhood { state: "skipped".into(), ..Default::default() }
        };
        let mut targets = self.fixed.clone();
        let own_node = self.own_node.clone().or_else(|| neighbourhood.own_node.clone()).unwrap_or_default();
        let chosen =
            select(&own_node, self.neighbour_limit, neighbourhood.neighbours.clone(), |n| n.node_name.as_str());
        targets.extend(chosen.iter().filter_map(|n| self.neighbour_target(n)));
        self.prober.retain_idle(|key| targets.iter().any(|t| pool_key(&t.url) == key));

        let results = futures::future::join_all(targets.into_iter().map(|t| self.prober.probe(t))).await;
        for result in &results {
            self.metrics.record_probe(result);
            if let Some(spans) = &self.spans {
                spans.record(result);
            }
            if !result.is_ok() {
                tracing::debug!(probe = %result.target.kind, error = %result.summary(), "probe failed");
            }
        }
        RoundReport {
            number,
            results,
            skipped: self.skipped.clone(),
            neighbourhood,
            lateness,
            duration: started.elapsed(),
        }
    }

    fn neighbour_target(&self, n: &Neighbour) -> Option<Arc<Target>> {
        let scheme = if self.neighbour_tls { "https" } else { "http" };
        let port = n.port.unwrap_or(self.neighbour_port);
        let url = format!("{scheme}://{}:{port}/alwayshappy", bracket(&n.pod_ip)).parse().ok()?;
        Some(Arc::new(Target {
            kind: format!("path_{}", n.node_name),
            url,
            bearer_token: false,
            peer: Some(Peer { node: n.node_name.clone(), pod: n.pod_name.clone() }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(config: &[&str]) -> (Vec<String>, Vec<String>) {
        let config =
            Config::from_flags(config.iter().copied()).expect("config");
        let (targets, skipped) = fixed_targets(&config);
        (targets.iter().map(|t| t.url.to_string()).collect(), skipped.iter().map(|s| s.kind.clone()).collect())
    }

    #[test]
    fn unconfigured_probes_are_skipped() {
        let (targets, skipped) = kinds(&[]);
        assert!(targets.is_empty());
        assert_eq!(skipped, ["api_server_direct", "api_server_dns", "me_ingress", "me_service"]);
    }

    #[test]
    fn configured_probes_get_their_urls() {
        let (targets, skipped) = kinds(&[
            "--kubernetes-service-host=fd00::1",
            "--kubernetes-service-port=6443",
            "--ingress-url=https://nurse.example.test/",
            "--service-url=http://kubenurse.kube-system.svc:8080",
            "--check-api-server-dns=false",
            "--extra-checks=dns:http://127.0.0.1:53/x",
        ]);
        assert_eq!(
            targets,
            [
                "https://[fd00::1]:6443/version",
                "https://nurse.example.test/alwayshappy",
                "http://kubenurse.kube-system.svc:8080/alwayshappy",
                "http://127.0.0.1:53/x"
            ]
        );
        assert_eq!(skipped, ["api_server_dns"]);
    }
}
