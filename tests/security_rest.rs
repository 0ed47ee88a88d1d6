//! Security suite, REST side (issue 8 part 4), on one node, SQLite and
//! PostgreSQL. Each case asserts the refusal (status and code of docs/protocol.md §REST)
//! and that nothing leaked or changed.
//!
//! Already covered elsewhere and not repeated here: `rest_sessions.rs`
//! (another user's finished session is 404 on every route and never listed;
//! the id pattern on every route; no / forged / `alg: none` / expired /
//! userless / garbage tokens are 401 on every route, header and query;
//! `projectPath` `..`, absolute outside, sibling prefix and a symlink escape).
//!
//! Here: every route with another user's session while its run waits on an
//! approval (the run, the approval, history and summary checked untouched,
//! nothing of theirs in any body); the full list of wrong tokens and the
//! header-vs-query precedence on REST; `projectPath` encoded forms, NUL
//! bytes, `/proc` links, dangling symlinks and loops; and a project directory
//! swapped for a symlink after the session was created.

mod common;
mod security_support;

use std::time::Duration;

use common::{Db, TestNode, forged_token, user};
use security_support::{SESSIONS, Surface, bad_tokens, foreign_ids_against_a_waiting_run, next, urlencode};
use serde_json::{Value, json};

async fn foreign_session_on_every_route_while_an_approval_waits(db: Db) {
    foreign_ids_against_a_waiting_run(db, Surface::Routes).await;
}

/// Asserts a 401 in the error envelope that does not echo the token's user.
#[track_caller]
fn assert_401(got: &(u16, Value), who: &str, what: &str) {
    assert_eq!(got.0, 401, "{what}: {}", got.1);
    assert_eq!(got.1["success"], false, "{what}: {}", got.1);
    assert_eq!(got.1["error"]["code"], "UNAUTHORIZED", "{what}: {}", got.1);
    assert!(!got.1.to_string().contains(who), "{what}: the refusal names the user: {}", got.1);
}

async fn every_bad_token_is_401_and_creates_nothing(db: Db) {
    let node = TestNode::start(db).await;
    let who = user();
    let create =
        || Some(("application/json", json!({ "provider": "script", "projectPath": "proj" }).to_string().into_bytes()));
    for (name, token) in bad_tokens(&who) {
        for (method, path, body) in [("GET", SESSIONS.to_string(), None), ("POST", SESSIONS.to_string(), create())] {
            let got = node.request_raw(method, &path, Some(&token), body.clone()).await;
            assert_401(&got, &who, &format!("{method} Bearer {name}"));
            let got = node.request_raw(method, &format!("{path}?token={}", urlencode(&token)), None, body).await;
            assert_401(&got, &who, &format!("{method} ?token= {name}"));
        }
    }
    let token = node.token(&who);
    let (status, listed) = node.request("GET", SESSIONS, &token, None).await;
    assert_eq!((status, &listed["data"]["total"]), (200, &json!(0)), "a refused token created something: {listed}");
}

/// The header wins (docs/protocol.md); a bad header is not rescued by a good
/// query; duplicate query tokens are refused; a request is one user's.
async fn header_and_query_tokens_precedence_on_rest(db: Db) {
    let node = TestNode::start(db).await;
    let (alice, bob) = (user(), user());
    let (alice_token, bob_token) = (node.token(&alice), node.token(&bob));
    let alice_session = node.create_session(&alice_token, "script").await;
    let bob_session = node.create_session(&bob_token, "script").await;
    let forged = forged_token(&alice);
    let list_ids = |body: &Value| -> Vec<String> {
        body["data"]["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_string())
            .collect()
    };

    let got = node.request_raw("GET", &format!("{SESSIONS}?token={alice_token}"), Some(&forged), None).await;
    assert_401(&got, &alice, "forged header + good query");
    let got = node.request_raw("GET", &format!("{SESSIONS}?token={alice_token}"), Some("garbage"), None).await;
    assert_401(&got, &alice, "garbage header + good query");
    for query in [format!("token={alice_token}&token=garbage"), format!("token=garbage&token={alice_token}")] {
        let got = node.request_raw("GET", &format!("{SESSIONS}?{query}"), None, None).await;
        assert_401(&got, &alice, &query);
    }
    for query in [bob_token.as_str(), "garbage", forged.as_str()] {
        let got = node.request_raw("GET", &format!("{SESSIONS}?token={query}"), Some(&alice_token), None).await;
        assert_eq!(got.0, 200, "{}", got.1);
        assert_eq!(list_ids(&got.1), std::slice::from_ref(&alice_session), "Bearer alice + ?token={query}");
        let path = format!("{SESSIONS}/{bob_session}?token={query}");
        let got = node.request_raw("GET", &path, Some(&alice_token), None).await;
        assert_eq!(got.0, 404, "alice's header must not reach bob's session: {}", got.1);
    }
    // A non-Bearer Authorization (e.g. a proxy's Basic) leaves the query in charge.
    let response = reqwest::Client::new()
        .get(format!("{}{SESSIONS}?token={bob_token}", node.base))
        .header("Authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(list_ids(&body), std::slice::from_ref(&bob_session));
}

/// A NUL in a summary is refused as a bad summary on both databases (it
/// cannot be stored in PostgreSQL text; it must not look like an outage).
async fn nul_in_a_summary_is_invalid_summary(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let got = node
        .request(
            "POST",
            SESSIONS,
            &token,
            Some(json!({ "provider": "script", "projectPath": "proj", "summary": "a\u{0}b" })),
        )
        .await;
    assert_eq!((got.0, got.1["error"]["code"].as_str()), (400, Some("INVALID_SUMMARY")), "{}", got.1);
    let got = node.request("PUT", &format!("{SESSIONS}/{id}"), &token, Some(json!({ "summary": "a\u{0}b" }))).await;
    assert_eq!((got.0, got.1["error"]["code"].as_str()), (400, Some("INVALID_SUMMARY")), "{}", got.1);
    let (_, listed) = node.request("GET", SESSIONS, &token, None).await;
    assert_eq!(listed["data"]["total"], 1, "{listed}");
    assert_eq!(listed["data"]["sessions"][0]["summary"], "", "{listed}");
    let (_, metrics) = node.get_text("/metrics").await;
    let database_errors = metrics
        .lines()
        .filter(|l| l.starts_with("chatgate_backend_errors_total") && l.contains("database"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert_eq!(database_errors, 0.0, "{metrics}");
}

// ---------------------------------------------------------------------------
// projectPath traversal.

/// POST a session with a raw JSON body text.
async fn create_raw(node: &TestNode, token: &str, body: &[u8]) -> (u16, Value) {
    node.request_raw("POST", SESSIONS, Some(token), Some(("application/json", body.to_vec()))).await
}

async fn project_path_traversal_forms_are_refused_or_stay_literal(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let root = node.workspaces.clone();
    let outside = node.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(node.dir.path().join("not-yet"), root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../later", root.join("dangling-relative")).unwrap();
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    std::os::unix::fs::symlink(root.join("proj"), root.join("inner")).unwrap();
    let root_name = root.file_name().unwrap().to_str().unwrap();

    // Refused: they name (or may come to name) a place outside the root.
    let outside_bodies: Vec<String> = vec![
        r#"{"provider":"script","projectPath":"\u002e\u002e/outside"}"#.into(),
        r#"{"provider":"script","projectPath":"proj/\u002e\u002e/\u002e\u002e"}"#.into(),
        r#"{"provider":"script","projectPath":"proj\u0000"}"#.into(),
        r#"{"provider":"script","projectPath":"proj\u0000/../../etc"}"#.into(),
        r#"{"provider":"script","projectPath":"\u0000/etc"}"#.into(),
    ];
    for body in &outside_bodies {
        let got = create_raw(&node, &token, body.as_bytes()).await;
        assert_eq!(
            (got.0, got.1["error"]["code"].as_str()),
            (400, Some("PROJECT_PATH_OUTSIDE_WORKSPACES")),
            "{body}: {}",
            got.1
        );
    }
    let outside_paths = [
        "//etc".to_string(),
        "/./etc".into(),
        "///".into(),
        "/proc/self/cwd".into(),
        "/proc/self/root".into(),
        "~/..".into(),
        format!("{}/../{root_name}/proj", root.display()),
        format!("{}/proj/..", root.display()),
        "dangling".into(),
        "dangling/deeper".into(),
        "dangling-relative".into(),
        "loop".into(),
        "loop/deeper".into(),
    ];
    for path in &outside_paths {
        let got =
            node.request("POST", SESSIONS, &token, Some(json!({ "provider": "script", "projectPath": path }))).await;
        assert_eq!(
            (got.0, got.1["error"]["code"].as_str()),
            (400, Some("PROJECT_PATH_OUTSIDE_WORKSPACES")),
            "{path}: {}",
            got.1
        );
    }
    // Not a string: no project path at all.
    for path in [json!(5), json!(["..", "etc"]), json!({ "path": "/etc" }), json!(true)] {
        let got =
            node.request("POST", SESSIONS, &token, Some(json!({ "provider": "script", "projectPath": path }))).await;
        assert_eq!((got.0, got.1["error"]["code"].as_str()), (400, Some("PROJECT_PATH_REQUIRED")), "{path}: {}", got.1);
    }
    // Not UTF-8 (overlong dots): not a JSON body.
    let got =
        create_raw(&node, &token, b"{\"provider\":\"script\",\"projectPath\":\"\xc0\xae\xc0\xae/outside\"}").await;
    assert_eq!((got.0, got.1["error"]["code"].as_str()), (400, Some("INVALID_REQUEST_BODY")), "{}", got.1);

    // Accepted: encoded or look-alike forms are plain names inside the root,
    // never decoded; links inside resolve to their canonical target.
    let literal = [
        ("%2e%2e/outside", root.join("%2e%2e/outside")),
        ("..%2f..%2fetc", root.join("..%2f..%2fetc")),
        ("..\\..\\etc", root.join("..\\..\\etc")),
        ("\u{ff0e}\u{ff0e}/outside", root.join("\u{ff0e}\u{ff0e}/outside")),
        ("~", root.join("~")),
        ("inner", root.join("proj")),
        ("./proj/./", root.join("proj")),
    ];
    let mut created = Vec::new();
    for (path, want) in &literal {
        let got =
            node.request("POST", SESSIONS, &token, Some(json!({ "provider": "script", "projectPath": path }))).await;
        assert_eq!(got.0, 201, "{path}: {}", got.1);
        assert_eq!(got.1["data"]["projectPath"], want.to_str().unwrap(), "{path}");
        created.push(got.1["data"]["sessionId"].as_str().unwrap().to_string());
    }
    let proc_root = format!("/proc/self/root{}", root.join("proj").display());
    let got =
        node.request("POST", SESSIONS, &token, Some(json!({ "provider": "script", "projectPath": proc_root }))).await;
    assert_eq!(got.0, 201, "{}", got.1);
    assert_eq!(got.1["data"]["projectPath"], root.join("proj").to_str().unwrap(), "stored canonical");
    created.push(got.1["data"]["sessionId"].as_str().unwrap().to_string());

    // Exactly the accepted ones exist.
    let (_, listed) = node.request("GET", &format!("{SESSIONS}?limit=100"), &token, None).await;
    let mut ids: Vec<String> = listed["data"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    created.sort();
    assert_eq!(ids, created);
}

/// The project path is checked when the session is created; if its directory
/// is later replaced by a symlink leading out of the workspaces root, a run
/// must not start there (docs/protocol.md §REST: every projectPath must resolve inside
/// the root; §Inbound: the project path comes from the database).
async fn project_dir_swapped_for_a_symlink_out_starts_no_run(db: Db) {
    let node = TestNode::start(db).await;
    let token = node.token(&user());
    let project = node.workspaces.join("swap");
    std::fs::create_dir_all(&project).unwrap();
    let got =
        node.request("POST", SESSIONS, &token, Some(json!({ "provider": "script", "projectPath": "swap" }))).await;
    assert_eq!(got.0, 201, "{}", got.1);
    let id = got.1["data"]["sessionId"].as_str().unwrap().to_string();
    let outside = node.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::remove_dir(&project).unwrap();
    std::os::unix::fs::symlink(&outside, &project).unwrap();
    let mut ws = node.connect(&token).await;
    for options in [json!({}), json!({ "cwd": "." }), json!({ "cwd": outside })] {
        ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "x", "options": options })).await;
        let frame = next(&mut ws, "send in a swapped project").await;
        assert_eq!(frame["kind"], "protocol_error", "{options}: a run started outside the root: {frame}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, shown) = node.request("GET", &format!("{SESSIONS}/{id}"), &token, None).await;
    assert_eq!(shown["data"]["lastSeq"], 0, "{shown}");
}

db_tests!(
    foreign_session_on_every_route_while_an_approval_waits,
    every_bad_token_is_401_and_creates_nothing,
    header_and_query_tokens_precedence_on_rest,
    nul_in_a_summary_is_invalid_summary,
    project_path_traversal_forms_are_refused_or_stay_literal,
    project_dir_swapped_for_a_symlink_out_starts_no_run,
);
