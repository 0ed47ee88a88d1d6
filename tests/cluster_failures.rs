//! Cluster failures end to end (issue 3, "Tests that must exist"): a tab
//! hopping over three nodes mid-run, two nodes racing `chat.send`, Redis
//! restarted mid-run, SIGTERM of a node that has sockets and runs, expiry of
//! finished runs' Redis keys, an owner fenced behind its back, and on a Redis
//! Cluster (`--redis-mode cluster`) a primary killed and slots migrated mid-run,
//! and under Redis Sentinel (`--redis-mode sentinel`) the primary killed or
//! failed over mid-run.
//!
//! Every client is checked the way a browser tab relies on the stream
//! ([`View`]): each seq once and in order, a jump ahead only when the server
//! announced it with `replayTruncated: true`, no event id twice, and exactly
//! one `complete` per run.

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use chatgate::{
    config::Config,
    runs::redis::{Topology, keys},
};
use chatgate_testkit::{
    redis_cluster::{PrivateRedisCluster, Role},
    redis_sentinel::PrivateRedisSentinel,
};
use common::{PrivateRedis, TestNode, Ws, cluster_node, mint, redis_url, seqs, user};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use redis::AsyncCommands;
use serde_json::{Value, json};

fn paced(events: u64, interval_ms: u64) -> String {
    json!({ "events": events, "intervalMs": interval_ms }).to_string()
}

/// A node id no other test (or earlier run on the shared Redis) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// `CHATGATE_TEST_SEED` to replay a failure, else a fresh random seed (printed).
fn seed() -> u64 {
    let seed = std::env::var("CHATGATE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("seed {seed} (set CHATGATE_TEST_SEED={seed} to replay)");
    seed
}

/// What one client saw of one session, checked frame by frame.
struct View {
    who: String,
    /// The last seq delivered (or the cursor the view started from).
    last: u64,
    /// A `chat_subscribed` with `replayTruncated: true` came since the last event.
    gap_announced: bool,
    ids: HashSet<String>,
    events: Vec<Value>,
    acks: Vec<Value>,
    completes: Vec<Value>,
    /// Announced jumps taken.
    gaps: usize,
}

impl View {
    fn new(who: &str, last: u64) -> View {
        View {
            who: who.to_string(),
            last,
            gap_announced: false,
            ids: HashSet::new(),
            events: Vec::new(),
            acks: Vec::new(),
            completes: Vec::new(),
            gaps: 0,
        }
    }

    /// Takes one frame; panics on a broken promise (see [`View::check`]).
    #[track_caller]
    fn observe(&mut self, frame: &Value) {
        if let Err(broken) = self.check(frame) {
            panic!("{broken}");
        }
    }

    /// Takes one frame: `Err` on a duplicate or out-of-order seq, a jump
    /// ahead not announced by `replayTruncated`, or an event id seen before.
    fn check(&mut self, frame: &Value) -> Result<(), String> {
        let who = &self.who;
        if frame["kind"] == "chat_subscribed" {
            if frame["replayTruncated"] == true {
                self.gap_announced = true;
            }
            self.acks.push(frame.clone());
            return Ok(());
        }
        let Some(seq) = frame["seq"].as_u64() else { return Ok(()) };
        let last = self.last;
        if seq <= last {
            return Err(format!("{who}: seq {seq} after {last} (duplicate or out of order): {frame}"));
        }
        if seq != last + 1 {
            if !self.gap_announced {
                return Err(format!("{who}: jumped from {last} to {seq} without replayTruncated: {frame}"));
            }
            self.gaps += 1;
        }
        let id = frame["id"].as_str().unwrap_or_default().to_string();
        if id.is_empty() || !self.ids.insert(id) {
            return Err(format!("{who}: event id delivered twice (seq {seq}): {frame}"));
        }
        self.gap_announced = false;
        self.last = seq;
        if frame["kind"] == "complete" {
            self.completes.push(frame.clone());
        }
        self.events.push(frame.clone());
        Ok(())
    }

    /// The events after `seq`.
    fn after(&self, seq: u64) -> Vec<Value> {
        self.events.iter().filter(|e| e["seq"].as_u64().is_some_and(|s| s > seq)).cloned().collect()
    }
}

/// A browser tab: one socket at a time, and its views of the sessions it follows.
struct Tab {
    name: String,
    ws: Ws,
    views: HashMap<String, View>,
    errors: Vec<Value>,
}

impl Tab {
    fn new(name: &str, ws: Ws) -> Tab {
        Tab { name: name.to_string(), ws, views: HashMap::new(), errors: Vec::new() }
    }

    /// Starts checking `session` from after `last`.
    fn follow(&mut self, session: &str, last: u64) {
        let who = format!("{} / {session}", self.name);
        self.views.insert(session.to_string(), View::new(&who, last));
    }

    fn view(&self, session: &str) -> &View {
        &self.views[session]
    }

    fn observe(&mut self, frame: &Value) {
        if frame["kind"] == "protocol_error" {
            self.errors.push(frame.clone());
            return;
        }
        if let Some(view) = frame["sessionId"].as_str().and_then(|s| self.views.get_mut(s)) {
            view.observe(frame);
        }
    }

    /// Reads frames until `done`; panics when nothing comes for 10 s or the socket closes.
    async fn pump_until(&mut self, done: impl Fn(&Tab) -> bool) {
        while !done(self) {
            let frame = match self.ws.try_recv(Duration::from_secs(10)).await {
                Some(Ok(frame)) => frame,
                Some(Err(close)) => panic!("{}: socket closed ({close:?}); errors: {:?}", self.name, self.errors),
                None => panic!("{}: no frame within 10 s; errors so far: {:?}", self.name, self.errors),
            };
            self.observe(&frame);
        }
    }

    /// Reads frames until the server closes the socket; its close code.
    async fn until_closed(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.ws.try_recv(left).await {
                Some(Ok(frame)) => self.observe(&frame),
                Some(Err(code)) => return code,
                None => panic!("{}: socket still open after {wait:?}", self.name),
            }
        }
    }

    /// Subscribes every followed session from its last seq.
    async fn subscribe_all(&mut self) {
        let sessions: Vec<Value> =
            self.views.iter().map(|(id, v)| json!({ "sessionId": id, "lastSeq": v.last })).collect();
        self.ws.send(json!({ "type": "chat.subscribe", "sessions": sessions })).await;
    }

    /// Closes the socket (if still open), moves to `ws` and resumes every
    /// followed session by its last seq; returns once every ack arrived.
    async fn hop(&mut self, ws: Ws) {
        let _ = self.ws.stream.close(None).await;
        self.ws = ws;
        let before: HashMap<String, usize> = self.views.iter().map(|(id, v)| (id.clone(), v.acks.len())).collect();
        self.subscribe_all().await;
        self.pump_until(|t| t.views.iter().all(|(id, v)| v.acks.len() > before[id])).await;
    }

    /// The ack of `session` received last.
    fn last_ack(&self, session: &str) -> &Value {
        self.view(session).acks.last().expect("an ack")
    }
}

/// The checker itself: these tests are only as strict as [`View`].
#[test]
fn the_client_side_checker_rejects_duplicates_and_unannounced_gaps() {
    let event = |seq: u64, id: &str| json!({ "kind": "stream_delta", "seq": seq, "id": id });
    let truncated = json!({ "kind": "chat_subscribed", "replayTruncated": true });
    let fails = |frames: Vec<Value>| {
        let mut view = View::new("check", 0);
        frames.iter().any(|frame| view.check(frame).is_err())
    };
    assert!(!fails(vec![event(1, "a"), event(2, "b"), truncated.clone(), event(9, "c")]));
    assert!(fails(vec![event(1, "a"), event(1, "b")]), "duplicate seq");
    assert!(fails(vec![event(2, "a"), event(1, "b")]), "out of order");
    assert!(fails(vec![event(1, "a"), event(3, "b")]), "unannounced gap");
    assert!(fails(vec![truncated.clone(), event(3, "a"), event(5, "b")]), "one announcement covers one gap");
    assert!(fails(vec![event(1, "a"), truncated, event(7, "a")]), "the same event twice under two seqs");
}

// ------------------------------------------------------------ hopping tab

/// Runs, each with 3 hops; events per run (plus `stream_end` and `complete`).
const HOP_RUNS: u64 = 20;
const HOP_EVENTS: u64 = 56;
const HOP_INTERVAL_MS: u64 = 8;
/// Hops happen once the tab saw at most this many of the run's events, so at
/// least 38 events (about 300 ms) remain: the run is still going when the tab
/// comes back (an ended run is history, not replay) even when the tab reads
/// late on a loaded machine. A reconnect itself takes about 10-30 ms here.
const HOP_LATEST: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_hopping_a_b_c_mid_run_sees_every_seq_once_and_one_complete() {
    let redis = redis_url();
    let nodes = [
        cluster_node(&redis, &unique("hop-a"), |_| {}).await,
        cluster_node(&redis, &unique("hop-b"), |_| {}).await,
        cluster_node(&redis, &unique("hop-c"), |_| {}).await,
    ];
    let token = nodes[0].token(&user());
    let session = nodes[0].create_session(&token, "script").await;
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut first = 1;
    for run in 0..HOP_RUNS {
        let start = (run % 3) as usize;
        let mut hops: Vec<u64> = (0..3).map(|_| rng.random_range(1..=HOP_LATEST)).collect();
        hops.sort_unstable();
        let ctx = format!("seed {seed}, run {run} sent on node {start}, hops after events {hops:?}");
        let mut tab = Tab::new(&format!("hopping tab ({ctx})"), nodes[start].connect(&token).await);
        tab.follow(&session, first - 1);
        tab.ws.send_chat(&session, &paced(HOP_EVENTS, HOP_INTERVAL_MS)).await;
        for (i, hop) in hops.iter().enumerate() {
            let seen = first - 1 + hop;
            tab.pump_until(|t| t.view(&session).last >= seen).await;
            let run_id = tab.view(&session).events[0]["runId"].clone();
            let last = tab.view(&session).last;
            tab.hop(nodes[(start + i + 1) % 3].connect(&token).await).await;
            let ack = tab.last_ack(&session);
            assert_eq!(ack["isProcessing"], true, "{ctx}: the run ended before the tab was back: {ack}");
            assert_eq!(ack["replayTruncated"], false, "{ctx}: {ack}");
            assert_eq!(ack["runId"], run_id, "{ctx}: {ack}");
            assert!(ack["lastSeq"].as_u64().unwrap() >= last, "{ctx}: ack behind the tab's cursor {last}: {ack}");
        }
        tab.pump_until(|t| !t.view(&session).completes.is_empty()).await;
        tab.ws.expect_silence(Duration::from_millis(50)).await;
        let view = tab.view(&session);
        assert!(tab.errors.is_empty(), "{ctx}: {:?}", tab.errors);
        assert_eq!(view.gaps, 0, "{ctx}");
        assert_eq!(view.completes.len(), 1, "{ctx}");
        assert_eq!(view.events.len() as u64, HOP_EVENTS + 2, "{ctx}: {:?}", seqs(&view.events));
        let complete = view.events.last().unwrap();
        assert_eq!(complete["kind"], "complete", "{ctx}");
        assert_eq!(complete["exitCode"], 0, "{ctx}: {complete}");
        assert!(view.events.iter().all(|e| e["runId"] == complete["runId"]), "{ctx}: events of another run");
        first = view.last + 1;
    }
}

// ------------------------------------------------------------ racing sends

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_chat_send_start_exactly_one_run_each_round() {
    const ROUNDS: usize = 100;
    let redis = redis_url();
    // Two sends per round from one user, far above the default --max-sends-per-minute.
    let sends = |c: &mut Config| c.max_sends_per_minute = 1_000_000;
    let a = cluster_node(&redis, &unique("race-a"), sends).await;
    let b = cluster_node(&redis, &unique("race-b"), sends).await;
    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let mut on_a = Tab::new("tab on A", a.connect(&token).await);
    let mut on_b = Tab::new("tab on B", b.connect(&token).await);
    for tab in [&mut on_a, &mut on_b] {
        tab.follow(&session, 0);
        tab.subscribe_all().await;
        tab.pump_until(|t| t.view(&session).acks.len() == 1).await;
    }
    // Two events 120 ms apart: the run outlasts the loser's trip to Redis by far
    // (even on a loaded CI machine), so two winners in a round would mean two
    // runs of the session at once.
    let script = paced(2, 120);
    let mut wins = [0usize; 2];
    for round in 0..ROUNDS {
        let errors_before = [on_a.errors.len(), on_b.errors.len()];
        let events_before = on_a.view(&session).events.len();
        if round % 2 == 0 {
            tokio::join!(on_a.ws.send_chat(&session, &script), on_b.ws.send_chat(&session, &script));
        } else {
            tokio::join!(on_b.ws.send_chat(&session, &script), on_a.ws.send_chat(&session, &script));
        }
        let done = |t: &Tab| t.view(&session).completes.len() == round + 1;
        tokio::join!(on_a.pump_until(done), on_b.pump_until(done));
        let refused: Vec<(usize, Value)> = [&on_a, &on_b]
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.errors[errors_before[i]..].iter().map(move |e| (i, e.clone())))
            .collect();
        assert_eq!(refused.len(), 1, "round {round}: want exactly one refused send, got {refused:?}");
        let (loser, error) = &refused[0];
        assert_eq!(error["code"], "RUN_IN_PROGRESS", "round {round}: {error}");
        assert_eq!(error["sessionId"], session.as_str(), "round {round}: {error}");
        wins[1 - loser] += 1;
        let run = &on_a.view(&session).events[events_before..];
        assert_eq!(seqs(run), seqs(&on_b.view(&session).events[events_before..]), "round {round}");
        assert_eq!(run.len(), 4, "round {round}: one run of 2 deltas, stream_end, complete: {run:#?}");
        assert!(run.iter().all(|e| e["runId"] == run[0]["runId"]), "round {round}: two runs: {run:#?}");
        assert_eq!(run[3]["exitCode"], 0, "round {round}: {}", run[3]);
    }
    // No late second run of any round.
    on_a.ws.expect_silence(Duration::from_millis(300)).await;
    on_b.ws.expect_silence(Duration::from_millis(10)).await;
    eprintln!("wins: node A {}, node B {}", wins[0], wins[1]);
}

// ------------------------------------------------------------ Redis restart

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_leaves_every_tab_contiguous_or_told_and_seq_moves_on() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    let small_margin = |c: &mut Config| c.replay_max_events = 100;
    let a = cluster_node(&redis.url(), &unique("rr-a"), small_margin).await;
    let b = cluster_node(&redis.url(), &unique("rr-b"), small_margin).await;
    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let mut sender = Tab::new("sender on owner A", a.connect(&token).await);
    sender.follow(&session, 0);
    sender.ws.send_chat(&session, &paced(60, 20)).await;
    sender.pump_until(|t| t.view(&session).last >= 3).await;
    let mut beside = Tab::new("second tab on owner A", a.connect(&token).await);
    let mut remote = Tab::new("tab on B", b.connect(&token).await);
    for tab in [&mut beside, &mut remote] {
        tab.follow(&session, 0);
        tab.subscribe_all().await;
        tab.pump_until(|t| t.view(&session).acks.len() == 1).await;
        assert_eq!(tab.last_ack(&session)["isProcessing"], true);
    }
    sender.pump_until(|t| t.view(&session).last >= 10).await;
    assert!(sender.view(&session).completes.is_empty(), "the run must still be going when Redis goes");

    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().expect("private redis-server restarts");

    for tab in [&mut sender, &mut beside, &mut remote] {
        tab.pump_until(|t| !t.view(&session).completes.is_empty()).await;
    }
    let complete = sender.view(&session).completes[0].clone();
    let gaps: Vec<usize> = [&sender, &beside, &remote].iter().map(|t| t.view(&session).gaps).collect();
    eprintln!("the run ended with {complete}; announced gaps per tab {gaps:?}");
    for tab in [&mut sender, &mut beside, &mut remote] {
        tab.ws.expect_silence(Duration::from_millis(300)).await;
        let view = tab.view(&session);
        assert!(tab.errors.is_empty(), "{}: {:?}", tab.name, tab.errors);
        assert_eq!(view.completes.len(), 1, "{}", tab.name);
        assert_eq!(view.events.last().unwrap()["kind"], "complete", "{}", tab.name);
        assert_eq!(view.completes[0]["seq"], complete["seq"], "{}", tab.name);
        assert!(view.events.iter().all(|e| e["runId"] == complete["runId"]), "{}: another run's events", tab.name);
    }
    let ok = complete["exitCode"] == 0 && complete["success"] == true;
    let ended = complete["exitCode"] == 1 && complete["error"].is_string();
    assert!(ok || ended, "neither finished nor ended cleanly: {complete}");

    // The session takes a new run, above every seq anyone saw.
    let top = complete["seq"].as_u64().unwrap();
    remote.ws.send_chat(&session, "after the restart").await;
    for tab in [&mut sender, &mut beside, &mut remote] {
        tab.pump_until(|t| t.view(&session).completes.len() == 2).await;
        let next = tab.view(&session).after(top);
        assert_eq!(next[0]["seq"].as_u64().unwrap(), top + 1, "{}: {next:#?}", tab.name);
        assert_eq!(next.last().unwrap()["exitCode"], 0, "{}", tab.name);
    }
}

/// Redis comes back empty while a run is between two events: until its owner re-took its
/// vanished lock the session looks idle, and a `chat.send` on another node must still not start
/// a second run beside the live one (the chaos soak's bug D: the first run was then fenced and
/// never completed, and clients saw seqs twice with different content).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_comes_back_empty_no_second_run_starts_beside_the_live_one() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    // Renewals (the owner's way back to its lock) come every 2 s.
    let lease = |c: &mut Config| c.run_lease = Duration::from_secs(6);
    let a = cluster_node(&redis.url(), &unique("lost-a"), lease).await;
    let b = cluster_node(&redis.url(), &unique("lost-b"), lease).await;
    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let mut owner = Tab::new("sender on A", a.connect(&token).await);
    owner.follow(&session, 0);
    let plan = json!({ "events": 3, "intervalMs": 2500 });
    owner.ws.send_chat(&session, &plan.to_string()).await;
    owner.pump_until(|t| !t.view(&session).events.is_empty()).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().expect("private redis-server restarts");

    // Meanwhile a tab opened on the other node is told the truth: the run is going on (its
    // subscribe waits for the owner to re-take its lock rather than answer "idle") ...
    let watch = async {
        let mut watcher = Tab::new("fresh tab on B", b.connect(&token).await);
        watcher.follow(&session, 0);
        // Until the node's pub/sub is back, a subscribe is refused (BACKEND_UNAVAILABLE).
        loop {
            watcher.subscribe_all().await;
            watcher.pump_until(|t| !t.view(&session).acks.is_empty() || !t.errors.is_empty()).await;
            if let Some(error) = watcher.errors.pop() {
                assert_eq!(error["code"], "BACKEND_UNAVAILABLE", "{error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            break watcher.last_ack(&session).clone();
        }
    };
    // ... and a send there is refused (BACKEND_UNAVAILABLE while it waits for a live owner,
    // RUN_IN_PROGRESS once the owner re-took its lock): it never starts a second run.
    let sends = async {
        let mut other = b.connect(&token).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut answers: Vec<String> = Vec::new();
        while answers.last().is_none_or(|code| code != "RUN_IN_PROGRESS") {
            assert!(Instant::now() < deadline, "no RUN_IN_PROGRESS in time: {answers:?}");
            other.send_chat(&session, "a second run").await;
            let frame = other.recv_reply().await;
            assert_eq!(frame["kind"], "protocol_error", "a second run started beside the live one: {frame}");
            let code = frame["code"].as_str().unwrap_or_default().to_string();
            assert!(["BACKEND_UNAVAILABLE", "RUN_IN_PROGRESS"].contains(&code.as_str()), "{frame}");
            answers.push(code);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        answers
    };
    let (ack, answers) = tokio::join!(watch, sends);
    assert_eq!(ack["isProcessing"], true, "{ack}");
    assert_eq!(ack["runId"], owner.view(&session).events[0]["runId"], "{ack}");
    eprintln!("answers on B after the restart: {answers:?}");

    // The live run goes on and ends once, with all of its events.
    owner.pump_until(|t| !t.view(&session).completes.is_empty()).await;
    let view = owner.view(&session);
    let complete = &view.completes[0];
    assert_eq!(complete["exitCode"], 0, "{complete}");
    assert!(view.events.iter().all(|e| e["runId"] == complete["runId"]), "another run's events: {:#?}", view.events);
    let deltas = view.events.iter().filter(|e| e["kind"] == "stream_delta").count();
    assert_eq!(deltas, 3);
    let history = a.history_complete(&token, &session, complete["seq"].as_u64()).await;
    let prompts: Vec<&Value> = history.iter().filter(|m| m["role"] == "user").collect();
    assert_eq!(prompts.len(), 1, "{history:#?}");
    assert_eq!(prompts[0]["content"], plan.to_string());
}

// ------------------------------------------------------------ SIGTERM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_with_1012_they_resume_elsewhere_and_runs_end_cleanly() {
    const GRACE: Duration = Duration::from_secs(2);
    let redis = redis_url();
    let other = cluster_node(&redis, &unique("stays"), |_| {}).await;
    let doomed = common::spawn_node(
        &redis,
        &unique("drained"),
        &other.workspaces,
        &["--drain-grace", "2s", "--run-lease", "3s"],
    );
    doomed.wait_ready().await.expect("node ready");
    let token = mint(&user(), Duration::from_secs(600));
    // `short` finishes within the grace, `long` outlives it.
    let short = other.create_session(&token, "script").await;
    let long = other.create_session(&token, "script").await;
    let mut sender = Tab::new("sender on the drained node", doomed.connect(&token).await);
    let mut beside = Tab::new("second tab on the drained node", doomed.connect(&token).await);
    let mut watcher = Tab::new("watcher on the other node", other.connect(&token).await);
    for tab in [&mut sender, &mut beside, &mut watcher] {
        tab.follow(&short, 0);
        tab.follow(&long, 0);
    }
    sender.ws.send_chat(&short, &paced(50, 20)).await;
    sender.ws.send_chat(&long, &paced(3000, 20)).await;
    for tab in [&mut beside, &mut watcher] {
        tab.subscribe_all().await;
        tab.pump_until(|t| t.views.values().all(|v| v.acks.len() == 1)).await;
    }
    sender.pump_until(|t| t.views.values().all(|v| v.last >= 3)).await;

    let term = Instant::now();
    doomed.sigterm().unwrap();
    for tab in [&mut sender, &mut beside] {
        assert_eq!(tab.until_closed(Duration::from_secs(3)).await, Some(1012), "{}", tab.name);
        tab.hop(other.connect(&token).await).await;
        for id in [&short, &long] {
            let ack = tab.last_ack(id);
            assert_eq!(ack["isProcessing"], true, "{}: {ack}", tab.name);
            assert_eq!(ack["replayTruncated"], false, "{}: {ack}", tab.name);
        }
    }
    for tab in [&mut sender, &mut beside, &mut watcher] {
        tab.pump_until(|t| t.views.values().all(|v| !v.completes.is_empty())).await;
    }
    let ended_after = term.elapsed();
    assert!(ended_after < GRACE + Duration::from_secs(3), "the long run ended {ended_after:?} after SIGTERM");
    let status = doomed.exited(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(0), "drained process exit: {status:?}");

    for tab in [&mut sender, &mut beside, &mut watcher] {
        assert!(tab.errors.is_empty(), "{}: {:?}", tab.name, tab.errors);
        for id in [&short, &long] {
            let view = tab.view(id);
            assert_eq!(view.gaps, 0, "{}", view.who);
            assert_eq!(view.completes.len(), 1, "{}", view.who);
            assert_eq!(view.events[0]["seq"], 1, "{}", view.who);
        }
        let done = &tab.view(&short).completes[0];
        assert_eq!((done["exitCode"].as_i64(), done["aborted"].as_bool()), (Some(0), Some(false)), "{done}");
        assert_eq!(tab.view(&short).events.len(), 52, "{}", tab.name);
        let cut = &tab.view(&long).completes[0];
        assert_eq!(cut["aborted"], true, "{cut}");
        assert_eq!(cut["success"], false, "{cut}");
        assert_eq!(cut["exitCode"], 1, "{cut}");
        assert_eq!(cut["error"], "node draining", "{cut}");
        tab.ws.expect_silence(Duration::from_millis(100)).await;
    }
    for id in [&short, &long] {
        assert_eq!(seqs(&sender.view(id).events), seqs(&watcher.view(id).events));
        assert_eq!(seqs(&beside.view(id).events), seqs(&watcher.view(id).events));
    }

    // The other node takes the next run; seq continues.
    let top = watcher.view(&long).last;
    watcher.ws.send_chat(&long, "after the drain").await;
    watcher.pump_until(|t| t.view(&long).completes.len() == 2).await;
    let next = watcher.view(&long).after(top);
    assert_eq!(next[0]["seq"].as_u64(), Some(top + 1));
    assert_eq!(next.last().unwrap()["exitCode"], 0);
}

// ------------------------------------------------------------ key expiry

/// Every key left in the private Redis, with its PTTL.
async fn all_keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(String, i64)> {
    let names = common::key_names(conn).await;
    let mut out = Vec::new();
    for name in names {
        let ttl: i64 = conn.pttl(&name).await.unwrap();
        if ttl != -2 {
            out.push((name, ttl));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_finished_runs_leave_only_seq_counters_in_redis() {
    const SESSIONS: usize = 20;
    const RUNS: usize = 50;
    const RETENTION: Duration = Duration::from_secs(1);
    let redis = PrivateRedis::start().expect("private redis-server");
    // A short lease too: an append's batch id (its retry guard) lives one lease.
    // A thousand runs of one user: far above the default --max-sends-per-minute.
    let short = |c: &mut Config| {
        c.replay_retention = RETENTION;
        c.run_lease = Duration::from_secs(1);
        c.max_sends_per_minute = 1_000_000;
    };
    let a = cluster_node(&redis.url(), &unique("keys-a"), short).await;
    let b = cluster_node(&redis.url(), &unique("keys-b"), short).await;
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let who = user();
    let token = a.token(&who);
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(a.create_session(&token, "script").await);
    }
    let baseline: Vec<(String, i64)> = all_keys(&mut conn).await;
    let baseline_len = baseline.iter().filter(|(k, _)| k != keys::SWEEP_LOCK).count();

    // Each session alternates its runs between the nodes; sessions run side by side.
    let started = Instant::now();
    let nodes: [&TestNode; 2] = [&a, &b];
    let lasts = futures_util::future::join_all(sessions.iter().enumerate().map(|(i, session)| {
        let token = &token;
        async move {
            let mut tabs = Vec::new();
            for (n, node) in nodes.iter().enumerate() {
                let mut tab = Tab::new(&format!("session {i} on node {n}"), node.connect(token).await);
                tab.follow(session, 0);
                tab.subscribe_all().await;
                tab.pump_until(|t| t.view(session).acks.len() == 1).await;
                tabs.push(tab);
            }
            for run in 0..RUNS {
                let tab = &mut tabs[(i + run) % 2];
                tab.ws.send_chat(session, &format!("run {run}")).await;
                tab.pump_until(|t| t.view(session).completes.len() == run + 1).await;
            }
            for tab in &mut tabs {
                tab.pump_until(|t| t.view(session).completes.len() == RUNS).await;
                assert!(tab.errors.is_empty(), "{}: {:?}", tab.name, tab.errors);
                assert_eq!(tab.view(session).gaps, 0);
            }
            tabs[0].view(session).last
        }
    }))
    .await;
    let peak: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    eprintln!("{} runs in {:?}; {peak} keys right after the last one", SESSIONS * RUNS, started.elapsed());

    // Past the retention (and the lease), only the seq counters may remain.
    tokio::time::sleep(RETENTION).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let size: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        if size as usize <= baseline_len + SESSIONS + 2 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = all_keys(&mut conn).await;
    // What remains, and why: each session's seq counter `cg:{S}:seq`. Seq is
    // per session and never reused, so the counter outlives its runs; it
    // carries an idle expiry (24 h) after which the next run restores it from
    // SQL's high-water mark. Besides: the sweeper's per-period lock `cg:sweep`
    // (a few hundred ms), the user's `chat.send` count of the current minute
    // (it expires with its window), and whatever the baseline had.
    let mut counters = 0;
    let mut unexpected = Vec::new();
    for (key, ttl) in &left {
        if let Some(i) = sessions.iter().position(|s| *key == keys::seq(s)) {
            counters += 1;
            assert!(*ttl > 0 && *ttl <= 24 * 3600 * 1000, "{key} must expire when idle, PTTL {ttl}");
            let value: u64 = conn.get(key).await.unwrap();
            assert_eq!(value, lasts[i], "{key} holds the session's last seq");
        } else if *key == keys::user_sends(&who) {
            assert!(*ttl > 0 && *ttl <= 60_000, "{key} must expire with its window, PTTL {ttl}");
        } else if key != keys::SWEEP_LOCK && !baseline.iter().any(|(k, _)| k == key) {
            unexpected.push((key.clone(), *ttl));
        }
    }
    assert!(unexpected.is_empty(), "keys of finished runs left behind: {unexpected:?}");
    assert_eq!(counters, SESSIONS, "{left:?}");
    assert!(left.len() <= baseline_len + SESSIONS + 2, "{left:?}");
}

// ------------------------------------------------------------ fencing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_owner_appends_nothing_more_and_a_sweeper_ends_its_run() {
    let redis = redis_url();
    let lease = |c: &mut Config| c.run_lease = Duration::from_millis(1500);
    let a = cluster_node(&redis, &unique("fenced"), lease).await;
    let b = cluster_node(&redis, &unique("sweeps"), lease).await;
    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let mut owner = Tab::new("tab on the owner", a.connect(&token).await);
    let mut watcher = Tab::new("tab on another node", b.connect(&token).await);
    owner.follow(&session, 0);
    watcher.follow(&session, 0);
    owner.ws.send_chat(&session, &paced(500, 20)).await;
    owner.pump_until(|t| t.view(&session).last >= 5).await;
    watcher.subscribe_all().await;
    watcher.pump_until(|t| t.view(&session).acks.len() == 1).await;
    let run_id = owner.view(&session).events[0]["runId"].clone();

    // The lock vanishes behind the owner's back (its owner record stays).
    let mut conn = redis::Client::open(redis.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let deleted: i64 = conn.del(keys::run(&session)).await.unwrap();
    assert_eq!(deleted, 1);
    let cut = Instant::now();
    for tab in [&mut owner, &mut watcher] {
        tab.pump_until(|t| !t.view(&session).completes.is_empty()).await;
    }
    let took = cut.elapsed();
    assert!(took < Duration::from_millis(1500) + Duration::from_secs(5), "ended {took:?} after the lock went");
    let complete = owner.view(&session).completes[0].clone();
    assert_eq!(complete["error"], "run owner lost", "{complete}");
    assert_eq!(complete["exitCode"], 1, "{complete}");
    assert_eq!(complete["success"], false, "{complete}");
    assert_eq!(complete["runId"], run_id, "{complete}");
    // Nothing of the run after its complete: the owner stopped (it would emit every 20 ms).
    for tab in [&mut owner, &mut watcher] {
        tab.ws.expect_silence(Duration::from_millis(800)).await;
        let view = tab.view(&session);
        assert!(tab.errors.is_empty(), "{}: {:?}", tab.name, tab.errors);
        assert_eq!(view.completes.len(), 1, "{}", tab.name);
        assert_eq!(view.events.last().unwrap()["seq"], complete["seq"], "{}", tab.name);
    }
    assert_eq!(seqs(&watcher.view(&session).events), seqs(&owner.view(&session).events));
    let top = complete["seq"].as_u64().unwrap();
    // And nothing reached Redis either: the stream ends with that complete, the counter with its seq.
    let last: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(keys::events(&session))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(last[0].0, format!("{top}-0"));
    let counter: u64 = conn.get(keys::seq(&session)).await.unwrap();
    assert_eq!(counter, top);

    // The session takes a new run from any node; seq continues.
    watcher.ws.send_chat(&session, "after the fence").await;
    for tab in [&mut owner, &mut watcher] {
        tab.pump_until(|t| t.view(&session).completes.len() == 2).await;
        let next = tab.view(&session).after(top);
        assert_eq!(next[0]["seq"].as_u64(), Some(top + 1), "{}", tab.name);
        assert_eq!(next.last().unwrap()["exitCode"], 0, "{}", tab.name);
    }
}

/// docs/cluster.md §Owner death and the sweeper: the node that ends an orphaned
/// run copies what the owner had not written to SQL, so history stays whole
/// and ends, like the live stream, with the run's one `complete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_run_s_terminal_complete_is_kept_in_history() {
    let redis = redis_url();
    let lease = |c: &mut Config| c.run_lease = Duration::from_millis(1500);
    let a = cluster_node(&redis, &unique("orphaned"), lease).await;
    let b = cluster_node(&redis, &unique("reaper"), lease).await;
    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let mut owner = Tab::new("tab on the owner", a.connect(&token).await);
    owner.follow(&session, 0);
    owner.ws.send_chat(&session, &paced(500, 20)).await;
    owner.pump_until(|t| t.view(&session).last >= 5).await;
    let mut conn = redis::Client::open(redis.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: i64 = conn.del(keys::run(&session)).await.unwrap();
    owner.pump_until(|t| !t.view(&session).completes.is_empty()).await;
    let complete = owner.view(&session).completes[0].clone();
    assert_eq!(complete["error"], "run owner lost", "{complete}");
    let history = b.history_complete(&token, &session, complete["seq"].as_u64()).await;
    assert_eq!(history.last().unwrap()["error"], "run owner lost");
}

/// The owner appended its run's `complete` and died before storing it in SQL: the
/// `saving` marker and the index entry it leaves lead a sweeper to copy the complete.
/// (Killing a node inside that window cannot be timed, so the test puts history and
/// Redis back into the state the dead owner leaves: the complete row gone, the marker set.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_its_owner_died_before_storing_reaches_history() {
    let redis = PrivateRedis::start().expect("private redis-server");
    let lease = |c: &mut Config| c.run_lease = Duration::from_millis(900);
    let a = cluster_node(&redis.url(), &unique("owner"), lease).await;
    let b = cluster_node(&redis.url(), &unique("sweeper"), lease).await;
    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let mut ws = a.connect(&token).await;
    ws.send_chat(&session, "three little words").await;
    let complete = ws.run_events(&session).await.pop().unwrap();
    let seq = complete["seq"].as_u64().unwrap();
    let run_id = complete["runId"].as_str().unwrap().to_string();
    let stored = a.history_complete(&token, &session, Some(seq)).await;

    let pool = sqlx::PgPool::connect(&a.config.database_url).await.unwrap();
    let deleted = sqlx::query("DELETE FROM messages WHERE session_id = $1 AND seq = $2")
        .bind(&session)
        .bind(i64::try_from(seq).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(deleted.rows_affected(), 1);
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = conn.set_ex(keys::saving(&session, &run_id), seq, 60).await.unwrap();
    let _: () = conn.zadd(keys::RUNS_INDEX, json!([session, run_id]).to_string(), 1).await.unwrap();

    let restored = b.history_complete(&token, &session, Some(seq)).await;
    assert_eq!(restored, stored, "the copied complete is the streamed one");
    assert_eq!(restored.last().unwrap()["id"], complete["id"]);
    let marker: bool = conn.exists(keys::saving(&session, &run_id)).await.unwrap();
    assert!(!marker, "the marker is cleared");
    pool.close().await;
}

// ------------------------------------------------------------ Redis Cluster: failover and resharding

/// Sessions per Redis Cluster test: enough that every shard owns some of them.
const CLUSTER_SESSIONS: usize = 6;

/// A private 3-primary, 3-replica Redis Cluster (this test kills or reshards it) and two nodes on it.
async fn nodes_on_a_private_cluster(prefix: &str) -> (PrivateRedisCluster, TestNode, TestNode) {
    let cluster = tokio::task::spawn_blocking(|| PrivateRedisCluster::start(3, 1))
        .await
        .expect("the cluster's start")
        .expect("a private Redis Cluster");
    let seeds = cluster.seed_urls().join(",");
    let a = cluster_node(&seeds, &unique(&format!("{prefix}-a")), |_| {}).await;
    let b = cluster_node(&seeds, &unique(&format!("{prefix}-b")), |_| {}).await;
    (cluster, a, b)
}

/// Starts one paced run per session from a tab on `a` and follows every session from a tab
/// on `b` too; returns both once every run streamed its first events.
async fn runs_on_every_shard(a: &TestNode, b: &TestNode, sessions: &[String], token: &str, prompt: &str) -> [Tab; 2] {
    let mut sender = Tab::new("sender on A", a.connect(token).await);
    let mut watcher = Tab::new("watcher on B", b.connect(token).await);
    for session in sessions {
        sender.follow(session, 0);
        watcher.follow(session, 0);
    }
    watcher.subscribe_all().await;
    watcher.pump_until(|t| t.views.values().all(|v| v.acks.len() == 1)).await;
    for session in sessions {
        sender.ws.send_chat(session, prompt).await;
    }
    sender.pump_until(|t| t.views.values().all(|v| v.last >= 3)).await;
    [sender, watcher]
}

/// Every run ended once, whole or with every gap announced, on both tabs alike, and its
/// history in SQL holds what the sender saw. Returns the announced gaps.
async fn every_run_completes_once(tabs: &mut [Tab; 2], node: &TestNode, token: &str, prompt: &str) -> usize {
    let sessions: Vec<String> = tabs[0].views.keys().cloned().collect();
    for tab in tabs.iter_mut() {
        tab.pump_until(|t| t.views.values().all(|v| !v.completes.is_empty())).await;
        tab.ws.expect_silence(Duration::from_millis(300)).await;
        assert!(tab.errors.is_empty(), "{}: {:?}", tab.name, tab.errors);
    }
    let mut gaps = 0;
    for session in &sessions {
        let [sender, watcher] = [tabs[0].view(session), tabs[1].view(session)];
        for view in [sender, watcher] {
            assert_eq!(view.completes.len(), 1, "{}", view.who);
            assert_eq!(view.events.last().unwrap()["kind"], "complete", "{}", view.who);
            gaps += view.gaps;
        }
        let complete = &sender.completes[0];
        assert_eq!(watcher.completes[0], *complete, "{session}: the tabs saw different ends");
        assert_eq!(complete["exitCode"], 0, "{session}: the run did not finish: {complete}");
        if sender.gaps == 0 {
            let history = node.history_complete(token, session, complete["seq"].as_u64()).await;
            common::assert_history_matches(&history, prompt, &sender.events);
        }
    }
    gaps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_primary_killed_mid_run_fails_over_and_every_run_completes_once() {
    let (mut cluster, a, b) = nodes_on_a_private_cluster("failover").await;
    let token = a.token(&user());
    let mut sessions = Vec::new();
    for _ in 0..CLUSTER_SESSIONS {
        sessions.push(a.create_session(&token, "script").await);
    }
    let prompt = paced(150, 20);
    let mut tabs = runs_on_every_shard(&a, &b, &sessions, &token, &prompt).await;

    let victim = keys::run(&sessions[0]);
    let slot = keys::slot(&victim);
    let on_victim = sessions
        .iter()
        .filter(|s| cluster.primary_for_key(&keys::run(s)).ok() == cluster.primary_for_key(&victim).ok())
        .count();
    let killed = cluster.kill_primary_of(&victim).expect("a primary to kill");
    let (cluster, failover) = tokio::task::spawn_blocking(move || {
        let took = cluster.wait_for_failover(slot);
        (cluster, took)
    })
    .await
    .unwrap();
    let failover = failover.expect("the replica takes over");
    let recovered = Instant::now();
    let gaps = every_run_completes_once(&mut tabs, &a, &token, &prompt).await;
    eprintln!(
        "primary {killed} killed with {on_victim} of {CLUSTER_SESSIONS} sessions on it; replica promoted in {failover:?}; \
         runs done {:?} after; announced gaps {gaps}",
        recovered.elapsed()
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_live_sessions_migrated_mid_run_keep_every_run_whole() {
    let (cluster, a, b) = nodes_on_a_private_cluster("reshard").await;
    let token = a.token(&user());
    let mut sessions = Vec::new();
    for _ in 0..CLUSTER_SESSIONS {
        sessions.push(a.create_session(&token, "script").await);
    }
    let prompt = paced(150, 20);
    let mut tabs = runs_on_every_shard(&a, &b, &sessions, &token, &prompt).await;

    // Each session's slot moves to the next primary while its run streams (keys, then ownership),
    // as `redis-cli --cluster reshard` moves them.
    let primaries: Vec<u16> =
        cluster.nodes().unwrap().iter().filter(|n| n.role == Role::Primary).map(|n| n.port).collect();
    let slots: Vec<u16> = sessions.iter().map(|s| keys::slot(&keys::run(s))).collect();
    let cluster = std::sync::Arc::new(cluster);
    let moving = cluster.clone();
    let took = tokio::task::spawn_blocking(move || {
        let mut took = Vec::new();
        for slot in slots {
            let from = moving.primary_for_slot(slot).expect("the slot's owner");
            let to = primaries[(primaries.iter().position(|p| *p == from).unwrap() + 1) % primaries.len()];
            took.push(moving.migrate_slot(slot, to).expect("the slot moves"));
            std::thread::sleep(Duration::from_millis(100));
        }
        took
    })
    .await
    .unwrap();
    for session in &sessions {
        assert!(tabs[0].view(session).completes.is_empty(), "{session}: the run ended before its slot moved");
    }
    let gaps = every_run_completes_once(&mut tabs, &a, &token, &prompt).await;
    eprintln!("{CLUSTER_SESSIONS} slots migrated mid-run in {took:?}; announced gaps {gaps}");
    assert_eq!(gaps, 0, "a migration loses nothing: no gap to announce");
}

// ------------------------------------------------------------ Redis Sentinel: the primary fails over

/// Two nodes on a private Sentinel setup (a primary, a replica, 3 sentinels) with `--redis-mode sentinel`.
async fn nodes_on_a_private_sentinel_setup(prefix: &str) -> (PrivateRedisSentinel, TestNode, TestNode) {
    let setup = tokio::task::spawn_blocking(PrivateRedisSentinel::start)
        .await
        .expect("the setup's start")
        .expect("a private Sentinel setup");
    let sentinels = setup.sentinel_urls().join(",");
    let master = setup.master_name().to_string();
    let sentinel_mode = |c: &mut Config| {
        c.redis_mode = Topology::Sentinel;
        c.redis_sentinel_master = master.clone();
    };
    let a = cluster_node(&sentinels, &unique(&format!("{prefix}-a")), sentinel_mode).await;
    let b = cluster_node(&sentinels, &unique(&format!("{prefix}-b")), sentinel_mode).await;
    (setup, a, b)
}

/// Runs stream on both nodes while the sentinels move the primary (`fail`: kill -9 of the
/// primary, or `SENTINEL FAILOVER` with the old primary demoted alive); every run ends once,
/// every gap is announced, and the session takes a new run on the new primary.
async fn runs_survive_a_sentinel_failover(prefix: &str, kill: bool) {
    let (mut setup, a, b) = nodes_on_a_private_sentinel_setup(prefix).await;
    let token = a.token(&user());
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(a.create_session(&token, "script").await);
    }
    let prompt = paced(150, 20);
    let mut tabs = runs_on_every_shard(&a, &b, &sessions, &token, &prompt).await;
    let old = setup.primary().expect("a primary");
    let (setup_back, took) = tokio::task::spawn_blocking(move || {
        let took = if kill { setup.kill_primary() } else { setup.failover() };
        (setup, took)
    })
    .await
    .unwrap();
    setup = setup_back;
    let took = took.expect("the sentinels promote the replica");
    let gaps = every_run_completes_once(&mut tabs, &a, &token, &prompt).await;
    eprintln!(
        "primary {old} {} under {} live runs; new primary {} named in {took:?}; announced gaps {gaps}",
        if kill { "killed" } else { "failed over" },
        sessions.len(),
        setup.primary().unwrap()
    );
    // The next run goes to the new primary from both nodes.
    let top = tabs[0].view(&sessions[0]).last;
    tabs[1].ws.send_chat(&sessions[0], "after the failover").await;
    for tab in tabs.iter_mut() {
        tab.pump_until(|t| t.view(&sessions[0]).completes.len() == 2).await;
        let next = tab.view(&sessions[0]).after(top);
        assert_eq!(next.last().unwrap()["exitCode"], 0, "{}", tab.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_primary_killed_mid_run_is_followed_and_every_run_completes_once() {
    runs_survive_a_sentinel_failover("sentinel-kill", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_with_the_old_primary_alive_is_followed_and_every_run_completes_once() {
    runs_survive_a_sentinel_failover("sentinel-failover", false).await;
}
