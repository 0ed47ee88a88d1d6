//! `SessionFeeds` cases: subscriptions (replay, then live, gapless and duplicate-free), truncated replay, range reads.

use super::*;

pub(crate) async fn subscribe_replays_the_current_run_after_the_cursor_then_goes_live(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let earlier = whole_run(&n.a, &s, "u", &n.node_a, 3).await;
    assert_eq!(seqs(&earlier), vec![1, 2, 3, 4]);
    let grant = n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.unwrap();
    n.a.append(&grant.lease, bodies(&s, "r2", 4)).await.unwrap();

    let mut sub = n.b.subscribe(&s, 0).await.unwrap();
    assert!(sub.snapshot.is_processing);
    assert_eq!(sub.snapshot.run_id.as_deref(), Some("r2"));
    assert_eq!(sub.snapshot.owner_node.as_deref(), Some(n.node_a.as_str()));
    assert_eq!(sub.snapshot.last_seq, 8);
    assert!(!sub.replay_truncated);
    assert_eq!(seqs(&sub.replay), vec![5, 6, 7, 8], "only the current run is replayed");
    assert!(sub.replay.iter().all(|e| &*e.run_id == "r2"));
    assert_eq!(frame_json(&sub.replay[0])["seq"], 5);

    let mid = n.a.subscribe(&s, 6).await.unwrap();
    assert_eq!(seqs(&mid.replay), vec![7, 8]);
    assert!(!mid.replay_truncated);
    let caught_up = n.b.subscribe(&s, 8).await.unwrap();
    assert!(caught_up.replay.is_empty() && !caught_up.replay_truncated);
    let ahead = n.b.subscribe(&s, 100).await.unwrap();
    assert!(ahead.replay.is_empty() && !ahead.replay_truncated);

    n.a.append(&grant.lease, bodies(&s, "r2", 2)).await.unwrap();
    n.a.complete(&grant.lease, complete_body(&s, "r2")).await.unwrap();
    let live = [next_event(&mut sub.live).await, next_event(&mut sub.live).await, next_event(&mut sub.live).await];
    assert_eq!(seqs(&live), vec![9, 10, 11]);
    assert!(live[2].terminal && !live[0].terminal);
    assert_eq!(frame_json(&live[0])["content"], "event 0");
    assert_quiet(&mut sub.live).await;
    let mut mid_live = mid.live;
    assert_eq!(next_event(&mut mid_live).await.seq, 9);
}

pub(crate) async fn subscribing_during_appends_is_gapless_and_duplicate_free(make: Factory) {
    let n = make(Opts::default()).await;
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(0xC0FFEE + seed);
        let s = unique("prop");
        // An earlier run, so the current run does not start at seq 1.
        let earlier = whole_run(&n.a, &s, "u", &n.node_a, rng.random_range(0..4)).await;
        let first_seq = earlier.last().map_or(1, |e| e.seq + 1);
        let run_id = format!("run-{seed}");
        let grant = n.a.start_run(start(&s, &run_id, "u", &n.node_a, 0)).await.unwrap();
        // Odd seeds: replays longer than the Redis registry copies through Lua (`INLINE_REPLAY`).
        let total: usize = if seed % 2 == 0 { rng.random_range(30..70) } else { rng.random_range(150..300) };
        let batch_sizes: Vec<usize> = {
            let mut left = total;
            let mut sizes = Vec::new();
            while left > 0 {
                let size = rng.random_range(1..=5).min(left);
                sizes.push(size);
                left -= size;
            }
            sizes
        };
        const READERS: u32 = 6;
        let subscribed = Arc::new(tokio::sync::Semaphore::new(0));
        let writer = {
            let subscribed = subscribed.clone();
            let registry = n.a.clone();
            let lease = grant.lease.clone();
            let s = s.clone();
            let run_id = run_id.clone();
            let pauses: Vec<u64> = batch_sizes.iter().map(|_| rng.random_range(0..3)).collect();
            tokio::spawn(async move {
                for (size, pause) in batch_sizes.into_iter().zip(pauses) {
                    registry.append(&lease, bodies(&s, &run_id, size)).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                // Every reader subscribed while the run was going (at a random point of it).
                let _all = subscribed.acquire_many(READERS).await.unwrap();
                registry.complete(&lease, complete_body(&s, &run_id)).await.unwrap().seq
            })
        };
        let mut readers = Vec::new();
        for _ in 0..READERS {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
            let on_b = rng.random_bool(0.5);
            let registry = if on_b { n.b.clone() } else { n.a.clone() };
            let top = registry.snapshot(&s).await.unwrap().last_seq;
            let cursor = rng.random_range(first_seq.saturating_sub(2)..=top.max(first_seq));
            let s = s.clone();
            let subscribed = subscribed.clone();
            readers.push(tokio::spawn(async move {
                let mut sub = registry.subscribe(&s, cursor).await.unwrap();
                subscribed.add_permits(1);
                assert!(!sub.replay_truncated, "nothing was trimmed");
                let mut got = seqs(&sub.replay);
                let mut done = sub.replay.last().is_some_and(|e| e.terminal);
                while !done {
                    let event = next_event(&mut sub.live).await;
                    done = event.terminal;
                    got.push(event.seq);
                }
                (cursor, got)
            }));
        }
        let last = writer.await.unwrap();
        for reader in readers {
            let (cursor, got) = reader.await.unwrap();
            let from = cursor.max(first_seq - 1);
            let expected: Vec<u64> = (from + 1..=last).collect();
            assert_eq!(got, expected, "seed {seed}, cursor {cursor}: replay + live must be gapless and duplicate-free");
        }
    }
}

pub(crate) async fn idle_subscribe_gets_no_replay_then_later_runs(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let mut sub = n.b.subscribe(&s, 0).await.unwrap();
    assert!(!sub.snapshot.is_processing);
    assert_eq!(sub.snapshot.last_seq, 0);
    assert!(sub.replay.is_empty() && !sub.replay_truncated);

    let run1 = whole_run(&n.a, &s, "u", &n.node_a, 2).await;
    let run2 = whole_run(&n.a, &s, "u", &n.node_a, 1).await;
    let mut got = Vec::new();
    for _ in 0..run1.len() + run2.len() {
        got.push(next_event(&mut sub.live).await);
    }
    assert_eq!(seqs(&got), vec![1, 2, 3, 4, 5]);
    assert_eq!(got.iter().map(|e| e.terminal).collect::<Vec<_>>(), vec![false, false, true, false, true]);
    assert_eq!(got[0].run_id, run1[0].run_id);
    assert_eq!(got[3].run_id, run2[0].run_id);
    assert_quiet(&mut sub.live).await;

    // After the runs ended: the ack only, whatever the cursor.
    let late = n.a.subscribe(&s, 0).await.unwrap();
    assert!(!late.snapshot.is_processing);
    assert_eq!(late.snapshot.last_seq, 5);
    assert!(late.replay.is_empty() && !late.replay_truncated);
}

pub(crate) async fn replay_is_truncated_when_the_window_lost_events(make: Factory) {
    let n = make(Opts { max_events: 5, ..Opts::default() }).await;
    let s = unique("s");
    let grant = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.unwrap();
    for _ in 0..4 {
        n.a.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    }
    // Seqs 1..=12 were appended; the window keeps 8..=12.
    let from_start = n.b.subscribe(&s, 0).await.unwrap();
    assert!(from_start.replay_truncated);
    assert_eq!(seqs(&from_start.replay), vec![8, 9, 10, 11, 12]);
    let just_covered = n.b.subscribe(&s, 7).await.unwrap();
    assert!(!just_covered.replay_truncated);
    assert_eq!(seqs(&just_covered.replay), vec![8, 9, 10, 11, 12]);
    assert!(n.a.subscribe(&s, 6).await.unwrap().replay_truncated);
    let current = n.a.subscribe(&s, 12).await.unwrap();
    assert!(!current.replay_truncated && current.replay.is_empty());
}

/// Replays of hundreds of events (the Redis registry reads those with a plain `XRANGE` after its
/// script): every event after the cursor, in order, from either node; a window trimmed below
/// the cursor is told, with what is left.
pub(crate) async fn long_replays_are_whole_in_order_and_told_when_trimmed(make: Factory) {
    let n = make(Opts { max_events: 400, ..Opts::default() }).await;
    let s = unique("long");
    let earlier = whole_run(&n.a, &s, "u", &n.node_a, 5).await;
    let first_seq = earlier.last().unwrap().seq + 1;
    let grant = n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.unwrap();
    for _ in 0..30 {
        n.a.append(&grant.lease, bodies(&s, "r2", 10)).await.unwrap();
    }
    let top = first_seq + 299;
    for (cursor, on_b) in
        [(0, true), (first_seq - 1, false), (first_seq + 99, true), (top - 100, false), (top - 1, true)]
    {
        let registry = if on_b { &n.b } else { &n.a };
        let sub = registry.subscribe(&s, cursor).await.unwrap();
        let from = cursor.max(first_seq - 1);
        assert_eq!(seqs(&sub.replay), (from + 1..=top).collect::<Vec<_>>(), "cursor {cursor}");
        assert!(!sub.replay_truncated, "cursor {cursor}");
        assert!(sub.replay.iter().all(|e| &*e.run_id == "r2" && !e.terminal));
        assert_eq!(frame_json(&sub.replay[0])["seq"], from + 1);
        assert_eq!(sub.snapshot.last_seq, top);
    }

    // 300 more: the window keeps the last 400 of the run, so a replay from its start is cut.
    for _ in 0..30 {
        n.a.append(&grant.lease, bodies(&s, "r2", 10)).await.unwrap();
    }
    let top = first_seq + 599;
    let kept_from = top - 399;
    let cut = n.b.subscribe(&s, 0).await.unwrap();
    assert!(cut.replay_truncated);
    assert_eq!(seqs(&cut.replay), (kept_from..=top).collect::<Vec<_>>());
    let covered = n.a.subscribe(&s, kept_from - 1).await.unwrap();
    assert!(!covered.replay_truncated);
    assert_eq!(covered.replay.len(), 400);
    let mut live = covered.live;
    let end = n.a.complete(&grant.lease, complete_body(&s, "r2")).await.unwrap();
    assert_eq!(next_event(&mut live).await.seq, end.seq);
}

/// Ranges longer than a script copies inline (128 on Redis) are read whole, in order, and a
/// trimmed start is told; a short one beside them is unchanged.
pub(crate) async fn long_ranges_are_whole_in_order_and_told_when_trimmed(make: Factory) {
    let n = make(Opts { max_events: 400, ..Opts::default() }).await;
    let s = unique("range");
    let (grant, first) = long_run(&n, &s, 30, 10).await;
    let top = first + 299;
    assert_whole(
        &n,
        &s,
        top,
        &[(first + 9, first + 249), (first + 199, u64::MAX), (first - 1, first + 200), (top - 1, top)],
    )
    .await;

    // 300 more: the window keeps the last 400, so a range from the run's start is cut.
    let kept_from = append_past_the_window(&n, &s, &grant, 30, 10, first + 599, 400).await;
    let cut_short = n.b.read_range(&s, kept_from - 150, kept_from + 149).await.unwrap();
    assert!(!cut_short.complete);
    assert_eq!(seqs(&cut_short.events), (kept_from..=kept_from + 149).collect::<Vec<_>>());
    let covered = n.b.read_range(&s, kept_from - 1, first + 598).await.unwrap();
    assert!(covered.complete);
    assert_eq!(covered.events.len(), 399);
}

/// Ranges and replays of thousands of seqs (a Redis registry reads them in chunks, several at
/// once) are whole and in order, and a trimmed start is told.
pub(crate) async fn ranges_of_thousands_are_whole_in_order_and_told_when_trimmed(make: Factory) {
    let n = make(Opts { max_events: 2_500, ..Opts::default() }).await;
    let s = unique("range");
    let (grant, first) = long_run(&n, &s, 24, 100).await;
    let top = first + 2_399;
    assert_whole(&n, &s, top, &[(first + 7, first + 2_100), (first + 1_023, first + 2_048), (first - 1, u64::MAX)])
        .await;
    let subscription = n.b.subscribe(&s, 0).await.unwrap();
    assert!(!subscription.replay_truncated);
    assert_eq!(seqs(&subscription.replay), (first..=top).collect::<Vec<_>>());
    drop(subscription);

    // 1 200 more: the window keeps the last 2 500, so a replay from the run's start is cut.
    let top = first + 3_599;
    let kept_from = append_past_the_window(&n, &s, &grant, 12, 100, top, 2_500).await;
    let subscription = n.b.subscribe(&s, 0).await.unwrap();
    assert!(subscription.replay_truncated);
    assert_eq!(seqs(&subscription.replay), (kept_from..=top).collect::<Vec<_>>());
}

/// A run of `batches` × `per_batch` events on node A, read whole from node B; its grant and
/// first seq.
async fn long_run(n: &Nodes, s: &str, batches: usize, per_batch: usize) -> (RunGrant, u64) {
    let grant = n.a.start_run(start(s, "r1", "u", &n.node_a, 0)).await.unwrap();
    for _ in 0..batches {
        n.a.append(&grant.lease, bodies(s, "r1", per_batch)).await.unwrap();
    }
    let all = n.b.read_range(s, 0, u64::MAX).await.unwrap();
    let first = all.events[0].seq;
    assert_eq!(seqs(&all.events), (first..first + (batches * per_batch) as u64).collect::<Vec<_>>());
    assert!(all.complete);
    (grant, first)
}

/// Each `(after, up_to)` range reads whole, in order, up to `top`.
async fn assert_whole(n: &Nodes, s: &str, top: u64, ranges: &[(u64, u64)]) {
    for &(after, up_to) in ranges {
        let range = n.b.read_range(s, after, up_to).await.unwrap();
        assert_eq!(seqs(&range.events), (after + 1..=up_to.min(top)).collect::<Vec<_>>(), "({after}, {up_to})");
        assert!(range.complete, "({after}, {up_to})");
        assert!(range.events.iter().all(|e| &*e.run_id == "r1" && !e.terminal));
    }
}

/// Appends until the run's top is `top`, past a `window` of events: a range from the run's start
/// is cut to the window, and told. Returns the first seq the window keeps.
async fn append_past_the_window(
    n: &Nodes,
    s: &str,
    grant: &RunGrant,
    batches: usize,
    per_batch: usize,
    top: u64,
    window: u64,
) -> u64 {
    for _ in 0..batches {
        n.a.append(&grant.lease, bodies(s, "r1", per_batch)).await.unwrap();
    }
    let kept_from = top + 1 - window;
    let cut = n.a.read_range(s, 0, u64::MAX).await.unwrap();
    assert!(!cut.complete);
    assert_eq!(seqs(&cut.events), (kept_from..=top).collect::<Vec<_>>());
    kept_from
}

pub(crate) async fn read_range_reports_completeness(make: Factory) {
    let n = make(Opts { max_events: 5, ..Opts::default() }).await;
    let s = unique("s");
    let unknown = n.a.read_range(&unique("s"), 0, u64::MAX).await.unwrap();
    assert!(unknown.events.is_empty() && unknown.complete);

    let events = whole_run(&n.a, &s, "u", &n.node_a, 3).await;
    assert_eq!(seqs(&events), vec![1, 2, 3, 4]);
    let middle = n.b.read_range(&s, 1, 3).await.unwrap();
    assert_eq!(seqs(&middle.events), vec![2, 3]);
    assert!(middle.complete);
    let all = n.b.read_range(&s, 0, u64::MAX).await.unwrap();
    assert_eq!(all.events, events, "the window holds the same events as appended");
    assert!(all.complete);
    let beyond = n.b.read_range(&s, 4, u64::MAX).await.unwrap();
    assert!(beyond.events.is_empty() && beyond.complete);

    let grant = n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.unwrap();
    n.a.append(&grant.lease, bodies(&s, "r2", 6)).await.unwrap();
    // Seqs 5..=10 appended; the window keeps 6..=10.
    let trimmed = n.b.read_range(&s, 0, u64::MAX).await.unwrap();
    assert!(!trimmed.complete);
    assert_eq!(seqs(&trimmed.events), vec![6, 7, 8, 9, 10]);
    let covered = n.b.read_range(&s, 5, 8).await.unwrap();
    assert!(covered.complete);
    assert_eq!(seqs(&covered.events), vec![6, 7, 8]);
    assert!(!n.a.read_range(&s, 3, 7).await.unwrap().complete);
}
