//! Synchronisation helpers shared by every layer.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`; a lock poisoned by a panic elsewhere is taken anyway: every table guarded
/// this way is left consistent between statements, so its data is still good.
pub fn lock_unpoisoned<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
