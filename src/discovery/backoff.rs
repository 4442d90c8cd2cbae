//! The one backoff of a discovery watch: the wait after a failed list or watch doubles from
//! a base up to a cap, each wait shortened by up to a quarter at random so that a fleet
//! refused at the same moment does not come back in step. It resets only when the watch is
//! known to work again (a list completed, or a watch stayed open), never merely because a
//! new attempt starts.

use std::time::Duration;

/// Share of a wait that jitter may take off.
const JITTER: f64 = 0.25;

/// Exponential backoff with jitter, never above its cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Waits start at `base` and double up to `max` (`base <= max`, both checked by the config).
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max: max.max(base), failures: 0, rng: fastrand::Rng::new() }
    }

    /// The wait before the next attempt, after one more failure.
    pub fn next_wait(&mut self) -> Duration {
        let nominal = self.base.saturating_mul(2u32.saturating_pow(self.failures.min(31))).min(self.max);
        self.failures = self.failures.saturating_add(1);
        nominal.mul_f64(1.0 - JITTER * self.rng.f64())
    }

    /// The watch works again: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_to_the_cap_within_the_jitter_and_reset() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(800));
        for _ in 0..20 {
            let nominal = [100, 200, 400, 800, 800, 800, 800];
            for n in nominal {
                let wait = backoff.next_wait();
                assert!(wait <= ms(n) && wait >= ms(n).mul_f64(1.0 - JITTER), "{wait:?} for {n} ms");
            }
            backoff.reset();
        }
    }

    #[test]
    fn a_long_streak_stays_at_the_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..1000 {
            assert!(backoff.next_wait() <= Duration::from_secs(300));
        }
        assert!(backoff.next_wait() >= Duration::from_secs(225));
    }
}
