//! [`UserNotices`] in process: the node's [`Listeners`] are every listener
//! there is, so a notice goes straight to them.

use std::sync::Arc;

use async_trait::async_trait;

use super::MemoryRegistry;
use crate::{
    protocol::Frame,
    runs::{NoticeListener, NoticeSink, RegistryError, UserNotices},
};

#[async_trait]
impl UserNotices for MemoryRegistry {
    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError> {
        self.inner.users.send(user_id, &frame);
        Ok(())
    }

    async fn listen_user(&self, user_id: &str, sink: Arc<dyn NoticeSink>) -> Result<NoticeListener, RegistryError> {
        Ok(self.inner.users.add(user_id, sink))
    }
}
