//! Conformance suite of the run registry (docs/cluster.md §The seam).
//!
//! Every case is written once against `RunRegistry` and instantiated for each
//! implementation by `conformance!`: `memory` (in process) and `redis` (real
//! Redis at `REDIS_URL`, default 127.0.0.1:6379, unique keys per test). A case
//! gets two registries, "node a" and "node b", sharing one backend; for the
//! in-process registry both are the same instance.

use std::{collections::BTreeSet, future::Future, pin::Pin, sync::Arc, time::Duration};

use chatgate::{
    protocol::{EventBody, Frame, PermissionAnswer},
    runs::{
        Control, Event, FeedItem, LiveFeed, RegistryError, RunGrant, RunStart, SharedRegistry,
        memory::MemoryRegistry,
        redis::{RedisRegistry, RedisRegistryOptions},
    },
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

/// Two registries over one backend.
struct Nodes {
    a: SharedRegistry,
    b: SharedRegistry,
    node_a: String,
    node_b: String,
}

#[derive(Clone, Copy)]
struct Opts {
    max_events: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { max_events: 10_000 }
    }
}

type Factory = fn(Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>>;

fn memory_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let registry: SharedRegistry = Arc::new(MemoryRegistry::new(opts.max_events, Duration::from_secs(300)));
        Nodes { a: registry.clone(), b: registry, node_a: "mem-node".into(), node_b: "mem-node".into() }
    })
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let options = RedisRegistryOptions {
            lease: Duration::from_secs(15),
            max_events: opts.max_events,
            retention: Duration::from_secs(300),
        };
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let node_a = format!("conf-a-{tag}");
        let node_b = format!("conf-b-{tag}");
        let a = RedisRegistry::connect(&redis_url(), &node_a, options.clone()).await.expect("connect node a");
        let b = RedisRegistry::connect(&redis_url(), &node_b, options).await.expect("connect node b");
        Nodes { a: Arc::new(a), b: Arc::new(b), node_a, node_b }
    })
}

macro_rules! conformance {
    ($backend:ident, $factory:path) => {
        mod $backend {
            use super::*;
            conformance!(@cases $factory;
                start_run_is_exclusive,
                seq_is_per_session_and_strictly_increasing,
                seq_continues_from_the_floor_and_never_goes_back,
                writes_are_fenced_and_complete_happens_once,
                pending_permissions_follow_the_run,
                permission_answers_reach_the_owner_only_for_its_user,
                aborts_reach_the_owner_only_for_its_user,
                subscribe_replays_the_current_run_after_the_cursor_then_goes_live,
                subscribing_during_appends_is_gapless_and_duplicate_free,
                idle_subscribe_gets_no_replay_then_later_runs,
                replay_is_truncated_when_the_window_lost_events,
                read_range_reports_completeness,
                running_runs_lists_the_users_runs_on_every_node,
                user_notices_reach_only_that_user,
                sends_are_counted_per_user_across_nodes,
                registries_are_ready,
            );
        }
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case($factory).await
            }
        )*
    };
}

conformance!(memory, memory_nodes);
conformance!(redis, redis_nodes);

// ---------------------------------------------------------------- helpers

const WAIT: Duration = Duration::from_secs(5);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn start(session_id: &str, run_id: &str, user_id: &str, node_id: &str, seq_floor: u64) -> RunStart {
    RunStart {
        session_id: session_id.into(),
        run_id: run_id.into(),
        provider: "script".into(),
        user_id: user_id.into(),
        node_id: node_id.into(),
        seq_floor,
        last_active_ms: 0,
        prompt: "hello".into(),
    }
}

fn body(session_id: &str, run_id: &str, content: &str) -> EventBody {
    EventBody::from_object(
        "text",
        &json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "kind": "text",
            "sessionId": session_id,
            "provider": "script",
            "timestamp": "2024-01-01T00:00:00.000Z",
            "runId": run_id,
            "content": content,
        }),
    )
}

fn complete_body(session_id: &str, run_id: &str) -> EventBody {
    EventBody::from_object(
        "complete",
        &json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "kind": "complete",
            "sessionId": session_id,
            "provider": "script",
            "timestamp": "2024-01-01T00:00:00.000Z",
            "runId": run_id,
            "exitCode": 0,
            "success": true,
            "aborted": false,
        }),
    )
}

fn bodies(session_id: &str, run_id: &str, n: usize) -> Vec<EventBody> {
    (0..n).map(|i| body(session_id, run_id, &format!("event {i}"))).collect()
}

fn frame_json(event: &Event) -> Value {
    serde_json::from_str(&event.frame).expect("event frame is JSON")
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn answer(allow: bool) -> PermissionAnswer {
    PermissionAnswer { allow, updated_input: None, message: Some("ok".into()), remember_entry: None }
}

async fn next_event(feed: &mut LiveFeed) -> Event {
    match tokio::time::timeout(WAIT, feed.next()).await.expect("a live event within 5 s") {
        Some(FeedItem::Event(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn assert_quiet(feed: &mut LiveFeed) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(200), feed.next()).await {
        panic!("expected no live event, got {item:?}");
    }
}

async fn assert_no_control(grant: &mut RunGrant) {
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(grant.control.try_recv().is_err(), "no control message expected");
}

async fn recv_control(grant: &mut RunGrant) -> Control {
    tokio::time::timeout(WAIT, grant.control.recv()).await.expect("control within 5 s").expect("control channel open")
}

/// Runs a whole run with `n` events on `registry`; returns its events.
async fn whole_run(registry: &SharedRegistry, session_id: &str, user: &str, node: &str, n: usize) -> Vec<Event> {
    let run_id = unique("run");
    let grant = registry.start_run(start(session_id, &run_id, user, node, 0)).await.expect("start");
    let mut events = registry.append(&grant.lease, bodies(session_id, &run_id, n)).await.expect("append");
    events.push(registry.complete(&grant.lease, complete_body(session_id, &run_id)).await.expect("complete"));
    events
}

// ---------------------------------------------------------------- cases

async fn start_run_is_exclusive(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let grant = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.expect("first run starts");
    assert_eq!(grant.lease.run_id, "r1");
    assert_eq!(grant.lease.session_id, s);
    assert_eq!(n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.err(), Some(RegistryError::RunInProgress));
    assert_eq!(n.b.start_run(start(&s, "r3", "u", &n.node_b, 0)).await.err(), Some(RegistryError::RunInProgress));
    let other = unique("s");
    let other_grant =
        n.b.start_run(start(&other, "r1", "u", &n.node_b, 0)).await.expect("other session is independent");
    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.expect("complete");
    n.b.start_run(start(&s, "r4", "u", &n.node_b, 0)).await.expect("a new run after complete");
    n.b.complete(&other_grant.lease, complete_body(&other, "r1")).await.expect("complete other");

    // Many concurrent attempts on both nodes: exactly one wins.
    let raced = unique("s");
    let attempts = (0..16).map(|i| {
        let registry = if i % 2 == 0 { n.a.clone() } else { n.b.clone() };
        let node = if i % 2 == 0 { n.node_a.clone() } else { n.node_b.clone() };
        let raced = raced.clone();
        tokio::spawn(async move { registry.start_run(start(&raced, &format!("race-{i}"), "u", &node, 0)).await })
    });
    let mut won = 0;
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e, RegistryError::RunInProgress),
        }
    }
    assert_eq!(won, 1, "exactly one concurrent start_run wins");
}

async fn seq_is_per_session_and_strictly_increasing(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let g1 = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.unwrap();
    assert_eq!(g1.first_seq, 1, "the grant names the seq its first event gets");
    let batch = n.a.append(&g1.lease, bodies(&s, "r1", 3)).await.unwrap();
    assert_eq!(seqs(&batch), vec![1, 2, 3]);
    for (i, event) in batch.iter().enumerate() {
        assert_eq!(&*event.run_id, "r1");
        assert!(!event.terminal);
        let v = frame_json(event);
        assert_eq!(v["seq"], event.seq);
        assert_eq!(v["content"], format!("event {i}"));
        assert_eq!(v["kind"], "text");
    }
    assert_eq!(seqs(&n.a.append(&g1.lease, bodies(&s, "r1", 1)).await.unwrap()), vec![4]);
    assert_eq!(n.a.append(&g1.lease, Vec::new()).await.unwrap(), Vec::new());
    let done = n.a.complete(&g1.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(done.seq, 5);
    assert!(done.terminal);
    assert_eq!(frame_json(&done)["kind"], "complete");
    assert_eq!(frame_json(&done)["seq"], 5);

    // The next run, on the other node, continues the session's seq.
    let g2 = n.b.start_run(start(&s, "r2", "u", &n.node_b, 0)).await.unwrap();
    assert_eq!(g2.first_seq, 6);
    assert_eq!(seqs(&n.b.append(&g2.lease, bodies(&s, "r2", 2)).await.unwrap()), vec![6, 7]);
    assert_eq!(n.b.complete(&g2.lease, complete_body(&s, "r2")).await.unwrap().seq, 8);
    assert_eq!(n.a.snapshot(&s).await.unwrap().last_seq, 8);
    assert_eq!(n.b.snapshot(&s).await.unwrap().last_seq, 8);

    // Another session has its own counter.
    let other = unique("s");
    let g3 = n.a.start_run(start(&other, "r1", "u", &n.node_a, 0)).await.unwrap();
    assert_eq!(seqs(&n.a.append(&g3.lease, bodies(&other, "r1", 1)).await.unwrap()), vec![1]);
}

async fn seq_continues_from_the_floor_and_never_goes_back(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    // The database knows 41 events: the counter never goes below it.
    let g1 = n.a.start_run(start(&s, "r1", "u", &n.node_a, 41)).await.unwrap();
    let first = n.a.append(&g1.lease, bodies(&s, "r1", 3)).await.unwrap();
    assert!(first[0].seq > 41, "first seq {} must be above the floor 41", first[0].seq);
    assert_eq!(g1.first_seq, first[0].seq);
    assert_eq!(seqs(&first), vec![first[0].seq, first[0].seq + 1, first[0].seq + 2]);
    let end1 = n.a.complete(&g1.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(end1.seq, first[0].seq + 3);

    // A lower floor (the database lags) does not move the counter back.
    let g2 = n.b.start_run(start(&s, "r2", "u", &n.node_b, 5)).await.unwrap();
    assert_eq!(g2.first_seq, end1.seq + 1);
    assert_eq!(seqs(&n.b.append(&g2.lease, bodies(&s, "r2", 1)).await.unwrap()), vec![end1.seq + 1]);
    let end2 = n.b.complete(&g2.lease, complete_body(&s, "r2")).await.unwrap();

    // A higher floor (the backend lost events the database has) moves it past the floor.
    let floor = end2.seq + 1000;
    let g3 = n.a.start_run(start(&s, "r3", "u", &n.node_a, floor)).await.unwrap();
    let third = n.a.append(&g3.lease, bodies(&s, "r3", 2)).await.unwrap();
    assert!(third[0].seq > floor);
    assert_eq!(g3.first_seq, third[0].seq);
    assert_eq!(third[1].seq, third[0].seq + 1);
    assert!(n.a.snapshot(&s).await.unwrap().last_seq >= third[1].seq);
}

async fn writes_are_fenced_and_complete_happens_once(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let grant = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.unwrap();
    let mut wrong = grant.lease.clone();
    wrong.run_id = "not-the-run".into();
    assert_eq!(n.a.append(&wrong, bodies(&s, "x", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.b.complete(&wrong, complete_body(&s, "x")).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.renew(&wrong).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.add_pending(&wrong, "rq", json!({"requestId": "rq"})).await.err(), Some(RegistryError::Fenced));
    n.a.renew(&grant.lease).await.expect("the owner renews");
    n.a.append(&grant.lease, bodies(&s, "r1", 2)).await.expect("the owner appends");

    let done = n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(done.seq, 3);
    let all = n.b.read_range(&s, 0, u64::MAX).await.unwrap();
    assert_eq!(seqs(&all.events), vec![1, 2, 3]);
    assert_eq!(all.events.iter().map(|e| e.terminal).collect::<Vec<_>>(), vec![false, false, true]);
    assert_eq!(n.a.append(&grant.lease, bodies(&s, "r1", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.b.append(&grant.lease, bodies(&s, "r1", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.complete(&grant.lease, complete_body(&s, "r1")).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.renew(&grant.lease).await.err(), Some(RegistryError::Fenced));
    assert_eq!(n.a.add_pending(&grant.lease, "rq", json!({})).await.err(), Some(RegistryError::Fenced));
    let snapshot = n.b.snapshot(&s).await.unwrap();
    assert!(!snapshot.is_processing);
    assert_eq!(snapshot.last_seq, 3);
    assert_eq!(snapshot.run_id, None);

    // Concurrent completes from both nodes: exactly one lands.
    let g2 = n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.unwrap();
    let tries = (0..6).map(|i| {
        let registry = if i % 2 == 0 { n.a.clone() } else { n.b.clone() };
        let lease = g2.lease.clone();
        let s = s.clone();
        tokio::spawn(async move { registry.complete(&lease, complete_body(&s, "r2")).await })
    });
    let mut landed = Vec::new();
    for attempt in tries {
        match attempt.await.unwrap() {
            Ok(event) => landed.push(event.seq),
            Err(e) => assert_eq!(e, RegistryError::Fenced),
        }
    }
    assert_eq!(landed, vec![4], "exactly one complete");
    let tail = n.b.read_range(&s, 3, u64::MAX).await.unwrap();
    assert_eq!(seqs(&tail.events), vec![4]);
    assert!(tail.events[0].terminal && tail.complete);
}

fn request_ids(pending: &[Value]) -> BTreeSet<String> {
    pending.iter().map(|p| p["requestId"].as_str().unwrap_or_default().to_string()).collect()
}

async fn pending_permissions_follow_the_run(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let (rq1, rq2) = (unique("rq"), unique("rq"));
    let grant = n.a.start_run(start(&s, "r1", "u", &n.node_a, 0)).await.unwrap();
    n.a.add_pending(&grant.lease, &rq1, json!({"requestId": rq1, "toolName": "Bash", "input": {"command": "ls"}}))
        .await
        .unwrap();
    n.a.add_pending(&grant.lease, &rq2, json!({"requestId": rq2, "toolName": "Edit"})).await.unwrap();
    let snapshot = n.b.snapshot(&s).await.unwrap();
    assert!(snapshot.is_processing);
    assert_eq!(snapshot.run_id.as_deref(), Some("r1"));
    assert_eq!(snapshot.owner_node.as_deref(), Some(n.node_a.as_str()));
    assert_eq!(request_ids(&snapshot.pending_permissions), BTreeSet::from([rq1.clone(), rq2.clone()]));
    let first = snapshot.pending_permissions.iter().find(|p| p["requestId"] == rq1.as_str()).unwrap();
    assert_eq!(first["input"]["command"], "ls");

    n.a.remove_pending(&grant.lease, &rq1).await.unwrap();
    let subscription = n.b.subscribe(&s, 0).await.unwrap();
    assert_eq!(request_ids(&subscription.snapshot.pending_permissions), BTreeSet::from([rq2.clone()]));

    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert!(n.b.snapshot(&s).await.unwrap().pending_permissions.is_empty());
    assert!(!n.b.route_permission("u", &rq2, answer(true)).await.unwrap(), "cleared at complete");
    n.a.start_run(start(&s, "r2", "u", &n.node_a, 0)).await.unwrap();
    assert!(n.b.snapshot(&s).await.unwrap().pending_permissions.is_empty(), "a new run starts with none");
}

async fn permission_answers_reach_the_owner_only_for_its_user(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    let rq = unique("rq");
    let mut grant = n.a.start_run(start(&s, "r1", "alice", &n.node_a, 0)).await.unwrap();
    n.a.add_pending(&grant.lease, &rq, json!({"requestId": rq})).await.unwrap();

    assert!(!n.b.route_permission("mallory", &rq, answer(true)).await.unwrap());
    assert!(!n.b.route_permission("alice", "no-such-request", answer(true)).await.unwrap());
    assert_no_control(&mut grant).await;

    assert!(n.b.route_permission("alice", &rq, answer(true)).await.unwrap());
    let expected = Control::Permission { session_id: s.clone(), request_id: rq.clone(), answer: answer(true) };
    assert_eq!(recv_control(&mut grant).await, expected);
    assert!(n.a.route_permission("alice", &rq, answer(false)).await.unwrap());
    let expected = Control::Permission { session_id: s.clone(), request_id: rq.clone(), answer: answer(false) };
    assert_eq!(recv_control(&mut grant).await, expected);

    n.a.remove_pending(&grant.lease, &rq).await.unwrap();
    assert!(!n.b.route_permission("alice", &rq, answer(true)).await.unwrap(), "answered requests are unknown");
    assert_no_control(&mut grant).await;
}

async fn aborts_reach_the_owner_only_for_its_user(make: Factory) {
    let n = make(Opts::default()).await;
    let s = unique("s");
    assert!(!n.b.route_abort(&s, "alice").await.unwrap(), "no run");
    let mut grant = n.a.start_run(start(&s, "r1", "alice", &n.node_a, 0)).await.unwrap();
    assert!(!n.b.route_abort(&s, "mallory").await.unwrap());
    assert_no_control(&mut grant).await;
    assert!(n.b.route_abort(&s, "alice").await.unwrap());
    assert_eq!(recv_control(&mut grant).await, Control::Abort { session_id: s.clone(), run_id: "r1".into() });
    assert!(n.a.route_abort(&s, "alice").await.unwrap());
    assert_eq!(recv_control(&mut grant).await, Control::Abort { session_id: s.clone(), run_id: "r1".into() });
    n.a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert!(!n.b.route_abort(&s, "alice").await.unwrap(), "the run is over");
}

async fn subscribe_replays_the_current_run_after_the_cursor_then_goes_live(make: Factory) {
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

async fn subscribing_during_appends_is_gapless_and_duplicate_free(make: Factory) {
    let n = make(Opts::default()).await;
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(0xC0FFEE + seed);
        let s = unique("prop");
        // An earlier run, so the current run does not start at seq 1.
        let earlier = whole_run(&n.a, &s, "u", &n.node_a, rng.random_range(0..4)).await;
        let first_seq = earlier.last().map_or(1, |e| e.seq + 1);
        let run_id = format!("run-{seed}");
        let grant = n.a.start_run(start(&s, &run_id, "u", &n.node_a, 0)).await.unwrap();
        let total: usize = rng.random_range(30..70);
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

async fn idle_subscribe_gets_no_replay_then_later_runs(make: Factory) {
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

async fn replay_is_truncated_when_the_window_lost_events(make: Factory) {
    let n = make(Opts { max_events: 5 }).await;
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

async fn read_range_reports_completeness(make: Factory) {
    let n = make(Opts { max_events: 5 }).await;
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

async fn running_runs_lists_the_users_runs_on_every_node(make: Factory) {
    let n = make(Opts::default()).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (s1, s2, s3) = (unique("s"), unique("s"), unique("s"));
    let g1 = n.a.start_run(start(&s1, "r1", &alice, &n.node_a, 0)).await.unwrap();
    let _g2 = n.b.start_run(start(&s2, "r2", &alice, &n.node_b, 0)).await.unwrap();
    let _g3 = n.a.start_run(start(&s3, "r3", &bob, &n.node_a, 0)).await.unwrap();
    n.a.append(&g1.lease, bodies(&s1, "r1", 3)).await.unwrap();

    for registry in [&n.a, &n.b] {
        let mut runs = registry.running_runs(&alice).await.unwrap();
        runs.sort_by(|x, y| x.run_id.cmp(&y.run_id));
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].session_id.as_str(), runs[0].run_id.as_str()), (s1.as_str(), "r1"));
        assert_eq!((runs[1].session_id.as_str(), runs[1].run_id.as_str()), (s2.as_str(), "r2"));
        assert_eq!(runs[0].node_id, n.node_a);
        assert_eq!(runs[1].node_id, n.node_b);
        assert_eq!(runs[0].last_seq, 3);
        assert_eq!(runs[1].last_seq, 0);
        assert!(runs.iter().all(|r| r.provider == "script" && r.user_id == alice && !r.started_at.is_empty()));
        let bobs = registry.running_runs(&bob).await.unwrap();
        assert_eq!(bobs.iter().map(|r| r.session_id.as_str()).collect::<Vec<_>>(), vec![s3.as_str()]);
        assert!(registry.running_runs(&unique("nobody")).await.unwrap().is_empty());
    }
    n.a.complete(&g1.lease, complete_body(&s1, "r1")).await.unwrap();
    let left = n.b.running_runs(&alice).await.unwrap();
    assert_eq!(left.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec!["r2"]);
}

async fn user_notices_reach_only_that_user(make: Factory) {
    let n = make(Opts::default()).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let mut alice_b = n.b.user_notices(&alice).await.unwrap();
    let mut alice_a = n.a.user_notices(&alice).await.unwrap();
    let mut bob_a = n.a.user_notices(&bob).await.unwrap();
    let notice = Frame::from(json!({"kind": "session_upserted", "sessionId": "s1"}).to_string());
    n.a.notify_user(&alice, notice.clone()).await.unwrap();
    for rx in [&mut alice_b, &mut alice_a] {
        assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap(), notice);
    }
    let for_bob = Frame::from(json!({"kind": "session_upserted", "sessionId": "s2"}).to_string());
    n.b.notify_user(&bob, for_bob.clone()).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, bob_a.recv()).await.unwrap().unwrap(), for_bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(alice_a.try_recv().is_err() && alice_b.try_recv().is_err(), "alice never sees bob's notices");
    assert!(bob_a.try_recv().is_err(), "bob never sees alice's notices");
}

async fn sends_are_counted_per_user_across_nodes(make: Factory) {
    let n = make(Opts::default()).await;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let window = Duration::from_millis(1500);
    let before_first = tokio::time::Instant::now();
    // Three per window, counted on whichever node the send arrives.
    assert!(n.a.admit_send(&alice, 3, window).await.unwrap());
    // The window opened during that call: it is over by `after_first + window`.
    let after_first = tokio::time::Instant::now();
    assert!(n.b.admit_send(&alice, 3, window).await.unwrap());
    assert!(n.a.admit_send(&alice, 3, window).await.unwrap());
    assert!(!n.b.admit_send(&alice, 3, window).await.unwrap(), "4th send of the window, on the other node");
    assert!(!n.a.admit_send(&alice, 3, window).await.unwrap(), "refused sends do not reopen the budget");
    // Another user has a budget of their own.
    for _ in 0..3 {
        assert!(n.b.admit_send(&bob, 3, window).await.unwrap());
    }
    assert!(!n.a.admit_send(&bob, 3, window).await.unwrap());
    assert!(before_first.elapsed() < window, "the calls above took longer than the window");
    // The next window opens with a fresh budget.
    tokio::time::sleep_until(after_first + window + Duration::from_millis(50)).await;
    assert!(n.b.admit_send(&alice, 3, window).await.unwrap());
    assert!(n.a.admit_send(&alice, 3, window).await.unwrap());
    assert!(n.b.admit_send(&alice, 3, window).await.unwrap());
    assert!(!n.a.admit_send(&alice, 3, window).await.unwrap());
}

async fn registries_are_ready(make: Factory) {
    let n = make(Opts::default()).await;
    assert_eq!(n.a.ready().await, Ok(()));
    assert_eq!(n.b.ready().await, Ok(()));
}
