//! One WebSocket connection as the gateway sees it: its user, its outbox and
//! its session subscriptions. A subscription is a push feed whose sink is the
//! outbox: the session's publisher queues each event itself (no task per
//! subscription); a gap notice reads the session's state first.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;

use super::{Outbox, outbox::Offer};
use crate::sync::lock_unpoisoned;
use crate::{
    protocol::{Frame, chat_subscribed, for_upstream_client},
    runs::{Event, LiveFeed, LiveSink, Offered, PushFeed, SharedRegistry},
};

/// How long live delivery waits for room in a full outbox before it closes the
/// socket as a slow consumer (4008): a client that reads gets a burst larger
/// than `--send-queue-bytes`; one whose queue stays full that long is slow.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(2);

/// A socket's gateway-side state.
pub struct Connection {
    pub user_id: String,
    pub outbox: Arc<Outbox>,
    /// True when the socket asked for chatgate's additions (`/ws?…&hello=1`):
    /// it gets `connected` and `permission_resolved`; otherwise it sees only
    /// kinds upstream's client handles (docs/protocol.md §Compatibility rules).
    pub extensions: bool,
    /// By session id; a list, since a socket watches few sessions
    /// (`--max-subscriptions-per-socket`) and most sockets one.
    subscriptions: Mutex<Vec<(Box<str>, PushFeed)>>,
}

impl Connection {
    pub fn new(user_id: String, outbox: Arc<Outbox>, extensions: bool) -> Self {
        Connection { user_id, outbox, extensions, subscriptions: Mutex::new(Vec::new()) }
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
        lock_unpoisoned(&self.subscriptions).iter().any(|(id, _)| **id == *session_id)
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
        let previous = {
            let mut subscriptions = lock_unpoisoned(&self.subscriptions);
            match subscriptions.iter_mut().find(|(id, _)| **id == *session_id) {
                Some((_, feed)) => Some(std::mem::replace(feed, push)),
                None => {
                    // One at a time: most sockets never watch a second session.
                    subscriptions.reserve_exact(1);
                    subscriptions.push((session_id.into(), push));
                    None
                }
            }
        };
        if previous.is_none() {
            metrics::gauge!("chatgate_subscriptions").increment(1.0);
        }
    }

    /// Stops delivering a session; once it returns nothing more of it is queued.
    pub fn detach(&self, session_id: &str) {
        let feed = {
            let mut subscriptions = lock_unpoisoned(&self.subscriptions);
            let at = subscriptions.iter().position(|(id, _)| **id == *session_id);
            at.map(|at| subscriptions.swap_remove(at).1)
        };
        if feed.is_some() {
            // Dropping the feed closes it.
            metrics::gauge!("chatgate_subscriptions").decrement(1.0);
        }
    }

    /// Stops everything (socket closed).
    pub fn shutdown(&self) {
        let feeds = std::mem::take(&mut *lock_unpoisoned(&self.subscriptions));
        metrics::gauge!("chatgate_subscriptions").decrement(feeds.len() as f64);
        // Dropping the feeds closes them, outside the lock.
        drop(feeds);
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
    fn event(&self, event: &Event) -> Offered {
        let frame = event.frame.clone();
        let frame = if self.extensions { frame } else { for_upstream_client(frame) };
        let offered = match self.outbox.offer(frame) {
            Offer::Queued => Offered::Queued,
            Offer::NoRoom => Offered::Full,
            Offer::Closed => Offered::Gone,
        };
        if offered == Offered::Queued {
            self.delivered.increment(1);
        }
        offered
    }

    async fn room(&self) -> bool {
        self.outbox.room(SLOW_CONSUMER_GRACE).await
    }

    fn stalled(&self) {
        self.outbox.close_slow_consumer();
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
