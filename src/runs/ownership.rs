//! The run's owner: the lease-fenced writes of the node that runs it.
//!
//! The owner takes the session's run lock, appends its events (each batch gets
//! the next seqs of the session), records and forgets its pending tool
//! approvals, renews its lease and ends the run with the terminal `complete`.
//! Every write after the start is fenced by the [`RunLease`]: a run that lost
//! its lock gets [`RegistryError::Fenced`] and writes nothing. The last three
//! methods are the history hand-over when an owner dies (docs/cluster.md
//! §Owner death): they only matter to a backend whose runs can outlive their
//! owner.

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Event, OrphanedRun, PriorSend, RegistryError, RunGrant, RunLease, RunStart};
use crate::protocol::EventBody;

/// The lease-fenced writes of a run's owner (docs/cluster.md §The seam).
#[async_trait]
pub trait RunOwnership: Send + Sync + 'static {
    /// Takes the session's run lock. `RunInProgress` when any node holds it;
    /// `AlreadySent` when the start's idempotency key was seen (nothing starts).
    async fn start_run(&self, start: RunStart) -> Result<RunGrant, RegistryError>;

    /// What became of the send with this idempotency key, if the session saw
    /// it within the window (for sends refused before they reach the lock).
    async fn prior_send(&self, session_id: &str, request_key: &str) -> Result<Option<PriorSend>, RegistryError>;

    /// Appends non-terminal events (one batch, one round trip), fenced by the lease.
    async fn append(&self, lease: &RunLease, batch: Vec<EventBody>) -> Result<Vec<Event>, RegistryError>;

    /// Appends the terminal `complete`, releases the lock and clears pending approvals.
    async fn complete(&self, lease: &RunLease, body: EventBody) -> Result<Event, RegistryError>;

    /// Extends the lease; `Fenced` when the lock is no longer this run's.
    async fn renew(&self, lease: &RunLease) -> Result<(), RegistryError>;

    /// Records a pending tool approval of the run (shown in `chat_subscribed`).
    async fn add_pending(&self, lease: &RunLease, request_id: &str, request: Value) -> Result<(), RegistryError>;

    /// Forgets a pending tool approval (answered, timed out or cancelled).
    async fn remove_pending(&self, lease: &RunLease, request_id: &str) -> Result<(), RegistryError>;

    /// The owner stored its completed run's `complete` in history. Until then a
    /// cluster backend keeps what a surviving node needs to store it, should the
    /// owner die between the `complete` and the SQL write.
    async fn history_saved(&self, lease: &RunLease);

    /// The owner gives a run up without completing it (its lease could not be
    /// kept): forget it locally, so the run is reaped like any orphan once its
    /// lock is gone. Nothing is written.
    async fn abandon(&self, lease: &RunLease);

    /// Notices of runs this node ended for a lost owner (taken once, by the
    /// gateway, which copies their events to SQL). `None`: runs are never orphaned.
    fn take_orphans(&self) -> Option<mpsc::Receiver<OrphanedRun>>;
}
