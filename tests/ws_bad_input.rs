//! Issue 2's "Bad input" list over real sockets: each bad input gets a clear
//! answer, then the same socket still completes a normal run and the stored
//! data is intact. Also the close codes (1009, 4401, 4008, 1008, ping timeout)
//! and the 401 refusal of bad tokens without upgrade.
//! Every test runs against SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{
    Db, TestNode, Ws, alg_none_token, assert_contiguous, assert_history_matches, assert_protocol_error, expired_token,
    forged_token, mint, user,
};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

/// A session of the socket's user whose run history is checked after each bad input.
struct Probe {
    session: String,
    top: u64,
    history: Vec<Value>,
}

impl Probe {
    async fn new(node: &TestNode, token: &str) -> Probe {
        let session = node.create_session(token, "script").await;
        Probe { session, top: 0, history: Vec::new() }
    }

    /// A normal echo run on `ws` continues the seq, and the history before it is intact.
    async fn still_works(&mut self, node: &TestNode, token: &str, ws: &mut Ws, after: &str) {
        let text = "still alive after bad input";
        ws.send_chat(&self.session, text).await;
        let events = ws.run_events(&self.session).await;
        assert_contiguous(&events, self.top + 1);
        assert_eq!(events.last().unwrap()["exitCode"], 0, "after {after}");
        let top = events.last().unwrap()["seq"].as_u64().unwrap();
        let history = node.history_complete(token, &self.session, Some(top)).await;
        let before = self.history.len();
        assert_eq!(&history[..before], &self.history[..], "history changed after {after}");
        assert_history_matches(&history[before..], text, &events);
        self.top = top;
        self.history = history;
    }
}

/// The next frame that is not a notice, and nothing right after it.
async fn only_reply(ws: &mut Ws) -> Value {
    let frame = ws.recv_reply().await;
    if let Some(Ok(extra)) = ws.try_recv(Duration::from_millis(30)).await {
        assert_eq!(extra["kind"], "session_upserted", "second answer to one frame: {frame} then {extra}");
    }
    frame
}

/// Asserts no frame but notices arrives for `wait`.
async fn silence(ws: &mut Ws, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.try_recv(left).await {
            None => return,
            Some(Ok(frame)) if frame["kind"] == "session_upserted" => continue,
            Some(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

fn paced(n: u64, ms: u64) -> String {
    format!(r#"{{"events":{n},"intervalMs":{ms}}}"#)
}

async fn malformed_frames_get_clear_answers(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut ws = node.connect(&token).await;
    let mut probe = Probe::new(&node, &token).await;
    probe.still_works(&node, &token, &mut ws, "nothing").await;
    let id = probe.session.clone();
    let missing = uuid::Uuid::new_v4().to_string();

    let cases: Vec<(String, &str, Option<String>, Option<&str>)> = vec![
        ("not json".into(), "INVALID_PAYLOAD", None, None),
        (r#"{"type":"chat.send""#.into(), "INVALID_PAYLOAD", None, None),
        ("".into(), "INVALID_PAYLOAD", None, None),
        ("[1,2]".into(), "INVALID_PAYLOAD", None, None),
        (r#""chat.send""#.into(), "INVALID_PAYLOAD", None, None),
        ("42".into(), "INVALID_PAYLOAD", None, None),
        ("null".into(), "INVALID_PAYLOAD", None, None),
        ("true".into(), "INVALID_PAYLOAD", None, None),
        (
            r#"{"type":"chat.nope"}"#.into(),
            "UNKNOWN_MESSAGE_TYPE",
            Some(r#"Unknown message type "chat.nope"."#.into()),
            None,
        ),
        ("{}".into(), "UNKNOWN_MESSAGE_TYPE", Some(r#"Unknown message type ""."#.into()), None),
        (r#"{"type":5}"#.into(), "UNKNOWN_MESSAGE_TYPE", Some(r#"Unknown message type ""."#.into()), None),
        (r#"{"type":"chat.send"}"#.into(), "SESSION_ID_REQUIRED", Some("chat.send requires a sessionId.".into()), None),
        (
            r#"{"type":"chat.send","sessionId":"   ","content":"x"}"#.into(),
            "SESSION_ID_REQUIRED",
            Some("chat.send requires a sessionId.".into()),
            None,
        ),
        (
            r#"{"type":"chat.send","sessionId":5,"content":"x"}"#.into(),
            "SESSION_ID_REQUIRED",
            Some("chat.send requires a sessionId.".into()),
            None,
        ),
        (
            r#"{"type":"chat.abort"}"#.into(),
            "SESSION_ID_REQUIRED",
            Some("chat.abort requires a sessionId.".into()),
            None,
        ),
        (
            r#"{"type":"chat.abort","sessionId":""}"#.into(),
            "SESSION_ID_REQUIRED",
            Some("chat.abort requires a sessionId.".into()),
            None,
        ),
        (
            json!({ "type": "chat.send", "sessionId": missing, "content": "x" }).to_string(),
            "SESSION_NOT_FOUND",
            Some(format!("Session \"{missing}\" was not found. Create it via POST /api/providers/sessions first.")),
            Some(missing.as_str()),
        ),
        (
            json!({ "type": "chat.send", "sessionId": "../../etc", "content": "x" }).to_string(),
            "SESSION_NOT_FOUND",
            None,
            Some("../../etc"),
        ),
    ];
    for (frame, code, text, session) in cases {
        ws.send_text(&frame).await;
        let answer = only_reply(&mut ws).await;
        assert_protocol_error(&answer, code);
        if let Some(text) = text {
            assert_eq!(answer["error"], text.as_str(), "{frame}");
        }
        assert_eq!(answer["sessionId"], session.map_or(Value::Null, Value::from), "{frame}");
    }
    // Non-string content: refused, and no run is started.
    for content in [json!(5), json!({ "a": 1 }), json!(["x"]), json!(true)] {
        ws.send(json!({ "type": "chat.send", "sessionId": id, "content": content })).await;
        let answer = only_reply(&mut ws).await;
        assert_protocol_error(&answer, "INVALID_PAYLOAD");
        assert_eq!(answer["sessionId"], id.as_str());
    }
    ws.subscribe(&id, 0).await;
    let idle = only_reply(&mut ws).await;
    assert_eq!((idle["isProcessing"].as_bool(), idle["lastSeq"].as_u64()), (Some(false), Some(probe.top)), "{idle}");
    probe.still_works(&node, &token, &mut ws, "malformed frames").await;
}

async fn subscribe_junk_is_skipped_as_upstream(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut ws = node.connect(&token).await;
    let mut probe = Probe::new(&node, &token).await;
    let id = probe.session.clone();

    let silent = [
        json!({ "type": "chat.subscribe" }),
        json!({ "type": "chat.subscribe", "sessions": "x" }),
        json!({ "type": "chat.subscribe", "sessions": 5 }),
        json!({ "type": "chat.subscribe", "sessions": null }),
        json!({ "type": "chat.subscribe", "sessions": { "sessionId": id } }),
        json!({ "type": "chat.subscribe", "sessions": [] }),
        json!({ "type": "chat.unsubscribe", "sessions": "x" }),
        json!({ "type": "chat.unsubscribe", "sessions": [null, 5, {}] }),
        json!({ "type": "chat.permission-response" }),
        json!({ "type": "chat.permission-response", "requestId": 5, "allow": true }),
        json!({ "type": "chat.permission-response", "requestId": "", "allow": true }),
    ];
    for frame in silent {
        ws.send(frame.clone()).await;
        silence(&mut ws, Duration::from_millis(60)).await;
    }
    ws.send(json!({ "type": "chat.subscribe", "sessions": [
        null, 5, "str", [], {}, { "sessionId": "" }, { "sessionId": "  " }, { "sessionId": 5 }, { "lastSeq": 3 },
        { "sessionId": id },
    ]}))
    .await;
    let ack = only_reply(&mut ws).await;
    assert_eq!((ack["kind"].as_str(), ack["sessionId"].as_str()), (Some("chat_subscribed"), Some(id.as_str())));
    probe.still_works(&node, &token, &mut ws, "junk subscribe entries").await;
}

async fn odd_last_seq_values_are_read_as_upstream(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut probe = Probe::new(&node, &token).await;
    let mut ws = node.connect(&token).await;
    probe.still_works(&node, &token, &mut ws, "nothing").await;
    let first = probe.top + 1;
    let id = probe.session.clone();
    ws.send_chat(&id, &paced(40, 10)).await;
    ws.recv_until(|v| v["seq"].as_u64().is_some_and(|s| s >= first + 5)).await;

    // (lastSeq, first replayed seq: Some(n), or None = live only)
    let cases = [
        (json!(-5), Some(first)),
        (json!(-0.5), Some(first)),
        (json!(first + 1), Some(first + 2)),
        (json!(first as f64 + 1.7), Some(first + 2)),
        (json!("3"), Some(first)),
        (Value::Null, Some(first)),
        (json!(true), Some(first)),
        (json!({ "n": 1 }), Some(first)),
        (json!(9_007_199_254_740_993u64), None),
    ];
    let mut tabs = Vec::new();
    for (last_seq, want) in cases {
        let mut tab = node.connect(&token).await;
        tab.send(json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": id, "lastSeq": last_seq }] })).await;
        let ack = tab.recv_reply().await;
        assert_eq!(ack["kind"], "chat_subscribed", "{last_seq}: {ack}");
        assert_eq!(ack["isProcessing"], true, "{last_seq}: run ended too early for this check");
        assert_eq!(ack["replayTruncated"], false, "{last_seq}: {ack}");
        let top = ack["lastSeq"].as_u64().unwrap();
        assert!(top >= first + 5, "the ack carries the session's seq, not the client's: {ack}");
        tabs.push((last_seq, want, top, tab));
    }
    for (last_seq, want, top, mut tab) in tabs {
        let events = tab.run_events(&id).await;
        let start = events[0]["seq"].as_u64().unwrap();
        match want {
            Some(want) => assert_eq!(start, want, "lastSeq {last_seq}"),
            None => assert!(start > top, "lastSeq {last_seq}: replayed {start} <= {top}"),
        }
        assert_contiguous(&events, start);
        assert_eq!(events.last().unwrap()["kind"], "complete");
    }
    let events = ws.run_events(&id).await;
    probe.top = events.last().unwrap()["seq"].as_u64().unwrap();
    probe.history = node.history_complete(&token, &id, Some(probe.top)).await;
    probe.still_works(&node, &token, &mut ws, "odd lastSeq").await;
}

/// A cursor at or beyond u64::MAX (e.g. `1e300`): the client claims to have
/// everything, so the ack is followed by live events only.
async fn huge_last_seq_gets_live_events_only(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut probe = Probe::new(&node, &token).await;
    let mut ws = node.connect(&token).await;
    let id = probe.session.clone();
    ws.send_chat(&id, &paced(40, 10)).await;
    ws.recv_until(|v| v["seq"].as_u64().is_some_and(|s| s >= 3)).await;
    let mut tabs = Vec::new();
    for last_seq in [json!(1e300), json!(u64::MAX), json!(1.9e19)] {
        let mut tab = node.connect(&token).await;
        tab.send(json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": id, "lastSeq": last_seq }] })).await;
        let ack = match tab.try_recv(Duration::from_secs(3)).await {
            Some(Ok(ack)) => ack,
            other => panic!("lastSeq {last_seq}: no ack, the socket is dead ({other:?})"),
        };
        assert_eq!(
            (ack["kind"].as_str(), ack["isProcessing"].as_bool()),
            (Some("chat_subscribed"), Some(true)),
            "{ack}"
        );
        tabs.push((last_seq, ack["lastSeq"].as_u64().unwrap(), tab));
    }
    for (last_seq, top, mut tab) in tabs {
        let events = tab.run_events(&id).await;
        let start = events[0]["seq"].as_u64().unwrap();
        assert!(start > top, "lastSeq {last_seq}: replayed {start} <= {top}");
        assert_contiguous(&events, start);
    }
    let events = ws.run_events(&id).await;
    probe.top = events.last().unwrap()["seq"].as_u64().unwrap();
    probe.history = node.history_complete(&token, &id, Some(probe.top)).await;
    probe.still_works(&node, &token, &mut ws, "a huge lastSeq").await;
}

async fn frame_above_the_limit_closes_1009(db: Db) {
    let node = TestNode::start_with(db, |c| c.max_frame_bytes = 1024).await;
    let token = node.token(&user());
    let mut probe = Probe::new(&node, &token).await;
    let mut ws = node.connect(&token).await;
    probe.still_works(&node, &token, &mut ws, "nothing").await;
    // Just under the limit is fine.
    let content = "w ".repeat(400);
    let frame = json!({ "type": "chat.send", "sessionId": probe.session, "content": content }).to_string();
    assert!(frame.len() < 1024);
    ws.send_text(&frame).await;
    let events = ws.run_events(&probe.session).await;
    assert_eq!(events.last().unwrap()["exitCode"], 0);
    probe.top = events.last().unwrap()["seq"].as_u64().unwrap();
    probe.history = node.history_complete(&token, &probe.session, Some(probe.top)).await;

    let big = json!({ "type": "chat.send", "sessionId": probe.session, "content": "x".repeat(2000) }).to_string();
    let _ = ws.stream.send(Message::Text(big.into())).await;
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1009));
    // Nothing was started; the data is intact and a new socket works.
    let mut again = node.connect(&token).await;
    probe.still_works(&node, &token, &mut again, "an oversized frame").await;
}

async fn ten_megabyte_frame_closes_1009_at_the_default_limit(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut probe = Probe::new(&node, &token).await;
    let mut ws = node.connect(&token).await;
    let big = json!({ "type": "chat.send", "sessionId": probe.session, "content": "y".repeat(10_000_000) }).to_string();
    let _ = ws.stream.send(Message::Text(big.into())).await;
    assert_eq!(ws.closed(Duration::from_secs(10)).await, Some(1009));
    let mut again = node.connect(&token).await;
    probe.still_works(&node, &token, &mut again, "a 10 MB frame").await;
}

async fn binary_frame_is_invalid_payload_and_the_socket_survives(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut probe = Probe::new(&node, &token).await;
    let mut ws = node.connect(&token).await;
    let frame = json!({ "type": "chat.send", "sessionId": probe.session, "content": "x" }).to_string();
    for payload in [frame.into_bytes(), vec![0, 159, 146, 150], Vec::new()] {
        ws.stream.send(Message::Binary(payload.into())).await.unwrap();
        let answer = only_reply(&mut ws).await;
        assert_protocol_error(&answer, "INVALID_PAYLOAD");
        assert_eq!(answer["sessionId"], Value::Null);
    }
    probe.still_works(&node, &token, &mut ws, "binary frames").await;
}

async fn unknown_or_foreign_permission_answers_are_ignored(db: Db) {
    let node = TestNode::start(db).await;
    let (alice, bob) = (node.token(&user()), node.token(&user()));
    let id = node.create_session(&alice, "script").await;
    let mut owner = node.connect(&alice).await;
    let mut intruder = node.connect(&bob).await;
    let script = json!({ "permission": { "toolName": "Bash", "input": { "command": "rm -rf /" }, "timeoutMs": 20_000 },
        "events": 1 });
    owner.send_chat(&id, &script.to_string()).await;
    let request = owner.recv_until(|v| v["kind"] == "permission_request").await.pop().unwrap();
    let request_id = request["requestId"].as_str().unwrap().to_string();

    // Another user's answer, and answers to unknown requests: silence, and the run still waits.
    intruder.send(json!({ "type": "chat.permission-response", "requestId": request_id, "allow": true })).await;
    for unknown in [uuid::Uuid::new_v4().to_string(), format!("{request_id}x")] {
        owner.send(json!({ "type": "chat.permission-response", "requestId": unknown, "allow": true })).await;
    }
    silence(&mut intruder, Duration::from_millis(200)).await;
    silence(&mut owner, Duration::from_millis(100)).await;
    let mut tab = node.connect(&alice).await;
    tab.subscribe(&id, request["seq"].as_u64().unwrap()).await;
    let pending = tab.recv_reply().await;
    assert_eq!(pending["isProcessing"], true, "{pending}");
    assert_eq!(pending["pendingPermissions"][0]["requestId"], request_id.as_str(), "{pending}");

    owner.send(json!({ "type": "chat.permission-response", "requestId": request_id, "allow": false })).await;
    let events = owner.run_events(&id).await;
    assert_eq!(events[0]["kind"], "permission_resolved");
    assert_eq!(events[0]["allow"], false, "the owner's answer counts, not the intruder's");
    assert_contiguous(&events, 2);
    assert!(events.iter().all(|v| v["kind"] != "tool_use"));
    silence(&mut intruder, Duration::from_millis(100)).await;
}

/// Another user's session, through a valid token of that other user, on every
/// verb: answered exactly as a session that does not exist.
async fn another_users_session_on_each_verb_is_answered_as_missing(db: Db) {
    let node = TestNode::start(db).await;
    let (alice, bob) = (node.token(&user()), node.token(&user()));
    let id = node.create_session(&alice, "script").await;
    let missing = uuid::Uuid::new_v4().to_string();
    let mut owner = node.connect(&alice).await;
    let mut intruder = node.connect(&bob).await;
    let mut probe = Probe::new(&node, &bob).await;
    owner.send_chat(&id, &paced(60, 10)).await;
    owner.recv_until(|v| v["kind"] == "stream_delta").await;

    let strip = |frame: &Value, session: &str| {
        let mut frame = frame.clone();
        frame["timestamp"] = Value::Null;
        frame["id"] = Value::Null;
        Value::from(frame.to_string().replace(session, "ID"))
    };
    for verb in [
        json!({ "type": "chat.send", "sessionId": "ID", "content": "hijack" }),
        json!({ "type": "chat.abort", "sessionId": "ID" }),
        json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": "ID", "lastSeq": 0 }] }),
    ] {
        let foreign: Value = serde_json::from_str(&verb.to_string().replace("ID", &id)).unwrap();
        let absent: Value = serde_json::from_str(&verb.to_string().replace("ID", &missing)).unwrap();
        intruder.send(foreign).await;
        let got = only_reply(&mut intruder).await;
        intruder.send(absent).await;
        let want = only_reply(&mut intruder).await;
        assert_eq!(strip(&got, &id), strip(&want, &missing), "{verb}");
    }
    // The idle ack leaks nothing, and no event of the run ever follows.
    intruder.subscribe(&id, 0).await;
    let ack = only_reply(&mut intruder).await;
    assert_eq!(
        (&ack["isProcessing"], &ack["lastSeq"], &ack["runId"], &ack["pendingPermissions"]),
        (&json!(false), &json!(0), &Value::Null, &json!([]))
    );
    intruder.send(json!({ "type": "chat.unsubscribe", "sessions": [id] })).await;
    intruder.subscribe(&id, 0).await;
    only_reply(&mut intruder).await;

    let events = owner.run_events(&id).await;
    let complete = events.last().unwrap();
    assert_eq!((complete["aborted"].as_bool(), complete["exitCode"].as_i64()), (Some(false), Some(0)), "{complete}");
    silence(&mut intruder, Duration::from_millis(200)).await;
    // After the run, still nothing: lastSeq 0, not the session's.
    intruder.subscribe(&id, 0).await;
    assert_eq!(only_reply(&mut intruder).await["lastSeq"], 0);
    let (status, _) = node.request("GET", &format!("/api/providers/sessions/{id}/messages"), &bob, None).await;
    assert_eq!(status, 404);
    probe.still_works(&node, &bob, &mut intruder, "another user's session").await;
    // The owner's history is whole: one run, not aborted.
    let history = node.history_complete(&alice, &id, complete["seq"].as_u64()).await;
    assert_eq!(history.iter().filter(|m| m["kind"] == "complete").count(), 1);
}

/// A client that bursts while never reading: its answers pile up past the send
/// queue and it is closed with 4008 instead of growing memory.
async fn burst_without_reading_is_closed_as_slow_consumer(db: Db) {
    let node = TestNode::start_with(db, |c| c.send_queue_bytes = 64 * 1024).await;
    let token = node.token(&user());
    // Its answers (an error echoing the 32 KiB type for each of the ~200 frames the frame rate
    // lets through: over 6 MB) are more than the kernel holds for a client that does not read
    // (a 4 MB send buffer at most here): the rest waits in the node, which reads on meanwhile.
    let mut ws = node.connect_small_receive_buffer(&token).await;
    let long_type = "t".repeat(32 * 1024);
    for _ in 0..300 {
        let frame = json!({ "type": long_type }).to_string();
        if ws.stream.send(Message::Text(frame.into())).await.is_err() {
            break;
        }
    }
    assert_eq!(ws.closed(Duration::from_secs(10)).await, Some(4008));
    let mut probe = Probe::new(&node, &token).await;
    let mut again = node.connect(&token).await;
    probe.still_works(&node, &token, &mut again, "a slow consumer's burst").await;
}

async fn expired_token_closes_4401(db: Db) {
    let node = TestNode::start(db).await;
    let who = user();
    let mut probe = Probe::new(&node, &node.token(&who)).await;
    let short = mint(&who, Duration::from_secs(2));
    let mut ws = node.connect(&short).await;
    ws.subscribe(&probe.session, 0).await;
    assert_eq!(ws.recv_reply().await["kind"], "chat_subscribed");
    let started = tokio::time::Instant::now();
    assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(4401));
    assert!(started.elapsed() <= Duration::from_millis(3100), "closed {:?} after the token expired", started.elapsed());
    // A fresh token reconnects.
    let token = node.token(&who);
    let mut again = node.connect(&token).await;
    probe.still_works(&node, &token, &mut again, "a token expiry").await;
}

async fn slow_consumer_closes_4008_and_the_run_goes_on(db: Db) {
    let node = TestNode::start_with(db, |c| c.send_queue_bytes = 256 * 1024).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut watcher = node.connect(&token).await;
    watcher.subscribe(&id, 0).await;
    watcher.recv_reply().await;
    // Its kernel buffers are small, as a stalled client's are once full: the server's queue fills.
    let mut slow = node.connect_small_receive_buffer(&token).await;
    // 16 MB over ~5 s, paced so that a reading client keeps up with a 256 KiB queue
    // (bursts larger than it wait for room); the slow socket does not read, the watcher
    // does. The slow one's queue stays full for longer than the grace live delivery
    // gives it (2 s) while the run goes on.
    slow.send_chat(&id, r#"{"events":1000,"payloadBytes":16000,"intervalMs":5}"#).await;
    let events = watcher.run_events(&id).await;
    assert_contiguous(&events, 1);
    assert_eq!(events.len(), 1002);
    assert_eq!(events.last().unwrap()["exitCode"], 0);
    assert_eq!(slow.closed(Duration::from_secs(10)).await, Some(4008));
    let history = node.history_complete(&token, &id, Some(1002)).await;
    assert_eq!(history.len(), 3, "prompt, merged text, complete: {}", history.len());
    let (_, metrics) = node.get_text("/metrics").await;
    let closes: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("chatgate_slow_consumer"))
        .filter_map(|l| l.rsplit(" ").next()?.parse::<f64>().ok())
        .sum();
    assert!(closes >= 1.0, "slow-consumer closes not counted:\n{metrics}");
}

async fn origin_outside_the_allow_list_is_refused_1008(db: Db) {
    let node = TestNode::start_with(db, |c| c.allowed_origins = Some(vec!["https://good.example".into()])).await;
    let token = node.token(&user());
    let mut probe = Probe::new(&node, &token).await;
    for evil in ["https://evil.example", "https://good.example.evil.example", "null"] {
        match node.try_connect(Some(&token), &[("Origin", evil)]).await {
            Ok(mut ws) => assert_eq!(ws.closed(Duration::from_secs(5)).await, Some(1008), "{evil}"),
            Err(e) => panic!("Origin {evil}: expected an upgrade closed with 1008, got {e}"),
        }
    }
    let mut good = node.try_connect(Some(&token), &[("Origin", "https://good.example")]).await.unwrap();
    probe.still_works(&node, &token, &mut good, "refused origins").await;
    // Non-browser clients send no Origin.
    let mut plain = node.connect(&token).await;
    probe.still_works(&node, &token, &mut plain, "refused origins").await;
}

async fn bad_tokens_get_401_without_upgrade(db: Db) {
    let node = TestNode::start(db).await;
    let who = user();
    let bad = [forged_token(&who), alg_none_token(&who), expired_token(&who), "garbage".to_string()];
    let status = |result: Result<Ws, tungstenite::Error>| match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("upgraded with a bad token"),
    };
    assert_eq!(status(node.try_connect(None, &[]).await), 401, "no token");
    for token in &bad {
        assert_eq!(status(node.try_connect(Some(token), &[]).await), 401, "?token={token}");
        let bearer = format!("Bearer {token}");
        assert_eq!(status(node.try_connect(None, &[("Authorization", &bearer)]).await), 401, "Bearer {token}");
    }
    let good = format!("Bearer {}", node.token(&who));
    let mut ws = node.try_connect(None, &[("Authorization", &good)]).await.expect("Bearer upgrade");
    let mut probe = Probe::new(&node, &node.token(&who)).await;
    probe.still_works(&node, &node.token(&who), &mut ws, "refused upgrades").await;
}

async fn a_peer_that_never_answers_pings_is_dropped(db: Db) {
    let node = TestNode::start_with(db, |c| c.ping_interval = Duration::from_millis(200)).await;
    let token = node.token(&user());
    let mut probe = Probe::new(&node, &token).await;
    let mut dead = node.connect(&token).await;
    let mut alive = node.connect(&token).await;
    for ws in [&mut dead, &mut alive] {
        ws.subscribe(&probe.session, 0).await;
        ws.recv_reply().await;
    }
    // `alive` keeps reading (its client answers pings); `dead` reads nothing.
    silence(&mut alive, Duration::from_millis(1500)).await;
    let code = dead.closed(Duration::from_millis(500)).await;
    assert_ne!(code, Some(4401));
    probe.still_works(&node, &token, &mut alive, "a dead peer next door").await;
}

db_tests!(
    malformed_frames_get_clear_answers,
    subscribe_junk_is_skipped_as_upstream,
    odd_last_seq_values_are_read_as_upstream,
    huge_last_seq_gets_live_events_only,
    frame_above_the_limit_closes_1009,
    ten_megabyte_frame_closes_1009_at_the_default_limit,
    binary_frame_is_invalid_payload_and_the_socket_survives,
    unknown_or_foreign_permission_answers_are_ignored,
    another_users_session_on_each_verb_is_answered_as_missing,
    burst_without_reading_is_closed_as_slow_consumer,
    expired_token_closes_4401,
    slow_consumer_closes_4008_and_the_run_goes_on,
    origin_outside_the_allow_list_is_refused_1008,
    bad_tokens_get_401_without_upgrade,
    a_peer_that_never_answers_pings_is_dropped,
);
