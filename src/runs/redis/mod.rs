//! Run registry over Redis: cluster mode (docs/cluster.md).
//!
//! Keys and channels are in [`keys`], the atomic writes in [`scripts`]. The
//! owner appends through one Lua script per batch (fence, seq, XADD, PUBLISH);
//! a subscriber first holds the session's channel on its node ([`hub`]), then
//! reads lock, seq top and the current run's replay in one script, and its
//! [`LiveFeed`] merges the live events by seq (dropping duplicates, filling
//! gaps from the stream). Live messages reach feeds through the node's one
//! pub/sub connection ([`tasks::dispatch`]), which re-dials with backoff,
//! re-subscribes and catches up from the streams.
//!
//! Running runs are found through a per-user set `cg:user:{U}:runs`, so that
//! `GET /sessions/running` costs the caller's runs only; the sweeper walks a
//! global sorted set `cg:runs`, because it must see every run. Both are written
//! next to (not inside) the session scripts — a session's script may only touch
//! its own hash slot — so their entries can be stale: readers check each entry
//! against the session's owner record and drop the stale ones.
//!
//! Owner death: the lock expires; the owner record (`cg:{S}:owner`) stays.
//! The reap script ends such a run with the terminal `complete`
//! `{exitCode: 1, success: false, aborted: false, error: "run owner lost"}`
//! and succeeds for exactly one caller: nodes watching the session, the
//! one-per-period index sweep, or the next `start_run` on the session.
//!
//! Redis losing its data (restart without persistence): the owner re-takes its
//! vanished lock on its next append or renewal and its run continues; seq
//! counters are restored above anything known plus `max_events`, and the jump
//! reaches subscribers as a gap (`replayTruncated`).

mod codec;
mod hub;
pub mod keys;
mod live;
mod node;
mod owner;
mod reads;
mod recovery;
mod routing;
mod scripts;
mod tasks;

use std::{sync::Arc, time::Duration};

use ::redis::{AsyncConnectionConfig, Client};
use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use serde_json::Value as Json;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::{
    hub::Hub,
    node::{Probe, Reaped, RedisNode},
    scripts::Scripts,
};
use super::{
    Event, RegistryError, ReplayRange, RunGrant, RunLease, RunOwnership, RunRegistry, RunRouting, RunStart, RunningRun,
    SendLimiter, SessionFeeds, Snapshot, Subscription, UserNotices, feed::RangeSource,
};
use crate::protocol::{EventBody, Frame, PermissionAnswer};

/// Tuning of the Redis registry (README §Configuration).
#[derive(Debug, Clone)]
pub struct RedisRegistryOptions {
    /// Run lock lease (`--run-lease`); owners renew every third of it.
    pub lease: Duration,
    /// Newest events kept per session for replay (`--replay-max-events`).
    pub max_events: u64,
    /// How long a finished run's events stay replayable (`--replay-retention`).
    pub retention: Duration,
}

/// Timeout of one Redis command on a pooled connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of opening a Redis connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pooled command connections (each is multiplexed).
const POOL_SIZE: usize = 8;

/// The run registry over Redis. Cheap to clone; background tasks stop when
/// the last clone drops.
#[derive(Clone)]
pub struct RedisRegistry {
    node: Arc<RedisNode>,
    orphans: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::runs::OrphanedRun>>>>,
    _tasks: Arc<DropGuard>,
}

impl RedisRegistry {
    /// Connects to Redis at `url` as node `node_id`: a command pool and a
    /// dedicated pub/sub connection, confirmed before this returns.
    pub async fn connect(url: &str, node_id: &str, opts: RedisRegistryOptions) -> Result<RedisRegistry, RegistryError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| RegistryError::Unavailable(format!("{what}: {e}"));
        let client = Client::open(url).map_err(|e| unavailable("Redis URL", &e))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let manager = Manager::new_with_config(url, config).map_err(|e| unavailable("Redis URL", &e))?;
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(RESPONSE_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| unavailable("Redis pool", &e))?;
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let node_channel = keys::node_channel(node_id);
        let probe_channel = keys::probe_channel(node_id, &instance);
        let hub = Hub::new(client, &[node_channel.clone(), probe_channel.clone()]);
        let (orphans, orphans_rx) = tokio::sync::mpsc::channel(crate::runs::ORPHAN_CAPACITY);
        let node = Arc::new(RedisNode {
            id: node_id.to_string(),
            opts,
            pool,
            lanes: Default::default(),
            scripts: Scripts::new(),
            hub,
            node_channel,
            probe_channel,
            sessions: Default::default(),
            users: Default::default(),
            runs: Default::default(),
            probe: Probe { echo: watch::channel(0).0, status: std::sync::Mutex::new(Ok(())) },
            orphans,
        });
        let mut conn = node.conn().await.map_err(RegistryError::from)?;
        let _: String = ::redis::cmd("PING").query_async(&mut conn).await.map_err(|e| unavailable("Redis PING", &e))?;
        drop(conn);
        let stream = node.hub.connect(CONNECT_TIMEOUT).await.map_err(|e| unavailable("Redis pub/sub", &e))?;
        let cancel = CancellationToken::new();
        let redial = Arc::new(Notify::new());
        tokio::spawn(tasks::dispatch(node.clone(), stream, redial.clone(), cancel.clone()));
        tokio::spawn(tasks::probe(node.clone(), redial, cancel.clone()));
        tokio::spawn(tasks::sweep(node.clone(), cancel.clone()));
        Ok(RedisRegistry {
            node,
            orphans: Arc::new(std::sync::Mutex::new(Some(orphans_rx))),
            _tasks: Arc::new(cancel.drop_guard()),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// Ends the session's run if its owner is gone (lock expired, run not
    /// ended). `Ok(true)` for the one caller that ended it. The sweeper calls
    /// this on its own; it is public for operators and tests.
    pub async fn reap_orphan(&self, session_id: &str) -> Result<bool, RegistryError> {
        Ok(self.node.reap(session_id, None, 0).await? == Reaped::Ended)
    }

    /// Channels this node's pub/sub connection holds (node control and probe included).
    pub async fn held_channels(&self) -> usize {
        self.node.hub.channel_count().await
    }
}

#[async_trait]
impl RunOwnership for RedisRegistry {
    async fn start_run(&self, start: RunStart) -> Result<RunGrant, RegistryError> {
        self.take_run(start).await
    }

    async fn append(&self, lease: &RunLease, batch: Vec<EventBody>) -> Result<Vec<Event>, RegistryError> {
        let bodies: Vec<&str> = batch.iter().map(|b| b.json.as_str()).collect();
        self.append_batch(lease, &bodies, false).await
    }

    async fn complete(&self, lease: &RunLease, body: EventBody) -> Result<Event, RegistryError> {
        let mut events = self.append_batch(lease, &[body.json.as_str()], true).await?;
        events.pop().ok_or_else(|| RegistryError::Unavailable("append returned no event".into()))
    }

    async fn renew(&self, lease: &RunLease) -> Result<(), RegistryError> {
        self.renew_lease(lease).await
    }

    async fn add_pending(&self, lease: &RunLease, request_id: &str, request: Json) -> Result<(), RegistryError> {
        self.add_pending_request(lease, request_id, request).await
    }

    async fn remove_pending(&self, lease: &RunLease, request_id: &str) -> Result<(), RegistryError> {
        self.remove_pending_request(lease, request_id).await
    }

    async fn history_saved(&self, lease: &RunLease) {
        self.node.run_saved(&lease.session_id, &lease.run_id).await;
    }

    async fn abandon(&self, lease: &RunLease) {
        self.drop_local_run(lease);
    }

    fn take_orphans(&self) -> Option<tokio::sync::mpsc::Receiver<crate::runs::OrphanedRun>> {
        self.orphans.lock().ok()?.take()
    }
}

#[async_trait]
impl SessionFeeds for RedisRegistry {
    async fn snapshot(&self, session_id: &str) -> Result<Snapshot, RegistryError> {
        Ok(self.read_session(session_id, None).await?.snapshot())
    }

    async fn subscribe(&self, session_id: &str, after_seq: u64) -> Result<Subscription, RegistryError> {
        self.open_subscription(session_id, after_seq).await
    }

    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        self.node.read_range(session_id, after_seq, up_to).await
    }

    async fn settle(&self, session_id: &str, seq_floor: u64, last_active_ms: i64) -> Result<Duration, RegistryError> {
        self.settle_session(session_id, seq_floor, last_active_ms).await
    }
}

#[async_trait]
impl RunRouting for RedisRegistry {
    async fn route_abort(&self, session_id: &str, user_id: &str) -> Result<bool, RegistryError> {
        self.abort_run(session_id, user_id).await
    }

    async fn route_permission(
        &self,
        user_id: &str,
        request_id: &str,
        answer: PermissionAnswer,
    ) -> Result<bool, RegistryError> {
        self.answer_permission(user_id, request_id, answer).await
    }

    async fn running_runs(&self, user_id: &str) -> Result<Vec<RunningRun>, RegistryError> {
        self.runs_of_user(user_id).await
    }
}

#[async_trait]
impl UserNotices for RedisRegistry {
    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError> {
        self.publish_notice(user_id, frame).await
    }

    async fn user_notices(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError> {
        self.notice_receiver(user_id).await
    }
}

#[async_trait]
impl SendLimiter for RedisRegistry {
    async fn admit_send(&self, user_id: &str, limit: u32, window: Duration) -> Result<bool, RegistryError> {
        self.count_send(user_id, limit, window).await
    }
}

#[async_trait]
impl RunRegistry for RedisRegistry {
    async fn ready(&self) -> Result<(), String> {
        self.check_ready().await
    }
}

#[cfg(test)]
mod tests;
