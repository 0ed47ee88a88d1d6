//! A session's live channel on one node, and push subscriptions on it.
//!
//! The publisher (the memory registry's append, or the Redis pub/sub
//! dispatcher) hands each batch of events to the session's [`LiveChannel`].
//! Two kinds of reader take it:
//!
//! - pull feeds ([`LiveFeed`](super::LiveFeed)): a receiver on a bounded ring
//!   of batches, read by `next()`. Every subscription starts as one, so that
//!   nothing published between the registry's read and the caller's attach is
//!   lost;
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
    ring: broadcast::Sender<LiveBatch>,
    pushers: Mutex<Vec<Arc<Pusher>>>,
}

impl LiveChannel {
    /// A channel whose ring holds `capacity` batches.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(LiveChannel { ring: broadcast::channel(capacity).0, pushers: Mutex::new(Vec::new()) })
    }

    /// A pull receiver of every batch sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveBatch> {
        self.ring.subscribe()
    }

    /// Pull receivers and push subscriptions on the channel.
    pub fn watchers(&self) -> usize {
        self.ring.receiver_count() + lock_unpoisoned(&self.pushers).len()
    }

    /// Hands a batch to every reader. Push subscribers get it before this returns.
    pub fn send(&self, batch: LiveBatch) {
        if self.ring.receiver_count() > 0 {
            // No receiver left meanwhile is fine: a later feed reads the window.
            let _ = self.ring.send(batch.clone());
        }
        lock_unpoisoned(&self.pushers).retain(|pusher| pusher.offer(&batch));
    }

    fn add(&self, pusher: Arc<Pusher>) {
        lock_unpoisoned(&self.pushers).push(pusher);
    }

    fn remove(&self, pusher: &Arc<Pusher>) {
        lock_unpoisoned(&self.pushers).retain(|p| !Arc::ptr_eq(p, pusher));
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
