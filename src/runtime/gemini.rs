//! The `gemini` runtime: `gemini --prompt <p> [--resume <id>] --skip-trust
//! [--model m] --output-format stream-json [approval] [--allowed-tools a,b]`,
//! as upstream's `server/gemini-cli.js`.
//!
//! Approval mapping (upstream's `resolveGeminiPermissionArgs`): skip permissions,
//! `yolo` or `bypassPermissions` → `--yolo`; `auto_edit` or `acceptEdits` →
//! `--approval-mode auto_edit`; `plan` → `--approval-mode plan`.
//!
//! stream-json events (gemini-cli `packages/core/src/output/types.ts`): `init
//! {session_id}`, `message {role, content, delta}`, `tool_use {tool_name, tool_id,
//! parameters}`, `tool_result {tool_id, status, output, error}`, `error
//! {message}`, `result {status, stats}`; mapped as upstream's gemini
//! `normalizeMessage`. The CLI is ended after 120 s without stdout output, and
//! upstream's messages for Gemini's documented exit codes are kept.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::{
    RunContext, RunOutcome, RunRequest, Runtime,
    images::RunImages,
    process::{CliCommand, Emit, RunCliOptions, StreamParser, prompt_arg, run_cli, str_field},
};

/// Upstream's inactivity limit.
pub const DEFAULT_INACTIVITY_TIMEOUT: Duration = Duration::from_secs(120);

/// The `gemini` provider.
pub struct GeminiRuntime {
    program: String,
    inactivity_timeout: Duration,
}

impl GeminiRuntime {
    pub fn new(program: String, inactivity_timeout: Duration) -> Self {
        GeminiRuntime { program, inactivity_timeout }
    }
}

/// Upstream's approval flags.
fn approval_args(request: &RunRequest) -> Vec<String> {
    let mode = request.options.permission_mode.as_deref().unwrap_or("default");
    if request.options.skip_permissions || mode == "yolo" || mode == "bypassPermissions" {
        return vec!["--yolo".to_string()];
    }
    match mode {
        "auto_edit" | "acceptEdits" => vec!["--approval-mode".to_string(), "auto_edit".to_string()],
        "plan" => vec!["--approval-mode".to_string(), "plan".to_string()],
        _ => Vec::new(),
    }
}

/// The CLI's arguments for `request`.
pub fn gemini_args(request: &RunRequest) -> Vec<String> {
    let mut args = vec!["--prompt".to_string(), prompt_arg(&request.content)];
    if let Some(id) = request.provider_session_id.as_deref().filter(|id| !id.is_empty()) {
        args.extend(["--resume".to_string(), id.to_string()]);
    }
    args.push("--skip-trust".to_string());
    if let Some(model) = request.options.model.as_deref().filter(|m| !m.is_empty()) {
        args.extend(["--model".to_string(), model.to_string()]);
    }
    args.extend(["--output-format".to_string(), "stream-json".to_string()]);
    args.extend(approval_args(request));
    if !request.options.allowed_tools.is_empty() {
        args.extend(["--allowed-tools".to_string(), request.options.allowed_tools.join(",")]);
    }
    args
}

/// Upstream drops these stderr lines (Node deprecation noise, credential banner).
fn keep_gemini_stderr(line: &str) -> Option<std::borrow::Cow<'_, str>> {
    let noise = line.contains("[DEP0040]")
        || line.contains("DeprecationWarning")
        || line.contains("--trace-deprecation")
        || line.contains("Loaded cached credentials");
    (!noise).then_some(std::borrow::Cow::Borrowed(line))
}

#[async_trait]
impl Runtime for GeminiRuntime {
    fn provider(&self) -> &'static str {
        "gemini"
    }

    async fn run(&self, mut request: RunRequest, ctx: RunContext) -> RunOutcome {
        let images = RunImages::write(&request).await;
        request.content = images.prompt(&request.content);
        let cmd = CliCommand {
            provider: "gemini",
            program: self.program.clone(),
            program_env: "CHATGATE_GEMINI_BIN",
            args: gemini_args(&request),
            cwd: request.cwd.clone(),
            stdin: false,
        };
        let secs = self.inactivity_timeout.as_secs_f64();
        let options = RunCliOptions {
            inactivity: Some((
                self.inactivity_timeout,
                format!("Gemini CLI timeout - no response received for {secs} seconds"),
            )),
            stderr_filter: keep_gemini_stderr,
        };
        let mut parser = GeminiParser::default();
        let outcome = run_cli(&cmd, &ctx, request.provider_session_id.clone(), &mut parser, options).await;
        images.cleanup().await;
        outcome
    }
}

/// Maps Gemini stream-json to normalized events.
#[derive(Debug, Default)]
pub struct GeminiParser {
    result_failed: bool,
}

impl StreamParser for GeminiParser {
    fn on_json(&mut self, event: Map<String, Value>, out: &mut Vec<Emit>) {
        match str_field(&event, "type").unwrap_or("") {
            "init" => {
                if let Some(id) = str_field(&event, "session_id") {
                    out.push(Emit::ProviderSessionId(id.to_string()));
                }
            }
            "message" if str_field(&event, "role") == Some("assistant") => {
                let content = str_field(&event, "content").unwrap_or("");
                if !content.is_empty() {
                    out.push(Emit::event("stream_delta", json!({ "content": content })));
                }
                if event.get("delta") != Some(&Value::Bool(true)) {
                    out.push(Emit::event("stream_end", json!({})));
                }
            }
            "tool_use" => out.push(Emit::event(
                "tool_use",
                json!({
                    "toolName": event.get("tool_name").cloned().unwrap_or(Value::Null),
                    "toolInput": event.get("parameters").cloned().unwrap_or_else(|| json!({})),
                    "toolId": event.get("tool_id").cloned().unwrap_or(Value::Null),
                }),
            )),
            "tool_result" => {
                let content = match (event.get("output"), event.get("error")) {
                    (Some(Value::String(output)), _) => output.clone(),
                    (Some(output), _) if !output.is_null() => output.to_string(),
                    (_, Some(error)) => error
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .or_else(|| error.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                out.push(Emit::event(
                    "tool_result",
                    json!({
                        "toolId": event.get("tool_id").and_then(Value::as_str).unwrap_or(""),
                        "content": content,
                        "isError": str_field(&event, "status") == Some("error"),
                    }),
                ));
            }
            "result" => {
                out.push(Emit::event("stream_end", json!({})));
                if let Some(tokens) =
                    event.get("stats").and_then(|s| s.get("total_tokens")).filter(|t| t.as_u64().unwrap_or(0) > 0)
                {
                    out.push(Emit::event(
                        "status",
                        json!({ "text": "Complete", "tokens": tokens, "canInterrupt": false }),
                    ));
                }
                if str_field(&event, "status") == Some("error") {
                    self.result_failed = true;
                    let message = event
                        .get("error")
                        .and_then(|e| e.get("message").and_then(Value::as_str).or(e.as_str()))
                        .unwrap_or("Gemini run failed");
                    out.push(Emit::event("error", json!({ "content": message })));
                }
            }
            "error" => {
                let message = str_field(&event, "error")
                    .or(str_field(&event, "message"))
                    .unwrap_or("Unknown Gemini streaming error");
                out.push(Emit::event("error", json!({ "content": message })));
            }
            _ => {}
        }
    }

    fn on_exit(&mut self, exit_code: i32, out: &mut Vec<Emit>) -> RunOutcome {
        let message = match exit_code {
            41 => Some(
                "Gemini authentication failed (exit code 41). Run `gemini` in a terminal to choose an auth method, or configure a valid `GEMINI_API_KEY`.",
            ),
            42 => Some("Gemini rejected the request input (exit code 42)."),
            44 => Some("Gemini sandbox error (exit code 44). Check local sandbox/container settings."),
            52 => Some(
                "Gemini configuration error (exit code 52). Check your Gemini settings files for invalid JSON/config.",
            ),
            53 => Some("Gemini conversation turn limit reached (exit code 53). Start a new Gemini session."),
            _ => None,
        };
        if let Some(message) = message {
            out.push(Emit::event("error", json!({ "content": message })));
        }
        if exit_code == 0 && self.result_failed { RunOutcome::exit(1) } else { RunOutcome::exit(exit_code) }
    }
}
