//! The built-in `script` runtime (docs/protocol.md §The `script` provider): no program, a precise event script.
//!
//! Plain text is echoed back word by word; a JSON object drives events,
//! payload sizes, pacing, a tool approval and failures, for tests, load and demos.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{PermissionOutcome, RunContext, RunOutcome, RunRequest, Runtime};

/// Default wait for a tool approval, as upstream.
const DEFAULT_PERMISSION_TIMEOUT_MS: u64 = 55_000;
/// Largest `payloadBytes` a script may ask for. Each event's padding is
/// allocated at once, and the queues from a runtime to the sockets are bounded
/// in events, not bytes: an unbounded size let one frame exhaust the node's memory.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// The `script` provider.
pub struct ScriptRuntime;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Script {
    events: u64,
    payload_bytes: usize,
    interval_ms: u64,
    permission: Option<PermissionStep>,
    stamp: bool,
    fail: Option<String>,
    exit_code: i32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PermissionStep {
    tool_name: String,
    #[serde(default)]
    input: Value,
    timeout_ms: Option<u64>,
}

#[async_trait]
impl Runtime for ScriptRuntime {
    fn provider(&self) -> &'static str {
        "script"
    }

    async fn run(&self, request: RunRequest, ctx: RunContext) -> RunOutcome {
        if request.provider_session_id.is_none() {
            let id = format!("script-{}", uuid::Uuid::new_v4());
            if !ctx.provider_session_id(&id).await {
                return RunOutcome::exit(1);
            }
        }
        if request.content.trim_start().starts_with('{') {
            match serde_json::from_str::<Script>(&request.content) {
                Ok(script) => run_script(script, &ctx).await,
                Err(e) => {
                    ctx.emit("error", json!({ "content": format!("script: invalid JSON script: {e}") })).await;
                    RunOutcome::exit(1)
                }
            }
        } else {
            echo(&request.content, &ctx).await
        }
    }
}

async fn echo(text: &str, ctx: &RunContext) -> RunOutcome {
    for (i, word) in text.split_whitespace().enumerate() {
        let chunk = if i == 0 { word.to_string() } else { format!(" {word}") };
        if !ctx.emit("stream_delta", json!({ "content": chunk })).await {
            return RunOutcome::exit(1);
        }
    }
    ctx.emit("stream_end", json!({})).await;
    ctx.emit("text", json!({ "role": "assistant", "content": text })).await;
    RunOutcome::exit(0)
}

async fn run_script(script: Script, ctx: &RunContext) -> RunOutcome {
    if script.payload_bytes > MAX_PAYLOAD_BYTES {
        let content = format!("script: payloadBytes must be at most {MAX_PAYLOAD_BYTES}");
        ctx.emit("error", json!({ "content": content })).await;
        return RunOutcome::exit(1);
    }
    if let Some(step) = script.permission {
        let timeout = Duration::from_millis(step.timeout_ms.unwrap_or(DEFAULT_PERMISSION_TIMEOUT_MS));
        let tool_id = format!("tool_{}", uuid::Uuid::new_v4().simple());
        match ctx.ask_permission(&step.tool_name, step.input.clone(), Map::new(), Some(timeout)).await {
            PermissionOutcome::Answered(answer) if answer.allow => {
                let input = answer.updated_input.unwrap_or(step.input);
                ctx.emit("tool_use", json!({ "toolName": step.tool_name, "toolInput": input, "toolId": tool_id }))
                    .await;
                ctx.emit("tool_result", json!({ "toolId": tool_id, "content": "ok", "isError": false })).await;
            }
            PermissionOutcome::Answered(answer) => {
                let message = answer.message.unwrap_or_else(|| "User denied tool use".to_string());
                ctx.emit("tool_result", json!({ "toolId": tool_id, "content": message, "isError": true })).await;
            }
            PermissionOutcome::TimedOut => {}
            PermissionOutcome::Cancelled => return RunOutcome::exit(1),
        }
    }
    for i in 1..=script.events {
        if script.interval_ms > 0 {
            tokio::select! {
                _ = ctx.cancelled().cancelled() => return RunOutcome::exit(1),
                _ = tokio::time::sleep(Duration::from_millis(script.interval_ms)) => {}
            }
        }
        let mut content = format!("chunk {i}");
        if content.len() < script.payload_bytes {
            content.extend(std::iter::repeat_n('.', script.payload_bytes - content.len()));
        }
        let mut fields = json!({ "content": content });
        if script.stamp {
            fields["emittedAtUs"] = json!(unix_micros());
        }
        if !ctx.emit("stream_delta", fields).await {
            return RunOutcome::exit(1);
        }
    }
    if script.events > 0 {
        ctx.emit("stream_end", json!({})).await;
    }
    if let Some(fail) = script.fail {
        ctx.emit("error", json!({ "content": fail })).await;
        return RunOutcome::exit(1);
    }
    RunOutcome::exit(script.exit_code)
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::runtime::{RunOptions, RuntimeMsg};

    /// Runs a script to its end; returns its outcome and the kinds and contents it emitted.
    async fn run(content: &str) -> (RunOutcome, Vec<(String, String)>) {
        let (tx, mut rx) = mpsc::channel(crate::runtime::RUNTIME_EVENT_CAPACITY);
        let request = RunRequest {
            session_id: "s".into(),
            content: content.into(),
            provider_session_id: Some("script-1".into()),
            cwd: std::env::temp_dir(),
            project_path: std::env::temp_dir(),
            options: RunOptions::default(),
        };
        let outcome = ScriptRuntime.run(request, RunContext::new(tx, CancellationToken::new())).await;
        let mut events = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let RuntimeMsg::Event(fields) = msg {
                let field = |k: &str| fields.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                events.push((field("kind"), field("content")));
            }
        }
        (outcome, events)
    }

    #[tokio::test]
    async fn oversized_payloads_are_refused_before_allocating() {
        // Found by fuzz/fuzz_targets/dispatcher.rs: this asked for a 4 GB string per event.
        let (outcome, events) = run(r#"{"events":1,"payloadBytes":4000000000}"#).await;
        assert_eq!(outcome.exit_code, 1);
        assert_eq!(events, vec![("error".into(), format!("script: payloadBytes must be at most {MAX_PAYLOAD_BYTES}"))]);
    }

    #[tokio::test]
    async fn payloads_up_to_the_limit_are_padded() {
        let script = format!(r#"{{"events":2,"payloadBytes":{MAX_PAYLOAD_BYTES}}}"#);
        let (outcome, events) = run(&script).await;
        assert_eq!(outcome.exit_code, 0);
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["stream_delta", "stream_delta", "stream_end"]);
        assert_eq!(events[1].1.len(), MAX_PAYLOAD_BYTES);
        assert!(events[1].1.starts_with("chunk 2."));
    }
}
