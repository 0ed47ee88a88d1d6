//! The `gemini` runtime: `gemini --prompt <p> [--resume <id>] --skip-trust
//! [--model m] --output-format stream-json [approval] [--policy <file>]`,
//! as upstream's `server/gemini-cli.js`, verified against the real Gemini CLI
//! 0.61.0 (tests/real_gemini.rs).
//!
//! Approval mapping (upstream's `resolveGeminiPermissionArgs`): skip permissions,
//! `yolo` or `bypassPermissions` → `--yolo`; `auto_edit` or `acceptEdits` →
//! `--approval-mode auto_edit`; `plan` → `--approval-mode plan`. Headless Gemini
//! asks nobody: in its default mode it does not offer the tools that would need an
//! approval (its shell tool among them). `allowedTools` / `disallowedTools` become a
//! Policy Engine file passed with `--policy` ([`tool_policy`]; 0.61.0 deprecates
//! `--allowed-tools`).
//!
//! Every turn runs in the session's project directory ([`gemini_cwd`]): Gemini
//! keeps its sessions per directory, so a turn from a subdirectory could not resume.
//!
//! stream-json events (gemini-cli `packages/core/src/output/types.ts`): `init
//! {session_id}`, `message {role, content, delta}`, `tool_use {tool_name, tool_id,
//! parameters}`, `tool_result {tool_id, status, output, error}`, `error
//! {message}`, `result {status, stats}`; mapped as upstream's gemini
//! `normalizeMessage`. A failed `result` is one `error` with the API's own message
//! ([`ApiError`]); Gemini's stderr chatter and stack traces are not shown
//! ([`gemini_stderr_filter`]). The CLI is ended after 120 s without stdout output,
//! upstream's messages for Gemini's documented exit codes are kept, and the exit
//! code of an API error (the HTTP status modulo 256) is explained on the `complete`.

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use super::{
    RunContext, RunOutcome, RunRequest, Runtime,
    images::{RunFiles, RunImages},
    process::{CliCommand, Emit, RunCliOptions, StreamParser, prompt_arg, run_cli, str_field},
};

/// The name of the run's policy file (in `.tmp/policies/<run>/` under the working directory).
const POLICY_FILE: &str = "chatgate-tools.toml";

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

/// Where the CLI runs: always the session's project directory, whatever the turn's `cwd`.
/// Gemini keeps its sessions per directory it was started in (`~/.gemini/projects.json`
/// names a slug for `process.cwd()`; the chats live in `~/.gemini/tmp/<slug>/chats`), so a
/// turn run from a subdirectory could not `--resume` the session ("No previous sessions
/// found for this project", exit 42). The subdirectory is inside the project, which is
/// Gemini's workspace: its tools reach it.
pub fn gemini_cwd(request: &RunRequest) -> PathBuf {
    if request.project_path.as_os_str().is_empty() { request.cwd.clone() } else { request.project_path.clone() }
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

/// The CLI's arguments for `request`; `policy` is the run's policy file ([`tool_policy`]).
pub fn gemini_args(request: &RunRequest, policy: Option<&Path>) -> Vec<String> {
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
    if let Some(policy) = policy {
        args.extend(["--policy".to_string(), policy.to_string_lossy().into_owned()]);
    }
    args
}

/// Priority (0–999, in the user tier of `--policy` files) of an allowed tool's rule.
const ALLOW_PRIORITY: u32 = 100;
/// Priority of a disallowed tool's rule: above every allow.
const DENY_PRIORITY: u32 = 200;

/// The Policy Engine rules for the run's `allowedTools` / `disallowedTools` (Gemini 0.61.0
/// deprecates `--allowed-tools`: "Migrate to Policy Engine"), as a TOML policy file; `None`
/// without any. Each tool becomes a `[[rule]]` as Gemini's own conversion of `--allowed-tools`
/// does: `name` matches the tool, `run_shell_command(git status)` (or `ShellTool(…)`) the
/// shell commands starting with `git status` (`commandPrefix`). Allowed: `allow` at priority
/// 100; disallowed: `deny` at 200, so a denial wins.
pub fn tool_policy(request: &RunRequest) -> Option<String> {
    let allowed = request.options.allowed_tools.iter().map(|tool| (tool, "allow", ALLOW_PRIORITY));
    let denied = request.options.disallowed_tools.iter().map(|tool| (tool, "deny", DENY_PRIORITY));
    let rules: Vec<String> = allowed
        .chain(denied)
        .filter(|(tool, _, _)| !tool.trim().is_empty())
        .map(|(tool, decision, priority)| policy_rule(tool.trim(), decision, priority))
        .collect();
    (!rules.is_empty()).then(|| format!("# chatgate: this run's allowedTools / disallowedTools\n{}", rules.join("")))
}

/// One `[[rule]]`; strings are TOML basic strings (JSON's escapes are TOML's).
fn policy_rule(tool: &str, decision: &str, priority: u32) -> String {
    let quoted = |text: &str| Value::String(text.to_string()).to_string();
    let narrowed = tool.strip_suffix(')').and_then(|t| t.split_once('('));
    let matcher = match narrowed {
        Some((name, prefix)) if SHELL_TOOL_NAMES.contains(&name) => {
            format!("toolName = {}\ncommandPrefix = {}\n", quoted(SHELL_TOOL_NAMES[0]), quoted(prefix))
        }
        Some((name, _)) => format!("toolName = {}\n", quoted(name)),
        None if SHELL_TOOL_NAMES.contains(&tool) => format!("toolName = {}\n", quoted(SHELL_TOOL_NAMES[0])),
        None => format!("toolName = {}\n", quoted(tool)),
    };
    format!("\n[[rule]]\n{matcher}decision = \"{decision}\"\npriority = {priority}\n")
}

/// Gemini's shell tool and its alias.
const SHELL_TOOL_NAMES: [&str; 2] = ["run_shell_command", "ShellTool"];

/// Prefixes of Gemini's stderr lines that are no error of the run (Gemini CLI 0.61.0):
/// upstream's Node deprecation and credential lines, Gemini's startup chatter (colour
/// support, the ripgrep fallback, startup-phase metrics, the YOLO banner, the model
/// router falling back), and the reports of an API
/// error (`Error when talking to Gemini API …`) and of a failed tool (`Error executing
/// tool …`), which the stream-json `result` and `tool_result` already carry.
const GEMINI_STDERR_NOISE: &[&str] = &[
    "Loaded cached credentials",
    "Warning: 256-color support not detected",
    "Warning: True color (24-bit) support not detected",
    "Warning: Basic terminal detected",
    "Warning: Limited color support detected",
    "Warning: GNU screen detected",
    "Warning: JetBrains terminal detected",
    "Ripgrep is not available",
    "[STARTUP] ",
    "[Routing] ",
    "YOLO mode is enabled",
    "Error when talking to Gemini API",
    "Error executing tool ",
];

/// Whether `line` continues a multi-line report on stderr (a stack frame, the body of a
/// logged object, a closing bracket): Gemini starts every report of its own at the margin.
fn is_continuation(line: &str) -> bool {
    line.starts_with(char::is_whitespace) || line.trim().chars().all(|c| "{}[](),;".contains(c))
}

/// Drops Gemini's stderr noise (see [`GEMINI_STDERR_NOISE`]) and the continuation lines of
/// its multi-line reports (an API error's stack trace alone was 20 `error` events); every
/// other line is shown. Dropped lines go to the gateway's debug log.
pub fn gemini_stderr_filter(line: &str) -> Option<Cow<'_, str>> {
    let noise = is_continuation(line)
        || GEMINI_STDERR_NOISE.iter().any(|prefix| line.starts_with(prefix))
        || line.contains("DeprecationWarning")
        || line.contains("--trace-deprecation");
    if noise {
        tracing::debug!(provider = "gemini", line, "gemini stderr not shown");
        return None;
    }
    Some(Cow::Borrowed(line))
}

#[async_trait]
impl Runtime for GeminiRuntime {
    fn provider(&self) -> &'static str {
        "gemini"
    }

    async fn run(&self, mut request: RunRequest, ctx: RunContext) -> RunOutcome {
        let images = RunImages::write(&request).await;
        request.content = images.prompt(&request.content);
        let policy_files = match tool_policy(&request) {
            Some(policy) => {
                RunFiles::write(&request.cwd, "policies", vec![(POLICY_FILE.to_string(), policy.into_bytes())]).await
            }
            None => RunFiles::default(),
        };
        let cmd = CliCommand {
            provider: "gemini",
            program: self.program.clone(),
            program_env: "CHATGATE_GEMINI_BIN",
            args: gemini_args(&request, policy_files.paths().first().map(PathBuf::as_path)),
            cwd: gemini_cwd(&request),
            stdin: false,
        };
        let secs = self.inactivity_timeout.as_secs_f64();
        let options = RunCliOptions {
            inactivity: Some((
                self.inactivity_timeout,
                format!("Gemini CLI timeout - no response received for {secs} seconds"),
            )),
            stderr_filter: gemini_stderr_filter,
            ..RunCliOptions::default()
        };
        let mut parser = GeminiParser::default();
        let outcome = run_cli(&cmd, &ctx, request.provider_session_id.clone(), &mut parser, options).await;
        images.cleanup().await;
        policy_files.cleanup().await;
        outcome
    }
}

/// Maps Gemini stream-json to normalized events.
#[derive(Debug, Default)]
pub struct GeminiParser {
    result_failed: bool,
    /// The HTTP status of the API error that failed the run, when its body named one.
    api_status: Option<u16>,
}

/// An API error as Gemini reports it in the `result`: `[API Error: <message>]`, where
/// `<message>` is the API's JSON body (`{"error":{"code":400,"message":…,"status":…}}`)
/// or Gemini's own wording (`… (Status: INVALID_ARGUMENT)`), maybe followed by advice.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The API's own message (the whole text when it is no API error).
    pub message: String,
    /// `error.code` of the API's body.
    pub status: Option<u16>,
}

impl ApiError {
    pub fn parse(text: &str) -> ApiError {
        let Some(inner) = text.trim().strip_prefix("[API Error: ") else {
            return ApiError { message: text.to_string(), status: None };
        };
        let body = serde_json::Deserializer::from_str(inner).into_iter::<Value>().next().and_then(Result::ok);
        let error = body.as_ref().and_then(|body| body.get("error"));
        let message = error.and_then(|e| e.get("message")).and_then(Value::as_str).filter(|m| !m.trim().is_empty());
        match message {
            Some(message) => ApiError {
                message: message.to_string(),
                status: error.and_then(|e| e.get("code")).and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()),
            },
            None => {
                let end = inner.rfind(']').unwrap_or(inner.len());
                ApiError { message: inner[..end].trim().to_string(), status: None }
            }
        }
    }
}

/// Why Gemini exited with `exit_code` after a failed `result`: on an API error it exits
/// with the HTTP status, which the shell sees modulo 256 (`process.exit(400)`: 144).
fn api_exit_reason(exit_code: i32, api_status: Option<u16>) -> Option<String> {
    let status = match api_status {
        Some(status) if i32::from(status) % 256 == exit_code => status,
        None if (144..=255).contains(&exit_code) => u16::try_from(exit_code + 256).ok()?,
        _ => return None,
    };
    Some(format!(
        "Gemini API error: HTTP {status} (Gemini exits with the HTTP status modulo 256: exit code {exit_code})"
    ))
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
                    let api_error = ApiError::parse(message);
                    self.api_status = api_error.status;
                    out.push(Emit::event("error", json!({ "content": api_error.message })));
                }
            }
            "error" => {
                let message = str_field(&event, "error")
                    .or(str_field(&event, "message"))
                    .unwrap_or("Unknown Gemini streaming error");
                // `{severity: "warning"}` (gemini-cli's ErrorEvent) is no error of the run:
                // shown as a status, as upstream's client shows one.
                let kind = if str_field(&event, "severity") == Some("warning") { "status" } else { "error" };
                let field = if kind == "status" { "text" } else { "content" };
                out.push(Emit::event(kind, json!({ field: message })));
            }
            _ => {}
        }
    }

    fn on_exit(&mut self, exit_code: i32, out: &mut Vec<Emit>) -> RunOutcome {
        if let Some(message) = documented_exit_message(exit_code) {
            out.push(Emit::event("error", json!({ "content": message })));
        }
        if exit_code == 0 && self.result_failed {
            return RunOutcome::exit(1);
        }
        let reason = if self.result_failed { api_exit_reason(exit_code, self.api_status) } else { None };
        RunOutcome { exit_code, error: reason }
    }
}

/// Upstream's messages for Gemini's documented exit codes (`FatalError` subclasses of
/// gemini-cli `packages/core/src/utils/errors.ts`), with 54, 55 and 130 of Gemini 0.61.0.
fn documented_exit_message(exit_code: i32) -> Option<&'static str> {
    match exit_code {
        41 => Some(
            "Gemini authentication failed (exit code 41). Run `gemini` in a terminal to choose an auth method, or configure a valid `GEMINI_API_KEY`.",
        ),
        42 => Some("Gemini rejected the request input (exit code 42)."),
        44 => Some("Gemini sandbox error (exit code 44). Check local sandbox/container settings."),
        52 => {
            Some("Gemini configuration error (exit code 52). Check your Gemini settings files for invalid JSON/config.")
        }
        53 => Some("Gemini conversation turn limit reached (exit code 53). Start a new Gemini session."),
        54 => Some("Gemini stopped on a fatal tool error (exit code 54)."),
        55 => Some("Gemini does not trust this workspace (exit code 55)."),
        130 => Some("Gemini run cancelled (exit code 130)."),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RunOptions;

    fn request(options: RunOptions) -> RunRequest {
        RunRequest {
            session_id: "s".into(),
            content: "hi".into(),
            provider_session_id: None,
            cwd: PathBuf::from("/p/sub"),
            project_path: PathBuf::from("/p"),
            options,
        }
    }

    #[test]
    fn a_stream_warning_is_a_status_and_an_error_an_error() {
        let mut parser = GeminiParser::default();
        let mut out = Vec::new();
        for line in [
            json!({ "type": "error", "severity": "warning", "message": "Loop detected, stopping" }),
            json!({ "type": "error", "severity": "error", "message": "Quota exceeded" }),
        ] {
            if let Value::Object(event) = line {
                parser.on_json(event, &mut out);
            }
        }
        assert_eq!(
            out,
            vec![
                Emit::event("status", json!({ "text": "Loop detected, stopping" })),
                Emit::event("error", json!({ "content": "Quota exceeded" })),
            ]
        );
    }

    #[test]
    fn gemini_stderr_chatter_and_stack_traces_are_dropped() {
        for noise in [
            "Warning: Basic terminal detected (TERM=dumb). Visual rendering will be limited.",
            "Ripgrep is not available. Falling back to GrepTool.",
            "[STARTUP] Phase 'cleanup_ops' was started but never ended. Skipping metrics.",
            "YOLO mode is enabled. All tool calls will be automatically approved.",
            "[Routing] NumericalClassifierStrategy failed: _ZodError: [",
            "Error when talking to Gemini API Full report available at: /tmp/x.json _ApiError: {}",
            "Error executing tool run_shell_command: Tool \"run_shell_command\" not found.",
            "    at throwErrorIfNotOK (file:///x/chunk.js:267833:24)",
            "  status: 400",
            "}",
            "]",
        ] {
            assert_eq!(gemini_stderr_filter(noise), None, "{noise}");
        }
        let kept = "Error resuming session: No previous sessions found for this project.";
        assert_eq!(gemini_stderr_filter(kept).as_deref(), Some(kept));
    }

    #[test]
    fn api_errors_give_the_apis_message_and_status() {
        let json = r#"[API Error: {"error":{"code":400,"message":"bad thing","status":"INVALID_ARGUMENT"}}]"#;
        assert_eq!(ApiError::parse(json), ApiError { message: "bad thing".into(), status: Some(400) });
        let worded = "[API Error: Quota exceeded (Status: RESOURCE_EXHAUSTED)]\nPossible quota limitations…";
        assert_eq!(ApiError::parse(worded).message, "Quota exceeded (Status: RESOURCE_EXHAUSTED)");
        assert_eq!(ApiError::parse("Gemini run failed").message, "Gemini run failed");
    }

    #[test]
    fn api_exit_codes_are_the_http_status_modulo_256() {
        let reason = api_exit_reason(144, Some(400)).unwrap_or_default();
        assert!(reason.contains("HTTP 400") && reason.contains("exit code 144"), "{reason}");
        assert!(api_exit_reason(173, None).unwrap_or_default().contains("HTTP 429"));
        assert_eq!(api_exit_reason(1, Some(400)), None);
        assert_eq!(api_exit_reason(1, None), None);
    }

    #[test]
    fn a_failed_result_is_one_error_and_its_exit_code_is_explained() {
        let mut parser = GeminiParser::default();
        let mut out = Vec::new();
        let result = json!({ "type": "result", "status": "error",
            "error": { "type": "unknown", "message": r#"[API Error: {"error":{"code":400,"message":"nope"}}]"# } });
        let Value::Object(result) = result else { unreachable!() };
        parser.on_json(result, &mut out);
        let outcome = parser.on_exit(144, &mut out);
        let errors: Vec<_> = out.iter().filter(|e| matches!(e, Emit::Event("error", _))).collect();
        assert_eq!(errors, vec![&Emit::event("error", json!({ "content": "nope" }))]);
        assert_eq!(outcome.exit_code, 144);
        assert!(outcome.error.unwrap_or_default().contains("HTTP 400"));
    }

    #[test]
    fn the_cli_runs_in_the_project_whatever_the_cwd() {
        assert_eq!(gemini_cwd(&request(RunOptions::default())), PathBuf::from("/p"));
    }

    #[test]
    fn tool_options_become_a_policy_file() {
        assert_eq!(tool_policy(&request(RunOptions::default())), None);
        let options = RunOptions {
            allowed_tools: vec!["read_file".into(), "run_shell_command(git status)".into()],
            disallowed_tools: vec!["ShellTool".into()],
            ..RunOptions::default()
        };
        let policy = tool_policy(&request(options)).unwrap_or_default();
        let expected = "\n[[rule]]\ntoolName = \"read_file\"\ndecision = \"allow\"\npriority = 100\n\
                        \n[[rule]]\ntoolName = \"run_shell_command\"\ncommandPrefix = \"git status\"\ndecision = \"allow\"\npriority = 100\n\
                        \n[[rule]]\ntoolName = \"run_shell_command\"\ndecision = \"deny\"\npriority = 200\n";
        assert!(policy.ends_with(expected), "{policy}");
        let args = gemini_args(&request(RunOptions::default()), Some(Path::new("/p/.tmp/policies/r/x.toml")));
        assert_eq!(args[args.len() - 2..], ["--policy".to_string(), "/p/.tmp/policies/r/x.toml".to_string()]);
    }
}
