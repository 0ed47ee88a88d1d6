//! The `opencode` runtime: `opencode run --format json --dir <cwd> [--session <id>]
//! [--model m] [--variant effort] [--auto]`, the prompt on stdin (OpenCode 1.18.33, tested by
//! tests/real_opencode.rs).
//!
//! The prompt goes on stdin, not as the `message` argument: `opencode run` joins its message
//! arguments with spaces and wraps every one that contains a space in double quotes (it
//! rebuilds a shell-split command line), so an argument `say hello` reached the model as
//! `"say hello"`. With no message argument it takes its whole stdin as the prompt, unchanged.
//!
//! `opencode run` never asks: a tool call its permission rules say `ask` for (a path outside
//! the project: `external_directory`) is rejected, the CLI says so on stderr and ends the turn.
//! `bypassPermissions` and `skipPermissions` pass `--auto`, which approves those asks (rules
//! that say `deny` still deny).
//!
//! `--format json` prints one event per line, `{type, timestamp, sessionID, part}` (opencode
//! `packages/opencode/src/cli/cmd/run.ts` `emit`): `text` and `reasoning` (`part.text`),
//! `tool_use` (`part.tool`, `part.callID`, `part.state {status, input, output, error}`),
//! `step_start`, `step_finish` (`part.tokens`), `error {error}`. Mapping is upstream's
//! opencode `normalizeMessage` (text → `stream_delta`, reasoning → `thinking`, tool →
//! `tool_use` with `toolResult` attached, `step_finish` → `stream_end` when text was streamed
//! in the step), reading `part.*` first and upstream's flat fields as the fallback. Any
//! event's `sessionID` is the provider session id. A non-JSON stdout line is a
//! `stream_delta`, as upstream. Each `step_finish` gives the token budget of that step: its
//! `part.tokens` (`input` without the cached tokens, `output` without the reasoning ones,
//! `reasoning`, `cache {read, write}`, `total`) count the whole context sent in the step, so
//! the last step's counts are the conversation's, and steps are never summed.

use std::borrow::Cow;

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::{
    RunContext, RunOutcome, RunRequest, Runtime,
    images::RunImages,
    process::{CliCommand, Emit, RunCliOptions, StreamParser, number, run_cli, str_field},
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

/// Whether the run's options let OpenCode approve its own permission asks (`--auto`).
fn auto_approves(request: &RunRequest) -> bool {
    request.options.skip_permissions || request.options.permission_mode.as_deref() == Some("bypassPermissions")
}

/// The CLI's arguments for `request` (the prompt goes on stdin).
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
    if auto_approves(request) {
        args.push("--auto".to_string());
    }
    args
}

/// `text` without terminal escape sequences (`ESC [ … final byte`, or ESC and one character).
fn without_ansi(text: &str) -> Cow<'_, str> {
    if !text.contains('\x1b') {
        return Cow::Borrowed(text);
    }
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            plain.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) {
                    break;
                }
            }
        }
    }
    Cow::Owned(plain)
}

/// OpenCode's stderr: colour codes removed; its notice of a rejected permission ask
/// (`! permission requested: external_directory (/etc/*); auto-rejecting`) replaced by
/// what happened and how to allow it.
pub fn opencode_stderr_filter(line: &str) -> Option<Cow<'_, str>> {
    let plain = without_ansi(line);
    let asked = plain.trim().trim_start_matches('!').trim_start();
    if let Some(what) = asked.strip_prefix("permission requested: ").and_then(|r| r.strip_suffix("; auto-rejecting")) {
        return Some(Cow::Owned(format!(
            "OpenCode rejected a tool call that needs permission ({what}): `opencode run` cannot ask; \
             permissionMode bypassPermissions approves it"
        )));
    }
    Some(plain)
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
            stdin: true,
        };
        let mut parser = OpenCodeParser::default();
        let options = RunCliOptions {
            stderr_filter: opencode_stderr_filter,
            stdin_text: Some(request.content.clone()),
            ..RunCliOptions::default()
        };
        let resumed = request.provider_session_id.clone();
        let outcome = run_cli(&cmd, &ctx, resumed, &mut parser, options).await;
        images.cleanup().await;
        outcome
    }
}

/// Maps `opencode run --format json` events to normalized events.
#[derive(Debug, Default)]
pub struct OpenCodeParser {
    /// Text was streamed since the last `stream_end`.
    streaming: bool,
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

    /// The token budget of one `step_finish` (`part.tokens`), or `None` when it counts nothing.
    fn token_budget(part: &Map<String, Value>) -> Option<Value> {
        let Some(Value::Object(tokens)) = part.get("tokens") else { return None };
        let cache = tokens.get("cache");
        let cache_read = number(cache.and_then(|c| c.get("read")));
        let cache_write = number(cache.and_then(|c| c.get("write")));
        let reasoning = number(tokens.get("reasoning"));
        let input = number(tokens.get("input")) + cache_read + cache_write;
        let output = number(tokens.get("output")) + reasoning;
        let used = match number(tokens.get("total")) {
            0 => input + output,
            total => total,
        };
        (used > 0).then(|| {
            json!({
                "used": used,
                "inputTokens": input,
                "outputTokens": output,
                "cacheReadTokens": cache_read,
                "cacheCreationTokens": cache_write,
                "reasoningTokens": reasoning,
                "breakdown": { "input": input, "output": output },
            })
        })
    }

    /// A step ended: `stream_end` when it streamed text, then its token budget.
    fn step_finish(&mut self, part: &Map<String, Value>, out: &mut Vec<Emit>) {
        if std::mem::take(&mut self.streaming) {
            out.push(Emit::event("stream_end", json!({})));
        }
        if let Some(budget) = Self::token_budget(part) {
            out.push(Emit::event("status", json!({ "text": "token_budget", "tokenBudget": budget })));
        }
    }

    fn stream_delta(&mut self, content: String, out: &mut Vec<Emit>) {
        self.streaming = true;
        out.push(Emit::event("stream_delta", json!({ "content": content })));
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
                    self.stream_delta(content, out);
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
            "step_finish" => self.step_finish(part, out),
            _ => {}
        }
    }

    fn on_text(&mut self, line: &str, out: &mut Vec<Emit>) {
        self.stream_delta(line.to_string(), out);
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::runtime::RunOptions;

    fn parse(lines: &[Value]) -> Vec<Emit> {
        let mut parser = OpenCodeParser::default();
        let mut out = Vec::new();
        for line in lines {
            if let Value::Object(map) = line.clone() {
                parser.on_json(map, &mut out);
            }
        }
        out
    }

    fn kinds(out: &[Emit]) -> Vec<&'static str> {
        out.iter()
            .filter_map(|e| match e {
                Emit::Event(kind, _) => Some(*kind),
                Emit::ProviderSessionId(_) => None,
            })
            .collect()
    }

    fn step_finish(input: u64, total: u64) -> Value {
        json!({ "type": "step_finish", "sessionID": "ses_1", "part": { "type": "step-finish",
            "tokens": { "total": total, "input": input, "output": 5, "reasoning": 2, "cache": { "write": 0, "read": 40 } } } })
    }

    fn request(options: RunOptions) -> RunRequest {
        RunRequest {
            session_id: "s".into(),
            content: "say \"hi\" there".into(),
            provider_session_id: Some("ses_1".into()),
            cwd: PathBuf::from("/work/p"),
            project_path: PathBuf::from("/work/p"),
            options,
        }
    }

    #[test]
    fn a_tool_step_ends_no_stream_and_the_text_step_ends_its_own() {
        let tool = json!({ "type": "tool_use", "sessionID": "ses_1", "part": { "type": "tool", "tool": "bash",
            "callID": "call_1", "state": { "status": "completed", "input": { "command": "ls" }, "output": "a\n" } } });
        let text = json!({ "type": "text", "sessionID": "ses_1", "part": { "type": "text", "text": "done" } });
        let out = parse(&[tool, step_finish(160, 207), text, step_finish(360, 407)]);
        assert_eq!(kinds(&out), vec!["tool_use", "status", "stream_delta", "stream_end", "status"]);
    }

    #[test]
    fn the_token_budget_is_the_last_steps_not_a_sum() {
        let out = parse(&[step_finish(160, 207), step_finish(360, 407)]);
        let budgets: Vec<&Value> = out
            .iter()
            .filter_map(|e| match e {
                Emit::Event("status", fields) => Some(&fields["tokenBudget"]),
                _ => None,
            })
            .collect();
        assert_eq!(budgets.len(), 2);
        assert_eq!(
            *budgets[1],
            json!({ "used": 407, "inputTokens": 400, "outputTokens": 7, "cacheReadTokens": 40,
                "cacheCreationTokens": 0, "reasoningTokens": 2, "breakdown": { "input": 400, "output": 7 } })
        );
        let no_total = json!({ "type": "step_finish", "part": { "tokens": { "input": 10, "output": 3 } } });
        let out = parse(&[no_total]);
        assert!(matches!(&out[0], Emit::Event("status", f) if f["tokenBudget"]["used"] == 13), "{out:?}");
        let empty = json!({ "type": "step_finish", "part": { "tokens": { "input": 0, "output": 0 } } });
        assert!(parse(&[empty]).is_empty());
    }

    #[test]
    fn args_carry_no_prompt_and_bypass_passes_auto() {
        let args = opencode_args(&request(RunOptions::default()));
        assert_eq!(args, vec!["run", "--format", "json", "--dir", "/work/p", "--session", "ses_1"]);
        let bypass = RunOptions { permission_mode: Some("bypassPermissions".into()), ..RunOptions::default() };
        assert_eq!(opencode_args(&request(bypass)).last().map(String::as_str), Some("--auto"));
        let skip = RunOptions { skip_permissions: true, ..RunOptions::default() };
        assert_eq!(opencode_args(&request(skip)).last().map(String::as_str), Some("--auto"));
        let edits = RunOptions { permission_mode: Some("acceptEdits".into()), ..RunOptions::default() };
        assert!(!opencode_args(&request(edits)).contains(&"--auto".to_string()));
    }

    #[test]
    fn stderr_loses_colours_and_explains_a_rejected_ask() {
        let asked = "\x1b[93m\x1b[1m! \x1b[0mpermission requested: external_directory (/etc/*); auto-rejecting";
        let shown = opencode_stderr_filter(asked).unwrap_or_default();
        assert!(shown.starts_with("OpenCode rejected a tool call that needs permission (external_directory (/etc/*))"));
        assert_eq!(
            opencode_stderr_filter("\x1b[91m\x1b[1mError: \x1b[0mSession not found").as_deref(),
            Some("Error: Session not found")
        );
        assert_eq!(opencode_stderr_filter("plain").as_deref(), Some("plain"));
    }
}
