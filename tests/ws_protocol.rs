//! The `/ws` protocol of docs/protocol.md §WebSocket over real sockets: runs, seq across runs,
//! abort, fan-out to every tab, resume by `lastSeq`, replay truncation, tool
//! approvals, `session_upserted`, `cwd` confinement, runs outliving sockets.
//! Every test runs against SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{Db, TestNode, Ws, assert_contiguous, assert_protocol_error, kinds, seqs, user};
use rand::{RngExt, SeedableRng, rngs::SmallRng};
use serde_json::{Value, json};

/// A paced script run: `n` deltas, `ms` apart.
fn paced(n: u64, ms: u64) -> String {
    format!(r#"{{"events":{n},"intervalMs":{ms}}}"#)
}

fn permission_script(timeout_ms: u64, events: u64) -> String {
    json!({
        "permission": { "toolName": "Bash", "input": { "command": "ls" }, "timeoutMs": timeout_ms },
        "events": events,
    })
    .to_string()
}

async fn abort(ws: &mut Ws, session: &str) {
    ws.send(json!({ "type": "chat.abort", "sessionId": session })).await;
}

/// The next `chat_subscribed` for `session` (skipping notices); panics on anything else.
async fn ack(ws: &mut Ws, session: &str) -> Value {
    let frame = ws.recv_reply().await;
    assert_eq!(frame["kind"], "chat_subscribed", "{frame}");
    assert_eq!(frame["sessionId"], session, "{frame}");
    frame
}

/// Frames of the session with a seq, until one with seq >= `seq` (inclusive).
async fn read_until_seq(ws: &mut Ws, session: &str, seq: u64) -> Vec<Value> {
    let frames = ws.recv_until(|v| v["sessionId"] == session && v["seq"].as_u64().is_some_and(|s| s >= seq)).await;
    frames.into_iter().filter(|v| v["sessionId"] == session && v["seq"].is_u64()).collect()
}

/// Polls `GET …/running` until the user has no run.
async fn wait_idle(node: &TestNode, token: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = node.request("GET", "/api/providers/sessions/running", token, None).await;
        assert_eq!(status, 200);
        if body["data"]["sessions"].as_array().is_some_and(Vec::is_empty) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "runs never ended: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[track_caller]
fn assert_one_terminal_complete(events: &[Value]) {
    let completes = events.iter().filter(|v| v["kind"] == "complete").count();
    assert_eq!(completes, 1, "{events:#?}");
    assert_eq!(events.last().unwrap()["kind"], "complete", "complete must be the run's last event");
}

async fn echo_run_streams_in_order_then_complete(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, "hello big world").await;
    let events = ws.run_events(&id).await;
    assert_eq!(kinds(&events), ["stream_delta", "stream_delta", "stream_delta", "stream_end", "text", "complete"]);
    assert_contiguous(&events, 1);
    let run_id = events[0]["runId"].as_str().expect("runId").to_string();
    let mut ids = std::collections::HashSet::new();
    for event in &events {
        assert_eq!(event["sessionId"], id.as_str(), "{event}");
        assert_eq!(event["provider"], "script", "{event}");
        assert_eq!(event["runId"], run_id.as_str(), "{event}");
        assert!(event["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
        assert!(ids.insert(event["id"].as_str().expect("id").to_string()), "duplicate id {event}");
    }
    let deltas: Vec<&str> = events[..3].iter().map(|v| v["content"].as_str().unwrap()).collect();
    assert_eq!(deltas, ["hello", " big", " world"]);
    assert_eq!(
        (events[4]["role"].as_str(), events[4]["content"].as_str()),
        (Some("assistant"), Some("hello big world"))
    );
    let complete = &events[5];
    assert_eq!((complete["exitCode"].as_i64(), complete["success"].as_bool()), (Some(0), Some(true)));
    assert_eq!(complete["aborted"], false);
    // Nothing of the run after its complete.
    if let Some(Ok(frame)) = ws.try_recv(Duration::from_millis(300)).await {
        assert_eq!(frame["kind"], "session_upserted", "frame after complete: {frame}");
    }

    // The script's other shapes: failure and exit code.
    ws.send_chat(&id, r#"{"events":2,"fail":"boom"}"#).await;
    let events = ws.run_events(&id).await;
    assert_eq!(kinds(&events), ["stream_delta", "stream_delta", "stream_end", "error", "complete"]);
    assert_eq!(events[0]["content"], "chunk 1");
    assert_eq!(events[3]["content"], "boom");
    assert_eq!((events[4]["exitCode"].as_i64(), events[4]["success"].as_bool()), (Some(1), Some(false)));
    ws.send_chat(&id, r#"{"exitCode":7,"events":1,"payloadBytes":16,"stamp":true}"#).await;
    let events = ws.run_events(&id).await;
    assert_eq!(kinds(&events), ["stream_delta", "stream_end", "complete"]);
    assert_eq!(events[0]["content"], "chunk 1.........");
    assert!(events[0]["emittedAtUs"].as_u64().is_some_and(|us| us > 1_600_000_000_000_000), "{}", events[0]);
    assert_eq!(events[2]["exitCode"], 7);
}

async fn second_run_continues_the_seq(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, "a b").await;
    let first = ws.run_events(&id).await;
    assert_contiguous(&first, 1);
    ws.send_chat(&id, "c d e").await;
    let second = ws.run_events(&id).await;
    assert_contiguous(&second, 6);
    assert_ne!(first[0]["runId"], second[0]["runId"], "each run has its own runId");
    // From another socket too.
    let mut other = node.connect(&token).await;
    other.send_chat(&id, &paced(3, 1)).await;
    let third = other.run_events(&id).await;
    assert_contiguous(&third, 12);
    other.subscribe(&id, 0).await;
    assert_eq!(ack(&mut other, &id).await["lastSeq"], 16);
}

async fn seq_survives_a_node_restart(db: Db) {
    let mut node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, "before restart").await;
    let events = ws.run_events(&id).await;
    let top = events.last().unwrap()["seq"].as_u64().unwrap();
    drop(ws);
    node.restart().await;
    let mut ws = node.connect(&token).await;
    ws.subscribe(&id, 0).await;
    let ack = ack(&mut ws, &id).await;
    assert_eq!((ack["isProcessing"].as_bool(), ack["lastSeq"].as_u64()), (Some(false), Some(top)), "{ack}");
    ws.send_chat(&id, "after restart").await;
    let events = ws.run_events(&id).await;
    assert_contiguous(&events, top + 1);
}

async fn run_in_progress_on_a_concurrent_send(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    let mut tab = node.connect(&token).await;
    ws.send_chat(&id, &paced(30, 5)).await;
    ws.recv_until(|v| v["kind"] == "stream_delta").await;
    let mut events = Vec::new();
    for socket in [&mut ws, &mut tab] {
        socket.send_chat(&id, "me too").await;
        let mut frames = socket.recv_until(|v| v["kind"] == "protocol_error").await;
        let frame = frames.pop().unwrap();
        assert_protocol_error(&frame, "RUN_IN_PROGRESS");
        assert_eq!(frame["sessionId"], id.as_str());
        assert_eq!(frame["error"], format!("Session \"{id}\" already has a run in progress."));
        if events.is_empty() {
            events.extend(frames.into_iter().filter(|v| v["seq"].is_u64()));
        }
    }
    events.extend(ws.run_events(&id).await);
    assert_eq!(events.iter().filter(|v| v["kind"] == "stream_delta").count(), 29, "the first delta was read above");
    assert_contiguous(&events, 2);
    assert_one_terminal_complete(&events);
    assert_eq!(events.last().unwrap()["exitCode"], 0);

    // Five sockets send at the same instant: one run, four RUN_IN_PROGRESS.
    let top = events.last().unwrap()["seq"].as_u64().unwrap();
    let mut sockets = Vec::new();
    for _ in 0..5 {
        sockets.push(node.connect(&token).await);
    }
    let script = paced(20, 10);
    let sends = sockets.iter_mut().map(|ws| ws.send_chat(&id, &script));
    futures_util::future::join_all(sends).await;
    let mut refused = 0;
    let mut runs = Vec::new();
    for ws in &mut sockets {
        let frame = ws.recv_until(|v| v["kind"] == "protocol_error" || v["seq"].is_u64()).await.pop().unwrap();
        if frame["kind"] == "protocol_error" {
            assert_protocol_error(&frame, "RUN_IN_PROGRESS");
            refused += 1;
        } else {
            let mut run = vec![frame];
            run.extend(ws.run_events(&id).await);
            runs.push(run);
        }
    }
    assert_eq!((refused, runs.len()), (4, 1));
    assert_contiguous(&runs[0], top + 1);
    assert_one_terminal_complete(&runs[0]);
}

async fn abort_while_running_and_when_not(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;

    ws.send_chat(&id, &paced(400, 5)).await;
    let before = read_until_seq(&mut ws, &id, 3).await;
    abort(&mut ws, &id).await;
    let mut events = before;
    events.extend(ws.run_events(&id).await);
    assert_contiguous(&events, 1);
    assert_one_terminal_complete(&events);
    let complete = events.last().unwrap();
    assert_eq!((complete["aborted"].as_bool(), complete["success"].as_bool()), (Some(true), Some(false)), "{complete}");
    assert!(events.len() < 100, "the run went on after the abort: {} events", events.len());
    ws.expect_silence(Duration::from_millis(300)).await;
    let top = complete["seq"].as_u64().unwrap();

    // Not running: NO_ACTIVE_RUN, for the idle session and for a missing one.
    for session in [id.clone(), uuid::Uuid::new_v4().to_string()] {
        abort(&mut ws, &session).await;
        let frame = ws.recv_reply().await;
        assert_protocol_error(&frame, "NO_ACTIVE_RUN");
        assert_eq!(frame["sessionId"], session.as_str());
        assert_eq!(frame["error"], format!("Session \"{session}\" has no active run."));
    }

    // Two aborts in a row: still exactly one complete.
    ws.send_chat(&id, &paced(400, 5)).await;
    let mut events = read_until_seq(&mut ws, &id, top + 2).await;
    abort(&mut ws, &id).await;
    abort(&mut ws, &id).await;
    let mut frames = ws.recv_until(|v| v["kind"] == "complete").await;
    while let Some(Ok(frame)) = ws.try_recv(Duration::from_millis(200)).await {
        frames.push(frame);
    }
    let errors: Vec<&Value> = frames.iter().filter(|v| v["kind"] == "protocol_error").collect();
    assert!(errors.iter().all(|e| e["code"] == "NO_ACTIVE_RUN"), "{errors:?}");
    events.extend(frames.into_iter().filter(|v| v["seq"].is_u64()));
    assert_contiguous(&events, top + 1);
    assert_one_terminal_complete(&events);
    let top = events.last().unwrap()["seq"].as_u64().unwrap();

    // The session takes a new run, and another tab of the same user may abort it.
    let mut tab = node.connect(&token).await;
    ws.send_chat(&id, &paced(400, 5)).await;
    read_until_seq(&mut ws, &id, top + 2).await;
    abort(&mut tab, &id).await;
    let events = ws.run_events(&id).await;
    assert_eq!(events.last().unwrap()["aborted"], true);
    assert_one_terminal_complete(&events);
    tab.expect_silence(Duration::from_millis(200)).await;
    let history = node.history_complete(&token, &id, events.last().unwrap()["seq"].as_u64()).await;
    assert_eq!(history.iter().filter(|m| m["kind"] == "complete").count(), 3, "{history:#?}");
}

async fn abort_right_after_send_kills_the_run(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut ws = node.connect(&token).await;
    for _ in 0..5 {
        // A fresh session: the provider has not announced its id yet.
        let id = node.create_session(&token, "script").await;
        ws.send_chat(&id, &paced(100, 50)).await;
        abort(&mut ws, &id).await;
        let events = ws.run_events(&id).await;
        assert_one_terminal_complete(&events);
        assert_contiguous(&events, 1);
        let complete = events.last().unwrap();
        assert_eq!(complete["aborted"], true, "{complete}");
        assert!(events.len() <= 3, "the aborted run kept streaming: {events:#?}");
        // Nothing more from the killed runtime, and the session is free again.
        let mut late = Vec::new();
        while let Some(Ok(frame)) = ws.try_recv(Duration::from_millis(300)).await {
            if frame["kind"] != "session_upserted" {
                late.push(frame);
            }
        }
        assert!(late.is_empty(), "frames after complete: {late:#?}");
        // History keeps the prompt and the aborted run's events.
        let history = node.history_complete(&token, &id, complete["seq"].as_u64()).await;
        assert_eq!((history[0]["role"].as_str(), history[0]["seq"].clone()), (Some("user"), Value::Null));
        common::assert_history_matches(&history, &paced(100, 50), &events);
        ws.send_chat(&id, "again").await;
        let next = ws.run_events(&id).await;
        assert_contiguous(&next, complete["seq"].as_u64().unwrap() + 1);
        assert_eq!(next.last().unwrap()["exitCode"], 0);
    }
}

async fn two_tabs_both_receive_live_events(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut sender = node.connect(&token).await;
    let mut watcher = node.connect(&token).await;
    watcher.subscribe(&id, 0).await;
    let idle = ack(&mut watcher, &id).await;
    assert_eq!(idle["isProcessing"], false);

    sender.send_chat(&id, &paced(20, 5)).await;
    read_until_seq(&mut sender, &id, 2).await;
    // A third tab joins mid-run from zero: ack, the run so far, then live.
    let mut late = node.connect(&token).await;
    late.subscribe(&id, 0).await;
    let joined = ack(&mut late, &id).await;
    assert_eq!(joined["isProcessing"], true, "{joined}");

    let mut all = vec![];
    for ws in [&mut sender, &mut watcher, &mut late] {
        all.push(ws.run_events(&id).await);
    }
    let (sent, watched, caught_up) = (&all[0], &all[1], &all[2]);
    assert_eq!(watched.len(), 22);
    assert_contiguous(watched, 1);
    assert_eq!(&watched[2..], &sent[..], "both tabs get the same frames");
    assert_eq!(watched, caught_up, "the late tab gets the whole run");
    assert_eq!(joined["runId"], watched[0]["runId"]);
}

/// An unpaced run of thousands of events (faster than any socket drains it)
/// reaches every tab whole and in order.
async fn fast_big_run_reaches_every_tab_in_order(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut tab = node.connect(&token).await;
        tab.subscribe(&id, 0).await;
        ack(&mut tab, &id).await;
        tabs.push(tab);
    }
    tabs[0].send_chat(&id, r#"{"events":5000,"payloadBytes":100}"#).await;
    let mut first: Option<Vec<Value>> = None;
    for tab in &mut tabs {
        let events = tab.run_events(&id).await;
        assert_eq!(events.len(), 5002);
        assert_contiguous(&events, 1);
        match &first {
            None => first = Some(events),
            Some(first) => assert!(first == &events, "tabs saw different frames"),
        }
    }
}

/// A tab drops mid-run and comes back with the last seq it saw: it gets exactly
/// the events it missed, then the live ones — at random points of many runs,
/// including a cursor from the previous run and a cursor of 0.
async fn reconnect_with_last_seq_gets_exactly_the_missed_events(db: Db) {
    const ROUNDS: u64 = 12;
    const EVENTS: u64 = 50;
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let seed = 0x5eed_0000 + db as u64;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut prev_top = 0u64;
    let mut skipped = 0;
    for round in 0..ROUNDS {
        let first = prev_top + 1;
        let last = prev_top + EVENTS + 2;
        let cursor = if rng.random_bool(0.15) { 0 } else { rng.random_range(prev_top..=prev_top + 30) };
        let mut tab = node.connect(&token).await;
        tab.send_chat(&id, &paced(EVENTS, 5)).await;
        // Wait until the run has started; with a cursor from before this run
        // the events read here count as lost in flight.
        let read = read_until_seq(&mut tab, &id, cursor.max(first)).await;
        let seen = if cursor > prev_top { read } else { Vec::new() };
        if rng.random_bool(0.5) {
            let _ = tab.stream.close(None).await;
        }
        drop(tab);

        let mut back = node.connect(&token).await;
        back.subscribe(&id, cursor).await;
        let ack = ack(&mut back, &id).await;
        let context = format!("seed {seed:#x} round {round} cursor {cursor} run {first}..={last}");
        if ack["isProcessing"] == false {
            // The run ended before the resubscribe: nothing to replay, as upstream.
            assert_eq!(ack["lastSeq"], last, "{context}: {ack}");
            back.expect_silence(Duration::from_millis(100)).await;
            skipped += 1;
            prev_top = last;
            continue;
        }
        assert_eq!(ack["replayTruncated"], false, "{context}: {ack}");
        assert!(ack["lastSeq"].as_u64().unwrap() >= cursor.max(prev_top), "{context}: {ack}");
        let resumed = back.run_events(&id).await;
        let from = cursor.max(prev_top) + 1;
        assert_eq!(seqs(&resumed), (from..=last).collect::<Vec<_>>(), "{context}");
        let mut whole = seen.clone();
        whole.extend(resumed.iter().cloned());
        assert_eq!(seqs(&whole), (first..=last).collect::<Vec<_>>(), "{context}: seen + resumed is the whole run");
        for event in &resumed {
            assert_eq!(event["runId"], ack["runId"], "{context}: only the current run is replayed");
            if event["kind"] == "stream_delta" {
                let i = event["seq"].as_u64().unwrap() - prev_top;
                assert_eq!(event["content"], format!("chunk {i}"), "{context}");
            }
        }
        assert_one_terminal_complete(&resumed);
        if let Some(last_seen) = seen.last() {
            assert_eq!(last_seen["seq"].as_u64().unwrap() + 1, resumed[0]["seq"].as_u64().unwrap(), "{context}");
        }
        prev_top = last;
    }
    assert!(skipped <= ROUNDS / 3, "{skipped} of {ROUNDS} rounds ended before the resubscribe");
}

async fn replay_truncated_when_the_cursor_is_older_than_the_window(db: Db) {
    let node = TestNode::start_with(db, |c| c.replay_max_events = 8).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, &paced(40, 20)).await;
    let seen = read_until_seq(&mut ws, &id, 15).await;
    let cursor = seen.last().unwrap()["seq"].as_u64().unwrap();

    // A recent cursor is still inside the window: exact replay.
    let mut recent = node.connect(&token).await;
    recent.subscribe(&id, cursor).await;
    let ok = ack(&mut recent, &id).await;
    assert_eq!((ok["isProcessing"].as_bool(), ok["replayTruncated"].as_bool()), (Some(true), Some(false)), "{ok}");

    // Old cursors (and 0) are not: the ack says so, then what the window still has.
    let mut stale = Vec::new();
    for old in [2, 0] {
        let mut tab = node.connect(&token).await;
        tab.subscribe(&id, old).await;
        let truncated = ack(&mut tab, &id).await;
        assert_eq!(truncated["isProcessing"], true, "run ended too early for this check: {truncated}");
        assert_eq!(truncated["replayTruncated"], true, "cursor {old}: {truncated}");
        stale.push((old, truncated["lastSeq"].as_u64().unwrap(), tab));
    }
    let events = recent.run_events(&id).await;
    assert_contiguous(&events, cursor + 1);
    for (old, top, mut tab) in stale {
        let events = tab.run_events(&id).await;
        let start = events[0]["seq"].as_u64().unwrap();
        assert!(start > old + 1 && start + 8 > top, "cursor {old}: replay starts at {start}, top {top}");
        assert_contiguous(&events, start);
        assert_one_terminal_complete(&events);
    }
    ws.run_events(&id).await;
}

async fn subscribe_on_an_idle_session_sends_only_the_ack(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let fresh = node.create_session(&token, "script").await;
    let used = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&used, "one two three").await;
    let top = ws.run_events(&used).await.last().unwrap()["seq"].as_u64().unwrap();

    let mut tab = node.connect(&token).await;
    tab.send(json!({ "type": "chat.subscribe", "sessions": [
        { "sessionId": fresh, "lastSeq": 0 }, { "sessionId": used, "lastSeq": 0 }, { "sessionId": used },
    ]}))
    .await;
    let a = ack(&mut tab, &fresh).await;
    let b = ack(&mut tab, &used).await;
    let c = ack(&mut tab, &used).await;
    let mut keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "id",
            "isProcessing",
            "kind",
            "lastSeq",
            "pendingPermissions",
            "replayTruncated",
            "runId",
            "sessionId",
            "timestamp"
        ]
    );
    assert_eq!(
        (&a["isProcessing"], &a["lastSeq"], &a["runId"], &a["pendingPermissions"], &a["replayTruncated"]),
        (&json!(false), &json!(0), &Value::Null, &json!([]), &json!(false))
    );
    for idle in [&b, &c] {
        assert_eq!((idle["isProcessing"].as_bool(), idle["lastSeq"].as_u64()), (Some(false), Some(top)), "{idle}");
        assert_eq!(idle["pendingPermissions"], json!([]));
    }
    // Earlier runs are history (REST), never replayed.
    tab.expect_silence(Duration::from_millis(300)).await;
}

async fn subscription_lasts_across_runs_until_unsubscribe(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut watcher = node.connect(&token).await;
    watcher.subscribe(&id, 0).await;
    ack(&mut watcher, &id).await;
    let mut sender = node.connect(&token).await;
    let mut top = 0;
    for text in ["first run", "second run here"] {
        sender.send_chat(&id, text).await;
        let sent = sender.run_events(&id).await;
        let watched = watcher.run_events(&id).await;
        assert_eq!(watched, sent);
        assert_contiguous(&watched, top + 1);
        top = watched.last().unwrap()["seq"].as_u64().unwrap();
    }
    watcher.send(json!({ "type": "chat.unsubscribe", "sessions": [id] })).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    sender.send_chat(&id, "unwatched").await;
    sender.run_events(&id).await;
    let mut stray = Vec::new();
    while let Some(Ok(frame)) = watcher.try_recv(Duration::from_millis(300)).await {
        if frame["kind"] != "session_upserted" {
            stray.push(frame);
        }
    }
    assert!(stray.is_empty(), "events after chat.unsubscribe: {stray:#?}");
}

/// Reads a permission run on `ws` up to its `permission_request`.
async fn until_permission_request(ws: &mut Ws, session: &str) -> Value {
    let frame = ws.recv_until(|v| v["kind"] == "permission_request" && v["sessionId"] == session).await.pop().unwrap();
    assert_eq!(frame["toolName"], "Bash", "{frame}");
    assert_eq!(frame["input"], json!({ "command": "ls" }), "{frame}");
    assert!(frame["requestId"].as_str().is_some_and(|r| !r.is_empty()), "{frame}");
    frame
}

async fn permission_allow_reaches_every_tab(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, &permission_script(10_000, 2)).await;
    let request = until_permission_request(&mut ws, &id).await;
    let request_id = request["requestId"].as_str().unwrap().to_string();

    // A tab opened while the approval is pending sees it in the ack and in the replay.
    let mut tab = node.connect(&token).await;
    tab.subscribe(&id, 0).await;
    let pending = ack(&mut tab, &id).await;
    assert_eq!(pending["isProcessing"], true);
    let listed = pending["pendingPermissions"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{pending}");
    assert_eq!(listed[0]["requestId"], request_id.as_str());
    assert_eq!(listed[0]["toolName"], "Bash");
    assert_eq!(listed[0]["input"], json!({ "command": "ls" }));
    assert_eq!(listed[0]["sessionId"], id.as_str());
    let replayed = tab.recv().await;
    assert_eq!(replayed, request);

    ws.send(json!({ "type": "chat.permission-response", "requestId": request_id, "allow": true,
        "updatedInput": { "command": "pwd" } }))
        .await;
    let mut runs = Vec::new();
    for socket in [&mut ws, &mut tab] {
        runs.push(socket.run_events(&id).await);
    }
    assert_eq!(runs[0], runs[1]);
    let events = &runs[0];
    assert_eq!(
        kinds(events),
        ["permission_resolved", "tool_use", "tool_result", "stream_delta", "stream_delta", "stream_end", "complete"]
    );
    assert_contiguous(events, 2);
    assert_eq!(
        (events[0]["requestId"].as_str(), events[0]["allow"].as_bool()),
        (Some(request_id.as_str()), Some(true))
    );
    assert_eq!(events[1]["toolName"], "Bash");
    assert_eq!(events[1]["toolInput"], json!({ "command": "pwd" }));
    assert_eq!(events[1]["toolId"], events[2]["toolId"]);
    assert_eq!((events[2]["content"].as_str(), events[2]["isError"].as_bool()), (Some("ok"), Some(false)));
    assert_eq!(events[6]["exitCode"], 0);

    // Answered: no longer pending anywhere; a second answer changes nothing.
    ws.send(json!({ "type": "chat.permission-response", "requestId": request_id, "allow": false })).await;
    ws.expect_silence(Duration::from_millis(200)).await;
    let mut later = node.connect(&token).await;
    later.subscribe(&id, 0).await;
    let idle = ack(&mut later, &id).await;
    assert_eq!((idle["isProcessing"].as_bool(), idle["pendingPermissions"].clone()), (Some(false), json!([])));
}

async fn permission_deny_from_another_tab(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    let mut tab = node.connect(&token).await;
    tab.subscribe(&id, 0).await;
    ack(&mut tab, &id).await;
    for message in [Some("not today"), None] {
        ws.send_chat(&id, &permission_script(10_000, 1)).await;
        let request = until_permission_request(&mut tab, &id).await;
        let mut answer =
            json!({ "type": "chat.permission-response", "requestId": request["requestId"], "allow": false });
        if let Some(message) = message {
            answer["message"] = json!(message);
        }
        tab.send(answer).await;
        let events = ws.run_events(&id).await;
        let tail: Vec<&Value> = events.iter().skip_while(|v| v["kind"] != "permission_resolved").collect();
        assert_eq!(
            tail.iter().map(|v| v["kind"].as_str().unwrap()).collect::<Vec<_>>(),
            ["permission_resolved", "tool_result", "stream_delta", "stream_end", "complete"]
        );
        assert_eq!(tail[0]["allow"], false);
        assert_eq!(tail[1]["isError"], true);
        assert_eq!(tail[1]["content"], message.unwrap_or("User denied tool use"));
        assert!(events.iter().all(|v| v["kind"] != "tool_use"), "a denied tool must not run");
        tab.run_events(&id).await;
    }
}

async fn permission_timeout_cancels_the_request(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, &permission_script(400, 2)).await;
    let request = until_permission_request(&mut ws, &id).await;
    let events = ws.run_events(&id).await;
    assert_eq!(kinds(&events), ["permission_cancelled", "stream_delta", "stream_delta", "stream_end", "complete"]);
    assert_eq!(events[0]["requestId"], request["requestId"]);
    assert_eq!(events[0]["reason"], "timeout");
    assert_eq!(events[4]["exitCode"], 0);
    // A late answer is ignored.
    ws.send(json!({ "type": "chat.permission-response", "requestId": request["requestId"], "allow": true })).await;
    ws.expect_silence(Duration::from_millis(200)).await;
    ws.subscribe(&id, 0).await;
    let idle = ack(&mut ws, &id).await;
    assert_eq!(idle["pendingPermissions"], json!([]));
}

async fn session_upserted_goes_to_the_owners_sockets_only(db: Db) {
    let node = TestNode::start(db).await;
    let (alice, bob) = (node.token(&user()), node.token(&user()));
    let mut sender = node.connect(&alice).await;
    let mut sidebar = node.connect(&alice).await;
    let mut stranger = node.connect(&bob).await;
    let id = node.create_session(&alice, "script").await;

    sender.send_chat(&id, "first words").await;
    let frames = sender.recv_until(|v| v["kind"] == "complete" && v["sessionId"] == id.as_str()).await;
    let announced: Vec<&Value> =
        frames.iter().filter(|v| v["kind"] == "session_upserted" && !v["providerSessionId"].is_null()).collect();
    assert_eq!(announced.len(), 1, "{frames:#?}");
    let upsert = announced[0];
    let provider_id = upsert["providerSessionId"].as_str().unwrap();
    let uuid = provider_id.strip_prefix("script-").unwrap_or_else(|| panic!("not script-<uuid>: {provider_id}"));
    assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{provider_id}");
    assert_eq!(upsert["sessionId"], id.as_str());
    assert_eq!(upsert["provider"], "script");
    assert_eq!(upsert["session"]["sessionId"], id.as_str());
    assert_eq!(upsert["session"]["providerSessionId"], provider_id);
    assert!(upsert["timestamp"].is_string());
    // Upstream's sidebar fields beside chatgate's own.
    assert!(upsert["id"].as_str().is_some_and(|i| !i.is_empty()), "{upsert}");
    assert_eq!(upsert["session"]["id"], id.as_str());
    assert!(upsert["session"]["messageCount"].is_i64(), "{upsert}");
    assert_eq!(upsert["session"]["lastActivity"], upsert["session"]["updatedAt"]);
    assert!(upsert["session"].get("summary").is_some(), "{upsert}");
    let project_path = upsert["session"]["projectPath"].as_str().unwrap();
    let project = &upsert["project"];
    assert_eq!((project["path"].as_str(), project["fullPath"].as_str()), (Some(project_path), Some(project_path)));
    assert_eq!(project["projectId"].as_str(), Some(project_path));
    assert_eq!(
        project["displayName"].as_str(),
        std::path::Path::new(project_path).file_name().and_then(|n| n.to_str())
    );
    assert_eq!(project["isStarred"], false);

    // The owner's other socket hears of it without subscribing to the session.
    let seen = sidebar.recv_until(|v| v["kind"] == "session_upserted" && !v["providerSessionId"].is_null()).await;
    assert_eq!(seen.last().unwrap()["providerSessionId"], provider_id);
    let (_, shown) = node.request("GET", &format!("/api/providers/sessions/{id}"), &alice, None).await;
    assert_eq!(shown["data"]["providerSessionId"], provider_id);

    // Later runs keep the id.
    sender.send_chat(&id, "second").await;
    let frames = sender.recv_until(|v| v["kind"] == "complete" && v["sessionId"] == id.as_str()).await;
    assert!(frames.iter().filter(|v| v["kind"] == "session_upserted").all(|v| v["providerSessionId"] == provider_id));

    // The other user never hears anything.
    stranger.expect_silence(Duration::from_millis(300)).await;
}

async fn cwd_outside_the_project_is_invalid_options(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let project = node.workspaces.join("proj");
    std::fs::create_dir_all(project.join("sub")).unwrap();
    std::fs::create_dir_all(node.workspaces.join("other")).unwrap();
    std::os::unix::fs::symlink(node.workspaces.join("other"), project.join("link")).unwrap();
    let mut ws = node.connect(&token).await;
    let outside = [
        json!({ "cwd": "/tmp" }),
        json!({ "cwd": "/" }),
        json!({ "cwd": ".." }),
        json!({ "cwd": "sub/../.." }),
        json!({ "cwd": "link" }),
        json!({ "cwd": node.workspaces.join("other") }),
        json!({ "cwd": 5 }),
    ];
    for options in outside {
        ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "x", "options": options })).await;
        let frame = ws.recv_reply().await;
        assert_protocol_error(&frame, "INVALID_OPTIONS");
        assert_eq!(frame["sessionId"], id.as_str(), "{options}");
    }
    ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "x", "options": "cwd" })).await;
    assert_protocol_error(&ws.recv_reply().await, "INVALID_OPTIONS");
    // Nothing was started.
    ws.subscribe(&id, 0).await;
    let idle = ack(&mut ws, &id).await;
    assert_eq!((idle["isProcessing"].as_bool(), idle["lastSeq"].as_u64()), (Some(false), Some(0)));
    // Inside the project is fine.
    for cwd in [json!("sub"), json!(project.join("sub")), json!(project), json!(".")] {
        ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "inside", "options": { "cwd": cwd } })).await;
        let events = ws.run_events(&id).await;
        assert_eq!(events.last().unwrap()["exitCode"], 0, "{cwd}");
    }
}

async fn run_keeps_going_when_its_only_socket_goes_away(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, &paced(30, 10)).await;
    read_until_seq(&mut ws, &id, 1).await;
    drop(ws);
    wait_idle(&node, &token).await;
    let mut back = node.connect(&token).await;
    back.subscribe(&id, 1).await;
    let idle = ack(&mut back, &id).await;
    assert_eq!((idle["isProcessing"].as_bool(), idle["lastSeq"].as_u64()), (Some(false), Some(32)), "{idle}");
    let history = node.history_complete(&token, &id, Some(32)).await;
    let complete = history.last().unwrap();
    assert_eq!((complete["exitCode"].as_i64(), complete["aborted"].as_bool()), (Some(0), Some(false)), "{complete}");
    let merged: String = (1..=30).map(|i| format!("chunk {i}")).collect();
    assert!(history.iter().any(|m| m["kind"] == "text" && m["content"] == merged.as_str()), "{history:#?}");
}

/// Asserts a frame upstream's client can take: a kind it handles and, for one
/// it may store as a chat row, a string `id`.
#[track_caller]
fn assert_upstream_frame(frame: &Value) {
    const KINDS: [&str; 15] = [
        "text",
        "thinking",
        "tool_use",
        "tool_result",
        "stream_delta",
        "stream_end",
        "error",
        "status",
        "permission_request",
        "permission_cancelled",
        "complete",
        "chat_subscribed",
        "session_upserted",
        "protocol_error",
        "interactive_prompt",
    ];
    let kind = frame["kind"].as_str().unwrap_or_else(|| panic!("no kind: {frame}"));
    assert!(KINDS.contains(&kind), "a kind upstream's client does not handle: {frame}");
    assert!(frame["id"].as_str().is_some_and(|id| !id.is_empty()), "no string id: {frame}");
}

/// A client written for upstream (no `hello=1`) gets no `connected` frame, no
/// `permission_resolved`, and a string `id` on every frame; the serving node is
/// named in the `X-Chatgate-Node` header of the upgrade and of REST answers.
async fn upstream_client_gets_only_frames_it_can_take(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let node_id = node.node().node_id.clone();
    let (mut ws, header) = node.connect_upstream(&token).await;
    assert_eq!(header.as_deref(), Some(node_id.as_str()), "upgrade response names the node");
    let listed = reqwest::Client::new()
        .get(format!("{}/api/providers/sessions", node.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status().as_u16(), 200);
    assert_eq!(listed.headers().get("x-chatgate-node").and_then(|v| v.to_str().ok()), Some(node_id.as_str()));
    // Nothing unasked: the first frame is the answer to the first verb.
    ws.expect_silence(Duration::from_millis(200)).await;
    let id = node.create_session(&token, "script").await;
    let upsert = ws.recv().await;
    assert_eq!(upsert["kind"], "session_upserted", "{upsert}");
    assert_upstream_frame(&upsert);
    ws.send_text("not json").await;
    let error = ws.recv().await;
    assert_protocol_error(&error, "INVALID_PAYLOAD");
    assert_upstream_frame(&error);
    ws.subscribe(&id, 0).await;
    assert_upstream_frame(&ack(&mut ws, &id).await);

    // An approval answered in another tab: upstream's client drops it on `permission_cancelled`.
    let mut tab = node.connect(&token).await;
    tab.subscribe(&id, 0).await;
    ack(&mut tab, &id).await;
    ws.send_chat(&id, &permission_script(10_000, 2)).await;
    let request = until_permission_request(&mut ws, &id).await;
    tab.send(json!({ "type": "chat.permission-response", "requestId": request["requestId"], "allow": true })).await;
    let frames = ws.recv_until(|v| v["kind"] == "complete" && v["sessionId"] == id.as_str()).await;
    for frame in &frames {
        assert_upstream_frame(frame);
    }
    let events: Vec<Value> = frames.iter().filter(|v| v["seq"].is_u64()).cloned().collect();
    assert_eq!(
        kinds(&events),
        ["permission_cancelled", "tool_use", "tool_result", "stream_delta", "stream_delta", "stream_end", "complete"]
    );
    assert_eq!(
        (events[0]["requestId"].clone(), events[0]["reason"].as_str()),
        (request["requestId"].clone(), Some("resolved"))
    );
    // A socket that asked (hello=1) got the same event as `permission_resolved`, same id and seq.
    let asked = tab.run_events(&id).await;
    let resolved = asked.iter().find(|v| v["kind"] == "permission_resolved").expect("permission_resolved");
    assert_eq!((&resolved["id"], &resolved["seq"]), (&events[0]["id"], &events[0]["seq"]));
    // The replay gives an upstream client the same view.
    let (mut again, _) = node.connect_upstream(&token).await;
    again.subscribe(&id, 0).await;
    let idle = ack(&mut again, &id).await;
    assert_eq!(idle["isProcessing"], false);
    again.expect_silence(Duration::from_millis(200)).await;
}

db_tests!(
    upstream_client_gets_only_frames_it_can_take,
    echo_run_streams_in_order_then_complete,
    second_run_continues_the_seq,
    seq_survives_a_node_restart,
    run_in_progress_on_a_concurrent_send,
    abort_while_running_and_when_not,
    abort_right_after_send_kills_the_run,
    two_tabs_both_receive_live_events,
    fast_big_run_reaches_every_tab_in_order,
    reconnect_with_last_seq_gets_exactly_the_missed_events,
    replay_truncated_when_the_cursor_is_older_than_the_window,
    subscribe_on_an_idle_session_sends_only_the_ack,
    subscription_lasts_across_runs_until_unsubscribe,
    permission_allow_reaches_every_tab,
    permission_deny_from_another_tab,
    permission_timeout_cancels_the_request,
    session_upserted_goes_to_the_owners_sockets_only,
    cwd_outside_the_project_is_invalid_options,
    run_keeps_going_when_its_only_socket_goes_away,
);
