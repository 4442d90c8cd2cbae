//! The one rate limiter for log lines about repeating failures, used by every module that
//! reports one (probes, discovery, OTLP export): the first failure of a streak is reported at
//! once, then at most one reminder per interval with the number of failures in between, and
//! one line when the streak ends. The caller writes the lines; this type decides when.

use std::time::{Duration, Instant};

/// The state of one kind of repeating failure.
#[derive(Debug, Clone)]
pub struct FailureStreak {
    every: Duration,
    since: Option<Instant>,
    last_report: Option<Instant>,
    failures: u64,
    suppressed: u64,
}

/// A failure line to write now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// The first failure of the streak (else a reminder).
    pub first: bool,
    /// Failures in the streak so far, this one included.
    pub failures: u64,
    /// Failures since the previous line that were not reported.
    pub suppressed: u64,
    /// How long the streak has lasted.
    pub since: Duration,
}

/// The end of a streak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub failures: u64,
    pub after: Duration,
}

impl FailureStreak {
    /// Reminders at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, since: None, last_report: None, failures: 0, suppressed: 0 }
    }

    /// Notes a failure at `now`; returns what to report, if anything.
    pub fn failed(&mut self, now: Instant) -> Option<Report> {
        let since = *self.since.get_or_insert(now);
        self.failures += 1;
        let first = self.last_report.is_none();
        if first || self.last_report.is_some_and(|at| now.saturating_duration_since(at) >= self.every) {
            let report = Report { first, failures: self.failures, suppressed: self.suppressed, since: now - since };
            self.last_report = Some(now);
            self.suppressed = 0;
            Some(report)
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Notes a success at `now`; returns the streak that ended, if one did.
    pub fn succeeded(&mut self, now: Instant) -> Option<Recovery> {
        let since = self.since.take()?;
        let recovery = Recovery { failures: self.failures, after: now.saturating_duration_since(since) };
        *self = Self::new(self.every);
        Some(recovery)
    }

    /// True between a failure and the next success.
    pub fn is_failing(&self) -> bool {
        self.since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_failure_then_reminders_then_recovery() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut streak = FailureStreak::new(s(60));
        assert_eq!(streak.succeeded(t0), None, "no streak, nothing to recover from");
        let first = streak.failed(t0).expect("first failure is reported");
        assert!(first.first && first.failures == 1 && first.suppressed == 0);
        for i in 1..=10 {
            assert_eq!(streak.failed(t0 + s(i)), None, "failure {i} is suppressed");
        }
        let reminder = streak.failed(t0 + s(60)).expect("a reminder after the interval");
        assert!(!reminder.first);
        assert_eq!((reminder.failures, reminder.suppressed, reminder.since), (12, 10, s(60)));
        assert!(streak.is_failing());
        assert_eq!(streak.succeeded(t0 + s(70)), Some(Recovery { failures: 12, after: s(70) }));
        assert!(!streak.is_failing());
        assert!(streak.failed(t0 + s(71)).expect("a new streak starts").first);
    }
}
