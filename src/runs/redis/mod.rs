//! Run registry over Redis: cluster mode (docs/cluster.md).
//!
//! This file holds the type, its options and `connect`. Each concern trait of
//! the seam is implemented, with its real work, in its own file:
//! [`ownership`] (`RunOwnership`: the owner's fenced writes), [`feeds`]
//! (`SessionFeeds`: snapshots, subscriptions, range reads, settling),
//! [`routing`] (`RunRouting`: control messages to the owner node, running
//! runs), [`notices`] (`UserNotices`), [`limiter`] (`SendLimiter`) and
//! [`readiness`] (`RunRegistry::ready`). Beneath them: the node's state and
//! Redis plumbing ([`node`]), live delivery ([`live`]), the pub/sub hub
//! ([`hub`]), background tasks ([`tasks`]), data-loss recovery ([`recovery`]).
//!
//! Keys and channels are in [`keys`], the atomic writes in [`scripts`]. The
//! owner appends through one Lua script per batch (fence, seq, XADD, PUBLISH);
//! a subscriber first holds the session's channel on its node ([`hub`]), then
//! reads lock, seq top and the current run's replay in one script, and its
//! [`LiveFeed`](crate::runs::LiveFeed) merges the live events by seq (dropping duplicates, filling
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
mod connection;
mod feeds;
mod hub;
pub mod keys;
mod limiter;
mod live;
mod node;
mod notices;
mod ownership;
mod readiness;
mod recovery;
mod routing;
mod scripts;
mod target;
mod tasks;

pub use target::{DEFAULT_SENTINEL_MASTER, RedisTarget, RedisTls, Topology};

use std::{sync::Arc, time::Duration};

use deadpool_redis::{Manager, Pool, Runtime};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::{
    connection::{Commands, Sentinels},
    hub::{Hub, Source},
    node::{Probe, Reaped, RedisNode},
    scripts::Scripts,
};
use super::{ORPHAN_CAPACITY, OrphanedRun, RegistryError};

/// Tuning of the Redis registry (README §Configuration).
#[derive(Debug, Clone)]
pub struct RedisRegistryOptions {
    /// Run lock lease (`--run-lease`); owners renew every third of it.
    pub lease: Duration,
    /// Newest events kept per session for replay (`--replay-max-events`).
    pub max_events: u64,
    /// How long a finished run's events stay replayable (`--replay-retention`).
    pub retention: Duration,
    /// How long a send's idempotency key is remembered (`--idempotency-window`).
    pub idempotency_window: Duration,
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
    /// The reaped-run notices, until the gateway takes them (`take_orphans`).
    orphans: Arc<std::sync::Mutex<Option<mpsc::Receiver<OrphanedRun>>>>,
    _tasks: Arc<DropGuard>,
}

impl RedisRegistry {
    /// Connects to Redis (one, or a Redis Cluster) as node `node_id`: the
    /// command connections and a dedicated pub/sub connection, confirmed before this returns.
    pub async fn connect(
        target: impl Into<RedisTarget>,
        node_id: &str,
        opts: RedisRegistryOptions,
    ) -> Result<RedisRegistry, RegistryError> {
        let target = target.into();
        let unavailable = |what: &str, e: &dyn std::fmt::Display| RegistryError::Unavailable(format!("{what}: {e}"));
        let (commands, source) = match target.topology {
            Topology::Standalone => {
                let url = target.urls.first().map(String::as_str).unwrap_or_default();
                let client = target.tls.client(url).map_err(|e| unavailable("Redis URL", &e))?;
                let manager =
                    Manager::new_with_config(client.get_connection_info().clone(), connection::connection_config())
                        .map_err(|e| unavailable("Redis URL", &e))?;
                let pool = Pool::builder(manager)
                    .max_size(POOL_SIZE)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(Some(RESPONSE_TIMEOUT))
                    .create_timeout(Some(CONNECT_TIMEOUT))
                    .recycle_timeout(Some(CONNECT_TIMEOUT))
                    .build()
                    .map_err(|e| unavailable("Redis pool", &e))?;
                (Commands::standalone(pool), Source::Standalone(client))
            }
            Topology::Sentinel => {
                let sentinels = Arc::new(Sentinels::new(&target).map_err(|e| unavailable("Redis Sentinel", &e))?);
                (Commands::sentinel(sentinels.clone()), Source::Sentinel(sentinels))
            }
            Topology::Cluster => {
                let client =
                    connection::cluster_builder(&target).build().map_err(|e| unavailable("Redis Cluster", &e))?;
                let commands = Commands::cluster(&client, CONNECT_TIMEOUT).await?;
                (commands, Source::Cluster(target.clone()))
            }
        };
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let node_channel = keys::node_channel(node_id);
        let probe_channel = keys::probe_channel(node_id, &instance);
        // On a cluster the probe holds one channel per shard itself (tasks::probe).
        let permanent = match target.topology {
            Topology::Standalone | Topology::Sentinel => vec![node_channel.clone(), probe_channel.clone()],
            Topology::Cluster => vec![node_channel.clone()],
        };
        let hub = Hub::new(source, &permanent);
        let (orphans, orphans_rx) = mpsc::channel(ORPHAN_CAPACITY);
        let node = Arc::new(RedisNode {
            id: node_id.to_string(),
            opts,
            topology: target.topology,
            commands,
            scripts: Scripts::new(target.topology),
            hub,
            node_channel,
            probe_channel,
            sessions: Default::default(),
            notices: Default::default(),
            runs: Default::default(),
            probe: Probe::new(),
            reads: tokio::sync::Semaphore::new(node::READS_IN_FLIGHT),
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

#[cfg(test)]
mod tests;
