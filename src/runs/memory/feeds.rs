//! [`SessionFeeds`] in process: snapshots and range reads of the session's
//! window, and subscriptions on its broadcast channel. Nothing is ever lost
//! behind the registry's back here, so `settle` never waits.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{Inner, MemoryRegistry, SessionState};
use crate::{
    runs::{Event, LiveFeed, RegistryError, ReplayRange, SessionFeeds, Snapshot, Subscription, feed::RangeSource},
    sync::lock_unpoisoned,
};

impl SessionState {
    fn snapshot(&self) -> Snapshot {
        match &self.run {
            Some(run) => Snapshot {
                is_processing: true,
                run_id: Some(run.run_id.to_string()),
                owner_node: Some(run.node_id.clone()),
                last_seq: self.last_seq,
                pending_permissions: run.pending.iter().map(|(_, v)| v.clone()).collect(),
            },
            None => Snapshot { last_seq: self.last_seq, ..Snapshot::default() },
        }
    }

    fn range(&self, after_seq: u64, up_to: u64) -> ReplayRange {
        let events: Vec<Event> = self.window.iter().filter(|e| e.seq > after_seq && e.seq <= up_to).cloned().collect();
        let nothing_newer = self.last_seq <= after_seq;
        let covered = self.window.front().is_some_and(|e| e.seq <= after_seq.saturating_add(1));
        ReplayRange { events, complete: nothing_newer || covered }
    }
}

#[async_trait]
impl RangeSource for Inner {
    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        Ok(lock_unpoisoned(&self.sessions)
            .get(session_id)
            .map(|s| s.range(after_seq, up_to))
            .unwrap_or(ReplayRange { events: Vec::new(), complete: true }))
    }
}

#[async_trait]
impl SessionFeeds for MemoryRegistry {
    async fn snapshot(&self, session_id: &str) -> Result<Snapshot, RegistryError> {
        Ok(lock_unpoisoned(&self.inner.sessions).get(session_id).map(SessionState::snapshot).unwrap_or_default())
    }

    async fn subscribe(&self, session_id: &str, after_seq: u64) -> Result<Subscription, RegistryError> {
        let mut sessions = lock_unpoisoned(&self.inner.sessions);
        let state = sessions.entry(session_id.to_string()).or_insert_with(SessionState::new);
        let rx = state.live.subscribe();
        let snapshot = state.snapshot();
        let (replay, replay_truncated) = if snapshot.is_processing {
            let from = after_seq.max(state.window_first_seq.saturating_sub(1));
            let range = state.range(from, u64::MAX);
            let truncated = !range.complete;
            (range.events, truncated)
        } else {
            (Vec::new(), false)
        };
        let source: Arc<dyn RangeSource> = self.inner.clone();
        let live = LiveFeed::new(session_id.to_string(), &state.live, rx, state.last_seq, source, None);
        Ok(Subscription { snapshot, replay_truncated, replay, live })
    }

    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        self.inner.read_range(session_id, after_seq, up_to).await
    }

    /// Zero: this registry's view is the only one, and it cannot lose a session's state.
    async fn settle(
        &self,
        _session_id: &str,
        _seq_floor: u64,
        _last_active_ms: i64,
    ) -> Result<Duration, RegistryError> {
        Ok(Duration::ZERO)
    }
}
