//! The REAL Gemini CLI (npm `@google/gemini-cli`, pinned in `tests/real-cli/package-lock.json`)
//! run by the real `chatgate` binary, against `tests/real-cli/model-standin.mjs` as its model (the
//! Gemini API stand-in of `tests/real-cli/standin-gemini.mjs`, named by `GOOGLE_GEMINI_BASE_URL`,
//! with `GEMINI_API_KEY` auth chosen in the user's `~/.gemini/settings.json`).
//!
//! One session, turn after turn: a shell tool call (`run_shell_command`) and its follow-up, a
//! resumed turn whose request to the model carries the earlier turns, a turn from a `cwd`
//! subdirectory that resumes the same session, an HTTP 400 from the model shown as one `error`
//! (not as an assistant reply), an abort that leaves no process behind, and the stored history.
//! A clean turn has no `error` event (Gemini's stderr chatter is not shown).
//!
//! Approval modes: headless Gemini asks nobody. In the default mode it does not even offer its
//! shell tool to the model, and a call of it anyway is answered `Tool "run_shell_command" not
//! found`; with `allowedTools` (a `--policy` file) or `bypassPermissions` (`--yolo`) the
//! command runs.
//!
//! The CLI: `CHATGATE_TEST_GEMINI_DIR` (the `gemini` program, a directory holding it, or a
//! `node_modules` directory holding `.bin/gemini`), default `.bin/gemini` in
//! `$CHATGATE_REAL_CLI_MODULES` or `tests/real-cli/node_modules`. Install it with
//! `npm install --prefix tests/real-cli` (`scripts/test.sh` does); `CHATGATE_SKIP_REAL_CLIS=1`
//! skips these tests when it is missing.

mod common;
#[path = "common/real_cli.rs"]
mod real_cli;

use std::path::Path;

use real_cli::{Approvals, CliSetup, Gateway, ModelStandin, RealCli, assistant_texts, enc, errors, find_cli, of, turn};
use serde_json::{Value, json};

/// What the agent's shell tool runs (its output, not its text, holds `chatgate-probe-42`).
/// Not `$((6*7))`: Gemini refuses every `$(`-like expansion ("Blocked: command substitution
/// detected in shell command").
const PROBE: &str = "printf chatgate-probe-%s 42";
/// The error text the stand-in's scripted HTTP 400 carries.
const STANDIN_400: &str = "standin: invalid request (scripted)";
/// Gemini's shell tool.
const SHELL_TOOL: &str = "run_shell_command";

/// The user's Gemini settings: API-key auth (the stand-in), no usage statistics, no update
/// checks, no IDE integration, no telemetry.
const GEMINI_SETTINGS: &str = r#"{
  "security": { "auth": { "selectedType": "gemini-api-key" } },
  "privacy": { "usageStatisticsEnabled": false },
  "general": { "enableAutoUpdate": false, "enableAutoUpdateNotification": false },
  "ide": { "enabled": false },
  "telemetry": { "enabled": false }
}"#;

/// How the session's turns are run.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// No permission mode: Gemini's default, no shell tool in headless mode.
    Default,
    /// `bypassPermissions`: `--yolo`.
    Bypass,
}

impl Mode {
    fn options(self) -> Value {
        match self {
            Mode::Default => json!({}),
            Mode::Bypass => json!({ "permissionMode": "bypassPermissions" }),
        }
    }
}

/// The agent's `streamGenerateContent` requests the stand-in got (those offering tools; the
/// CLI's side requests offer none).
fn turn_requests(standin: &ModelStandin) -> Vec<Value> {
    standin
        .received()
        .into_iter()
        .filter(|r| r["url"].as_str().unwrap_or_default().contains(":streamGenerateContent"))
        .filter(|r| !offered_tools(r).is_empty())
        .collect()
}

/// The function names a request offered the model.
fn offered_tools(request: &Value) -> Vec<String> {
    let tools = request["body"]["tools"].as_array().cloned().unwrap_or_default();
    tools
        .iter()
        .flat_map(|t| t["functionDeclarations"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f["name"].as_str().map(str::to_string))
        .collect()
}

/// The first turn: the shell tool call and its follow-up. Returns the tool's id.
fn check_tool_turn(mode: Mode, events: &[Value], standin: &ModelStandin, dump: &dyn Fn(&[Value]) -> String) -> Value {
    assert_eq!(events.last().unwrap()["success"], true, "{}", dump(events));
    assert_eq!(errors(events), Vec::<String>::new(), "a clean run shows no error: {}", dump(events));
    let tool = of(events, "tool_use")
        .into_iter()
        .find(|e| e["toolName"] == SHELL_TOOL)
        .unwrap_or_else(|| panic!("no {SHELL_TOOL} tool_use: {}", dump(events)))
        .clone();
    assert_eq!(tool["toolInput"]["command"], PROBE, "{}", dump(events));
    let result = of(events, "tool_result")
        .into_iter()
        .find(|e| e["toolId"] == tool["toolId"])
        .unwrap_or_else(|| panic!("no tool_result for the shell call: {}", dump(events)))
        .clone();
    let output = result["content"].as_str().unwrap_or_default();
    let sent = turn_requests(standin);
    assert_eq!(sent.len(), 2, "one request for the tool call, one after it: {sent:#?}");
    let response = sent[1]["body"]["contents"]
        .as_array()
        .and_then(|contents| {
            contents
                .iter()
                .flat_map(|c| c["parts"].as_array().cloned().unwrap_or_default())
                .find(|p| p.get("functionResponse").is_some())
        })
        .unwrap_or_else(|| panic!("the model never got the tool's response: {:#}", sent[1]))
        .to_string();
    match mode {
        Mode::Bypass => {
            assert!(offered_tools(&sent[0]).contains(&SHELL_TOOL.to_string()), "{:#}", sent[0]["body"]["tools"]);
            assert_eq!(result["isError"], false, "{}", dump(events));
            assert!(output.contains("chatgate-probe-42"), "{}", dump(events));
            assert!(response.contains("chatgate-probe-42"), "{response}");
        }
        Mode::Default => {
            // Headless default mode: no shell tool is offered, and the call is refused.
            assert!(!offered_tools(&sent[0]).contains(&SHELL_TOOL.to_string()), "{:#}", sent[0]["body"]["tools"]);
            assert_eq!(result["isError"], true, "{}", dump(events));
            assert!(output.contains("Tool \"run_shell_command\" not found"), "{}", dump(events));
            assert!(!response.contains("chatgate-probe-42"), "the command must not have run: {response}");
        }
    }
    assert_eq!(assistant_texts(events), vec!["done"], "{}", dump(events));
    tool
}

/// One session under `--sandbox <sandbox>`, every turn in `mode`.
/// A gateway (one node, or a two-node cluster) running `gemini` under `--sandbox <sandbox>`
/// against `standin`, with the user's Gemini settings.
async fn gemini_gateway(
    gemini: &RealCli,
    root: &Path,
    standin: &ModelStandin,
    sandbox: &str,
    cluster: bool,
) -> Gateway {
    let base_url = format!("http://127.0.0.1:{}", standin.port);
    let env = [("GEMINI_API_KEY", "test-key"), ("GOOGLE_GEMINI_BASE_URL", base_url.as_str())];
    let setup = CliSetup {
        bin_flag: "--gemini-bin",
        program: &gemini.program,
        ro: &gemini.ro,
        provider_env: "GEMINI_API_KEY,GOOGLE_GEMINI_BASE_URL",
        sandbox,
        cluster,
    };
    let gateway = Gateway::for_cli(root, setup, &env).await;
    let gemini_home = gateway.home().join(".gemini");
    std::fs::create_dir_all(&gemini_home).unwrap();
    std::fs::write(gemini_home.join("settings.json"), GEMINI_SETTINGS).unwrap();
    gateway
}

async fn gemini_session(sandbox: &str, mode: Mode) {
    let Some(gemini) = find_cli("gemini", "CHATGATE_TEST_GEMINI_DIR", "Gemini CLI", "0.61.0") else { return };
    let dir = tempfile::Builder::new().prefix("real-gemini-").tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let gateway = gemini_gateway(&gemini, &root, &standin, sandbox, false).await;
    let session = gateway.create_session("gemini").await;
    let mut ws = gateway.connect().await;
    let options = mode.options();
    let dump = |events: &[Value]| real_cli::dump(&gateway, &standin, events);

    // 1. A shell tool call and its follow-up.
    let first = turn(&gateway, &standin, &mut ws, &session, "run the probe", options.clone(), Approvals::Allow).await;
    let tool = check_tool_turn(mode, &first, &standin, &dump);

    // 1b. Default mode with the shell tool allowed (`allowedTools`, passed as a `--policy`
    // file): the command runs.
    if mode == Mode::Default {
        let allowed = json!({ "toolsSettings": { "allowedTools": ["run_shell_command"] } });
        let events = turn(&gateway, &standin, &mut ws, &session, "run the probe", allowed, Approvals::Allow).await;
        assert_eq!(events.last().unwrap()["success"], true, "{}", dump(&events));
        assert_eq!(errors(&events), Vec::<String>::new(), "{}", dump(&events));
        let result = of(&events, "tool_result").first().map(|r| (*r).clone()).unwrap_or_default();
        assert_eq!(result["isError"], false, "{}", dump(&events));
        assert!(result["content"].as_str().unwrap_or_default().contains("chatgate-probe-42"), "{}", dump(&events));
    }
    let replies_before: Vec<&str> = if mode == Mode::Default { vec!["done", "done"] } else { vec!["done"] };

    // 2. Resumed: the model sees the earlier turn.
    let second =
        turn(&gateway, &standin, &mut ws, &session, "say second answer", options.clone(), Approvals::Allow).await;
    assert_eq!(second.last().unwrap()["success"], true, "{}", dump(&second));
    assert_eq!(errors(&second), Vec::<String>::new(), "{}", dump(&second));
    assert_eq!(assistant_texts(&second), vec!["second answer"], "{}", dump(&second));
    let resumed = turn_requests(&standin).last().unwrap()["body"]["contents"].to_string();
    for earlier in ["run the probe", "functionResponse", "say second answer"] {
        assert!(resumed.contains(earlier), "the resumed request lacks {earlier:?}: {resumed}");
    }

    // 3. From a subdirectory of the project: still the same Gemini session.
    let project = gateway.workspaces.join(enc(&gateway.user)).join("proj");
    assert!(project.is_dir(), "the session's project is not at {}", project.display());
    std::fs::create_dir_all(project.join("sub")).unwrap();
    let mut sub_options = options.clone();
    sub_options["cwd"] = json!("sub");
    let third = turn(&gateway, &standin, &mut ws, &session, "say from sub", sub_options, Approvals::Allow).await;
    assert_eq!(third.last().unwrap()["success"], true, "{}", dump(&third));
    assert_eq!(errors(&third), Vec::<String>::new(), "{}", dump(&third));
    assert_eq!(assistant_texts(&third), vec!["from sub"], "{}", dump(&third));
    let resumed = turn_requests(&standin).last().unwrap()["body"]["contents"].to_string();
    assert!(resumed.contains("say second answer"), "the subdirectory turn did not resume: {resumed}");

    // 4. An HTTP error from the model: one error, no assistant reply; exit code 144 explained.
    let allow = Approvals::Allow;
    let fourth =
        real_cli::api_error_turn(&gateway, &standin, &mut ws, &session, options.clone(), allow, STANDIN_400).await;
    let complete = fourth.last().unwrap();
    assert_eq!(complete["exitCode"], 144, "{}", dump(&fourth));
    assert!(complete["error"].as_str().unwrap_or_default().contains("HTTP 400"), "{}", dump(&fourth));

    // 5. Abort while the model is thinking: no process is left.
    real_cli::abort_while_thinking(&gateway, &standin, &mut ws, &session, options, allow).await;

    // 6. The history: every turn, no stderr chatter, the API error once.
    let history = gateway.history(&session, 4 + replies_before.len()).await;
    let text = serde_json::to_string_pretty(&history).unwrap();
    for chatter in ["256-color", "Ripgrep", "[STARTUP]", "YOLO mode", "    at ", "Error executing tool"] {
        assert!(!text.contains(chatter), "{chatter:?} in the history: {text}");
    }
    assert_eq!(errors(&history), vec![STANDIN_400], "{text}");
    let replies: Vec<&str> = replies_before.iter().copied().chain(["second answer", "from sub"]).collect();
    assert_eq!(assistant_texts(&history), replies, "{text}");
    assert!(history.iter().any(|m| m["kind"] == "tool_use" && m["toolId"] == tool["toolId"]), "{text}");
}

/// In chatgate's sandbox, with `bypassPermissions` (`--yolo`): the command runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_real_cli_session_under_bwrap() {
    gemini_session("bwrap", Mode::Bypass).await;
}

/// Without chatgate's sandbox, in the default permission mode: headless Gemini offers no shell
/// tool and refuses the call, unless `allowedTools` allows it; every other turn works as under
/// bwrap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_real_cli_session_without_sandbox_default_mode() {
    gemini_session("none", Mode::Default).await;
}

/// In a two-node cluster (yolo: headless default mode offers no shell tool): sent on one node,
/// watched from the other, aborted from the other, and resumed on the other
/// ([`real_cli::cluster_scenario`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_real_cli_in_a_cluster_watched_and_aborted_from_another_node() {
    let Some(gemini) = find_cli("gemini", "CHATGATE_TEST_GEMINI_DIR", "Gemini CLI", "0.61.0") else { return };
    let dir = tempfile::Builder::new().prefix("real-gemini-").tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let standin = ModelStandin::start(&root, PROBE);
    let gateway = gemini_gateway(&gemini, &root, &standin, "none", true).await;
    let session = gateway.create_session("gemini").await;
    let last_request = || turn_requests(&standin).last().map(|r| r["body"]["contents"].to_string()).unwrap_or_default();
    real_cli::cluster_scenario(&gateway, &standin, &session, Mode::Bypass.options(), Approvals::Allow, last_request)
        .await;
}
