//! Per-user notices: frames (`session_upserted`) for every socket of one user,
//! on every node. A receiver that lags skips notices (capacity
//! [`NOTICE_CAPACITY`](super::NOTICE_CAPACITY)).

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::RegistryError;
use crate::protocol::Frame;

/// Fan-out of per-user notices across nodes (docs/cluster.md §The seam).
#[async_trait]
pub trait UserNotices: Send + Sync + 'static {
    /// Sends a per-user notice (`session_upserted`) to that user's sockets on every node.
    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError>;

    /// Per-user notices for one socket.
    async fn user_notices(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError>;
}
