//! Who probed this agent recently: the record behind
//! `kubenurse_neighbourhood_incoming_checks`.
//!
//! Origins come from a request header, so anyone can make them up: the server offers only
//! origins that discovery knows as agent pods, and the record is bounded. Origins must look
//! like pod names, and once it holds `capacity` live entries new origins are not recorded
//! (known ones are still refreshed) until old ones expire. A full record looks for expired
//! entries at most once per [`EXPIRY_INTERVAL`], so a flood of new origins costs a lookup
//! each, not a scan of the whole record under its lock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// How long an origin counts after its last probe (as in the Go agent).
pub const ORIGIN_TTL: Duration = Duration::from_secs(60);

/// Enough for every pod of a 5,000-node cluster with no neighbour limit, with room to spare.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// Least time between two scans of a full record for expired origins.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// Longest origin accepted: a Kubernetes object name.
const MAX_ORIGIN_LEN: usize = 253;

#[derive(Debug)]
pub struct IncomingChecks {
    ttl: Duration,
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    seen: HashMap<Box<str>, Instant>,
    /// When the last scan for expired origins ran.
    scanned_at: Option<Instant>,
    /// Entries looked at by scans so far.
    examined: u64,
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
        Self { ttl, capacity, state: Mutex::default() }
    }

    /// Notes a probe from `origin` at `now`.
    pub fn record(&self, origin: &str, now: Instant) -> Recorded {
        if origin.is_empty()
            || origin.len() > MAX_ORIGIN_LEN
            || !origin.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Recorded::Invalid;
        }
        let mut state = lock(&self.state);
        if let Some(at) = state.seen.get_mut(origin) {
            *at = now;
            return Recorded::Yes;
        }
        if state.seen.len() >= self.capacity {
            let due = state.scanned_at.is_none_or(|at| now.saturating_duration_since(at) >= EXPIRY_INTERVAL);
            if due {
                state.expire(self.ttl, now);
            }
            if state.seen.len() >= self.capacity {
                return Recorded::Full;
            }
        }
        state.seen.insert(origin.into(), now);
        Recorded::Yes
    }

    /// Distinct origins seen within the TTL before `now`; forgets older ones.
    pub fn count(&self, now: Instant) -> usize {
        let mut state = lock(&self.state);
        state.expire(self.ttl, now);
        state.seen.len()
    }

    /// Entries looked at by scans for expired origins so far.
    pub fn examined(&self) -> u64 {
        lock(&self.state).examined
    }
}

impl State {
    fn expire(&mut self, ttl: Duration, now: Instant) {
        self.examined += self.seen.len() as u64;
        self.scanned_at = Some(now);
        self.seen.retain(|_, at| now.saturating_duration_since(*at) <= ttl);
        if self.seen.capacity() > 4 * self.seen.len().max(64) {
            self.seen.shrink_to_fit();
        }
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
    fn a_full_record_is_scanned_at_most_once_per_interval() {
        let cache = IncomingChecks::new(Duration::from_secs(60), 1_000);
        let t0 = Instant::now();
        for i in 0..1_000 {
            assert_eq!(cache.record(&format!("pod-{i}"), t0), Recorded::Yes);
        }
        assert_eq!(cache.examined(), 0, "filling the record scans nothing");
        // 100,000 new origins within one interval: one scan of the 1,000 entries, not one each.
        let within = |i: u64| t0 + Duration::from_millis(i % 1_000);
        for i in 0..100_000 {
            assert_eq!(cache.record(&format!("new-{i}"), within(i)), Recorded::Full);
        }
        assert_eq!(cache.examined(), 1_000);
        // Known origins are refreshed without a scan.
        assert_eq!(cache.record("pod-7", within(999)), Recorded::Yes);
        assert_eq!(cache.examined(), 1_000);
        // The next interval scans once more.
        let next = t0 + EXPIRY_INTERVAL + Duration::from_millis(1);
        for i in 0..10_000 {
            assert_eq!(cache.record(&format!("later-{i}"), next), Recorded::Full);
        }
        assert_eq!(cache.examined(), 2_000);
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
