//! Whether the prober is still making progress, for `/livez`.
//!
//! A round ends within the probe deadline and starts every interval, so finished rounds are
//! never further apart than `interval + timeout`. When none has finished for three times the
//! longer of the two, the scheduler is stuck or gone, and only a restart helps. Probe results,
//! discovery, cordon and draining do not count: restarting the agent fixes none of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The instant the last round finished, written by the scheduler and read by `/livez`.
#[derive(Debug)]
pub struct Heartbeat {
    base: Instant,
    /// Nanoseconds from `base` to the last beat (or to the end of the first round's grace).
    last: AtomicU64,
    limit: Duration,
}

impl Heartbeat {
    /// For rounds every `interval` with probes bounded by `timeout`. The first round may start
    /// `first_round_after` from now (the scheduler waits that long at most for discovery), so
    /// the limit runs from then until a round finishes.
    pub fn new(interval: Duration, timeout: Duration, first_round_after: Duration) -> Self {
        Self {
            base: Instant::now(),
            last: AtomicU64::new(nanos(first_round_after)),
            limit: interval.max(timeout).saturating_mul(3),
        }
    }

    /// How long without a finished round means the prober stalled.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// A round finished.
    pub fn beat(&self) {
        self.last.fetch_max(nanos(self.base.elapsed()), Ordering::SeqCst);
    }

    /// How long before `now` the last round finished (zero while the first round's grace lasts).
    pub fn silent_for(&self, now: Instant) -> Duration {
        let last = self.base + Duration::from_nanos(self.last.load(Ordering::SeqCst));
        now.saturating_duration_since(last)
    }

    /// A round finished within the limit before `now`.
    pub fn is_alive(&self, now: Instant) -> bool {
        self.silent_for(now) <= self.limit
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_limit_is_three_times_the_longer_of_interval_and_timeout() {
        assert_eq!(Heartbeat::new(5 * SECOND, 2 * SECOND, Duration::ZERO).limit(), 15 * SECOND);
        assert_eq!(Heartbeat::new(SECOND, 10 * SECOND, Duration::ZERO).limit(), 30 * SECOND);
    }

    #[test]
    fn alive_while_rounds_finish_and_not_once_they_stop() {
        let heartbeat = Heartbeat::new(5 * SECOND, 5 * SECOND, Duration::ZERO);
        let start = heartbeat.base;
        assert!(heartbeat.is_alive(start + 15 * SECOND), "within the limit of the start");
        assert!(!heartbeat.is_alive(start + 16 * SECOND), "no round at all");

        heartbeat.beat();
        let beat = heartbeat.base + Duration::from_nanos(heartbeat.last.load(Ordering::SeqCst));
        assert!(heartbeat.is_alive(beat + 15 * SECOND));
        assert!(!heartbeat.is_alive(beat + 15 * SECOND + Duration::from_millis(1)), "rounds stopped");
        assert_eq!(heartbeat.silent_for(beat + 20 * SECOND), 20 * SECOND);
    }

    #[test]
    fn the_first_round_gets_the_discovery_wait_on_top() {
        let heartbeat = Heartbeat::new(SECOND, SECOND, 5 * SECOND);
        let start = heartbeat.base;
        assert_eq!(heartbeat.silent_for(start + 4 * SECOND), Duration::ZERO);
        assert!(heartbeat.is_alive(start + 8 * SECOND), "5 s for discovery, then 3 s for a round");
        assert!(!heartbeat.is_alive(start + 9 * SECOND));
        // A round that finishes early does not move the grace back.
        heartbeat.beat();
        assert!(heartbeat.is_alive(start + 8 * SECOND));
    }
}
