//! The REAL Codex CLI (npm `@openai/codex`, pinned in `tests/real-cli/package-lock.json`) run
//! by the real `chatgate` binary, against `tests/real-cli/model-standin.mjs` as its model (an
//! OpenAI Responses API stand-in, `POST /v1/responses`, named by a `[model_providers.standin]`
//! in the user's `~/.codex/config.toml`).
//!
//! One session, turn after turn: a shell tool call (`exec_command`) and its follow-up, a resumed
//! turn whose request to the model carries the earlier turns, an HTTP 400 from the model shown
//! as one `error` (not as an assistant reply), an abort that leaves no process behind, and the
//! stored history. A clean turn has no `error` event (Codex's stderr chatter is not shown).
//!
//! The CLI: `CHATGATE_TEST_CODEX_DIR` (the `codex` program, a directory holding it, or a
//! `node_modules` directory holding `.bin/codex`), default
//! `tests/real-cli/node_modules/.bin/codex`. Install it with `npm install --prefix tests/real-cli`
//! (`scripts/test.sh` does); `CHATGATE_SKIP_REAL_CLIS=1` skips these tests when it is missing.

mod common;
#[path = "common/real_cli.rs"]
mod real_cli;

use std::path::{Path, PathBuf};

use real_cli::{Approvals, CliSetup, Gateway, ModelStandin, RealCli, assistant_texts, errors, find_cli, of, turn};
use serde_json::{Value, json};

/// What the agent's shell tool runs (its output is checked).
const PROBE: &str = "echo chatgate-probe-$((6*7))";
/// The error text the stand-in's scripted HTTP 400 carries.
const STANDIN_400: &str = "standin: invalid request (scripted)";

/// The user's Codex configuration: the stand-in as its model provider.
fn codex_config(port: u16) -> String {
    format!(
        "model = \"gpt-5.5\"\nmodel_provider = \"standin\"\ncheck_for_update_on_startup = false\n\n\
         [model_providers.standin]\nname = \"standin\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n\
         env_key = \"STANDIN_OPENAI_KEY\"\nwire_api = \"responses\"\n"
    )
}

/// The `/v1/responses` requests the stand-in got.
fn responses_requests(standin: &ModelStandin) -> Vec<Value> {
    standin.received().into_iter().filter(|r| r["url"].as_str().unwrap_or_default().ends_with("/responses")).collect()
}

/// A directory for the test's files that is not under the temporary directory:
/// the target directory's, unless the checkout itself lies under /tmp (a CI
/// clone), then one under `$HOME/.cache`.
fn base_outside_tmp() -> PathBuf {
    let tmp = std::fs::canonicalize(std::env::temp_dir()).unwrap_or_else(|_| std::env::temp_dir());
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let target_real = std::fs::canonicalize(&target).unwrap_or_else(|_| target.clone());
    if !target_real.starts_with(&tmp) {
        return target;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let base = home.join(".cache").join("chatgate-tests");
    std::fs::create_dir_all(&base).unwrap();
    base
}

/// A gateway (one node, or a two-node cluster) running `codex` under `--sandbox <sandbox>`,
/// with the user's Codex configuration naming `standin` as its model provider.
async fn codex_gateway(codex: &RealCli, root: &Path, standin: &ModelStandin, sandbox: &str, cluster: bool) -> Gateway {
    let setup = CliSetup {
        bin_flag: "--codex-bin",
        program: &codex.program,
        ro: &codex.ro,
        provider_env: "STANDIN_OPENAI_KEY",
        sandbox,
        cluster,
    };
    let gateway = Gateway::for_cli(root, setup, &[("STANDIN_OPENAI_KEY", "test-key")]).await;
    let codex_home = gateway.home().join(".codex");
    std::fs::create_dir_all(&codex_home).unwrap();
    std::fs::write(codex_home.join("config.toml"), codex_config(standin.port)).unwrap();
    gateway
}

/// One session under `--sandbox <sandbox>`, every turn with `options`.
async fn codex_session(sandbox: &str, options: Value) {
    let Some(codex) = find_cli("codex", "CHATGATE_TEST_CODEX_DIR", "Codex CLI", "codex-cli") else { return };
    // Not under /tmp: Codex refuses to set up its helper binaries under a temporary
    // directory, and its own sandbox cannot run commands without them.
    let dir = tempfile::Builder::new().prefix("real-codex-").tempdir_in(base_outside_tmp()).unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let gateway = codex_gateway(&codex, &root, &standin, sandbox, false).await;
    let session = gateway.create_session("codex").await;
    let mut ws = gateway.connect().await;
    let dump = |events: &[Value]| real_cli::dump(&gateway, &standin, events);

    // 1. A shell tool call and its follow-up.
    let first = turn(&gateway, &standin, &mut ws, &session, "run the probe", options.clone(), Approvals::Allow).await;
    let complete = first.last().unwrap();
    assert_eq!(complete["success"], true, "{}", dump(&first));
    assert_eq!(errors(&first), Vec::<String>::new(), "a clean run shows no error: {}", dump(&first));
    let tool = of(&first, "tool_use")
        .into_iter()
        .find(|e| e["toolName"] == "Bash")
        .unwrap_or_else(|| panic!("no Bash tool_use: {}", dump(&first)))
        .clone();
    assert!(tool["toolInput"]["command"].as_str().unwrap_or_default().contains(PROBE), "{}", dump(&first));
    assert!(tool["output"].as_str().unwrap_or_default().contains("chatgate-probe-42"), "{}", dump(&first));
    assert_eq!(tool["exitCode"], 0, "{}", dump(&first));
    assert_eq!(assistant_texts(&first), vec!["done"], "{}", dump(&first));
    let budget = of(&first, "status").into_iter().find(|e| e["text"] == "token_budget").cloned();
    let budget = budget.unwrap_or_else(|| panic!("no token budget: {}", dump(&first)));
    // Codex 0.171 sends cached/cache-write/reasoning counts and no total: used = input + output.
    assert_eq!(budget["tokenBudget"]["inputTokens"], 240, "{budget}");
    assert_eq!(budget["tokenBudget"]["used"], 256, "{budget}");
    assert_eq!(budget["tokenBudget"]["cacheReadTokens"], 40, "{budget}");
    assert_eq!(budget["tokenBudget"]["reasoningTokens"], 6, "{budget}");
    let sent = responses_requests(&standin);
    assert_eq!(sent.len(), 2, "one request for the tool call, one after it: {sent:#?}");
    let tool_output = sent[1]["body"]["input"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["type"] == "function_call_output"))
        .cloned()
        .unwrap_or_else(|| panic!("the model never got the tool's output: {:#}", sent[1]));
    assert!(tool_output.to_string().contains("chatgate-probe-42"), "{tool_output}");

    // 2. Resumed: the model sees the earlier turn.
    let second =
        turn(&gateway, &standin, &mut ws, &session, "say second answer", options.clone(), Approvals::Allow).await;
    assert_eq!(second.last().unwrap()["success"], true, "{}", dump(&second));
    assert_eq!(errors(&second), Vec::<String>::new(), "{}", dump(&second));
    assert_eq!(assistant_texts(&second), vec!["second answer"], "{}", dump(&second));
    let sent = responses_requests(&standin);
    let resumed = sent.last().unwrap()["body"]["input"].to_string();
    for earlier in ["run the probe", "chatgate-probe-42", "say second answer"] {
        assert!(resumed.contains(earlier), "the resumed request lacks {earlier:?}: {resumed}");
    }

    // 2b. A model stream dropped before its end: Codex retries, shown as a status, not an error.
    let retried =
        turn(&gateway, &standin, &mut ws, &session, "drop once then say recovered", options.clone(), Approvals::Allow)
            .await;
    assert_eq!(retried.last().unwrap()["success"], true, "{}", dump(&retried));
    assert_eq!(errors(&retried), Vec::<String>::new(), "{}", dump(&retried));
    assert_eq!(assistant_texts(&retried), vec!["recovered"], "{}", dump(&retried));
    let retry =
        of(&retried, "status").into_iter().find(|e| e["text"].as_str().is_some_and(|t| t.starts_with("Reconnecting")));
    assert!(retry.is_some(), "no retry status: {}", dump(&retried));

    // 3. An HTTP error from the model: one error, as its message; no assistant reply.
    let allow = Approvals::Allow;
    real_cli::api_error_turn(&gateway, &standin, &mut ws, &session, options.clone(), allow, STANDIN_400).await;

    // 4. Abort while the model is thinking: no process is left.
    let fourth = real_cli::abort_while_thinking(&gateway, &standin, &mut ws, &session, options, allow).await;
    assert_eq!(errors(&fourth), Vec::<String>::new(), "{}", dump(&fourth));

    // 5. The history: every turn, no stderr chatter, the API error once.
    let history = gateway.history(&session, 5).await;
    let text = serde_json::to_string_pretty(&history).unwrap();
    assert!(!text.contains("Reading additional input from stdin"), "{text}");
    assert!(!text.contains("PATH aliases"), "{text}");
    assert_eq!(errors(&history), vec![STANDIN_400], "{text}");
    let replies = assistant_texts(&history);
    assert_eq!(replies, vec!["done", "second answer", "recovered"], "{text}");
    assert!(history.iter().any(|m| m["kind"] == "tool_use" && m["toolId"] == tool["toolId"]), "{text}");
}

/// In chatgate's sandbox, in the default permission mode (`workspace-write` + `on-request`):
/// Codex's own sandbox runs the command inside chatgate's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_real_cli_session_under_bwrap() {
    codex_session("bwrap", json!({})).await;
}

/// Without chatgate's sandbox, with `bypassPermissions` (`danger-full-access`): a root gateway
/// runs its CLIs without capabilities, so Codex's own sandbox (bubblewrap) cannot start there
/// ("bwrap: setting up uid map: Operation not permitted"); see docs/providers.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_real_cli_session_without_sandbox() {
    let options = if nix::unistd::geteuid().is_root() {
        json!({ "permissionMode": "bypassPermissions" })
    } else {
        json!({ "permissionMode": "acceptEdits" })
    };
    codex_session("none", options).await;
}

/// In a two-node cluster: sent on one node, watched from the other, aborted from the other,
/// and resumed on the other ([`real_cli::cluster_scenario`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_real_cli_in_a_cluster_watched_and_aborted_from_another_node() {
    let Some(codex) = find_cli("codex", "CHATGATE_TEST_CODEX_DIR", "Codex CLI", "codex-cli") else { return };
    let dir = tempfile::Builder::new().prefix("real-codex-").tempdir_in(base_outside_tmp()).unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let gateway = codex_gateway(&codex, &root, &standin, "none", true).await;
    let session = gateway.create_session("codex").await;
    let options = if nix::unistd::geteuid().is_root() {
        json!({ "permissionMode": "bypassPermissions" })
    } else {
        json!({ "permissionMode": "acceptEdits" })
    };
    let last_request =
        || responses_requests(&standin).last().map(|r| r["body"]["input"].to_string()).unwrap_or_default();
    real_cli::cluster_scenario(&gateway, &standin, &session, options, Approvals::Allow, last_request).await;
}
