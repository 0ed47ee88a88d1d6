//! The REAL Claude Code CLI (npm `@anthropic-ai/claude-code`, pinned in
//! `tests/real-cli/package-lock.json`) run by the real `chatgate` binary, with and without
//! the bubblewrap sandbox: the agent's `env` tool shows no gateway secret (issue 13); and a
//! whole session (issue 15): a `Bash` call (approved, denied, or under `bypassPermissions`) and
//! its follow-up, a resumed turn the model sees whole, an HTTP 400 shown once as an error and
//! never as an assistant reply, an abort leaving no process, the history; and a root gateway
//! without the sandbox explaining the CLI's refusal of `bypassPermissions`.
//!
//! The model is `tests/real-cli/model-standin.mjs`, a local stand-in for the Anthropic
//! Messages API, scripted by the prompt (see its header): by default it answers the agent's
//! first request with a `Bash` tool call and the next one with the text `done`. The gateway gets its JWT secret and database URL in its
//! ENVIRONMENT (as an operator's container would), and passes the CLI only what
//! `--provider-env` names.
//!
//! The CLI: `CHATGATE_TEST_CLAUDE_DIR` (the `claude` program, a directory holding it, or a
//! `node_modules` directory holding `.bin/claude`), default
//! `tests/real-cli/node_modules/.bin/claude`. Install it with `npm install --prefix tests/real-cli`
//! (`scripts/test.sh` does); `CHATGATE_SKIP_REAL_CLIS=1` skips these tests when it is missing.

mod common;
#[path = "common/real_cli.rs"]
mod real_cli;

use std::path::PathBuf;

use real_cli::{
    Approvals, CliSetup, Gateway, ModelStandin, TURN_TIMEOUT, assert_no_process_in, assistant_texts, enc, errors,
    find_cli, of, read, turn,
};
use serde_json::{Value, json};

/// The variables the gateway hands to the CLI (`--provider-env`).
const PROVIDER_ENV: &str = "ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY,DISABLE_TELEMETRY,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC,DISABLE_AUTOUPDATER";
/// Names that must never reach an agent.
const FORBIDDEN_NAMES: [&str; 3] = ["CHATGATE_", "DATABASE_URL", "REDIS_URL"];

/// The Claude CLI to run and the host directory to bind read-only into the sandbox for it
/// (its `node_modules`, or the directory holding it); `None` when skipped.
fn claude_cli() -> Option<(PathBuf, PathBuf)> {
    find_cli("claude", "CHATGATE_TEST_CLAUDE_DIR", "Claude Code CLI", "Claude Code").map(|cli| (cli.program, cli.ro))
}

/// Asserts `text` names no gateway secret.
fn assert_clean(what: &str, text: &str, secret: &str) {
    assert!(!text.contains(secret), "{what} contains the gateway's JWT secret:\n{text}");
    for name in FORBIDDEN_NAMES {
        assert!(!text.contains(name), "{what} contains {name}:\n{text}");
    }
}

/// The `HOME=` line of `env` output.
fn home_of(env_output: &str) -> Option<&str> {
    env_output.lines().find_map(|line| line.strip_prefix("HOME="))
}

/// One run of the real CLI through the real gateway under `--sandbox <sandbox>`, its agent
/// calling `Bash` with `command` (whose output starts with `env`'s).
async fn env_shows_no_gateway_secret(sandbox: &str, command: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, command);
    // Not on the allow-list: must not be inherited either.
    let canary = format!("canary-{}", uuid::Uuid::new_v4().simple());
    let extra = [("GATEWAY_ONLY_CANARY", canary.as_str())];
    let Some(gateway) = claude_gateway(&root, &standin, sandbox, false, &extra).await else { return String::new() };
    let readyz: Value = reqwest::get(format!("{}/readyz", gateway.node.base)).await.unwrap().json().await.unwrap();
    assert_eq!(readyz["sandbox"], sandbox, "/readyz: {readyz}");
    let session = gateway.create_session("claude").await;
    let project = gateway.workspaces.join(enc(&gateway.user)).join("proj");
    assert!(project.is_dir(), "the session's project is not in the user's workspace: {}", project.display());

    // As root the CLI refuses bypassPermissions (`--dangerously-skip-permissions cannot be used
    // with root/sudo privileges`); inside the sandbox it is uid 1000. Otherwise the run asks, and
    // the test allows.
    let bypass = sandbox == "bwrap" || !nix::unistd::geteuid().is_root();
    let options = if bypass { json!({ "permissionMode": "bypassPermissions" }) } else { json!({}) };
    let mut ws = gateway.connect().await;
    let events = turn(&gateway, &standin, &mut ws, &session, "print the environment", options, Approvals::Allow).await;
    let dump = serde_json::to_string_pretty(&events).unwrap();
    let complete = events.last().unwrap();
    assert_eq!(
        complete["success"],
        true,
        "the run failed: {dump}\nchatgate log:\n{}\nmodel stand-in log:\n{}",
        gateway.logs(),
        read(&standin.log)
    );

    let tool_use = events
        .iter()
        .find(|e| e["kind"] == "tool_use" && e["toolName"] == "Bash")
        .unwrap_or_else(|| panic!("no Bash tool_use: {dump}"));
    assert_eq!(tool_use["toolInput"]["command"], command, "{dump}");
    let result = events
        .iter()
        .find(|e| e["kind"] == "tool_result" && e["toolId"] == tool_use["toolId"])
        .unwrap_or_else(|| panic!("no tool_result for the env call: {dump}"));
    assert_eq!(result["isError"], false, "{dump}");
    let output = result["content"].as_str().unwrap_or_default();
    eprintln!("--sandbox {sandbox}: the agent's `{command}`:\n{output}");
    assert!(output.contains("HOME="), "env did not run: {dump}");
    let expected_home = gateway.home();
    assert_eq!(home_of(output), Some(expected_home.to_str().unwrap()), "HOME of the agent: {output}");
    let secret = gateway.secret.as_str();
    assert_clean("the env tool's output", output, secret);
    // Built from the allow-list, nothing inherited: not the gateway's other variables, nor
    // the ones cargo gave the test (and so the gateway).
    for inherited in [canary.as_str(), "GATEWAY_ONLY_CANARY", "CARGO_"] {
        assert!(!output.contains(inherited), "the agent inherited {inherited}:\n{output}");
    }
    if !bypass {
        assert!(
            events.iter().any(|e| e["kind"] == "permission_resolved" && e["allow"] == true),
            "the env call was not approved through chat.permission-response: {dump}"
        );
    }
    assert!(events.iter().any(|e| e["kind"] == "text" && e["content"] == "done"), "no final text: {dump}");
    assert_clean("the streamed events", &dump, secret);

    // The stored history (written off the hot path: wait for its complete).
    let messages = gateway.history(&session, 1).await;
    let stored = messages
        .iter()
        .find(|m| m["kind"] == "tool_result" && m["toolId"] == tool_use["toolId"])
        .unwrap_or_else(|| panic!("no stored tool_result: {messages:#?}"));
    let stored_output = stored["content"].as_str().unwrap_or_default();
    assert!(stored_output.contains("HOME="), "stored tool_result: {stored}");
    assert_eq!(home_of(stored_output), Some(expected_home.to_str().unwrap()));
    assert_clean("the stored history", &serde_json::to_string_pretty(&messages).unwrap(), secret);

    // What the model was sent (the tool result goes back to it) carries no secret either.
    let sent = read(&standin.requests);
    assert!(sent.contains("HOME="), "the model never got the env output:\n{sent}");
    assert_clean("the requests to the model", &sent, secret);
    output.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_env_shows_no_gateway_secret_under_bwrap() {
    env_shows_no_gateway_secret("bwrap", "env").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_env_shows_no_gateway_secret_without_sandbox() {
    env_shows_no_gateway_secret("none", "env").await;
}

/// Under bwrap the agent sees only its own processes (a new PID namespace and `/proc`), so no
/// `/proc/<pid>/environ` it can read holds the gateway's secrets. (Without a sandbox a root
/// agent with CAP_SYS_PTRACE can read the gateway's, non-dumpable or not: not tested here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_agent_reads_no_gateway_environ_under_bwrap() {
    let probe = r#"env; for f in /proc/[0-9]*/environ; do echo "== $f"; tr '\0' '\n' < "$f"; done 2>&1"#;
    let output = env_shows_no_gateway_secret("bwrap", probe).await;
    if !output.is_empty() {
        assert!(output.contains("== /proc/1/environ\n"), "the probe read no process environment:\n{output}");
    }
}

/// What the agent's `Bash` runs in [`claude_session`] (its output is checked; `env` makes the
/// CLI ask for approval in the default mode, where a bare `echo` is allowed as read-only).
const PROBE: &str = "env >/dev/null && echo chatgate-probe-$((6*7))";
/// The error text of the stand-in's scripted HTTP 400, as the CLI reports it.
const API_ERROR_400: &str = "API Error: 400 standin: invalid request (scripted)";
/// The variables the gateway hands to the CLI in [`claude_session`].
const SESSION_ENV: [(&str, &str); 4] = [
    ("ANTHROPIC_API_KEY", "test-key"),
    ("DISABLE_TELEMETRY", "1"),
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ("DISABLE_AUTOUPDATER", "1"),
];

/// The stand-in's requests of the agent's own conversation (those offering `Bash`).
fn agent_requests(standin: &ModelStandin) -> Vec<Value> {
    standin
        .received()
        .into_iter()
        .filter(|r| {
            r["url"].as_str().unwrap_or_default().starts_with("/v1/messages")
                && r["body"]["tools"].as_array().is_some_and(|tools| tools.iter().any(|t| t["name"] == "Bash"))
        })
        .collect()
}

/// A gateway (one node, or a two-node cluster) running the real CLI under `--sandbox
/// <sandbox>` against `standin`; `None` when the CLI is skipped.
async fn claude_gateway(
    root: &std::path::Path,
    standin: &ModelStandin,
    sandbox: &str,
    cluster: bool,
    extra_env: &[(&str, &str)],
) -> Option<Gateway> {
    let (claude, claude_ro) = claude_cli()?;
    let base_url = format!("http://127.0.0.1:{}", standin.port);
    let mut env: Vec<(&str, &str)> = SESSION_ENV.to_vec();
    env.push(("ANTHROPIC_BASE_URL", base_url.as_str()));
    env.extend_from_slice(extra_env);
    let setup = CliSetup {
        bin_flag: "--claude-bin",
        program: &claude,
        ro: &claude_ro,
        provider_env: PROVIDER_ENV,
        sandbox,
        cluster,
    };
    Some(Gateway::for_cli(root, setup, &env).await)
}

/// One session of the real CLI under `--sandbox <sandbox>`, every turn with `options`: a
/// `Bash` call and its follow-up, a resumed turn the model sees whole, an HTTP 400 shown once
/// as an error (the CLI's synthetic "API Error" assistant message is no reply), an abort that
/// leaves no process, and the history. `approvals` answers the tool approvals of the first turn.
async fn claude_session(sandbox: &str, options: Value, approvals: Approvals) {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let Some(gateway) = claude_gateway(&root, &standin, sandbox, false, &[]).await else { return };
    let session = gateway.create_session("claude").await;
    let mut ws = gateway.connect().await;
    let dump = |events: &[Value]| real_cli::dump(&gateway, &standin, events);

    // 1. A Bash call and its follow-up.
    let first = turn(&gateway, &standin, &mut ws, &session, "run the probe", options.clone(), approvals).await;
    let tool = of(&first, "tool_use")
        .into_iter()
        .find(|e| e["toolName"] == "Bash")
        .unwrap_or_else(|| panic!("no Bash tool_use: {}", dump(&first)))
        .clone();
    assert_eq!(tool["toolInput"]["command"], PROBE, "{}", dump(&first));
    let result = of(&first, "tool_result")
        .into_iter()
        .find(|e| e["toolId"] == tool["toolId"])
        .unwrap_or_else(|| panic!("no tool_result: {}", dump(&first)))
        .clone();
    assert_eq!(first.last().unwrap()["success"], true, "{}", dump(&first));
    assert_eq!(errors(&first), Vec::<String>::new(), "a clean run shows no error: {}", dump(&first));
    assert_eq!(assistant_texts(&first), vec!["done"], "{}", dump(&first));
    if options["permissionMode"] != "bypassPermissions" {
        // The ask carries the CLI's own description of it, and names the tool call it gates.
        let ask = of(&first, "permission_request").first().copied().cloned().unwrap_or_default();
        assert_eq!(ask["toolName"], "Bash", "{}", dump(&first));
        assert_eq!(ask["toolUseId"], tool["toolId"], "{}", dump(&first));
        assert!(ask["displayName"].as_str().is_some_and(|name| !name.is_empty()), "{}", dump(&first));
    }
    if approvals == Approvals::Deny {
        // Denied: the CLI's `tool_use_result` is a string, not the object of a tool that ran.
        assert_eq!(result["isError"], true, "{}", dump(&first));
        let text = result["toolUseResult"].as_str().unwrap_or_else(|| panic!("not a string: {result}"));
        assert!(text.starts_with("Error:"), "{result}");
        assert!(of(&first, "permission_resolved").iter().any(|e| e["allow"] == false), "{}", dump(&first));
    } else {
        if options["permissionMode"] != "bypassPermissions" {
            assert!(of(&first, "permission_resolved").iter().any(|e| e["allow"] == true), "{}", dump(&first));
        }
        assert_eq!(result["isError"], false, "{}", dump(&first));
        assert!(result["content"].as_str().unwrap_or_default().contains("chatgate-probe-42"), "{result}");
        assert!(result["toolUseResult"].is_object(), "{result}");
    }

    // 2. Resumed: the model sees the earlier turn.
    let second = turn(&gateway, &standin, &mut ws, &session, "say second answer", options.clone(), approvals).await;
    assert_eq!(second.last().unwrap()["success"], true, "{}", dump(&second));
    assert_eq!(errors(&second), Vec::<String>::new(), "{}", dump(&second));
    assert_eq!(assistant_texts(&second), vec!["second answer"], "{}", dump(&second));
    let resumed = agent_requests(&standin).last().unwrap()["body"]["messages"].to_string();
    for earlier in ["run the probe", PROBE, "say second answer"] {
        assert!(resumed.contains(earlier), "the resumed request lacks {earlier:?}: {resumed}");
    }

    // 3. An HTTP error from the model: one error, no assistant reply.
    real_cli::api_error_turn(&gateway, &standin, &mut ws, &session, options.clone(), approvals, API_ERROR_400).await;

    // 4. Abort while the model is thinking: no process is left.
    let fourth = real_cli::abort_while_thinking(&gateway, &standin, &mut ws, &session, options, approvals).await;
    assert_eq!(errors(&fourth), Vec::<String>::new(), "{}", dump(&fourth));

    // 5. The history: the replies, the API error once and never as a reply.
    let history = gateway.history(&session, 4).await;
    let text = serde_json::to_string_pretty(&history).unwrap();
    assert_eq!(errors(&history), vec![API_ERROR_400], "{text}");
    assert_eq!(assistant_texts(&history), vec!["done", "second answer"], "{text}");
    assert!(!text.contains("<synthetic>"), "{text}");
}

/// The approval protocol with the real CLI: an answer that changes the tool's input, an
/// AskUserQuestion answered with a choice (never timed out), an approval nobody answers (timed
/// out, the tool denied, the turn goes on), and an abort while an approval waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_real_cli_approvals_update_ask_time_out_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let extra = [("CHATGATE_CLAUDE_APPROVAL_TIMEOUT", "2s")];
    let Some(gateway) = claude_gateway(&root, &standin, "none", false, &extra).await else { return };
    let session = gateway.create_session("claude").await;
    let mut ws = gateway.connect().await;
    let dump = |events: &[Value]| real_cli::dump(&gateway, &standin, events);
    let send = |content: &str| json!({ "type": "chat.send", "sessionId": session, "content": content, "options": {} });
    let tool_result = |events: &[Value], tool: &str| -> Value {
        let call = of(events, "tool_use").into_iter().find(|e| e["toolName"] == tool).cloned().unwrap_or_default();
        of(events, "tool_result").into_iter().find(|e| e["toolId"] == call["toolId"]).cloned().unwrap_or_default()
    };

    // 1. Allowed with a changed input: the command the user wrote runs, not the model's.
    ws.send(send("run the probe")).await;
    let updated = json!({ "command": "echo updated-by-the-user", "description": "changed" });
    let first = real_cli::collect_answering(&gateway, &standin, &mut ws, &session, |_| {
        Some(json!({ "allow": true, "updatedInput": updated }))
    })
    .await;
    assert_eq!(first.last().unwrap()["success"], true, "{}", dump(&first));
    let result = tool_result(&first, "Bash");
    assert!(result["content"].as_str().unwrap_or_default().contains("updated-by-the-user"), "{}", dump(&first));
    assert!(!result["content"].as_str().unwrap_or_default().contains("chatgate-probe-42"), "{}", dump(&first));

    // 2. AskUserQuestion: asked with no timeout, answered with a choice the model then gets.
    ws.send(send("ask a question")).await;
    let second = real_cli::collect_answering(&gateway, &standin, &mut ws, &session, |ask| {
        let mut input = ask["input"].clone();
        input["answers"] = json!({ "Which color?": "blue" });
        Some(json!({ "allow": true, "updatedInput": input }))
    })
    .await;
    assert_eq!(second.last().unwrap()["success"], true, "{}", dump(&second));
    let ask = of(&second, "permission_request").first().copied().cloned().unwrap_or_default();
    assert_eq!(ask["toolName"], "AskUserQuestion", "{}", dump(&second));
    assert_eq!(ask["input"]["questions"][0]["question"], "Which color?", "{}", dump(&second));
    let answered = tool_result(&second, "AskUserQuestion");
    assert_eq!(answered["isError"], false, "{}", dump(&second));
    assert!(answered["content"].as_str().unwrap_or_default().contains("blue"), "{}", dump(&second));
    assert!(read(&standin.requests).contains("blue"), "the model never got the answer");

    // 3. Nobody answers: the approval times out, the tool is denied, the turn ends cleanly.
    ws.send(send("run the probe")).await;
    let third = real_cli::collect_answering(&gateway, &standin, &mut ws, &session, |_| None).await;
    assert_eq!(third.last().unwrap()["success"], true, "{}", dump(&third));
    let cancelled = of(&third, "permission_cancelled").first().copied().cloned().unwrap_or_default();
    assert_eq!(cancelled["reason"], "timeout", "{}", dump(&third));
    let denied = tool_result(&third, "Bash");
    assert_eq!(denied["isError"], true, "{}", dump(&third));
    assert!(denied["toolUseResult"].as_str().is_some_and(|t| t.starts_with("Error:")), "{}", dump(&third));

    // 4. Aborted while the approval waits: the ask is cancelled, nothing is left running.
    ws.send(send("run the probe")).await;
    let mut fourth = Vec::new();
    while fourth.last().is_none_or(|e: &Value| e["kind"] != "permission_request") {
        match ws.try_recv(TURN_TIMEOUT).await {
            Some(Ok(frame)) => fourth.push(frame),
            other => panic!("no permission_request ({other:?}): {}", dump(&fourth)),
        }
    }
    ws.send(json!({ "type": "chat.abort", "sessionId": session })).await;
    fourth.extend(real_cli::collect_answering(&gateway, &standin, &mut ws, &session, |_| None).await);
    assert_eq!(fourth.last().unwrap()["aborted"], true, "{}", dump(&fourth));
    let cancelled = of(&fourth, "permission_cancelled").first().copied().cloned().unwrap_or_default();
    assert_eq!(cancelled["reason"], "cancelled", "{}", dump(&fourth));
    assert!(tool_result(&fourth, "Bash").is_null(), "the tool ran: {}", dump(&fourth));
    assert_no_process_in(&root).await;
}

/// In the sandbox the CLI is uid 1000: `bypassPermissions` works even for a root gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_real_cli_session_under_bwrap() {
    claude_session("bwrap", json!({ "permissionMode": "bypassPermissions" }), Approvals::Allow).await;
}

/// Without the sandbox, in the default mode: the Bash call is asked for and allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_real_cli_session_without_sandbox_approved() {
    claude_session("none", json!({}), Approvals::Allow).await;
}

/// Without the sandbox, in the default mode: the Bash call is asked for and denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_real_cli_session_without_sandbox_denied() {
    claude_session("none", json!({}), Approvals::Deny).await;
}

/// A root gateway without the sandbox: the CLI refuses `bypassPermissions`, and the user is
/// told why, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_real_cli_root_bypass_without_sandbox_is_explained() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: not root (the CLI refuses bypassPermissions to root only)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let Some(gateway) = claude_gateway(&root, &standin, "none", false, &[]).await else { return };
    let session = gateway.create_session("claude").await;
    let mut ws = gateway.connect().await;
    let options = json!({ "permissionMode": "bypassPermissions" });
    let events = turn(&gateway, &standin, &mut ws, &session, "run the probe", options, Approvals::Allow).await;
    let dump = serde_json::to_string_pretty(&events).unwrap();
    assert_eq!(events.last().unwrap()["success"], false, "{dump}");
    assert_eq!(errors(&events), vec![chatgate::runtime::claude::ROOT_BYPASS_REFUSED], "{dump}");
    assert!(agent_requests(&standin).is_empty(), "the model was asked: {dump}");
}

/// In a two-node cluster: sent on one node, watched and approved from the other, aborted from
/// the other, and resumed on the other ([`real_cli::cluster_scenario`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_real_cli_in_a_cluster_watched_approved_and_aborted_from_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let Some(gateway) = claude_gateway(&root, &standin, "none", true, &[]).await else { return };
    let session = gateway.create_session("claude").await;
    let last_request =
        || agent_requests(&standin).last().map(|r| r["body"]["messages"].to_string()).unwrap_or_default();
    real_cli::cluster_scenario(&gateway, &standin, &session, json!({}), Approvals::Allow, last_request).await;
}
