//! The run registry: the one seam between the gateway logic and the cluster.
//!
//! A registry owns, per session: the run lock (at most one run, fenced), the
//! seq counter (per session, across runs, never reused), the replay window of
//! the current run, pending tool approvals, and fan-out of live events to every
//! subscriber on every node. The seam is split by concern, one small trait per
//! file:
//!
//! - [`RunOwnership`] ([`ownership`]): the lease-fenced writes of a run's owner
//!   (start, append, complete, renew, pending approvals) and the history
//!   hand-over when an owner dies;
//! - [`SessionFeeds`] ([`feeds`]): snapshots, subscriptions (replay, then the
//!   [`LiveFeed`] of [`feed`], which a socket turns into a push subscription
//!   on the session's [`LiveChannel`] ([`live`])), range reads, settling after
//!   a data loss;
//! - [`RunRouting`] ([`routing`]): aborts and approval answers routed to the
//!   owner, a user's running runs;
//! - [`UserNotices`] ([`notices`]): per-user notices on every node;
//! - [`SendLimiter`] ([`limiter`]): the cluster-wide `chat.send` budget.
//!
//! [`RunRegistry`] gathers them (plus `ready`) into the one handle the gateway
//! holds, [`SharedRegistry`]. [`memory`] implements every trait in process
//! (single node), [`redis`] over Redis (cluster mode), each with one file per
//! concern. Both pass the conformance suite in `tests/registry_conformance/`
//! (one group per trait); `src/gateway` only sees the traits.

pub mod feed;
pub mod feeds;
pub mod limiter;
pub mod live;
pub mod memory;
pub mod notices;
pub mod ownership;
pub mod redis;
pub mod routing;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::protocol::{Frame, PermissionAnswer};

pub use feed::{FeedItem, LiveFeed};
pub use feeds::SessionFeeds;
pub use limiter::SendLimiter;
pub use live::{LiveChannel, LiveSink, Offered, PushFeed};
pub use notices::{NoticeListener, NoticeSink, UserNotices};
pub use ownership::RunOwnership;
pub use routing::RunRouting;

/// Capacity of control channels from the registry to a local run.
pub const CONTROL_CAPACITY: usize = 64;
/// Batches a push subscription queues while it repairs a hole (beyond that it
/// drops them and reads the replay window to the end). One slot holds a whole
/// append batch, so the queue covers more events the busier a session is.
pub const LIVE_CAPACITY: usize = 32;
/// Capacity, in batches, of a session's ring for pull feeds; a feed that falls
/// further behind refills from the replay window. Sockets read it only between
/// their subscription's registry read and its attach as a push subscription,
/// so it is small, and allocated only while a pull feed is open.
pub const LIVE_RING_CAPACITY: usize = 4;

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
    /// The send's idempotency key (`clientRequestId`): a key the session saw
    /// within the window starts nothing ([`RegistryError::AlreadySent`]); the
    /// check, the lock and the key's record are one atomic step.
    pub request_key: Option<String>,
}

/// What became of the first `chat.send` with an idempotency key
/// (docs/protocol.md §Idempotent sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriorSend {
    /// It started this run; `is_processing` while the run still holds the lock.
    Started { run_id: String, first_seq: u64, is_processing: bool },
    /// It was refused: another run held the session's lock.
    RefusedBusy,
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
    /// The send's idempotency key was seen before: nothing was started.
    #[error("this idempotency key was sent before")]
    AlreadySent(PriorSend),
    /// A start whose outcome is unknown: the backend failed after the start may
    /// have taken effect, and reading it back failed too. The run is not
    /// driven here; if it did take the lock, it ends like an orphan.
    #[error("the start's outcome is unknown: {0}")]
    Unconfirmed(String),
}

/// The run registry (docs/cluster.md §The seam): every concern of
/// coordination, behind the one handle the gateway holds ([`SharedRegistry`]).
/// A caller imports the concern traits whose methods it calls.
#[async_trait]
pub trait RunRegistry: RunOwnership + SessionFeeds + RunRouting + UserNotices + SendLimiter {
    /// `Err(reason)` when the registry cannot serve (for `/readyz`).
    async fn ready(&self) -> Result<(), String>;
}

/// The registry as the gateway holds it.
pub type SharedRegistry = Arc<dyn RunRegistry>;
