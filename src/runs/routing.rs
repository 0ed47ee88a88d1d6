//! Finding runs from any node: control messages (aborts, tool-approval
//! answers) routed to the owner of a run, and a user's runs in progress.
//!
//! The owner receives what is routed to it on its
//! [`RunGrant::control`](super::RunGrant::control) channel. Every route checks
//! that the run belongs to the calling user; anything else is `Ok(false)`.

use async_trait::async_trait;

use super::{RegistryError, RunningRun};
use crate::protocol::PermissionAnswer;

/// Routing to the owner of a run, and listing runs (docs/cluster.md §The seam).
#[async_trait]
pub trait RunRouting: Send + Sync + 'static {
    /// Routes an abort to the owner of the session's run if `user_id` started it.
    /// `Ok(false)`: no active run (or another user's).
    async fn route_abort(&self, session_id: &str, user_id: &str) -> Result<bool, RegistryError>;

    /// Routes a tool-approval answer to the owner of the run that asked, if the
    /// run belongs to `user_id`. `Ok(false)`: unknown request (ignored, as upstream).
    async fn route_permission(
        &self,
        user_id: &str,
        request_id: &str,
        answer: PermissionAnswer,
    ) -> Result<bool, RegistryError>;

    /// Runs in progress on every node, of this user's sessions.
    async fn running_runs(&self, user_id: &str) -> Result<Vec<RunningRun>, RegistryError>;
}
