//! The `cursor` runtime: `cursor-agent [--resume=<id>] -p <prompt> [--model m]
//! --output-format stream-json [-f]`, as upstream's `server/cursor-cli.js`.
//!
//! stream-json events (Claude-like): `system`/`init` carries `session_id`;
//! `assistant` text becomes `stream_delta` (upstream's cursor `normalizeMessage`);
//! `result` ends the stream (`stream_end`; a non-`success` subtype is an `error`
//! and a failed run). A stdout line that is not JSON is a `stream_delta`, as
//! upstream. `--model` is passed on new sessions only and `-f` when the client
//! asked to skip permissions, as upstream. Upstream's retry with `--trust` after
//! a workspace-trust prompt is not reproduced.

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::{
    RunContext, RunOutcome, RunRequest, Runtime,
    images::RunImages,
    process::{CliCommand, Emit, RunCliOptions, StreamParser, prompt_arg, run_cli, str_field},
};

/// The `cursor` provider.
pub struct CursorRuntime {
    program: String,
}

impl CursorRuntime {
    pub fn new(program: String) -> Self {
        CursorRuntime { program }
    }
}

/// The CLI's arguments for `request`.
pub fn cursor_args(request: &RunRequest) -> Vec<String> {
    let mut args = Vec::new();
    let resume = request.provider_session_id.as_deref().filter(|id| !id.is_empty());
    if let Some(id) = resume {
        args.push(format!("--resume={id}"));
    }
    args.extend(["-p".to_string(), prompt_arg(&request.content)]);
    if resume.is_none()
        && let Some(model) = request.options.model.as_deref().filter(|m| !m.is_empty())
    {
        args.extend(["--model".to_string(), model.to_string()]);
    }
    args.extend(["--output-format".to_string(), "stream-json".to_string()]);
    if request.options.skip_permissions {
        args.push("-f".to_string());
    }
    args
}

#[async_trait]
impl Runtime for CursorRuntime {
    fn provider(&self) -> &'static str {
        "cursor"
    }

    async fn run(&self, mut request: RunRequest, ctx: RunContext) -> RunOutcome {
        let images = RunImages::write(&request).await;
        request.content = images.prompt(&request.content);
        let cmd = CliCommand {
            provider: "cursor",
            program: self.program.clone(),
            program_env: "CHATGATE_CURSOR_BIN",
            args: cursor_args(&request),
            cwd: request.cwd.clone(),
            stdin: false,
        };
        let mut parser = CursorParser::default();
        let outcome =
            run_cli(&cmd, &ctx, request.provider_session_id.clone(), &mut parser, RunCliOptions::default()).await;
        images.cleanup().await;
        outcome
    }
}

/// Maps `cursor-agent` stream-json to normalized events.
#[derive(Debug, Default)]
pub struct CursorParser {
    result_failed: bool,
}

impl StreamParser for CursorParser {
    fn on_json(&mut self, event: Map<String, Value>, out: &mut Vec<Emit>) {
        match str_field(&event, "type").unwrap_or("") {
            "system" => {
                if str_field(&event, "subtype") == Some("init")
                    && let Some(id) = str_field(&event, "session_id")
                {
                    out.push(Emit::ProviderSessionId(id.to_string()));
                }
            }
            "assistant" => {
                let text = event
                    .get("message")
                    .and_then(|m| m.get("content"))
                    .and_then(|c| c.get(0))
                    .and_then(|b| b.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !text.is_empty() {
                    out.push(Emit::event("stream_delta", json!({ "content": text })));
                }
            }
            "result" => {
                out.push(Emit::event("stream_end", json!({})));
                let failed = str_field(&event, "subtype") != Some("success")
                    || event.get("is_error") == Some(&Value::Bool(true));
                if failed {
                    self.result_failed = true;
                    let text =
                        str_field(&event, "result").filter(|t| !t.trim().is_empty()).unwrap_or("Cursor run failed");
                    out.push(Emit::event("error", json!({ "content": text })));
                }
            }
            _ => {}
        }
    }

    fn on_text(&mut self, line: &str, out: &mut Vec<Emit>) {
        out.push(Emit::event("stream_delta", json!({ "content": line })));
    }

    fn on_exit(&mut self, exit_code: i32, _out: &mut Vec<Emit>) -> RunOutcome {
        if exit_code == 0 && self.result_failed { RunOutcome::exit(1) } else { RunOutcome::exit(exit_code) }
    }
}
