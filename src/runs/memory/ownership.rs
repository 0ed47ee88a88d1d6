//! [`RunOwnership`] in process: the run is an [`ActiveRun`] in its session's
//! state, and the lease is fenced by the run id alone (there is no expiry). A
//! run cannot outlive its owner here (they share the process), so the history
//! hand-over of an owner's death has nothing to do.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{ActiveRun, MemoryRegistry, SendOutcome, SessionState};
use crate::{
    protocol::{EventBody, now_iso, sequenced},
    runs::{
        CONTROL_CAPACITY, Event, LiveBatch, OrphanedRun, PriorSend, RegistryError, RunGrant, RunLease, RunOwnership,
        RunStart,
    },
    sync::lock_unpoisoned,
};

impl SessionState {
    fn running(&self, lease: &RunLease) -> Result<&ActiveRun, RegistryError> {
        match &self.run {
            Some(run) if *run.run_id == *lease.run_id => Ok(run),
            _ => Err(RegistryError::Fenced),
        }
    }

    fn push(&mut self, run_id: &Arc<str>, body: &EventBody, max_events: usize) -> Event {
        self.last_seq += 1;
        let event = Event {
            seq: self.last_seq,
            run_id: run_id.clone(),
            terminal: body.is_complete(),
            frame: sequenced(&body.json, self.last_seq),
        };
        self.window.push_back(event.clone());
        while self.window.len() > max_events {
            self.window.pop_front();
        }
        event
    }

    /// Hands appended events to the session's live feeds.
    fn publish(&self, events: &[Event]) {
        // No receivers is fine: the events stay replayable in the window.
        self.live.send(LiveBatch::from(events));
    }
}

#[async_trait]
impl RunOwnership for MemoryRegistry {
    async fn start_run(&self, start: RunStart) -> Result<RunGrant, RegistryError> {
        let mut sessions = lock_unpoisoned(&self.inner.sessions);
        let state = sessions.entry(start.session_id.clone()).or_insert_with(SessionState::new);
        if let Some(key) = &start.request_key
            && let Some(prior) = state.prior_send(key, self.inner.idempotency_window)
        {
            return Err(RegistryError::AlreadySent(prior));
        }
        if state.run.is_some() {
            if let Some(key) = start.request_key {
                state.remember_key(key, SendOutcome::RefusedBusy);
            }
            return Err(RegistryError::RunInProgress);
        }
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        state.last_seq = state.last_seq.max(start.seq_floor);
        state.window.clear();
        state.window_first_seq = state.last_seq + 1;
        state.finished_at = None;
        let run_id: Arc<str> = Arc::from(start.run_id.as_str());
        if let Some(key) = start.request_key {
            state.remember_key(key, SendOutcome::Started { run_id: run_id.clone(), first_seq: state.last_seq + 1 });
        }
        state.run = Some(Box::new(ActiveRun {
            run_id,
            provider: start.provider,
            user_id: start.user_id,
            node_id: start.node_id,
            started_at: now_iso(),
            control,
            pending: Vec::new(),
        }));
        Ok(RunGrant {
            lease: RunLease { session_id: start.session_id, run_id: start.run_id },
            first_seq: state.last_seq + 1,
            control: control_rx,
        })
    }

    async fn prior_send(&self, session_id: &str, request_key: &str) -> Result<Option<PriorSend>, RegistryError> {
        let window = self.inner.idempotency_window;
        Ok(lock_unpoisoned(&self.inner.sessions).get_mut(session_id).and_then(|s| s.prior_send(request_key, window)))
    }

    async fn append(&self, lease: &RunLease, batch: Vec<EventBody>) -> Result<Vec<Event>, RegistryError> {
        let mut sessions = lock_unpoisoned(&self.inner.sessions);
        let state = sessions.get_mut(&lease.session_id).ok_or(RegistryError::Fenced)?;
        let run_id = state.running(lease)?.run_id.clone();
        let events: Vec<Event> = batch.iter().map(|body| state.push(&run_id, body, self.inner.max_events)).collect();
        state.publish(&events);
        Ok(events)
    }

    async fn complete(&self, lease: &RunLease, body: EventBody) -> Result<Event, RegistryError> {
        let mut sessions = lock_unpoisoned(&self.inner.sessions);
        let state = sessions.get_mut(&lease.session_id).ok_or(RegistryError::Fenced)?;
        let run_id = state.running(lease)?.run_id.clone();
        let event = state.push(&run_id, &body, self.inner.max_events);
        state.publish(std::slice::from_ref(&event));
        if let Some(run) = state.run.take() {
            let mut permissions = lock_unpoisoned(&self.inner.permissions);
            for (request_id, _) in run.pending {
                permissions.remove(&request_id);
            }
        }
        state.finished_at = Some(Instant::now());
        Ok(event)
    }

    async fn renew(&self, lease: &RunLease) -> Result<(), RegistryError> {
        let sessions = lock_unpoisoned(&self.inner.sessions);
        let state = sessions.get(&lease.session_id).ok_or(RegistryError::Fenced)?;
        state.running(lease).map(|_| ())
    }

    async fn add_pending(&self, lease: &RunLease, request_id: &str, request: Value) -> Result<(), RegistryError> {
        let mut sessions = lock_unpoisoned(&self.inner.sessions);
        let state = sessions.get_mut(&lease.session_id).ok_or(RegistryError::Fenced)?;
        state.running(lease)?;
        if let Some(run) = state.run.as_mut() {
            run.pending.retain(|(id, _)| id != request_id);
            run.pending.push((request_id.to_string(), request));
        }
        lock_unpoisoned(&self.inner.permissions).insert(request_id.to_string(), lease.session_id.clone());
        Ok(())
    }

    async fn remove_pending(&self, lease: &RunLease, request_id: &str) -> Result<(), RegistryError> {
        let mut sessions = lock_unpoisoned(&self.inner.sessions);
        if let Some(run) = sessions.get_mut(&lease.session_id).and_then(|s| s.run.as_mut())
            && *run.run_id == *lease.run_id
        {
            run.pending.retain(|(id, _)| id != request_id);
        }
        lock_unpoisoned(&self.inner.permissions).remove(request_id);
        Ok(())
    }

    /// Nothing to hand over: no other node could store the `complete` for this one.
    async fn history_saved(&self, _lease: &RunLease) {}

    /// Nothing to forget: a run's lease never lapses in process, and a run that
    /// ends without a `complete` (the process stops) takes the registry with it.
    async fn abandon(&self, _lease: &RunLease) {}

    /// `None`: an owner cannot be lost while the registry lives, so no run is orphaned.
    fn take_orphans(&self) -> Option<mpsc::Receiver<OrphanedRun>> {
        None
    }
}
