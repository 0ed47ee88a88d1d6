//! [`SendLimiter`] over Redis: one counter per user, `cg:user:{U}:sends`,
//! counted by `lua/count_send.lua` (INCR, PEXPIRE on the window's first send).

use std::time::Duration;

use async_trait::async_trait;

use super::{RedisRegistry, node};
use crate::runs::{RegistryError, SendLimiter};

#[async_trait]
impl SendLimiter for RedisRegistry {
    /// One script call on the user's counter.
    async fn admit_send(&self, user_id: &str, limit: u32, window: Duration) -> Result<bool, RegistryError> {
        let node = &self.node;
        let inv = node.scripts.count_send(user_id, node::millis(window));
        // Retried like every call: a retry after a lost reply may count a send twice,
        // which errs on the strict side by one.
        let count: u64 = node.retrying("count_send", node.retry_window(), || node.invoke(&inv)).await?;
        Ok(count <= u64::from(limit))
    }
}
