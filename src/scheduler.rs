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
use crate::metrics::Metrics;
use crate::probe::{FailedPhase, ProbeResult, Prober, Target};
use crate::ratelimit::FailureStreak;
use crate::selection::select;
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
        let mut failures = FailureLog::default();
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
            failures.record(&report.results, Instant::now());
            self.reports.send_replace(Some(Arc::new(report)));
        }
    }

    async fn round(&self, number: u64, lateness: Duration) -> RoundReport {
        let started = Instant::now();
        // Asked even with neighbour probes off: the own-node watch behind `/ready` reports its
        // failures here too.
        let neighbourhood = self.discovery.neighbourhood();
        let mut targets = self.targets.fixed().to_vec();
        // An unknown own node is reported in the neighbourhood state; the ring then starts at
        // the hash of "" so that probing goes on.
        let own_node = neighbourhood.own_node.as_deref().or(self.own_node.as_deref()).unwrap_or_default();
        let candidates = if self.check_neighbourhood { neighbourhood.neighbours.clone() } else { Vec::new() };
        let chosen = select(own_node, self.neighbour_limit, candidates, |n| n.node_name.as_str());
        targets.extend(chosen.iter().filter_map(|n| self.targets.neighbour(n)));
        self.prober.retain_idle(&targets);

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
                let error = format!("GET {}: the probe crashed", target.url);
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
            let url = &result.target.url;
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
    use crate::probe::Outcome;
    use std::sync::mpsc;

    fn target(kind: &str) -> Arc<Target> {
        Arc::new(Target {
            kind: kind.into(),
            url: format!("http://127.0.0.1/{kind}").parse().expect("url"),
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
