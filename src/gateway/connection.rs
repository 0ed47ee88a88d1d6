//! One WebSocket connection as the gateway sees it: its user, its outbox and
//! its session subscriptions (one forwarding task per subscribed session).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;

use super::Outbox;
use crate::sync::lock_unpoisoned;
use crate::{
    protocol::{Frame, chat_subscribed, for_upstream_client},
    runs::{FeedItem, LiveFeed, SharedRegistry},
};

/// A socket's gateway-side state.
pub struct Connection {
    pub user_id: String,
    pub outbox: Arc<Outbox>,
    /// True when the socket asked for chatgate's additions (`/ws?…&hello=1`):
    /// it gets `connected` and `permission_resolved`; otherwise it sees only
    /// kinds upstream's client handles (docs/protocol.md §Compatibility rules).
    pub extensions: bool,
    subscriptions: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Connection {
    pub fn new(user_id: String, outbox: Arc<Outbox>, extensions: bool) -> Self {
        Connection { user_id, outbox, extensions, subscriptions: Mutex::new(HashMap::new()) }
    }

    /// Queues a sequenced event frame, as this socket may see it.
    pub fn send_event(&self, frame: Frame) -> bool {
        self.outbox.push(self.event_view(frame))
    }

    fn event_view(&self, frame: Frame) -> Frame {
        if self.extensions { frame } else { for_upstream_client(frame) }
    }

    /// Queues a frame for this socket.
    pub fn send(&self, frame: Frame) -> bool {
        self.outbox.push(frame)
    }

    pub fn is_subscribed(&self, session_id: &str) -> bool {
        lock_unpoisoned(&self.subscriptions).contains_key(session_id)
    }

    pub fn subscription_count(&self) -> usize {
        lock_unpoisoned(&self.subscriptions).len()
    }

    /// Starts forwarding a session's live feed to this socket. Callers
    /// [`detach`](Self::detach) an earlier subscription to the session first, so
    /// that its forwarder cannot interleave with a new ack and replay.
    pub fn attach(&self, session_id: &str, mut feed: LiveFeed, registry: SharedRegistry) {
        let outbox = self.outbox.clone();
        let extensions = self.extensions;
        let session = session_id.to_string();
        let task = tokio::spawn(async move {
            // Looked up once: this loop is the per-event delivery path.
            let delivered_total = metrics::counter!("chatgate_events_delivered_total");
            while let Some(item) = feed.next().await {
                let delivered = match item {
                    FeedItem::Event(event) => {
                        delivered_total.increment(1);
                        outbox.push(if extensions { event.frame } else { for_upstream_client(event.frame) })
                    }
                    FeedItem::Gap { .. } => {
                        metrics::counter!("chatgate_replay_truncated_total").increment(1);
                        let snapshot = registry.snapshot(&session).await.unwrap_or_default();
                        outbox.push(chat_subscribed(
                            &session,
                            snapshot.is_processing,
                            snapshot.last_seq.max(feed.last_sent()),
                            snapshot.run_id.as_deref(),
                            &snapshot.pending_permissions,
                            true,
                        ))
                    }
                };
                if !delivered {
                    break;
                }
            }
        });
        let previous = lock_unpoisoned(&self.subscriptions).insert(session_id.to_string(), task);
        match previous {
            Some(old) => old.abort(),
            None => metrics::gauge!("chatgate_subscriptions").increment(1.0),
        }
    }

    /// Stops forwarding a session; returns once its forwarder can push nothing more.
    pub async fn detach(&self, session_id: &str) {
        let task = lock_unpoisoned(&self.subscriptions).remove(session_id);
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
            metrics::gauge!("chatgate_subscriptions").decrement(1.0);
        }
    }

    /// Stops everything (socket closed).
    pub fn shutdown(&self) {
        let tasks: Vec<_> = lock_unpoisoned(&self.subscriptions).drain().map(|(_, t)| t).collect();
        metrics::gauge!("chatgate_subscriptions").decrement(tasks.len() as f64);
        for task in tasks {
            task.abort();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shutdown();
    }
}
