//! [`UserNotices`] in process: one broadcast channel per user with listening
//! sockets (dropped by the sweeper once nobody listens).

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::MemoryRegistry;
use crate::{
    protocol::Frame,
    runs::{NOTICE_CAPACITY, RegistryError, UserNotices},
    sync::lock_unpoisoned,
};

#[async_trait]
impl UserNotices for MemoryRegistry {
    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError> {
        if let Some(tx) = lock_unpoisoned(&self.inner.users).get(user_id) {
            let _ = tx.send(frame);
        }
        Ok(())
    }

    async fn user_notices(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError> {
        let mut users = lock_unpoisoned(&self.inner.users);
        Ok(users.entry(user_id.to_string()).or_insert_with(|| broadcast::channel(NOTICE_CAPACITY).0).subscribe())
    }
}
