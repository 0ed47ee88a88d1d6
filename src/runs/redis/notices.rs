//! [`UserNotices`] over Redis: one publish on `cg:user:<id>` per notice; each
//! node holds that channel while it has listeners for the user (the
//! dispatcher in [`super::live`] hands messages to them, the sweeper in
//! [`super::tasks`] lets go of users nobody listens to any more).

use std::sync::Arc;

use async_trait::async_trait;

use super::{RedisRegistry, keys};
use crate::{
    protocol::Frame,
    runs::{NoticeListener, NoticeSink, RegistryError, UserNotices},
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

    /// The listener first, then a confirmed hold on the user's channel.
    async fn listen_user(&self, user_id: &str, sink: Arc<dyn NoticeSink>) -> Result<NoticeListener, RegistryError> {
        let node = &self.node;
        let listener = node.notices.add(user_id, sink);
        let channel = keys::user_channel(user_id);
        node.hub.acquire(&channel).await?;
        if !node.notices.hold(user_id) {
            node.hub.release(&channel).await;
        }
        Ok(listener)
    }
}
