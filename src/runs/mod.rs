//! The run registry: the one seam between the gateway logic and the cluster.
//!
//! A registry owns, per session: the run lock (at most one run, fenced), the
//! seq counter (per session, across runs, never reused), the replay window of
//! the current run, pending tool approvals, and fan-out of live events to every
//! subscriber on every node. [`memory`] implements it in process (single node);
//! [`redis`] implements it over Redis (cluster mode). Both pass the conformance
//! suite in `tests/registry_conformance.rs`; `src/gateway` only sees the trait.

pub mod feed;
pub mod memory;
pub mod redis;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use crate::protocol::{EventBody, Frame, PermissionAnswer};

pub use feed::{FeedItem, LiveFeed};

/// Capacity of control channels from the registry to a local run.
pub const CONTROL_CAPACITY: usize = 64;
/// Capacity of per-user notice channels (`session_upserted` is rare; a lagging
/// socket skips notices rather than holding memory for them).
pub const NOTICE_CAPACITY: usize = 8;
/// Capacity, in batches, of per-session live broadcast channels; laggards
/// refill from the replay window. One slot holds a whole append batch, so the
/// ring covers more events the busier a session is, at the same memory.
pub const LIVE_CAPACITY: usize = 32;

/// Events appended together (one append batch, or one catch-up read), in seq
/// order: what a session's live channel carries, shared by every receiver.
pub type LiveBatch = Arc<[Event]>;

/// One sequenced event of a session, ready for the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub run_id: Arc<str>,
    /// True for the run's terminal `complete`.
    pub terminal: bool,
    pub frame: Frame,
}

/// What the owner knows when it asks for a run.
#[derive(Debug, Clone)]
pub struct RunStart {
    pub session_id: String,
    pub run_id: String,
    pub provider: String,
    pub user_id: String,
    pub node_id: String,
    /// The session's last seq as the database knows it; the counter never goes below it.
    pub seq_floor: u64,
    /// When the database last saw the session change (ms since the Unix epoch).
    /// A session that had events and changed more recently than the registry
    /// keeps an idle session's state, but whose state the registry no longer
    /// has, lost it (Redis came back empty): a run may still be live on its
    /// owner, so the start waits until that owner could have re-taken its lock.
    pub last_active_ms: i64,
    /// The user's message, kept with the run so that a node ending it for a
    /// lost owner can store it in history.
    pub prompt: String,
}

/// Proof of ownership of a session's run; every write is fenced by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLease {
    pub session_id: String,
    pub run_id: String,
}

/// A granted run: the lease and the channel on which aborts and approvals arrive.
#[derive(Debug)]
pub struct RunGrant {
    pub lease: RunLease,
    /// The seq the run's first event is due to get (later only when Redis
    /// loses the counter meanwhile); the prompt's history row is stored there.
    pub first_seq: u64,
    pub control: mpsc::Receiver<Control>,
}

/// Messages routed to the owner of a run from any node.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Control {
    Abort { session_id: String, run_id: String },
    Permission { session_id: String, request_id: String, answer: PermissionAnswer },
}

/// A session's state as seen by `chat.subscribe`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub is_processing: bool,
    pub run_id: Option<String>,
    pub owner_node: Option<String>,
    pub last_seq: u64,
    pub pending_permissions: Vec<Value>,
}

/// One row of `GET /api/providers/sessions/running`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningRun {
    pub session_id: String,
    pub provider: String,
    pub run_id: String,
    pub started_at: String,
    pub last_seq: u64,
    pub node_id: String,
    #[serde(skip)]
    pub user_id: String,
}

/// A subscription: the ack data, the replayed events, then the live feed.
pub struct Subscription {
    pub snapshot: Snapshot,
    /// Some events of the current run after the cursor are gone.
    pub replay_truncated: bool,
    pub replay: Vec<Event>,
    pub live: LiveFeed,
}

/// A range read from the replay window.
#[derive(Debug, Clone, Default)]
pub struct ReplayRange {
    pub events: Vec<Event>,
    /// Every event from the requested start up to the end of the range was present.
    pub complete: bool,
}

/// A run this node ended because its owner was lost: its events may be missing
/// from SQL, since the owner wrote history as it streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanedRun {
    pub session_id: String,
    pub run_id: String,
    /// Seq of the run's first event.
    pub first_seq: u64,
    /// Seq of the terminal `complete` (the reaper's, or the owner's when `unsaved_complete`).
    pub complete_seq: u64,
    /// The user's message that started the run, when the registry still had it.
    pub prompt: Option<String>,
    /// The owner appended the `complete` itself (at `complete_seq`) but died before
    /// storing it; every earlier row was stored first, so only that event is copied.
    pub unsaved_complete: bool,
}

/// Capacity of the orphaned-run notices queue.
pub const ORPHAN_CAPACITY: usize = 256;

/// Registry failures.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("session already has a run in progress")]
    RunInProgress,
    #[error("the run lost its lock")]
    Fenced,
    #[error("coordination backend unavailable: {0}")]
    Unavailable(String),
    /// The registry lost the session's state (Redis came back empty) while it
    /// may have had a live run; no run starts until its owner could re-take it.
    #[error("the session's run state is being recovered; retry in {}ms", .retry_after.as_millis())]
    Recovering { retry_after: Duration },
}

/// The run registry (docs/cluster.md §The seam).
#[async_trait]
pub trait RunRegistry: Send + Sync + 'static {
    /// Takes the session's run lock. `RunInProgress` when any node holds it.
    async fn start_run(&self, start: RunStart) -> Result<RunGrant, RegistryError>;

    /// Appends non-terminal events (one batch, one round trip), fenced by the lease.
    async fn append(&self, lease: &RunLease, batch: Vec<EventBody>) -> Result<Vec<Event>, RegistryError>;

    /// Appends the terminal `complete`, releases the lock and clears pending approvals.
    async fn complete(&self, lease: &RunLease, body: EventBody) -> Result<Event, RegistryError>;

    /// Extends the lease; `Fenced` when the lock is no longer this run's.
    async fn renew(&self, lease: &RunLease) -> Result<(), RegistryError>;

    /// The owner stored its completed run's `complete` in history. Until then a
    /// cluster backend keeps what a surviving node needs to store it, should the
    /// owner die between the `complete` and the SQL write.
    async fn history_saved(&self, lease: &RunLease) {
        let _ = lease;
    }

    /// The owner gives a run up without completing it (its lease could not be
    /// kept): forget it locally, so the run is reaped like any orphan once its
    /// lock is gone. Nothing is written.
    async fn abandon(&self, lease: &RunLease) {
        let _ = lease;
    }

    /// Records a pending tool approval of the run (shown in `chat_subscribed`).
    async fn add_pending(&self, lease: &RunLease, request_id: &str, request: Value) -> Result<(), RegistryError>;

    /// Forgets a pending tool approval (answered, timed out or cancelled).
    async fn remove_pending(&self, lease: &RunLease, request_id: &str) -> Result<(), RegistryError>;

    /// The session's run state.
    async fn snapshot(&self, session_id: &str) -> Result<Snapshot, RegistryError>;

    /// Ack data, replay of the current run after `after_seq`, then live events of
    /// this and every later run, without gap or duplicate.
    async fn subscribe(&self, session_id: &str, after_seq: u64) -> Result<Subscription, RegistryError>;

    /// Events of the session with `after_seq < seq <= up_to` still in the replay window.
    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError>;

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

    /// Sends a per-user notice (`session_upserted`) to that user's sockets on every node.
    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError>;

    /// Per-user notices for one socket.
    async fn user_notices(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError>;

    /// Counts one `chat.send` of `user_id` against `limit` per `window`, on every
    /// node alike: a fixed window that opens with the user's first send after the
    /// previous one closed. `Ok(false)` when this send is over the limit (refused
    /// sends count too, so hammering does not reopen the budget).
    async fn admit_send(&self, user_id: &str, limit: u32, window: Duration) -> Result<bool, RegistryError>;

    /// How long to wait before trusting what the registry says of a session
    /// (zero: now). Non-zero only when the backend lost the state of a session
    /// that had events (`seq_floor`, from SQL) and changed recently
    /// (`last_active_ms`), e.g. Redis came back empty: a run may still be live
    /// on an owner that has not re-taken its lock yet (at most one lease).
    async fn settle(&self, session_id: &str, seq_floor: u64, last_active_ms: i64) -> Result<Duration, RegistryError> {
        let _ = (session_id, seq_floor, last_active_ms);
        Ok(Duration::ZERO)
    }

    /// `Err(reason)` when the registry cannot serve (for `/readyz`).
    async fn ready(&self) -> Result<(), String>;

    /// Notices of runs this node ended for a lost owner (taken once, by the
    /// gateway, which copies their events to SQL). `None`: runs are never orphaned.
    fn take_orphans(&self) -> Option<mpsc::Receiver<OrphanedRun>> {
        None
    }
}

/// The registry as the gateway holds it.
pub type SharedRegistry = Arc<dyn RunRegistry>;
