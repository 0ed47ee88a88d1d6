//! The `codex` runtime: `codex exec --json`, resumed with `codex exec … resume <thread id>`.
//!
//! The command line is the one the official TypeScript SDK builds
//! (openai/codex `sdk/typescript/src/exec.ts`): exec-level flags first, then
//! `resume <id>` when resuming, then `--` and the prompt. Sandbox and approval
//! policy follow upstream's `mapPermissionModeToCodexOptions`, except that
//! `untrusted` (gone since Codex 0.149: "approval_policy = \"untrusted\" is no
//! longer supported", exit 1) became its successor `on-request` (default:
//! `workspace-write` + `on-request`; `plan`: `read-only` + `on-request`;
//! `acceptEdits`: `workspace-write` + `never`; `bypassPermissions`:
//! `danger-full-access` + `never`). Verified against the real Codex 0.171.0
//! (tests/real_codex.rs).
//!
//! Events are the JSONL `ThreadEvent`s of codex-rs `exec/src/exec_events.rs`
//! (`thread.started`, `turn.completed {usage}`, `turn.failed {error}`,
//! `item.completed {item}`, `error {message}`), mapped as upstream's
//! `transformCodexEvent` + codex `normalizeMessage`: only completed items are
//! shown; command executions become `Bash`, file changes `FileChanges`, web
//! searches `WebSearch`, to-do lists `TodoList`, MCP calls the tool's name.
//! Unlike upstream, `turn.completed` does not produce a bare `complete`: the
//! gateway appends the one terminal `complete` with `exitCode`/`success`/`aborted`.

use std::borrow::Cow;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::{
    RunContext, RunOutcome, RunRequest, Runtime,
    images::RunImages,
    process::{CliCommand, Emit, RunCliOptions, StreamParser, number, run_cli, str_field},
};

/// `tokenBudget.total` when Codex does not say (upstream's default).
const DEFAULT_CONTEXT_WINDOW: u64 = 200_000;

/// The `codex` provider.
pub struct CodexRuntime {
    program: String,
}

impl CodexRuntime {
    pub fn new(program: String) -> Self {
        CodexRuntime { program }
    }
}

/// The sandbox mode and approval policy for a permission mode (upstream's, with
/// `on-request` for the retired `untrusted`; `plan` never writes).
pub fn sandbox_and_approval(request: &RunRequest) -> (&'static str, &'static str) {
    let mode = request.options.permission_mode.as_deref().unwrap_or("default");
    let mode = if request.options.skip_permissions && mode != "plan" { "bypassPermissions" } else { mode };
    match mode {
        "acceptEdits" => ("workspace-write", "never"),
        "bypassPermissions" => ("danger-full-access", "never"),
        "plan" => ("read-only", "on-request"),
        _ => ("workspace-write", "on-request"),
    }
}

/// Drops the stderr lines of Codex that are no error of the run.
///
/// - `Reading additional input from stdin...`: printed by every `codex exec` whose stdin
///   is not a terminal (chatgate's is `/dev/null`: nothing is read).
/// - `WARNING: proceeding, even though we could not create PATH aliases: …`: Codex
///   refuses to put its helper binaries under a temporary directory (`CODEX_HOME` under
///   `/tmp`); its own sandbox then cannot run commands. Logged for the operator (keep
///   `--homes-root` out of `/tmp`), not shown to the user.
pub fn codex_stderr_filter(line: &str) -> Option<Cow<'_, str>> {
    let trimmed = line.trim();
    if trimmed == "Reading additional input from stdin..." {
        return None;
    }
    if trimmed.starts_with("WARNING: proceeding, even though we could not create PATH aliases") {
        tracing::warn!(provider = "codex", message = %trimmed, "codex could not set up its helper binaries (is the provider home under /tmp?)");
        return None;
    }
    Some(Cow::Borrowed(line))
}

/// The CLI's arguments for `request`.
pub fn codex_args(request: &RunRequest, images: &[std::path::PathBuf]) -> Vec<String> {
    let mut args = vec!["exec".to_string(), "--json".to_string()];
    let options = &request.options;
    if let Some(model) = options.model.as_deref().filter(|m| !m.is_empty()) {
        args.extend(["--model".to_string(), model.to_string()]);
    }
    let (sandbox, approval) = sandbox_and_approval(request);
    args.extend(["--sandbox".to_string(), sandbox.to_string()]);
    args.extend(["--cd".to_string(), request.cwd.to_string_lossy().into_owned()]);
    args.push("--skip-git-repo-check".to_string());
    if let Some(effort) = options.effort.as_deref().filter(|e| !e.is_empty() && *e != "default") {
        args.extend(["--config".to_string(), format!("model_reasoning_effort={}", json!(effort))]);
    }
    args.extend(["--config".to_string(), format!("approval_policy={}", json!(approval))]);
    if let Some(id) = request.provider_session_id.as_deref().filter(|id| !id.is_empty()) {
        args.extend(["resume".to_string(), id.to_string()]);
    }
    for image in images {
        args.extend(["--image".to_string(), image.to_string_lossy().into_owned()]);
    }
    args.push("--".to_string());
    args.push(request.content.clone());
    args
}

#[async_trait]
impl Runtime for CodexRuntime {
    fn provider(&self) -> &'static str {
        "codex"
    }

    async fn run(&self, request: RunRequest, ctx: RunContext) -> RunOutcome {
        let images = RunImages::write(&request).await;
        let cmd = CliCommand {
            provider: "codex",
            program: self.program.clone(),
            program_env: "CHATGATE_CODEX_BIN",
            args: codex_args(&request, images.paths()),
            cwd: request.cwd.clone(),
            stdin: false,
        };
        let mut parser = CodexParser::default();
        let options = RunCliOptions { stderr_filter: codex_stderr_filter, ..RunCliOptions::default() };
        let outcome = run_cli(&cmd, &ctx, request.provider_session_id.clone(), &mut parser, options).await;
        images.cleanup().await;
        outcome
    }
}

/// Maps `codex exec --json` events to normalized events.
#[derive(Debug, Default)]
pub struct CodexParser {
    turn_failed: bool,
    /// The text of the last top-level `error` event, so the `turn.failed` that repeats it
    /// is not shown twice.
    last_error: Option<String>,
}

/// How Codex words the `error` events of a model stream it is retrying
/// (`Reconnecting... 1/5 (stream disconnected before completion: …)`).
const RETRY_PREFIX: &str = "Reconnecting...";

/// The message of an API error: Codex passes the HTTP body through (`{"error":{"message":…}}`);
/// anything else is kept as it is.
fn error_text(message: &str) -> String {
    let parsed = message.trim().starts_with('{').then(|| serde_json::from_str::<Value>(message.trim()).ok()).flatten();
    parsed
        .as_ref()
        .and_then(|body| body.get("error").and_then(|e| e.get("message").or(Some(e))).or(body.get("message")))
        .and_then(Value::as_str)
        .filter(|text| !text.trim().is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| message.to_string())
}

impl CodexParser {
    fn item(&mut self, item: &Map<String, Value>, out: &mut Vec<Emit>) {
        let id = item.get("id").cloned().unwrap_or(Value::Null);
        let field = |key: &str| item.get(key).cloned().unwrap_or(Value::Null);
        let text = || str_field(item, "text").unwrap_or("").to_string();
        match str_field(item, "type").unwrap_or("") {
            "agent_message" => out.push(Emit::event("text", json!({ "role": "assistant", "content": text() }))),
            "reasoning" => out.push(Emit::event("thinking", json!({ "content": text() }))),
            "command_execution" => out.push(Emit::event(
                "tool_use",
                json!({
                    "toolName": "Bash",
                    "toolInput": { "command": field("command") },
                    "toolId": id,
                    "output": field("aggregated_output"),
                    "exitCode": field("exit_code"),
                    "status": field("status"),
                }),
            )),
            "file_change" => out.push(Emit::event(
                "tool_use",
                json!({ "toolName": "FileChanges", "toolInput": field("changes"), "toolId": id, "status": field("status") }),
            )),
            "mcp_tool_call" => {
                let tool = str_field(item, "tool").filter(|t| !t.is_empty()).unwrap_or("MCP");
                out.push(Emit::event(
                    "tool_use",
                    json!({
                        "toolName": tool,
                        "toolInput": field("arguments"),
                        "toolId": id,
                        "server": field("server"),
                        "result": field("result"),
                        "error": field("error"),
                        "status": field("status"),
                    }),
                ));
            }
            "web_search" => out.push(Emit::event(
                "tool_use",
                json!({ "toolName": "WebSearch", "toolInput": { "query": field("query") }, "toolId": id }),
            )),
            "todo_list" => out.push(Emit::event(
                "tool_use",
                json!({ "toolName": "TodoList", "toolInput": { "items": field("items") }, "toolId": id }),
            )),
            "error" => {
                let message = str_field(item, "message").unwrap_or("Unknown error");
                out.push(Emit::event("error", json!({ "content": message })));
            }
            other => out.push(Emit::event(
                "tool_use",
                json!({ "toolName": if other.is_empty() { "Unknown" } else { other }, "toolInput": Value::Object(item.clone()), "toolId": id }),
            )),
        }
    }

    /// `input_tokens` counts the cached ones and `output_tokens` the reasoning ones (the
    /// Responses API's usage); Codex ≥ 0.150 sends no `total_tokens`.
    fn token_budget(usage: &Map<String, Value>) -> Value {
        let input = number(usage.get("input_tokens"));
        let output = number(usage.get("output_tokens"));
        let used = match number(usage.get("total_tokens")) {
            0 => input + output,
            total => total,
        };
        let total = match number(usage.get("model_context_window")) {
            0 => DEFAULT_CONTEXT_WINDOW,
            window => window,
        };
        let mut budget = json!({
            "used": used,
            "total": total,
            "inputTokens": input,
            "outputTokens": output,
            "breakdown": { "input": input, "output": output },
        });
        for (from, to) in [
            ("cached_input_tokens", "cacheReadTokens"),
            ("cache_write_input_tokens", "cacheCreationTokens"),
            ("reasoning_output_tokens", "reasoningTokens"),
        ] {
            if usage.contains_key(from) {
                budget[to] = json!(number(usage.get(from)));
            }
        }
        budget
    }
}

impl StreamParser for CodexParser {
    fn on_json(&mut self, event: Map<String, Value>, out: &mut Vec<Emit>) {
        match str_field(&event, "type").unwrap_or("") {
            "thread.started" => {
                if let Some(id) = str_field(&event, "thread_id").or(str_field(&event, "id")) {
                    out.push(Emit::ProviderSessionId(id.to_string()));
                }
            }
            "item.completed" => {
                if let Some(Value::Object(item)) = event.get("item") {
                    self.item(item, out);
                }
            }
            "turn.completed" => {
                if let Some(Value::Object(usage)) = event.get("usage") {
                    out.push(Emit::event(
                        "status",
                        json!({ "text": "token_budget", "tokenBudget": Self::token_budget(usage) }),
                    ));
                }
            }
            "turn.failed" => {
                self.turn_failed = true;
                let message = error_text(
                    event.get("error").and_then(|e| e.get("message")).and_then(Value::as_str).unwrap_or("Turn failed"),
                );
                // Codex reports one API error twice: `error`, then `turn.failed` with the same text.
                if self.last_error.as_deref() != Some(message.as_str()) {
                    out.push(Emit::event("error", json!({ "content": message })));
                }
            }
            "error" => {
                let message = error_text(str_field(&event, "message").unwrap_or("Unknown Codex error"));
                if message.starts_with(RETRY_PREFIX) {
                    // A dropped model stream Codex is retrying: progress, not an error of the
                    // turn (upstream's client shows a `status` text as the working indicator).
                    out.push(Emit::event("status", json!({ "text": message, "canInterrupt": true })));
                    return;
                }
                out.push(Emit::event("error", json!({ "content": message })));
                self.last_error = Some(message);
            }
            _ => {}
        }
    }

    fn on_exit(&mut self, exit_code: i32, _out: &mut Vec<Emit>) -> RunOutcome {
        if exit_code == 0 && self.turn_failed { RunOutcome::exit(1) } else { RunOutcome::exit(exit_code) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[Value]) -> Vec<Emit> {
        let mut parser = CodexParser::default();
        let mut out = Vec::new();
        for line in lines {
            if let Value::Object(map) = line.clone() {
                parser.on_json(map, &mut out);
            }
        }
        out
    }

    #[test]
    fn an_api_error_reported_twice_is_shown_once_as_its_message() {
        let body = r#"{"error":{"message":"bad request","type":"invalid_request_error","param":null,"code":null}}"#;
        let out = parse(&[
            json!({ "type": "error", "message": body }),
            json!({ "type": "turn.failed", "error": { "message": body } }),
        ]);
        assert_eq!(out, vec![Emit::event("error", json!({ "content": "bad request" }))]);
        // A different failure after an unrelated error is still shown.
        let out = parse(&[
            json!({ "type": "error", "message": "rate limited" }),
            json!({ "type": "turn.failed", "error": { "message": "quota" } }),
        ]);
        let shown = [
            Emit::event("error", json!({ "content": "rate limited" })),
            Emit::event("error", json!({ "content": "quota" })),
        ];
        assert_eq!(out, shown);
    }

    #[test]
    fn a_stream_retry_is_a_status_not_an_error() {
        let out = parse(&[
            json!({ "type": "error", "message": "Reconnecting... 1/5 (stream disconnected before completion)" }),
            json!({ "type": "error", "message": "bad request" }),
        ]);
        assert_eq!(
            out,
            vec![
                Emit::event(
                    "status",
                    json!({ "text": "Reconnecting... 1/5 (stream disconnected before completion)", "canInterrupt": true })
                ),
                Emit::event("error", json!({ "content": "bad request" })),
            ]
        );
    }

    #[test]
    fn error_text_keeps_plain_and_odd_messages() {
        assert_eq!(error_text("plain"), "plain");
        assert_eq!(error_text("{not json"), "{not json");
        assert_eq!(error_text(r#"{"error":"flat"}"#), "flat");
        assert_eq!(error_text(r#"{"message":"top"}"#), "top");
        assert_eq!(error_text(r#"{"error":{"message":""}}"#), r#"{"error":{"message":""}}"#);
    }

    #[test]
    fn stderr_chatter_is_dropped_and_the_rest_kept() {
        assert_eq!(codex_stderr_filter("Reading additional input from stdin..."), None);
        assert_eq!(
            codex_stderr_filter(
                "WARNING: proceeding, even though we could not create PATH aliases: Refusing to create helper binaries under temporary dir \"/tmp\""
            ),
            None
        );
        assert_eq!(codex_stderr_filter("Error: boom").as_deref(), Some("Error: boom"));
    }
}
