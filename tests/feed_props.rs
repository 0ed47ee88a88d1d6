//! Property test of the subscribe merge (`runs::feed::LiveFeed`, and the push
//! subscription a socket turns it into, `runs::live`): replay from a trimmed
//! window interleaved with an adversarial live channel.
//!
//! A session's events 1..=N are published over time. A subscriber with cursor
//! `lastSeq` gets a feed whose window ([`Window`], a [`RangeSource`]) keeps only
//! the newest `retain` events, and whose live channel (capacity `capacity`)
//! sees every delivery the registries can produce: in order, dropped (pub/sub
//! loss), repeated or late (a catch-up re-sending what pub/sub already
//! delivered), and more than the channel holds (the receiver lags). Reads of
//! the window may also fail (backend unavailable). The last event is always
//! delivered, then the channel closes.
//!
//! Properties, checked per `next()` call against the window reads it made:
//! - events come out strictly increasing by 1 from `lastSeq + 1`, each once,
//!   with the published frame; the only jumps are announced by `FeedItem::Gap`;
//! - a `Gap` comes exactly when a read found events it needed trimmed (or the
//!   read failed), and `resumed_at` is the first event the window still had;
//! - the feed ends having delivered or announced as lost every event up to N.
//!
//! Each scenario runs twice: read by `next()` throughout, and turned into a
//! push subscription at a chosen step (the publisher then delivers to a
//! recording sink, and repairs run as tasks), checked the same way.
//!
//! Deliveries go through [`deliver`], the one place that knows the channel's
//! item type.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chatgate::{
    protocol::Frame,
    protocol::sequenced,
    runs::{
        Event, FeedItem, LiveBatch, LiveChannel, LiveFeed, LiveSink, Offered, PushFeed, RegistryError, ReplayRange,
        feed::RangeSource,
    },
};
use futures_util::FutureExt;
use proptest::prelude::*;

/// Hands one delivery (what one registry step sends: an append batch, or a
/// catch-up read) to the live channel as one batch.
fn deliver(channel: &LiveChannel, delivery: &[Event]) {
    if delivery.is_empty() {
        return;
    }
    channel.send(LiveBatch::from(delivery));
}

/// A push subscription's sink: every item with the window reads made before it.
/// With `full_every = n`, every n-th offered event is refused once for want of
/// room (a socket whose outbox is at its bound), and the feed must wait for room.
struct Recorder {
    window: Arc<Window>,
    items: Mutex<Vec<(FeedItem, Vec<Read>)>>,
    full_every: Option<usize>,
    offers: Mutex<usize>,
}

impl Recorder {
    fn record(&self, item: FeedItem) {
        let reads = self.window.lock().reads.clone();
        self.items.lock().unwrap().push((item, reads));
    }
}

#[async_trait]
impl LiveSink for Recorder {
    fn event(&self, event: &Event) -> Offered {
        let mut offers = self.offers.lock().unwrap();
        *offers += 1;
        if self.full_every.is_some_and(|n| (*offers).is_multiple_of(n)) {
            return Offered::Full;
        }
        drop(offers);
        self.record(FeedItem::Event(event.clone()));
        Offered::Queued
    }

    async fn room(&self) -> bool {
        true
    }

    fn stalled(&self) {
        panic!("the recorder always has room again");
    }

    fn frame(&self, _frame: Frame) -> bool {
        true
    }

    async fn gap_notice(&self, _session_id: &str, _last_sent: u64, resumed_at: u64) -> Option<Frame> {
        self.record(FeedItem::Gap { resumed_at });
        None
    }
}

fn event(seq: u64) -> Event {
    Event {
        seq,
        run_id: Arc::from("run-1"),
        terminal: false,
        frame: sequenced(&format!(r#"{{"kind":"stream_delta","content":"chunk {seq}"}}"#), seq),
    }
}

/// One `read_range` as the window answered it.
#[derive(Debug, Clone)]
struct Read {
    after: u64,
    up_to: u64,
    /// Events published at the time.
    published: u64,
    /// Oldest seq still retained at the time.
    front: u64,
    failed: bool,
}

impl Read {
    /// The last seq this read had to cover.
    fn needed_to(&self) -> u64 {
        self.up_to.min(self.published)
    }

    /// Some event the read had to return was trimmed, or the read failed.
    fn lost_something(&self) -> bool {
        self.failed || (self.needed_to() > self.after && self.front > self.after + 1)
    }
}

struct WindowState {
    /// Seqs 1..=published exist.
    published: u64,
    retain: u64,
    /// Reads fail while this is set (backend unavailable).
    failing: bool,
    reads: Vec<Read>,
}

/// A replay window keeping the newest `retain` events of the session.
struct Window {
    state: Mutex<WindowState>,
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap()
    }
}

#[async_trait]
impl RangeSource for Window {
    async fn read_range(&self, _session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        let mut state = self.lock();
        let published = state.published;
        let front = published.saturating_sub(state.retain) + 1;
        let read = Read { after: after_seq, up_to, published, front, failed: state.failing };
        state.reads.push(read.clone());
        if read.failed {
            return Err(RegistryError::Unavailable("window down".into()));
        }
        let last = read.needed_to();
        let first = after_seq.saturating_add(1).max(front);
        let events: Vec<Event> = (first..=last).map(event).collect();
        // Complete: every seq from after+1 to the covered end is present (the Redis registry's rule).
        let complete = last <= after_seq || first == after_seq + 1;
        Ok(ReplayRange { events, complete })
    }
}

/// What happens to one freshly published event on its way to the channel.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Delivered,
    /// Lost on the way (pub/sub loss); the window still has it.
    Dropped,
    /// Delivered twice.
    Repeated,
}

#[derive(Debug, Clone)]
enum Step {
    /// Publish events, each with its fate, as one delivery.
    Publish(Vec<Fate>),
    /// Re-send an already published event `back` seqs before the newest (a late catch-up).
    Resend { back: u64 },
    /// Call `next()` up to this many times while it is ready.
    Consume(usize),
    /// Window reads fail (true) or work again (false).
    Failing(bool),
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![6 => Just(Fate::Delivered), 2 => Just(Fate::Dropped), 1 => Just(Fate::Repeated)]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => prop::collection::vec(fate(), 1..12).prop_map(Step::Publish),
        2 => (0u64..20).prop_map(|back| Step::Resend { back }),
        4 => (1usize..8).prop_map(Step::Consume),
        1 => any::<bool>().prop_map(Step::Failing),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Events published before the subscribe.
    before: u64,
    /// The subscriber's cursor, at most `before`.
    last_seq: u64,
    retain: u64,
    capacity: usize,
    steps: Vec<Step>,
    /// The step before which the feed becomes a push subscription (in the push run).
    push_at: usize,
    /// The push run's sink refuses every n-th event once (no room).
    full_every: Option<usize>,
}

fn scenario(with_failures: bool) -> impl Strategy<Value = Scenario> {
    (
        0u64..60,
        1u64..40,
        1usize..8,
        prop::collection::vec(step(), 0..40),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        prop::option::of(2usize..6),
    )
        .prop_map(move |(before, retain, capacity, steps, cursor, push_at, full_every)| {
            let last_seq = cursor.index(before as usize + 1) as u64;
            let steps =
                steps.into_iter().filter(|s| with_failures || !matches!(s, Step::Failing(_))).collect::<Vec<_>>();
            let push_at = push_at.index(steps.len() + 1);
            Scenario { before, last_seq, retain, capacity, steps, push_at, full_every }
        })
}

/// Checks the feed's output as it comes, against the window reads.
struct Checker {
    /// Next seq the subscriber must get (or be told is lost).
    expected: u64,
    reads_seen: usize,
}

impl Checker {
    /// One `next()` result; `reads` are all window reads so far.
    fn item(&mut self, item: &FeedItem, reads: &[Read]) -> Result<(), TestCaseError> {
        let new_reads = &reads[self.reads_seen..];
        self.reads_seen = reads.len();
        // Reads before the last one of this call found nothing lost (they would have ended the call).
        if let Some((_, earlier)) = new_reads.split_last() {
            for read in earlier {
                prop_assert!(!read.lost_something(), "a read lost events without a Gap: {read:?}");
            }
        }
        match item {
            FeedItem::Event(event) => {
                prop_assert_eq!(event.seq, self.expected, "events must be contiguous");
                prop_assert_eq!(&event.frame, &self::event(event.seq).frame);
                if let Some(read) = new_reads.last() {
                    prop_assert!(!read.lost_something(), "lost events without a Gap: {read:?}");
                }
                self.expected += 1;
            }
            FeedItem::Gap { resumed_at } => {
                let read = new_reads.last();
                prop_assert!(read.is_some_and(Read::lost_something), "Gap without a lossy read: {read:?}");
                let read = read.unwrap();
                prop_assert_eq!(read.after + 1, self.expected, "the read starts at the next needed seq");
                if read.failed {
                    prop_assert!(*resumed_at >= self.expected);
                } else {
                    // The first event the window still had, or past the range when it had none of it.
                    let expected_resume = read.front.min(read.up_to.saturating_add(1));
                    prop_assert_eq!(*resumed_at, expected_resume);
                    prop_assert!(*resumed_at > self.expected, "a Gap skips at least one event");
                }
                self.expected = *resumed_at;
            }
        }
        Ok(())
    }
}

/// Runs a scenario with the feed read by `next()` (`push: false`), or turned
/// into a push subscription before step `s.push_at` (`push: true`).
fn run_scenario(s: Scenario, push: bool) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(scenario_body(s, push))
}

/// Lets every repair task run to where it waits for nothing but the next batch.
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

async fn scenario_body(s: Scenario, push: bool) -> Result<(), TestCaseError> {
    let window = Arc::new(Window {
        state: Mutex::new(WindowState { published: s.before, retain: s.retain, failing: false, reads: Vec::new() }),
    });
    let channel = LiveChannel::new(s.capacity);
    let source: Arc<dyn RangeSource> = window.clone();
    let mut feed = Some(LiveFeed::new("s".into(), &channel, channel.subscribe(), s.last_seq, source, None));
    let full_every = s.full_every;
    let recorder =
        Arc::new(Recorder { window: window.clone(), items: Mutex::new(Vec::new()), full_every, offers: Mutex::new(0) });
    let mut pushed: Option<PushFeed> = None;
    let mut checker = Checker { expected: s.last_seq + 1, reads_seen: 0 };
    let mut recorded = 0;
    // Checks what the push subscription delivered since the last call.
    let mut check_recorded = |checker: &mut Checker| -> Result<(), TestCaseError> {
        let items = recorder.items.lock().unwrap().clone();
        for (item, reads) in &items[recorded..] {
            checker.item(item, reads)?;
        }
        recorded = items.len();
        Ok(())
    };
    let consume = |feed: &mut LiveFeed, checker: &mut Checker, limit: usize| -> Result<bool, TestCaseError> {
        for _ in 0..limit {
            match feed.next().now_or_never() {
                None => return Ok(true),
                Some(None) => return Ok(false),
                Some(Some(item)) => {
                    let reads = window.lock().reads.clone();
                    checker.item(&item, &reads)?;
                }
            }
        }
        Ok(true)
    };
    for (i, step) in s.steps.iter().enumerate() {
        if push && i == s.push_at {
            pushed = feed.take().map(|f| f.push_to(recorder.clone()));
            settle().await;
            check_recorded(&mut checker)?;
        }
        match step {
            Step::Publish(fates) => {
                let mut delivery = Vec::new();
                for fate in fates {
                    let seq = {
                        let mut state = window.lock();
                        state.published += 1;
                        state.published
                    };
                    match fate {
                        Fate::Delivered => delivery.push(event(seq)),
                        Fate::Dropped => {}
                        Fate::Repeated => delivery.extend([event(seq), event(seq)]),
                    }
                }
                deliver(&channel, &delivery);
            }
            Step::Resend { back } => {
                let published = window.lock().published;
                if published > *back {
                    deliver(&channel, &[event(published - back)]);
                }
            }
            Step::Consume(limit) => match feed.as_mut() {
                Some(feed) => {
                    consume(feed, &mut checker, *limit)?;
                }
                None => {
                    settle().await;
                    check_recorded(&mut checker)?;
                }
            },
            Step::Failing(failing) => window.lock().failing = *failing,
        }
    }
    if push && pushed.is_none() {
        pushed = feed.take().map(|f| f.push_to(recorder.clone()));
    }
    // The last event always arrives, with the window readable; then the channel closes.
    let last = {
        let mut state = window.lock();
        state.failing = false;
        state.published += 1;
        state.published
    };
    deliver(&channel, &[event(last)]);
    drop(channel);
    match (feed.as_mut(), pushed) {
        (Some(feed), _) => {
            let mut rounds = 0;
            while consume(feed, &mut checker, 64)? {
                rounds += 1;
                prop_assert!(rounds < 1000, "the feed neither ends nor yields");
            }
            prop_assert_eq!(feed.last_sent(), last);
        }
        (None, Some(pushed)) => {
            settle().await;
            check_recorded(&mut checker)?;
            prop_assert_eq!(pushed.last_sent(), last);
        }
        (None, None) => unreachable!("the feed is read or pushed"),
    }
    prop_assert_eq!(checker.expected, last + 1, "the feed ended before the last event");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_contiguous_and_gaps_only_where_trimmed(s in scenario(false)) {
        run_scenario(s, false)?;
    }

    #[test]
    fn failed_reads_are_announced_never_duplicated(s in scenario(true)) {
        run_scenario(s, false)?;
    }

    #[test]
    fn pushed_feeds_are_contiguous_and_gap_only_where_trimmed(s in scenario(false)) {
        run_scenario(s, true)?;
    }

    #[test]
    fn pushed_feeds_announce_failed_reads_never_duplicate(s in scenario(true)) {
        run_scenario(s, true)?;
    }
}

/// A fixed case: a subscriber far behind a short window, with a lagging receiver.
#[test]
fn lag_past_the_window_resumes_at_its_front() {
    let s = Scenario {
        before: 10,
        last_seq: 2,
        retain: 4,
        capacity: 2,
        steps: vec![Step::Publish(vec![Fate::Delivered; 5]), Step::Consume(10)],
        push_at: 1,
        full_every: Some(2),
    };
    run_scenario(s.clone(), false).unwrap();
    run_scenario(s, true).unwrap();
}
