//! The REST surface of docs/protocol.md §REST over real HTTP: every session route with
//! upstream's envelope and status codes, ownership (404 for another user's
//! session), the id pattern, authentication, history paging, health and metrics.
//! Every test runs against SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{Db, TestNode, alg_none_token, assert_history_matches, expired_token, forged_token, signed, user};
use serde_json::{Value, json};

const SESSIONS: &str = "/api/providers/sessions";

/// Asserts an error envelope with `status` and `code`.
#[track_caller]
fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["success"], false, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert!(got.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", got.1);
}

/// Asserts a success envelope with `status`; returns `data`.
#[track_caller]
fn assert_ok(got: &(u16, Value), status: u16) -> Value {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["success"], true, "{}", got.1);
    got.1["data"].clone()
}

/// Asserts `value` is a `Session` object with exactly the fields of docs/protocol.md §REST.
#[track_caller]
fn assert_session_shape(value: &Value) {
    let mut keys: Vec<&str> = value.as_object().expect("session object").keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "sessionId",
        "provider",
        "providerSessionId",
        "projectPath",
        "summary",
        "isArchived",
        "createdAt",
        "updatedAt",
        "lastSeq",
        "isProcessing",
    ];
    want.sort_unstable();
    assert_eq!(keys, want, "{value}");
    for key in ["createdAt", "updatedAt"] {
        let ts = value[key].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() >= 20, "{key} is not ISO-8601: {ts}");
    }
}

async fn create(node: &TestNode, token: &str, body: Value) -> (u16, Value) {
    node.request("POST", SESSIONS, token, Some(body)).await
}

/// Runs plain text through the echo script on a fresh socket; the run's events.
async fn echo(node: &TestNode, token: &str, session: &str, text: &str) -> Vec<Value> {
    let mut ws = node.connect(token).await;
    ws.send_chat(session, text).await;
    ws.run_events(session).await
}

async fn create_validates_provider_and_path(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let root = node.workspaces.clone();
    std::fs::create_dir_all(root.join("proj/sub")).unwrap();

    // Absolute and relative paths inside the root; the answer carries the resolved path.
    let got = create(&node, &token, json!({ "provider": "script", "projectPath": root.join("proj") })).await;
    let data = assert_ok(&got, 201);
    assert_eq!(data["provider"], "script");
    assert_eq!(data["projectPath"], root.join("proj").to_str().unwrap());
    assert!(data["sessionId"].as_str().is_some_and(|id| !id.is_empty()));
    let got = create(&node, &token, json!({ "provider": "script", "projectPath": "proj/sub" })).await;
    assert_eq!(assert_ok(&got, 201)["projectPath"], root.join("proj/sub").to_str().unwrap());

    // Providers: unknown, missing, not a string, known but not enabled.
    for provider in [json!("nope"), Value::Null, json!(7), json!("")] {
        let got = create(&node, &token, json!({ "provider": provider, "projectPath": "proj" })).await;
        assert_error(&got, 400, "UNSUPPORTED_PROVIDER");
    }

    // Summary: at most 500 characters, a string.
    let got =
        create(&node, &token, json!({ "provider": "script", "projectPath": "proj", "summary": "é".repeat(500) })).await;
    assert_eq!(got.0, 201, "{}", got.1);
    for summary in [json!("a".repeat(501)), json!(5)] {
        let got =
            create(&node, &token, json!({ "provider": "script", "projectPath": "proj", "summary": summary })).await;
        assert_eq!((got.0, got.1["success"].as_bool()), (400, Some(false)), "{}", got.1);
    }

    // Project path missing or blank.
    for body in [json!({ "provider": "script" }), json!({ "provider": "script", "projectPath": "   " })] {
        assert_error(&create(&node, &token, body).await, 400, "PROJECT_PATH_REQUIRED");
    }

    // Outside the root: absolute elsewhere, `..`, a sibling sharing the prefix, a symlink escape.
    let sibling = format!("{}-evil", root.display());
    std::fs::create_dir_all(&sibling).unwrap();
    let outside = node.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    let dotdot = format!("{}/proj/../../outside", root.display());
    for path in ["/etc", "/", "..", "../outside", "proj/../../outside", &dotdot, &sibling, "escape", "escape/deeper"] {
        let got = create(&node, &token, json!({ "provider": "script", "projectPath": path })).await;
        assert_error(&got, 400, "PROJECT_PATH_OUTSIDE_WORKSPACES");
    }

    // Bodies that are not a JSON object.
    for (content_type, body) in [
        ("application/json", b"{not json".to_vec()),
        ("application/json", b"[1,2]".to_vec()),
        ("text/plain", b"provider=script".to_vec()),
        ("application/json", Vec::new()),
    ] {
        let got = node.request_raw("POST", SESSIONS, Some(&token), Some((content_type, body))).await;
        assert_eq!(got.0, 400, "{}", got.1);
        assert_eq!(got.1["success"], false, "{}", got.1);
    }

    // Nothing refused was created.
    let list = assert_ok(&node.request("GET", SESSIONS, &token, None).await, 200);
    assert_eq!(list["total"], 3, "{list}");
}

async fn list_newest_first_paged_archived_left_out(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let empty = assert_ok(&node.request("GET", SESSIONS, &token, None).await, 200);
    assert_eq!(empty, json!({ "sessions": [], "total": 0 }));

    let mut ids = Vec::new();
    for i in 0..5 {
        let got =
            create(&node, &token, json!({ "provider": "script", "projectPath": "proj", "summary": format!("s{i}") }))
                .await;
        ids.push(assert_ok(&got, 201)["sessionId"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    let all = assert_ok(&node.request("GET", SESSIONS, &token, None).await, 200);
    assert_eq!(all["total"], 5);
    let listed: Vec<String> =
        all["sessions"].as_array().unwrap().iter().map(|s| s["sessionId"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, newest_first);
    for s in all["sessions"].as_array().unwrap() {
        assert_session_shape(s);
        assert_eq!(s["isArchived"], false);
        assert_eq!(s["isProcessing"], false);
        assert_eq!(s["lastSeq"], 0);
    }
    assert_eq!(all["sessions"][0]["summary"], "s4");

    // limit and offset.
    let page = assert_ok(&node.request("GET", &format!("{SESSIONS}?limit=2&offset=1"), &token, None).await, 200);
    let listed: Vec<&str> =
        page["sessions"].as_array().unwrap().iter().map(|s| s["sessionId"].as_str().unwrap()).collect();
    assert_eq!(listed, [newest_first[1].as_str(), newest_first[2].as_str()]);
    assert_eq!(page["total"], 5);
    let tail = assert_ok(&node.request("GET", &format!("{SESSIONS}?limit=10&offset=4"), &token, None).await, 200);
    assert_eq!(tail["sessions"].as_array().unwrap().len(), 1);
    let past = assert_ok(&node.request("GET", &format!("{SESSIONS}?offset=50"), &token, None).await, 200);
    assert_eq!(past["sessions"], json!([]));
    assert_eq!(past["total"], 5);

    // Archived sessions are left out of the list and the total.
    let archived = &ids[2];
    assert_ok(&node.request("DELETE", &format!("{SESSIONS}/{archived}"), &token, None).await, 200);
    let all = assert_ok(&node.request("GET", SESSIONS, &token, None).await, 200);
    assert_eq!(all["total"], 4);
    assert!(all["sessions"].as_array().unwrap().iter().all(|s| s["sessionId"] != archived.as_str()));

    // `?archived=true` lists the archived ones instead (paged and counted the same way); a
    // restored session leaves that list.
    let only = assert_ok(&node.request("GET", &format!("{SESSIONS}?archived=true"), &token, None).await, 200);
    assert_eq!(only["total"], 1);
    assert_eq!(only["sessions"].as_array().unwrap().len(), 1);
    assert_session_shape(&only["sessions"][0]);
    assert_eq!(only["sessions"][0]["sessionId"], archived.as_str());
    assert_eq!(only["sessions"][0]["isArchived"], true);
    assert_eq!(only["sessions"][0]["summary"], "s2");
    let live = assert_ok(&node.request("GET", &format!("{SESSIONS}?archived=false&limit=2"), &token, None).await, 200);
    assert_eq!(live["total"], 4);
    assert_eq!(live["sessions"].as_array().unwrap().len(), 2);
    let other = node.token(&user());
    let theirs = assert_ok(&node.request("GET", &format!("{SESSIONS}?archived=true"), &other, None).await, 200);
    assert_eq!(theirs, json!({ "sessions": [], "total": 0 }), "another user's archive is not listed");
    assert_ok(&node.request("POST", &format!("{SESSIONS}/{archived}/restore"), &token, None).await, 200);
    let none = assert_ok(&node.request("GET", &format!("{SESSIONS}?archived=true"), &token, None).await, 200);
    assert_eq!(none, json!({ "sessions": [], "total": 0 }));
    assert_ok(&node.request("DELETE", &format!("{SESSIONS}/{archived}"), &token, None).await, 200);

    // Bad paging.
    for query in ["limit=-1", "limit=abc", "offset=-5", "offset=1.5", "limit=1e3"] {
        let got = node.request("GET", &format!("{SESSIONS}?{query}"), &token, None).await;
        assert_eq!(got.0, 400, "{query}: {}", got.1);
        assert_eq!(got.1["success"], false, "{query}: {}", got.1);
    }
}

async fn show_returns_session_and_provider_id_after_first_run(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let got = create(&node, &token, json!({ "provider": "script", "projectPath": "proj", "summary": "hello" })).await;
    let id = assert_ok(&got, 201)["sessionId"].as_str().unwrap().to_string();
    let shown = assert_ok(&node.request("GET", &format!("{SESSIONS}/{id}"), &token, None).await, 200);
    assert_session_shape(&shown);
    assert_eq!(shown["sessionId"], id.as_str());
    assert_eq!(shown["provider"], "script");
    assert_eq!(shown["providerSessionId"], Value::Null);
    assert_eq!(shown["projectPath"], node.workspaces.join("proj").to_str().unwrap());
    assert_eq!(shown["summary"], "hello");
    assert_eq!(shown["isArchived"], false);
    assert_eq!(shown["lastSeq"], 0);

    let events = echo(&node, &token, &id, "a b").await;
    let last = events.last().unwrap()["seq"].as_u64().unwrap();
    node.history_complete(&token, &id, Some(last)).await;
    let shown = assert_ok(&node.request("GET", &format!("{SESSIONS}/{id}"), &token, None).await, 200);
    assert_eq!(shown["lastSeq"], last, "{shown}");
    assert_eq!(shown["isProcessing"], false);
    let provider_id = shown["providerSessionId"].as_str().expect("providerSessionId after the first run");
    let uuid = provider_id.strip_prefix("script-").expect("script-<uuid>");
    assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{provider_id}");
}

async fn rename_accepts_1_to_500_chars(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let path = format!("{SESSIONS}/{id}");

    let got = node.request("PUT", &path, &token, Some(json!({ "summary": "Renamed" }))).await;
    assert_eq!(assert_ok(&got, 200), json!({ "sessionId": id, "summary": "Renamed" }));
    assert_eq!(assert_ok(&node.request("GET", &path, &token, None).await, 200)["summary"], "Renamed");

    for ok in ["x".to_string(), "a".repeat(500), "é".repeat(500)] {
        let got = node.request("PUT", &path, &token, Some(json!({ "summary": ok }))).await;
        assert_eq!(assert_ok(&got, 200)["summary"], ok.as_str());
    }
    for bad in [json!(""), json!("   "), json!("a".repeat(501)), json!("é".repeat(501)), json!(5), Value::Null] {
        let got = node.request("PUT", &path, &token, Some(json!({ "summary": bad }))).await;
        assert_eq!(got.0, 400, "{bad}: {}", got.1);
        assert_eq!(got.1["success"], false);
    }
    let got = node.request("PUT", &path, &token, Some(json!({}))).await;
    assert_eq!(got.0, 400, "{}", got.1);
    let got = node.request_raw("PUT", &path, Some(&token), Some(("application/json", b"nope".to_vec()))).await;
    assert_eq!(got.0, 400, "{}", got.1);
    // The refused renames left the last good one.
    assert_eq!(assert_ok(&node.request("GET", &path, &token, None).await, 200)["summary"], "é".repeat(500));
}

async fn delete_archives_and_restore_brings_back(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let events = echo(&node, &token, &id, "keep me").await;
    let stored = node.history_complete(&token, &id, events.last().unwrap()["seq"].as_u64()).await;

    let got = node.request("DELETE", &format!("{SESSIONS}/{id}"), &token, None).await;
    assert_eq!(assert_ok(&got, 200), json!({ "sessionId": id, "action": "archived" }));
    let shown = assert_ok(&node.request("GET", &format!("{SESSIONS}/{id}"), &token, None).await, 200);
    assert_eq!(shown["isArchived"], true);
    let list = assert_ok(&node.request("GET", SESSIONS, &token, None).await, 200);
    assert_eq!(list["total"], 0);
    // An archived session keeps its history and takes no new run.
    assert_eq!(node.history(&token, &id).await["messages"].as_array().unwrap(), &stored);
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, "hi").await;
    let refused = ws.recv_reply().await;
    common::assert_protocol_error(&refused, "SESSION_NOT_FOUND");
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("archived") && e.contains("/restore")), "{refused}");

    let got = node.request("POST", &format!("{SESSIONS}/{id}/restore"), &token, None).await;
    assert_eq!(assert_ok(&got, 200), json!({ "sessionId": id, "isArchived": false }));
    let list = assert_ok(&node.request("GET", SESSIONS, &token, None).await, 200);
    assert_eq!(list["total"], 1);
    assert_eq!(list["sessions"][0]["sessionId"], id.as_str());
    assert_eq!(list["sessions"][0]["isArchived"], false);
    ws.send_chat(&id, "back again").await;
    let events = ws.run_events(&id).await;
    assert_eq!(events.last().unwrap()["exitCode"], 0);
    // Restoring a live session is harmless.
    assert_ok(&node.request("POST", &format!("{SESSIONS}/{id}/restore"), &token, None).await, 200);
}

async fn force_delete_removes_session_and_history(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let events = echo(&node, &token, &id, "to be deleted").await;
    node.history_complete(&token, &id, events.last().unwrap()["seq"].as_u64()).await;

    let got = node.request("DELETE", &format!("{SESSIONS}/{id}?force=true"), &token, None).await;
    assert_eq!(assert_ok(&got, 200), json!({ "sessionId": id, "action": "deleted" }));
    for (method, path) in [("GET", format!("{SESSIONS}/{id}")), ("GET", format!("{SESSIONS}/{id}/messages"))] {
        assert_error(&node.request(method, &path, &token, None).await, 404, "SESSION_NOT_FOUND");
    }
    let got = node.request("POST", &format!("{SESSIONS}/{id}/restore"), &token, None).await;
    assert_error(&got, 404, "SESSION_NOT_FOUND");
    let page = node.store().await.messages(&id, None, 0, chatgate::store::HistoryView::All).await.unwrap();
    assert_eq!(page.total, 0, "history rows left behind: {:?}", page.messages);
    let got = node.request("DELETE", &format!("{SESSIONS}/{id}?force=true"), &token, None).await;
    assert_error(&got, 404, "SESSION_NOT_FOUND");
}

async fn force_delete_during_run_ends_it_and_leaves_no_history(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, r#"{"events":200,"intervalMs":5}"#).await;
    ws.recv_until(|v| v["kind"] == "stream_delta").await;

    let got = node.request("DELETE", &format!("{SESSIONS}/{id}?force=true"), &token, None).await;
    assert_eq!(assert_ok(&got, 200)["action"], "deleted");
    let tail = ws.run_events(&id).await;
    let complete = tail.last().unwrap();
    assert_eq!(complete["aborted"], true, "{complete}");
    let running = assert_ok(&node.request("GET", &format!("{SESSIONS}/running"), &token, None).await, 200);
    assert_eq!(running["sessions"], json!([]));
    // Give the history writer time to (wrongly) write the run's tail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = node.store().await.messages(&id, None, 0, chatgate::store::HistoryView::All).await.unwrap();
    assert_eq!(page.total, 0, "a deleted session's history came back: {:#?}", page.messages);
}

async fn running_lists_only_the_callers_runs(db: Db) {
    let node = TestNode::start(db).await;
    let (alice, bob) = (node.token(&user()), node.token(&user()));
    let a = node.create_session(&alice, "script").await;
    let idle = node.create_session(&alice, "script").await;
    let b = node.create_session(&bob, "script").await;
    let empty = assert_ok(&node.request("GET", &format!("{SESSIONS}/running"), &alice, None).await, 200);
    assert_eq!(empty, json!({ "sessions": [] }));

    let mut wa = node.connect(&alice).await;
    let mut wb = node.connect(&bob).await;
    wa.send_chat(&a, r#"{"events":300,"intervalMs":5}"#).await;
    wb.send_chat(&b, r#"{"events":300,"intervalMs":5}"#).await;
    let first = wa.recv_until(|v| v["kind"] == "stream_delta").await.pop().unwrap();
    wb.recv_until(|v| v["kind"] == "stream_delta").await;

    let running = assert_ok(&node.request("GET", &format!("{SESSIONS}/running"), &alice, None).await, 200);
    let runs = running["sessions"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{running}");
    let run = &runs[0];
    assert_eq!(run["sessionId"], a.as_str());
    assert_eq!(run["provider"], "script");
    assert_eq!(run["runId"], first["runId"]);
    assert_eq!(run["nodeId"], node.node().node_id.as_str());
    assert!(run["lastSeq"].as_u64().is_some_and(|s| s >= first["seq"].as_u64().unwrap()), "{run}");
    assert!(run["startedAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{run}");
    assert!(runs.iter().all(|r| r["sessionId"] != idle.as_str() && r["sessionId"] != b.as_str()));

    // The session views agree.
    let shown = assert_ok(&node.request("GET", &format!("{SESSIONS}/{a}"), &alice, None).await, 200);
    assert_eq!(shown["isProcessing"], true);
    let list = assert_ok(&node.request("GET", SESSIONS, &alice, None).await, 200);
    let listed = list["sessions"].as_array().unwrap().iter().find(|s| s["sessionId"] == a.as_str()).unwrap().clone();
    assert_eq!(listed["isProcessing"], true);

    for (ws, id) in [(&mut wa, &a), (&mut wb, &b)] {
        ws.send(json!({ "type": "chat.abort", "sessionId": id })).await;
        ws.run_events(id).await;
    }
    let after = assert_ok(&node.request("GET", &format!("{SESSIONS}/running"), &alice, None).await, 200);
    assert_eq!(after, json!({ "sessions": [] }));
}

async fn messages_page_from_the_newest(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let empty = assert_ok(&node.request("GET", &format!("{SESSIONS}/{id}/messages"), &token, None).await, 200);
    assert_eq!(empty["messages"], json!([]));
    assert_eq!(empty["total"], 0);
    assert_eq!(empty["hasMore"], false);

    let run1 = echo(&node, &token, &id, "one two").await;
    let run2 = echo(&node, &token, &id, "three four five").await;
    let last = run2.last().unwrap()["seq"].as_u64().unwrap();
    let all = node.history_complete(&token, &id, Some(last)).await;
    // Per run: prompt, merged text, the echo's text, complete.
    assert_eq!(all.len(), 8, "{all:#?}");
    assert_history_matches(&all[..4], "one two", &run1);
    assert_history_matches(&all[4..], "three four five", &run2);
    assert!(all.iter().all(|m| m.get("seq").is_some()), "every message carries seq");

    let page = |limit: u64, offset: u64| {
        let node = &node;
        let token = &token;
        let id = &id;
        async move {
            let got = node
                .request("GET", &format!("{SESSIONS}/{id}/messages?limit={limit}&offset={offset}"), token, None)
                .await;
            assert_ok(&got, 200)
        }
    };
    // `GET …/messages` lists the conversation: the full record without the runs' `complete`s.
    let conversation: Vec<Value> = all.iter().filter(|m| m["kind"] != "complete").cloned().collect();
    assert_eq!(conversation.len(), 6, "{conversation:#?}");
    let newest = page(3, 0).await;
    assert_eq!(newest["messages"].as_array().unwrap(), &conversation[3..]);
    assert_eq!((newest["total"].as_u64(), newest["hasMore"].as_bool()), (Some(6), Some(true)));
    assert_eq!((newest["offset"].as_u64(), newest["limit"].as_u64()), (Some(0), Some(3)));
    assert_eq!(newest["lastSeq"].as_u64(), Some(last), "lastSeq covers the last complete");
    let oldest = page(3, 3).await;
    assert_eq!(oldest["messages"].as_array().unwrap(), &conversation[..3]);
    assert_eq!(oldest["hasMore"], false);
    let beyond = page(3, 6).await;
    assert_eq!(beyond["messages"], json!([]));
    assert_eq!(beyond["hasMore"], false);
    // Pages of any size stitch back together.
    for size in 1..=7u64 {
        let mut stitched: Vec<Value> = Vec::new();
        let mut offset = 0;
        loop {
            let p = page(size, offset).await;
            let mut msgs = p["messages"].as_array().unwrap().clone();
            msgs.extend(stitched);
            stitched = msgs;
            offset += size;
            if p["hasMore"] == false {
                break;
            }
        }
        assert_eq!(stitched, conversation, "page size {size}");
    }
    let bad = node.request("GET", &format!("{SESSIONS}/{id}/messages?kinds=some"), &token, None).await;
    assert_eq!(bad.0, 400, "{}", bad.1);
    for query in ["limit=-1", "limit=x", "offset=-1", "offset=y"] {
        let got = node.request("GET", &format!("{SESSIONS}/{id}/messages?{query}"), &token, None).await;
        assert_eq!(got.0, 400, "{query}: {}", got.1);
    }
}

async fn history_equals_what_streamed(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let mut ws = node.connect(&token).await;
    let scripts = [
        "the quick  brown\tfox".to_string(),
        r#"{"events":7,"payloadBytes":20,"intervalMs":1}"#.to_string(),
        r#"{"events":3,"fail":"boom"}"#.to_string(),
        r#"{"exitCode":3}"#.to_string(),
        r#"{"permission":{"toolName":"Bash","input":{"command":"ls"},"timeoutMs":5000},"events":2}"#.to_string(),
    ];
    for script in scripts {
        let id = node.create_session(&token, "script").await;
        ws.send_chat(&id, &script).await;
        let mut streamed = Vec::new();
        loop {
            let frame = ws.recv().await;
            if frame["sessionId"] != id.as_str() || frame.get("seq").is_none() {
                continue;
            }
            if frame["kind"] == "permission_request" {
                ws.send(json!({ "type": "chat.permission-response", "requestId": frame["requestId"], "allow": true }))
                    .await;
            }
            let done = frame["kind"] == "complete";
            streamed.push(frame);
            if done {
                break;
            }
        }
        let last = streamed.last().unwrap()["seq"].as_u64();
        let stored = node.history_complete(&token, &id, last).await;
        assert_history_matches(&stored, &script, &streamed);
    }
}

async fn invalid_session_ids_are_400_on_every_route(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let long = "a".repeat(121);
    let bad_ids = ["has%20space", "semi%3Bcolon", "%C3%A9t%C3%A9", "a%2Fb", "star*", "q%3Fx", long.as_str()];
    for id in bad_ids {
        let routes = [
            ("GET", format!("{SESSIONS}/{id}"), None),
            ("PUT", format!("{SESSIONS}/{id}"), Some(json!({ "summary": "x" }))),
            ("DELETE", format!("{SESSIONS}/{id}"), None),
            ("DELETE", format!("{SESSIONS}/{id}?force=true"), None),
            ("POST", format!("{SESSIONS}/{id}/restore"), None),
            ("GET", format!("{SESSIONS}/{id}/messages"), None),
        ];
        for (method, path, body) in routes {
            let got = node.request(method, &path, &token, body).await;
            assert_error(&got, 400, "INVALID_SESSION_ID");
        }
    }
    // 120 characters of the allowed set is a valid (if unknown) id.
    let max = format!("{}.-_", "A9".repeat(58) + "z");
    assert_eq!(max.len(), 120);
    assert_error(&node.request("GET", &format!("{SESSIONS}/{max}"), &token, None).await, 404, "SESSION_NOT_FOUND");
}

/// A path or method no route serves is answered in the envelope too, not an empty body.
async fn unknown_routes_and_methods_answer_in_the_envelope(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    assert_error(&node.request("GET", "/api/nope", &token, None).await, 404, "NOT_FOUND");
    assert_error(&node.request("GET", &format!("{SESSIONS}/{id}/nope"), &token, None).await, 404, "NOT_FOUND");
    let patched = node.request("PATCH", &format!("{SESSIONS}/{id}"), &token, Some(json!({ "summary": "x" }))).await;
    assert_error(&patched, 405, "METHOD_NOT_ALLOWED");
    assert_error(&node.request("DELETE", SESSIONS, &token, None).await, 405, "METHOD_NOT_ALLOWED");
    // Nothing changed.
    let (status, shown) = node.request("GET", &format!("{SESSIONS}/{id}"), &token, None).await;
    assert_eq!(status, 200, "{shown}");
    assert_ne!(shown["data"]["summary"], "x", "{shown}");
}

async fn another_users_session_is_404_everywhere_and_never_listed(db: Db) {
    let node = TestNode::start(db).await;
    let (alice, bob) = (node.token(&user()), node.token(&user()));
    let id = node.create_session(&alice, "script").await;
    let events = echo(&node, &alice, &id, "private words").await;
    let history = node.history_complete(&alice, &id, events.last().unwrap()["seq"].as_u64()).await;
    let missing = uuid::Uuid::new_v4().to_string();

    let routes = |id: &str| {
        vec![
            ("GET", format!("{SESSIONS}/{id}"), None),
            ("PUT", format!("{SESSIONS}/{id}"), Some(json!({ "summary": "mine now" }))),
            ("DELETE", format!("{SESSIONS}/{id}"), None),
            ("DELETE", format!("{SESSIONS}/{id}?force=true"), None),
            ("POST", format!("{SESSIONS}/{id}/restore"), None),
            ("GET", format!("{SESSIONS}/{id}/messages"), None),
            ("GET", format!("{SESSIONS}/{id}/messages?limit=1"), None),
        ]
    };
    for ((method, foreign_path, body), (_, missing_path, _)) in routes(&id).into_iter().zip(routes(&missing)) {
        let foreign = node.request(method, &foreign_path, &bob, body.clone()).await;
        let absent = node.request(method, &missing_path, &bob, body).await;
        assert_error(&foreign, 404, "SESSION_NOT_FOUND");
        // Exactly as if it did not exist: same status, code and message (modulo the id).
        let normalized = foreign.1.to_string().replace(&id, "ID");
        assert_eq!(normalized, absent.1.to_string().replace(&missing, "ID"), "{method} {foreign_path}");
    }
    let listed = assert_ok(&node.request("GET", SESSIONS, &bob, None).await, 200);
    assert_eq!(listed, json!({ "sessions": [], "total": 0 }));

    // Nothing bob tried changed alice's session.
    let shown = assert_ok(&node.request("GET", &format!("{SESSIONS}/{id}"), &alice, None).await, 200);
    assert_eq!((shown["summary"].as_str(), shown["isArchived"].as_bool()), (Some(""), Some(false)));
    assert_eq!(node.history(&alice, &id).await["messages"].as_array().unwrap(), &history);
}

async fn bad_tokens_are_401_on_every_route(db: Db) {
    let node = TestNode::start(db).await;
    let owner = user();
    let token = node.token(&owner);
    let id = node.create_session(&token, "script").await;
    let routes = [
        ("POST", SESSIONS.to_string(), Some(json!({ "provider": "script", "projectPath": "proj" }))),
        ("GET", SESSIONS.to_string(), None),
        ("GET", format!("{SESSIONS}/running"), None),
        ("GET", format!("{SESSIONS}/{id}"), None),
        ("GET", format!("{SESSIONS}/{id}/messages"), None),
        ("PUT", format!("{SESSIONS}/{id}"), Some(json!({ "summary": "x" }))),
        ("DELETE", format!("{SESSIONS}/{id}?force=true"), None),
        ("POST", format!("{SESSIONS}/{id}/restore"), None),
    ];
    let no_user = signed(common::SECRET.as_bytes(), json!({ "exp": 9_999_999_999u64 }));
    let bad_tokens =
        [forged_token(&owner), alg_none_token(&owner), expired_token(&owner), no_user, "garbage".to_string()];
    for (method, path, body) in &routes {
        let body = body.as_ref().map(|b| ("application/json", b.to_string().into_bytes()));
        let got = node.request_raw(method, path, None, body.clone()).await;
        assert_eq!(got.0, 401, "{method} {path} without token: {}", got.1);
        assert_eq!(got.1["success"], false, "{}", got.1);
        for bad in &bad_tokens {
            let got = node.request_raw(method, path, Some(bad), body.clone()).await;
            assert_eq!(got.0, 401, "{method} {path} with {bad}: {}", got.1);
            let sep = if path.contains('?') { '&' } else { '?' };
            let got = node.request_raw(method, &format!("{path}{sep}token={bad}"), None, body.clone()).await;
            assert_eq!(got.0, 401, "{method} {path} with ?token={bad}: {}", got.1);
        }
    }
    // Nothing was changed by the refused calls.
    let shown = assert_ok(&node.request("GET", &format!("{SESSIONS}/{id}"), &token, None).await, 200);
    assert_eq!((shown["summary"].as_str(), shown["isArchived"].as_bool()), (Some(""), Some(false)));
}

async fn query_token_and_numeric_or_sub_user_ids(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let got = node.request_raw("GET", &format!("{SESSIONS}?token={token}"), None, None).await;
    assert_eq!(assert_ok(&got, 200)["total"], 0);
    let body = json!({ "provider": "script", "projectPath": "proj" }).to_string().into_bytes();
    let got =
        node.request_raw("POST", &format!("{SESSIONS}?token={token}"), None, Some(("application/json", body))).await;
    let id = assert_ok(&got, 201)["sessionId"].as_str().unwrap().to_string();
    let got = node.request_raw("GET", &format!("{SESSIONS}/{id}?token={token}"), None, None).await;
    assert_eq!(assert_ok(&got, 200)["sessionId"], id.as_str());

    // `userId: N` (a number) and `sub: "N"` name the same user.
    let n: u64 = rand::random::<u32>().into();
    let exp = 9_999_999_999u64;
    let numeric = signed(common::SECRET.as_bytes(), json!({ "userId": n, "exp": exp }));
    let sub = signed(common::SECRET.as_bytes(), json!({ "sub": n.to_string(), "exp": exp }));
    let id = node.create_session(&numeric, "script").await;
    let listed = assert_ok(&node.request("GET", SESSIONS, &sub, None).await, 200);
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["sessions"][0]["sessionId"], id.as_str());
}

async fn health_ready_and_metrics(db: Db) {
    let node = TestNode::start(db).await;
    let (status, _) = node.get_text("/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = node.get_text("/readyz").await;
    assert_eq!(status, 200, "{body}");

    // Exercise the paths behind the families: a socket, a subscription, a run, a replay.
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, r#"{"events":5,"intervalMs":20}"#).await;
    ws.recv_until(|v| v["kind"] == "stream_delta").await;
    let mut tab = node.connect(&token).await;
    tab.subscribe(&id, 0).await;
    tab.run_events(&id).await;
    ws.run_events(&id).await;

    let (status, text) = node.get_text("/metrics").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let family =
        |needles: &[&str]| names.iter().any(|n| n.starts_with("chatgate_") && needles.iter().all(|s| n.contains(s)));
    let mut missing = Vec::new();
    for (what, needles) in [
        ("connections", &["connection"][..]),
        ("subscriptions", &["subscri"][..]),
        ("runs by state", &["runs"][..]),
        ("events appended", &["append"][..]),
        ("events delivered", &["deliver"][..]),
        ("replay counts", &["replay"][..]),
        ("slow-consumer closes", &["slow"][..]),
        ("backend errors", &["backend", "error"][..]),
        ("latency histograms", &["_seconds_bucket"][..]),
    ] {
        if !family(needles) {
            missing.push(what);
        }
    }
    assert!(missing.is_empty(), "/metrics lacks the families {missing:?}:\n{text}");
    assert!(text.lines().any(|l| l.starts_with("chatgate_runs") && l.contains("state=")), "runs by state:\n{text}");
}

/// `GET …/messages` is the conversation: the prompt, assistant text, tool use
/// and results, never `complete`, `permission_*`, `status` or stream chunks; each
/// row keeps the id of the live frame it came from (a stream's merged text its
/// first chunk's id and time), and timestamps never go backwards.
async fn history_is_the_conversation(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    let script = json!({
        "permission": { "toolName": "Bash", "input": { "command": "ls" }, "timeoutMs": 10_000 },
        "events": 3,
        "intervalMs": 30,
    })
    .to_string();
    ws.send_chat(&id, &script).await;
    let request = ws.recv_until(|v| v["kind"] == "permission_request").await.pop().unwrap();
    ws.send(json!({ "type": "chat.permission-response", "requestId": request["requestId"], "allow": true })).await;
    let mut live = vec![request];
    live.extend(ws.run_events(&id).await);
    let last = live.last().unwrap()["seq"].as_u64().unwrap();
    node.history_complete(&token, &id, Some(last)).await;
    let page = assert_ok(&node.request("GET", &format!("{SESSIONS}/{id}/messages"), &token, None).await, 200);
    let rows = page["messages"].as_array().unwrap();
    let kinds: Vec<&str> = rows.iter().map(|m| m["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["text", "tool_use", "tool_result", "text"], "{rows:#?}");
    assert_eq!((page["total"].as_u64(), page["hasMore"].as_bool()), (Some(4), Some(false)));
    assert_eq!(page["lastSeq"].as_u64(), Some(last));
    assert_eq!(rows[0]["role"], "user");
    // Rows of live events keep their ids; the merged text carries its first chunk's id and time.
    for row in &rows[1..3] {
        let source = live.iter().find(|v| v["seq"] == row["seq"]).unwrap();
        assert_eq!(row, source, "a history row is its live frame");
    }
    let first_chunk = live.iter().find(|v| v["kind"] == "stream_delta").unwrap();
    assert_eq!((&rows[3]["id"], &rows[3]["timestamp"]), (&first_chunk["id"], &first_chunk["timestamp"]));
    let end = live.iter().find(|v| v["kind"] == "stream_end").unwrap();
    assert_eq!(rows[3]["seq"], end["seq"]);
    let stamps: Vec<&str> = rows.iter().map(|m| m["timestamp"].as_str().unwrap()).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "timestamps go backwards: {stamps:?}");
    assert!(rows.iter().all(|m| m["id"].as_str().is_some_and(|i| !i.is_empty())), "{rows:#?}");
    // The full record still has every event (the gateway's own tools read it).
    let all = node.history(&token, &id).await;
    let all_kinds: Vec<&str> =
        all["messages"].as_array().unwrap().iter().map(|m| m["kind"].as_str().unwrap()).collect();
    assert!(all_kinds.contains(&"permission_request") && all_kinds.contains(&"complete"), "{all_kinds:?}");
}

db_tests!(
    history_is_the_conversation,
    create_validates_provider_and_path,
    list_newest_first_paged_archived_left_out,
    show_returns_session_and_provider_id_after_first_run,
    rename_accepts_1_to_500_chars,
    delete_archives_and_restore_brings_back,
    force_delete_removes_session_and_history,
    force_delete_during_run_ends_it_and_leaves_no_history,
    running_lists_only_the_callers_runs,
    messages_page_from_the_newest,
    history_equals_what_streamed,
    invalid_session_ids_are_400_on_every_route,
    unknown_routes_and_methods_answer_in_the_envelope,
    another_users_session_is_404_everywhere_and_never_listed,
    bad_tokens_are_401_on_every_route,
    query_token_and_numeric_or_sub_user_ids,
    health_ready_and_metrics,
);

/// A backend that fails under a REST call: 503 `BACKEND_UNAVAILABLE` with no detail for the
/// client, and the failure counted per backend by the error middleware.
#[tokio::test]
async fn a_backend_failure_is_503_and_counted_by_backend() {
    let mut redis = common::PrivateRedis::start().expect("private redis-server");
    let node = common::cluster_node(&redis.url(), "rest-backend", |_| {}).await;
    let token = node.token(&user());
    assert_ok(&node.request("GET", SESSIONS, &token, None).await, 200);
    let counted = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("chatgate_backend_errors_total") && l.contains("backend=\"redis\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = counted(&node.get_text("/metrics").await.1);
    redis.kill();
    let got = node.request("GET", SESSIONS, &token, None).await;
    assert_error(&got, 503, "BACKEND_UNAVAILABLE");
    assert!(!got.1["error"]["message"].as_str().unwrap_or_default().contains("refused"), "{}", got.1);
    let after = counted(&node.get_text("/metrics").await.1);
    assert!(after > before, "not counted: {before} -> {after}");
}
