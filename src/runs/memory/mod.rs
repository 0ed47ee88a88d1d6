//! In-process run registry: the embedded default (one node, no Redis).
//!
//! All state sits behind one mutex per map; no lock is held across an await.
//! A session's live channel lives as long as it has subscribers or a run, and a
//! finished run's replay window is dropped `--replay-retention` after its end.
//!
//! This file holds the state and its sweeper; each concern trait of the seam is
//! implemented in its own file: [`ownership`] (the run's writes and pending
//! approvals), [`feeds`] (snapshots, subscriptions, range reads), [`routing`]
//! (control messages, running runs), [`notices`] (per-user notices) and
//! [`limiter`] (the `chat.send` budget).

mod feeds;
mod limiter;
mod notices;
mod ownership;
mod routing;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use super::{Control, Event, LIVE_CAPACITY, LiveBatch, RunRegistry};
use crate::{protocol::Frame, sync::lock_unpoisoned};

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
impl RunRegistry for MemoryRegistry {
    /// Always ready: there is no backend to lose.
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}
