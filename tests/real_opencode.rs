//! The REAL OpenCode CLI (npm `opencode-ai`, its native binary from `opencode-linux-x64`,
//! pinned in `tests/real-cli/package-lock.json`) run by the real `chatgate` binary, against
//! `tests/real-cli/model-standin.mjs` as its model: the OpenAI Chat Completions API
//! (`tests/real-cli/standin-chat-completions.mjs`, `POST /v1/chat/completions`), named by a
//! provider with `"npm": "@ai-sdk/openai-compatible"` (bundled in the binary: nothing is
//! downloaded) in the user's `~/.config/opencode/opencode.json`.
//!
//! One session, turn after turn: a reply whose request to the model carries the prompt exactly
//! (no quotes around it), a shell tool call (`bash`) and its follow-up, a resumed turn whose
//! request carries the earlier turns, an HTTP 400 from the model shown as one `error` (not as an
//! assistant reply), an abort while the model hangs that leaves no process behind, and the
//! stored history. A clean turn has no `error` event and no `stream_end` that closes no text,
//! and its token status is the last model request's usage (never a sum over the steps).
//!
//! The CLI: `CHATGATE_TEST_OPENCODE_DIR` (the `opencode` program, a directory holding it, or a
//! `node_modules` directory holding `.bin/opencode`), default `.bin/opencode` in
//! `$CHATGATE_REAL_CLI_MODULES` or `tests/real-cli/node_modules`. Install it with
//! `npm install --prefix tests/real-cli` (`scripts/test.sh` does); `CHATGATE_SKIP_REAL_CLIS=1`
//! skips these tests when it is missing.

mod common;
#[path = "common/real_cli.rs"]
mod real_cli;

use std::path::Path;

use real_cli::{Approvals, CliSetup, Gateway, ModelStandin, RealCli, assistant_texts, errors, find_cli, of, turn};
use serde_json::{Value, json};

/// What the agent's shell tool runs (its output is checked).
const PROBE: &str = "echo chatgate-probe-$((6*7))";
/// The error text the stand-in's scripted HTTP 400 carries.
const STANDIN_400: &str = "standin: invalid request (scripted)";
/// OpenCode's switches that keep it off the network (updates, models.dev, LSP downloads,
/// sharing, default plugins), passed to it with `--provider-env`.
const OFFLINE_SWITCHES: [&str; 5] = [
    "OPENCODE_DISABLE_AUTOUPDATE",
    "OPENCODE_DISABLE_MODELS_FETCH",
    "OPENCODE_DISABLE_LSP_DOWNLOAD",
    "OPENCODE_DISABLE_SHARE",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS",
];

/// The user's OpenCode configuration: the stand-in as its only model.
fn opencode_config(port: u16) -> Value {
    json!({
        "$schema": "https://opencode.ai/config.json",
        "model": "standin/standin-model",
        "small_model": "standin/standin-model",
        "autoupdate": false,
        "share": "disabled",
        "provider": {
            "standin": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Stand-in",
                "options": { "baseURL": format!("http://127.0.0.1:{port}/v1"), "apiKey": "test-key" },
                "models": { "standin-model": { "name": "Stand-in model" } },
            },
        },
    })
}

/// The agent's requests to the model: the `/chat/completions` ones that offer the shell tool
/// (not OpenCode's title generation).
fn agent_requests(standin: &ModelStandin) -> Vec<Value> {
    standin
        .received()
        .into_iter()
        .filter(|r| r["url"].as_str().unwrap_or_default().ends_with("/chat/completions"))
        .filter(|r| {
            r["body"]["tools"].as_array().is_some_and(|tools| tools.iter().any(|t| t["function"]["name"] == "bash"))
        })
        .collect()
}

/// The content of a request's last user message.
fn last_user_content(request: &Value) -> Value {
    let messages = request["body"]["messages"].as_array().cloned().unwrap_or_default();
    messages.into_iter().rev().find(|m| m["role"] == "user").map(|m| m["content"].clone()).unwrap_or(Value::Null)
}

/// Panics unless every `stream_end` closes streamed text (a `stream_delta` since the last one).
fn assert_stream_ends_close_text(events: &[Value], dump: &str) {
    let mut open = false;
    for event in events {
        match event["kind"].as_str() {
            Some("stream_delta") => open = true,
            Some("stream_end") => {
                assert!(open, "a stream_end with no text before it: {dump}");
                open = false;
            }
            _ => {}
        }
    }
}

/// Panics unless the turn's last token status is the usage the stand-in reported for `request`
/// (standin-chat-completions.mjs: 100 prompt tokens a message, 40 of them cached; 7 completion
/// tokens, 2 of them reasoning).
fn assert_token_status(events: &[Value], request: &Value, dump: &str) {
    let budget = of(events, "status").into_iter().rev().find(|e| e["text"] == "token_budget").cloned();
    let budget = budget.unwrap_or_else(|| panic!("no token budget: {dump}"))["tokenBudget"].clone();
    let prompt = 100 * request["body"]["messages"].as_array().map_or(0, Vec::len) as u64;
    assert_eq!(budget["inputTokens"], prompt, "{budget}");
    assert_eq!(budget["outputTokens"], 7, "{budget}");
    assert_eq!(budget["used"], prompt + 7, "{budget}");
    assert_eq!(budget["cacheReadTokens"], 40, "{budget}");
    assert_eq!(budget["reasoningTokens"], 2, "{budget}");
}

/// One session under `--sandbox <sandbox>`, every turn with `options`.
/// A gateway (one node, or a two-node cluster) running `opencode` under `--sandbox <sandbox>`,
/// with the user's OpenCode configuration naming `standin` as its provider.
async fn opencode_gateway(
    opencode: &RealCli,
    root: &Path,
    standin: &ModelStandin,
    sandbox: &str,
    cluster: bool,
) -> Gateway {
    let env: Vec<(&str, &str)> = OFFLINE_SWITCHES.iter().map(|name| (*name, "1")).collect();
    let provider_env = OFFLINE_SWITCHES.join(",");
    let setup = CliSetup {
        bin_flag: "--opencode-bin",
        program: &opencode.program,
        ro: &opencode.ro,
        provider_env: &provider_env,
        sandbox,
        cluster,
    };
    let gateway = Gateway::for_cli(root, setup, &env).await;
    let config_dir = gateway.home().join(".config").join("opencode");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("opencode.json"), opencode_config(standin.port).to_string()).unwrap();
    gateway
}

async fn opencode_session(sandbox: &str, options: Value) {
    let Some(opencode) = find_cli("opencode", "CHATGATE_TEST_OPENCODE_DIR", "OpenCode CLI", "1.18.33") else {
        return;
    };
    let dir = tempfile::Builder::new().prefix("real-opencode-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let gateway = opencode_gateway(&opencode, &root, &standin, sandbox, false).await;
    let session = gateway.create_session("opencode").await;
    let mut ws = gateway.connect().await;
    let dump = |events: &[Value]| real_cli::dump(&gateway, &standin, events);

    // 1. A reply: the model gets the prompt exactly (`opencode run` would quote an argument).
    let prompt = "say hello there";
    let first = turn(&gateway, &standin, &mut ws, &session, prompt, options.clone(), Approvals::Allow).await;
    assert_eq!(first.last().unwrap()["success"], true, "{}", dump(&first));
    assert_eq!(errors(&first), Vec::<String>::new(), "a clean run shows no error: {}", dump(&first));
    assert_eq!(assistant_texts(&first), vec!["hello there"], "{}", dump(&first));
    let sent = agent_requests(&standin);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(last_user_content(&sent[0]), json!(prompt), "the prompt as sent: {:#}", sent[0]);
    assert_stream_ends_close_text(&first, &dump(&first));
    assert_token_status(&first, &sent[0], &dump(&first));

    // 2. A shell tool call and its follow-up (two steps: no stream_end for the tool step).
    let second = turn(&gateway, &standin, &mut ws, &session, "run the probe", options.clone(), Approvals::Allow).await;
    assert_eq!(second.last().unwrap()["success"], true, "{}", dump(&second));
    assert_eq!(errors(&second), Vec::<String>::new(), "{}", dump(&second));
    let tool = of(&second, "tool_use")
        .into_iter()
        .find(|e| e["toolName"] == "bash")
        .unwrap_or_else(|| panic!("no bash tool_use: {}", dump(&second)))
        .clone();
    assert_eq!(tool["toolInput"]["command"], PROBE, "{}", dump(&second));
    let result = tool["toolResult"]["content"].as_str().or(tool["output"].as_str()).unwrap_or_default();
    assert!(result.contains("chatgate-probe-42"), "{}", dump(&second));
    assert_eq!(assistant_texts(&second), vec!["done"], "{}", dump(&second));
    assert_eq!(of(&second, "stream_end").len(), 1, "one stream_end, for `done`: {}", dump(&second));
    assert_stream_ends_close_text(&second, &dump(&second));
    let sent = agent_requests(&standin);
    assert_eq!(sent.len(), 3, "one request for the tool call, one after it: {sent:#?}");
    let follow_up = sent[2]["body"]["messages"].as_array().cloned().unwrap_or_default();
    let tool_message = follow_up.iter().find(|m| m["role"] == "tool").cloned();
    let tool_message = tool_message.unwrap_or_else(|| panic!("the model never got the tool's output: {:#}", sent[2]));
    assert!(tool_message["content"].to_string().contains("chatgate-probe-42"), "{tool_message}");
    assert_token_status(&second, &sent[2], &dump(&second));

    // 3. Resumed: the model sees the earlier turns.
    let third =
        turn(&gateway, &standin, &mut ws, &session, "say second answer", options.clone(), Approvals::Allow).await;
    assert_eq!(third.last().unwrap()["success"], true, "{}", dump(&third));
    assert_eq!(errors(&third), Vec::<String>::new(), "{}", dump(&third));
    assert_eq!(assistant_texts(&third), vec!["second answer"], "{}", dump(&third));
    let sent = agent_requests(&standin);
    let resumed = sent.last().unwrap()["body"]["messages"].to_string();
    for earlier in ["say hello there", "run the probe", "chatgate-probe-42", "say second answer"] {
        assert!(resumed.contains(earlier), "the resumed request lacks {earlier:?}: {resumed}");
    }

    // 4. An HTTP error from the model: one error, as its message; no assistant reply.
    let allow = Approvals::Allow;
    real_cli::api_error_turn(&gateway, &standin, &mut ws, &session, options.clone(), allow, STANDIN_400).await;

    // 5. Abort while the model is thinking: no process is left.
    real_cli::abort_while_thinking(&gateway, &standin, &mut ws, &session, options, allow).await;

    // 6. The history: every turn, the API error once, the prompts as sent.
    let history = gateway.history(&session, 5).await;
    let text = serde_json::to_string_pretty(&history).unwrap();
    assert_eq!(errors(&history), vec![STANDIN_400], "{text}");
    assert_eq!(assistant_texts(&history), vec!["hello there", "done", "second answer"], "{text}");
    assert!(history.iter().any(|m| m["kind"] == "tool_use" && m["toolId"] == tool["toolId"]), "{text}");
    assert!(history.iter().any(|m| m["kind"] == "text" && m["role"] == "user" && m["content"] == prompt), "{text}");
}

/// In chatgate's sandbox, in the default permission mode (no `--auto`: the probe needs no
/// permission ask, OpenCode's rules allow `bash` inside the project).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_real_cli_session_under_bwrap() {
    opencode_session("bwrap", json!({})).await;
}

/// Without chatgate's sandbox, with `bypassPermissions` (`--auto`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_real_cli_session_without_sandbox() {
    opencode_session("none", json!({ "permissionMode": "bypassPermissions" })).await;
}

/// In a two-node cluster: sent on one node, watched from the other, aborted from the other,
/// and resumed on the other ([`real_cli::cluster_scenario`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_real_cli_in_a_cluster_watched_and_aborted_from_another_node() {
    let Some(opencode) = find_cli("opencode", "CHATGATE_TEST_OPENCODE_DIR", "OpenCode CLI", "1.18.33") else {
        return;
    };
    let dir = tempfile::Builder::new().prefix("real-opencode-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let gateway = opencode_gateway(&opencode, &root, &standin, "none", true).await;
    let session = gateway.create_session("opencode").await;
    let last_request =
        || agent_requests(&standin).last().map(|r| r["body"]["messages"].to_string()).unwrap_or_default();
    real_cli::cluster_scenario(&gateway, &standin, &session, json!({}), Approvals::Allow, last_request).await;
}
