//! One WebSocket connection as the gateway sees it: its user, its outbox and
//! its session subscriptions. A subscription is a push feed whose sink is the
//! outbox: the session's publisher queues each event itself (no task per
//! subscription); a gap notice reads the session's state first.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;

use super::Outbox;
use crate::sync::lock_unpoisoned;
use crate::{
    protocol::{Frame, chat_subscribed, for_upstream_client},
    runs::{Event, LiveFeed, LiveSink, PushFeed, SharedRegistry},
};

/// A socket's gateway-side state.
pub struct Connection {
    pub user_id: String,
    pub outbox: Arc<Outbox>,
    /// True when the socket asked for chatgate's additions (`/ws?…&hello=1`):
    /// it gets `connected` and `permission_resolved`; otherwise it sees only
    /// kinds upstream's client handles (docs/protocol.md §Compatibility rules).
    pub extensions: bool,
    subscriptions: Mutex<HashMap<String, PushFeed>>,
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

    /// Starts delivering a session's live feed to this socket. Callers
    /// [`detach`](Self::detach) an earlier subscription to the session first, so
    /// that its events cannot interleave with a new ack and replay.
    pub fn attach(&self, session_id: &str, feed: LiveFeed, registry: SharedRegistry) {
        let sink = Arc::new(SocketSink {
            outbox: self.outbox.clone(),
            extensions: self.extensions,
            registry,
            delivered: metrics::counter!("chatgate_events_delivered_total"),
        });
        let push = feed.push_to(sink);
        let previous = lock_unpoisoned(&self.subscriptions).insert(session_id.to_string(), push);
        if previous.is_none() {
            metrics::gauge!("chatgate_subscriptions").increment(1.0);
        }
    }

    /// Stops delivering a session; once it returns nothing more of it is queued.
    pub fn detach(&self, session_id: &str) {
        let feed = lock_unpoisoned(&self.subscriptions).remove(session_id);
        if let Some(feed) = feed {
            feed.close();
            metrics::gauge!("chatgate_subscriptions").decrement(1.0);
        }
    }

    /// Stops everything (socket closed).
    pub fn shutdown(&self) {
        let feeds: Vec<_> = lock_unpoisoned(&self.subscriptions).drain().map(|(_, feed)| feed).collect();
        metrics::gauge!("chatgate_subscriptions").decrement(feeds.len() as f64);
        for feed in feeds {
            feed.close();
        }
    }
}

/// A subscription's delivery into the socket's outbox.
struct SocketSink {
    outbox: Arc<Outbox>,
    extensions: bool,
    registry: SharedRegistry,
    /// Looked up once: `event` is the per-event delivery path.
    delivered: metrics::Counter,
}

#[async_trait]
impl LiveSink for SocketSink {
    fn event(&self, event: &Event) -> bool {
        self.delivered.increment(1);
        let frame = event.frame.clone();
        self.outbox.push(if self.extensions { frame } else { for_upstream_client(frame) })
    }

    fn frame(&self, frame: Frame) -> bool {
        self.outbox.push(frame)
    }

    /// `chat_subscribed` with `replayTruncated`, from the session's state now.
    async fn gap_notice(&self, session_id: &str, last_sent: u64, _resumed_at: u64) -> Option<Frame> {
        metrics::counter!("chatgate_replay_truncated_total").increment(1);
        let snapshot = self.registry.snapshot(session_id).await.unwrap_or_default();
        Some(chat_subscribed(
            session_id,
            snapshot.is_processing,
            snapshot.last_seq.max(last_sent),
            snapshot.run_id.as_deref(),
            &snapshot.pending_permissions,
            true,
        ))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shutdown();
    }
}
