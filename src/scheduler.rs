//! Probe rounds: every interval, all probes in parallel, each in a task of its own; a late
//! round is measured, never stacked on the next one. Each round's results are recorded,
//! logged (rate-limited) and published for `/alive` and the demo.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::discovery::{Discovery, Neighbourhood};
use crate::liveness::Heartbeat;
use crate::metrics::Metrics;
use crate::probe::{FailedPhase, ProbeResult, Prober, Target};
use crate::ratelimit::FailureStreak;
use crate::selection::{nearest, ring_hash};
use crate::targets::{Skipped, Targets};
use crate::telemetry::ProbeSpans;

/// At most one reminder per failing probe type in this long.
const REMIND_EVERY: Duration = Duration::from_secs(5 * 60);

/// What one round found.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub number: u64,
    pub results: Vec<ProbeResult>,
    pub skipped: Vec<Skipped>,
    /// Shared with discovery (and with the rounds before, while nothing changed).
    pub neighbourhood: Arc<Neighbourhood>,
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

/// Runs the rounds.
pub struct Scheduler {
    pub interval: Duration,
    pub targets: Targets,
    pub check_neighbourhood: bool,
    pub neighbour_limit: usize,
    pub own_node: Option<String>,
    pub discovery: Discovery,
    pub prober: Arc<Prober>,
    pub metrics: Arc<Metrics>,
    /// Slow and failed probes become spans when traces are exported.
    pub spans: Option<Arc<ProbeSpans>>,
    pub reports: watch::Sender<Option<Arc<RoundReport>>>,
    /// Beats after every round, for `/livez`.
    pub heartbeat: Arc<Heartbeat>,
}

/// How long the first round waits at most for discovery, with rounds every `interval`.
pub fn discovery_wait(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(5))
}

impl Scheduler {
    /// Runs rounds until `stop` turns true; the round in flight is finished first.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        // The first round waits (a bounded time) for discovery, so it probes real neighbours.
        tokio::select! {
            _ = self.discovery.wait_synced(discovery_wait(self.interval)) => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failures = FailureLog::default();
        let mut chosen = Chosen::default();
        let mut number = 0;
        loop {
            let scheduled = tokio::select! {
                at = ticker.tick() => at.into_std(),
                _ = crate::shutdown::stopped(&mut stop) => return,
            };
            number += 1;
            let lateness = Instant::now().saturating_duration_since(scheduled);
            let report = self.round(number, lateness, &mut chosen).await;
            failures.record(&report.results, Instant::now());
            self.reports.send_replace(Some(Arc::new(report)));
            self.heartbeat.beat();
        }
    }

    async fn round(&self, number: u64, lateness: Duration, chosen: &mut Chosen) -> RoundReport {
        let started = Instant::now();
        // Asked even with neighbour probes off: the own-node watch behind `/ready` reports its
        // failures here too.
        let neighbourhood = self.discovery.shared_neighbourhood();
        let changed = chosen.update(
            &neighbourhood,
            self.own_node.as_deref(),
            self.neighbour_limit,
            self.check_neighbourhood,
            &self.targets,
        );
        if changed {
            self.metrics.set_own_zone(neighbourhood.own_zone.as_deref());
        }
        let mut targets = Vec::with_capacity(self.targets.fixed().len() + chosen.targets.len());
        targets.extend_from_slice(self.targets.fixed());
        targets.extend_from_slice(&chosen.targets);
        self.prober.retain_idle(&targets);
        // Before anything of this round is recorded: the metrics may start a new generation.
        self.metrics.start_round(targets.iter().map(|t| t.kind.as_str()));
        self.metrics.record_round_lateness(lateness);

        let prober = &self.prober;
        let results = probe_all(&targets, |target| {
            let prober = prober.clone();
            async move { prober.probe(target).await }
        })
        .await;
        for result in &results {
            self.metrics.record_probe(result);
            if let Some(spans) = &self.spans {
                spans.record(result);
            }
        }
        RoundReport {
            number,
            results,
            skipped: self.targets.skipped().to_vec(),
            neighbourhood,
            lateness,
            duration: started.elapsed(),
        }
    }
}

/// The neighbour targets of the current neighbourhood. Choosing them is a pass over every
/// neighbour, so it happens only when discovery hands out a new neighbourhood; a round
/// otherwise compares two pointers, whatever the size of the cluster.
#[derive(Default)]
struct Chosen {
    /// The neighbourhood the choice was made from (`None` before the first round).
    from: Option<Arc<Neighbourhood>>,
    targets: Vec<Arc<Target>>,
}

impl Chosen {
    /// Chooses again if `neighbourhood` is not the one of the last choice; true when it did.
    /// An unknown own node (`configured` is the configured one) is reported in the
    /// neighbourhood state; the ring then starts at the hash of "" so that probing goes on.
    fn update(
        &mut self,
        neighbourhood: &Arc<Neighbourhood>,
        configured: Option<&str>,
        limit: usize,
        enabled: bool,
        targets: &Targets,
    ) -> bool {
        if self.from.as_ref().is_some_and(|from| Arc::ptr_eq(from, neighbourhood)) {
            return false;
        }
        let own_node = neighbourhood.own_node.as_deref().or(configured).unwrap_or_default();
        let neighbours = if enabled { &neighbourhood.neighbours[..] } else { &[] };
        let hashes: Vec<u64> = neighbours.iter().map(|n| n.node_hash).collect();
        let keep = nearest(ring_hash(own_node), limit, &hashes);
        let own_zone = neighbourhood.own_zone.as_deref();
        self.targets = keep.into_iter().flat_map(|i| targets.neighbour(&neighbours[i], own_zone)).collect();
        self.from = Some(neighbourhood.clone());
        true
    }
}

/// Runs `probe` on every target, each in a task of its own so the runtime schedules them
/// independently. Results come back in the order of `targets`; a probe whose task panicked
/// is reported as failed rather than losing the round.
async fn probe_all<F, Fut>(targets: &[Arc<Target>], probe: F) -> Vec<ProbeResult>
where
    F: Fn(Arc<Target>) -> Fut,
    Fut: Future<Output = ProbeResult> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut index = HashMap::with_capacity(targets.len());
    for (i, target) in targets.iter().enumerate() {
        index.insert(tasks.spawn(probe(target.clone())).id(), i);
    }
    let mut results: Vec<Option<ProbeResult>> = vec![None; targets.len()];
    while let Some(joined) = tasks.join_next_with_id().await {
        let (id, result) = match joined {
            Ok((id, result)) => (id, Some(result)),
            Err(e) => (e.id(), None),
        };
        if let Some(&i) = index.get(&id) {
            results[i] = result;
        }
    }
    results
        .into_iter()
        .zip(targets)
        .map(|(result, target)| {
            result.unwrap_or_else(|| {
                let error = format!("{}: the probe crashed", target.operation());
                ProbeResult::unobserved(target.clone(), FailedPhase::RoundTrip, error)
            })
        })
        .collect()
}

/// The failure log: one `warn` line when a probe type starts failing, a reminder at most
/// every [`REMIND_EVERY`] while it keeps failing, one `info` line when it recovers.
#[derive(Default)]
struct FailureLog {
    /// The failing probe types.
    streaks: HashMap<String, FailureStreak>,
}

impl FailureLog {
    fn record(&mut self, results: &[ProbeResult], now: Instant) {
        for result in results {
            let kind = &result.target.kind;
            let url = result.target.location();
            if result.is_ok() {
                if let Some(recovery) = self.streaks.remove(kind).and_then(|mut s| s.succeeded(now)) {
                    tracing::info!(
                        probe = %kind,
                        target = %url,
                        failures = recovery.failures,
                        after = %humantime::format_duration(whole_seconds(recovery.after)),
                        "probe recovered"
                    );
                }
                continue;
            }
            let streak = self.streaks.entry(kind.clone()).or_insert_with(|| FailureStreak::new(REMIND_EVERY));
            let Some(report) = streak.failed(now) else { continue };
            let phase = result.error_event().unwrap_or_default();
            let error = result.summary();
            if report.first {
                tracing::warn!(probe = %kind, target = %url, %phase, %error, "probe failed");
            } else {
                tracing::warn!(
                    probe = %kind,
                    target = %url,
                    %phase,
                    %error,
                    failures = report.failures,
                    unreported = report.suppressed,
                    since = %humantime::format_duration(whole_seconds(report.since)),
                    "probe still failing"
                );
            }
        }
        // Types no longer probed (a neighbour that left) are forgotten.
        self.streaks.retain(|kind, _| results.iter().any(|r| r.target.kind == *kind));
    }
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Neighbour;
    use crate::probe::{Check, Outcome};
    use std::sync::mpsc;

    fn target(kind: &str) -> Arc<Target> {
        Arc::new(Target {
            kind: kind.into(),
            url: format!("http://127.0.0.1/{kind}").parse().expect("url"),
            check: Check::Http,
            bearer_token: false,
            peer: None,
        })
    }

    fn answered(target: Arc<Target>, status: u16) -> ProbeResult {
        let mut result = ProbeResult::unobserved(target, FailedPhase::RoundTrip, String::new());
        result.outcome = Outcome::Response { status };
        result
    }

    #[tokio::test]
    async fn a_panicking_probe_is_a_failed_probe_and_the_round_goes_on() {
        let targets = [target("first"), target("crashes"), target("last")];
        let results = probe_all(&targets, |t| async move {
            assert_ne!(t.kind, "crashes", "a bug in a probe");
            answered(t, 200)
        })
        .await;
        let kinds: Vec<&str> = results.iter().map(|r| r.target.kind.as_str()).collect();
        assert_eq!(kinds, ["first", "crashes", "last"], "every target has its result, in order");
        assert!(results[0].is_ok() && results[2].is_ok());
        assert_eq!(results[1].error_event().as_deref(), Some("round_trip_error"));
        assert!(results[1].summary().contains("crashed"), "{}", results[1].summary());
    }

    /// Two probes that each wait (blocking their thread) for the other's signal can only
    /// both finish when they run as separate tasks on separate worker threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_of_a_round_run_as_separate_tasks() {
        let (to_b, from_a) = mpsc::channel::<()>();
        let (to_a, from_b) = mpsc::channel::<()>();
        let channels = std::sync::Mutex::new(vec![(to_b, from_b), (to_a, from_a)]);
        let targets = [target("a"), target("b")];
        let results = probe_all(&targets, |t| {
            let (tell, hear) = crate::sync::lock(&channels).pop().expect("one pair per probe");
            async move {
                let _ = tell.send(());
                let heard = hear.recv_timeout(Duration::from_secs(10)).is_ok();
                answered(t, if heard { 200 } else { 504 })
            }
        })
        .await;
        assert!(results.iter().all(ProbeResult::is_ok), "a probe waited on the other: not run in parallel");
    }

    fn neighbour(node: &str, ip: &str) -> Neighbour {
        Neighbour {
            pod_name: format!("kubenurse-{node}"),
            addresses: vec![crate::discovery::Address { ip: ip.into(), port: None }],
            host_ip: String::new(),
            node_name: node.into(),
            node_hash: ring_hash(node),
            zone: None,
        }
    }

    #[test]
    fn neighbours_are_chosen_again_only_when_the_neighbourhood_changes() {
        let targets =
            Targets::from_config(&crate::config::Config::from_flags(["--neighbour-port=9000"]).expect("config"));
        let hood = |neighbours: Vec<Neighbour>, own: Option<&str>| {
            Arc::new(Neighbourhood { state: "ok".into(), neighbours, own_node: own.map(str::to_owned), own_zone: None })
        };
        let mut list: Vec<Neighbour> =
            (0..50).map(|i| neighbour(&format!("node-{i}"), &format!("10.0.0.{i}"))).collect();
        let kinds = |c: &Chosen| c.targets.iter().map(|t| t.kind.clone()).collect::<Vec<_>>();
        let mut chosen = Chosen::default();
        let first = hood(list.clone(), Some("node-self"));
        assert!(chosen.update(&first, None, 10, true, &targets), "the first round chooses");
        let ring = crate::selection::select("node-self", 10, list.clone(), |n| n.node_name.as_str());
        let want: Vec<String> = ring.iter().map(|n| format!("path_{}", n.node_name)).collect();
        assert_eq!(kinds(&chosen), want, "the ring's choice, from the kept node hashes");
        let kept = chosen.targets.clone();

        // The same neighbourhood in the next rounds: nothing is chosen, the targets are kept.
        for _ in 0..3 {
            assert!(!chosen.update(&first, None, 10, true, &targets));
        }
        assert!(chosen.targets.iter().zip(&kept).all(|(a, b)| Arc::ptr_eq(a, b)));

        // Discovery hands out a new neighbourhood: a chosen neighbour's pod has a new address.
        let moved = list.iter().position(|n| n.node_name == ring[0].node_name).expect("chosen");
        list[moved].addresses[0].ip = "10.0.9.9".into();
        assert!(chosen.update(&hood(list.clone(), Some("node-self")), None, 10, true, &targets));
        assert_eq!(chosen.targets[0].url.to_string(), "http://10.0.9.9:9000/alwayshappy");
        // A neighbour leaves.
        list.remove(moved);
        assert!(chosen.update(&hood(list.clone(), Some("node-self")), None, 10, true, &targets));
        assert!(!kinds(&chosen).contains(&want[0]));
        // The own node from the configuration when discovery does not know it; probes off.
        let unknown = hood(list.clone(), None);
        assert!(chosen.update(&unknown, Some("node-self"), 10, true, &targets));
        assert!(chosen.targets.iter().all(|t| t.kind != format!("path_{}", want[0])));
        assert!(chosen.update(&hood(list, None), Some("node-self"), 10, false, &targets));
        assert!(chosen.targets.is_empty(), "neighbour probes off");
    }

    #[test]
    fn a_streak_ends_on_recovery_or_when_its_type_is_no_longer_probed() {
        let flaky = target("flaky");
        let failed = ProbeResult::unobserved(flaky.clone(), FailedPhase::Connect, "refused".into());
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        for round in 0..10 {
            log.record(std::slice::from_ref(&failed), t0 + Duration::from_secs(round * 5));
        }
        assert!(log.streaks["flaky"].is_failing());
        log.record(&[answered(flaky, 200)], t0 + Duration::from_secs(60));
        assert!(log.streaks.is_empty(), "a recovered type has no streak");
        log.record(std::slice::from_ref(&failed), t0 + Duration::from_secs(65));
        log.record(&[], t0 + Duration::from_secs(70));
        assert!(log.streaks.is_empty(), "a type no longer probed is forgotten");
    }
}
