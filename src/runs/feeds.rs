//! What readers see of a session: its state, its replay window and its live
//! events, for `chat.subscribe`, gap repair and the session list.
//!
//! A [`Subscription`] is the ack data, the replay of the current run after the
//! caller's cursor, then a [`LiveFeed`](super::LiveFeed) of this and every later
//! run, without gap or duplicate. `settle` tells a reader how long the backend's
//! view of a session cannot be trusted yet (after Redis lost its data).

use std::time::Duration;

use async_trait::async_trait;

use super::{RegistryError, ReplayRange, Snapshot, Subscription};

/// Reading a session's run state, replay and live events (docs/cluster.md §The seam).
#[async_trait]
pub trait SessionFeeds: Send + Sync + 'static {
    /// The session's run state.
    async fn snapshot(&self, session_id: &str) -> Result<Snapshot, RegistryError>;

    /// Ack data, replay of the current run after `after_seq`, then live events of
    /// this and every later run, without gap or duplicate.
    async fn subscribe(&self, session_id: &str, after_seq: u64) -> Result<Subscription, RegistryError>;

    /// Events of the session with `after_seq < seq <= up_to` still in the replay window.
    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError>;

    /// How long to wait before trusting what the registry says of a session
    /// (zero: now). Non-zero only when the backend lost the state of a session
    /// that had events (`seq_floor`, from SQL) and changed recently
    /// (`last_active_ms`), e.g. Redis came back empty: a run may still be live
    /// on an owner that has not re-taken its lock yet (at most one lease).
    async fn settle(&self, session_id: &str, seq_floor: u64, last_active_ms: i64) -> Result<Duration, RegistryError>;
}
