//! The node's pub/sub connection: one dedicated connection per node, with
//! refcounted channel subscriptions.
//!
//! [`Hub::acquire`] returns once Redis confirmed the subscription (or at once
//! when the node already holds it), so a caller may read the stream right
//! after and miss nothing. Subscribe / unsubscribe commands are only sent on
//! refcount transitions, under one async lock, so they reach Redis in the
//! order the refcounts changed. After a reconnect, [`Hub::connect`]
//! re-subscribes every channel that still has holders before the connection
//! is used again.
//!
//! On one Redis the connection is a RESP2 pub/sub connection (SUBSCRIBE);
//! under Sentinel the same, to the primary the sentinels name when it dials. On
//! a Redis Cluster it is a RESP3 cluster connection used for sharded pub/sub
//! only (SSUBSCRIBE: each channel on the shard owning its slot); messages and
//! the connection's own notices (a shard dropped a subscription when its slot
//! moved, a shard connection was lost) arrive as pushes on a bounded queue
//! ([`Incoming::Pushes`]). redis-rs does not re-subscribe a sharded channel
//! after a slot moved or a shard failed over, so the dispatcher answers
//! either by re-dialing the hub ([`super::tasks::dispatch`]).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ::redis::{
    Client, Msg, ProtocolVersion, PushInfo, PushKind, RedisError,
    aio::{PubSubSink, PubSubStream},
    cluster_async::ClusterConnection,
};
use futures_util::StreamExt;
use tokio::sync::{Mutex, mpsc};

use super::connection;
use crate::runs::RegistryError;

/// How long one subscribe / unsubscribe may take before the connection is
/// considered dead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE command (or SSUBSCRIBEs in flight) when restoring after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 512;
/// Pushes a cluster hub queues for its dispatcher; beyond that they are
/// dropped and the dispatcher catches up from the streams.
const PUSH_QUEUE: usize = 8192;

/// Where the hub's connection goes.
pub(super) enum Source {
    Standalone(Client),
    /// The primary the sentinels name at each (re)connect.
    Sentinel(Arc<connection::Sentinels>),
    /// A Redis Cluster (its seed nodes and TLS material).
    Cluster(super::RedisTarget),
}

/// The subscribing half of the hub's connection.
enum Link {
    Pubsub(PubSubSink),
    Sharded(ClusterConnection),
}

impl Link {
    async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        match self {
            Link::Pubsub(sink) => sink.subscribe(channels).await,
            // One SSUBSCRIBE per channel (one command may not span slots), sent at once; the
            // caller bounds how many (`connect` restores them a chunk at a time).
            Link::Sharded(conn) => {
                let subscribes = channels.iter().cloned().map(|channel| {
                    let mut conn = conn.clone();
                    async move { conn.ssubscribe(channel).await }
                });
                futures_util::future::try_join_all(subscribes).await.map(drop)
            }
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<(), RedisError> {
        match self {
            Link::Pubsub(sink) => sink.unsubscribe(channel).await,
            Link::Sharded(conn) => conn.sunsubscribe(channel).await,
        }
    }
}

/// What the dispatcher reads: the message stream of one Redis, or the pushes
/// of a cluster connection.
pub(super) enum Incoming {
    Pubsub(PubSubStream),
    Pushes {
        rx: mpsc::Receiver<PushInfo>,
        /// Set when a push was dropped because the queue was full.
        dropped: Arc<AtomicBool>,
    },
}

/// One thing the dispatcher got from the hub's connection.
pub(super) enum Delivery {
    /// A message on a held channel.
    Message(Msg),
    /// A shard dropped the subscription of this channel (its slot moved).
    Unsubscribed(String),
    /// The connection to one shard was lost.
    ShardLost,
    /// Pushes were dropped (the queue was full): the streams hold what they carried.
    Overflowed,
}

impl Incoming {
    /// The next delivery; `None` once the connection is gone.
    pub(super) async fn next(&mut self) -> Option<Delivery> {
        match self {
            Incoming::Pubsub(stream) => stream.next().await.map(Delivery::Message),
            Incoming::Pushes { rx, dropped } => loop {
                if dropped.swap(false, Ordering::AcqRel) {
                    return Some(Delivery::Overflowed);
                }
                let push = rx.recv().await?;
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        if let Some(msg) = Msg::from_push_info(push) {
                            return Some(Delivery::Message(msg));
                        }
                    }
                    PushKind::SUnsubscribe => {
                        let channel = push.data.first().and_then(|v| ::redis::from_redis_value_ref::<String>(v).ok());
                        if let Some(channel) = channel {
                            return Some(Delivery::Unsubscribed(channel));
                        }
                    }
                    PushKind::Disconnection => return Some(Delivery::ShardLost),
                    _ => {}
                }
            },
        }
    }
}

struct Table {
    link: Option<Link>,
    refs: HashMap<String, usize>,
}

/// Channel subscriptions of one node.
pub(super) struct Hub {
    source: Source,
    table: Mutex<Table>,
    connected: AtomicBool,
}

/// A failed (re)connection.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Sentinel(String),
}

impl Hub {
    /// A hub that holds `permanent` channels for as long as it lives.
    pub(super) fn new(source: Source, permanent: &[String]) -> Self {
        let refs = permanent.iter().map(|c| (c.clone(), 1)).collect();
        Hub { source, table: Mutex::new(Table { link: None, refs }), connected: AtomicBool::new(false) }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Holds `channel`; returns once the node's subscription is confirmed.
    pub(super) async fn acquire(&self, channel: &str) -> Result<(), RegistryError> {
        let mut table = self.table.lock().await;
        if let Some(count) = table.refs.get_mut(channel) {
            *count += 1;
            return Ok(());
        }
        let Some(link) = table.link.as_mut() else {
            return Err(RegistryError::Unavailable("Redis pub/sub is reconnecting".into()));
        };
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, link.subscribe(&[channel.to_string()])).await {
            Ok(Ok(())) => {
                table.refs.insert(channel.to_string(), 1);
                Ok(())
            }
            Ok(Err(e)) => Err(RegistryError::Unavailable(format!("SUBSCRIBE {channel}: {e}"))),
            Err(_) => Err(RegistryError::Unavailable(format!("SUBSCRIBE {channel}: timed out"))),
        }
    }

    /// Lets go of one hold on `channel`; the last one unsubscribes.
    pub(super) async fn release(&self, channel: &str) {
        let mut table = self.table.lock().await;
        let Some(count) = table.refs.get_mut(channel) else { return };
        *count -= 1;
        if *count > 0 {
            return;
        }
        table.refs.remove(channel);
        let Some(link) = table.link.as_mut() else { return };
        // On failure the connection is failing anyway; the reconnect will not restore this channel.
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, link.unsubscribe(channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(channel, error = %e, "UNSUBSCRIBE failed"),
            Err(_) => tracing::debug!(channel, "UNSUBSCRIBE timed out"),
        }
    }

    /// Whether the node still holds `channel`.
    pub(super) async fn holds(&self, channel: &str) -> bool {
        self.table.lock().await.refs.contains_key(channel)
    }

    /// Opens a fresh pub/sub connection, subscribes every held channel, and
    /// makes it the node's connection. Returns what the dispatcher reads.
    pub(super) async fn connect(&self, timeout: Duration) -> Result<Incoming, ConnectError> {
        let (mut link, incoming) = match &self.source {
            Source::Standalone(client) => Self::pubsub(client, timeout).await?,
            Source::Sentinel(sentinels) => {
                let primary = sentinels.primary().await.map_err(|e| ConnectError::Sentinel(e.to_string()))?;
                Self::pubsub(&primary, timeout).await?
            }
            Source::Cluster(target) => {
                let (tx, rx) = mpsc::channel(PUSH_QUEUE);
                let dropped = Arc::new(AtomicBool::new(false));
                let overflow = dropped.clone();
                let client = connection::cluster_builder(target)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(move |push: PushInfo| {
                        tx.try_send(push).inspect_err(|_| overflow.store(true, Ordering::Release))
                    })
                    .build()?;
                let conn = tokio::time::timeout(timeout, client.get_async_connection())
                    .await
                    .map_err(|_| ConnectError::Timeout)??;
                (Link::Sharded(conn), Incoming::Pushes { rx, dropped })
            }
        };
        let mut table = self.table.lock().await;
        let channels: Vec<String> = table.refs.keys().cloned().collect();
        for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
            tokio::time::timeout(SUBSCRIBE_TIMEOUT, link.subscribe(chunk))
                .await
                .map_err(|_| ConnectError::Timeout)??;
        }
        table.link = Some(link);
        self.connected.store(true, Ordering::Release);
        Ok(incoming)
    }

    /// A classic pub/sub connection to `client`'s Redis.
    async fn pubsub(client: &Client, timeout: Duration) -> Result<(Link, Incoming), ConnectError> {
        let pubsub =
            tokio::time::timeout(timeout, client.get_async_pubsub()).await.map_err(|_| ConnectError::Timeout)??;
        let (sink, stream) = pubsub.split();
        Ok((Link::Pubsub(sink), Incoming::Pubsub(stream)))
    }

    /// Forgets the current connection (it failed or went silent).
    pub(super) async fn disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        self.table.lock().await.link = None;
    }

    /// Number of channels the node holds (for tests and metrics).
    pub(super) async fn channel_count(&self) -> usize {
        self.table.lock().await.refs.len()
    }
}
