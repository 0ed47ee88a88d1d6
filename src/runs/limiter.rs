//! The cluster-wide `chat.send` budget (`--max-sends-per-minute`): one counter
//! per user, the same on every node.

use std::time::Duration;

use async_trait::async_trait;

use super::RegistryError;

/// Counting each user's sends against a fixed window (docs/cluster.md §The seam).
#[async_trait]
pub trait SendLimiter: Send + Sync + 'static {
    /// Counts one `chat.send` of `user_id` against `limit` per `window`, on every
    /// node alike: a fixed window that opens with the user's first send after the
    /// previous one closed. `Ok(false)` when this send is over the limit (refused
    /// sends count too, so hammering does not reopen the budget).
    async fn admit_send(&self, user_id: &str, limit: u32, window: Duration) -> Result<bool, RegistryError>;
}
