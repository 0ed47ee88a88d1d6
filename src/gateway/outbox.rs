//! A socket's outbound queue, bounded in bytes.
//!
//! Producers (live feeds, verb replies) push frames without waiting; the
//! socket's task pops them. When the unsent bytes would pass the limit
//! the socket is a slow consumer: the queue closes with [`CloseReason::SlowConsumer`]
//! (code 4008) instead of growing, and the client reconnects and replays.
//! Live delivery may instead [`offer`](Outbox::offer) a frame, which is
//! refused while there is no room, and wait for [`room`](Outbox::room): a
//! burst larger than the limit then reaches a client that reads.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};

use tokio::{sync::Notify, time::Duration};

use crate::protocol::Frame;
use crate::runs::NoticeSink;
use crate::sync::lock_unpoisoned;

/// Why a socket is being closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 4008: unsent frames passed `--send-queue-bytes`.
    SlowConsumer,
    /// 4401: the token expired.
    TokenExpired,
    /// 1012: the node is draining.
    Draining,
    /// 1009: an inbound frame was too large.
    TooLarge,
    /// 1007: an inbound text frame was not UTF-8.
    InvalidUtf8,
    /// 1002: the peer broke the WebSocket framing (reserved opcode, stray continuation, …).
    ProtocolViolation,
    /// 1008: policy (Origin refused).
    Policy,
    /// 1008: the client kept flooding frames far beyond `--frame-rate`.
    Flood,
    /// 1000: the peer went away or closed.
    Normal,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::SlowConsumer => 4008,
            CloseReason::TokenExpired => 4401,
            CloseReason::Draining => 1012,
            CloseReason::TooLarge => 1009,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::ProtocolViolation => 1002,
            CloseReason::Policy | CloseReason::Flood => 1008,
            CloseReason::Normal => 1000,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::TokenExpired => "token expired",
            CloseReason::Draining => "node draining",
            CloseReason::TooLarge => "frame too large",
            CloseReason::InvalidUtf8 => "text frame not UTF-8",
            CloseReason::ProtocolViolation => "protocol violation",
            CloseReason::Policy => "origin not allowed",
            CloseReason::Flood => "inbound frame rate exceeded",
            CloseReason::Normal => "bye",
        }
    }
}

struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    closed: Option<CloseReason>,
}

/// The byte-bounded queue between producers and a socket's writer.
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    /// Woken when the writer took frames and the unsent bytes are at most half the limit.
    room: Notify,
    limit: usize,
}

/// What [`Outbox::offer`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// It would pass the limit: not queued, the socket stays open.
    NoRoom,
    Closed,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State { frames: VecDeque::new(), bytes: 0, closed: None }),
            notify: Notify::new(),
            room: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock_unpoisoned(&self.state)
    }

    /// Queues a frame; false when the socket is closed or just overflowed.
    pub fn push(&self, frame: Frame) -> bool {
        let mut state = self.lock();
        if state.closed.is_some() {
            return false;
        }
        if state.bytes + frame.len() > self.limit {
            drop(state);
            self.close_slow_consumer();
            return false;
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        self.notify.notify_one();
        true
    }

    /// Queues a frame if it fits under the limit (or the queue is empty: a frame
    /// larger than the limit cannot wait its way in, and is pushed).
    pub fn offer(&self, frame: Frame) -> Offer {
        {
            let state = self.lock();
            if state.closed.is_some() {
                return Offer::Closed;
            }
            if state.bytes > 0 && state.bytes + frame.len() > self.limit {
                return Offer::NoRoom;
            }
        }
        if self.push(frame) { Offer::Queued } else { Offer::Closed }
    }

    /// Waits until the unsent bytes are at most half the limit (or the queue
    /// closed): true, or false when `grace` ran out first.
    pub async fn room(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let woken = self.room.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let state = self.lock();
                if state.closed.is_some() || state.bytes <= self.limit / 2 {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return false;
            }
        }
    }

    /// Closes the socket as a slow consumer (4008), dropping what it has not sent.
    pub fn close_slow_consumer(&self) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        state.closed = Some(CloseReason::SlowConsumer);
        state.frames.clear();
        state.bytes = 0;
        drop(state);
        metrics::counter!("chatgate_slow_consumer_closes_total").increment(1);
        self.notify.notify_one();
    }

    /// Asks the writer to close the socket (first reason wins).
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        drop(state);
        self.notify.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Waits for frames; moves up to `max` of them into `out`. `Err` once the
    /// queue is closed and (for a normal close) drained.
    pub async fn pop(&self, out: &mut Vec<Frame>, max: usize) -> Result<(), CloseReason> {
        loop {
            {
                let mut state = self.lock();
                if let Some(reason) = state.closed
                    && (reason != CloseReason::Normal || state.frames.is_empty())
                {
                    return Err(reason);
                }
                if !state.frames.is_empty() {
                    let n = state.frames.len().min(max);
                    let state = &mut *state;
                    for frame in state.frames.drain(..n) {
                        state.bytes -= frame.len();
                        out.push(frame);
                    }
                    if state.bytes <= self.limit / 2 {
                        self.room.notify_waiters();
                    }
                    return Ok(());
                }
            }
            self.notify.notified().await;
        }
    }
}

/// The user's notices go straight into the outbox; one that finds no room is
/// skipped (a notice is advisory, and must not close a busy socket).
impl NoticeSink for Outbox {
    fn notice(&self, frame: &Frame) {
        let _ = self.offer(frame.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer() {
        let outbox = Outbox::new(10);
        assert!(outbox.push(Frame::from("12345")));
        assert!(outbox.push(Frame::from("12345")));
        assert!(!outbox.push(Frame::from("1")));
        let mut out = Vec::new();
        assert_eq!(outbox.pop(&mut out, 10).await, Err(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn an_offer_waits_for_room_instead_of_closing() {
        let outbox = Outbox::new(10);
        assert_eq!(outbox.offer(Frame::from("1234567")), Offer::Queued);
        assert_eq!(outbox.offer(Frame::from("12345")), Offer::NoRoom);
        assert!(!outbox.is_closed());
        assert!(!outbox.room(Duration::from_millis(20)).await, "no room while 7 of 10 bytes wait");
        let mut out = Vec::new();
        outbox.pop(&mut out, 10).await.unwrap();
        assert!(outbox.room(Duration::from_millis(20)).await);
        assert_eq!(outbox.offer(Frame::from("12345")), Offer::Queued);
        // Alone, a frame over the limit is pushed, and closes the socket.
        let big = Outbox::new(4);
        assert_eq!(big.offer(Frame::from("12345")), Offer::Closed);
        assert_eq!(big.pop(&mut out, 1).await, Err(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn a_notice_without_room_is_skipped_and_the_socket_stays_open() {
        let outbox = Outbox::new(10);
        outbox.notice(&Frame::from("1234567"));
        outbox.notice(&Frame::from("12345"));
        assert!(!outbox.is_closed());
        let mut out = Vec::new();
        outbox.pop(&mut out, 10).await.unwrap();
        assert_eq!(out, vec![Frame::from("1234567")]);
    }

    #[tokio::test]
    async fn pops_in_order_and_frees_bytes() {
        let outbox = Outbox::new(10);
        outbox.push(Frame::from("abc"));
        outbox.push(Frame::from("def"));
        let mut out = Vec::new();
        outbox.pop(&mut out, 1).await.unwrap();
        outbox.pop(&mut out, 8).await.unwrap();
        assert_eq!(out, vec![Frame::from("abc"), Frame::from("def")]);
        assert!(outbox.push(Frame::from("0123456789")));
    }
}
