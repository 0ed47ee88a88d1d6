//! The gateway logic: the `/ws` verbs and the owner-side run driver.
//!
//! [`Gateway`] holds what a node shares between sockets: the store, the run
//! registry (memory or Redis, it does not know which), the runtimes and the
//! node's own runs. A socket is a [`Connection`]; the verbs in [`verbs`] take
//! one and answer through its [`Outbox`].

mod connection;
mod history;
pub mod limits;
pub mod options;
mod orphans;
mod run;
mod transcript;
mod verbs;
pub mod workspaces;

pub mod outbox;
pub mod sessions;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};

pub use connection::Connection;
pub use history::HistoryWriter;
pub use limits::LimitSettings;
pub use outbox::{CloseReason, Outbox};
pub use run::StopReason;
pub use transcript::DraftPolicy;
pub use workspaces::{WorkspaceLayout, Workspaces};

use crate::sync::lock_unpoisoned;
use crate::{
    runs::SharedRegistry,
    runtime::{Runtimes, sandbox::Containment},
    store::Store,
};

/// How long the drain waits for socket tasks to finish their closing handshake
/// (the socket task lingers at most twice 2 s: for the peer's Close, then its writer).
const SOCKETS_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Node settings the gateway logic needs.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub node_id: String,
    /// Where users' projects and provider homes live.
    pub workspaces: Workspaces,
    /// How provider CLIs are contained (environment, bounds, sandbox).
    pub containment: Arc<Containment>,
    /// `--max-runs`: runs this node owns at once.
    pub max_runs: u32,
    pub run_lease: Duration,
    pub send_queue_bytes: usize,
    /// Clients may ask for `bypassPermissions` / `skipPermissions`.
    pub allow_bypass_permissions: bool,
    /// Abuse limits (subscriptions, sends, frames, replay bytes).
    pub limits: LimitSettings,
    /// `--replay-max-events`: stream drafts are kept well inside it.
    pub replay_max_events: u64,
}

/// A run this node owns, as the drain sees it.
struct TrackedRun {
    stop: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
}

/// One node's gateway state, shared by all its sockets.
pub struct Gateway {
    pub settings: GatewaySettings,
    pub store: Store,
    pub registry: SharedRegistry,
    pub runtimes: Runtimes,
    history: HistoryWriter,
    runs: Mutex<HashMap<String, TrackedRun>>,
    tracker: TaskTracker,
    draining: AtomicBool,
    /// Held (shared) by `chat.send` from its draining check until its run is
    /// tracked; the drain takes it exclusively, so no run slips past the drain.
    admission: tokio::sync::RwLock<()>,
    /// Cancelled when the node drains: sockets close with 1012.
    pub sockets_closing: CancellationToken,
    /// Every open socket task, so the drain ends only after their close frames went out.
    sockets: TaskTracker,
    /// How runs store their open streams' drafts (cluster mode only).
    stream_drafts: Option<DraftPolicy>,
    /// One permit per run this node owns (`--max-runs`), held by the run's driver.
    run_slots: Arc<tokio::sync::Semaphore>,
}

impl Gateway {
    pub fn new(settings: GatewaySettings, store: Store, registry: SharedRegistry, runtimes: Runtimes) -> Arc<Self> {
        let history = HistoryWriter::spawn(store.clone());
        let settings_max_runs = usize::try_from(settings.max_runs).unwrap_or(usize::MAX);
        metrics::gauge!("chatgate_runs_max").set(f64::from(settings.max_runs));
        let orphans = registry.take_orphans();
        // Only where a node that ends a lost owner's run resumes from them (cluster mode).
        let stream_drafts = orphans.is_some().then(|| DraftPolicy::for_replay_window(settings.replay_max_events));
        if let Some(notices) = orphans {
            orphans::spawn(registry.clone(), store.clone(), history.clone(), notices);
        }
        Arc::new(Gateway {
            settings,
            store,
            registry,
            runtimes,
            history,
            runs: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            admission: tokio::sync::RwLock::new(()),
            sockets_closing: CancellationToken::new(),
            sockets: TaskTracker::new(),
            stream_drafts,
            run_slots: Arc::new(tokio::sync::Semaphore::new(settings_max_runs)),
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Number of runs this node owns right now.
    pub fn local_run_count(&self) -> usize {
        lock_unpoisoned(&self.runs).len()
    }

    /// Drains the node: no new runs, sockets closed with 1012, runs get `grace`
    /// to finish, the rest are ended with a terminal `complete`; history flushed.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        // Every chat.send past its draining check has tracked its run once this returns.
        drop(self.admission.write().await);
        self.sockets_closing.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            self.stop_all(StopReason::Draining);
            // Runtimes get a few seconds to die; the driver then completes regardless.
            let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
        }
        self.history.flush().await;
        // An upgraded socket is not one of the HTTP server's connections: wait for the
        // socket tasks themselves, or the process could exit before a 1012 reached the wire.
        self.sockets.close();
        if tokio::time::timeout(SOCKETS_CLOSE_WAIT, self.sockets.wait()).await.is_err() {
            tracing::warn!(open = self.sockets.len(), "sockets still closing when the drain ended");
        }
    }

    /// Held by a socket task for as long as it runs; the drain waits for all of them.
    pub fn track_socket(&self) -> TaskTrackerToken {
        self.sockets.token()
    }

    /// Stops every local run with `reason`.
    pub fn stop_all(&self, reason: StopReason) {
        let runs: Vec<_> = lock_unpoisoned(&self.runs).values().map(|r| (r.stop.clone(), r.reason.clone())).collect();
        for (stop, slot) in runs {
            lock_unpoisoned(&slot).get_or_insert(reason);
            stop.cancel();
        }
    }

    fn track_run(&self, run_id: &str, stop: CancellationToken, reason: Arc<Mutex<Option<StopReason>>>) {
        lock_unpoisoned(&self.runs).insert(run_id.to_string(), TrackedRun { stop, reason });
        metrics::gauge!("chatgate_runs", "state" => "running").increment(1.0);
    }

    fn untrack_run(&self, run_id: &str) {
        lock_unpoisoned(&self.runs).remove(run_id);
        metrics::gauge!("chatgate_runs", "state" => "running").decrement(1.0);
    }
}

/// The REST and WebSocket session id pattern `^[a-zA-Z0-9._-]{1,120}$`.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 120
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
