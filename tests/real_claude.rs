//! The REAL Claude Code CLI (npm `@anthropic-ai/claude-code`, pinned in
//! `tests/real-cli/package-lock.json`) run by the real `chatgate` binary, with and without
//! the bubblewrap sandbox: the agent's `env` tool shows no gateway secret (issue 13).
//!
//! The model is `tests/real-cli/model-standin.mjs`, a local stand-in for the Anthropic
//! Messages API: it answers the agent's first request with a `Bash` `env` tool call and the
//! next one with the text `done`. The gateway gets its JWT secret and database URL in its
//! ENVIRONMENT (as an operator's container would), and passes the CLI only what
//! `--provider-env` names.
//!
//! The CLI: `CHATGATE_TEST_CLAUDE_DIR` (the `claude` program, a directory holding it, or a
//! `node_modules` directory holding `.bin/claude`), default
//! `tests/real-cli/node_modules/.bin/claude`. Install it with `npm ci --prefix tests/real-cli`
//! (`scripts/test.sh` does); `CHATGATE_SKIP_REAL_CLIS=1` skips these tests when it is missing.

mod common;

use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{NodeProcess, Ws};
use serde_json::{Value, json};

/// How long one whole run (CLI start, two model round trips, the tool) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The variables the gateway hands to the CLI (`--provider-env`).
const PROVIDER_ENV: &str = "ANTHROPIC_BASE_URL,ANTHROPIC_API_KEY,DISABLE_TELEMETRY,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC,DISABLE_AUTOUPDATER";
/// Names that must never reach an agent.
const FORBIDDEN_NAMES: [&str; 3] = ["CHATGATE_", "DATABASE_URL", "REDIS_URL"];

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Claude CLI to run and the host directory to bind read-only into the sandbox for it
/// (its `node_modules`, or the directory holding it); `None` when skipped.
fn claude_cli() -> Option<(PathBuf, PathBuf)> {
    let configured = std::env::var_os("CHATGATE_TEST_CLAUDE_DIR").map(PathBuf::from);
    let given = configured.clone().unwrap_or_else(|| manifest_dir().join("tests/real-cli/node_modules/.bin/claude"));
    let program = if given.is_dir() {
        [given.join(".bin/claude"), given.join("claude")].into_iter().find(|p| p.is_file()).unwrap_or(given.clone())
    } else {
        given.clone()
    };
    if !program.is_file() {
        if std::env::var("CHATGATE_SKIP_REAL_CLIS").as_deref() == Ok("1") {
            eprintln!("skipped: no Claude Code CLI at {} (CHATGATE_SKIP_REAL_CLIS=1)", program.display());
            return None;
        }
        panic!(
            "the real Claude Code CLI is not installed: no program at {} ({}). Run `npm ci --prefix tests/real-cli` \
             in {} (scripts/test.sh does), point CHATGATE_TEST_CLAUDE_DIR at a claude program, or set \
             CHATGATE_SKIP_REAL_CLIS=1 to skip these tests",
            program.display(),
            if configured.is_some() { "CHATGATE_TEST_CLAUDE_DIR" } else { "the default" },
            manifest_dir().display(),
        );
    }
    let program = std::path::absolute(&program).unwrap();
    // `bin/claude.exe` stays a stub that only prints an error when npm skipped the package's
    // postinstall (which puts the native binary there).
    let version = Command::new(&program).arg("--version").output().unwrap_or_else(|e| {
        panic!("{} does not run ({e}); reinstall with `npm ci --prefix tests/real-cli`", program.display())
    });
    let stdout = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.status.success() && stdout.contains("Claude Code"),
        "{} --version: {} {stdout}{}; reinstall with `npm ci --prefix tests/real-cli` (install scripts allowed)",
        program.display(),
        version.status,
        String::from_utf8_lossy(&version.stderr),
    );
    let ro = program
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| program.parent().unwrap().to_path_buf());
    Some((program, ro))
}

/// The model stand-in (`node tests/real-cli/model-standin.mjs`), killed on drop.
struct ModelStandin {
    child: Child,
    port: u16,
    requests: PathBuf,
    log: PathBuf,
}

impl ModelStandin {
    /// A stand-in whose agent runs the shell `command`.
    fn start(dir: &Path, command: &str) -> ModelStandin {
        let requests = dir.join("standin-requests.jsonl");
        let log = dir.join("standin.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = Command::new("node")
            .arg(manifest_dir().join("tests/real-cli/model-standin.mjs"))
            .arg("0")
            .env("STANDIN_LOG", &requests)
            .env("STANDIN_COMMAND", command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("node (for tests/real-cli/model-standin.mjs) does not run: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("model stand-in did not start: {line:?}"));
        ModelStandin { child, port, requests, log }
    }
}

impl Drop for ModelStandin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `enc(U)` of the containment spec: bytes outside `[A-Za-z0-9-]` as `_xx`.
fn enc(user: &str) -> String {
    user.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { char::from(b).to_string() } else { format!("_{b:02x}") })
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Asserts `text` names no gateway secret.
fn assert_clean(what: &str, text: &str, secret: &str) {
    assert!(!text.contains(secret), "{what} contains the gateway's JWT secret:\n{text}");
    for name in FORBIDDEN_NAMES {
        assert!(!text.contains(name), "{what} contains {name}:\n{text}");
    }
}

/// The `HOME=` line of `env` output.
fn home_of(env_output: &str) -> Option<&str> {
    env_output.lines().find_map(|line| line.strip_prefix("HOME="))
}

/// One run of the real CLI through the real gateway under `--sandbox <sandbox>`, its agent
/// calling `Bash` with `command` (whose output starts with `env`'s).
async fn env_shows_no_gateway_secret(sandbox: &str, command: &str) -> String {
    let Some((claude, claude_ro)) = claude_cli() else { return String::new() };
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let workspaces = root.join("workspaces");
    let homes = root.join("homes");
    std::fs::create_dir_all(&workspaces).unwrap();
    std::fs::create_dir_all(&homes).unwrap();
    let standin = ModelStandin::start(&root, command);

    let secret = format!("jwt-secret-{}", uuid::Uuid::new_v4().simple());
    let canary = format!("canary-{}", uuid::Uuid::new_v4().simple());
    let database_url = format!("sqlite://{}?mode=rwc", root.join("chatgate.db").display());
    let base_url = format!("http://127.0.0.1:{}", standin.port);
    let env: Vec<(String, String)> = [
        ("CHATGATE_JWT_SECRET", secret.as_str()),
        ("DATABASE_URL", database_url.as_str()),
        ("ANTHROPIC_BASE_URL", base_url.as_str()),
        ("ANTHROPIC_API_KEY", "test-key"),
        ("DISABLE_TELEMETRY", "1"),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
        ("DISABLE_AUTOUPDATER", "1"),
        // Not on the allow-list: must not be inherited either.
        ("GATEWAY_ONLY_CANARY", canary.as_str()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    let args: Vec<OsString> = [
        OsString::from("--claude-bin"),
        claude.into(),
        "--provider-env".into(),
        PROVIDER_ENV.into(),
        "--sandbox".into(),
        sandbox.into(),
        "--sandbox-ro-paths".into(),
        claude_ro.into(),
        "--workspace-layout".into(),
        "per-user".into(),
        "--workspaces-root".into(),
        workspaces.clone().into(),
        "--homes-root".into(),
        homes.clone().into(),
        "--allow-bypass-permissions".into(),
    ]
    .into();
    let mut node = NodeProcess::start_env(&args, &env, &root);
    node.wait_ready_or_exit().await;
    let readyz: Value = reqwest::get(format!("{}/readyz", node.base)).await.unwrap().json().await.unwrap();
    assert_eq!(readyz["sandbox"], sandbox, "/readyz: {readyz}");

    let user = format!("real.cli-{}", uuid::Uuid::new_v4().simple());
    let token = chatgate::auth::Auth::new(secret.as_bytes()).mint(&user, Duration::from_secs(3600)).unwrap();
    let http = reqwest::Client::new();
    let body = json!({ "provider": "claude", "projectPath": "proj" });
    let (status, created) =
        common::rest(&http, &node.base, "POST", "/api/providers/sessions", &token, Some(body)).await;
    assert_eq!(status, 201, "{created}");
    let session = created["data"]["sessionId"].as_str().unwrap().to_string();
    assert_eq!(created["data"]["projectPath"], json!(workspaces.join(enc(&user)).join("proj")), "{created}");

    // As root the CLI refuses bypassPermissions (`--dangerously-skip-permissions cannot be used
    // with root/sudo privileges`); inside the sandbox it is uid 1000. Otherwise the run asks, and
    // the test allows.
    let bypass = sandbox == "bwrap" || !nix::unistd::geteuid().is_root();
    let options = if bypass { json!({ "permissionMode": "bypassPermissions" }) } else { json!({}) };
    let mut ws: Ws = node.connect(&token).await;
    ws.send(
        json!({ "type": "chat.send", "sessionId": session, "content": "print the environment", "options": options }),
    )
    .await;
    let deadline = tokio::time::Instant::now() + RUN_TIMEOUT;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = match ws.try_recv(left).await {
            Some(Ok(frame)) => frame,
            other => panic!(
                "no complete within {RUN_TIMEOUT:?} ({other:?}); events so far: {events:#?}\nchatgate log:\n{}\n\
                 model stand-in log:\n{}",
                node.stderr(),
                read(&standin.log),
            ),
        };
        if frame["kind"] == "permission_request" {
            ws.send(json!({ "type": "chat.permission-response", "requestId": frame["requestId"], "allow": true }))
                .await;
        }
        let done = frame["kind"] == "complete" && frame["sessionId"] == session;
        events.push(frame);
        if done {
            break;
        }
    }
    let dump = serde_json::to_string_pretty(&events).unwrap();
    let complete = events.last().unwrap();
    assert_eq!(
        complete["success"],
        true,
        "the run failed: {dump}\nchatgate log:\n{}\nmodel stand-in log:\n{}",
        node.stderr(),
        read(&standin.log)
    );

    let tool_use = events
        .iter()
        .find(|e| e["kind"] == "tool_use" && e["toolName"] == "Bash")
        .unwrap_or_else(|| panic!("no Bash tool_use: {dump}"));
    assert_eq!(tool_use["toolInput"]["command"], command, "{dump}");
    let result = events
        .iter()
        .find(|e| e["kind"] == "tool_result" && e["toolId"] == tool_use["toolId"])
        .unwrap_or_else(|| panic!("no tool_result for the env call: {dump}"));
    assert_eq!(result["isError"], false, "{dump}");
    let output = result["content"].as_str().unwrap_or_default();
    eprintln!("--sandbox {sandbox}: the agent's `{command}`:\n{output}");
    assert!(output.contains("HOME="), "env did not run: {dump}");
    let expected_home = homes.join(enc(&user));
    assert_eq!(home_of(output), Some(expected_home.to_str().unwrap()), "HOME of the agent: {output}");
    assert_clean("the env tool's output", output, &secret);
    // Built from the allow-list, nothing inherited: not the gateway's other variables, nor
    // the ones cargo gave the test (and so the gateway).
    for inherited in [canary.as_str(), "GATEWAY_ONLY_CANARY", "CARGO_"] {
        assert!(!output.contains(inherited), "the agent inherited {inherited}:\n{output}");
    }
    if !bypass {
        assert!(
            events.iter().any(|e| e["kind"] == "permission_resolved" && e["allow"] == true),
            "the env call was not approved through chat.permission-response: {dump}"
        );
    }
    assert!(events.iter().any(|e| e["kind"] == "text" && e["content"] == "done"), "no final text: {dump}");
    assert_clean("the streamed events", &dump, &secret);

    // The stored history (written off the hot path: wait for its complete).
    let path = format!("/api/providers/sessions/{session}/messages?kinds=all");
    let history_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let messages = loop {
        let (status, body) = common::rest(&http, &node.base, "GET", &path, &token, None).await;
        assert_eq!(status, 200, "{body}");
        let messages = body["data"]["messages"].as_array().cloned().unwrap_or_default();
        if messages.last().is_some_and(|m| m["kind"] == "complete") {
            break messages;
        }
        assert!(tokio::time::Instant::now() < history_deadline, "history never got the complete: {messages:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stored = messages
        .iter()
        .find(|m| m["kind"] == "tool_result" && m["toolId"] == tool_use["toolId"])
        .unwrap_or_else(|| panic!("no stored tool_result: {messages:#?}"));
    let stored_output = stored["content"].as_str().unwrap_or_default();
    assert!(stored_output.contains("HOME="), "stored tool_result: {stored}");
    assert_eq!(home_of(stored_output), Some(expected_home.to_str().unwrap()));
    assert_clean("the stored history", &serde_json::to_string_pretty(&messages).unwrap(), &secret);

    // What the model was sent (the tool result goes back to it) carries no secret either.
    let sent = read(&standin.requests);
    assert!(sent.contains("HOME="), "the model never got the env output:\n{sent}");
    assert_clean("the requests to the model", &sent, &secret);
    output.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_env_shows_no_gateway_secret_under_bwrap() {
    env_shows_no_gateway_secret("bwrap", "env").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_env_shows_no_gateway_secret_without_sandbox() {
    env_shows_no_gateway_secret("none", "env").await;
}

/// Under bwrap the agent sees only its own processes (a new PID namespace and `/proc`), so no
/// `/proc/<pid>/environ` it can read holds the gateway's secrets. (Without a sandbox a root
/// agent with CAP_SYS_PTRACE can read the gateway's, non-dumpable or not: not tested here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_agent_reads_no_gateway_environ_under_bwrap() {
    let probe = r#"env; for f in /proc/[0-9]*/environ; do echo "== $f"; tr '\0' '\n' < "$f"; done 2>&1"#;
    let output = env_shows_no_gateway_secret("bwrap", probe).await;
    if !output.is_empty() {
        assert!(output.contains("== /proc/1/environ\n"), "the probe read no process environment:\n{output}");
    }
}
