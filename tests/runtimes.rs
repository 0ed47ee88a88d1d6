//! The five provider runtimes against fake CLIs (tests/fixtures/fake-cli).
//!
//! Each fake records its argv (and, for Claude, its stdin) in the run's working
//! directory, checks the flags the real CLI needs and replays a transcript in
//! the real CLI's format. The runtimes are driven directly through a
//! `RunContext` whose channel is read by a small stand-in for the run driver.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use chatgate::{
    protocol::PermissionAnswer,
    runtime::{
        RunContext, RunOptions, RunOutcome, RunRequest, Runtime, RuntimeMsg,
        claude::{ClaudeConfig, ClaudeRuntime},
        codex::CodexRuntime,
        cursor::CursorRuntime,
        gemini::GeminiRuntime,
        opencode::OpenCodeRuntime,
    },
};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

fn fake(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-cli").join(name).to_string_lossy().into_owned()
}

fn claude(approval_timeout: Duration) -> Arc<dyn Runtime> {
    Arc::new(ClaudeRuntime::new(ClaudeConfig {
        program: fake("fake-claude"),
        approval_timeout,
        context_window: 160_000,
    }))
}

fn codex() -> Arc<dyn Runtime> {
    Arc::new(CodexRuntime::new(fake("fake-codex")))
}

fn cursor() -> Arc<dyn Runtime> {
    Arc::new(CursorRuntime::new(fake("fake-cursor")))
}

fn gemini(inactivity: Duration) -> Arc<dyn Runtime> {
    Arc::new(GeminiRuntime::new(fake("fake-gemini"), inactivity))
}

fn opencode() -> Arc<dyn Runtime> {
    Arc::new(OpenCodeRuntime::new(fake("fake-opencode")))
}

/// A working directory with the fake's scenario.
fn workdir(scenario: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".fake-scenario"), scenario).expect("write scenario");
    dir
}

fn request(dir: &Path, content: &str, resume: Option<&str>, options: RunOptions) -> RunRequest {
    RunRequest {
        session_id: "app-session".into(),
        content: content.into(),
        provider_session_id: resume.map(str::to_string),
        cwd: dir.to_path_buf(),
        project_path: dir.to_path_buf(),
        options,
    }
}

fn argv(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("argv.json")).expect("the fake recorded its argv");
    serde_json::from_str(&text).expect("argv.json")
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} exists", path.display())))
        .expect("json file")
}

/// How the stand-in driver answers tool approvals.
#[derive(Clone)]
enum Answer {
    Allow(Option<Value>),
    AllowAfter(Duration),
    Deny(&'static str),
    Never,
}

/// What one run produced.
#[derive(Debug, Default)]
struct Run {
    events: Vec<Map<String, Value>>,
    provider_ids: Vec<String>,
    permissions: Vec<(String, Value)>,
    cancelled: Vec<&'static str>,
    outcome: Option<RunOutcome>,
    elapsed: Duration,
}

impl Run {
    fn kinds(&self) -> Vec<&str> {
        self.events.iter().map(|e| e["kind"].as_str().unwrap_or("")).collect()
    }

    fn of(&self, kind: &str) -> Vec<&Map<String, Value>> {
        self.events.iter().filter(|e| e["kind"] == kind).collect()
    }

    fn errors(&self) -> Vec<String> {
        self.of("error").iter().map(|e| e["content"].as_str().unwrap_or("").to_string()).collect()
    }

    fn exit_code(&self) -> i32 {
        self.outcome.as_ref().expect("run finished").exit_code
    }
}

/// Runs `runtime` to its end; `cancel_when` cancels the run once it returns true.
async fn drive(
    runtime: Arc<dyn Runtime>,
    request: RunRequest,
    answer: Answer,
    cancel_when: impl Fn(&Run) -> bool,
) -> Run {
    let (tx, mut rx) = mpsc::channel(1024);
    let cancel = CancellationToken::new();
    let ctx = RunContext::new(tx, cancel.clone());
    let started = Instant::now();
    let mut task = tokio::spawn(async move { runtime.run(request, ctx).await });
    let mut run = Run::default();
    let mut held: Vec<oneshot::Sender<PermissionAnswer>> = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    let outcome = loop {
        tokio::select! {
            outcome = &mut task => break outcome.expect("runtime task"),
            Some(msg) = rx.recv() => {
                record(&mut run, msg, &answer, &mut held);
                if !cancel.is_cancelled() && cancel_when(&run) {
                    cancel.cancel();
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if !cancel.is_cancelled() && cancel_when(&run) {
                    cancel.cancel();
                }
            }
            _ = &mut deadline => panic!("run did not finish in 30 s: {run:?}"),
        }
    };
    run.elapsed = started.elapsed();
    while let Ok(msg) = rx.try_recv() {
        record(&mut run, msg, &answer, &mut held);
    }
    run.outcome = Some(outcome);
    run
}

fn record(run: &mut Run, msg: RuntimeMsg, answer: &Answer, held: &mut Vec<oneshot::Sender<PermissionAnswer>>) {
    match msg {
        RuntimeMsg::Event(map) => run.events.push(map),
        RuntimeMsg::ProviderSessionId(id) => run.provider_ids.push(id),
        RuntimeMsg::PermissionCancelled { reason, .. } => run.cancelled.push(reason),
        RuntimeMsg::Permission { tool_name, input, reply, .. } => {
            run.permissions.push((tool_name, input));
            let allow =
                |updated_input| PermissionAnswer { allow: true, updated_input, message: None, remember_entry: None };
            match answer.clone() {
                Answer::Allow(updated) => {
                    let _ = reply.send(allow(updated));
                }
                Answer::AllowAfter(delay) => {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = reply.send(allow(None));
                    });
                }
                Answer::Deny(message) => {
                    let _ = reply.send(PermissionAnswer {
                        allow: false,
                        updated_input: None,
                        message: Some(message.into()),
                        remember_entry: None,
                    });
                }
                Answer::Never => held.push(reply),
            }
        }
    }
}

async fn run_to_end(runtime: Arc<dyn Runtime>, request: RunRequest) -> Run {
    drive(runtime, request, Answer::Never, |_| false).await
}

/// True when the process is gone (or a zombie nobody reaped yet).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().map(|rest| rest.trim_start().starts_with('Z')).unwrap_or(false),
    }
}

fn read_pid(dir: &Path, file: &str) -> i32 {
    std::fs::read_to_string(dir.join(file)).expect("pid file").trim().parse().expect("pid")
}

async fn assert_gone(dir: &Path, files: &[&str]) {
    for file in files {
        let pid = read_pid(dir, file);
        let start = Instant::now();
        while !process_gone(pid) {
            assert!(start.elapsed() < Duration::from_secs(5), "{file} ({pid}) still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn options(f: impl FnOnce(&mut RunOptions)) -> RunOptions {
    let mut options = RunOptions::default();
    f(&mut options);
    options
}

// ---------------------------------------------------------------- claude

#[tokio::test]
async fn claude_normalizes_a_turn_and_announces_its_session() {
    let dir = workdir("basic");
    let opts = options(|o| {
        o.model = Some("claude-sonnet-4-5".into());
        o.effort = Some("high".into());
        o.permission_mode = Some("acceptEdits".into());
        o.allowed_tools = vec!["Read".into()];
        o.disallowed_tools = vec!["WebFetch".into()];
    });
    let run =
        run_to_end(claude(Duration::from_secs(55)), request(dir.path(), "What does the README say?", None, opts)).await;

    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert_eq!(run.provider_ids, vec!["claude-sess-1"]);
    assert_eq!(
        run.kinds(),
        vec!["thinking", "text", "tool_use", "status", "tool_result", "text", "text", "status"],
        "{:#?}",
        run.events
    );
    assert_eq!(run.events[0]["content"], "Let me look at the README.");
    assert_eq!(run.events[1]["role"], "assistant");
    assert_eq!(run.events[1]["content"], "I'll read it.");
    let tool_use = &run.events[2];
    assert_eq!(tool_use["toolName"], "Read");
    assert_eq!(tool_use["toolInput"], json!({ "file_path": "README.md" }));
    assert_eq!(tool_use["toolId"], "toolu_01");
    let budget = &run.events[3]["tokenBudget"];
    assert_eq!(run.events[3]["text"], "token_budget");
    assert_eq!(budget["inputTokens"], 115);
    assert_eq!(budget["outputTokens"], 30);
    assert_eq!(budget["used"], 145);
    assert_eq!(budget["total"], 160_000);
    assert_eq!(budget["cacheReadTokens"], 100);
    assert_eq!(budget["cacheCreationTokens"], 5);
    assert_eq!(budget["breakdown"], json!({ "input": 115, "output": 30 }));
    let result = &run.events[4];
    assert_eq!(result["toolId"], "toolu_01");
    assert_eq!(result["content"], "# Project\nhello");
    assert_eq!(result["isError"], false);
    assert_eq!(result["toolUseResult"]["stdout"], "# Project\nhello");
    // The subagent's text carries its parent; its usage is not the session's budget.
    assert_eq!(run.events[5]["content"], "subagent says hi");
    assert_eq!(run.events[5]["parentToolUseId"], "toolu_01");
    assert_eq!(run.events[6]["content"], "The README says hello.");
    assert!(run.events[6].get("parentToolUseId").is_none());
    assert_eq!(run.events[7]["tokenBudget"]["used"], 1200);
    assert!(run.errors().is_empty(), "{:?}", run.errors());

    let args = argv(dir.path());
    for expected in [
        &["--output-format", "stream-json"][..],
        &["--input-format", "stream-json"],
        &["--permission-prompt-tool", "stdio"],
        &["--model", "claude-sonnet-4-5"],
        &["--effort", "high"],
        &["--permission-mode", "acceptEdits"],
        &["--allowedTools", "Read"],
        &["--disallowedTools", "WebFetch"],
    ] {
        assert!(args.windows(expected.len()).any(|w| w == expected), "{expected:?} in {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--resume")), "{args:?}");
    let stdin: Vec<Value> = std::fs::read_to_string(dir.path().join("stdin.jsonl"))
        .expect("stdin log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdin line is JSON"))
        .collect();
    assert_eq!(stdin[0]["type"], "control_request");
    assert_eq!(stdin[0]["request"]["subtype"], "initialize");
    assert_eq!(stdin[1]["type"], "user");
    assert_eq!(stdin[1]["message"], json!({ "role": "user", "content": "What does the README say?" }));
    assert_eq!(stdin[1]["parent_tool_use_id"], Value::Null);
}

#[tokio::test]
async fn claude_resumes_with_the_stored_id_without_reannouncing_it() {
    let dir = workdir("partial");
    let run = run_to_end(
        claude(Duration::from_secs(55)),
        request(dir.path(), "again", Some("claude-sess-9"), RunOptions::default()),
    )
    .await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert!(argv(dir.path()).contains(&"--resume=claude-sess-9".to_string()));
    assert!(run.provider_ids.is_empty(), "same id is not announced again: {:?}", run.provider_ids);
    assert_eq!(run.kinds(), vec!["stream_delta", "stream_delta", "stream_end", "status"]);
    assert_eq!(run.events[0]["content"], "Hel");
    assert_eq!(run.events[1]["content"], "lo");
}

#[tokio::test]
async fn claude_tool_approval_allowed_with_updated_input() {
    let dir = workdir("permission");
    let updated = json!({ "command": "git status --short" });
    let run = drive(
        claude(Duration::from_secs(55)),
        request(dir.path(), "status?", None, RunOptions::default()),
        Answer::Allow(Some(updated.clone())),
        |_| false,
    )
    .await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert_eq!(run.permissions, vec![("Bash".to_string(), json!({ "command": "git status" }))]);
    let decision = read_json(dir.path().join("decision.json"));
    assert_eq!(decision["subtype"], "success");
    assert_eq!(decision["request_id"], "6f1c2a9e-3d4b-4c5a-9e8f-0a1b2c3d4e5f");
    assert_eq!(decision["response"], json!({ "behavior": "allow", "updatedInput": updated }));
    let results = run.of("tool_result");
    assert_eq!(results[0]["content"], format!("ran: {}", serde_json::to_string(&updated).unwrap_or_default()));
    assert_eq!(results[0]["isError"], false);
    assert_eq!(results[0]["toolUseResult"]["interrupted"], false);
    assert!(run.cancelled.is_empty());
}

#[tokio::test]
async fn claude_tool_approval_denied() {
    let dir = workdir("permission");
    let run = drive(
        claude(Duration::from_secs(55)),
        request(dir.path(), "status?", None, RunOptions::default()),
        Answer::Deny("not now"),
        |_| false,
    )
    .await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    let decision = read_json(dir.path().join("decision.json"));
    assert_eq!(decision["response"], json!({ "behavior": "deny", "message": "not now" }));
    let results = run.of("tool_result");
    assert_eq!(results[0]["content"], "not now");
    assert_eq!(results[0]["isError"], true);
    // The real CLI's `tool_use_result` is a string for a denied tool, an object otherwise.
    assert_eq!(results[0]["toolUseResult"], "Error: not now");
}

#[tokio::test]
async fn claude_tool_approval_times_out_and_denies() {
    let dir = workdir("permission");
    let run = drive(
        claude(Duration::from_millis(300)),
        request(dir.path(), "status?", None, RunOptions::default()),
        Answer::Never,
        |_| false,
    )
    .await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert_eq!(run.cancelled, vec!["timeout"]);
    let decision = read_json(dir.path().join("decision.json"));
    assert_eq!(decision["response"], json!({ "behavior": "deny", "message": "Permission request timed out" }));
}

#[tokio::test]
async fn claude_ask_user_question_never_times_out() {
    let dir = workdir("ask");
    let run = drive(
        claude(Duration::from_millis(100)),
        request(dir.path(), "ask me", None, options(|o| o.permission_mode = Some("bypassPermissions".into()))),
        Answer::AllowAfter(Duration::from_millis(600)),
        |_| false,
    )
    .await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert_eq!(run.permissions.len(), 1, "asked even under bypassPermissions");
    assert_eq!(run.permissions[0].0, "AskUserQuestion");
    assert!(run.cancelled.is_empty(), "no timeout for AskUserQuestion: {:?}", run.cancelled);
    let decision = read_json(dir.path().join("decision.json"));
    assert_eq!(decision["response"]["behavior"], "allow");
}

#[tokio::test]
async fn claude_allowed_tool_rule_answers_without_asking() {
    let dir = workdir("permission");
    let opts = options(|o| o.allowed_tools = vec!["Bash(git status:*)".into()]);
    let run =
        drive(claude(Duration::from_secs(55)), request(dir.path(), "status?", None, opts), Answer::Never, |_| false)
            .await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert!(run.permissions.is_empty());
    let decision = read_json(dir.path().join("decision.json"));
    assert_eq!(decision["response"], json!({ "behavior": "allow", "updatedInput": { "command": "git status" } }));
}

#[tokio::test]
async fn claude_error_result_fails_the_run() {
    let dir = workdir("error-result");
    let run = run_to_end(claude(Duration::from_secs(55)), request(dir.path(), "hi", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 1);
    assert_eq!(run.errors(), vec!["API Error: overloaded"]);
}

#[tokio::test]
async fn claude_api_error_is_one_error_not_an_assistant_reply() {
    let dir = workdir("api-error");
    let run = run_to_end(claude(Duration::from_secs(55)), request(dir.path(), "hi", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 1, "{run:?}");
    assert!(run.of("text").is_empty(), "the synthetic API error message is no reply: {run:?}");
    assert_eq!(run.errors(), vec!["API Error: 400 invalid request"]);
}

#[tokio::test]
async fn claude_root_bypass_refusal_names_its_cause() {
    let dir = workdir("root-bypass");
    let opts = options(|o| o.permission_mode = Some("bypassPermissions".into()));
    let run = run_to_end(claude(Duration::from_secs(55)), request(dir.path(), "hi", None, opts)).await;
    assert_eq!(run.exit_code(), 1, "{run:?}");
    assert_eq!(run.errors(), vec![chatgate::runtime::claude::ROOT_BYPASS_REFUSED]);
}

#[tokio::test]
async fn claude_abort_interrupts_then_kills_the_group() {
    let dir = workdir("hang");
    let run = drive(
        claude(Duration::from_secs(55)),
        request(dir.path(), "long job", None, RunOptions::default()),
        Answer::Never,
        |run| !run.events.is_empty(),
    )
    .await;
    assert!(run.elapsed < Duration::from_secs(5), "abort took {:?}", run.elapsed);
    assert_ne!(run.exit_code(), 0);
    let stdin = std::fs::read_to_string(dir.path().join("stdin.jsonl")).expect("stdin log");
    let interrupt = stdin
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|m| m["type"] == "control_request" && m["request"]["subtype"] == "interrupt")
        .expect("interrupt control request sent");
    assert!(interrupt["request_id"].as_str().unwrap_or("").starts_with("req_"));
    assert_gone(dir.path(), &["cli.pid", "grandchild.pid"]).await;
}

// ---------------------------------------------------------------- codex

#[tokio::test]
async fn codex_maps_items_usage_and_thread_id() {
    let dir = workdir("basic");
    let opts = options(|o| {
        o.model = Some("gpt-5-codex".into());
        o.effort = Some("high".into());
    });
    let run = run_to_end(codex(), request(dir.path(), "-fix the bug", None, opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert_eq!(run.provider_ids, vec!["0199a213-81c0-7800-8aa1-bbab2a035a53"]);
    assert_eq!(
        run.kinds(),
        vec!["thinking", "tool_use", "tool_use", "tool_use", "tool_use", "tool_use", "error", "text", "status"]
    );
    let e = &run.events;
    assert_eq!(e[0]["content"], "**Looking at the repository**");
    assert_eq!(e[1]["toolName"], "Bash");
    assert_eq!(e[1]["toolInput"], json!({ "command": "bash -lc ls" }));
    assert_eq!(e[1]["toolId"], "item_1");
    assert_eq!(e[1]["output"], "README.md\nsrc\n");
    assert_eq!(e[1]["exitCode"], 0);
    assert_eq!(e[1]["status"], "completed");
    assert_eq!(e[2]["toolName"], "FileChanges");
    assert_eq!(e[2]["toolInput"][0], json!({ "path": "src/lib.rs", "kind": "update" }));
    assert_eq!(e[3]["toolName"], "search");
    assert_eq!(e[3]["server"], "docs");
    assert_eq!(e[3]["toolInput"], json!({ "q": "tokio" }));
    assert_eq!(e[3]["result"]["content"][0]["text"], "found it");
    assert_eq!(e[4]["toolName"], "WebSearch");
    assert_eq!(e[4]["toolInput"], json!({ "query": "tokio select cancel safety" }));
    assert_eq!(e[5]["toolName"], "TodoList");
    assert_eq!(e[5]["toolInput"]["items"][1], json!({ "text": "write tests", "completed": false }));
    assert_eq!(e[6]["content"], "command output was truncated");
    assert_eq!(
        e[7],
        json_map(json!({ "kind": "text", "role": "assistant", "content": "All done: two files changed." }))
    );
    assert_eq!(e[8]["text"], "token_budget");
    assert_eq!(
        e[8]["tokenBudget"],
        json!({ "used": 1500, "total": 200000, "inputTokens": 1200, "outputTokens": 300, "breakdown": { "input": 1200, "output": 300 },
                "cacheReadTokens": 800, "cacheCreationTokens": 100, "reasoningTokens": 40 })
    );
    assert!(run.of("complete").is_empty(), "the runtime never emits complete");

    let args = argv(dir.path());
    let cwd = dir.path().to_string_lossy().into_owned();
    assert_eq!(&args[..4], &["exec", "--json", "--model", "gpt-5-codex"]);
    for expected in [
        &["--sandbox", "workspace-write"][..],
        &["--cd", cwd.as_str()],
        &["--config", "model_reasoning_effort=\"high\""],
        &["--config", "approval_policy=\"on-request\""],
    ] {
        assert!(args.windows(expected.len()).any(|w| w == expected), "{expected:?} in {args:?}");
    }
    assert_eq!(&args[args.len() - 2..], &["--", "-fix the bug"]);
    assert!(!args.contains(&"resume".to_string()));
}

fn json_map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

#[tokio::test]
async fn codex_resume_and_turn_failure() {
    let dir = workdir("failed");
    let opts = options(|o| o.permission_mode = Some("bypassPermissions".into()));
    let run = run_to_end(codex(), request(dir.path(), "continue", Some("thread-42"), opts)).await;
    assert_eq!(run.exit_code(), 1);
    assert!(run.provider_ids.is_empty());
    // One API error, reported by Codex as `error` and `turn.failed`, is shown once, as its
    // message; the stream retry before it is no error.
    assert_eq!(run.errors(), vec!["You exceeded your current quota."]);
    let args = argv(dir.path());
    let resume = args.iter().position(|a| a == "resume").expect("resume subcommand");
    assert_eq!(args[resume + 1], "thread-42");
    assert!(resume < args.iter().position(|a| a == "--").unwrap_or(0));
    assert!(args.windows(2).any(|w| w == ["--sandbox", "danger-full-access"]));
    assert!(args.windows(2).any(|w| w == ["--config", "approval_policy=\"never\""]));
}

#[tokio::test]
async fn codex_plan_mode_is_read_only() {
    let dir = workdir("basic");
    let opts = options(|o| {
        o.permission_mode = Some("plan".into());
        o.skip_permissions = true;
    });
    let run = run_to_end(codex(), request(dir.path(), "plan it", None, opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    let args = argv(dir.path());
    assert!(args.windows(2).any(|w| w == ["--sandbox", "read-only"]), "{args:?}");
    assert!(args.windows(2).any(|w| w == ["--config", "approval_policy=\"on-request\""]), "{args:?}");
}

// ---------------------------------------------------------------- cursor

#[tokio::test]
async fn cursor_streams_text_and_garbage_lines() {
    let dir = workdir("basic");
    let opts = options(|o| {
        o.model = Some("sonnet-4".into());
        o.skip_permissions = true;
    });
    let run = run_to_end(cursor(), request(dir.path(), "say hello", None, opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert_eq!(run.provider_ids, vec!["c6b62c6f-7ead-4fd6-9922-e952131177ff"]);
    assert_eq!(run.kinds(), vec!["stream_delta", "stream_delta", "stream_delta", "stream_end"]);
    let contents: Vec<_> = run.of("stream_delta").iter().map(|e| e["content"].clone()).collect();
    assert_eq!(contents, vec![json!("Hello! "), json!("Warning: plain text progress line"), json!("How can I help?")]);
    assert_eq!(
        argv(dir.path()),
        vec!["-p", "say hello", "--model", "sonnet-4", "--output-format", "stream-json", "-f"]
    );
}

#[tokio::test]
async fn cursor_resume_passes_the_id_and_no_model() {
    let dir = workdir("resume");
    let opts = options(|o| o.model = Some("sonnet-4".into()));
    let run = run_to_end(cursor(), request(dir.path(), "hi again", Some("cur-7"), opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert!(run.provider_ids.is_empty());
    assert_eq!(argv(dir.path()), vec!["--resume=cur-7", "-p", "hi again", "--output-format", "stream-json"]);
}

#[tokio::test]
async fn cursor_crash_mid_stream_keeps_events_and_exit_code() {
    let dir = workdir("crash");
    let run = run_to_end(cursor(), request(dir.path(), "go", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 3);
    assert_eq!(run.of("stream_delta")[0]["content"], "partial answer");
    assert!(run.errors().iter().any(|e| e == "Segmentation fault (core dumped)"), "{:?}", run.errors());
}

#[tokio::test]
async fn cursor_failed_result_fails_the_run() {
    let dir = workdir("failed-result");
    let run = run_to_end(cursor(), request(dir.path(), "go", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 1);
    assert_eq!(run.errors(), vec!["Model refused the request"]);
}

#[tokio::test]
async fn stderr_flood_is_capped() {
    let dir = workdir("stderr-flood");
    let run = run_to_end(cursor(), request(dir.path(), "go", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 0);
    let errors = run.errors();
    assert!(errors.len() <= 201 && errors.len() >= 2, "{} error events", errors.len());
    assert_eq!(errors[0], "noise line 0");
    let last = errors.last().cloned().unwrap_or_default();
    assert!(last.contains("more stderr lines not shown"), "{last}");
}

#[tokio::test]
async fn an_over_long_stdout_line_is_dropped_and_reading_goes_on() {
    let dir = workdir("bigline");
    let run = run_to_end(cursor(), request(dir.path(), "go", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 0);
    assert!(run.errors()[0].contains("dropped an output line of 9000000 bytes"), "{:?}", run.errors());
    assert_eq!(run.of("stream_delta")[0]["content"], "after the big line");
}

#[tokio::test]
async fn leftover_grandchildren_are_killed_when_the_cli_exits() {
    let dir = workdir("leftover");
    let run = run_to_end(cursor(), request(dir.path(), "go", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}", run.elapsed);
    assert_eq!(run.kinds(), vec!["stream_delta", "stream_end"]);
    assert_gone(dir.path(), &["cli.pid", "grandchild.pid"]).await;
}

#[tokio::test]
async fn abort_before_the_provider_id_kills_the_whole_group() {
    let dir = workdir("hang-silent");
    let pid_file = dir.path().join("grandchild.pid");
    let run =
        drive(codex(), request(dir.path(), "go", None, RunOptions::default()), Answer::Never, |_| pid_file.exists())
            .await;
    assert!(run.provider_ids.is_empty());
    assert!(run.events.is_empty(), "{:?}", run.events);
    assert_ne!(run.exit_code(), 0);
    assert!(run.elapsed < Duration::from_secs(5), "abort took {:?}", run.elapsed);
    assert_gone(dir.path(), &["cli.pid", "grandchild.pid"]).await;
}

#[tokio::test]
async fn abort_escalates_to_sigkill_when_sigterm_is_ignored() {
    let dir = workdir("hang-term");
    let pid_file = dir.path().join("grandchild.pid");
    let run =
        drive(cursor(), request(dir.path(), "go", None, RunOptions::default()), Answer::Never, |_| pid_file.exists())
            .await;
    assert_ne!(run.exit_code(), 0);
    assert!(run.elapsed < Duration::from_secs(6), "abort took {:?}", run.elapsed);
    assert_gone(dir.path(), &["cli.pid", "grandchild.pid"]).await;
}

#[tokio::test]
async fn dropping_a_run_kills_its_group() {
    let dir = workdir("hang-silent");
    let (tx, _rx) = mpsc::channel(16);
    let ctx = RunContext::new(tx, CancellationToken::new());
    let runtime = codex();
    let req = request(dir.path(), "go", None, RunOptions::default());
    let task = tokio::spawn(async move { runtime.run(req, ctx).await });
    let start = Instant::now();
    while !dir.path().join("grandchild.pid").exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "fake never started its grandchild");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let _ = task.await;
    assert_gone(dir.path(), &["cli.pid", "grandchild.pid"]).await;
}

// ---------------------------------------------------------------- gemini

#[tokio::test]
async fn gemini_maps_messages_tools_and_result() {
    let dir = workdir("basic");
    let opts = options(|o| {
        o.model = Some("gemini-2.5-pro".into());
        o.permission_mode = Some("acceptEdits".into());
        o.allowed_tools = vec!["read_file".into(), "list_directory".into()];
    });
    let run = run_to_end(gemini(Duration::from_secs(120)), request(dir.path(), "list the files", None, opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    let recorded = argv(dir.path());
    let policy_path = recorded.last().cloned().unwrap_or_default();
    assert!(policy_path.starts_with(&dir.path().join(".tmp/policies").to_string_lossy().into_owned()), "{recorded:?}");
    assert_eq!(run.provider_ids, vec!["8b0a3c1e-gem-sess-1"]);
    let kinds: Vec<_> = run.kinds().into_iter().filter(|k| *k != "error").collect();
    assert_eq!(
        kinds,
        vec![
            "stream_delta",
            "stream_delta",
            "tool_use",
            "tool_result",
            "tool_use",
            "tool_result",
            "stream_delta",
            "status",
            "stream_end",
            "status"
        ]
    );
    let tools = run.of("tool_use");
    assert_eq!(tools[0]["toolName"], "list_directory");
    assert_eq!(tools[0]["toolInput"], json!({ "dir_path": "." }));
    assert_eq!(tools[0]["toolId"], "list_directory-1-abc");
    let results = run.of("tool_result");
    assert_eq!(results[0]["content"], "Listed 2 item(s).");
    assert_eq!(results[0]["isError"], false);
    assert_eq!(results[1]["content"], "File not found: missing.txt");
    assert_eq!(results[1]["isError"], true);
    let status = run.of("status");
    // The stream's warning is a status, not an error.
    assert_eq!(status[0]["text"], "Loop detected, stopping.");
    assert_eq!(status[1]["text"], "Complete");
    assert_eq!(status[1]["tokens"], 1500);
    assert_eq!(status[1]["canInterrupt"], false);
    let errors = run.errors();
    assert!(errors.contains(&"quota warning: 90% used".to_string()), "{errors:?}");
    assert!(!errors.contains(&"Loop detected, stopping.".to_string()), "{errors:?}");
    assert!(!errors.iter().any(|e| e.contains("DeprecationWarning") || e.contains("cached credentials")), "{errors:?}");
    assert_eq!(
        argv(dir.path()),
        vec![
            "--prompt",
            "list the files",
            "--skip-trust",
            "--model",
            "gemini-2.5-pro",
            "--output-format",
            "stream-json",
            "--approval-mode",
            "auto_edit",
            "--policy",
            &policy_path,
        ]
    );
    let policy = std::fs::read_to_string(dir.path().join("policy.toml")).expect("the fake kept the policy");
    assert!(policy.contains("toolName = \"read_file\"\ndecision = \"allow\""), "{policy}");
    assert!(policy.contains("toolName = \"list_directory\"\ndecision = \"allow\""), "{policy}");
    assert!(!dir.path().join(".tmp").exists(), "the run's policy file is removed");
}

#[tokio::test]
async fn gemini_api_error_is_one_error_and_its_exit_code_is_explained() {
    let dir = workdir("api-error");
    let run =
        run_to_end(gemini(Duration::from_secs(120)), request(dir.path(), "fail", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 144, "{run:?}");
    assert_eq!(run.errors(), vec!["standin: invalid request (scripted)"], "no stderr chatter, no stack trace");
    let reason = run.outcome.as_ref().and_then(|o| o.error.clone()).unwrap_or_default();
    assert!(reason.contains("HTTP 400") && reason.contains("exit code 144"), "{reason}");
}

#[tokio::test]
async fn gemini_resume_and_yolo() {
    let dir = workdir("resume");
    let opts = options(|o| o.skip_permissions = true);
    let run = run_to_end(gemini(Duration::from_secs(120)), request(dir.path(), "more", Some("gem-3"), opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert!(run.provider_ids.is_empty());
    assert_eq!(run.kinds(), vec!["stream_delta", "stream_end", "stream_end"]);
    assert_eq!(
        argv(dir.path()),
        vec!["--prompt", "more", "--resume", "gem-3", "--skip-trust", "--output-format", "stream-json", "--yolo"]
    );
}

#[tokio::test]
async fn gemini_inactivity_timeout_ends_the_group() {
    let dir = workdir("silent");
    let run =
        run_to_end(gemini(Duration::from_millis(700)), request(dir.path(), "wait", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 1);
    assert!(
        run.errors().iter().any(|e| e.starts_with("Gemini CLI timeout - no response received for")),
        "{:?}",
        run.errors()
    );
    assert_eq!(run.provider_ids, vec!["gem-silent"]);
    assert_gone(dir.path(), &["cli.pid", "grandchild.pid"]).await;
}

#[tokio::test]
async fn gemini_documented_exit_codes_get_upstreams_message() {
    let dir = workdir("auth");
    let run =
        run_to_end(gemini(Duration::from_secs(120)), request(dir.path(), "hi", None, RunOptions::default())).await;
    assert_eq!(run.exit_code(), 41);
    assert!(
        run.errors().iter().any(|e| e.starts_with("Gemini authentication failed (exit code 41)")),
        "{:?}",
        run.errors()
    );
}

// ---------------------------------------------------------------- opencode

#[tokio::test]
async fn opencode_maps_parts_tools_tokens_and_garbage() {
    let dir = workdir("basic");
    let opts = options(|o| {
        o.model = Some("anthropic/claude-sonnet-4".into());
        o.effort = Some("high".into());
    });
    let run = run_to_end(opencode(), request(dir.path(), "  list files  ", None, opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert_eq!(run.provider_ids, vec!["ses_6f1a2b3c"]);
    assert_eq!(
        run.kinds(),
        vec!["tool_use", "tool_use", "thinking", "stream_delta", "stream_delta", "stream_end", "status", "error"]
    );
    let e = &run.events;
    assert_eq!(e[0]["toolName"], "bash");
    assert_eq!(e[0]["toolId"], "call_ls");
    assert_eq!(e[0]["toolInput"], json!({ "command": "ls", "description": "List files" }));
    assert_eq!(e[0]["toolResult"], json!({ "content": "README.md\n", "isError": false }));
    assert_eq!(e[1]["toolResult"], json!({ "content": "File not found: /nope", "isError": true }));
    assert_eq!(e[2]["content"], "The user wants a listing.");
    assert_eq!(e[3]["content"], "There is one file: README.md.");
    assert_eq!(e[4]["content"], "plain progress line");
    // No `total` in this transcript: used = input (cached ones included) + output (reasoning included).
    assert_eq!(
        e[6]["tokenBudget"],
        json!({ "used": 175, "inputTokens": 150, "outputTokens": 25, "cacheReadTokens": 50, "cacheCreationTokens": 0,
            "reasoningTokens": 5, "breakdown": { "input": 150, "output": 25 } })
    );
    assert_eq!(e[7]["content"], "Rate limited");
    let cwd = dir.path().to_string_lossy().into_owned();
    assert_eq!(
        argv(dir.path()),
        vec![
            "run",
            "--format",
            "json",
            "--dir",
            cwd.as_str(),
            "--model",
            "anthropic/claude-sonnet-4",
            "--variant",
            "high",
        ]
    );
    // On stdin, as it was sent: `opencode run` would quote a message argument holding a space.
    assert_eq!(std::fs::read_to_string(dir.path().join("prompt.txt")).unwrap(), "  list files  ");
}

#[tokio::test]
async fn opencode_bypass_passes_auto() {
    let dir = workdir("resume");
    let opts = options(|o| o.permission_mode = Some("bypassPermissions".into()));
    let run = run_to_end(opencode(), request(dir.path(), "-n say \"x\"", Some("ses_old"), opts)).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert!(argv(dir.path()).contains(&"--auto".to_string()), "{:?}", argv(dir.path()));
    assert_eq!(std::fs::read_to_string(dir.path().join("prompt.txt")).unwrap(), "-n say \"x\"");
}

#[tokio::test]
async fn opencode_resume_passes_the_session() {
    let dir = workdir("resume");
    let run = run_to_end(opencode(), request(dir.path(), "more", Some("ses_old"), RunOptions::default())).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    assert!(run.provider_ids.is_empty());
    assert!(argv(dir.path()).windows(2).any(|w| w == ["--session", "ses_old"]));
    assert_eq!(run.kinds(), vec!["stream_delta", "stream_end", "status"]);
}

// ---------------------------------------------------------------- common

#[tokio::test]
async fn a_missing_program_gives_an_error_naming_it_and_127() {
    let dir = workdir("basic");
    let missing = "/nonexistent/bin/provider-cli";
    let runtimes: HashMap<&str, Arc<dyn Runtime>> = HashMap::from([
        (
            "claude",
            Arc::new(ClaudeRuntime::new(ClaudeConfig {
                program: missing.into(),
                approval_timeout: Duration::from_secs(1),
                context_window: 1,
            })) as Arc<dyn Runtime>,
        ),
        ("codex", Arc::new(CodexRuntime::new(missing.into())) as Arc<dyn Runtime>),
        ("cursor", Arc::new(CursorRuntime::new(missing.into())) as Arc<dyn Runtime>),
        ("gemini", Arc::new(GeminiRuntime::new(missing.into(), Duration::from_secs(1))) as Arc<dyn Runtime>),
        ("opencode", Arc::new(OpenCodeRuntime::new(missing.into())) as Arc<dyn Runtime>),
    ]);
    for (name, runtime) in runtimes {
        let run = run_to_end(runtime, request(dir.path(), "hi", None, RunOptions::default())).await;
        assert_eq!(run.exit_code(), 127, "{name}");
        assert_eq!(run.kinds(), vec!["error"], "{name}");
        let error = &run.errors()[0];
        assert!(error.contains(missing) && error.contains(name), "{name}: {error}");
    }
}

// ---------------------------------------------------------------- images

fn with_images() -> RunOptions {
    options(|o| {
        o.extra.insert(
            "images".into(),
            json!([
                { "data": "data:image/png;base64,aGVsbG8=", "name": "a.png" },
                { "data": "not a data url" },
                { "data": "data:image/jpeg;base64,d29ybGQhIQ==" },
            ]),
        );
    })
}

/// The sizes the fake saw for each image path, in order of the paths.
fn images_seen(dir: &Path) -> Vec<(String, Value)> {
    let seen = read_json(dir.join("images.json"));
    let mut entries: Vec<(String, Value)> = seen.as_object().cloned().unwrap_or_default().into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

#[tokio::test]
async fn codex_gets_images_as_files_removed_after_the_run() {
    let dir = workdir("basic");
    let run = run_to_end(codex(), request(dir.path(), "describe", None, with_images())).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    let seen = images_seen(dir.path());
    assert_eq!(seen.len(), 2, "the malformed image is skipped: {seen:?}");
    let images_root = dir.path().join(".tmp/images");
    assert!(seen[0].0.starts_with(&*images_root.to_string_lossy()) && seen[0].0.ends_with("image_0.png"), "{seen:?}");
    assert_eq!(seen[0].1, 5);
    assert!(seen[1].0.ends_with("image_1.jpeg"));
    assert_eq!(seen[1].1, 7);
    assert!(!dir.path().join(".tmp").exists(), "image files are removed after the run");
}

#[tokio::test]
async fn claude_gets_image_paths_in_the_prompt() {
    let dir = workdir("partial");
    let run =
        run_to_end(claude(Duration::from_secs(55)), request(dir.path(), "what is this?", None, with_images())).await;
    assert_eq!(run.exit_code(), 0, "{run:?}");
    let prompt = std::fs::read_to_string(dir.path().join("prompt.txt")).expect("prompt recorded");
    assert!(prompt.starts_with("what is this?\n\n[Images provided at the following paths:]\n1. "), "{prompt}");
    let seen = images_seen(dir.path());
    assert_eq!(seen.iter().map(|(_, size)| size.clone()).collect::<Vec<_>>(), vec![json!(5), json!(7)]);
    assert!(!dir.path().join(".tmp").exists());
}
