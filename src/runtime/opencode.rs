//! The `opencode` runtime: `opencode run --format json --dir <cwd> [--session <id>]
//! [--model m] [--variant effort] <prompt>`, as upstream's `server/opencode-cli.js`.
//!
//! `--format json` prints one event per line, `{type, timestamp, sessionID,
//! part}` (opencode `packages/opencode/src/cli/cmd/run.ts` `emit`): `text`
//! and `reasoning` (`part.text`), `tool_use` (`part.tool`, `part.callID`,
//! `part.state {status, input, output, error}`), `step_start`, `step_finish`
//! (`part.tokens`), `error {error}`. Mapping is upstream's opencode
//! `normalizeMessage` (text → `stream_delta`, reasoning → `thinking`, tool →
//! `tool_use` with `toolResult` attached, `step_finish` → `stream_end`), reading
//! `part.*` first and upstream's flat fields as the fallback. Any event's
//! `sessionID` is the provider session id. A non-JSON stdout line is a
//! `stream_delta`, as upstream. Token counts of `step_finish` are summed into a
//! `status` token budget (upstream read them from OpenCode's database afterwards).

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::{
    RunContext, RunOutcome, RunRequest, Runtime,
    images::RunImages,
    process::{CliCommand, Emit, RunCliOptions, StreamParser, number, prompt_arg, run_cli, str_field},
};

/// The `opencode` provider.
pub struct OpenCodeRuntime {
    program: String,
}

impl OpenCodeRuntime {
    pub fn new(program: String) -> Self {
        OpenCodeRuntime { program }
    }
}

/// The CLI's arguments for `request`.
pub fn opencode_args(request: &RunRequest) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--format", "json", "--dir"].into_iter().map(String::from).collect();
    args.push(request.cwd.to_string_lossy().into_owned());
    if let Some(id) = request.provider_session_id.as_deref().filter(|id| !id.is_empty()) {
        args.extend(["--session".to_string(), id.to_string()]);
    }
    if let Some(model) = request.options.model.as_deref().filter(|m| !m.is_empty()) {
        args.extend(["--model".to_string(), model.to_string()]);
    }
    if let Some(effort) = request.options.effort.as_deref().filter(|e| !e.is_empty() && *e != "default") {
        args.extend(["--variant".to_string(), effort.to_string()]);
    }
    args.push(prompt_arg(request.content.trim()));
    args
}

#[async_trait]
impl Runtime for OpenCodeRuntime {
    fn provider(&self) -> &'static str {
        "opencode"
    }

    async fn run(&self, mut request: RunRequest, ctx: RunContext) -> RunOutcome {
        let images = RunImages::write(&request).await;
        request.content = images.prompt(&request.content);
        let cmd = CliCommand {
            provider: "opencode",
            program: self.program.clone(),
            program_env: "CHATGATE_OPENCODE_BIN",
            args: opencode_args(&request),
            cwd: request.cwd.clone(),
            stdin: false,
        };
        let mut parser = OpenCodeParser::default();
        let outcome =
            run_cli(&cmd, &ctx, request.provider_session_id.clone(), &mut parser, RunCliOptions::default()).await;
        images.cleanup().await;
        outcome
    }
}

/// Token totals of one run.
#[derive(Debug, Default)]
struct Tokens {
    input: u64,
    output: u64,
    reasoning: u64,
    cache_read: u64,
    cache_write: u64,
}

/// Maps `opencode run --format json` events to normalized events.
#[derive(Debug, Default)]
pub struct OpenCodeParser {
    tokens: Tokens,
}

/// Text of an event: `part.text`, else upstream's `text`/`delta`/`message`.
fn event_text(event: &Map<String, Value>, part: &Map<String, Value>) -> String {
    let value = part.get("text").or(event.get("text")).or(event.get("delta")).or(event.get("message"));
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("text").or(o.get("content")).and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

fn is_user_echo(event: &Map<String, Value>, part: &Map<String, Value>) -> bool {
    let role = |v: Option<&Value>| v.and_then(|v| v.get("role")).and_then(Value::as_str) == Some("user");
    str_field(event, "role") == Some("user") || role(event.get("message")) || str_field(part, "role") == Some("user")
}

fn error_text(event: &Map<String, Value>) -> String {
    match event.get("error") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Object(e)) => e
            .get("data")
            .and_then(|d| d.get("message"))
            .and_then(Value::as_str)
            .or(e.get("message").and_then(Value::as_str))
            .or(e.get("name").and_then(Value::as_str))
            .unwrap_or("Unknown OpenCode error")
            .to_string(),
        _ => str_field(event, "message").unwrap_or("Unknown OpenCode error").to_string(),
    }
}

fn tool_content(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => serde_json::to_string_pretty(other).unwrap_or_else(|_| other.to_string()),
    }
}

impl OpenCodeParser {
    fn tool_use(event: &Map<String, Value>, part: &Map<String, Value>, out: &mut Vec<Emit>) {
        let empty = Map::new();
        let state = match part.get("state") {
            Some(Value::Object(state)) => state,
            _ => &empty,
        };
        let name = str_field(part, "tool").or(str_field(event, "tool")).or(str_field(event, "name")).unwrap_or("Tool");
        let id = str_field(part, "callID")
            .or(str_field(event, "callID"))
            .or(str_field(event, "toolCallId"))
            .or(str_field(part, "id"))
            .unwrap_or("");
        let input =
            state.get("input").or(event.get("input")).or(event.get("arguments")).cloned().unwrap_or_else(|| json!({}));
        let mut fields = json!({ "toolName": name, "toolInput": input, "toolId": id });
        let output = state.get("output").or(event.get("output"));
        let error = state.get("error").or(event.get("error"));
        if output.is_some() || error.is_some() || matches!(str_field(state, "status"), Some("completed" | "error")) {
            let is_error = error.is_some() || str_field(state, "status") == Some("error");
            let content = tool_content(output.filter(|_| !is_error).or(error).unwrap_or(&Value::Null));
            fields["toolResult"] = json!({ "content": content, "isError": is_error });
        }
        out.push(Emit::event("tool_use", fields));
    }

    fn add_tokens(&mut self, part: &Map<String, Value>, out: &mut Vec<Emit>) {
        let Some(Value::Object(tokens)) = part.get("tokens") else { return };
        let cache = tokens.get("cache");
        self.tokens.input += number(tokens.get("input"));
        self.tokens.output += number(tokens.get("output"));
        self.tokens.reasoning += number(tokens.get("reasoning"));
        self.tokens.cache_read += number(cache.and_then(|c| c.get("read")));
        self.tokens.cache_write += number(cache.and_then(|c| c.get("write")));
        let t = &self.tokens;
        let used = t.input + t.output + t.reasoning + t.cache_read + t.cache_write;
        if used == 0 {
            return;
        }
        let input = t.input + t.cache_read;
        out.push(Emit::event(
            "status",
            json!({
                "text": "token_budget",
                "tokenBudget": {
                    "used": used,
                    "inputTokens": input,
                    "outputTokens": t.output,
                    "breakdown": { "input": input, "output": t.output },
                },
            }),
        ));
    }
}

impl StreamParser for OpenCodeParser {
    fn on_json(&mut self, event: Map<String, Value>, out: &mut Vec<Emit>) {
        if let Some(id) = str_field(&event, "sessionID").or(str_field(&event, "sessionId")) {
            out.push(Emit::ProviderSessionId(id.to_string()));
        }
        let empty = Map::new();
        let part = match event.get("part") {
            Some(Value::Object(part)) => part,
            _ => &empty,
        };
        let kind = str_field(&event, "type").or(str_field(&event, "event")).unwrap_or("");
        match kind {
            "text" => {
                let content = event_text(&event, part);
                if !is_user_echo(&event, part) && !content.trim().is_empty() {
                    out.push(Emit::event("stream_delta", json!({ "content": content })));
                }
            }
            "reasoning" => {
                let content = event_text(&event, part);
                if !content.trim().is_empty() {
                    out.push(Emit::event("thinking", json!({ "content": content })));
                }
            }
            "tool_use" => Self::tool_use(&event, part, out),
            "error" => out.push(Emit::event("error", json!({ "content": error_text(&event) }))),
            "step_finish" => {
                out.push(Emit::event("stream_end", json!({})));
                self.add_tokens(part, out);
            }
            _ => {}
        }
    }

    fn on_text(&mut self, line: &str, out: &mut Vec<Emit>) {
        out.push(Emit::event("stream_delta", json!({ "content": line })));
    }
}
