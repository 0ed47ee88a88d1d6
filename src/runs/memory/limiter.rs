//! [`SendLimiter`] in process: one [`SendWindow`] per user (expired ones are swept).

use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{MemoryRegistry, SendWindow};
use crate::{
    runs::{RegistryError, SendLimiter},
    sync::lock_unpoisoned,
};

#[async_trait]
impl SendLimiter for MemoryRegistry {
    async fn admit_send(&self, user_id: &str, limit: u32, window: Duration) -> Result<bool, RegistryError> {
        let now = Instant::now();
        let mut sends = lock_unpoisoned(&self.inner.sends);
        let current = sends.entry(user_id.to_string()).or_insert(SendWindow { ends_at: now + window, count: 0 });
        if current.ends_at <= now {
            *current = SendWindow { ends_at: now + window, count: 0 };
        }
        current.count += 1;
        Ok(current.count <= u64::from(limit))
    }
}
