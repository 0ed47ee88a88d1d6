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
use tokio::sync::mpsc;

use super::{Control, Event, LIVE_RING_CAPACITY, LiveChannel, PriorSend, RunRegistry, notices::Listeners};
use crate::sync::lock_unpoisoned;

/// The in-process registry.
#[derive(Clone)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    sessions: Mutex<HashMap<String, SessionState>>,
    /// Listening sockets by user (a user without any is dropped with its last).
    users: Arc<Listeners>,
    /// requestId → session id, for approvals answered from any socket.
    permissions: Mutex<HashMap<String, String>>,
    /// Users' `chat.send` windows; expired ones are swept.
    sends: Mutex<HashMap<String, SendWindow>>,
    max_events: usize,
    retention: Duration,
    /// How long a session remembers a send's idempotency key.
    idempotency_window: Duration,
}

/// The most idempotency keys one session remembers (the oldest go first);
/// `--max-sends-per-minute` keeps a session far below it within a window.
const MAX_KEYS_PER_SESSION: usize = 1024;

/// One user's current `chat.send` window.
struct SendWindow {
    ends_at: Instant,
    count: u64,
}

struct SessionState {
    last_seq: u64,
    /// Boxed: most sessions have no run, and the map holds every watched one.
    run: Option<Box<ActiveRun>>,
    /// Events of the current (or last) run, oldest first, at most `max_events`.
    window: VecDeque<Event>,
    /// First seq of the run the window belongs to.
    window_first_seq: u64,
    finished_at: Option<Instant>,
    live: Arc<LiveChannel>,
    /// Idempotency keys seen within the window, oldest first.
    sent: VecDeque<SentKey>,
}

/// One idempotency key a session saw, and what became of its send.
struct SentKey {
    key: String,
    at: Instant,
    outcome: SendOutcome,
}

enum SendOutcome {
    Started { run_id: Arc<str>, first_seq: u64 },
    RefusedBusy,
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
            live: LiveChannel::new(LIVE_RING_CAPACITY),
            sent: VecDeque::new(),
        }
    }

    fn idle_and_unwatched(&self, retention: Duration) -> bool {
        self.run.is_none()
            && self.live.watchers() == 0
            && self.sent.is_empty()
            && self.finished_at.is_none_or(|at| at.elapsed() >= retention)
    }

    /// What became of the send with `key`, if it was seen within `window`.
    fn prior_send(&mut self, key: &str, window: Duration) -> Option<PriorSend> {
        self.forget_keys_older_than(window);
        let seen = self.sent.iter().find(|k| k.key == key)?;
        Some(match &seen.outcome {
            SendOutcome::Started { run_id, first_seq } => PriorSend::Started {
                run_id: run_id.to_string(),
                first_seq: *first_seq,
                is_processing: self.run.as_ref().is_some_and(|r| r.run_id == *run_id),
            },
            SendOutcome::RefusedBusy => PriorSend::RefusedBusy,
        })
    }

    fn remember_key(&mut self, key: String, outcome: SendOutcome) {
        if self.sent.len() >= MAX_KEYS_PER_SESSION {
            self.sent.pop_front();
        }
        self.sent.push_back(SentKey { key, at: Instant::now(), outcome });
    }

    fn forget_keys_older_than(&mut self, window: Duration) {
        while self.sent.front().is_some_and(|k| k.at.elapsed() >= window) {
            self.sent.pop_front();
        }
    }
}

impl MemoryRegistry {
    /// A registry keeping `max_events` per session for `retention` after a run
    /// ends, and sends' idempotency keys for `idempotency_window`. Spawns a
    /// sweeper on the current tokio runtime.
    pub fn new(max_events: u64, retention: Duration, idempotency_window: Duration) -> Self {
        let inner = Arc::new(Inner {
            sessions: Mutex::new(HashMap::new()),
            users: Arc::default(),
            permissions: Mutex::new(HashMap::new()),
            sends: Mutex::new(HashMap::new()),
            max_events: usize::try_from(max_events).unwrap_or(usize::MAX).max(1),
            retention,
            idempotency_window,
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
        for state in sessions.values_mut() {
            state.forget_keys_older_than(inner.idempotency_window);
        }
        sessions.retain(|_, s| !s.idle_and_unwatched(retention));
        for state in sessions.values_mut() {
            if state.run.is_none() && state.finished_at.is_some_and(|at| at.elapsed() >= retention) {
                state.window.clear();
            }
        }
        drop(sessions);
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
