//! One node's shared state and its Redis plumbing.
//!
//! The [`Node`] holds the command pool, the scripts, the pub/sub [`Hub`], and
//! three local maps: sessions this node has feeds on (a broadcast channel per
//! session, filled by the dispatcher), users this node has notice receivers
//! for, and runs this node owns (their control senders, keyed by run id).

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use ::redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use async_trait::async_trait;
use deadpool_redis::{Connection, Pool, PoolError};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use super::{
    RedisRegistryOptions,
    codec::{self, BadReply, EventBuilder, OwnerRecord},
    hub::Hub,
    keys,
    scripts::Scripts,
};
use crate::{
    protocol::{Frame, now_iso},
    runs::{Control, Event, LIVE_CAPACITY, RegistryError, ReplayRange, feed::RangeSource},
};

/// Capacity of a user's notice channel on one node.
pub const USER_CAPACITY: usize = 64;
/// How long a finished session's seq counter stays in Redis; after that the
/// next run restores it from SQL's high-water mark (plus the margin).
pub const SEQ_IDLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Safety expiry of `cg:perm:{R}`; normally deleted when answered or at the run's end.
pub const PERMISSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// The `error` of the terminal `complete` that ends an orphaned run.
pub const OWNER_LOST: &str = "run owner lost";
/// Seqs at or above this are beyond what Lua numbers hold exactly.
pub const MAX_SCRIPT_SEQ: u64 = 1 << 53;

/// A Redis call that failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
    #[error("Redis pool: {0}")]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Reply(#[from] BadReply),
    #[error("Redis call timed out")]
    Timeout,
}

impl Failure {
    /// Worth retrying: the connection failed, not the request.
    pub fn is_transient(&self) -> bool {
        match self {
            Failure::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || matches!(
                        e.kind(),
                        ErrorKind::Server(
                            ServerErrorKind::BusyLoading
                                | ServerErrorKind::TryAgain
                                | ServerErrorKind::MasterDown
                                | ServerErrorKind::ReadOnly
                        )
                    )
            }
            Failure::Pool(_) | Failure::Timeout => true,
            Failure::Reply(_) => false,
        }
    }
}

impl From<Failure> for RegistryError {
    fn from(failure: Failure) -> Self {
        RegistryError::Unavailable(failure.to_string())
    }
}

/// A run seen in progress on a watched session (for owner-loss detection).
#[derive(Debug, Clone)]
pub struct SeenRun {
    pub run_id: String,
    pub provider: String,
}

/// A session this node has live feeds on.
pub struct LiveSession {
    pub tx: broadcast::Sender<Event>,
    pub feeds: usize,
    /// Highest seq handed to `tx`; older live messages are dropped.
    pub last_dispatched: u64,
    /// The run in progress as far as this node knows.
    pub run: Option<SeenRun>,
    /// Since when the lock of `run` was seen missing.
    pub lock_missing_since: Option<Instant>,
    builder: EventBuilder,
}

impl LiveSession {
    fn new() -> Self {
        LiveSession {
            tx: broadcast::channel(LIVE_CAPACITY).0,
            feeds: 0,
            last_dispatched: 0,
            run: None,
            lock_missing_since: None,
            builder: EventBuilder::default(),
        }
    }

    fn dispatch(&mut self, events: Vec<Event>) {
        for event in events {
            if event.seq <= self.last_dispatched {
                continue;
            }
            self.last_dispatched = event.seq;
            if event.terminal {
                self.run = None;
            } else if self.run.as_ref().is_none_or(|r| *r.run_id != *event.run_id) {
                self.run = Some(SeenRun { run_id: event.run_id.to_string(), provider: provider_of(&event.frame) });
            }
            self.lock_missing_since = None;
            // No receiver is fine: a feed that comes later reads the stream.
            let _ = self.tx.send(event);
        }
    }
}

fn provider_of(frame: &str) -> String {
    #[derive(Deserialize)]
    struct Provider {
        provider: Option<String>,
    }
    serde_json::from_str::<Provider>(frame).ok().and_then(|p| p.provider).unwrap_or_default()
}

/// A user this node has notice receivers for.
pub struct UserNotices {
    pub tx: broadcast::Sender<Frame>,
    /// Hub holds taken for this user's channel.
    pub holds: usize,
}

/// A run this node owns.
pub struct LocalRun {
    pub user_id: String,
    pub control: mpsc::Sender<Control>,
    /// The lock JSON, to re-take the lock if Redis lost it.
    pub owner_json: String,
    /// The last seq this run was given (or the floor before its first event).
    pub last_seq: u64,
}

/// Local runs are keyed by (session id, run id).
pub type RunKey = (String, String);

pub fn run_key(session_id: &str, run_id: &str) -> RunKey {
    (session_id.to_string(), run_id.to_string())
}

/// A control message on `cg:node:<id>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMessage {
    pub session_id: String,
    pub run_id: String,
    pub control: Control,
}

/// The node's view of its own pub/sub probe.
pub struct Probe {
    /// Highest probe nonce heard back.
    pub echo: watch::Sender<u64>,
    /// `Err(reason)` after an unanswered probe.
    pub status: Mutex<Result<(), String>>,
}

/// Shared state of one registry node.
pub struct Node {
    pub id: String,
    pub opts: RedisRegistryOptions,
    pub pool: Pool,
    pub scripts: Scripts,
    pub hub: Hub,
    pub node_channel: String,
    pub probe_channel: String,
    pub sessions: Mutex<HashMap<String, LiveSession>>,
    pub users: Mutex<HashMap<String, UserNotices>>,
    pub runs: Mutex<HashMap<RunKey, LocalRun>>,
    pub probe: Probe,
}

/// Locks a map; a poisoned lock (a panic elsewhere) still holds consistent data here.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `["S","R"]` member of the run indexes.
pub fn index_member(session_id: &str, run_id: &str) -> String {
    serde_json::json!([session_id, run_id]).to_string()
}

/// Reads a `["S","R"]` index member.
pub fn parse_index_member(member: &str) -> Option<(String, String)> {
    serde_json::from_str(member).ok()
}

pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What an orphan reap did.
#[derive(Debug, PartialEq)]
pub enum Reaped {
    /// The lock is held: the owner is alive.
    Alive,
    /// Nothing to end.
    None,
    /// The run was ended with the terminal `complete`.
    Ended,
}

impl Node {
    pub async fn conn(&self) -> Result<Connection, Failure> {
        Ok(self.pool.get().await?)
    }

    /// Retries `op` on transient failures until `window` has passed.
    pub async fn retrying<T, F, Fut>(&self, window: Duration, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let deadline = Instant::now() + window;
        let mut pause = Duration::from_millis(20);
        loop {
            match op().await {
                Err(e) if e.is_transient() && Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, "Redis call failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// How long a call may be retried before the caller is told the backend is away.
    pub fn retry_window(&self) -> Duration {
        (self.opts.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    pub fn margin(&self) -> u64 {
        self.opts.max_events.max(1)
    }

    /// Ends the session's orphaned run (lock gone, owner record left), or with
    /// `lost` = (run id, provider) a run Redis lost altogether. Exactly one
    /// caller across the cluster ends a given run.
    pub async fn reap(&self, session_id: &str, lost: Option<&SeenRun>, floor: u64) -> Result<Reaped, Failure> {
        let (expected, provider) = lost.map(|r| (r.run_id.as_str(), r.provider.as_str())).unwrap_or(("", ""));
        let event_id = uuid::Uuid::new_v4().to_string();
        let mut inv = self.scripts.reap.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .key(keys::pending(session_id))
            .key(keys::live_channel(session_id))
            .arg(expected)
            .arg(if lost.is_some() { provider } else { "" })
            .arg(session_id)
            .arg(event_id)
            .arg(now_iso())
            .arg(OWNER_LOST)
            .arg(self.opts.max_events.max(1))
            .arg(millis(self.opts.retention))
            .arg(millis(SEQ_IDLE_TTL))
            .arg(floor.min(MAX_SCRIPT_SEQ - 1))
            .arg(self.margin());
        let reply: Value = self.retrying(self.retry_window(), || self.invoke(&inv)).await?;
        let mut items = codec::array(reply)?.into_iter();
        let status = codec::text(items.next().unwrap_or(Value::Nil))?;
        match status.as_str() {
            "ALIVE" => Ok(Reaped::Alive),
            "NONE" => Ok(Reaped::None),
            "REAPED" => {
                let owner_json = codec::text(items.next().unwrap_or(Value::Nil))?;
                let _first = codec::int(items.next().unwrap_or(Value::Nil))?;
                let pending = codec::texts(items.next().unwrap_or(Value::Nil))?;
                let owner = if owner_json.is_empty() { None } else { Some(OwnerRecord::parse(&owner_json)?) };
                let run_id = owner.as_ref().map(|o| o.run_id.as_str()).unwrap_or(expected);
                tracing::warn!(session_id, run_id, "ended a run whose owner was lost");
                self.forget_run(session_id, run_id, owner.as_ref().map(|o| o.user_id.as_str()), &pending).await;
                Ok(Reaped::Ended)
            }
            other => Err(BadReply(format!("reap: {other}")).into()),
        }
    }

    /// Invokes a prepared script on a pooled connection.
    pub async fn invoke(&self, inv: &::redis::ScriptInvocation<'_>) -> Result<Value, Failure> {
        let mut conn = self.conn().await?;
        Ok(inv.invoke_async(&mut conn).await?)
    }

    /// Drops the index entries and permission keys of a finished run (best effort:
    /// stale index entries are skipped by readers and swept later).
    pub async fn forget_run(&self, session_id: &str, run_id: &str, user_id: Option<&str>, pending: &[String]) {
        let member = index_member(session_id, run_id);
        let mut pipe = ::redis::pipe();
        pipe.zrem(keys::RUNS_INDEX, &member).ignore();
        if let Some(user_id) = user_id {
            pipe.srem(keys::user_runs(user_id), &member).ignore();
        }
        for request_id in pending {
            pipe.del(keys::permission(request_id)).ignore();
        }
        if let Err(e) = self.query_pipe(&pipe).await {
            tracing::warn!(session_id, run_id, error = %e, "could not clean a finished run's index entries");
        }
    }

    /// Adds a run to the indexes read by `running_runs` and the sweeper.
    pub async fn index_run(&self, session_id: &str, run_id: &str, user_id: &str) {
        let member = index_member(session_id, run_id);
        let now = u64::try_from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis(),
        )
        .unwrap_or(0);
        let mut pipe = ::redis::pipe();
        pipe.zadd(keys::RUNS_INDEX, &member, now).ignore().sadd(keys::user_runs(user_id), &member).ignore();
        let result = self.retrying(self.retry_window(), || self.query_pipe(&pipe)).await;
        if let Err(e) = result {
            tracing::warn!(session_id, run_id, error = %e, "could not index a run; only its subscribers will notice if its owner dies");
        }
    }

    pub async fn query_pipe(&self, pipe: &::redis::Pipeline) -> Result<(), Failure> {
        let mut conn = self.conn().await?;
        Ok(pipe.query_async::<()>(&mut conn).await?)
    }

    /// Reads the stream's events with `after < seq <= up_to` and the seq top.
    pub async fn read_events(&self, session_id: &str, after: u64, up_to: u64) -> Result<(u64, Vec<Event>), Failure> {
        if after >= MAX_SCRIPT_SEQ || up_to <= after {
            return Ok((0, Vec::new()));
        }
        let stop = if up_to >= MAX_SCRIPT_SEQ { "+".to_string() } else { up_to.to_string() };
        let mut inv = self.scripts.read_range.prepare_invoke();
        inv.key(keys::seq(session_id)).key(keys::events(session_id)).arg(after).arg(stop);
        let reply: Value = self.retrying(self.retry_window(), || self.invoke(&inv)).await?;
        let mut items = codec::array(reply)?.into_iter();
        let top = codec::int(items.next().unwrap_or(Value::Nil))?;
        let events = codec::decode_entries(items.next().unwrap_or(Value::Nil))?;
        Ok((top, events))
    }

    /// Routes one pub/sub message.
    pub fn on_message(&self, channel: &str, payload: &[u8]) {
        if let Some(session_id) = keys::session_of_live_channel(channel) {
            self.on_live(session_id, payload);
        } else if channel == self.node_channel {
            self.on_control(payload);
        } else if channel == self.probe_channel {
            if let Some(nonce) = std::str::from_utf8(payload).ok().and_then(|s| s.parse::<u64>().ok()) {
                self.probe.echo.send_if_modified(|last| {
                    let newer = nonce > *last;
                    if newer {
                        *last = nonce;
                    }
                    newer
                });
            }
        } else if let Some(user_id) = keys::user_of_channel(channel) {
            let Ok(text) = std::str::from_utf8(payload) else { return };
            if let Some(user) = lock(&self.users).get(user_id) {
                let _ = user.tx.send(Frame::from(text));
            }
        }
    }

    fn on_live(&self, session_id: &str, payload: &[u8]) {
        let mut sessions = lock(&self.sessions);
        let Some(session) = sessions.get_mut(session_id) else { return };
        match codec::decode_live(payload, &mut session.builder) {
            Ok(events) => session.dispatch(events),
            Err(e) => tracing::warn!(session_id, error = %e, "dropped a malformed live message"),
        }
    }

    fn on_control(&self, payload: &[u8]) {
        let message: NodeMessage = match serde_json::from_slice(payload) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "dropped a malformed control message");
                return;
            }
        };
        let runs = lock(&self.runs);
        let Some(run) = runs.get(&run_key(&message.session_id, &message.run_id)) else {
            tracing::debug!(run_id = message.run_id, "control message for a run this node no longer owns");
            return;
        };
        if let Err(e) = run.control.try_send(message.control) {
            tracing::warn!(run_id = message.run_id, error = %e, "control message dropped: the run's queue is full or closed");
        }
    }

    /// Hands the events in the stream after each watched session's last
    /// dispatched seq to its feeds (after a reconnect, pub/sub lost them).
    pub async fn catch_up(&self) {
        let watched: Vec<(String, u64)> =
            lock(&self.sessions).iter().map(|(id, s)| (id.clone(), s.last_dispatched)).collect();
        for (session_id, after) in watched {
            match self.read_events(&session_id, after, u64::MAX).await {
                Ok((_, events)) if !events.is_empty() => {
                    let mut sessions = lock(&self.sessions);
                    if let Some(session) = sessions.get_mut(&session_id) {
                        session.dispatch(events);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(session_id, error = %e, "catch-up read failed; feeds fill gaps on the next event")
                }
            }
        }
    }

    /// Delivers a control message to the run's owner node (directly when it is this one).
    pub async fn deliver(
        &self,
        owner_node: &str,
        session_id: &str,
        run_id: &str,
        control: Control,
    ) -> Result<(), RegistryError> {
        let local = lock(&self.runs).get(&run_key(session_id, run_id)).map(|r| r.control.clone());
        if let Some(tx) = local {
            return match tokio::time::timeout(self.retry_window(), tx.send(control)).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(RegistryError::Unavailable("the run is not taking control messages".into())),
            };
        }
        let message = NodeMessage { session_id: session_id.to_string(), run_id: run_id.to_string(), control };
        let payload = serde_json::to_string(&message).map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let channel = keys::node_channel(owner_node);
        let receivers: u64 = self
            .retrying(self.retry_window(), || async {
                let mut conn = self.conn().await?;
                Ok(::redis::cmd("PUBLISH").arg(&channel).arg(&payload).query_async(&mut conn).await?)
            })
            .await?;
        if receivers == 0 {
            tracing::warn!(
                owner_node,
                run_id,
                "no node listens on the owner's control channel; the lease will end the run"
            );
        }
        Ok(())
    }
}

#[async_trait]
impl RangeSource for Node {
    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        if after_seq >= MAX_SCRIPT_SEQ || up_to <= after_seq {
            return Ok(ReplayRange { events: Vec::new(), complete: true });
        }
        let (top, events) = self.read_events(session_id, after_seq, up_to).await?;
        let complete = codec::is_contiguous(&events, after_seq, up_to.min(top));
        Ok(ReplayRange { events, complete })
    }
}

/// Keeps a feed's session entry and hub subscription; released on drop.
pub struct FeedGuard {
    pub node: Arc<Node>,
    pub session_id: String,
}

impl Drop for FeedGuard {
    fn drop(&mut self) {
        {
            let mut sessions = lock(&self.node.sessions);
            if let Some(session) = sessions.get_mut(&self.session_id) {
                session.feeds = session.feeds.saturating_sub(1);
                if session.feeds == 0 {
                    sessions.remove(&self.session_id);
                }
            }
        }
        let node = self.node.clone();
        let channel = keys::live_channel(&self.session_id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { node.hub.release(&channel).await });
        }
    }
}

/// Registers a new feed on a session: its entry (created if needed) and a receiver.
pub fn attach_feed(node: &Arc<Node>, session_id: &str) -> (broadcast::Receiver<Event>, FeedGuard) {
    let mut sessions = lock(&node.sessions);
    let session = sessions.entry(session_id.to_string()).or_insert_with(LiveSession::new);
    session.feeds += 1;
    let rx = session.tx.subscribe();
    (rx, FeedGuard { node: node.clone(), session_id: session_id.to_string() })
}
