//! A session's live channel on one node, and push subscriptions on it.
//!
//! The publisher (the memory registry's append, or the Redis pub/sub
//! dispatcher) hands each batch of events to the session's [`LiveChannel`].
//! Two kinds of reader take it:
//!
//! - pull feeds ([`LiveFeed`](super::LiveFeed)): a receiver on a bounded ring
//!   of batches, read by `next()`. Every subscription starts as one, so that
//!   nothing published between the registry's read and the caller's attach is
//!   lost. The ring exists only while a pull feed is open;
//! - push subscriptions ([`PushFeed`], from [`LiveFeed::push_to`](super::LiveFeed::push_to)):
//!   the publisher delivers to the subscriber's [`LiveSink`] itself, inside its
//!   own call, so a delivered event costs no task and no wake-up of its own
//!   (a socket's writer is the only task woken).
//!
//! A push subscription keeps the feed's guarantees: each seq once, in order;
//! a hole is filled from the replay window, or told as a gap when the window
//! no longer has it. Finding a hole switches the subscription to repair: one
//! task reads the window while later batches queue (at most [`LIVE_CAPACITY`]
//! of them; past that the queue is dropped and the read covers it), delivers,
//! and hands delivery back to the publisher. A sink that is full (a socket
//! whose unsent bytes are at their bound) is waited for the same way: later
//! batches queue while the task waits for room, so a burst larger than the
//! bound reaches a client that reads; one that has no room for the sink's
//! grace is ended as a slow consumer ([`LiveSink::stalled`]).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, Weak},
};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    Event, LIVE_CAPACITY, LiveBatch,
    feed::{RangeSource, judge},
};
use crate::{protocol::Frame, sync::lock_unpoisoned};

/// What a sink did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    Queued,
    /// No room now; nothing was queued.
    Full,
    /// The sink is gone: the subscription ends.
    Gone,
}

/// Where a push subscription delivers (a socket's outbox, for the gateway).
#[async_trait]
pub trait LiveSink: Send + Sync + 'static {
    /// Queues one event, or says there is no room.
    fn event(&self, event: &Event) -> Offered;
    /// Waits until the sink has room again: false when its grace ran out first.
    async fn room(&self) -> bool;
    /// The sink had no room for its whole grace: it ends (a slow consumer).
    fn stalled(&self);
    /// Queues a frame (a gap notice); false when the sink is gone.
    fn frame(&self, frame: Frame) -> bool;
    /// The frame telling the subscriber that the events of `session_id` after
    /// `last_sent` and before `resumed_at` are lost for good; `None` for none.
    async fn gap_notice(&self, session_id: &str, last_sent: u64, resumed_at: u64) -> Option<Frame>;
}

/// A session's live channel: a ring of batches for pull feeds and the list of
/// push subscriptions.
pub struct LiveChannel {
    readers: Mutex<Readers>,
    /// Batches the ring holds.
    capacity: usize,
}

struct Readers {
    /// The ring, there only while a pull feed may read it: a subscription reads
    /// it only until it becomes a push subscription, so a watched session
    /// spends most of its life without one.
    ring: Option<broadcast::Sender<LiveBatch>>,
    pushers: Vec<Arc<Pusher>>,
}

impl LiveChannel {
    /// A channel whose ring holds `capacity` batches.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(LiveChannel { readers: Mutex::new(Readers { ring: None, pushers: Vec::new() }), capacity })
    }

    fn readers(&self) -> MutexGuard<'_, Readers> {
        lock_unpoisoned(&self.readers)
    }

    /// A pull receiver of every batch sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveBatch> {
        self.readers().ring.get_or_insert_with(|| broadcast::channel(self.capacity).0).subscribe()
    }

    /// Pull receivers and push subscriptions on the channel.
    pub fn watchers(&self) -> usize {
        let readers = self.readers();
        readers.ring.as_ref().map_or(0, broadcast::Sender::receiver_count) + readers.pushers.len()
    }

    /// Hands a batch to every reader. Push subscribers get it before this returns.
    pub fn send(&self, batch: LiveBatch) {
        let mut readers = self.readers();
        if let Some(ring) = &readers.ring {
            if ring.receiver_count() > 0 {
                let _ = ring.send(batch.clone());
            } else {
                readers.ring = None;
            }
        }
        readers.pushers.retain(|pusher| pusher.offer(&batch));
    }

    fn add(&self, pusher: Arc<Pusher>) {
        self.readers().pushers.push(pusher);
    }

    fn remove(&self, pusher: &Arc<Pusher>) {
        self.readers().pushers.retain(|p| !Arc::ptr_eq(p, pusher));
    }

    /// Drops the ring if no pull feed reads it any more.
    fn drop_unread_ring(&self) {
        let mut readers = self.readers();
        if readers.ring.as_ref().is_some_and(|ring| ring.receiver_count() == 0) {
            readers.ring = None;
        }
    }
}

/// A push subscription; delivery stops when it drops.
pub struct PushFeed {
    pusher: Arc<Pusher>,
    channel: Weak<LiveChannel>,
    /// The feed's guard (a node-wide subscription refcount), released with it.
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl PushFeed {
    /// The last seq handed to the sink.
    pub fn last_sent(&self) -> u64 {
        self.pusher.lock().last_sent
    }

    /// Stops delivery: once this returns, the sink gets nothing more.
    fn close(&self) {
        self.pusher.lock().mode = Mode::Closed;
        if let Some(channel) = self.channel.upgrade() {
            channel.remove(&self.pusher);
        }
    }
}

impl Drop for PushFeed {
    fn drop(&mut self) {
        self.close();
    }
}

/// Who delivers a push subscription's next events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The publisher, in its own call.
    Direct,
    /// A repair task (or the attach in progress): batches queue meanwhile.
    Repairing,
    Closed,
}

struct PushState {
    last_sent: u64,
    mode: Mode,
    /// Batches not delivered yet, oldest first.
    queued: VecDeque<LiveBatch>,
    /// Batches were dropped from a full queue: the window must be read to the end.
    overflowed: bool,
}

/// What a batch's delivery came to.
enum Delivered {
    All,
    /// The batch starts (or goes on) past `last_sent + 1`.
    Hole,
    /// The sink has no room for the next event.
    Full,
    SinkGone,
}

/// What is left to do after delivering what could be.
enum Next {
    Done,
    /// Read the window after `.0` up to `.1`.
    Read(u64, u64),
    /// Wait for the sink to have room.
    Room,
}

pub(super) struct Pusher {
    session_id: String,
    source: Arc<dyn RangeSource>,
    sink: Arc<dyn LiveSink>,
    state: Mutex<PushState>,
}

impl Pusher {
    /// Subscribes `sink` to `channel` in repair mode, with what the pull feed
    /// had received first (`drain`: batches oldest first, and whether some were
    /// lost), and starts delivering. A channel already gone sends nothing more.
    pub(super) fn attach(
        session_id: String,
        channel: Weak<LiveChannel>,
        source: Arc<dyn RangeSource>,
        sink: Arc<dyn LiveSink>,
        last_sent: u64,
        drain: impl FnOnce() -> (Vec<LiveBatch>, bool),
        guard: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> PushFeed {
        let state = PushState { last_sent, mode: Mode::Repairing, queued: VecDeque::new(), overflowed: false };
        let pusher = Arc::new(Pusher { session_id, source, sink, state: Mutex::new(state) });
        // Registered first, so that every batch sent from now on is queued; then
        // what the pull receiver holds goes in front (a batch in both places is
        // delivered once: seqs at or below `last_sent` are skipped).
        if let Some(channel) = channel.upgrade() {
            channel.add(pusher.clone());
        }
        {
            let mut state = pusher.lock();
            let (backlog, lagged) = drain();
            for batch in backlog.into_iter().rev() {
                state.queued.push_front(batch);
            }
            state.overflowed |= lagged;
            let next = pusher.advance(&mut state);
            if !matches!(next, Next::Done) {
                tokio::spawn(pusher.clone().repair(next));
            }
        }
        // The pull receiver was dropped with `drain`; outside the pusher's lock (`send` takes
        // the channel's lock, then a pusher's).
        if let Some(channel) = channel.upgrade() {
            channel.drop_unread_ring();
        }
        PushFeed { pusher, channel, _guard: guard }
    }

    fn lock(&self) -> MutexGuard<'_, PushState> {
        lock_unpoisoned(&self.state)
    }

    /// The publisher's call; false once the subscription is closed.
    fn offer(self: &Arc<Self>, batch: &LiveBatch) -> bool {
        let mut state = self.lock();
        match state.mode {
            Mode::Closed => false,
            Mode::Repairing => {
                enqueue(&mut state, batch.clone());
                true
            }
            Mode::Direct => match self.deliver(&mut state, batch) {
                Delivered::All => true,
                Delivered::SinkGone => {
                    state.mode = Mode::Closed;
                    false
                }
                Delivered::Hole | Delivered::Full => {
                    enqueue(&mut state, batch.clone());
                    state.mode = Mode::Repairing;
                    let next = self.advance(&mut state);
                    if !matches!(next, Next::Done) {
                        tokio::spawn(self.clone().repair(next));
                    }
                    true
                }
            },
        }
    }

    /// Delivers the batch's events after `last_sent` while they follow on
    /// and the sink has room.
    fn deliver(&self, state: &mut PushState, batch: &[Event]) -> Delivered {
        for event in batch {
            if event.seq <= state.last_sent {
                continue;
            }
            if event.seq != state.last_sent.saturating_add(1) {
                return Delivered::Hole;
            }
            match self.sink.event(event) {
                Offered::Queued => state.last_sent = event.seq,
                Offered::Full => return Delivered::Full,
                Offered::Gone => return Delivered::SinkGone,
            }
        }
        Delivered::All
    }

    /// Delivers the queue while it follows on; hands delivery back to the
    /// publisher when nothing is missing, else says what to read or wait for.
    fn advance(&self, state: &mut PushState) -> Next {
        while let Some(batch) = state.queued.front().cloned() {
            match self.deliver(state, &batch) {
                Delivered::All => {
                    state.queued.pop_front();
                }
                Delivered::SinkGone => {
                    state.mode = Mode::Closed;
                    state.queued.clear();
                    return Next::Done;
                }
                Delivered::Full => return Next::Room,
                Delivered::Hole => {
                    let next = batch.iter().map(|e| e.seq).find(|&seq| seq > state.last_sent).unwrap_or(u64::MAX);
                    if state.overflowed {
                        state.overflowed = false;
                        return Next::Read(state.last_sent, u64::MAX);
                    }
                    return Next::Read(state.last_sent, next - 1);
                }
            }
        }
        if state.overflowed {
            state.overflowed = false;
            return Next::Read(state.last_sent, u64::MAX);
        }
        if state.mode != Mode::Closed {
            state.mode = Mode::Direct;
        }
        Next::Done
    }

    /// Fills holes from the window and waits for room in the sink until the
    /// queue is delivered, then hands delivery back to the publisher.
    async fn repair(self: Arc<Self>, mut next: Next) {
        loop {
            next = match next {
                Next::Done => return,
                Next::Room => {
                    let room = self.sink.room().await;
                    let mut state = self.lock();
                    if state.mode == Mode::Closed {
                        return;
                    }
                    if !room {
                        state.mode = Mode::Closed;
                        state.queued.clear();
                        drop(state);
                        self.sink.stalled();
                        return;
                    }
                    self.advance(&mut state)
                }
                Next::Read(after, up_to) => {
                    let Some(next) = self.fill(after, up_to).await else { return };
                    next
                }
            };
        }
    }

    /// Reads the window after `after` up to `up_to`, tells a loss, and queues
    /// what it read in front; `None` once the subscription is closed.
    async fn fill(&self, after: u64, up_to: u64) -> Option<Next> {
        let range = self.source.read_range(&self.session_id, after, up_to).await.unwrap_or_default();
        let (events, resumed_at) = judge(range, after, up_to);
        if let Some(resumed_at) = resumed_at {
            let notice = self.sink.gap_notice(&self.session_id, resumed_at - 1, resumed_at).await;
            let mut state = self.lock();
            if state.mode == Mode::Closed {
                return None;
            }
            state.last_sent = state.last_sent.max(resumed_at - 1);
            if let Some(notice) = notice
                && !self.sink.frame(notice)
            {
                state.mode = Mode::Closed;
                return None;
            }
        }
        let mut state = self.lock();
        if state.mode == Mode::Closed {
            return None;
        }
        if !events.is_empty() {
            state.queued.push_front(LiveBatch::from(events));
        }
        Some(self.advance(&mut state))
    }
}

/// Queues a batch for a repair; a full queue is dropped (the read then goes to the end).
fn enqueue(state: &mut PushState, batch: LiveBatch) {
    if state.queued.len() >= LIVE_CAPACITY {
        state.queued.clear();
        state.overflowed = true;
    } else {
        state.queued.push_back(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::{LiveFeed, RegistryError, ReplayRange};

    struct Anywhere;

    #[async_trait]
    impl LiveSink for Anywhere {
        fn event(&self, _: &Event) -> Offered {
            Offered::Queued
        }
        async fn room(&self) -> bool {
            true
        }
        fn stalled(&self) {}
        fn frame(&self, _: Frame) -> bool {
            true
        }
        async fn gap_notice(&self, _: &str, _: u64, _: u64) -> Option<Frame> {
            None
        }
    }

    struct NoWindow;

    #[async_trait]
    impl RangeSource for NoWindow {
        async fn read_range(&self, _: &str, _: u64, _: u64) -> Result<ReplayRange, RegistryError> {
            Ok(ReplayRange::default())
        }
    }

    fn has_ring(channel: &LiveChannel) -> bool {
        channel.readers().ring.is_some()
    }

    #[tokio::test]
    async fn the_ring_lives_only_while_a_pull_feed_is_open() {
        let channel = LiveChannel::new(4);
        assert!(!has_ring(&channel));
        let feed = LiveFeed::new("s".into(), &channel, channel.subscribe(), 0, Arc::new(NoWindow), None);
        assert!(has_ring(&channel));
        let push = feed.push_to(Arc::new(Anywhere));
        assert!(!has_ring(&channel), "a push subscription reads no ring");
        assert_eq!(channel.watchers(), 1);
        // A pull receiver dropped without becoming a push subscription: the next send lets go.
        drop(channel.subscribe());
        channel.send(LiveBatch::from(Vec::new()));
        assert!(!has_ring(&channel));
        drop(push);
        assert_eq!(channel.watchers(), 0);
    }
}
