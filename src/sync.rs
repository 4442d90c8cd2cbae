//! Small synchronisation helpers shared by the whole crate.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poison: every value behind the crate's locks stays consistent
/// across a panic (each critical section is a plain read or a single update), so a panic
/// elsewhere must not take the agent down with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
