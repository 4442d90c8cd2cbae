//! The probe's clock: when it started, and the offset of each phase event from that start.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::model::{Event, Outcome, ProbeResult, Target};

/// Collects event instants during one probe.
pub(super) struct Recorder {
    started: Instant,
    started_at: SystemTime,
    events: Vec<(Event, Duration)>,
    /// When the response headers arrived, or a TCP or DNS check reached its target.
    answered: Option<Duration>,
}

impl Recorder {
    /// Starts the clock.
    pub(super) fn start() -> Self {
        Self {
            started_at: SystemTime::now(),
            started: Instant::now(),
            events: Vec::with_capacity(Event::ALL.len()),
            answered: None,
        }
    }

    pub(super) fn started(&self) -> Instant {
        self.started
    }

    pub(super) fn mark(&mut self, event: Event) {
        self.mark_at(event, Instant::now());
    }

    pub(super) fn mark_at(&mut self, event: Event, at: Instant) {
        self.events.push((event, at.saturating_duration_since(self.started)));
    }

    pub(super) fn headers_at(&mut self, at: Instant) {
        self.answered = Some(at.saturating_duration_since(self.started));
    }

    /// A TCP or DNS check reached its target now: the end of its "request".
    pub(super) fn reached(&mut self) {
        self.headers_at(Instant::now());
    }

    /// Forgets the events so far (a pooled connection failed and a fresh one is tried); the
    /// clock keeps running.
    pub(super) fn forget_events(&mut self) {
        self.events.clear();
    }

    /// The result of the probe that ended with `outcome`.
    pub(super) fn finish(self, target: Arc<Target>, outcome: Outcome) -> ProbeResult {
        let response_after = match outcome {
            Outcome::Response { .. } | Outcome::Reached => self.answered,
            Outcome::Failed { .. } => None,
        };
        ProbeResult {
            elapsed: response_after.unwrap_or_else(|| self.started.elapsed()),
            started: self.started,
            started_at: self.started_at,
            events: self.events,
            response_after,
            outcome,
            target,
        }
    }
}
