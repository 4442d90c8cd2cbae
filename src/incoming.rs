//! Who probed this agent recently: the record behind
//! `kubenurse_neighbourhood_incoming_checks`.
//!
//! Origins come from a request header, so anyone can make them up. The record is bounded:
//! origins must look like pod names, and once it holds `capacity` live entries new origins
//! are not recorded (known ones are still refreshed) until old ones expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an origin counts after its last probe (as in the Go agent).
pub const ORIGIN_TTL: Duration = Duration::from_secs(60);

/// Enough for every pod of a 5,000-node cluster with no neighbour limit, with room to spare.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// Longest origin accepted: a Kubernetes object name.
const MAX_ORIGIN_LEN: usize = 253;

#[derive(Debug)]
pub struct IncomingChecks {
    ttl: Duration,
    capacity: usize,
    seen: Mutex<HashMap<Box<str>, Instant>>,
}

/// What happened to an origin offered to the record.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    Yes,
    /// Not a plausible pod name.
    Invalid,
    /// The record is full of live origins.
    Full,
}

impl IncomingChecks {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity, seen: Mutex::new(HashMap::new()) }
    }

    /// Notes a probe from `origin` at `now`.
    pub fn record(&self, origin: &str, now: Instant) -> Recorded {
        if origin.is_empty()
            || origin.len() > MAX_ORIGIN_LEN
            || !origin.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Recorded::Invalid;
        }
        let mut seen = self.lock();
        if let Some(at) = seen.get_mut(origin) {
            *at = now;
            return Recorded::Yes;
        }
        if seen.len() >= self.capacity {
            Self::expire(&mut seen, self.ttl, now);
            if seen.len() >= self.capacity {
                return Recorded::Full;
            }
        }
        seen.insert(origin.into(), now);
        Recorded::Yes
    }

    /// Distinct origins seen within the TTL before `now`; forgets older ones.
    pub fn count(&self, now: Instant) -> usize {
        let mut seen = self.lock();
        Self::expire(&mut seen, self.ttl, now);
        seen.len()
    }

    fn expire(seen: &mut HashMap<Box<str>, Instant>, ttl: Duration, now: Instant) {
        seen.retain(|_, at| now.saturating_duration_since(*at) <= ttl);
        if seen.capacity() > 4 * seen.len().max(64) {
            seen.shrink_to_fit();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Instant>> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for IncomingChecks {
    fn default() -> Self {
        Self::new(ORIGIN_TTL, DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_origins_within_the_ttl() {
        let cache = IncomingChecks::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert_eq!(cache.record("kubenurse-a", t0), Recorded::Yes);
        assert_eq!(cache.record("kubenurse-a", t0 + Duration::from_secs(1)), Recorded::Yes);
        assert_eq!(cache.record("kubenurse-b", t0 + Duration::from_secs(2)), Recorded::Yes);
        assert_eq!(cache.count(t0 + Duration::from_secs(3)), 2);
        // a expires 60 s after its last probe (t0+1), b at t0+62.
        assert_eq!(cache.count(t0 + Duration::from_secs(61)), 2);
        assert_eq!(cache.count(t0 + Duration::from_secs(62)), 1);
        assert_eq!(cache.count(t0 + Duration::from_secs(63)), 0);
    }

    #[test]
    fn a_flood_of_made_up_origins_stays_bounded() {
        let cache = IncomingChecks::new(Duration::from_secs(60), 1_000);
        let t0 = Instant::now();
        assert_eq!(cache.record("real-neighbour", t0), Recorded::Yes);
        let full = (0..100_000).filter(|i| cache.record(&format!("fake-{i}"), t0) == Recorded::Full).count();
        assert_eq!(full, 100_000 - 999);
        assert_eq!(cache.count(t0), 1_000);
        // Known origins are still refreshed while full.
        assert_eq!(cache.record("real-neighbour", t0 + Duration::from_secs(30)), Recorded::Yes);
        // Once the flood expires, new origins are recorded again.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(cache.record("new-neighbour", later), Recorded::Yes);
        assert_eq!(cache.count(later), 2);
    }

    #[test]
    fn implausible_origins_are_rejected() {
        let cache = IncomingChecks::default();
        let now = Instant::now();
        for bad in ["", "has space", "<script>", &"x".repeat(254), "ünïcode"] {
            assert_eq!(cache.record(bad, now), Recorded::Invalid, "{bad:?}");
        }
        assert_eq!(cache.count(now), 0);
    }
}
