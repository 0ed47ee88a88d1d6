//! The `claude` runtime: the Claude Code CLI in streaming JSON mode, both directions.
//!
//! Command line and wire shapes follow the official Agent SDKs, which spawn the
//! same CLI (verified against anthropics/claude-agent-sdk-python,
//! `src/claude_agent_sdk/_internal/transport/subprocess_cli.py` `_build_command`
//! and `_internal/query.py` `_handle_control_request` / `_send_control_request` /
//! `interrupt`, and `types.py` `SDKControlPermissionRequest`):
//! - argv: `--output-format stream-json --verbose --input-format stream-json`,
//!   `--permission-prompt-tool stdio` (what `client.py` sets when a `can_use_tool`
//!   callback is given), `--model`, `--effort`, `--permission-mode`,
//!   `--allowedTools a,b`, `--disallowedTools a,b`, `--resume=<id>` (the `=` form,
//!   so an id can never be read as a flag);
//! - stdin: the SDK's `initialize` control request, then one user message
//!   `{"type":"user","session_id":"","message":{"role":"user","content":…},"parent_tool_use_id":null}`;
//!   stdin stays open until the turn's `result` (the CLI answers tool approvals
//!   through it), then it is closed and the CLI exits;
//! - a tool approval arrives as `{"type":"control_request","request_id":…,
//!   "request":{"subtype":"can_use_tool","tool_name":…,"input":…,"tool_use_id":…}}`
//!   and is answered with `{"type":"control_response","response":{"subtype":"success",
//!   "request_id":…,"response":{"behavior":"allow","updatedInput":…}}}` or
//!   `{"behavior":"deny","message":…}`;
//! - abort sends `{"type":"control_request","request_id":"req_<n>_<hex>",
//!   "request":{"subtype":"interrupt"}}`, closes stdin, and then ends the process group.
//!
//! Approval policy is upstream's (`server/claude-sdk.js` `canUseTool`):
//! `AskUserQuestion` and `ExitPlanMode` always ask and never time out; other tools
//! are allowed under `bypassPermissions`, denied when in `disallowedTools`, allowed
//! when in `allowedTools` (exact name or `Bash(<prefix>:*)`), else asked with a
//! timeout of `CLAUDE_TOOL_APPROVAL_TIMEOUT_MS` (default 55 000 ms).
//!
//! Output mapping is upstream's `ClaudeSessionsProvider.normalizeMessage`.

use std::{
    borrow::Cow,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use tokio::{io::AsyncWriteExt, process::ChildStdin, sync::mpsc, task::JoinSet};

use super::{
    PermissionOutcome, RunContext, RunOutcome, RunRequest, Runtime,
    images::RunImages,
    process::{self, CANCELLED_EXIT_CODE, CliCommand, CliProcess, Emit, Emitter, StreamParser, number, str_field},
};
use crate::sync::lock_unpoisoned;

/// Default wait for a tool approval (upstream's `TOOL_APPROVAL_TIMEOUT_MS`).
const DEFAULT_APPROVAL_TIMEOUT_MS: u64 = 55_000;
/// Default context window for the token budget (upstream: env `CONTEXT_WINDOW` or 160000).
const DEFAULT_CONTEXT_WINDOW: u64 = 160_000;
/// Tools that always need the user and never time out.
const TOOLS_REQUIRING_INTERACTION: [&str; 2] = ["AskUserQuestion", "ExitPlanMode"];
/// Tools upstream adds to `allowedTools` in plan mode.
const PLAN_MODE_TOOLS: [&str; 7] = ["Read", "Task", "exit_plan_mode", "TodoRead", "TodoWrite", "WebFetch", "WebSearch"];
/// Effort levels the CLI accepts (`_VALID_EFFORT_VALUES` in the Python SDK).
const VALID_EFFORTS: [&str; 5] = ["low", "medium", "high", "xhigh", "max"];
/// Transcript text that is CLI plumbing, never shown (upstream's `INTERNAL_CONTENT_PREFIXES`).
const INTERNAL_CONTENT_PREFIXES: [&str; 4] =
    ["<system-reminder>", "Caveat:", "[Request interrupted", "Base directory for this skill:"];
/// Most tool approvals handled at once; more are denied.
const MAX_PENDING_APPROVALS: usize = 32;
/// How long an interrupted CLI gets to exit by itself before its group is ended.
const INTERRUPT_GRACE: Duration = Duration::from_millis(1000);
/// What the CLI prints on stderr (and exits 1) when root asks for `bypassPermissions`.
const ROOT_BYPASS_REFUSAL: &str = "--dangerously-skip-permissions cannot be used with root/sudo privileges";
/// What chatgate shows instead: the cause and the way out.
pub const ROOT_BYPASS_REFUSED: &str = "claude: permission mode bypassPermissions is not available here: the Claude \
     CLI refuses it (--dangerously-skip-permissions) to a root user outside a sandbox, and this gateway runs its \
     CLIs as root without the sandbox (--sandbox none). Use another permission mode, or run the gateway as a \
     non-root user or with --sandbox bwrap (where the CLI runs as uid 1000).";
/// Capacity of the queue of lines to the CLI's stdin.
const STDIN_QUEUE: usize = 64;

/// Settings of the Claude runtime.
#[derive(Debug, Clone)]
pub struct ClaudeConfig {
    /// Program to run (`--claude-bin`, default `claude`).
    pub program: String,
    /// Wait for a tool approval (env `CLAUDE_TOOL_APPROVAL_TIMEOUT_MS`, default 55 s).
    pub approval_timeout: Duration,
    /// `tokenBudget.total` (env `CONTEXT_WINDOW`, default 160000).
    pub context_window: u64,
}

impl ClaudeConfig {
    pub fn from_env() -> Self {
        let positive =
            |var: &str| std::env::var(var).ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|v| *v > 0);
        ClaudeConfig {
            program: "claude".to_string(),
            approval_timeout: Duration::from_millis(
                positive("CLAUDE_TOOL_APPROVAL_TIMEOUT_MS").unwrap_or(DEFAULT_APPROVAL_TIMEOUT_MS),
            ),
            context_window: positive("CONTEXT_WINDOW").unwrap_or(DEFAULT_CONTEXT_WINDOW),
        }
    }
}

/// The `claude` provider.
pub struct ClaudeRuntime {
    config: ClaudeConfig,
}

impl ClaudeRuntime {
    pub fn new(config: ClaudeConfig) -> Self {
        ClaudeRuntime { config }
    }
}

/// Which tools run without asking, per upstream's `canUseTool`.
#[derive(Debug, Clone, Default)]
struct ToolRules {
    bypass: bool,
    allowed: Vec<String>,
    disallowed: Vec<String>,
}

impl ToolRules {
    fn from_request(request: &RunRequest) -> Self {
        let options = &request.options;
        let mode = effective_permission_mode(request);
        let mut allowed = options.allowed_tools.clone();
        if mode.as_deref() == Some("plan") {
            for tool in PLAN_MODE_TOOLS {
                if !allowed.iter().any(|t| t == tool) {
                    allowed.push(tool.to_string());
                }
            }
        }
        ToolRules {
            bypass: mode.as_deref() == Some("bypassPermissions"),
            allowed,
            disallowed: options.disallowed_tools.clone(),
        }
    }

    /// `Some(allow)` when the rules decide without asking.
    fn decide(&self, tool: &str, input: &Value) -> Option<bool> {
        if TOOLS_REQUIRING_INTERACTION.contains(&tool) {
            return None;
        }
        if self.bypass {
            return Some(true);
        }
        if self.disallowed.iter().any(|entry| matches_tool(entry, tool, input)) {
            return Some(false);
        }
        if self.allowed.iter().any(|entry| matches_tool(entry, tool, input)) {
            return Some(true);
        }
        None
    }

    fn remember(&mut self, entry: &str) {
        if !self.allowed.iter().any(|e| e == entry) {
            self.allowed.push(entry.to_string());
        }
        self.disallowed.retain(|e| e != entry);
    }
}

/// Upstream's `matchesToolPermission`: the exact tool name, or `Bash(<prefix>:*)`
/// matching a Bash command that starts with the prefix.
fn matches_tool(entry: &str, tool: &str, input: &Value) -> bool {
    if entry.is_empty() || tool.is_empty() {
        return false;
    }
    if entry == tool {
        return true;
    }
    let Some(prefix) = entry.strip_prefix("Bash(").and_then(|rest| rest.strip_suffix(":*)")) else {
        return false;
    };
    if tool != "Bash" || prefix.is_empty() {
        return false;
    }
    let command = match input {
        Value::String(s) => s.trim(),
        Value::Object(map) => map.get("command").and_then(Value::as_str).unwrap_or("").trim(),
        _ => "",
    };
    !command.is_empty() && command.starts_with(prefix)
}

/// Upstream's mapping: a non-default `permissionMode`, or `bypassPermissions` when
/// `skipPermissions` is set outside plan mode.
fn effective_permission_mode(request: &RunRequest) -> Option<String> {
    let options = &request.options;
    let mut mode = options.permission_mode.clone().filter(|m| m != "default");
    if options.skip_permissions && mode.as_deref() != Some("plan") {
        mode = Some("bypassPermissions".to_string());
    }
    mode
}

/// The CLI's arguments for `request`.
pub fn claude_args(request: &RunRequest) -> Vec<String> {
    let mut args: Vec<String> = ["--output-format", "stream-json", "--verbose", "--input-format", "stream-json"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(["--permission-prompt-tool".to_string(), "stdio".to_string()]);
    let options = &request.options;
    if let Some(model) = options.model.as_deref().filter(|m| !m.is_empty()) {
        args.extend(["--model".to_string(), model.to_string()]);
    }
    if let Some(effort) = options.effort.as_deref().filter(|e| VALID_EFFORTS.contains(e)) {
        args.extend(["--effort".to_string(), effort.to_string()]);
    }
    if let Some(mode) = effective_permission_mode(request) {
        args.extend(["--permission-mode".to_string(), mode]);
    }
    let rules = ToolRules::from_request(request);
    if !rules.allowed.is_empty() {
        args.extend(["--allowedTools".to_string(), rules.allowed.join(",")]);
    }
    if !rules.disallowed.is_empty() {
        args.extend(["--disallowedTools".to_string(), rules.disallowed.join(",")]);
    }
    if let Some(id) = request.provider_session_id.as_deref().filter(|id| !id.is_empty()) {
        args.push(format!("--resume={id}"));
    }
    args
}

/// stderr lines as shown: the CLI's refusal of `bypassPermissions` to root becomes
/// [`ROOT_BYPASS_REFUSED`]. (chatgate does not set `IS_SANDBOX=1`, which lifts the refusal:
/// inside its sandbox the CLI is not root anyway, and outside it that would be a lie. An
/// operator whose gateway is itself sandboxed may pass it with `--provider-env IS_SANDBOX`.)
fn claude_stderr(line: &str) -> Option<Cow<'_, str>> {
    if line.contains(ROOT_BYPASS_REFUSAL) {
        Some(Cow::Borrowed(ROOT_BYPASS_REFUSED))
    } else {
        Some(Cow::Borrowed(line))
    }
}

/// A line for the CLI's stdin, or the end of it.
enum StdinMsg {
    Line(String),
    Close,
}

async fn write_stdin(mut stdin: ChildStdin, mut queue: mpsc::Receiver<StdinMsg>) {
    while let Some(msg) = queue.recv().await {
        match msg {
            StdinMsg::Line(mut line) => {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
            StdinMsg::Close => return,
        }
    }
}

/// Queues a line for the CLI's stdin, giving up when the run is cancelled.
async fn queue_stdin(queue: &mpsc::Sender<StdinMsg>, msg: StdinMsg, ctx: &RunContext) {
    tokio::select! {
        _ = ctx.cancelled().cancelled() => {}
        _ = queue.send(msg) => {}
    }
}

fn control_request_id(counter: u32) -> String {
    format!("req_{counter}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn control_request(counter: u32, request: Value) -> String {
    json!({ "type": "control_request", "request_id": control_request_id(counter), "request": request }).to_string()
}

fn control_success(request_id: &str, response: Value) -> String {
    json!({
        "type": "control_response",
        "response": { "subtype": "success", "request_id": request_id, "response": response },
    })
    .to_string()
}

fn control_error(request_id: &str, error: &str) -> String {
    json!({
        "type": "control_response",
        "response": { "subtype": "error", "request_id": request_id, "error": error },
    })
    .to_string()
}

fn user_message(content: &str) -> String {
    json!({
        "type": "user",
        "session_id": "",
        "message": { "role": "user", "content": content },
        "parent_tool_use_id": null,
    })
    .to_string()
}

/// The fields of a `can_use_tool` request that describe the ask, as `permission_request`
/// carries them (camelCase): what the CLI shows its own user beside the tool and input.
const ASK_DETAILS: [(&str, &str); 7] = [
    ("display_name", "displayName"),
    ("title", "title"),
    ("description", "description"),
    ("decision_reason", "decisionReason"),
    ("blocked_path", "blockedPath"),
    ("permission_suggestions", "permissionSuggestions"),
    ("tool_use_id", "toolUseId"),
];

fn ask_details(request: &Map<String, Value>) -> Map<String, Value> {
    ASK_DETAILS
        .iter()
        .filter_map(|(from, to)| request.get(*from).filter(|v| !v.is_null()).map(|v| (to.to_string(), v.clone())))
        .collect()
}

/// Decides one `can_use_tool` request and returns the `control_response` line.
async fn answer_tool_request(
    ctx: RunContext,
    rules: Arc<Mutex<ToolRules>>,
    approval_timeout: Duration,
    request_id: String,
    request: Map<String, Value>,
) -> String {
    let tool = str_field(&request, "tool_name").unwrap_or("").to_string();
    let input = request.get("input").cloned().unwrap_or_else(|| json!({}));
    let allow = |input: Value| json!({ "behavior": "allow", "updatedInput": input });
    let deny = |message: &str| json!({ "behavior": "deny", "message": message });
    let ruled = lock_unpoisoned(&rules).decide(&tool, &input);
    let response = match ruled {
        Some(true) => allow(input),
        Some(false) => deny("Tool disallowed by settings"),
        None => {
            let timeout = (!TOOLS_REQUIRING_INTERACTION.contains(&tool.as_str())).then_some(approval_timeout);
            match ctx.ask_permission(&tool, input.clone(), ask_details(&request), timeout).await {
                PermissionOutcome::Answered(answer) if answer.allow => {
                    if let Some(entry) = answer.remember_entry.as_ref().and_then(Value::as_str) {
                        lock_unpoisoned(&rules).remember(entry);
                    }
                    allow(answer.updated_input.unwrap_or(input))
                }
                PermissionOutcome::Answered(answer) => {
                    deny(answer.message.as_deref().unwrap_or("User denied tool use"))
                }
                PermissionOutcome::TimedOut => deny("Permission request timed out"),
                PermissionOutcome::Cancelled => deny("Permission request cancelled"),
            }
        }
    };
    control_success(&request_id, response)
}

#[async_trait]
impl Runtime for ClaudeRuntime {
    fn provider(&self) -> &'static str {
        "claude"
    }

    async fn run(&self, mut request: RunRequest, ctx: RunContext) -> RunOutcome {
        let images = RunImages::write(&request).await;
        request.content = images.prompt(&request.content);
        let outcome = self.run_turn(request, ctx).await;
        images.cleanup().await;
        outcome
    }
}

impl ClaudeRuntime {
    /// One turn of the CLI, from spawn to exit.
    async fn run_turn(&self, request: RunRequest, ctx: RunContext) -> RunOutcome {
        let cmd = CliCommand {
            provider: "claude",
            program: self.config.program.clone(),
            program_env: "CHATGATE_CLAUDE_BIN",
            args: claude_args(&request),
            cwd: request.cwd.clone(),
            stdin: true,
        };
        let mut process = match CliProcess::spawn(&cmd, &ctx, claude_stderr).await {
            Ok(process) => process,
            Err(outcome) => return outcome,
        };
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        let writer = process.take_stdin().map(|stdin| tokio::spawn(write_stdin(stdin, stdin_rx)));
        let mut counter = 1u32;
        // Queue has room for both, so these never wait.
        let _ = stdin_tx
            .send(StdinMsg::Line(control_request(counter, json!({ "subtype": "initialize", "hooks": null }))))
            .await;
        let _ = stdin_tx.send(StdinMsg::Line(user_message(&request.content))).await;

        let rules = Arc::new(Mutex::new(ToolRules::from_request(&request)));
        let mut approvals: JoinSet<String> = JoinSet::new();
        let mut parser = ClaudeParser::new(self.config.context_window);
        let mut emitter = Emitter::new(&ctx, request.provider_session_id.clone());
        let mut out = Vec::new();
        let mut cancelled = false;
        loop {
            tokio::select! {
                _ = ctx.cancelled().cancelled() => {
                    cancelled = true;
                    break;
                }
                Some(answered) = approvals.join_next(), if !approvals.is_empty() => {
                    if let Ok(line) = answered {
                        queue_stdin(&stdin_tx, StdinMsg::Line(line), &ctx).await;
                    }
                }
                line = process.next_line() => match line {
                    Ok(Some(line)) => {
                        let Some(message) = parse_object(&line, &mut out) else {
                            if !emitter.send(&mut out).await { cancelled = true; break; }
                            continue;
                        };
                        match str_field(&message, "type").unwrap_or("") {
                            "control_request" => {
                                let request_id = str_field(&message, "request_id").unwrap_or("").to_string();
                                let body = match message.get("request") {
                                    Some(Value::Object(body)) => body.clone(),
                                    _ => Map::new(),
                                };
                                if str_field(&body, "subtype") != Some("can_use_tool") {
                                    let subtype = str_field(&body, "subtype").unwrap_or("");
                                    let error = format!("Unsupported control request subtype: {subtype}");
                                    queue_stdin(&stdin_tx, StdinMsg::Line(control_error(&request_id, &error)), &ctx).await;
                                } else if approvals.len() >= MAX_PENDING_APPROVALS {
                                    let deny = json!({ "behavior": "deny", "message": "Too many pending tool approvals" });
                                    queue_stdin(&stdin_tx, StdinMsg::Line(control_success(&request_id, deny)), &ctx).await;
                                } else {
                                    approvals.spawn(answer_tool_request(
                                        ctx.clone(), rules.clone(), self.config.approval_timeout, request_id, body,
                                    ));
                                }
                            }
                            "control_response" => {
                                if let Some(Value::Object(response)) = message.get("response")
                                    && str_field(response, "subtype") == Some("error")
                                {
                                    tracing::debug!(error = ?response.get("error"), "claude control request failed");
                                }
                            }
                            "control_cancel_request" => {
                                // The CLI gave up on an approval; its answer, if any, is ignored by the CLI.
                                tracing::debug!(request_id = ?message.get("request_id"), "claude cancelled a control request");
                            }
                            _ => {
                                parser.on_json(message, &mut out);
                                if parser.result_seen {
                                    // The turn is over: end stdin so the CLI exits.
                                    queue_stdin(&stdin_tx, StdinMsg::Close, &ctx).await;
                                }
                                if !emitter.send(&mut out).await { cancelled = true; break; }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        ctx.emit("error", json!({ "content": format!("claude: reading output failed: {e}") })).await;
                        break;
                    }
                },
            }
        }
        approvals.abort_all();
        if cancelled {
            counter += 1;
            // Best effort: never wait on a CLI that stopped reading its stdin.
            let _ = stdin_tx.try_send(StdinMsg::Line(control_request(counter, json!({ "subtype": "interrupt" }))));
            let _ = stdin_tx.try_send(StdinMsg::Close);
            drop(stdin_tx);
            // Give the interrupted CLI a moment to save its transcript, then end the whole group.
            process.wait_for_exit(INTERRUPT_GRACE).await;
            process.terminate().await;
            if let Some(writer) = writer {
                writer.abort();
            }
            return RunOutcome::exit(CANCELLED_EXIT_CODE);
        }
        drop(stdin_tx);
        let code = tokio::select! {
            _ = ctx.cancelled().cancelled() => {
                process.terminate().await;
                return RunOutcome::exit(CANCELLED_EXIT_CODE);
            }
            code = process.wait() => code.unwrap_or(1),
        };
        if let Some(writer) = writer {
            writer.abort();
        }
        let outcome = parser.on_exit(code, &mut out);
        emitter.send(&mut out).await;
        outcome
    }
}

/// Parses a stdout line as a JSON object. Non-JSON lines are skipped (as the SDK
/// does); a dropped over-long line becomes an `error`.
fn parse_object(line: &process::Line, out: &mut Vec<Emit>) -> Option<Map<String, Value>> {
    if line.truncated {
        out.push(Emit::event(
            "error",
            json!({ "content": format!("claude: dropped an output line of {} bytes", line.len) }),
        ));
        return None;
    }
    match serde_json::from_str::<Value>(line.text.trim()) {
        Ok(Value::Object(map)) => Some(map),
        _ => {
            if !line.text.trim().is_empty() {
                tracing::debug!(line = %line.text.chars().take(200).collect::<String>(), "claude: skipped non-JSON stdout line");
            }
            None
        }
    }
}

/// Maps Claude's stream-json messages to normalized events.
pub struct ClaudeParser {
    context_window: u64,
    /// A partial-message text stream is open (`stream_event` deltas seen).
    streaming: bool,
    /// The turn's `result` arrived.
    pub result_seen: bool,
    /// The `result` reported an error.
    result_error: bool,
    /// The text of a synthetic assistant message standing for an API error
    /// (`is_api_error_message`), shown as an `error` unless the `result` reports it.
    api_error: Option<String>,
}

impl ClaudeParser {
    pub fn new(context_window: u64) -> Self {
        ClaudeParser { context_window, streaming: false, result_seen: false, result_error: false, api_error: None }
    }

    fn token_budget(&self, usage: &Map<String, Value>) -> Value {
        let direct = number(usage.get("input_tokens").or(usage.get("inputTokens")));
        let cache_creation = number(
            usage
                .get("cache_creation_input_tokens")
                .or(usage.get("cacheCreationInputTokens"))
                .or(usage.get("cacheCreationTokens")),
        );
        let cache_read = number(
            usage.get("cache_read_input_tokens").or(usage.get("cacheReadInputTokens")).or(usage.get("cacheReadTokens")),
        );
        let cache = cache_creation + cache_read;
        let input = direct + cache;
        let output = number(usage.get("output_tokens").or(usage.get("outputTokens")));
        json!({
            "used": input + output,
            "total": self.context_window,
            "inputTokens": input,
            "outputTokens": output,
            "cacheReadTokens": cache_read,
            "cacheCreationTokens": cache_creation,
            "cacheTokens": cache,
            "breakdown": { "input": input, "output": output },
        })
    }

    fn assistant(&mut self, message: &Map<String, Value>, parent: Option<&str>, out: &mut Vec<Emit>) {
        let Some(Value::Object(inner)) = message.get("message") else { return };
        // An API error comes as a synthetic assistant message (`model: "<synthetic>"`,
        // `is_api_error_message: true`, text "API Error: 400 …") and then as the `result`'s
        // error: it is no reply of the model, and shown once, as an `error`.
        if message.get("is_api_error_message") == Some(&Value::Bool(true)) {
            let text = match inner.get("content") {
                Some(Value::Array(blocks)) => {
                    blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
                }
                Some(Value::String(text)) => text.clone(),
                _ => String::new(),
            };
            self.api_error = Some(if text.trim().is_empty() { "API Error".to_string() } else { text });
            return;
        }
        match inner.get("content") {
            Some(Value::Array(blocks)) => {
                for block in blocks {
                    let Value::Object(block) = block else { continue };
                    match str_field(block, "type") {
                        Some("text") => {
                            if let Some(text) = str_field(block, "text").filter(|t| !t.is_empty()) {
                                push(out, "text", json!({ "role": "assistant", "content": text }), parent);
                            }
                        }
                        Some("tool_use") => push(
                            out,
                            "tool_use",
                            json!({
                                "toolName": block.get("name").cloned().unwrap_or(Value::Null),
                                "toolInput": block.get("input").cloned().unwrap_or(Value::Null),
                                "toolId": block.get("id").cloned().unwrap_or(Value::Null),
                            }),
                            parent,
                        ),
                        Some("thinking") => {
                            if let Some(thinking) = str_field(block, "thinking").filter(|t| !t.is_empty()) {
                                push(out, "thinking", json!({ "content": thinking }), parent);
                            }
                        }
                        _ => {}
                    }
                }
            }
            Some(Value::String(text)) => push(out, "text", json!({ "role": "assistant", "content": text }), parent),
            _ => {}
        }
        // Subagent usage describes the subagent's own context, not the session's.
        if parent.is_none()
            && let Some(Value::Object(usage)) = inner.get("usage")
        {
            out.push(Emit::event("status", json!({ "text": "token_budget", "tokenBudget": self.token_budget(usage) })));
        }
    }

    fn user(&mut self, message: &Map<String, Value>, parent: Option<&str>, out: &mut Vec<Emit>) {
        if message.get("isMeta") == Some(&Value::Bool(true)) {
            return;
        }
        let Some(Value::Object(inner)) = message.get("message") else { return };
        let tool_use_result = message.get("tool_use_result").or(message.get("toolUseResult"));
        match inner.get("content") {
            Some(Value::Array(parts)) => {
                for part in parts {
                    let Value::Object(part) = part else { continue };
                    match str_field(part, "type") {
                        Some("tool_result") => {
                            let content = match part.get("content") {
                                Some(Value::String(s)) => Value::String(s.clone()),
                                Some(other) => Value::String(other.to_string()),
                                None => Value::String(String::new()),
                            };
                            let mut fields = json!({
                                "toolId": part.get("tool_use_id").cloned().unwrap_or(Value::Null),
                                "content": content,
                                "isError": part.get("is_error").and_then(Value::as_bool).unwrap_or(false),
                            });
                            if let Some(result) = tool_use_result {
                                fields["toolUseResult"] = result.clone();
                            }
                            push(out, "tool_result", fields, parent);
                        }
                        Some("text") => {
                            let text = str_field(part, "text").unwrap_or("");
                            if !text.is_empty() && !is_internal(text) {
                                push(out, "text", json!({ "role": "user", "content": text }), parent);
                            }
                        }
                        _ => {}
                    }
                }
            }
            Some(Value::String(text)) if !text.trim().is_empty() && !is_internal(text) => {
                push(out, "text", json!({ "role": "user", "content": text }), parent);
            }
            _ => {}
        }
    }

    fn stream_event(&mut self, message: &Map<String, Value>, parent: Option<&str>, out: &mut Vec<Emit>) {
        let Some(Value::Object(event)) = message.get("event") else { return };
        match str_field(event, "type") {
            Some("content_block_delta") => {
                let text = event.get("delta").and_then(|d| d.get("text")).and_then(Value::as_str).unwrap_or("");
                if !text.is_empty() {
                    self.streaming = true;
                    push(out, "stream_delta", json!({ "content": text }), parent);
                }
            }
            Some("content_block_stop") if self.streaming => {
                self.streaming = false;
                push(out, "stream_end", json!({}), parent);
            }
            _ => {}
        }
    }

    fn result(&mut self, message: &Map<String, Value>, out: &mut Vec<Emit>) {
        self.result_seen = true;
        // The result has the last word on an API error (it carries the same text when it failed).
        self.api_error = None;
        if let Some(Value::Object(usage)) = message.get("usage") {
            out.push(Emit::event("status", json!({ "text": "token_budget", "tokenBudget": self.token_budget(usage) })));
        }
        if message.get("is_error") == Some(&Value::Bool(true)) {
            self.result_error = true;
            let text = match (message.get("result"), message.get("errors")) {
                (Some(Value::String(text)), _) if !text.trim().is_empty() => text.clone(),
                (_, Some(Value::Array(errors))) if !errors.is_empty() => errors
                    .iter()
                    .map(|e| e.as_str().map(str::to_string).unwrap_or_else(|| e.to_string()))
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => format!("Claude run failed ({})", str_field(message, "subtype").unwrap_or("error")),
            };
            out.push(Emit::event("error", json!({ "content": text })));
        }
    }
}

fn is_internal(text: &str) -> bool {
    INTERNAL_CONTENT_PREFIXES.iter().any(|p| text.starts_with(p))
}

fn push(out: &mut Vec<Emit>, kind: &'static str, mut fields: Value, parent: Option<&str>) {
    if let Some(parent) = parent {
        fields["parentToolUseId"] = Value::String(parent.to_string());
    }
    out.push(Emit::event(kind, fields));
}

impl StreamParser for ClaudeParser {
    fn on_json(&mut self, message: Map<String, Value>, out: &mut Vec<Emit>) {
        if let Some(id) = str_field(&message, "session_id").filter(|id| !id.is_empty()) {
            out.push(Emit::ProviderSessionId(id.to_string()));
        }
        let parent = str_field(&message, "parent_tool_use_id").map(str::to_string);
        let parent = parent.as_deref();
        match str_field(&message, "type").unwrap_or("") {
            "assistant" => self.assistant(&message, parent, out),
            "user" => self.user(&message, parent, out),
            "stream_event" => self.stream_event(&message, parent, out),
            "result" => self.result(&message, out),
            _ => {}
        }
    }

    fn on_exit(&mut self, exit_code: i32, out: &mut Vec<Emit>) -> RunOutcome {
        if self.streaming {
            self.streaming = false;
            out.push(Emit::event("stream_end", json!({})));
        }
        if let Some(text) = self.api_error.take() {
            // No failed `result` reported it.
            self.result_error = true;
            out.push(Emit::event("error", json!({ "content": text })));
        }
        if exit_code == 0 && self.result_error { RunOutcome::exit(1) } else { RunOutcome::exit(exit_code) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_api_error_message_is_no_reply_and_one_error() {
        let synthetic = json!({
            "type": "assistant", "session_id": "s", "parent_tool_use_id": null, "is_api_error_message": true,
            "message": { "model": "<synthetic>", "role": "assistant", "content": [{ "type": "text", "text": "API Error: 400 x" }] },
        });
        let result = json!({ "type": "result", "session_id": "s", "is_error": true, "result": "API Error: 400 x" });
        let mut parser = ClaudeParser::new(1000);
        let mut out = Vec::new();
        for message in [synthetic.clone(), result] {
            if let Value::Object(map) = message {
                parser.on_json(map, &mut out);
            }
        }
        let outcome = parser.on_exit(0, &mut out);
        let events: Vec<_> = out.iter().filter(|e| matches!(e, Emit::Event(..))).collect();
        assert_eq!(events, vec![&Emit::event("error", json!({ "content": "API Error: 400 x" }))]);
        assert_eq!(outcome.exit_code, 1);
        // Without a result, the synthetic message's text is the error, at exit.
        let mut parser = ClaudeParser::new(1000);
        let mut out = Vec::new();
        if let Value::Object(map) = synthetic {
            parser.on_json(map, &mut out);
        }
        parser.on_exit(0, &mut out);
        assert_eq!(out.last(), Some(&Emit::event("error", json!({ "content": "API Error: 400 x" }))));
    }

    #[test]
    fn root_bypass_refusal_is_replaced_by_its_cause() {
        let line = "--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons";
        assert_eq!(claude_stderr(line).as_deref(), Some(ROOT_BYPASS_REFUSED));
        assert_eq!(claude_stderr("other").as_deref(), Some("other"));
    }

    #[test]
    fn bash_prefix_rules_match_like_upstream() {
        let input = json!({ "command": "git status --short" });
        assert!(matches_tool("Bash(git status:*)", "Bash", &input));
        assert!(!matches_tool("Bash(git push:*)", "Bash", &input));
        assert!(!matches_tool("Bash(git status:*)", "Read", &input));
        assert!(matches_tool("Read", "Read", &json!({})));
        assert!(!matches_tool("", "Read", &json!({})));
    }

    #[test]
    fn interactive_tools_always_ask() {
        let rules = ToolRules { bypass: true, allowed: vec!["AskUserQuestion".into()], disallowed: vec![] };
        assert_eq!(rules.decide("AskUserQuestion", &json!({})), None);
        assert_eq!(rules.decide("ExitPlanMode", &json!({})), None);
        assert_eq!(rules.decide("Bash", &json!({})), Some(true));
    }

    #[test]
    fn disallowed_wins_over_allowed_and_remember_moves_entries() {
        let mut rules = ToolRules { bypass: false, allowed: vec!["Edit".into()], disallowed: vec!["Edit".into()] };
        assert_eq!(rules.decide("Edit", &json!({})), Some(false));
        rules.remember("Edit");
        assert_eq!(rules.decide("Edit", &json!({})), Some(true));
        assert_eq!(rules.decide("Write", &json!({})), None);
    }
}
