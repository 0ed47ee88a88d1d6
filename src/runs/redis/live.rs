//! Live delivery on one node: the per-session broadcast channels that the
//! pub/sub dispatcher fills, the control and notice routing of incoming
//! messages, the catch-up after a reconnect, and the feeds' guard.

use std::{sync::Arc, time::Instant};

use serde::Deserialize;
use tokio::sync::broadcast;

use super::{
    codec::{self, EventBuilder},
    keys,
    node::{Failure, NodeMessage, RedisNode, run_key},
};
use crate::sync::lock_unpoisoned;
use crate::{
    protocol::Frame,
    runs::{Event, LIVE_RING_CAPACITY, LiveBatch, LiveChannel},
};

/// A run seen in progress on a watched session (for owner-loss detection).
#[derive(Debug, Clone)]
pub(super) struct SeenRun {
    pub(super) run_id: String,
    pub(super) provider: String,
    /// Since when its lock was seen missing.
    pub(super) lock_missing_since: Option<Instant>,
}

impl SeenRun {
    pub(super) fn new(run_id: String, provider: String) -> Box<SeenRun> {
        Box::new(SeenRun { run_id, provider, lock_missing_since: None })
    }
}

/// A session this node has live feeds on: one per watched session, kept small (48 bytes; a
/// run seen in progress is boxed) since an idle node holds one for each.
pub(super) struct LiveSession {
    pub(super) live: Arc<LiveChannel>,
    pub(super) feeds: usize,
    /// Highest seq seen for the session (handed to `tx`, or read by a subscribe
    /// that was the session's only feed); a catch-up reads after it.
    pub(super) last_dispatched: u64,
    /// The run in progress as far as this node knows.
    pub(super) run: Option<Box<SeenRun>>,
    builder: EventBuilder,
}

impl LiveSession {
    pub(super) fn new() -> Self {
        LiveSession {
            live: LiveChannel::new(LIVE_RING_CAPACITY),
            feeds: 0,
            last_dispatched: 0,
            run: None,
            builder: EventBuilder::default(),
        }
    }

    /// Hands events to every feed of the session. Nothing is filtered here: a
    /// feed drops what it already has, and an old event may still be news to
    /// a feed that subscribed while it was on its way.
    fn dispatch(&mut self, events: Vec<Event>) {
        for event in &events {
            if event.seq > self.last_dispatched {
                self.last_dispatched = event.seq;
                if event.terminal {
                    self.run = None;
                } else if self.run.as_ref().is_none_or(|r| *r.run_id != *event.run_id) {
                    self.run = Some(SeenRun::new(event.run_id.to_string(), provider_of(&event.frame)));
                }
                if let Some(run) = self.run.as_mut() {
                    run.lock_missing_since = None;
                }
            }
        }
        metrics::counter!("chatgate_redis_live_events_total").increment(events.len() as u64);
        // No receiver is fine: a feed that comes later reads the stream.
        self.live.send(LiveBatch::from(events));
    }
}

fn provider_of(frame: &str) -> String {
    #[derive(Deserialize)]
    struct Provider {
        provider: Option<String>,
    }
    serde_json::from_str::<Provider>(frame).ok().and_then(|p| p.provider).unwrap_or_default()
}

impl RedisNode {
    /// Routes one pub/sub message.
    pub(super) fn on_message(&self, channel: &str, payload: &[u8]) {
        if let Some(session_id) = keys::session_of_live_channel(channel) {
            self.on_live(session_id, payload);
        } else if channel == self.node_channel {
            self.on_control(payload);
        } else if keys::is_probe_channel(channel, &self.probe_channel) {
            if let Some(nonce) = std::str::from_utf8(payload).ok().and_then(|s| s.parse::<u64>().ok()) {
                {
                    let mut heard = lock_unpoisoned(&self.probe.heard);
                    let last = heard.entry(channel.to_string()).or_default();
                    *last = nonce.max(*last);
                }
                // After `heard` is released: the prober reads it inside the watch's lock.
                self.probe.echo.send_modify(|echoes| *echoes = echoes.wrapping_add(1));
            }
        } else if let Some(user_id) = keys::user_of_channel(channel) {
            let Ok(text) = std::str::from_utf8(payload) else { return };
            self.notices.send(user_id, &Frame::from(text));
        }
    }

    fn on_live(&self, session_id: &str, payload: &[u8]) {
        let mut sessions = lock_unpoisoned(&self.sessions);
        let Some(session) = sessions.get_mut(session_id) else { return };
        match codec::decode_live(payload, &mut session.builder) {
            Ok(events) => {
                if let Some(age) = events.first().and_then(|e| codec::event_age(&e.frame)) {
                    metrics::histogram!("chatgate_pubsub_lag_seconds").record(age.as_secs_f64());
                }
                session.dispatch(events)
            }
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
        let runs = lock_unpoisoned(&self.runs);
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
    pub(super) async fn catch_up(&self) {
        let watched: Vec<String> = lock_unpoisoned(&self.sessions).keys().map(|id| id.to_string()).collect();
        for session_id in watched {
            if let Err(e) = self.catch_up_session(&session_id).await {
                // Redis failed again; the next reconnect catches up, feeds fill gaps on the next event.
                tracing::warn!(session_id, error = %e, "catch-up read failed");
                return;
            }
        }
    }

    /// Hands one session's events after its last dispatched seq to its feeds.
    pub(super) async fn catch_up_session(&self, session_id: &str) -> Result<(), Failure> {
        let Some(after) = lock_unpoisoned(&self.sessions).get(session_id).map(|s| s.last_dispatched) else {
            return Ok(());
        };
        let (_, events) = self.read_events(session_id, after, u64::MAX).await?;
        if !events.is_empty()
            && let Some(session) = lock_unpoisoned(&self.sessions).get_mut(session_id)
        {
            session.dispatch(events);
        }
        Ok(())
    }
}

/// Keeps a feed's session entry and hub subscription; released on drop.
pub(super) struct FeedGuard {
    pub(super) node: Arc<RedisNode>,
    pub(super) session_id: String,
}

impl Drop for FeedGuard {
    fn drop(&mut self) {
        {
            let mut sessions = lock_unpoisoned(&self.node.sessions);
            if let Some(session) = sessions.get_mut(self.session_id.as_str()) {
                session.feeds = session.feeds.saturating_sub(1);
                if session.feeds == 0 {
                    sessions.remove(self.session_id.as_str());
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

/// Registers a new feed on a session: its entry (created if needed), its channel and a receiver.
pub(super) fn attach_feed(
    node: &Arc<RedisNode>,
    session_id: &str,
) -> (Arc<LiveChannel>, broadcast::Receiver<LiveBatch>, FeedGuard) {
    let mut sessions = lock_unpoisoned(&node.sessions);
    let session = sessions.entry(Box::from(session_id)).or_insert_with(LiveSession::new);
    session.feeds += 1;
    let rx = session.live.subscribe();
    (session.live.clone(), rx, FeedGuard { node: node.clone(), session_id: session_id.to_string() })
}
