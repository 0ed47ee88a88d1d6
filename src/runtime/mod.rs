//! Provider runtimes: what actually produces a run's events.
//!
//! A runtime gets the prompt and validated options ([`RunRequest`]) and a
//! [`RunContext`] through which it emits normalized events (kind + upstream's
//! fields), announces the provider's own session id, and asks for tool
//! approvals. It never emits `complete`: it returns a [`RunOutcome`] and the
//! gateway's run driver appends the one terminal `complete`. A runtime must
//! stop promptly (killing its process group) when the context is cancelled.

pub mod claude;
pub mod codex;
pub mod cursor;
pub mod gemini;
pub mod images;
pub mod opencode;
pub mod process;
pub mod sandbox;
pub mod script;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::protocol::PermissionAnswer;

/// Capacity of the channel from a runtime to its run driver.
pub const RUNTIME_EVENT_CAPACITY: usize = 1024;

/// Everything a runtime needs to start one turn.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The app session id (for logs; events are labelled by the driver).
    pub session_id: String,
    /// The user's message.
    pub content: String,
    /// The provider's own session id, to resume; `None` on the first run.
    pub provider_session_id: Option<String>,
    /// Working directory: the project path, or `options.cwd` inside it.
    pub cwd: PathBuf,
    /// The session's project path from the database.
    pub project_path: PathBuf,
    /// Client options after validation (model, effort, permissionMode, …).
    pub options: RunOptions,
}

/// Client `options` of `chat.send`, validated (docs/protocol.md §Inbound, `INVALID_OPTIONS`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOptions {
    pub model: Option<String>,
    pub effort: Option<String>,
    /// `default`, `acceptEdits`, `bypassPermissions` or `plan`.
    pub permission_mode: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub skip_permissions: bool,
    /// Every other option, passed through untouched.
    pub extra: Map<String, Value>,
}

/// How a runtime ended (the driver turns it into the terminal `complete`).
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub exit_code: i32,
    /// Extra `error` text put on the terminal `complete`.
    pub error: Option<String>,
}

impl RunOutcome {
    pub fn exit(exit_code: i32) -> Self {
        RunOutcome { exit_code, error: None }
    }
}

/// The result of a tool-approval request.
#[derive(Debug, Clone, PartialEq)]
pub enum PermissionOutcome {
    Answered(PermissionAnswer),
    /// Nobody answered in time; the driver already emitted `permission_cancelled`.
    TimedOut,
    /// The run is ending (abort, drain, lost lock).
    Cancelled,
}

/// What a runtime sends to its driver.
#[derive(Debug)]
pub enum RuntimeMsg {
    /// A normalized event: `kind` plus upstream's fields of that kind.
    Event(Map<String, Value>),
    /// The provider announced its own session id.
    ProviderSessionId(String),
    /// A tool approval: the driver records it, emits `permission_request` (with `details`, the
    /// provider's own description of the ask, merged in) and answers on `reply`.
    Permission {
        request_id: String,
        tool_name: String,
        input: Value,
        details: Map<String, Value>,
        reply: oneshot::Sender<PermissionAnswer>,
    },
    /// A pending approval ended without an answer (`timeout` or `cancelled`).
    PermissionCancelled { request_id: String, reason: &'static str },
}

/// A runtime's handle on its run.
#[derive(Clone)]
pub struct RunContext {
    tx: mpsc::Sender<RuntimeMsg>,
    cancel: CancellationToken,
    launch: sandbox::Launch,
}

impl RunContext {
    /// A context whose CLIs run unconfined (tests and tools; a node uses [`RunContext::contained`]).
    pub fn new(tx: mpsc::Sender<RuntimeMsg>, cancel: CancellationToken) -> Self {
        RunContext { tx, cancel, launch: sandbox::Launch::unconfined() }
    }

    /// A context whose CLIs start under `launch` (the node's containment for this run).
    pub fn contained(tx: mpsc::Sender<RuntimeMsg>, cancel: CancellationToken, launch: sandbox::Launch) -> Self {
        RunContext { tx, cancel, launch }
    }

    /// How this run's CLIs are started.
    pub fn launch(&self) -> &sandbox::Launch {
        &self.launch
    }

    /// Emits a normalized event. `fields` must be a JSON object; `kind` is added.
    /// Returns false once the run is over (the runtime should stop).
    pub async fn emit(&self, kind: &str, fields: Value) -> bool {
        let mut map = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        map.insert("kind".into(), Value::String(kind.to_string()));
        self.send(RuntimeMsg::Event(map)).await
    }

    /// Announces the provider's own session id (stored for resume).
    pub async fn provider_session_id(&self, id: &str) -> bool {
        self.send(RuntimeMsg::ProviderSessionId(id.to_string())).await
    }

    /// Asks the user to approve a tool; `details` (camelCase fields such as `description`)
    /// travel with the request; `timeout: None` waits until the run ends.
    pub async fn ask_permission(
        &self,
        tool_name: &str,
        input: Value,
        details: Map<String, Value>,
        timeout: Option<Duration>,
    ) -> PermissionOutcome {
        let request_id = uuid::Uuid::new_v4().to_string();
        let (reply, answer) = oneshot::channel();
        let tool_name = tool_name.to_string();
        let msg = RuntimeMsg::Permission { request_id: request_id.clone(), tool_name, input, details, reply };
        if !self.send(msg).await {
            return PermissionOutcome::Cancelled;
        }
        let wait = async {
            match timeout {
                Some(limit) => tokio::time::timeout(limit, answer).await.ok(),
                None => Some(answer.await),
            }
        };
        tokio::select! {
            _ = self.cancel.cancelled() => {
                self.send(RuntimeMsg::PermissionCancelled { request_id, reason: "cancelled" }).await;
                PermissionOutcome::Cancelled
            }
            result = wait => match result {
                Some(Ok(answer)) => PermissionOutcome::Answered(answer),
                Some(Err(_)) => PermissionOutcome::Cancelled,
                None => {
                    self.send(RuntimeMsg::PermissionCancelled { request_id, reason: "timeout" }).await;
                    PermissionOutcome::TimedOut
                }
            }
        }
    }

    /// Cancelled when the run must stop (abort, drain, lost lock).
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    async fn send(&self, msg: RuntimeMsg) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        self.tx.send(msg).await.is_ok()
    }
}

/// A provider runtime.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The provider id (`claude`, `script`, …).
    fn provider(&self) -> &'static str;

    /// Runs one turn to its end. Must return soon after `ctx.cancelled()` fires.
    async fn run(&self, request: RunRequest, ctx: RunContext) -> RunOutcome;
}

/// Enabled runtimes by provider id.
pub type Runtimes = HashMap<String, Arc<dyn Runtime>>;

/// Operator settings of the runtimes (`--claude-bin` and friends).
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub claude_bin: String,
    pub codex_bin: String,
    pub cursor_bin: String,
    pub gemini_bin: String,
    pub opencode_bin: String,
    pub claude_approval_timeout: Duration,
}

/// Builds the runtimes named in `--providers`.
pub fn build_runtimes(providers: &[String], settings: &RuntimeSettings) -> Runtimes {
    let mut runtimes: Runtimes = HashMap::new();
    for provider in providers {
        let runtime: Option<Arc<dyn Runtime>> = match provider.as_str() {
            "claude" => {
                let mut config = claude::ClaudeConfig::from_env();
                config.program = settings.claude_bin.clone();
                config.approval_timeout = settings.claude_approval_timeout;
                Some(Arc::new(claude::ClaudeRuntime::new(config)))
            }
            "codex" => Some(Arc::new(codex::CodexRuntime::new(settings.codex_bin.clone()))),
            "cursor" => Some(Arc::new(cursor::CursorRuntime::new(settings.cursor_bin.clone()))),
            "gemini" => Some(Arc::new(gemini::GeminiRuntime::new(
                settings.gemini_bin.clone(),
                gemini::DEFAULT_INACTIVITY_TIMEOUT,
            ))),
            "opencode" => Some(Arc::new(opencode::OpenCodeRuntime::new(settings.opencode_bin.clone()))),
            "script" => Some(Arc::new(script::ScriptRuntime)),
            _ => None,
        };
        if let Some(runtime) = runtime {
            runtimes.insert(provider.clone(), runtime);
        }
    }
    runtimes
}
