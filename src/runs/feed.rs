//! The live half of a subscription: dedupe by seq and gap repair.
//!
//! Live events arrive in batches through a bounded broadcast channel. The feed
//! remembers the last seq it handed out: older or equal seqs are dropped (they
//! were replayed already), and a jump ahead (pub/sub loss, a hole in a batch, or
//! a receiver that lagged behind the channel) is filled from the replay window
//! before moving on. When the window cannot fill it, the caller is told with
//! [`FeedItem::Gap`] so the client can reload history (`replayTruncated`).
//!
//! A socket does not read its feeds: it turns each into a push subscription
//! ([`LiveFeed::push_to`], [`super::live`]), which the publisher delivers to
//! directly with the same guarantees.

use std::{
    any::Any,
    collections::VecDeque,
    sync::{Arc, Weak},
};

use async_trait::async_trait;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{
    Event, LiveBatch, RegistryError, ReplayRange,
    live::{LiveChannel, LiveSink, PushFeed, Pusher},
};

/// Where a feed fills gaps from.
#[async_trait]
pub trait RangeSource: Send + Sync {
    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError>;
}

/// What the feed yields.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedItem {
    Event(Event),
    /// Events between the last delivered seq and `resumed_at` are lost for good.
    Gap {
        resumed_at: u64,
    },
}

/// Live events of one session for one socket, in order, each seq once.
pub struct LiveFeed {
    session_id: String,
    channel: Weak<LiveChannel>,
    rx: broadcast::Receiver<LiveBatch>,
    last_sent: u64,
    ready: VecDeque<Event>,
    source: Arc<dyn RangeSource>,
    /// Released when the feed drops (e.g. a node-wide subscription refcount).
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl LiveFeed {
    /// A feed of `channel` from `rx`, a receiver of it taken before the
    /// caller read the window up to `last_sent`.
    pub fn new(
        session_id: String,
        channel: &Arc<LiveChannel>,
        rx: broadcast::Receiver<LiveBatch>,
        last_sent: u64,
        source: Arc<dyn RangeSource>,
        guard: Option<Box<dyn Any + Send + Sync>>,
    ) -> Self {
        LiveFeed {
            session_id,
            channel: Arc::downgrade(channel),
            rx,
            last_sent,
            ready: VecDeque::new(),
            source,
            _guard: guard,
        }
    }

    /// Turns the feed into a push subscription delivering to `sink`, starting
    /// with what the feed has received and not handed out yet.
    pub fn push_to(self, sink: Arc<dyn LiveSink>) -> PushFeed {
        let LiveFeed { session_id, channel, mut rx, last_sent, ready, source, _guard } = self;
        let drain = move || {
            let mut backlog = Vec::new();
            if !ready.is_empty() {
                backlog.push(LiveBatch::from(Vec::from(ready)));
            }
            let mut lagged = false;
            loop {
                match rx.try_recv() {
                    Ok(batch) => backlog.push(batch),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                    Err(_) => break,
                }
            }
            (backlog, lagged)
        };
        Pusher::attach(session_id, channel, source, sink, last_sent, drain, _guard)
    }

    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// Raises the cursor to a seq known to be taken (the session's high-water mark
    /// in SQL), for a registry that no longer remembers the session.
    pub fn raise_floor(&mut self, seq: u64) {
        self.last_sent = self.last_sent.max(seq);
    }

    /// The next event. `None` when the session's channel is gone.
    pub async fn next(&mut self) -> Option<FeedItem> {
        loop {
            while let Some(front) = self.ready.front() {
                let seq = front.seq;
                if seq <= self.last_sent {
                    self.ready.pop_front();
                    continue;
                }
                if seq == self.last_sent.saturating_add(1) {
                    self.last_sent = seq;
                    return self.ready.pop_front().map(FeedItem::Event);
                }
                // A hole before `seq`: fill it in front of what is queued.
                let (filled, gap) = self.fill(seq - 1).await;
                for event in filled.into_iter().rev() {
                    self.ready.push_front(event);
                }
                if gap.is_some() {
                    return gap;
                }
            }
            match self.rx.recv().await {
                Ok(batch) => self.ready.extend(batch.iter().filter(|e| e.seq > self.last_sent).cloned()),
                Err(RecvError::Lagged(_)) => {
                    let (filled, gap) = self.fill(u64::MAX).await;
                    self.ready.extend(filled);
                    if gap.is_some() {
                        return gap;
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// The window's events after `last_sent` up to `up_to`, and a `Gap` when
    /// the window does not hold all of them (the cursor then skips the loss).
    async fn fill(&mut self, up_to: u64) -> (Vec<Event>, Option<FeedItem>) {
        let range = self.source.read_range(&self.session_id, self.last_sent, up_to).await.unwrap_or_default();
        let (events, resumed_at) = judge(range, self.last_sent, up_to);
        let Some(resumed_at) = resumed_at else { return (events, None) };
        // Skip what cannot be recovered; deliver what the window still has.
        self.last_sent = resumed_at.saturating_sub(1);
        (events, Some(FeedItem::Gap { resumed_at }))
    }
}

/// The window's answer for `after < seq <= up_to`: its events, and where
/// delivery resumes when some of the range is lost (`None`: nothing is). Shared
/// by pull feeds and push subscriptions ([`super::live`]).
pub(super) fn judge(range: ReplayRange, after: u64, up_to: u64) -> (Vec<Event>, Option<u64>) {
    let first = range.events.first().map(|e| e.seq);
    let contiguous_start = first.is_none_or(|seq| seq == after.saturating_add(1));
    if range.complete && contiguous_start {
        if range.events.is_empty() && up_to != u64::MAX {
            // The window says nothing is missing yet holds nothing of the hole: it is gone.
            return (range.events, Some(up_to.saturating_add(1)));
        }
        return (range.events, None);
    }
    let resumed_at = first.unwrap_or(if up_to == u64::MAX { after.saturating_add(1) } else { up_to.saturating_add(1) });
    (range.events, Some(resumed_at))
}
