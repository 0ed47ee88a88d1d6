//! Abuse limits over real sockets (docs/operations.md "Abuse limits"): each
//! limit refuses with its exact status or code, what is under the limit keeps
//! working, and the connection and the data survive a refusal.

mod common;

use std::time::Duration;

use common::{
    Db, PrivateRedis, TestNode, Ws, assert_contiguous, assert_protocol_error, cluster_node, redis_url, seqs, user,
};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::{self, Message};

// ---------------------------------------------------------------- helpers

/// A refused upgrade: status, JSON body, `Retry-After`. Panics if the upgrade succeeded.
async fn refused_upgrade(node: &TestNode, token: Option<&str>, headers: &[(&str, &str)]) -> (u16, Value, Option<u64>) {
    match node.try_connect(token, headers).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let retry_after =
                response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            let body = response.body().as_deref().unwrap_or_default();
            (status, serde_json::from_slice(body).unwrap_or(Value::Null), retry_after)
        }
        Err(e) => panic!("unexpected upgrade failure: {e}"),
    }
}

/// Connects with extra headers and reads the `connected` frame.
async fn connect_with(node: &TestNode, token: &str, headers: &[(&str, &str)]) -> Ws {
    let mut ws = node.try_connect(Some(token), headers).await.expect("upgrade accepted");
    assert_eq!(ws.recv().await["kind"], "connected");
    ws
}

#[track_caller]
fn assert_rate_limited_envelope(status: u16, body: &Value, retry_after: Option<u64>) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], "RATE_LIMITED", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After missing");
}

/// An echo run on `session` from `ws`; its events, checked contiguous from `from`.
async fn echo_run(ws: &mut Ws, session: &str, from: u64) -> Vec<Value> {
    ws.send_chat(session, "still here").await;
    let events = ws.run_events(session).await;
    assert_contiguous(&events, from);
    assert_eq!(events.last().unwrap()["exitCode"], 0);
    events
}

/// The next frame that is neither a notice nor an event of another session.
async fn reply(ws: &mut Ws) -> Value {
    ws.recv_reply().await
}

/// The sum of `chatgate_limit_refusals_total{limit=…}` on a node.
async fn refusals(node: &TestNode, limit: &str) -> f64 {
    let (_, text) = node.get_text("/metrics").await;
    let prefix = format!("chatgate_limit_refusals_total{{limit=\"{limit}\"}}");
    text.lines().filter_map(|l| l.strip_prefix(&prefix)).filter_map(|v| v.trim().parse::<f64>().ok()).sum()
}

/// Running runs of a user, by session id.
async fn running(node: &TestNode, token: &str) -> Vec<String> {
    let (status, body) = node.request("GET", "/api/providers/sessions/running", token, None).await;
    assert_eq!(status, 200, "{body}");
    let runs = body["data"]["sessions"].as_array().cloned().expect("a sessions list");
    runs.iter().filter_map(|r| r["sessionId"].as_str().map(str::to_string)).collect()
}

/// How many user prompts the session's history holds.
async fn prompts(node: &TestNode, token: &str, session: &str) -> usize {
    let data = node.history(token, session).await;
    let messages = data["messages"].as_array().cloned().unwrap_or_default();
    messages.iter().filter(|m| m["role"] == "user").count()
}

// ---------------------------------------------------------------- 1. connections per IP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_rate_limited_before_the_upgrade() {
    let node = TestNode::start_with(Db::Sqlite, |c| {
        c.conn_rate_per_ip = 1;
        c.conn_burst_per_ip = 3;
    })
    .await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(node.connect(&token).await);
    }
    let before = refusals(&node, "connections_per_ip").await;
    let (status, body, retry_after) = refused_upgrade(&node, Some(&token), &[]).await;
    assert_rate_limited_envelope(status, &body, retry_after);
    // Refused before the token is even looked at: a bad token gets 429 too, not 401.
    let (status, _, _) = refused_upgrade(&node, Some("not-a-token"), &[]).await;
    assert_eq!(status, 429);
    assert!(refusals(&node, "connections_per_ip").await >= before + 2.0);
    // The sockets already open are untouched and the data is whole.
    let events = echo_run(&mut open[0], &session, 1).await;
    open[2].subscribe(&session, 0).await;
    let ack = reply(&mut open[2]).await;
    assert_eq!(
        (ack["kind"].as_str(), ack["lastSeq"].as_u64()),
        (Some("chat_subscribed"), events.last().unwrap()["seq"].as_u64())
    );
    // REST is not counted, and the bucket refills at the rate.
    let (status, _) = node.request("GET", "/api/providers/sessions", &token, None).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut again = node.connect(&token).await;
    echo_run(&mut again, &session, events.len() as u64 + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let limited = |c: &mut chatgate::config::Config| {
        c.conn_rate_per_ip = 1;
        c.conn_burst_per_ip = 2;
    };
    // Behind a trusted proxy (here: the test client's own address), the client is
    // the address X-Forwarded-For names.
    let behind_proxy = TestNode::start_with(Db::Sqlite, |c| {
        limited(c);
        c.trusted_proxies = Some(vec!["127.0.0.0/8".parse().unwrap()]);
    })
    .await;
    let token = behind_proxy.token(&user());
    let alice_ip = [("x-forwarded-for", "203.0.113.7")];
    let bob_ip = [("x-forwarded-for", "198.51.100.9, 127.0.0.1")];
    let _a1 = connect_with(&behind_proxy, &token, &alice_ip).await;
    let _a2 = connect_with(&behind_proxy, &token, &alice_ip).await;
    let (status, body, retry_after) = refused_upgrade(&behind_proxy, Some(&token), &alice_ip).await;
    assert_rate_limited_envelope(status, &body, retry_after);
    // Another client behind the same proxy has its own bucket (trusted hops are skipped).
    let _b1 = connect_with(&behind_proxy, &token, &bob_ip).await;
    let _b2 = connect_with(&behind_proxy, &token, &bob_ip).await;
    assert_eq!(refused_upgrade(&behind_proxy, Some(&token), &bob_ip).await.0, 429);
    // A client cannot pick its address by prepending entries: the rightmost untrusted one counts.
    let spoofed = [("x-forwarded-for", "192.0.2.1, 203.0.113.7")];
    assert_eq!(refused_upgrade(&behind_proxy, Some(&token), &spoofed).await.0, 429);

    // Without trusted proxies the header is ignored: the peer address is the client.
    let direct = TestNode::start_with(Db::Sqlite, limited).await;
    let token = direct.token(&user());
    let _d1 = connect_with(&direct, &token, &[("x-forwarded-for", "203.0.113.1")]).await;
    let _d2 = connect_with(&direct, &token, &[("x-forwarded-for", "203.0.113.2")]).await;
    let (status, _, _) = refused_upgrade(&direct, Some(&token), &[("x-forwarded-for", "203.0.113.3")]).await;
    assert_eq!(status, 429, "a forged X-Forwarded-For must not buy a fresh bucket");
}

// ---------------------------------------------------------------- 2. sockets per user

async fn sockets_per_user_are_limited(db: Db) {
    let node = TestNode::start_with(db, |c| c.max_sockets_per_user = 2).await;
    let alice = node.token(&user());
    let session = node.create_session(&alice, "script").await;
    let mut first = node.connect(&alice).await;
    let mut second = node.connect(&alice).await;
    let (status, body, retry_after) = refused_upgrade(&node, Some(&alice), &[]).await;
    assert_rate_limited_envelope(status, &body, retry_after);
    // An invalid token is still 401: the socket limit applies to valid tokens only.
    assert_eq!(refused_upgrade(&node, Some("not-a-token"), &[]).await.0, 401);
    // Another user is not affected.
    let bob = node.token(&user());
    let mut bobs = node.connect(&bob).await;
    let bob_session = node.create_session(&bob, "script").await;
    echo_run(&mut bobs, &bob_session, 1).await;
    // Alice's open sockets keep working: a run on one reaches the other.
    second.subscribe(&session, 0).await;
    assert_eq!(reply(&mut second).await["kind"], "chat_subscribed");
    let events = echo_run(&mut first, &session, 1).await;
    let watched = second.run_events(&session).await;
    assert_eq!(seqs(&watched), seqs(&events));
    // Closing one frees its slot.
    first.stream.close(None).await.unwrap();
    let mut third = None;
    for _ in 0..100 {
        if let Ok(mut ws) = node.try_connect(Some(&alice), &[]).await {
            assert_eq!(ws.recv().await["kind"], "connected");
            third = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut third = third.expect("a slot was freed when a socket closed");
    echo_run(&mut third, &session, events.len() as u64 + 1).await;
}

// ---------------------------------------------------------------- 3. subscriptions per socket

async fn subscriptions_per_socket_are_limited(db: Db) {
    let node = TestNode::start_with(db, |c| c.max_subscriptions_per_socket = 2).await;
    let token = node.token(&user());
    let (s1, s2, s3) = (
        node.create_session(&token, "script").await,
        node.create_session(&token, "script").await,
        node.create_session(&token, "script").await,
    );
    let mut ws = node.connect(&token).await;
    ws.subscribe(&s1, 0).await;
    assert_eq!(reply(&mut ws).await["sessionId"], s1.as_str());
    ws.subscribe(&s2, 0).await;
    assert_eq!(reply(&mut ws).await["sessionId"], s2.as_str());
    ws.subscribe(&s3, 0).await;
    let refused = reply(&mut ws).await;
    assert_protocol_error(&refused, "RATE_LIMITED");
    assert_eq!(refused["sessionId"], s3.as_str());
    // Re-subscribing to a session already held takes no new slot.
    ws.subscribe(&s1, 0).await;
    let ack = reply(&mut ws).await;
    assert_eq!((ack["kind"].as_str(), ack["sessionId"].as_str()), (Some("chat_subscribed"), Some(s1.as_str())));
    // A chat.send that would need a third subscription starts nothing.
    ws.send_chat(&s3, "no slot").await;
    let refused = reply(&mut ws).await;
    assert_protocol_error(&refused, "RATE_LIMITED");
    assert_eq!(refused["sessionId"], s3.as_str());
    assert!(running(&node, &token).await.is_empty());
    // Nothing was subscribed: a run on s3 from another socket is not delivered here,
    // while s1's events still are.
    let mut other = node.connect(&token).await;
    let s3_top = echo_run(&mut other, &s3, 1).await.last().unwrap()["seq"].clone();
    let mut on_s1 = node.connect(&token).await;
    echo_run(&mut on_s1, &s1, 1).await;
    let frames = ws.recv_until(|v| v["kind"] == "complete" && v["sessionId"] == s1.as_str()).await;
    let of_s3 = |v: &&Value| v["sessionId"] == s3.as_str() && v["kind"] != "session_upserted";
    assert!(frames.iter().filter(of_s3).count() == 0, "an event of s3 arrived: {frames:?}");
    // Unsubscribing frees a slot.
    ws.send(json!({ "type": "chat.unsubscribe", "sessions": [s2] })).await;
    ws.subscribe(&s3, 0).await;
    let ack = reply(&mut ws).await;
    assert_eq!((ack["kind"].as_str(), ack["sessionId"].as_str()), (Some("chat_subscribed"), Some(s3.as_str())));
    assert_eq!(ack["lastSeq"], s3_top);
    // Several targets in one frame: each over the limit is refused on its own.
    ws.send(json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": s1 }, { "sessionId": s2 }] })).await;
    let first = reply(&mut ws).await;
    assert_eq!((first["kind"].as_str(), first["sessionId"].as_str()), (Some("chat_subscribed"), Some(s1.as_str())));
    let second = reply(&mut ws).await;
    assert_protocol_error(&second, "RATE_LIMITED");
    assert_eq!(second["sessionId"], s2.as_str());
    assert!(refusals(&node, "subscriptions_per_socket").await >= 3.0);
}

// ---------------------------------------------------------------- 4. chat.send per user per minute

async fn sends_per_minute_are_limited(db: Db) {
    let node = TestNode::start_with(db, |c| c.max_sends_per_minute = 2).await;
    let alice = node.token(&user());
    let session = node.create_session(&alice, "script").await;
    let mut ws = node.connect(&alice).await;
    let first = echo_run(&mut ws, &session, 1).await;
    let second = echo_run(&mut ws, &session, first.len() as u64 + 1).await;
    let top = second.last().unwrap()["seq"].as_u64().unwrap();
    // The third within the minute: refused, nothing started, the socket open.
    ws.send_chat(&session, "one too many").await;
    let refused = reply(&mut ws).await;
    assert_protocol_error(&refused, "RATE_LIMITED");
    assert_eq!(refused["sessionId"], session.as_str());
    // From another socket of the same user too: the count is the user's.
    let mut tab = node.connect(&alice).await;
    tab.send_chat(&session, "other tab").await;
    assert_protocol_error(&reply(&mut tab).await, "RATE_LIMITED");
    assert!(running(&node, &alice).await.is_empty());
    ws.subscribe(&session, 0).await;
    let ack = reply(&mut ws).await;
    assert_eq!((ack["isProcessing"].as_bool(), ack["lastSeq"].as_u64()), (Some(false), Some(top)));
    node.history_complete(&alice, &session, Some(top)).await;
    assert_eq!(prompts(&node, &alice, &session).await, 2, "the refused prompts are not in history");
    // Other users have their own budget.
    let bob = node.token(&user());
    let bob_session = node.create_session(&bob, "script").await;
    let mut bobs = node.connect(&bob).await;
    echo_run(&mut bobs, &bob_session, 1).await;
    assert!(refusals(&node, "sends_per_minute").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_per_minute_hold_across_the_cluster() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let a = cluster_node(&redis_url(), &format!("limits-a-{tag}"), |c| c.max_sends_per_minute = 3).await;
    let b = cluster_node(&redis_url(), &format!("limits-b-{tag}"), |c| c.max_sends_per_minute = 3).await;
    let who = user();
    let token = a.token(&who);
    let session = a.create_session(&token, "script").await;
    let mut on_a = a.connect(&token).await;
    let mut on_b = b.connect(&token).await;
    let mut next = 1;
    for on_b_node in [false, false, true] {
        let ws = if on_b_node { &mut on_b } else { &mut on_a };
        next += echo_run(ws, &session, next).await.len() as u64;
    }
    // The sender on A follows the session: it saw B's run too.
    assert_eq!(on_a.run_events(&session).await.last().unwrap()["seq"].as_u64(), Some(next - 1));
    for ws in [&mut on_b, &mut on_a] {
        ws.send_chat(&session, "over the cluster-wide limit").await;
        let refused = reply(ws).await;
        assert_protocol_error(&refused, "RATE_LIMITED");
        assert_eq!(refused["sessionId"], session.as_str());
    }
    assert!(running(&b, &token).await.is_empty());
    // Both sockets stay open and subscribed state is intact.
    on_b.subscribe(&session, 0).await;
    let ack = reply(&mut on_b).await;
    assert_eq!((ack["isProcessing"].as_bool(), ack["lastSeq"].as_u64()), (Some(false), Some(next - 1)));
    // Another user on the same nodes is unaffected.
    let other = a.token(&user());
    let other_session = a.create_session(&other, "script").await;
    let mut ws = b.connect(&other).await;
    echo_run(&mut ws, &other_session, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rate_without_redis_is_backend_unavailable() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    let node = cluster_node(&redis.url(), &format!("limits-r-{}", uuid::Uuid::new_v4().simple()), |c| {
        c.max_sends_per_minute = 5;
        c.run_lease = Duration::from_secs(1);
    })
    .await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    let events = echo_run(&mut ws, &session, 1).await;
    redis.kill();
    ws.send_chat(&session, "redis is away").await;
    let refused = reply(&mut ws).await;
    assert_protocol_error(&refused, "BACKEND_UNAVAILABLE");
    assert_eq!(refused["sessionId"], session.as_str());
    redis.restart().expect("private redis-server restarts");
    // Once Redis is back, sends go through again (the socket stayed open): after one lease,
    // since Redis came back empty and a run could have been live. Refused sends count
    // against the limit (5 a minute here), so they are spaced out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        ws.send_chat(&session, "redis is back").await;
        let frame = reply(&mut ws).await;
        if frame["kind"] == "protocol_error" && frame["code"] == "BACKEND_UNAVAILABLE" {
            assert!(tokio::time::Instant::now() < deadline, "sends never recovered");
            tokio::time::sleep(Duration::from_millis(600)).await;
            continue;
        }
        let mut run = vec![frame];
        if run[0]["kind"] != "complete" {
            run.extend(ws.recv_until(|v| v["kind"] == "complete").await);
        }
        let run: Vec<Value> = run.into_iter().filter(|v| v.get("seq").is_some()).collect();
        assert!(run[0]["seq"].as_u64().unwrap() > events.last().unwrap()["seq"].as_u64().unwrap());
        assert_eq!(run.last().unwrap()["exitCode"], 0);
        break;
    }
}

// ---------------------------------------------------------------- 5. inbound frames per socket

/// A node allowing one frame a second with a burst of 10, a user's token and session.
async fn frame_limited_node() -> (TestNode, String, String) {
    let node = TestNode::start_with(Db::Sqlite, |c| {
        c.frame_rate = 1;
        c.frame_burst = 10;
    })
    .await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    (node, token, session)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_rate_are_dropped_with_one_notice() {
    let (node, token, session) = frame_limited_node().await;
    let mut ws = node.connect(&token).await;
    for _ in 0..15 {
        let frame = json!({ "type": "chat.nope" }).to_string();
        ws.stream.feed(Message::Text(frame.into())).await.unwrap();
    }
    ws.stream.flush().await.unwrap();
    let mut answers = Vec::new();
    while let Some(frame) = ws.try_recv(Duration::from_millis(500)).await {
        let frame = frame.expect("the socket stays open");
        if frame["kind"] != "session_upserted" {
            answers.push(frame);
        }
    }
    let unknown = answers.iter().filter(|f| f["code"] == "UNKNOWN_MESSAGE_TYPE").count();
    let limited: Vec<&Value> = answers.iter().filter(|f| f["code"] == "RATE_LIMITED").collect();
    assert_eq!(unknown, 10, "the burst is answered: {answers:?}");
    assert_eq!(limited.len(), 1, "one notice for the window, not one per frame: {answers:?}");
    assert_protocol_error(limited[0], "RATE_LIMITED");
    assert_eq!(answers.len(), 11);
    // Pongs do not count.
    for _ in 0..50 {
        ws.stream.send(Message::Pong(Default::default())).await.unwrap();
    }
    // After the window the socket works again, runs and all.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    echo_run(&mut ws, &session, 1).await;
    assert!(refusals(&node, "frames_per_second").await >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_flood_is_closed_with_1008() {
    let (node, token, session) = frame_limited_node().await;
    let mut bystander = node.connect(&token).await;
    bystander.subscribe(&session, 0).await;
    assert_eq!(reply(&mut bystander).await["kind"], "chat_subscribed");
    let mut flood = node.connect(&token).await;
    // 10 accepted, then more than 4 × 10 dropped within a second.
    for _ in 0..200 {
        let frame = json!({ "type": "chat.abort", "sessionId": session }).to_string();
        if flood.stream.feed(Message::Text(frame.into())).await.is_err() {
            break;
        }
    }
    let _ = flood.stream.flush().await;
    assert_eq!(flood.closed(Duration::from_secs(5)).await, Some(1008));
    assert!(refusals(&node, "frame_flood").await >= 1.0);
    // The node, the user's other socket and the session are fine.
    let mut fresh = node.connect(&token).await;
    let events = echo_run(&mut fresh, &session, 1).await;
    assert_eq!(seqs(&bystander.run_events(&session).await), seqs(&events));
}

// ---------------------------------------------------------------- 6. handshake timeout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_headers_are_cut_off() {
    let node = TestNode::start_with(Db::Sqlite, |c| c.handshake_timeout = Duration::from_secs(1)).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let before = refusals(&node, "handshake_timeout").await;
    let started = tokio::time::Instant::now();
    let mut slow = TcpStream::connect(node.node().addr).await.unwrap();
    slow.write_all(b"GET /ws?token=").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Dribbling more bytes does not extend the deadline.
    slow.write_all(token.as_bytes()).await.unwrap();
    slow.write_all(b" HTTP/1.1\r\nHost: chatgate\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let mut read = 0;
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    assert!(outcome.is_ok(), "the server kept a half-sent request open for 5 s");
    assert!(elapsed >= Duration::from_millis(900), "closed after {elapsed:?}, before the timeout");
    assert!(elapsed < Duration::from_millis(2500), "closed after {elapsed:?}");
    assert!(!String::from_utf8_lossy(&buf[..read.min(buf.len())]).contains("101"), "no upgrade happened");
    // A connection that sends nothing at all is cut off too.
    let mut silent = TcpStream::connect(node.node().addr).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "an idle connection stayed open");
    assert!(refusals(&node, "handshake_timeout").await >= before + 2.0);
    // A WebSocket outlives the timeout (hyper no longer reads it), and works.
    let mut ws = node.connect(&token).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    echo_run(&mut ws, &session, 1).await;
}

/// A REST body trickled in must still arrive whole within the timeout (counted from the
/// end of the head): 408 in the error envelope, nothing created, the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_rest_bodies_are_cut_off_with_408() {
    let node = TestNode::start_with(Db::Sqlite, |c| c.handshake_timeout = Duration::from_secs(1)).await;
    let token = node.token(&user());
    let before = refusals(&node, "handshake_timeout").await;
    let project = node.workspaces.join("proj");
    let body = json!({ "provider": "script", "projectPath": project }).to_string();
    let head = format!(
        "POST /api/providers/sessions HTTP/1.1\r\nHost: chatgate\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let started = tokio::time::Instant::now();
    let mut slow = TcpStream::connect(node.node().addr).await.unwrap();
    slow.write_all(head.as_bytes()).await.unwrap();
    // One byte every 200 ms: never idle for long, but the whole body would take seconds.
    let mut response = Vec::new();
    for byte in body.as_bytes().iter().take(15) {
        if slow.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut response)).await;
    let elapsed = started.elapsed();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("\"REQUEST_TIMEOUT\""), "{response}");
    assert!(elapsed >= Duration::from_millis(900), "answered after {elapsed:?}, before the timeout");
    assert!(refusals(&node, "handshake_timeout").await > before);
    // Nothing was created; a body sent at once is served.
    let (_, list) = node.request("GET", "/api/providers/sessions", &token, None).await;
    assert_eq!(list["data"]["total"], 0, "{list}");
    node.create_session(&token, "script").await;
}

// ---------------------------------------------------------------- 7. REST body size

async fn rest_bodies_over_the_limit_get_413(db: Db) {
    let node = TestNode::start_with(db, |c| c.max_body_bytes = 1024).await;
    let token = node.token(&user());
    let project = node.workspaces.join("proj");
    let big = json!({ "provider": "script", "projectPath": project, "summary": "x".repeat(2000) });
    let (status, body) = node.request("POST", "/api/providers/sessions", &token, Some(big)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], "PAYLOAD_TOO_LARGE", "{body}");
    // A chunked body (no Content-Length) is cut off while it is read.
    let chunk = json!({ "provider": "script", "projectPath": project, "summary": "y".repeat(3000) }).to_string();
    let request = format!(
        "POST /api/providers/sessions HTTP/1.1\r\nHost: chatgate\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let mut tcp = TcpStream::connect(node.node().addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("\"PAYLOAD_TOO_LARGE\""), "{response}");
    // Nothing was created; a body under the limit works.
    let (_, list) = node.request("GET", "/api/providers/sessions", &token, None).await;
    assert_eq!(list["data"]["total"], 0, "{list}");
    let session = node.create_session(&token, "script").await;
    let (status, renamed) = node
        .request("PUT", &format!("/api/providers/sessions/{session}"), &token, Some(json!({ "summary": "ok" })))
        .await;
    assert_eq!(status, 200, "{renamed}");
    assert!(refusals(&node, "body_bytes").await >= 2.0);
}

// ---------------------------------------------------------------- 8. replay bytes per subscribe

async fn replay_is_bounded_and_says_so(db: Db) {
    const CAP: usize = 4096;
    let node = TestNode::start_with(db, |c| c.max_replay_bytes = CAP).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut owner = node.connect(&token).await;
    owner.send_chat(&session, r#"{"events":300,"payloadBytes":200,"intervalMs":10}"#).await;
    // Let 60 events (~16 KB) pile up in the replay window.
    owner.recv_until(|v| v["sessionId"] == session.as_str() && v["seq"].as_u64().is_some_and(|s| s >= 60)).await;
    let mut late = node.connect(&token).await;
    late.subscribe(&session, 0).await;
    let ack = reply(&mut late).await;
    assert_eq!(ack["kind"], "chat_subscribed", "{ack}");
    assert_eq!(ack["isProcessing"], true);
    assert_eq!(ack["replayTruncated"], true, "a cut replay is announced");
    let top = ack["lastSeq"].as_u64().unwrap();
    let rest = late.run_events(&session).await;
    let replayed: Vec<&Value> = rest.iter().filter(|v| v["seq"].as_u64().unwrap() <= top).collect();
    let bytes: usize = replayed.iter().map(|v| v.to_string().len()).sum();
    assert!(bytes <= CAP, "replayed {bytes} bytes");
    assert!(!replayed.is_empty() && replayed.len() < top as usize, "{} of {top} replayed", replayed.len());
    // The newest events, then live, without any further gap.
    assert_eq!(replayed.last().unwrap()["seq"].as_u64(), Some(top));
    assert_contiguous(&rest, rest[0]["seq"].as_u64().unwrap());
    assert_eq!(rest.last().unwrap()["kind"], "complete");
    // Under the bound: the whole replay, not truncated. The run waits on a permission so what
    // there is to replay stays put (a few events) however slow the machine is.
    owner.run_events(&session).await;
    let script = json!({ "permission": { "toolName": "Bash", "input": { "command": "ls" }, "timeoutMs": 30_000 },
                         "events": 20, "payloadBytes": 10 });
    owner.send_chat(&session, &script.to_string()).await;
    let request = owner.recv_until(|v| v["kind"] == "permission_request").await.pop().unwrap();
    let mut small = node.connect(&token).await;
    small.subscribe(&session, rest.last().unwrap()["seq"].as_u64().unwrap()).await;
    let ack = reply(&mut small).await;
    assert_eq!((ack["isProcessing"].as_bool(), ack["replayTruncated"].as_bool()), (Some(true), Some(false)), "{ack}");
    owner.send(json!({ "type": "chat.permission-response", "requestId": request["requestId"], "allow": true })).await;
    let events = small.run_events(&session).await;
    assert_contiguous(&events, rest.last().unwrap()["seq"].as_u64().unwrap() + 1);
    assert!(events.iter().any(|v| v["seq"] == request["seq"]), "the replay holds the permission request");
    assert_eq!(events.iter().filter(|v| v["kind"] == "stream_delta").count(), 20);
    assert!(refusals(&node, "replay_bytes").await >= 1.0);
}

db_tests!(
    sockets_per_user_are_limited,
    subscriptions_per_socket_are_limited,
    sends_per_minute_are_limited,
    rest_bodies_over_the_limit_get_413,
    replay_is_bounded_and_says_so,
);

/// The per-IP connection budget behind a real nginx (`proxy_add_x_forwarded_for`, as the
/// ingress controller sets it): with nginx's address trusted, each client has its own budget;
/// without it, every client shares nginx's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_the_per_ip_budget_is_each_real_clients() {
    use chatgate_testkit::{balancer::Balancer, ws::source_address};
    if chatgate_testkit::balancer::nginx_bin().is_none() {
        panic!("nginx is not installed (scripts/test.sh installs it)");
    }
    let limited = |c: &mut chatgate::config::Config| {
        c.conn_rate_per_ip = 1;
        c.conn_burst_per_ip = 2;
    };
    for trusted in [true, false] {
        let node = TestNode::start_with(Db::Sqlite, |c| {
            limited(c);
            if trusted {
                c.trusted_proxies = Some(vec!["127.0.0.1/32".parse().unwrap()]);
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let port = chatgate_testkit::ports::free_port().unwrap();
        let nginx = Balancer::start(dir.path(), port, &[node.node().addr.port()]).await.expect("nginx starts");
        let lb: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let token = node.token(&user());
        let (alice, bob) = (source_address(0), source_address(1));
        let open = |source| chatgate_testkit::ws::open(lb, &token, Some(source));
        let _a1 = open(alice).await.expect("alice's first socket");
        let _a2 = open(alice).await.expect("alice's second socket");
        assert!(open(alice).await.is_err(), "alice's burst is spent (trusted: {trusted})");
        let bob_first = open(bob).await;
        if trusted {
            bob_first.expect("bob behind the same nginx has his own budget");
        } else {
            assert!(bob_first.is_err(), "untrusted, nginx's address is everyone's: bob shares alice's spent budget");
        }
        nginx.stop().await;
    }
}
