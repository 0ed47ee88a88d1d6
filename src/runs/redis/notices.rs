//! [`UserNotices`] over Redis: one publish on `cg:user:<id>` per notice; each
//! node holds that channel while it has receivers for the user (the
//! dispatcher in [`super::live`] fans messages out to them, the sweeper in
//! [`super::tasks`] lets go of users nobody listens to any more).

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    RedisRegistry, keys,
    node::{self, NoticeChannel},
};
use crate::{
    protocol::Frame,
    runs::{RegistryError, UserNotices},
    sync::lock_unpoisoned,
};

#[async_trait]
impl UserNotices for RedisRegistry {
    /// One publish on the user's channel; every node holding it fans out.
    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError> {
        let node = &self.node;
        let channel = keys::user_channel(user_id);
        node.retrying("notify_user", node.retry_window(), || node.publish(&channel, frame.as_str())).await?;
        Ok(())
    }

    /// A receiver first, then a confirmed hold on the user's channel.
    async fn user_notices(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError> {
        let node = &self.node;
        let rx = lock_unpoisoned(&node.users)
            .entry(user_id.to_string())
            .or_insert_with(|| NoticeChannel { tx: broadcast::channel(node::USER_CAPACITY).0, holds: 0 })
            .tx
            .subscribe();
        let channel = keys::user_channel(user_id);
        node.hub.acquire(&channel).await?;
        let recorded = lock_unpoisoned(&node.users).get_mut(user_id).map(|u| u.holds += 1).is_some();
        if !recorded {
            node.hub.release(&channel).await;
        }
        Ok(rx)
    }
}
