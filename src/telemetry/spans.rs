//! Slow-path spans: a probe slower than the threshold, or failed, becomes one span that
//! starts and ends at the probe's own instants, with one event per phase. Fast healthy probes
//! produce nothing, so a healthy cluster sends no trace volume.
//!
//! Span names are low-cardinality: one per probe kind (`probe path`, `probe api_server_dns`,
//! `probe <extra check>`); the node and pod are attributes. The span rate is bounded per
//! target: a span when its condition starts or changes (slow, or a failure at another
//! event), then at most one per [`REPEAT_EVERY`] while it stays the same; and never more than
//! [`MOST_PER_INTERVAL`] per target in one interval, however often the condition flips. A
//! cluster-wide outage costs each agent about one span per target and minute.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::{Span, SpanKind, Status, Tracer, TracerProvider};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::probe::{Check, Outcome, ProbeResult};
use crate::sync::lock;

/// How often a target whose condition does not change exports a span again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// Spans one target may export within [`REPEAT_EVERY`], changes included.
pub const MOST_PER_INTERVAL: usize = 3;

/// Targets not seen for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

pub struct ProbeSpans {
    tracer: SdkTracer,
    threshold: Duration,
    repeat_every: Duration,
    recent: Mutex<Recent>,
}

/// What each target last exported, by probe type.
#[derive(Default)]
struct Recent {
    targets: HashMap<String, Exported>,
    last_sweep: Option<Instant>,
}

struct Exported {
    /// `slow`, or the error event of the failure.
    condition: String,
    /// The latest exports, newest last, at most [`MOST_PER_INTERVAL`].
    exports: VecDeque<Instant>,
    seen: Instant,
}

impl Exported {
    fn new(condition: String, now: Instant) -> Self {
        Self { condition, exports: VecDeque::from([now]), seen: now }
    }

    /// Exports within `interval` before `now`.
    fn recent(&self, now: Instant, interval: Duration) -> usize {
        self.exports.iter().filter(|at| now.saturating_duration_since(**at) < interval).count()
    }

    fn exported(&mut self, condition: String, now: Instant) {
        self.condition = condition;
        if self.exports.len() == MOST_PER_INTERVAL {
            self.exports.pop_front();
        }
        self.exports.push_back(now);
    }
}

impl ProbeSpans {
    pub fn new(provider: &SdkTracerProvider, threshold: Duration) -> Self {
        Self::with_repeat(provider, threshold, REPEAT_EVERY)
    }

    /// As [`Self::new`], with another repeat interval.
    pub fn with_repeat(provider: &SdkTracerProvider, threshold: Duration, repeat_every: Duration) -> Self {
        let tracer = provider.tracer_with_scope(
            opentelemetry::InstrumentationScope::builder("kubenurse").with_version(env!("CARGO_PKG_VERSION")).build(),
        );
        Self { tracer, threshold, repeat_every, recent: Mutex::default() }
    }

    /// Exports `result` as a span if it was slow or failed, and the rate bound allows.
    pub fn record(&self, result: &ProbeResult) {
        let condition = match result.error_event() {
            Some(event) => event.into_owned(),
            None if result.elapsed > self.threshold => "slow".to_owned(),
            None => {
                // Healthy again: the next failure is a change and gets its span at once, unless
                // the target flaps so fast that it already had its share of the interval.
                self.healthy(&result.target.kind);
                return;
            }
        };
        if self.admit(&result.target.kind, condition, Instant::now()) {
            self.export(result);
        }
    }

    /// Notes that `kind` answered fast and fine.
    fn healthy(&self, kind: &str) {
        if let Some(last) = lock(&self.recent).targets.get_mut(kind) {
            last.condition.clear();
        }
    }

    /// True when the target's condition is new or changed, or the repeat interval passed.
    fn admit(&self, kind: &str, condition: String, now: Instant) -> bool {
        let mut recent = lock(&self.recent);
        let every = self.repeat_every;
        let admitted = match recent.targets.get_mut(kind) {
            Some(last) => {
                last.seen = now;
                let due = if last.condition == condition {
                    last.recent(now, every) == 0
                } else {
                    last.recent(now, every) < MOST_PER_INTERVAL
                };
                if due {
                    last.exported(condition, now);
                }
                due
            }
            None => {
                recent.targets.insert(kind.to_owned(), Exported::new(condition, now));
                true
            }
        };
        drop(recent);
        self.forget_old(now);
        admitted
    }

    /// A target that is healthy again, or no longer probed, starts afresh.
    fn forget_old(&self, now: Instant) {
        let mut recent = lock(&self.recent);
        if recent.last_sweep.is_some_and(|at| now.saturating_duration_since(at) < self.repeat_every) {
            return;
        }
        recent.last_sweep = Some(now);
        recent.targets.retain(|_, e| now.saturating_duration_since(e.seen) < FORGET_AFTER);
    }

    fn export(&self, result: &ProbeResult) {
        let target = &result.target;
        let mut attributes = vec![
            KeyValue::new("kubenurse.probe.type", target.kind.clone()),
            KeyValue::new("url.full", target.location()),
        ];
        let server = match &target.check {
            Check::Http => {
                attributes.push(KeyValue::new("http.request.method", "GET"));
                Some((target.url.host().unwrap_or_default().to_owned(), target.url.port_u16()))
            }
            Check::Tcp => Some((target.url.host().unwrap_or_default().to_owned(), target.url.port_u16())),
            Check::Dns(query) => {
                attributes.push(KeyValue::new("dns.question.name", query.name.clone()));
                query.server.map(|addr| (addr.ip().to_string(), Some(addr.port())))
            }
        };
        if let Some((address, port)) = server {
            attributes.push(KeyValue::new("server.address", address));
            if let Some(port) = port {
                attributes.push(KeyValue::new("server.port", i64::from(port)));
            }
        }
        if let Some(peer) = &target.peer {
            attributes.push(KeyValue::new("kubenurse.peer.node", peer.node.clone()));
            attributes.push(KeyValue::new("kubenurse.peer.pod", peer.pod.clone()));
            attributes.push(KeyValue::new("kubenurse.source.zone", peer.source_zone.clone()));
            attributes.push(KeyValue::new("kubenurse.peer.zone", peer.target_zone.clone()));
        }
        match &result.outcome {
            Outcome::Response { status } => {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(*status)))
            }
            Outcome::Reached => {}
            Outcome::Failed { phase, .. } => {
                attributes.push(KeyValue::new("kubenurse.failed_phase", phase.label()));
            }
        }
        if let Some(error_type) = result.error_type() {
            attributes.push(KeyValue::new("error.type", error_type));
        }
        if let Some(event) = result.error_event() {
            attributes.push(KeyValue::new("kubenurse.error_event", event));
        }
        let start = result.started_at;
        let mut span = self
            .tracer
            .span_builder(span_name(&target.kind, target.peer.is_some()))
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attributes)
            .start(&self.tracer);
        for (event, offset) in &result.events {
            span.add_event_with_timestamp(event.label(), start + *offset, Vec::new());
        }
        if !result.is_ok() {
            span.set_status(Status::error(result.summary()));
        }
        span.end_with_timestamp(start + result.elapsed);
    }
}

/// One name per probe kind: every neighbour probe is `probe path`.
fn span_name(kind: &str, neighbour: bool) -> String {
    if neighbour {
        "probe path".to_owned()
    } else {
        format!("probe {kind}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(repeat: Duration) -> ProbeSpans {
        ProbeSpans::with_repeat(&SdkTracerProvider::builder().build(), Duration::from_secs(1), repeat)
    }

    #[test]
    fn a_lasting_condition_exports_once_per_interval_and_a_change_at_once() {
        let s = spans(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        assert!(s.admit("path_a", "connect_done".into(), at(0)), "a failure starts");
        for i in 1..12 {
            assert!(!s.admit("path_a", "connect_done".into(), at(i * 5)), "round {i}: same failure, no span");
        }
        assert!(s.admit("path_b", "connect_done".into(), at(5)), "each target has its own bound");
        assert!(s.admit("path_a", "connect_done".into(), at(60)), "one reminder a minute");
        assert!(s.admit("path_a", "round_trip_error".into(), at(61)), "a changed failure at once");
        assert!(s.admit("path_a", "slow".into(), at(62)), "slow after failing is a change");
        assert!(!s.admit("path_a", "slow".into(), at(63)));
    }

    #[test]
    fn a_flapping_condition_is_bounded_too() {
        let s = spans(Duration::from_secs(60));
        let t0 = Instant::now();
        let flips = (0..12u64)
            .filter(|i| {
                let condition = if i % 2 == 0 { "connect_done" } else { "slow" };
                s.admit("path_a", condition.into(), t0 + Duration::from_secs(i * 5))
            })
            .count();
        assert_eq!(flips, MOST_PER_INTERVAL, "a condition flipping every round, one minute");
        assert!(s.admit("path_a", "round_trip_error".into(), t0 + Duration::from_secs(61)), "the next minute");
    }

    #[test]
    fn a_recovered_target_reports_its_next_failure_at_once() {
        let s = spans(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(s.admit("me_service", "connect_done".into(), t0));
        s.healthy("me_service");
        assert!(s.admit("me_service", "connect_done".into(), t0 + Duration::from_secs(10)));
        s.healthy("me_service");
        assert!(s.admit("me_service", "connect_done".into(), t0 + Duration::from_secs(20)));
        s.healthy("me_service");
        assert!(!s.admit("me_service", "connect_done".into(), t0 + Duration::from_secs(30)), "flapping is bounded");
    }

    #[test]
    fn neighbour_spans_share_one_name() {
        assert_eq!(span_name("path_node-1", true), "probe path");
        assert_eq!(span_name("path_node-2", true), "probe path");
        assert_eq!(span_name("api_server_dns", false), "probe api_server_dns");
    }
}
