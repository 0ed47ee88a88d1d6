//! Idempotent `chat.send` over real sockets (docs/protocol.md §Idempotent
//! sends): a `clientRequestId` starts at most one run whatever happens between
//! a send and its resend — a second tab, a socket dropped right after the send,
//! a draining node, two nodes racing — and a client that sends no key sees
//! upstream's frames unchanged. The registry-level cases (every backend, the
//! window, a Redis restart, a Redis Cluster failover, a lost reply) are in
//! `tests/registry_conformance` and `tests/redis_registry.rs`.

mod common;

use std::time::Duration;

use common::{Db, TestNode, Ws, cluster_node, mint, redis_url, shared_redis_cluster, spawn_node, user};
use serde_json::{Value, json};

fn paced(events: u64, interval_ms: u64) -> String {
    json!({ "events": events, "intervalMs": interval_ms }).to_string()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn keyed_send(session: &str, content: &str, key: &str) -> Value {
    json!({ "type": "chat.send", "sessionId": session, "content": content, "clientRequestId": key })
}

/// The answer to a keyed send: its `chat_accepted` or a `protocol_error` naming the key.
async fn answer(ws: &mut Ws, key: &str) -> Value {
    let frames = ws
        .recv_until(|f| (f["kind"] == "chat_accepted" || f["kind"] == "protocol_error") && f["clientRequestId"] == key)
        .await;
    frames.last().cloned().unwrap_or_default()
}

/// The user messages of a session's history (one per prompt that ran).
async fn prompts(node: &TestNode, token: &str, session: &str) -> Vec<String> {
    let data = node.history(token, session).await;
    let messages = data["messages"].as_array().cloned().unwrap_or_default();
    messages.iter().filter(|m| m["role"] == "user").filter_map(|m| m["content"].as_str().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_send_is_acknowledged_once_and_a_resend_starts_nothing() {
    let node = TestNode::start(Db::Sqlite).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;

    ws.send(keyed_send(&session, &paced(3, 20), "k-1")).await;
    let frames = ws.recv_until(|f| f["kind"] == "complete").await;
    let accepted = frames.iter().position(|f| f["kind"] == "chat_accepted").expect("an acknowledgement");
    let first_event = frames.iter().position(|f| f.get("seq").is_some()).expect("events");
    assert!(accepted < first_event, "the ack comes before the run's first event: {frames:#?}");
    let ack = &frames[accepted];
    let run_id = frames[first_event]["runId"].clone();
    assert_eq!(
        (&ack["sessionId"], &ack["clientRequestId"], &ack["runId"], &ack["firstSeq"]),
        (&json!(session), &json!("k-1"), &run_id, &json!(1)),
        "{ack}"
    );
    assert_eq!((ack["duplicate"].as_bool(), ack["isProcessing"].as_bool()), (Some(false), Some(true)), "{ack}");

    // The same key again, after the run: nothing starts, the answer names the first run.
    ws.send(keyed_send(&session, "a different prompt under the same key", "k-1")).await;
    let again = answer(&mut ws, "k-1").await;
    assert_eq!(again["kind"], "chat_accepted", "{again}");
    assert_eq!((&again["runId"], &again["firstSeq"], &again["duplicate"]), (&run_id, &json!(1), &json!(true)));
    assert_eq!(again["isProcessing"], false, "{again}");
    ws.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(prompts(&node, &token, &session).await.len(), 1, "one prompt ran");

    // A refusal carries the key; the key it refused answers the same from then on.
    ws.send(keyed_send(&session, &paced(20, 50), "k-2")).await;
    assert_eq!(answer(&mut ws, "k-2").await["kind"], "chat_accepted");
    ws.send(keyed_send(&session, "while k-2 runs", "k-3")).await;
    let busy = answer(&mut ws, "k-3").await;
    assert_eq!((busy["code"].as_str(), busy["duplicate"].as_bool()), (Some("RUN_IN_PROGRESS"), Some(false)), "{busy}");
    ws.send(keyed_send(&session, "while k-2 runs", "k-3")).await;
    let recorded = answer(&mut ws, "k-3").await;
    assert_eq!((recorded["code"].as_str(), recorded["duplicate"].as_bool()), (Some("RUN_IN_PROGRESS"), Some(true)));
    ws.recv_until(|f| f["kind"] == "complete").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_key_sees_no_new_frames() {
    let node = TestNode::start(Db::Sqlite).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let (mut ws, _) = node.connect_upstream(&token).await;
    ws.send_chat(&session, &paced(2, 10)).await;
    let frames = ws.recv_until(|f| f["kind"] == "complete").await;
    ws.send_chat(&session, &paced(30, 50)).await;
    ws.recv_until(|f| f.get("seq").is_some()).await;
    ws.send_chat(&session, "while the second runs").await;
    let busy = ws.recv_until(|f| f["kind"] == "protocol_error").await;
    let busy = busy.last().unwrap();
    for frame in frames.iter().chain([busy]) {
        assert_ne!(frame["kind"], "chat_accepted", "{frame}");
        for field in ["clientRequestId", "duplicate", "outcome"] {
            assert!(frame.get(field).is_none(), "{field} reached a keyless client: {frame}");
        }
    }
    assert_eq!(busy["code"], "RUN_IN_PROGRESS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_is_refused_and_the_connection_and_data_survive() {
    let node = TestNode::start(Db::Sqlite).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    for bad in [json!(""), json!(7), json!({"k": 1}), json!("has space"), json!("k".repeat(129))] {
        ws.send(json!({ "type": "chat.send", "sessionId": session, "content": "x", "clientRequestId": bad })).await;
        let error = ws.recv_until(|f| f["kind"] == "protocol_error").await.pop().unwrap();
        assert_eq!((error["code"].as_str(), error["sessionId"].as_str()), (Some("INVALID_PAYLOAD"), Some(&*session)));
        assert!(error["error"].as_str().unwrap().contains("clientRequestId"), "{error}");
    }
    assert!(prompts(&node, &token, &session).await.is_empty(), "nothing ran");
    ws.send(keyed_send(&session, &paced(1, 0), "good-key")).await;
    assert_eq!(answer(&mut ws, "good-key").await["kind"], "chat_accepted");
    ws.recv_until(|f| f["kind"] == "complete").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_over_the_send_budget_is_still_told_its_run() {
    let node = TestNode::start_with(Db::Sqlite, |c| c.max_sends_per_minute = 1).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send(keyed_send(&session, &paced(1, 0), "only-one")).await;
    let first = answer(&mut ws, "only-one").await;
    ws.recv_until(|f| f["kind"] == "complete").await;
    // The budget is spent: a new key is refused (with its key), the resend is answered.
    ws.send(keyed_send(&session, "over budget", "second")).await;
    let limited = answer(&mut ws, "second").await;
    assert_eq!((limited["code"].as_str(), limited["duplicate"].as_bool()), (Some("RATE_LIMITED"), Some(false)));
    ws.send(keyed_send(&session, &paced(1, 0), "only-one")).await;
    let again = answer(&mut ws, "only-one").await;
    assert_eq!((again["kind"].as_str(), again["duplicate"].as_bool()), (Some("chat_accepted"), Some(true)), "{again}");
    assert_eq!(again["runId"], first["runId"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_sent_on_two_nodes_at_once_starts_one_run() {
    one_key_on_two_nodes(&redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_sent_on_two_nodes_of_a_redis_cluster_at_once_starts_one_run() {
    one_key_on_two_nodes(&shared_redis_cluster().await).await;
}

async fn one_key_on_two_nodes(redis: &str) {
    const ROUNDS: usize = 20;
    let a = cluster_node(redis, &unique("idem-a"), |c| c.max_sends_per_minute = 1_000_000).await;
    let b = cluster_node(redis, &unique("idem-b"), |c| c.max_sends_per_minute = 1_000_000).await;
    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let (mut on_a, mut on_b) = (a.connect(&token).await, b.connect(&token).await);
    for round in 0..ROUNDS {
        let key = format!("round-{round}");
        let content = paced(2, 30);
        let (send_a, send_b) = (keyed_send(&session, &content, &key), keyed_send(&session, &content, &key));
        tokio::join!(on_a.send(send_a), on_b.send(send_b));
        let (ack_a, ack_b) = tokio::join!(answer(&mut on_a, &key), answer(&mut on_b, &key));
        for ack in [&ack_a, &ack_b] {
            assert_eq!(ack["kind"], "chat_accepted", "round {round}: {ack}");
        }
        assert_eq!(ack_a["runId"], ack_b["runId"], "round {round}: one run named to both");
        let duplicates = [&ack_a, &ack_b].iter().filter(|a| a["duplicate"] == true).count();
        assert_eq!(duplicates, 1, "round {round}: one started, one told: {ack_a} {ack_b}");
        // The sender that started the run follows it (the other was told, and would subscribe).
        let winner = if ack_a["duplicate"] == false { &mut on_a } else { &mut on_b };
        let events = winner.run_events(&session).await;
        assert!(events.iter().all(|e| e["runId"] == ack_a["runId"]), "round {round}: {events:#?}");
    }
    let ran = prompts(&a, &token, &session).await;
    assert_eq!(ran.len(), ROUNDS, "one prompt per round in history: {ran:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_the_socket_dropped_or_its_node_drained_is_told_its_run() {
    let redis = redis_url();
    let other = cluster_node(&redis, &unique("idem-stays"), |_| {}).await;
    let token = mint(&user(), Duration::from_secs(600));
    let session = other.create_session(&token, "script").await;
    let mut watcher = other.connect(&token).await;
    watcher.subscribe(&session, 0).await;
    watcher.recv_until(|f| f["kind"] == "chat_subscribed").await;

    // 1. The socket dies right after the send, its answer unread; the resend goes to another node.
    let first = cluster_node(&redis, &unique("idem-first"), |_| {}).await;
    let mut dropped = first.connect(&token).await;
    dropped.send(keyed_send(&session, &paced(10, 30), "dropped")).await;
    let run = watcher.recv_until(|f| f.get("seq").is_some()).await.pop().unwrap()["runId"].clone();
    drop(dropped);
    let mut resent = other.connect(&token).await;
    resent.send(keyed_send(&session, &paced(10, 30), "dropped")).await;
    let told = answer(&mut resent, "dropped").await;
    assert_eq!((told["kind"].as_str(), told["duplicate"].as_bool()), (Some("chat_accepted"), Some(true)), "{told}");
    assert_eq!((&told["runId"], &told["firstSeq"]), (&run, &json!(1)));
    let done = watcher.recv_until(|f| f["kind"] == "complete").await.pop().unwrap();
    assert_eq!((&done["runId"], &done["exitCode"]), (&run, &json!(0)));

    // 2. The sender's node drains (1012) while the run streams; the resend lands elsewhere.
    let doomed = spawn_node(&redis, &unique("idem-drained"), &other.workspaces, &["--drain-grace", "5s"]);
    doomed.wait_ready().await.expect("node ready");
    let mut sender = Ws::connect(&format!("ws://{}/ws?token={token}", doomed.addr())).await;
    sender.send(keyed_send(&session, &paced(20, 50), "drained")).await;
    let run = watcher.recv_until(|f| f.get("seq").is_some()).await.pop().unwrap()["runId"].clone();
    doomed.sigterm().unwrap();
    assert_eq!(sender.closed(Duration::from_secs(5)).await, Some(1012));
    let mut moved = other.connect(&token).await;
    moved.send(keyed_send(&session, &paced(20, 50), "drained")).await;
    let told = answer(&mut moved, "drained").await;
    assert_eq!((told["kind"].as_str(), told["duplicate"].as_bool()), (Some("chat_accepted"), Some(true)), "{told}");
    assert_eq!(told["runId"], run);
    let done = watcher.recv_until(|f| f["kind"] == "complete").await.pop().unwrap();
    assert_eq!((&done["runId"], &done["exitCode"], &done["aborted"]), (&run, &json!(0), &json!(false)), "{done}");
    assert_eq!(doomed.exited(Duration::from_secs(10)).await.unwrap().code(), Some(0));

    let ran =
        other.history_until(&token, &session, |m| m.iter().filter(|v| v["kind"] == "complete").count() == 2).await;
    let users = ran.iter().filter(|m| m["role"] == "user").count();
    assert_eq!(users, 2, "two prompts, each run once: {ran:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_the_node_restarted_is_told_its_run_from_sql() {
    // One node, keys in process: a restart forgets them; SQL keeps the session's last.
    let mut node = TestNode::start(Db::Sqlite).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send(keyed_send(&session, &paced(2, 10), "before-restart")).await;
    let first = answer(&mut ws, "before-restart").await;
    ws.recv_until(|f| f["kind"] == "complete").await;
    node.history_until(&token, &session, |m| m.iter().any(|v| v["kind"] == "complete")).await;
    drop(ws);
    node.restart().await;
    let mut ws = node.connect(&token).await;
    ws.send(keyed_send(&session, &paced(2, 10), "before-restart")).await;
    let again = answer(&mut ws, "before-restart").await;
    assert_eq!((again["kind"].as_str(), again["duplicate"].as_bool()), (Some("chat_accepted"), Some(true)), "{again}");
    assert_eq!(
        (&again["runId"], &again["firstSeq"], &again["isProcessing"]),
        (&first["runId"], &json!(1), &json!(false))
    );
    assert_eq!(prompts(&node, &token, &session).await.len(), 1, "the prompt ran once");
    // A new key runs as ever, and becomes the one SQL keeps.
    ws.send(keyed_send(&session, &paced(1, 0), "after-restart")).await;
    assert_eq!(answer(&mut ws, "after-restart").await["duplicate"], false);
    ws.recv_until(|f| f["kind"] == "complete").await;
}
