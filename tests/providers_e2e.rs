//! The five provider runtimes end to end (issue 4): real sockets, a real node
//! on SQLite or PostgreSQL, and the fake CLIs of tests/fixtures/fake-cli as the
//! providers. Each fake reads its scenario from `.fake-scenario` in the
//! session's project directory and records its argv, pid and (Claude) stdin and
//! approval decision there, which is what these tests look at besides the
//! frames on the socket and `GET …/messages`.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use chatgate::{
    config::Config,
    runtime::sandbox::{SandboxMode, SandboxSetting},
};
use common::{Db, TestNode, Ws, assert_contiguous, user};
use serde_json::{Value, json};

// ---------------------------------------------------------------- harness

fn fake(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-cli").join(name).to_string_lossy().into_owned()
}

/// A node whose five provider programs are the fake CLIs.
async fn node_with_fakes(db: Db, tweak: impl FnOnce(&mut Config)) -> TestNode {
    TestNode::start_with(db, |c| {
        c.claude_bin = fake("fake-claude");
        c.codex_bin = fake("fake-codex");
        c.cursor_bin = fake("fake-cursor");
        c.gemini_bin = fake("fake-gemini");
        c.opencode_bin = fake("fake-opencode");
        tweak(c);
    })
    .await
}

/// The project directory of the sessions `create_session` makes.
fn proj(node: &TestNode) -> PathBuf {
    node.workspaces.join("proj")
}

fn set_scenario(node: &TestNode, scenario: &str) {
    std::fs::write(proj(node).join(".fake-scenario"), scenario).expect("write scenario");
}

fn recorded_argv(node: &TestNode) -> Vec<String> {
    let text = std::fs::read_to_string(proj(node).join("argv.json")).expect("the fake recorded its argv");
    serde_json::from_str(&text).expect("argv.json")
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} exists", path.display()));
    serde_json::from_str(&text).expect("json file")
}

/// What the socket got during one run.
struct Turn {
    /// Every frame, up to and including the run's `complete`.
    frames: Vec<Value>,
    /// The session's sequenced events among them.
    events: Vec<Value>,
}

impl Turn {
    fn kinds(&self) -> Vec<&str> {
        self.events.iter().map(|v| v["kind"].as_str().unwrap_or("")).collect()
    }

    /// Kinds without `error` (stderr lines arrive in no fixed order relative to stdout).
    fn kinds_but_errors(&self) -> Vec<&str> {
        self.kinds().into_iter().filter(|k| *k != "error").collect()
    }

    fn of(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|v| v["kind"] == kind).collect()
    }

    fn errors(&self) -> Vec<&str> {
        self.of("error").iter().map(|v| v["content"].as_str().unwrap_or("")).collect()
    }

    fn complete(&self) -> &Value {
        self.events.last().expect("a run has events")
    }

    fn last_seq(&self) -> u64 {
        self.complete()["seq"].as_u64().expect("complete has a seq")
    }

    fn upserts(&self) -> Vec<&Value> {
        self.frames.iter().filter(|v| v["kind"] == "session_upserted").collect()
    }
}

/// Frames until the session's `complete`.
async fn collect_run(ws: &mut Ws, session: &str) -> Turn {
    let frames = ws.recv_until(|v| v["kind"] == "complete" && v["sessionId"] == session).await;
    let events = frames.iter().filter(|v| v["sessionId"] == session && v.get("seq").is_some()).cloned().collect();
    Turn { frames, events }
}

async fn send(ws: &mut Ws, session: &str, content: &str, options: Value) {
    ws.send(json!({ "type": "chat.send", "sessionId": session, "content": content, "options": options })).await;
}

/// Checks what every run must look like on the socket: labelled events with
/// contiguous seqs from `from`, one run id, exactly one `complete`, last, with
/// `exitCode`/`success`/`aborted`, and no `protocol_error`.
fn assert_run_shape(turn: &Turn, session: &str, provider: &str, from: u64) {
    let errors: Vec<_> = turn.frames.iter().filter(|v| v["kind"] == "protocol_error").collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_contiguous(&turn.events, from);
    assert!(!turn.events.is_empty());
    let run_id = turn.events[0]["runId"].as_str().expect("runId").to_string();
    for event in &turn.events {
        assert_eq!(event["sessionId"], session, "{event}");
        assert_eq!(event["provider"], provider, "{event}");
        assert_eq!(event["runId"], run_id.as_str(), "{event}");
        assert!(event["id"].is_string() && event["timestamp"].is_string(), "{event}");
    }
    let completes = turn.of("complete");
    assert_eq!(completes.len(), 1, "exactly one complete: {:?}", turn.kinds());
    let complete = turn.complete();
    assert_eq!(complete["kind"], "complete", "complete is last: {:?}", turn.kinds());
    let (code, success, aborted) = (&complete["exitCode"], &complete["success"], &complete["aborted"]);
    assert!(code.is_i64() && success.is_boolean() && aborted.is_boolean(), "{complete}");
    assert_eq!(success.as_bool(), Some(code.as_i64() == Some(0) && aborted == false), "{complete}");
}

fn assert_exit(turn: &Turn, exit_code: i64, aborted: bool) {
    let complete = turn.complete();
    assert_eq!(complete["exitCode"], exit_code, "{complete}");
    assert_eq!(complete["aborted"], aborted, "{complete}");
}

/// The history a run should leave (docs/protocol.md §History): the prompt as a user `text`
/// with no seq, then every event, with consecutive `stream_delta`s merged into
/// one assistant `text` at their `stream_end` (or at the last delta when the
/// stream is cut by another event). Merged and prompt rows have no `id` here.
fn expected_history(prompt: &str, events: &[Value]) -> Vec<Value> {
    let Some(first) = events.first() else { return Vec::new() };
    let label = |mut v: Value, seq: Value| {
        v["sessionId"] = first["sessionId"].clone();
        v["provider"] = first["provider"].clone();
        v["runId"] = first["runId"].clone();
        v["seq"] = seq;
        v
    };
    let mut rows = vec![label(json!({ "kind": "text", "role": "user", "content": prompt }), Value::Null)];
    let mut streamed: Option<(String, Value)> = None;
    let merged = |text: String, seq: Value| label(json!({ "kind": "text", "role": "assistant", "content": text }), seq);
    for event in events {
        match event["kind"].as_str() {
            Some("stream_delta") => {
                let entry = streamed.get_or_insert_with(|| (String::new(), Value::Null));
                entry.0.push_str(event["content"].as_str().unwrap_or(""));
                entry.1 = event["seq"].clone();
            }
            Some("stream_end") => {
                if let Some((text, _)) = streamed.take() {
                    rows.push(merged(text, event["seq"].clone()));
                }
            }
            _ => {
                if let Some((text, seq)) = streamed.take() {
                    rows.push(merged(text, seq));
                }
                rows.push(event.clone());
            }
        }
    }
    rows
}

/// `GET …/messages`, polled until it has at least `want` messages (the
/// history is written off the hot path).
async fn history(node: &TestNode, token: &str, session: &str, want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) =
            node.request("GET", &format!("/api/providers/sessions/{session}/messages?kinds=all"), token, None).await;
        assert_eq!(status, 200, "{body}");
        let messages = body["data"]["messages"].as_array().cloned().unwrap_or_default();
        // `total` is counted apart from the page, so it settles with the rows.
        let settled = messages.len() >= want && body["data"]["total"] == messages.len();
        if settled || Instant::now() > deadline {
            assert_eq!(body["data"]["total"], messages.len(), "{body}");
            return messages;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Asserts the stored history equals what streamed: events stored as they were
/// sent (same id, same fields, same seq); merged and prompt rows field by field.
async fn assert_history(node: &TestNode, token: &str, session: &str, want: &[Value]) {
    let got = history(node, token, session, want.len()).await;
    let kinds = |rows: &[Value]| rows.iter().map(|v| format!("{}:{}", v["kind"], v["seq"])).collect::<Vec<_>>();
    assert_eq!(kinds(&got), kinds(want), "history kinds:seq");
    for (got, want) in got.iter().zip(want) {
        if want.get("id").is_some() {
            assert_eq!(got, want, "a stored event differs from the streamed one");
        } else {
            for key in ["kind", "role", "content", "seq", "sessionId", "provider", "runId"] {
                assert_eq!(got[key], want[key], "{key} of {got}");
            }
            assert!(got["id"].is_string() && got["timestamp"].is_string(), "{got}");
        }
    }
}

async fn get_session(node: &TestNode, token: &str, session: &str) -> Value {
    let (status, body) = node.request("GET", &format!("/api/providers/sessions/{session}"), token, None).await;
    assert_eq!(status, 200, "{body}");
    body["data"].clone()
}

/// Two turns of one provider through the socket, with everything that holds
/// for every provider checked: run shape, seq continuing across runs, the
/// `session_upserted` with the provider's id (once), the stored id, and the
/// history after each run.
struct RoundTrip {
    first: Turn,
    second: Turn,
    first_argv: Vec<String>,
    second_argv: Vec<String>,
    /// The prompt a fake that reads it from stdin recorded (`prompt.txt`) in the second run.
    second_stdin_prompt: Option<String>,
}

const FIRST_PROMPT: &str = "first question";
const SECOND_PROMPT: &str = "second question";

async fn round_trip(db: Db, provider: &str, scenarios: [&str; 2], provider_id: &str) -> RoundTrip {
    let node = node_with_fakes(db, |_| {}).await;
    let token = node.token(&user());
    let session = node.create_session(&token, provider).await;
    let mut ws = node.connect(&token).await;

    set_scenario(&node, scenarios[0]);
    send(&mut ws, &session, FIRST_PROMPT, json!({})).await;
    let first = collect_run(&mut ws, &session).await;
    assert_run_shape(&first, &session, provider, 1);
    let first_argv = recorded_argv(&node);
    let upserted = match first.upserts().first() {
        Some(frame) => (*frame).clone(),
        None => ws.recv_until(|v| v["kind"] == "session_upserted").await.pop().expect("session_upserted"),
    };
    assert_eq!(upserted["sessionId"], session.as_str(), "{upserted}");
    assert_eq!(upserted["provider"], provider, "{upserted}");
    assert_eq!(upserted["providerSessionId"], provider_id, "{db:?} {provider}: {upserted}");
    assert_eq!(upserted["session"]["providerSessionId"], provider_id, "{upserted}");
    assert_eq!(upserted["session"]["sessionId"], session.as_str(), "{upserted}");
    let mut want = expected_history(FIRST_PROMPT, &first.events);
    assert_history(&node, &token, &session, &want).await;
    let stored = get_session(&node, &token, &session).await;
    assert_eq!(stored["providerSessionId"], provider_id, "{stored}");
    assert_eq!(stored["lastSeq"], first.last_seq(), "{stored}");
    assert_eq!(stored["isProcessing"], false, "{stored}");

    set_scenario(&node, scenarios[1]);
    send(&mut ws, &session, SECOND_PROMPT, json!({})).await;
    let second = collect_run(&mut ws, &session).await;
    assert_run_shape(&second, &session, provider, first.last_seq() + 1);
    assert_ne!(second.events[0]["runId"], first.events[0]["runId"], "a new run id");
    assert!(second.upserts().is_empty(), "the same provider id is not announced again: {:?}", second.upserts());
    let second_argv = recorded_argv(&node);
    let second_stdin_prompt = std::fs::read_to_string(proj(&node).join("prompt.txt")).ok();
    want.extend(expected_history(SECOND_PROMPT, &second.events));
    assert_history(&node, &token, &session, &want).await;
    assert_eq!(get_session(&node, &token, &session).await["lastSeq"], second.last_seq());
    RoundTrip { first, second, first_argv, second_argv, second_stdin_prompt }
}

fn contains_run(args: &[String], tokens: &[&str]) -> bool {
    args.windows(tokens.len()).any(|w| w == tokens)
}

// ---------------------------------------------------------------- each provider

#[tokio::test]
async fn claude_end_to_end_with_resume() {
    for db in [Db::Sqlite, Db::Postgres] {
        let rt = round_trip(db, "claude", ["basic", "partial"], "claude-sess-1").await;
        let first = &rt.first;
        assert_eq!(
            first.kinds(),
            ["thinking", "text", "tool_use", "status", "tool_result", "text", "text", "status", "complete"],
            "{db:?}"
        );
        let e = &first.events;
        assert_eq!(e[0]["content"], "Let me look at the README.");
        assert_eq!((&e[1]["role"], &e[1]["content"]), (&json!("assistant"), &json!("I'll read it.")));
        assert_eq!(e[2]["toolName"], "Read");
        assert_eq!(e[2]["toolInput"], json!({ "file_path": "README.md" }));
        assert_eq!(e[2]["toolId"], "toolu_01");
        assert_eq!(e[3]["text"], "token_budget");
        assert_eq!(e[3]["tokenBudget"]["used"], 145);
        assert_eq!(e[3]["tokenBudget"]["total"], 160_000);
        assert_eq!(e[4]["toolId"], "toolu_01");
        assert_eq!(e[4]["content"], "# Project\nhello");
        assert_eq!(e[4]["isError"], false);
        assert_eq!(e[5]["parentToolUseId"], "toolu_01");
        assert_eq!(e[6]["content"], "The README says hello.");
        assert_eq!(e[7]["tokenBudget"]["used"], 1200);
        assert_exit(first, 0, false);
        assert!(!rt.first_argv.iter().any(|a| a.starts_with("--resume")), "{:?}", rt.first_argv);

        assert!(rt.second_argv.contains(&"--resume=claude-sess-1".to_string()), "{:?}", rt.second_argv);
        assert_eq!(rt.second.kinds(), ["stream_delta", "stream_delta", "stream_end", "status", "complete"]);
        assert_eq!(rt.second.events[0]["content"], "Hel");
        assert_eq!(rt.second.events[1]["content"], "lo");
        assert_exit(&rt.second, 0, false);
    }
}

#[tokio::test]
async fn codex_end_to_end_with_resume() {
    for db in [Db::Sqlite, Db::Postgres] {
        let thread = "0199a213-81c0-7800-8aa1-bbab2a035a53";
        let rt = round_trip(db, "codex", ["basic", "failed"], thread).await;
        assert_eq!(
            rt.first.kinds(),
            [
                "thinking", "tool_use", "tool_use", "tool_use", "tool_use", "tool_use", "error", "text", "status",
                "complete"
            ],
            "{db:?}"
        );
        let e = &rt.first.events;
        assert_eq!(e[0]["content"], "**Looking at the repository**");
        let tools: Vec<_> = rt.first.of("tool_use").iter().map(|v| v["toolName"].clone()).collect();
        assert_eq!(
            tools,
            [json!("Bash"), json!("FileChanges"), json!("search"), json!("WebSearch"), json!("TodoList")]
        );
        assert_eq!(e[1]["toolInput"], json!({ "command": "bash -lc ls" }));
        assert_eq!(e[1]["toolId"], "item_1");
        assert_eq!(e[1]["exitCode"], 0);
        assert_eq!(e[6]["content"], "command output was truncated");
        assert_eq!((&e[7]["role"], &e[7]["content"]), (&json!("assistant"), &json!("All done: two files changed.")));
        assert_eq!(e[8]["tokenBudget"]["used"], 1500);
        assert_exit(&rt.first, 0, false);
        assert!(!rt.first_argv.contains(&"resume".to_string()), "{:?}", rt.first_argv);
        assert_eq!(rt.first_argv.last().map(String::as_str), Some(FIRST_PROMPT));

        let args = &rt.second_argv;
        let resume = args.iter().position(|a| a == "resume").expect("resume subcommand");
        assert_eq!(args[resume + 1], thread);
        assert!(resume < args.iter().position(|a| a == "--").unwrap_or(0), "{args:?}");
        // The stream retry is progress (a status), the quota error the one error.
        assert_eq!(rt.second.kinds(), ["status", "error", "complete"]);
        assert_eq!(rt.second.of("status")[0]["text"], "Reconnecting... 1/5");
        assert_eq!(rt.second.errors(), ["You exceeded your current quota."]);
        assert_exit(&rt.second, 1, false);
        assert_eq!(rt.second.complete()["success"], false);
    }
}

#[tokio::test]
async fn cursor_end_to_end_with_resume() {
    for db in [Db::Sqlite, Db::Postgres] {
        let id = "c6b62c6f-7ead-4fd6-9922-e952131177ff";
        let rt = round_trip(db, "cursor", ["basic", "resume"], id).await;
        assert_eq!(rt.first.kinds(), ["stream_delta", "stream_delta", "stream_delta", "stream_end", "complete"]);
        let contents: Vec<_> = rt.first.of("stream_delta").iter().map(|v| v["content"].clone()).collect();
        // The plain-text line is not fatal: upstream shows it as a delta.
        assert_eq!(contents, [json!("Hello! "), json!("Warning: plain text progress line"), json!("How can I help?")]);
        assert_exit(&rt.first, 0, false);
        assert_eq!(rt.first_argv, ["-p", FIRST_PROMPT, "--output-format", "stream-json"]);

        let resume = format!("--resume={id}");
        assert_eq!(rt.second_argv, [resume.as_str(), "-p", SECOND_PROMPT, "--output-format", "stream-json"]);
        assert_eq!(rt.second.kinds(), ["stream_delta", "stream_end", "complete"]);
        assert_eq!(rt.second.events[0]["content"], "Welcome back.");
        assert_exit(&rt.second, 0, false);
    }
}

#[tokio::test]
async fn gemini_end_to_end_with_resume() {
    for db in [Db::Sqlite, Db::Postgres] {
        let id = "8b0a3c1e-gem-sess-1";
        let rt = round_trip(db, "gemini", ["basic", "resume"], id).await;
        assert_eq!(
            rt.first.kinds_but_errors(),
            [
                "stream_delta",
                "stream_delta",
                "tool_use",
                "tool_result",
                "tool_use",
                "tool_result",
                "stream_delta",
                "status",
                "stream_end",
                "status",
                "complete"
            ],
            "{db:?}"
        );
        let tools = rt.first.of("tool_use");
        assert_eq!(tools[0]["toolName"], "list_directory");
        assert_eq!(tools[0]["toolId"], "list_directory-1-abc");
        let results = rt.first.of("tool_result");
        assert_eq!(
            (&results[1]["content"], &results[1]["isError"]),
            (&json!("File not found: missing.txt"), &json!(true))
        );
        // The stream's warning is a status; the result's tokens the last one.
        assert_eq!(rt.first.of("status")[0]["text"], "Loop detected, stopping.");
        assert_eq!(rt.first.of("status")[1]["tokens"], 1500);
        let errors = rt.first.errors();
        assert!(errors.contains(&"quota warning: 90% used"), "{errors:?}");
        assert!(!errors.contains(&"Loop detected, stopping."), "{errors:?}");
        assert!(!errors.iter().any(|e| e.contains("DeprecationWarning")), "{errors:?}");
        assert_exit(&rt.first, 0, false);
        assert!(!rt.first_argv.contains(&"--resume".to_string()), "{:?}", rt.first_argv);

        assert!(contains_run(&rt.second_argv, &["--resume", id]), "{:?}", rt.second_argv);
        assert!(contains_run(&rt.second_argv, &["--prompt", SECOND_PROMPT]), "{:?}", rt.second_argv);
        assert_eq!(rt.second.kinds(), ["stream_delta", "stream_end", "stream_end", "complete"]);
        assert_eq!(rt.second.events[0]["content"], "Resumed.");
        assert_exit(&rt.second, 0, false);
    }
}

#[tokio::test]
async fn opencode_end_to_end_with_resume() {
    for db in [Db::Sqlite, Db::Postgres] {
        let id = "ses_6f1a2b3c";
        let rt = round_trip(db, "opencode", ["basic", "resume"], id).await;
        assert_eq!(
            rt.first.kinds(),
            [
                "tool_use",
                "tool_use",
                "thinking",
                "stream_delta",
                "stream_delta",
                "stream_end",
                "status",
                "error",
                "complete"
            ],
            "{db:?}"
        );
        let e = &rt.first.events;
        assert_eq!(e[0]["toolName"], "bash");
        assert_eq!(e[0]["toolResult"], json!({ "content": "README.md\n", "isError": false }));
        assert_eq!(e[1]["toolResult"]["isError"], true);
        assert_eq!(e[2]["content"], "The user wants a listing.");
        assert_eq!(e[4]["content"], "plain progress line");
        assert_eq!(e[6]["tokenBudget"]["used"], 175);
        assert_eq!(e[7]["content"], "Rate limited");
        assert_exit(&rt.first, 0, false);
        assert!(!rt.first_argv.contains(&"--session".to_string()), "{:?}", rt.first_argv);
        assert!(!rt.first_argv.contains(&FIRST_PROMPT.to_string()), "the prompt goes on stdin: {:?}", rt.first_argv);

        assert!(contains_run(&rt.second_argv, &["--session", id]), "{:?}", rt.second_argv);
        assert_eq!(rt.second_stdin_prompt.as_deref(), Some(SECOND_PROMPT));
        assert_eq!(rt.second.kinds(), ["stream_delta", "stream_end", "status", "complete"]);
        assert_eq!(rt.second.events[0]["content"], "Continuing.");
        assert_exit(&rt.second, 0, false);
    }
}

// ---------------------------------------------------------------- claude approvals

/// How the second tab answers the approval.
enum Reply {
    Allow(Value),
    Deny(&'static str),
    /// No answer in time; a late one is sent after the timeout.
    Late,
}

/// What an approval test leaves to look at.
struct Approval {
    node: TestNode,
    /// The run as tab 1 (the sender) saw it.
    turn: Turn,
    request_id: String,
}

/// A Claude approval through the gateway: tab 1 sends, tab 2 (same user, own
/// socket) subscribes while the request is pending and answers. Checks the
/// pending request in tab 2's `chat_subscribed`, that both tabs get the same
/// events, and the history.
async fn approval(reply: Reply) -> Approval {
    let timeout = if matches!(reply, Reply::Late) { Duration::from_millis(400) } else { Duration::from_secs(55) };
    let node = node_with_fakes(Db::Sqlite, |c| c.claude_approval_timeout = timeout).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "claude").await;
    let mut tab1 = node.connect(&token).await;
    let mut tab2 = node.connect(&token).await;
    set_scenario(&node, "permission");
    send(&mut tab1, &session, "status?", json!({})).await;

    let before = tab1.recv_until(|v| v["kind"] == "permission_request").await;
    let request = before.last().cloned().expect("permission_request");
    let request_id = request["requestId"].as_str().expect("requestId").to_string();
    assert_eq!(request["toolName"], "Bash", "{request}");
    assert_eq!(request["input"], json!({ "command": "git status" }), "{request}");

    tab2.subscribe(&session, 0).await;
    let ack = tab2.recv_until(|v| v["kind"] == "chat_subscribed").await.pop().expect("ack");
    assert_eq!(ack["kind"], "chat_subscribed", "{ack}");
    assert_eq!(ack["isProcessing"], true, "{ack}");
    assert_eq!(ack["runId"], request["runId"], "{ack}");
    let pending = ack["pendingPermissions"].as_array().cloned().unwrap_or_default();
    assert_eq!(pending.len(), 1, "{ack}");
    assert_eq!(pending[0]["requestId"], request_id.as_str());
    assert_eq!(pending[0]["toolName"], "Bash");
    assert_eq!(pending[0]["input"], json!({ "command": "git status" }));
    assert_eq!(pending[0]["sessionId"], session.as_str());

    let mut tab2_frames = Vec::new();
    let answer = |allow: bool| json!({ "type": "chat.permission-response", "requestId": request_id, "allow": allow });
    match reply {
        Reply::Allow(updated) => {
            let mut frame = answer(true);
            frame["updatedInput"] = updated;
            tab2.send(frame).await;
        }
        Reply::Deny(message) => {
            let mut frame = answer(false);
            frame["message"] = json!(message);
            tab2.send(frame).await;
        }
        Reply::Late => {
            tab2_frames.extend(tab2.recv_until(|v| v["kind"] == "permission_cancelled").await);
            tab2.send(answer(true)).await;
        }
    }
    let rest = collect_run(&mut tab1, &session).await;
    let mut frames = before;
    frames.extend(rest.frames);
    let events = frames.iter().filter(|v| v["sessionId"] == session && v.get("seq").is_some()).cloned().collect();
    let turn = Turn { frames, events };
    assert_run_shape(&turn, &session, "claude", 1);
    tab2_frames.extend(collect_run(&mut tab2, &session).await.frames);
    let seen_by_tab2: Vec<Value> =
        tab2_frames.into_iter().filter(|v| v["sessionId"] == session && v.get("seq").is_some()).collect();
    assert_eq!(seen_by_tab2, turn.events, "both tabs saw the same run (tab 2 by replay, then live)");
    assert_history(&node, &token, &session, &expected_history("status?", &turn.events)).await;

    tab2.subscribe(&session, turn.last_seq()).await;
    let ack = tab2.recv_until(|v| v["kind"] == "chat_subscribed").await.pop().expect("ack");
    assert_eq!(ack["kind"], "chat_subscribed", "{ack}");
    assert_eq!(ack["isProcessing"], false, "{ack}");
    assert_eq!(ack["pendingPermissions"], json!([]), "{ack}");
    Approval { node, turn, request_id }
}

#[tokio::test]
async fn claude_approval_allowed_from_another_tab_with_updated_input() {
    let updated = json!({ "command": "git status --short" });
    let Approval { node, turn, request_id } = approval(Reply::Allow(updated.clone())).await;
    assert_eq!(
        turn.kinds(),
        ["tool_use", "permission_request", "permission_resolved", "tool_result", "text", "status", "complete"]
    );
    let resolved = turn.of("permission_resolved")[0];
    assert_eq!((&resolved["requestId"], &resolved["allow"]), (&json!(request_id), &json!(true)));
    let decision = read_json(proj(&node).join("decision.json"));
    assert_eq!(decision["response"], json!({ "behavior": "allow", "updatedInput": updated }));
    let result = turn.of("tool_result")[0];
    assert_eq!(result["content"], r#"ran: {"command":"git status --short"}"#);
    assert_eq!(result["isError"], false);
    assert_exit(&turn, 0, false);
}

#[tokio::test]
async fn claude_approval_denied_from_another_tab() {
    let Approval { node, turn, request_id } = approval(Reply::Deny("not now")).await;
    assert_eq!(
        turn.kinds(),
        ["tool_use", "permission_request", "permission_resolved", "tool_result", "text", "status", "complete"]
    );
    let resolved = turn.of("permission_resolved")[0];
    assert_eq!((&resolved["requestId"], &resolved["allow"]), (&json!(request_id), &json!(false)));
    let decision = read_json(proj(&node).join("decision.json"));
    assert_eq!(decision["response"], json!({ "behavior": "deny", "message": "not now" }));
    let result = turn.of("tool_result")[0];
    assert_eq!((&result["content"], &result["isError"]), (&json!("not now"), &json!(true)));
    assert_exit(&turn, 0, false);
}

#[tokio::test]
async fn claude_approval_times_out_and_a_late_answer_is_ignored() {
    let Approval { node, turn, request_id } = approval(Reply::Late).await;
    assert_eq!(
        turn.kinds(),
        ["tool_use", "permission_request", "permission_cancelled", "tool_result", "text", "status", "complete"]
    );
    let cancelled = turn.of("permission_cancelled")[0];
    assert_eq!((&cancelled["requestId"], &cancelled["reason"]), (&json!(request_id), &json!("timeout")));
    let decision = read_json(proj(&node).join("decision.json"));
    assert_eq!(decision["response"], json!({ "behavior": "deny", "message": "Permission request timed out" }));
    assert_eq!(turn.of("tool_result")[0]["isError"], true);
    assert_exit(&turn, 0, false);
}

// ---------------------------------------------------------------- abort

/// True when the process is gone (or a zombie nobody reaped yet).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Live processes whose working directory is `dir` (what a provider CLI and its children have).
fn processes_in(dir: &Path) -> Vec<i32> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .filter(|pid| !process_gone(*pid))
        .collect()
}

fn read_pid(node: &TestNode, file: &str) -> i32 {
    let text = std::fs::read_to_string(proj(node).join(file)).unwrap_or_else(|_| panic!("{file} recorded"));
    text.trim().parse().expect("pid")
}

/// Waits (a little) for a file the fake writes.
async fn wait_for_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Once the run's `complete` is out, its whole group has been killed: the
/// recorded CLI and grandchild pids are gone, and nothing runs in the project.
/// (SIGKILL is sent before `complete`; the grandchild, not the gateway's
/// child, may take a moment to die, so this polls briefly.)
async fn assert_no_process_left(node: &TestNode, pid_files: &[&str]) {
    // In the bubblewrap sandbox the fakes record pids of their own PID namespace,
    // which mean nothing here: there the scan of the project's processes decides.
    let sandboxed = node.node.as_ref().is_some_and(|n| n.gateway.settings.containment.mode() == SandboxMode::Bwrap);
    let mut pids = Vec::new();
    for file in pid_files {
        if !sandboxed && proj(node).join(file).exists() {
            pids.push((file.to_string(), read_pid(node, file)));
        }
    }
    let start = Instant::now();
    loop {
        let running: Vec<_> = pids.iter().filter(|(_, pid)| !process_gone(*pid)).collect();
        let left = processes_in(&proj(node));
        if running.is_empty() && left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "still running after complete: {running:?}; processes in the project: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn abort(ws: &mut Ws, session: &str) {
    ws.send(json!({ "type": "chat.abort", "sessionId": session })).await;
}

#[tokio::test]
async fn claude_abort_interrupts_and_kills_the_process_group() {
    claude_abort_kills_the_group(SandboxSetting::Auto).await;
}

#[tokio::test]
async fn claude_abort_kills_the_process_group_without_a_sandbox() {
    claude_abort_kills_the_group(SandboxSetting::None).await;
}

async fn claude_abort_kills_the_group(sandbox: SandboxSetting) {
    let node = node_with_fakes(Db::Sqlite, |c| c.sandbox = sandbox).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "claude").await;
    let mut ws = node.connect(&token).await;
    set_scenario(&node, "hang");
    send(&mut ws, &session, "long job", json!({})).await;
    let mut frames = ws.recv_until(|v| v["kind"] == "text").await;
    assert_eq!(frames.last().map(|v| v["content"].clone()), Some(json!("working...")));
    assert!(!processes_in(&proj(&node)).is_empty(), "the CLI runs in the project");
    let started = Instant::now();
    abort(&mut ws, &session).await;
    let rest = collect_run(&mut ws, &session).await;
    assert!(started.elapsed() < Duration::from_secs(5), "abort took {:?}", started.elapsed());
    frames.extend(rest.frames);
    let events = frames.iter().filter(|v| v["sessionId"] == session && v.get("seq").is_some()).cloned().collect();
    let turn = Turn { frames, events };
    assert_run_shape(&turn, &session, "claude", 1);
    assert_eq!(turn.kinds(), ["text", "complete"]);
    assert_eq!((&turn.complete()["aborted"], &turn.complete()["success"]), (&json!(true), &json!(false)));
    assert!(proj(&node).join("grandchild.pid").exists());
    assert_no_process_left(&node, &["cli.pid", "grandchild.pid"]).await;
    let stdin = std::fs::read_to_string(proj(&node).join("stdin.jsonl")).expect("stdin log");
    assert!(
        stdin
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|m| m["type"] == "control_request" && m["request"]["subtype"] == "interrupt"),
        "interrupt control request sent: {stdin}"
    );
    // Exactly one complete: nothing more for this session.
    ws.expect_silence(Duration::from_millis(300)).await;
    let stored = get_session(&node, &token, &session).await;
    assert_eq!(stored["isProcessing"], false, "{stored}");
    assert_history(&node, &token, &session, &expected_history("long job", &turn.events)).await;
}

#[tokio::test]
async fn abort_before_any_provider_id_kills_the_group_even_when_sigterm_is_ignored() {
    let node = node_with_fakes(Db::Sqlite, |_| {}).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "cursor").await;
    let mut ws = node.connect(&token).await;
    set_scenario(&node, "hang-term");
    send(&mut ws, &session, "go", json!({})).await;
    wait_for_file(&proj(&node).join("grandchild.pid")).await;
    let started = Instant::now();
    abort(&mut ws, &session).await;
    let turn = collect_run(&mut ws, &session).await;
    assert!(started.elapsed() < Duration::from_secs(6), "abort took {:?}", started.elapsed());
    assert_run_shape(&turn, &session, "cursor", 1);
    assert_eq!(turn.kinds(), ["complete"]);
    assert_eq!(turn.complete()["aborted"], true);
    assert!(turn.upserts().is_empty(), "{:?}", turn.upserts());
    assert!(proj(&node).join("grandchild.pid").exists());
    assert_no_process_left(&node, &["cli.pid", "grandchild.pid"]).await;
    assert_eq!(get_session(&node, &token, &session).await["providerSessionId"], Value::Null);
}

#[tokio::test]
async fn abort_sent_right_after_send_leaves_no_process_and_frees_the_session() {
    let node = node_with_fakes(Db::Sqlite, |_| {}).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "cursor").await;
    let mut ws = node.connect(&token).await;
    set_scenario(&node, "hang-term");
    send(&mut ws, &session, "go", json!({})).await;
    abort(&mut ws, &session).await;
    let turn = collect_run(&mut ws, &session).await;
    assert_run_shape(&turn, &session, "cursor", 1);
    assert_eq!(turn.kinds(), ["complete"]);
    assert_eq!(turn.complete()["aborted"], true);
    assert_eq!(turn.complete()["success"], false);
    // The CLI may or may not have started; whatever did is gone.
    assert_no_process_left(&node, &["cli.pid", "grandchild.pid"]).await;
    // The session is free again, and its seq goes on.
    set_scenario(&node, "basic");
    send(&mut ws, &session, "again", json!({})).await;
    let next = collect_run(&mut ws, &session).await;
    assert_run_shape(&next, &session, "cursor", turn.last_seq() + 1);
    assert_exit(&next, 0, false);
}

#[tokio::test]
async fn claude_abort_with_a_pending_approval_cancels_it() {
    let node = node_with_fakes(Db::Sqlite, |_| {}).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "claude").await;
    let mut ws = node.connect(&token).await;
    set_scenario(&node, "permission");
    send(&mut ws, &session, "status?", json!({})).await;
    let mut frames = ws.recv_until(|v| v["kind"] == "permission_request").await;
    let request_id = frames.last().map(|v| v["requestId"].clone()).unwrap_or_default();
    abort(&mut ws, &session).await;
    frames.extend(collect_run(&mut ws, &session).await.frames);
    let events = frames.iter().filter(|v| v["sessionId"] == session && v.get("seq").is_some()).cloned().collect();
    let turn = Turn { frames, events };
    assert_run_shape(&turn, &session, "claude", 1);
    assert_eq!(turn.complete()["aborted"], true);
    // As upstream (docs/providers.md, claude approvals): a run ending with an
    // approval pending tells the tabs with `permission_cancelled {reason: "cancelled"}`.
    assert_eq!(turn.kinds(), ["tool_use", "permission_request", "permission_cancelled", "complete"]);
    let cancelled = turn.of("permission_cancelled")[0];
    assert_eq!((&cancelled["requestId"], &cancelled["reason"]), (&request_id, &json!("cancelled")));
    assert_no_process_left(&node, &["cli.pid"]).await;
    ws.subscribe(&session, turn.last_seq()).await;
    let ack = ws.recv_until(|v| v["kind"] == "chat_subscribed").await.pop().expect("ack");
    assert_eq!((&ack["isProcessing"], &ack["pendingPermissions"]), (&json!(false), &json!([])), "{ack}");
}

// ---------------------------------------------------------------- failures

#[tokio::test]
async fn a_missing_cli_gives_an_error_naming_it_then_127() {
    let missing = |name: &str| format!("/nonexistent/chatgate-test/{name}");
    let node = TestNode::start_with(Db::Sqlite, |c| {
        c.claude_bin = missing("claude");
        c.codex_bin = missing("codex");
        c.cursor_bin = missing("cursor-agent");
        c.gemini_bin = missing("gemini");
        c.opencode_bin = missing("opencode");
    })
    .await;
    let token = node.token(&user());
    let mut ws = node.connect(&token).await;
    for (provider, program) in [
        ("claude", "claude"),
        ("codex", "codex"),
        ("cursor", "cursor-agent"),
        ("gemini", "gemini"),
        ("opencode", "opencode"),
    ] {
        let session = node.create_session(&token, provider).await;
        send(&mut ws, &session, "hi", json!({})).await;
        let turn = collect_run(&mut ws, &session).await;
        assert_run_shape(&turn, &session, provider, 1);
        assert_eq!(turn.kinds(), ["error", "complete"], "{provider}");
        let error = turn.errors()[0];
        assert!(error.contains(&missing(program)) && error.contains(provider), "{provider}: {error}");
        assert_exit(&turn, 127, false);
        assert_history(&node, &token, &session, &expected_history("hi", &turn.events)).await;
    }
}

#[tokio::test]
async fn a_cli_crashing_mid_stream_keeps_its_events_and_exit_code() {
    let node = node_with_fakes(Db::Sqlite, |_| {}).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "cursor").await;
    let mut ws = node.connect(&token).await;
    set_scenario(&node, "crash");
    send(&mut ws, &session, "go", json!({})).await;
    let turn = collect_run(&mut ws, &session).await;
    assert_run_shape(&turn, &session, "cursor", 1);
    let mut kinds = turn.kinds();
    kinds.sort_unstable();
    assert_eq!(kinds, ["complete", "error", "stream_delta"], "{:?}", turn.kinds());
    assert_eq!(turn.of("stream_delta")[0]["content"], "partial answer");
    assert_eq!(turn.errors(), ["Segmentation fault (core dumped)"]);
    assert_exit(&turn, 3, false);
    assert_eq!(turn.complete()["success"], false);
    let upserted = match turn.upserts().first() {
        Some(frame) => (*frame).clone(),
        None => ws.recv_until(|v| v["kind"] == "session_upserted").await.pop().expect("session_upserted"),
    };
    assert_eq!(upserted["providerSessionId"], "crash-sess");
    // The cut stream is still stored as one assistant text.
    assert_history(&node, &token, &session, &expected_history("go", &turn.events)).await;
}

#[tokio::test]
async fn garbage_lines_do_not_break_a_run() {
    let node = node_with_fakes(Db::Sqlite, |_| {}).await;
    let token = node.token(&user());
    let session = node.create_session(&token, "codex").await;
    let mut ws = node.connect(&token).await;
    set_scenario(&node, "garbage");
    send(&mut ws, &session, "go", json!({})).await;
    let turn = collect_run(&mut ws, &session).await;
    assert_run_shape(&turn, &session, "codex", 1);
    assert_eq!(turn.kinds(), ["text", "status", "complete"]);
    assert_eq!(turn.events[0]["content"], "Still here.");
    assert_exit(&turn, 0, false);
    assert_history(&node, &token, &session, &expected_history("go", &turn.events)).await;
}

// ---------------------------------------------------------------- options

#[tokio::test]
async fn bypass_permissions_needs_the_operator_flag() {
    let strict = node_with_fakes(Db::Sqlite, |_| {}).await;
    let token = strict.token(&user());
    let session = strict.create_session(&token, "codex").await;
    let mut ws = strict.connect(&token).await;
    set_scenario(&strict, "basic");
    for options in [
        json!({ "permissionMode": "bypassPermissions" }),
        json!({ "skipPermissions": true }),
        json!({ "toolsSettings": { "skipPermissions": true } }),
        json!({ "permissionMode": "yolo" }),
    ] {
        send(&mut ws, &session, "go", options.clone()).await;
        let error = ws.recv().await;
        assert_eq!(error["kind"], "protocol_error", "{options}: {error}");
        assert_eq!(error["code"], "INVALID_OPTIONS", "{options}: {error}");
        assert_eq!(error["sessionId"], session.as_str(), "{error}");
    }
    assert!(!proj(&strict).join("argv.json").exists(), "no CLI was started");
    let stored = get_session(&strict, &token, &session).await;
    assert_eq!((&stored["isProcessing"], &stored["lastSeq"]), (&json!(false), &json!(0)), "{stored}");

    let open = node_with_fakes(Db::Sqlite, |c| c.allow_bypass_permissions = true).await;
    let token = open.token(&user());
    let session = open.create_session(&token, "codex").await;
    let mut ws = open.connect(&token).await;
    set_scenario(&open, "basic");
    send(&mut ws, &session, "go", json!({ "permissionMode": "bypassPermissions" })).await;
    let turn = collect_run(&mut ws, &session).await;
    assert_run_shape(&turn, &session, "codex", 1);
    assert_exit(&turn, 0, false);
    let args = recorded_argv(&open);
    assert!(contains_run(&args, &["--sandbox", "danger-full-access"]), "{args:?}");
    assert!(contains_run(&args, &["--config", "approval_policy=\"never\""]), "{args:?}");
}
