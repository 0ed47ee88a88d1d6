//! Readiness of the Redis registry (`/readyz`): the node's pub/sub connection
//! is up, its last probe ([`super::tasks::probe`]) was heard back, and Redis
//! answers a PING.

use async_trait::async_trait;

use super::{RESPONSE_TIMEOUT, RedisRegistry};
use crate::{runs::RunRegistry, sync::lock_unpoisoned};

#[async_trait]
impl RunRegistry for RedisRegistry {
    /// Pub/sub connected, last probe answered, PING answered.
    async fn ready(&self) -> Result<(), String> {
        let node = &self.node;
        if !node.hub.is_connected() {
            return Err("Redis pub/sub connection is down".into());
        }
        lock_unpoisoned(&node.probe.status).clone()?;
        let ping = node.once("ping", || async {
            let mut conn = node.conn().await?;
            let _: String = ::redis::cmd("PING").query_async(&mut conn).await?;
            Ok(())
        });
        match tokio::time::timeout(RESPONSE_TIMEOUT, ping).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("Redis does not answer: {e}")),
            Err(_) => Err("Redis does not answer: timed out".into()),
        }
    }
}
