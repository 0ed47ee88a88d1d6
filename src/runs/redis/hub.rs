//! The node's pub/sub connection: one dedicated connection per node, with
//! refcounted channel subscriptions.
//!
//! [`Hub::acquire`] returns once Redis confirmed the subscription (or at once
//! when the node already holds it), so a caller may read the stream right
//! after and miss nothing. SUBSCRIBE / UNSUBSCRIBE are only sent on refcount
//! transitions, under one async lock, so they reach Redis in the order the
//! refcounts changed. After a reconnect, [`Hub::connect`] re-subscribes every
//! channel that still has holders before the connection is used again.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use ::redis::{
    Client, RedisError,
    aio::{PubSubSink, PubSubStream},
};
use tokio::sync::Mutex;

use crate::runs::RegistryError;

/// How long one SUBSCRIBE / UNSUBSCRIBE may take before the connection is
/// considered dead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE command when restoring after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 512;

struct Table {
    sink: Option<PubSubSink>,
    refs: HashMap<String, usize>,
}

/// Channel subscriptions of one node.
pub(super) struct Hub {
    client: Client,
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
}

impl Hub {
    /// A hub that holds `permanent` channels for as long as it lives.
    pub(super) fn new(client: Client, permanent: &[String]) -> Self {
        let refs = permanent.iter().map(|c| (c.clone(), 1)).collect();
        Hub { client, table: Mutex::new(Table { sink: None, refs }), connected: AtomicBool::new(false) }
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
        let Some(sink) = table.sink.as_mut() else {
            return Err(RegistryError::Unavailable("Redis pub/sub is reconnecting".into()));
        };
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(channel)).await {
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
        let Some(sink) = table.sink.as_mut() else { return };
        // On failure the connection is failing anyway; the reconnect will not restore this channel.
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.unsubscribe(channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(channel, error = %e, "UNSUBSCRIBE failed"),
            Err(_) => tracing::debug!(channel, "UNSUBSCRIBE timed out"),
        }
    }

    /// Opens a fresh pub/sub connection, subscribes every held channel, and
    /// makes it the node's connection. Returns the message stream.
    pub(super) async fn connect(&self, timeout: Duration) -> Result<PubSubStream, ConnectError> {
        let pubsub = tokio::time::timeout(timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| ConnectError::Timeout)??;
        let (mut sink, stream) = pubsub.split();
        let mut table = self.table.lock().await;
        let channels: Vec<String> = table.refs.keys().cloned().collect();
        for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
            tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(chunk))
                .await
                .map_err(|_| ConnectError::Timeout)??;
        }
        table.sink = Some(sink);
        self.connected.store(true, Ordering::Release);
        Ok(stream)
    }

    /// Forgets the current connection (it failed or went silent).
    pub(super) async fn disconnected(&self) {
        self.connected.store(false, Ordering::Release);
        self.table.lock().await.sink = None;
    }

    /// Number of channels the node holds (for tests and metrics).
    pub(super) async fn channel_count(&self) -> usize {
        self.table.lock().await.refs.len()
    }
}
