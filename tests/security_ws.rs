//! Security suite, WebSocket side (issue 8 part 4), on one node, SQLite and
//! PostgreSQL. Each case asserts the refusal (the exact code of docs/protocol.md §Errors and close codes)
//! and that nothing leaked or changed, checked through the victim's own
//! sockets and REST calls afterwards.
//!
//! Already covered elsewhere and not repeated here: `ws_bad_input.rs`
//! (malformed frames, 1009 at a small and the default limit, binary frames,
//! send/abort/subscribe on another user's running session, an intruder's
//! approval answer, forged / `alg: none` / expired / garbage tokens refused
//! with 401, 4401 on expiry, Origin refused with 1008 for three origins),
//! `ws_protocol.rs` (`cwd` outside the project, `session_upserted` to the
//! owner only), `cluster.rs` (a stranger's approval answer from another node).
//!
//! Here: the full matrix of verbs with another user's session and pending
//! request id while an approval waits (victim history, summary, run and
//! approval checked untouched, nothing of theirs in anything the intruder
//! got); every wrong token (algorithms, key confusion, `nbf`, claims,
//! encodings) and header-vs-query precedence at the upgrade; the Origin
//! allow-list, including frames sent before the 1008; `cwd` traversal
//! (encoded, NUL, symlinks out, prefix tricks); frame abuse (fragmented
//! oversize, invalid UTF-8, reserved opcodes, JSON bombs 100k deep, huge
//! strings inside the limit) with a bystander's run unaffected.

mod common;
mod security_support;

use std::time::Duration;

use common::{
    Db, SECRET, TestNode, Ws, assert_contiguous, assert_protocol_error, expired_token, forged_token, kinds, mint, user,
};
use futures_util::SinkExt;
use security_support::{Surface, bad_tokens, foreign_ids_against_a_waiting_run, next, silent, unix_now, urlencode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{
    self, Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

/// The HTTP status of a refused upgrade; panics if it upgraded.
fn refused(result: Result<Ws, tungstenite::Error>, what: &str) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("{what}: expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("{what}: upgraded"),
    }
}

/// Connects with the token and header given, reads the `connected` frame.
async fn upgraded(node: &TestNode, query: Option<&str>, headers: &[(&str, &str)], what: &str) -> Ws {
    let mut ws = match node.try_connect(query, headers).await {
        Ok(ws) => ws,
        Err(e) => panic!("{what}: refused: {e}"),
    };
    let hello = next(&mut ws, what).await;
    assert_eq!(hello["kind"], "connected", "{what}: {hello}");
    ws
}

/// Whose socket this is: the session it can see (a real ack) and the one it cannot.
async fn assert_socket_belongs_to(ws: &mut Ws, mine: &str, not_mine: &str, what: &str) {
    ws.subscribe(mine, 0).await;
    let ack = next(ws, what).await;
    assert_eq!(ack["sessionId"], mine, "{what}: {ack}");
    assert!(ack["lastSeq"].as_u64().is_some_and(|s| s > 0), "{what}: not the owner's view: {ack}");
    ws.subscribe(not_mine, 0).await;
    let ack = next(ws, what).await;
    assert_eq!((ack["sessionId"].as_str(), ack["lastSeq"].as_u64()), (Some(not_mine), Some(0)), "{what}: {ack}");
}

// ---------------------------------------------------------------------------
// Another user's session and request ids on every verb.

async fn foreign_session_and_request_ids_on_every_verb(db: Db) {
    foreign_ids_against_a_waiting_run(db, Surface::Verbs).await;
}

// ---------------------------------------------------------------------------
// Tokens at the upgrade.

async fn every_bad_token_is_refused_at_the_upgrade(db: Db) {
    let node = TestNode::start(db).await;
    let who = user();
    for (name, token) in bad_tokens(&who) {
        let query = format!("{}?token={}", node.ws_url, urlencode(&token));
        assert_eq!(refused(Ws::try_connect(&query, &[]).await, &name), 401, "?token= {name}");
        let bearer = format!("Bearer {token}");
        assert_eq!(refused(node.try_connect(None, &[("Authorization", &bearer)]).await, &name), 401, "Bearer {name}");
    }
    for (name, header) in [
        ("empty query token", None),
        ("Bearer with nothing", Some("Bearer ")),
        ("Bearer: with a colon", Some("Bearer: x")),
        ("Token scheme", Some("Token abc")),
        ("Basic credentials", Some("Basic dXNlcjpwYXNz")),
    ] {
        let url = format!("{}?token=", node.ws_url);
        let headers: Vec<(&str, &str)> = header.map(|h| ("Authorization", h)).into_iter().collect();
        assert_eq!(refused(Ws::try_connect(&url, &headers).await, name), 401, "{name}");
    }
    // A valid token still works, and nothing the refused tokens named exists.
    let token = node.token(&who);
    let (status, listed) = node.request("GET", "/api/providers/sessions", &token, None).await;
    assert_eq!((status, &listed["data"]["total"]), (200, &json!(0)), "{listed}");
    let mut ws = upgraded(&node, Some(&token), &[], "valid token").await;
    silent(&mut ws, Duration::from_millis(50), "valid socket").await;
}

/// docs/protocol.md §Authentication: the token comes in the header or the query, and
/// the header wins. A bad header is never rescued by a good query, two
/// `?token=`s or two `Authorization` headers are refused, and a socket
/// belongs to exactly one user: the header's.
async fn header_and_query_tokens_precedence_at_the_upgrade(db: Db) {
    let node = TestNode::start(db).await;
    let (alice, bob) = (user(), user());
    let (alice_token, bob_token) = (node.token(&alice), node.token(&bob));
    let alice_session = node.create_session(&alice_token, "script").await;
    let bob_session = node.create_session(&bob_token, "script").await;
    for (token, session) in [(&alice_token, &alice_session), (&bob_token, &bob_session)] {
        let mut ws = node.connect(token).await;
        ws.send_chat(session, "one").await;
        ws.run_events(session).await;
    }
    let bearer = |t: &str| format!("Bearer {t}");
    let forged = forged_token(&alice);
    let expired = expired_token(&alice);

    // A bad header is not rescued by a good query.
    for bad in [&forged, &expired, &"garbage".to_string()] {
        let what = format!("Bearer {bad} + ?token=good");
        let got = node.try_connect(Some(&alice_token), &[("Authorization", &bearer(bad))]).await;
        assert_eq!(refused(got, &what), 401, "{what}");
    }
    // Two query tokens, either order, and two Authorization headers (bad first).
    for query in [format!("token={alice_token}&token=garbage"), format!("token=garbage&token={alice_token}")] {
        let got = Ws::try_connect(&format!("{}?{query}", node.ws_url), &[]).await;
        assert_eq!(refused(got, &query), 401, "{query}");
    }
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(node.ws_url.as_str()).unwrap();
    for value in [bearer(&forged), bearer(&alice_token)] {
        request.headers_mut().append("Authorization", value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 401),
        Err(e) => panic!("two Authorization headers: {e}"),
        Ok(_) => panic!("two Authorization headers, the first forged: upgraded"),
    }

    // Good header, any query: the header's user, whatever the query says.
    for query in [Some(bob_token.as_str()), Some("garbage"), Some(forged.as_str()), None] {
        let what = format!("Bearer alice + ?token={query:?}");
        let mut ws = upgraded(&node, query, &[("Authorization", &bearer(&alice_token))], &what).await;
        assert_socket_belongs_to(&mut ws, &alice_session, &bob_session, &what).await;
    }
    // A header that carries no bearer token leaves the query in charge.
    for header in ["Basic dXNlcjpwYXNz", "Bearer "] {
        let what = format!("Authorization: {header} + ?token=bob");
        let mut ws = upgraded(&node, Some(&bob_token), &[("Authorization", header)], &what).await;
        assert_socket_belongs_to(&mut ws, &bob_session, &alice_session, &what).await;
    }
}

/// `userId` and `sub` are the identity verbatim: a user id with extra spaces
/// is another user, not the trimmed one.
async fn padded_user_ids_are_other_users(db: Db) {
    let node = TestNode::start(db).await;
    let alice = user();
    let token = node.token(&alice);
    let session = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&session, "mine").await;
    ws.run_events(&session).await;
    for lookalike in [format!(" {alice}"), format!("{alice} "), format!("{alice}\t"), format!("\n{alice}")] {
        let impostor = mint(&lookalike, Duration::from_secs(3600));
        let sub = common::signed(SECRET.as_bytes(), json!({ "sub": lookalike, "exp": unix_now() + 3600 }));
        for impostor in [impostor, sub] {
            let (status, listed) = node.request("GET", "/api/providers/sessions", &impostor, None).await;
            assert_eq!(status, 200, "{listed}");
            assert_eq!(listed["data"]["total"], 0, "{lookalike:?} sees {alice:?}'s sessions: {listed}");
            let (status, _) = node.request("GET", &format!("/api/providers/sessions/{session}"), &impostor, None).await;
            assert_eq!(status, 404, "{lookalike:?}");
            let mut other = node.connect(&impostor).await;
            other.subscribe(&session, 0).await;
            let ack = next(&mut other, "impostor ack").await;
            assert_eq!(ack["lastSeq"], 0, "{lookalike:?}: {ack}");
        }
    }
}

// ---------------------------------------------------------------------------
// Origin.

async fn origin_allow_list_refuses_with_1008_before_reading_anything(db: Db) {
    let allowed = ["https://good.example", "http://localhost:5173"];
    let node =
        TestNode::start_with(db, |c| c.allowed_origins = Some(allowed.iter().map(|s| s.to_string()).collect())).await;
    let who = user();
    let token = node.token(&who);
    let session = node.create_session(&token, "script").await;
    let refused_origins = [
        "https://evil.example",
        "https://GOOD.example",
        "HTTPS://good.example",
        "https://good.example/",
        "https://good.example:443",
        "http://good.example",
        "https://xgood.example",
        "https://good.example.evil.example",
        "https://evil.example/https://good.example",
        "https://good.example, https://evil.example",
        "http://localhost:5174",
        "http://localhost",
        "null",
        "",
        "*",
    ];
    for origin in refused_origins {
        let mut ws = match node.try_connect(Some(&token), &[("Origin", origin)]).await {
            Ok(ws) => ws,
            Err(e) => panic!("Origin {origin:?}: expected an upgrade closed with 1008, got {e}"),
        };
        // Frames sent before the close are never read (the server may already be gone).
        let send = json!({ "type": "chat.send", "sessionId": session, "content": r#"{"events":3}"# });
        let subscribe = json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": session }] });
        for frame in [send, subscribe] {
            let _ = ws.stream.send(Message::Text(frame.to_string().into())).await;
        }
        match ws.try_recv(Duration::from_secs(5)).await {
            Some(Err(code)) => assert_eq!(code, Some(1008), "Origin {origin:?}"),
            other => panic!("Origin {origin:?}: expected a 1008 close and nothing before it, got {other:?}"),
        }
    }
    // A bad token with a refused Origin is still a plain 401.
    let got = node.try_connect(Some("garbage"), &[("Origin", "https://evil.example")]).await;
    assert_eq!(refused(got, "bad token, bad origin"), 401);
    // Nothing was started by the refused sockets.
    let (_, shown) = node.request("GET", &format!("/api/providers/sessions/{session}"), &token, None).await;
    assert_eq!((shown["data"]["lastSeq"].as_u64(), shown["data"]["isProcessing"].as_bool()), (Some(0), Some(false)));
    assert_eq!(node.history(&token, &session).await["total"], 0);
    // Allowed origins and non-browser clients (no Origin) work.
    for origin in allowed.iter().copied().map(Some).chain([None]) {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        let mut ws = upgraded(&node, Some(&token), &headers, &format!("Origin {origin:?}")).await;
        ws.send_chat(&session, "hello there").await;
        let events = ws.run_events(&session).await;
        assert_eq!(events.last().unwrap()["exitCode"], 0, "Origin {origin:?}");
    }
    // Without an allow-list any Origin is accepted (the `--allowed-origins` default, README §Configuration).
    let open = TestNode::start(db).await;
    let open_token = open.token(&who);
    upgraded(&open, Some(&open_token), &[("Origin", "https://evil.example")], "no allow-list").await;
}

// ---------------------------------------------------------------------------
// `cwd` traversal in chat.send options.

async fn cwd_traversal_is_invalid_options_and_starts_nothing(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let root = node.workspaces.clone();
    let project = root.join("proj");
    std::fs::create_dir_all(project.join("sub")).unwrap();
    std::fs::create_dir_all(root.join("proj-evil")).unwrap();
    std::fs::write(project.join("file.txt"), "x").unwrap();
    let outside = node.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, project.join("out")).unwrap();
    std::os::unix::fs::symlink("/", project.join("slash")).unwrap();
    std::os::unix::fs::symlink("../proj-evil", project.join("sibling")).unwrap();
    std::os::unix::fs::symlink(node.dir.path().join("nowhere"), project.join("dangling")).unwrap();
    std::os::unix::fs::symlink("loop", project.join("loop")).unwrap();
    let mut ws = node.connect(&token).await;
    let long = "a/".repeat(50_000);
    let refused = [
        json!("../proj-evil"),
        json!(root.join("proj-evil")),
        json!(format!("{}/../proj-evil", project.display())),
        json!("sub/../../proj-evil"),
        json!("sub/../../../outside"),
        json!("out"),
        json!("out/"),
        json!("slash"),
        json!("slash/etc"),
        json!("sibling"),
        json!("dangling"),
        json!("loop"),
        json!("file.txt"),
        json!("%2e%2e"),
        json!("%2e%2e%2fproj-evil"),
        json!("..%2f..%2f"),
        json!("..\\..\\"),
        json!("\u{ff0e}\u{ff0e}/proj-evil"),
        json!("sub\u{0}/../.."),
        json!("\u{0}"),
        json!("~"),
        json!("~/"),
        json!("/proc/self/root"),
        json!("/proc/self/cwd"),
        json!(long),
        json!(["sub"]),
        json!({ "path": "sub" }),
        json!(true),
    ];
    for cwd in refused {
        ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "x", "options": { "cwd": cwd } })).await;
        let frame = next(&mut ws, "cwd answer").await;
        assert_eq!(frame["code"], "INVALID_OPTIONS", "cwd {cwd}: {frame}");
        assert_protocol_error(&frame, "INVALID_OPTIONS");
        assert_eq!(frame["sessionId"], id.as_str(), "{cwd}");
    }
    // A `projectPath` in the options is not a way around it.
    ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "x",
        "options": { "projectPath": "/", "cwd": "/etc" } }))
        .await;
    assert_protocol_error(&next(&mut ws, "projectPath option").await, "INVALID_OPTIONS");
    // Nothing was started.
    ws.subscribe(&id, 0).await;
    let idle = next(&mut ws, "ack").await;
    assert_eq!((idle["isProcessing"].as_bool(), idle["lastSeq"].as_u64()), (Some(false), Some(0)), "{idle}");
    assert_eq!(node.history(&token, &id).await["total"], 0);
    // Inside the project (also through `..` that stays inside) runs.
    for cwd in [json!(""), json!("sub/.."), json!("./sub"), json!(format!("{}/sub/../sub", project.display()))] {
        ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "inside", "options": { "cwd": cwd } })).await;
        let events = ws.run_events(&id).await;
        assert_eq!(events.last().unwrap()["exitCode"], 0, "{cwd}");
    }
}

// ---------------------------------------------------------------------------
// Frames: size, encoding, opcodes, JSON bombs, huge strings.

/// A paced run of another user on the same node, read at the end.
struct Bystander {
    token: String,
    session: String,
    ws: Ws,
    events: u64,
}

impl Bystander {
    async fn start(node: &TestNode) -> Bystander {
        let token = node.token(&user());
        let session = node.create_session(&token, "script").await;
        let mut ws = node.connect(&token).await;
        let events = 150;
        ws.send_chat(&session, &format!(r#"{{"events":{events},"intervalMs":15}}"#)).await;
        ws.recv_until(|v| v["kind"] == "stream_delta").await;
        Bystander { token, session, ws, events }
    }

    /// The run went on unaffected: every event once, in order, then a clean complete.
    async fn assert_unaffected(mut self, node: &TestNode) {
        let events = self.ws.run_events(&self.session).await;
        let first = events[0]["seq"].as_u64().unwrap();
        assert_contiguous(&events, first);
        let complete = events.last().unwrap();
        assert_eq!(complete["seq"], self.events + 2, "{complete}");
        assert_eq!((complete["exitCode"].as_i64(), complete["aborted"].as_bool()), (Some(0), Some(false)));
        node.history_complete(&self.token, &self.session, Some(self.events + 2)).await;
    }
}

/// `n`-deep nested arrays.
fn deep_arrays(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}

/// `n`-deep nested objects.
fn deep_objects(n: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n))
}

/// The socket closes without answering, with close code `want`.
async fn assert_closed(ws: &mut Ws, want: u16, what: &str) {
    match ws.try_recv(Duration::from_secs(5)).await {
        Some(Ok(frame)) => panic!("{what}: answered instead of closed: {frame}"),
        Some(Err(code)) => assert_eq!(code, Some(want), "{what}: close code"),
        None => panic!("{what}: socket still open"),
    }
}

async fn bombs_and_huge_strings_get_answers_and_spare_everyone_else(db: Db) {
    let node = TestNode::start_with(db, |c| c.max_frame_bytes = 1024 * 1024).await;
    let bystander = Bystander::start(&node).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    let mut watcher = node.connect(&token).await;
    watcher.subscribe(&id, 0).await;
    next(&mut watcher, "watcher ack").await;

    // 100k-deep nesting, bare and inside each verb: the frame is not a JSON object.
    let bombs = [
        deep_arrays(100_000),
        deep_objects(100_000),
        format!(
            r#"{{"type":"chat.send","sessionId":"{id}","content":"x","options":{{"a":{}}}}}"#,
            deep_arrays(100_000)
        ),
        format!(r#"{{"type":"chat.send","sessionId":"{id}","content":{}}}"#, deep_objects(100_000)),
        format!(r#"{{"type":"chat.subscribe","sessions":{}}}"#, deep_arrays(100_000)),
        format!(
            r#"{{"type":"chat.permission-response","requestId":"r","allow":true,"updatedInput":{}}}"#,
            deep_objects(100_000)
        ),
        format!(r#"{{"type":"chat.abort","sessionId":{}}}"#, deep_arrays(100_000)),
    ];
    for bomb in &bombs {
        assert!(bomb.len() < 1024 * 1024);
        ws.send_text(bomb).await;
        let answer = next(&mut ws, "bomb").await;
        assert_protocol_error(&answer, "INVALID_PAYLOAD");
        assert_eq!(answer["sessionId"], Value::Null, "{answer}");
    }
    // A binary frame near the limit carrying a valid verb is not read as one.
    let verb = json!({ "type": "chat.send", "sessionId": id, "content": "x".repeat(900 * 1024) }).to_string();
    ws.stream.send(Message::Binary(verb.into_bytes().into())).await.unwrap();
    let answer = next(&mut ws, "binary").await;
    assert_protocol_error(&answer, "INVALID_PAYLOAD");
    assert_eq!(answer["sessionId"], Value::Null, "{answer}");
    // Nesting the parser accepts (100 deep) in options is harmless.
    let options: Value = serde_json::from_str(&format!(r#"{{"extra":{}}}"#, deep_arrays(100))).unwrap();
    ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "nested options", "options": options })).await;
    let events = ws.run_events(&id).await;
    assert_eq!(events.last().unwrap()["exitCode"], 0);
    // A script 100k deep inside the content string: the runtime refuses it, the run ends.
    ws.send_chat(&id, &format!(r#"{{"events":{}}}"#, deep_arrays(100_000))).await;
    let events = ws.run_events(&id).await;
    assert_eq!(kinds(&events), ["error", "complete"], "{events:#?}");
    assert_eq!(events[1]["exitCode"], 1);
    let mut top = events.last().unwrap()["seq"].as_u64().unwrap();

    // Huge strings inside the limit: answered (echoing the caller's own input), no crash.
    let huge = "h".repeat(400 * 1024);
    ws.send(json!({ "type": "chat.send", "sessionId": huge, "content": "x" })).await;
    let answer = next(&mut ws, "huge sessionId").await;
    assert_protocol_error(&answer, "SESSION_NOT_FOUND");
    assert_eq!(answer["sessionId"], huge.as_str());
    ws.send(json!({ "type": huge })).await;
    assert_protocol_error(&next(&mut ws, "huge type").await, "UNKNOWN_MESSAGE_TYPE");
    ws.send(json!({ "type": "chat.abort", "sessionId": huge })).await;
    assert_protocol_error(&next(&mut ws, "huge abort").await, "NO_ACTIVE_RUN");
    ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "x", "options": { "cwd": huge } })).await;
    assert_protocol_error(&next(&mut ws, "huge cwd").await, "INVALID_OPTIONS");
    ws.send(json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": huge, "lastSeq": huge }] })).await;
    let ack = next(&mut ws, "huge subscribe").await;
    assert_eq!((ack["kind"].as_str(), ack["lastSeq"].as_u64()), (Some("chat_subscribed"), Some(0)));
    ws.send(json!({ "type": "chat.permission-response", "requestId": huge, "allow": true, "message": huge })).await;
    ws.send(json!({ "type": "chat.unsubscribe", "sessions": [huge] })).await;
    silent(&mut ws, Duration::from_millis(100), "huge silent verbs").await;
    // A huge prompt (one 400 KiB word with NUL and escapes) runs and is stored verbatim.
    let prompt = format!("{}\u{0}\"\\\u{1}{}", "w".repeat(200 * 1024), "é".repeat(100 * 1024));
    ws.send_chat(&id, &prompt).await;
    let events = ws.run_events(&id).await;
    assert_contiguous(&events, top + 1);
    assert_eq!(events.last().unwrap()["exitCode"], 0);
    top = events.last().unwrap()["seq"].as_u64().unwrap();
    let stored = node.history_complete(&token, &id, Some(top)).await;
    let texts: Vec<&Value> = stored.iter().rev().take(3).filter(|m| m["kind"] == "text").collect();
    assert!(texts.iter().any(|m| m["role"] == "assistant" && m["content"] == prompt.as_str()), "assistant text");
    assert!(stored.iter().any(|m| m["role"] == "user" && m["content"] == prompt.as_str()), "prompt stored verbatim");

    // Frames that end the socket: fragmented past the limit (1009), invalid
    // UTF-8 (whole or across fragments), a reserved opcode.
    let closers: Vec<(&str, Vec<Frame>, u16)> = vec![
        (
            "three 400 KiB fragments",
            vec![
                Frame::message(
                    format!(r#"{{"type":"chat.send","sessionId":"{id}","content":""#).into_bytes(),
                    OpCode::Data(Data::Text),
                    false,
                ),
                Frame::message(vec![b'a'; 400 * 1024], OpCode::Data(Data::Continue), false),
                Frame::message(vec![b'a'; 400 * 1024], OpCode::Data(Data::Continue), false),
                Frame::message(
                    [vec![b'a'; 400 * 1024], br#""}"#.to_vec()].concat(),
                    OpCode::Data(Data::Continue),
                    true,
                ),
            ],
            1009,
        ),
        (
            "invalid UTF-8",
            vec![Frame::message(
                b"{\"type\":\"chat.send\",\"content\":\"\xff\xfe\"}".to_vec(),
                OpCode::Data(Data::Text),
                true,
            )],
            1007,
        ),
        (
            "UTF-8 split across fragments, then invalid",
            vec![
                Frame::message(b"{\"type\":\"\xc3".to_vec(), OpCode::Data(Data::Text), false),
                Frame::message(b"\x28\"}".to_vec(), OpCode::Data(Data::Continue), true),
            ],
            1007,
        ),
        ("reserved opcode 3", vec![Frame::message(b"{}".to_vec(), OpCode::Data(Data::Reserved(3)), true)], 1002),
        (
            "continuation without a start",
            vec![Frame::message(b"{}".to_vec(), OpCode::Data(Data::Continue), true)],
            1002,
        ),
    ];
    for (what, frames, code) in closers {
        let mut bad = node.connect(&token).await;
        for frame in frames {
            if bad.stream.send(Message::Frame(frame)).await.is_err() {
                break;
            }
        }
        assert_closed(&mut bad, code, what).await;
    }
    // A valid multi-fragment frame under the limit is read as one message.
    let mut fragmented = node.connect(&token).await;
    let whole = json!({ "type": "chat.abort", "sessionId": "x" }).to_string().into_bytes();
    let (head, tail) = whole.split_at(10);
    fragmented
        .stream
        .send(Message::Frame(Frame::message(head.to_vec(), OpCode::Data(Data::Text), false)))
        .await
        .unwrap();
    fragmented
        .stream
        .send(Message::Frame(Frame::message(tail.to_vec(), OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    assert_protocol_error(&next(&mut fragmented, "fragmented").await, "NO_ACTIVE_RUN");

    // The attacking socket and the user's other socket still work, and the
    // other socket saw exactly the runs above, nothing else.
    ws.send_chat(&id, "still here").await;
    let events = ws.run_events(&id).await;
    assert_contiguous(&events, top + 1);
    let last = events.last().unwrap()["seq"].clone();
    let seen = watcher.recv_until(|v| v["kind"] == "complete" && v["seq"] == last).await;
    let seen: Vec<Value> = seen.into_iter().filter(|v| v.get("seq").is_some()).collect();
    assert_contiguous(&seen, 1);
    assert_eq!(seen.iter().filter(|v| v["kind"] == "complete").count(), 4);
    let (status, _) = node.get_text("/healthz").await;
    assert_eq!(status, 200);
    bystander.assert_unaffected(&node).await;
}

db_tests!(
    foreign_session_and_request_ids_on_every_verb,
    every_bad_token_is_refused_at_the_upgrade,
    header_and_query_tokens_precedence_at_the_upgrade,
    padded_user_ids_are_other_users,
    origin_allow_list_refuses_with_1008_before_reading_anything,
    cwd_traversal_is_invalid_options_and_starts_nothing,
    bombs_and_huge_strings_get_answers_and_spare_everyone_else,
);
