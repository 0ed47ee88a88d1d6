//! In-process run registry: the embedded default (one node, no Redis).
//!
//! All state sits behind one mutex per map; no lock is held across an await.
//! A session's live channel lives as long as it has subscribers or a run, and a
//! finished run's replay window is dropped `--replay-retention` after its end.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use super::{
    CONTROL_CAPACITY, Control, Event, LIVE_CAPACITY, LiveBatch, LiveFeed, RegistryError, ReplayRange, RunGrant,
    RunLease, RunRegistry, RunStart, RunningRun, Snapshot, Subscription, feed::RangeSource,
};
use crate::{
    protocol::{EventBody, Frame, PermissionAnswer, now_iso, sequenced},
    sync::lock_unpoisoned,
};

/// The in-process registry.
#[derive(Clone)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    sessions: Mutex<HashMap<String, SessionState>>,
    users: Mutex<HashMap<String, broadcast::Sender<Frame>>>,
    /// requestId → session id, for approvals answered from any socket.
    permissions: Mutex<HashMap<String, String>>,
    /// Users' `chat.send` windows; expired ones are swept.
    sends: Mutex<HashMap<String, SendWindow>>,
    max_events: usize,
    retention: Duration,
}

/// One user's current `chat.send` window.
struct SendWindow {
    ends_at: Instant,
    count: u64,
}

struct SessionState {
    last_seq: u64,
    run: Option<ActiveRun>,
    /// Events of the current (or last) run, oldest first, at most `max_events`.
    window: VecDeque<Event>,
    /// First seq of the run the window belongs to.
    window_first_seq: u64,
    finished_at: Option<Instant>,
    live: broadcast::Sender<LiveBatch>,
}

struct ActiveRun {
    run_id: Arc<str>,
    provider: String,
    user_id: String,
    node_id: String,
    started_at: String,
    control: mpsc::Sender<Control>,
    pending: Vec<(String, Value)>,
}

impl SessionState {
    fn new() -> Self {
        SessionState {
            last_seq: 0,
            run: None,
            window: VecDeque::new(),
            window_first_seq: 1,
            finished_at: None,
            live: broadcast::channel(LIVE_CAPACITY).0,
        }
    }

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
        let _ = self.live.send(LiveBatch::from(events));
    }

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

    fn idle_and_unwatched(&self, retention: Duration) -> bool {
        self.run.is_none()
            && self.live.receiver_count() == 0
            && self.finished_at.is_none_or(|at| at.elapsed() >= retention)
    }
}

impl MemoryRegistry {
    /// A registry keeping `max_events` per session for `retention` after a run ends.
    /// Spawns a sweeper on the current tokio runtime.
    pub fn new(max_events: u64, retention: Duration) -> Self {
        let inner = Arc::new(Inner {
            sessions: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            permissions: Mutex::new(HashMap::new()),
            sends: Mutex::new(HashMap::new()),
            max_events: usize::try_from(max_events).unwrap_or(usize::MAX).max(1),
            retention,
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        MemoryRegistry { inner }
    }
}

/// Drops expired replay windows and forgotten sessions, every few seconds.
async fn sweep(inner: Weak<Inner>) {
    let period = Duration::from_secs(5);
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let retention = inner.retention;
        let mut sessions = lock_unpoisoned(&inner.sessions);
        sessions.retain(|_, s| !s.idle_and_unwatched(retention));
        for state in sessions.values_mut() {
            if state.run.is_none() && state.finished_at.is_some_and(|at| at.elapsed() >= retention) {
                state.window.clear();
            }
        }
        drop(sessions);
        lock_unpoisoned(&inner.users).retain(|_, tx| tx.receiver_count() > 0);
        let now = Instant::now();
        lock_unpoisoned(&inner.sends).retain(|_, window| window.ends_at > now);
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
impl RunRegistry for MemoryRegistry {
    async fn start_run(&self, start: RunStart) -> Result<RunGrant, RegistryError> {
        let mut sessions = lock_unpoisoned(&self.inner.sessions);
        let state = sessions.entry(start.session_id.clone()).or_insert_with(SessionState::new);
        if state.run.is_some() {
            return Err(RegistryError::RunInProgress);
        }
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        state.last_seq = state.last_seq.max(start.seq_floor);
        state.window.clear();
        state.window_first_seq = state.last_seq + 1;
        state.finished_at = None;
        state.run = Some(ActiveRun {
            run_id: Arc::from(start.run_id.as_str()),
            provider: start.provider,
            user_id: start.user_id,
            node_id: start.node_id,
            started_at: now_iso(),
            control,
            pending: Vec::new(),
        });
        Ok(RunGrant {
            lease: RunLease { session_id: start.session_id, run_id: start.run_id },
            first_seq: state.last_seq + 1,
            control: control_rx,
        })
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
        let live = LiveFeed::new(session_id.to_string(), rx, state.last_seq, source, None);
        Ok(Subscription { snapshot, replay_truncated, replay, live })
    }

    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        self.inner.read_range(session_id, after_seq, up_to).await
    }

    async fn route_abort(&self, session_id: &str, user_id: &str) -> Result<bool, RegistryError> {
        let control = {
            let sessions = lock_unpoisoned(&self.inner.sessions);
            match sessions.get(session_id).and_then(|s| s.run.as_ref()) {
                Some(run) if run.user_id == user_id => Some((
                    run.control.clone(),
                    Control::Abort { session_id: session_id.to_string(), run_id: run.run_id.to_string() },
                )),
                _ => None,
            }
        };
        let Some((tx, message)) = control else { return Ok(false) };
        tx.send(message).await.map_err(|_| RegistryError::Unavailable("run is shutting down".into()))?;
        Ok(true)
    }

    async fn route_permission(
        &self,
        user_id: &str,
        request_id: &str,
        answer: PermissionAnswer,
    ) -> Result<bool, RegistryError> {
        let Some(session_id) = lock_unpoisoned(&self.inner.permissions).get(request_id).cloned() else {
            return Ok(false);
        };
        let tx = {
            let sessions = lock_unpoisoned(&self.inner.sessions);
            match sessions.get(&session_id).and_then(|s| s.run.as_ref()) {
                Some(run) if run.user_id == user_id && run.pending.iter().any(|(id, _)| id == request_id) => {
                    run.control.clone()
                }
                _ => return Ok(false),
            }
        };
        let message = Control::Permission { session_id, request_id: request_id.to_string(), answer };
        Ok(tx.send(message).await.is_ok())
    }

    async fn running_runs(&self, user_id: &str) -> Result<Vec<RunningRun>, RegistryError> {
        let sessions = lock_unpoisoned(&self.inner.sessions);
        let mut runs: Vec<RunningRun> = sessions
            .iter()
            .filter_map(|(session_id, state)| {
                let run = state.run.as_ref().filter(|r| r.user_id == user_id)?;
                Some(RunningRun {
                    session_id: session_id.clone(),
                    provider: run.provider.clone(),
                    run_id: run.run_id.to_string(),
                    started_at: run.started_at.clone(),
                    last_seq: state.last_seq,
                    node_id: run.node_id.clone(),
                    user_id: run.user_id.clone(),
                })
            })
            .collect();
        runs.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        Ok(runs)
    }

    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError> {
        if let Some(tx) = lock_unpoisoned(&self.inner.users).get(user_id) {
            let _ = tx.send(frame);
        }
        Ok(())
    }

    async fn user_notices(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError> {
        let mut users = lock_unpoisoned(&self.inner.users);
        Ok(users.entry(user_id.to_string()).or_insert_with(|| broadcast::channel(super::NOTICE_CAPACITY).0).subscribe())
    }

    async fn admit_send(&self, user_id: &str, limit: u32, window: Duration) -> Result<bool, RegistryError> {
        let now = Instant::now();
        let mut sends = lock_unpoisoned(&self.inner.sends);
        let current = sends.entry(user_id.to_string()).or_insert(SendWindow { ends_at: now + window, count: 0 });
        if current.ends_at <= now {
            *current = SendWindow { ends_at: now + window, count: 0 };
        }
        current.count += 1;
        Ok(current.count <= u64::from(limit))
    }

    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}
