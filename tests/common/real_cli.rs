//! Support of the tests that run REAL provider CLIs (tests/real_claude.rs, tests/real_codex.rs):
//! finding the CLI installed by `npm install --prefix tests/real-cli`, the model stand-in
//! (`tests/real-cli/model-standin.mjs`), the real gateway binary with a per-test root, and
//! turns driven over its WebSocket. Included with `#[path]` by those tests only.
#![allow(dead_code)]

use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::common::{NodeProcess, Ws, rest};

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A real CLI: the program to run and the host directory to bind read-only into the
/// sandbox for it (its `node_modules`, or the directory holding it).
pub struct RealCli {
    pub program: PathBuf,
    pub ro: PathBuf,
    pub version: String,
}

/// The `node_modules` the real CLIs are installed in: `$CHATGATE_REAL_CLI_MODULES` (set by
/// scripts/test.sh to its per-machine cache), else `tests/real-cli/node_modules` (after
/// `npm install --prefix tests/real-cli`).
pub fn modules_dir() -> PathBuf {
    std::env::var_os("CHATGATE_REAL_CLI_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("tests/real-cli/node_modules"))
}

/// Finds the real CLI `bin` (`claude`, `codex`, `gemini`, `opencode`): `$<env_var>` (the
/// program, a directory holding it, or a `node_modules` directory holding `.bin/<bin>`),
/// default `.bin/<bin>` in [`modules_dir`]. `None` when it is missing and
/// `CHATGATE_SKIP_REAL_CLIS=1`; a clear panic when it is missing otherwise, or when its
/// `--version` does not contain `version_marker`.
pub fn find_cli(bin: &str, env_var: &str, what: &str, version_marker: &str) -> Option<RealCli> {
    let configured = std::env::var_os(env_var).map(PathBuf::from);
    let given = configured.clone().unwrap_or_else(|| modules_dir().join(".bin").join(bin));
    let program = if given.is_dir() {
        [given.join(".bin").join(bin), given.join(bin)].into_iter().find(|p| p.is_file()).unwrap_or(given.clone())
    } else {
        given.clone()
    };
    if !program.is_file() {
        if std::env::var("CHATGATE_SKIP_REAL_CLIS").as_deref() == Ok("1") {
            eprintln!("skipped: no {what} at {} (CHATGATE_SKIP_REAL_CLIS=1)", program.display());
            return None;
        }
        panic!(
            "the real {what} is not installed: no program at {} ({}). Run `npm install --prefix tests/real-cli` in {} \
             (scripts/test.sh does), point {env_var} at a {bin} program, or set CHATGATE_SKIP_REAL_CLIS=1 to skip \
             these tests",
            program.display(),
            if configured.is_some() { env_var } else { "the default" },
            manifest_dir().display(),
        );
    }
    let program = std::path::absolute(&program).unwrap();
    let output = Command::new(&program).arg("--version").output().unwrap_or_else(|e| {
        panic!("{} does not run ({e}); reinstall with `npm install --prefix tests/real-cli`", program.display())
    });
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success() && version.contains(version_marker),
        "{} --version: {} {version}{}; reinstall with `npm install --prefix tests/real-cli` (install scripts allowed)",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr),
    );
    let ro = program
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| program.parent().unwrap().to_path_buf());
    Some(RealCli { program, ro, version })
}

/// The model stand-in (`node tests/real-cli/model-standin.mjs`), killed on drop.
pub struct ModelStandin {
    child: Child,
    pub port: u16,
    pub requests: PathBuf,
    pub log: PathBuf,
}

impl ModelStandin {
    /// A stand-in whose agent runs the shell `command`.
    pub fn start(dir: &Path, command: &str) -> ModelStandin {
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

    /// Every request received so far (one JSON object each: method, url, headers, body).
    pub fn received(&self) -> Vec<Value> {
        read(&self.requests).lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }
}

impl Drop for ModelStandin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `enc(U)` of the containment spec: bytes outside `[A-Za-z0-9-]` as `_xx`.
pub fn enc(user: &str) -> String {
    user.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { char::from(b).to_string() } else { format!("_{b:02x}") })
        .collect()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// How a gateway runs a real CLI ([`Gateway::for_cli`]).
pub struct CliSetup<'a> {
    /// The gateway's flag naming the program (`--codex-bin`).
    pub bin_flag: &'a str,
    pub program: &'a Path,
    /// Bound read-only into the sandbox (the CLI's `node_modules`).
    pub ro: &'a Path,
    /// `--provider-env`: the variables the gateway hands the CLI.
    pub provider_env: &'a str,
    /// `--sandbox`.
    pub sandbox: &'a str,
    /// Two nodes sharing Redis and PostgreSQL instead of one on SQLite.
    pub cluster: bool,
}

/// A real gateway for one test (one node, or two in a cluster): its root directory (workspaces, homes, database, logs),
/// one user and that user's token.
pub struct Gateway {
    pub node: NodeProcess,
    /// The second node, in a cluster (`CliSetup::cluster`).
    pub peer: Option<NodeProcess>,
    pub root: PathBuf,
    pub workspaces: PathBuf,
    pub homes: PathBuf,
    pub secret: String,
    pub user: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Gateway {
    /// Starts `chatgate serve` with the per-user layout under `root`, the gateway's secret and
    /// database URL in its environment, `env` added to it and `args` after its own flags; with
    /// `cluster`, two nodes (`node` and `peer`) sharing the test Redis and PostgreSQL, the
    /// workspaces and the provider homes.
    async fn launch(root: &Path, args: Vec<OsString>, env: &[(&str, &str)], cluster: bool) -> Gateway {
        let workspaces = root.join("workspaces");
        let homes = root.join("homes");
        std::fs::create_dir_all(&workspaces).unwrap();
        std::fs::create_dir_all(&homes).unwrap();
        let secret = format!("jwt-secret-{}", uuid::Uuid::new_v4().simple());
        let database_url = match cluster {
            true => crate::common::pg_url(),
            false => format!("sqlite://{}?mode=rwc", root.join("chatgate.db").display()),
        };
        let mut all_env =
            vec![("CHATGATE_JWT_SECRET".to_string(), secret.clone()), ("DATABASE_URL".to_string(), database_url)];
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let node_args = |node_id: &str| {
            let mut all: Vec<OsString> = vec![
                "--workspace-layout".into(),
                "per-user".into(),
                "--workspaces-root".into(),
                workspaces.clone().into(),
                "--homes-root".into(),
                homes.clone().into(),
            ];
            if cluster {
                let id = format!("{node_id}-{}", uuid::Uuid::new_v4().simple());
                all.extend(["--redis-url".into(), crate::common::redis_url().into(), "--node-id".into(), id.into()]);
            }
            all.extend(args.iter().cloned());
            all
        };
        let node = crate::common::spawn_node_env(&node_args("a"), &all_env, root);
        node.wait_ready().await.expect("node ready");
        let peer = match cluster {
            true => {
                let peer = crate::common::spawn_node_env(&node_args("b"), &all_env, root);
                peer.wait_ready().await.expect("peer ready");
                Some(peer)
            }
            false => None,
        };
        let user = format!("real.cli-{}", uuid::Uuid::new_v4().simple());
        let token = chatgate::auth::Auth::new(secret.as_bytes()).mint(&user, Duration::from_secs(3600)).unwrap();
        Gateway {
            node,
            peer,
            root: root.to_path_buf(),
            workspaces,
            homes,
            secret,
            user,
            token,
            http: reqwest::Client::new(),
        }
    }

    /// A gateway (one node, or a two-node cluster) that runs one real CLI: `setup` says how.
    pub async fn for_cli(root: &Path, setup: CliSetup<'_>, env: &[(&str, &str)]) -> Gateway {
        let args: Vec<OsString> = vec![
            setup.bin_flag.into(),
            setup.program.into(),
            "--provider-env".into(),
            setup.provider_env.into(),
            "--sandbox".into(),
            setup.sandbox.into(),
            "--sandbox-ro-paths".into(),
            setup.ro.into(),
            "--allow-bypass-permissions".into(),
        ];
        Gateway::launch(root, args, env, setup.cluster).await
    }

    /// The second node of a cluster (panics on a single node).
    pub fn peer(&self) -> &NodeProcess {
        self.peer.as_ref().expect("a cluster gateway (CliSetup::cluster)")
    }

    /// Both nodes' logs (one when single).
    pub fn logs(&self) -> String {
        match &self.peer {
            Some(peer) => format!("node a:\n{}\nnode b:\n{}", self.node.stderr(), peer.stderr()),
            None => self.node.stderr(),
        }
    }

    /// The user's provider home (the CLI's `HOME`).
    pub fn home(&self) -> PathBuf {
        self.homes.join(enc(&self.user))
    }

    /// Creates a session of `provider` on project `proj`; returns its id.
    pub async fn create_session(&self, provider: &str) -> String {
        let body = json!({ "provider": provider, "projectPath": "proj" });
        let (status, created) =
            rest(&self.http, &self.node.base, "POST", "/api/providers/sessions", &self.token, Some(body)).await;
        assert_eq!(status, 201, "{created}");
        created["data"]["sessionId"].as_str().unwrap().to_string()
    }

    pub async fn connect(&self) -> Ws {
        self.node.connect(&self.token).await
    }

    /// The session's stored history, once it holds `completes` complete events.
    pub async fn history(&self, session: &str, completes: usize) -> Vec<Value> {
        // The full record (`kinds=all`): the runs' `complete` rows too.
        let path = format!("/api/providers/sessions/{session}/messages?kinds=all");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = rest(&self.http, &self.node.base, "GET", &path, &self.token, None).await;
            assert_eq!(status, 200, "{body}");
            let messages = body["data"]["messages"].as_array().cloned().unwrap_or_default();
            if messages.iter().filter(|m| m["kind"] == "complete").count() >= completes {
                return messages;
            }
            assert!(tokio::time::Instant::now() < deadline, "history never got {completes} completes: {messages:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How one turn's tool approvals are answered.
#[derive(Clone, Copy, PartialEq)]
pub enum Approvals {
    Allow,
    Deny,
}

/// How long one turn (CLI start, model round trips, tools) may take.
pub const TURN_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends `content` and collects the session's events up to its `complete` (answering
/// approvals as told), panicking with the logs after [`TURN_TIMEOUT`].
pub async fn turn(
    gateway: &Gateway,
    standin: &ModelStandin,
    ws: &mut Ws,
    session: &str,
    content: &str,
    options: Value,
    approvals: Approvals,
) -> Vec<Value> {
    ws.send(json!({ "type": "chat.send", "sessionId": session, "content": content, "options": options })).await;
    collect(gateway, standin, ws, session, approvals).await
}

/// Collects the session's events up to its `complete`, answering approvals as told.
pub async fn collect(
    gateway: &Gateway,
    standin: &ModelStandin,
    ws: &mut Ws,
    session: &str,
    approvals: Approvals,
) -> Vec<Value> {
    let allow = approvals == Approvals::Allow;
    collect_answering(gateway, standin, ws, session, |_| Some(json!({ "allow": allow }))).await
}

/// Collects the session's events up to its `complete`, answering each `permission_request`
/// with the fields `answer` gives for it (`allow`, `updatedInput`, `message`…; `None`: left
/// unanswered), panicking with the logs after [`TURN_TIMEOUT`].
pub async fn collect_answering(
    gateway: &Gateway,
    standin: &ModelStandin,
    ws: &mut Ws,
    session: &str,
    mut answer: impl FnMut(&Value) -> Option<Value>,
) -> Vec<Value> {
    let timeout = TURN_TIMEOUT;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = match ws.try_recv(left).await {
            Some(Ok(frame)) => frame,
            other => panic!(
                "no complete within {timeout:?} ({other:?}); events so far: {events:#?}\nchatgate log:\n{}\n\
                 model stand-in log:\n{}",
                gateway.logs(),
                read(&standin.log),
            ),
        };
        if frame["kind"] == "permission_request"
            && let Some(Value::Object(fields)) = answer(&frame)
        {
            let mut response = json!({ "type": "chat.permission-response", "requestId": frame["requestId"] });
            response.as_object_mut().unwrap().extend(fields);
            ws.send(response).await;
        }
        let done = frame["kind"] == "complete" && frame["sessionId"] == session;
        if frame["sessionId"] == session || frame["kind"] == "permission_request" {
            events.push(frame);
        }
        if done {
            return events;
        }
    }
}

/// The `content` of every `error` event.
pub fn errors(events: &[Value]) -> Vec<String> {
    of(events, "error").iter().map(|e| e["content"].as_str().unwrap_or_default().to_string()).collect()
}

/// The assistant's replies: stored `text {role: assistant}` rows, or live `stream_delta` runs
/// (each closed by a `stream_end` or any other event).
pub fn assistant_texts(events: &[Value]) -> Vec<String> {
    let mut replies = Vec::new();
    let mut streamed = String::new();
    for event in events {
        let content = event["content"].as_str().unwrap_or_default();
        if event["kind"] == "stream_delta" {
            streamed.push_str(content);
            continue;
        }
        if !streamed.is_empty() {
            replies.push(std::mem::take(&mut streamed));
        }
        if event["kind"] == "text" && event["role"] == "assistant" {
            replies.push(content.to_string());
        }
    }
    replies.extend((!streamed.is_empty()).then_some(streamed));
    replies
}

/// The events of `kind`.
pub fn of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Processes whose working directory is under `dir` (a CLI or anything it started).
pub fn processes_in(dir: &Path) -> Vec<(i32, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if let Ok(cwd) = std::fs::read_link(entry.path().join("cwd"))
            && cwd.starts_with(dir)
        {
            let zombie =
                read(&entry.path().join("stat")).rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
            if !zombie {
                found.push((pid, cwd));
            }
        }
    }
    found
}

/// Waits up to 5 s until no process works under `dir`.
pub async fn assert_no_process_in(dir: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_in(dir);
        if left.is_empty() {
            return;
        }
        let cmdlines: Vec<String> =
            left.iter().map(|(pid, _)| read(Path::new(&format!("/proc/{pid}/cmdline"))).replace('\0', " ")).collect();
        assert!(tokio::time::Instant::now() < deadline, "processes left after the run: {left:?} {cmdlines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the stand-in got a request whose body contains `needle` (up to `wait`).
pub async fn wait_for_request(standin: &ModelStandin, needle: &str, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while !read(&standin.requests).contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the model stand-in never got a request with {needle:?}; its log:\n{}",
            read(&standin.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The processes under `dir` whose parent is `pid` (a CLI that node started).
pub fn children_in(dir: &Path, pid: u32) -> Vec<i32> {
    processes_in(dir)
        .into_iter()
        .filter(|(child, _)| {
            let stat = read(Path::new(&format!("/proc/{child}/stat")));
            let ppid = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)).unwrap_or_default();
            ppid == pid.to_string()
        })
        .map(|(child, _)| child)
        .collect()
}

/// What every real CLI does in a two-node cluster ([`CliSetup::cluster`], no sandbox):
/// 1. a turn sent on node a runs there while a tab on node b watches it (and answers its
///    approvals with `approvals`): both tabs see the same events, an approval answered on b
///    reaches a's tab as `permission_resolved`;
/// 2. a turn sent on node a, running there (its CLI is node a's child), is aborted from node b:
///    nothing is left running;
/// 3. a turn sent on node b runs there and resumes what node a's CLI saved: the model's
///    request (`last_request()`, the newest agent request's text) holds the earlier turns.
pub async fn cluster_scenario(
    gateway: &Gateway,
    standin: &ModelStandin,
    session: &str,
    options: Value,
    approvals: Approvals,
    last_request: impl Fn() -> String,
) {
    let mut tab_a = gateway.connect().await;
    let mut tab_b = gateway.peer().connect(&gateway.token).await;
    tab_b.subscribe(session, 0).await;
    assert_eq!(tab_b.recv_reply().await["kind"], "chat_subscribed");
    let dump = |events: &[Value]| dump(gateway, standin, events);
    let send =
        |content: &str| json!({ "type": "chat.send", "sessionId": session, "content": content, "options": options });

    // 1. Sent on node a, watched (and approved) on node b.
    tab_a.send(send("run the probe")).await;
    let on_b = collect(gateway, standin, &mut tab_b, session, approvals).await;
    let on_a = collect_answering(gateway, standin, &mut tab_a, session, |_| None).await;
    assert_eq!(on_b.last().unwrap()["success"], true, "{}", dump(&on_b));
    assert!(serde_json::to_string(&on_b).unwrap().contains("chatgate-probe-42"), "no probe output: {}", dump(&on_b));
    assert_eq!(errors(&on_b), Vec::<String>::new(), "{}", dump(&on_b));
    for ask in of(&on_b, "permission_request") {
        let resolved = of(&on_a, "permission_resolved").into_iter().find(|e| e["requestId"] == ask["requestId"]);
        assert!(resolved.is_some(), "node a's tab never saw the answer given on node b: {}", dump(&on_a));
    }
    // The run's events come in seq order on both nodes; the user's notices (`session_upserted`,
    // no seq) travel on the user's channel, unordered against the session's stream across nodes.
    let ids = |events: &[Value], sequenced: bool| {
        let mut ids = events
            .iter()
            .filter(|e| e["sessionId"] == session && e["seq"].is_u64() == sequenced)
            .map(|e| (e["seq"].clone(), e["id"].clone()))
            .collect::<Vec<_>>();
        if !sequenced {
            ids.sort_by_key(|(_, id)| id.to_string());
        }
        ids
    };
    assert_eq!(ids(&on_a, true), ids(&on_b, true), "the two nodes' tabs saw different events");
    assert_eq!(ids(&on_a, false), ids(&on_b, false), "the two nodes' tabs saw different notices");

    // 2. Sent on node a, running there, aborted from node b.
    let root = &gateway.root;
    tab_a.send(send("hang")).await;
    wait_for_request(standin, "\"hang\"", TURN_TIMEOUT).await;
    let node_a = gateway.node.pid().expect("gateway runs");
    let started = tokio::time::Instant::now();
    while children_in(root, node_a).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5), "the CLI is not node a's child: {:?}", processes_in(root));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tab_b.send(json!({ "type": "chat.abort", "sessionId": session })).await;
    let aborted = collect_answering(gateway, standin, &mut tab_b, session, |_| None).await;
    assert_eq!(aborted.last().unwrap()["aborted"], true, "{}", dump(&aborted));
    collect_answering(gateway, standin, &mut tab_a, session, |_| None).await;
    assert_no_process_in(root).await;

    // 3. Sent on node b: it runs there and resumes what node a's CLI saved.
    tab_b.send(send("say second answer")).await;
    let third = collect(gateway, standin, &mut tab_b, session, approvals).await;
    assert_eq!(third.last().unwrap()["success"], true, "{}", dump(&third));
    assert_eq!(assistant_texts(&third), vec!["second answer"], "{}", dump(&third));
    let resumed = last_request();
    for earlier in ["run the probe", "say second answer"] {
        assert!(resumed.contains(earlier), "the resumed request lacks {earlier:?}: {resumed}");
    }
    let history = gateway.history(session, 3).await;
    assert_eq!(assistant_texts(&history).last().map(String::as_str), Some("second answer"), "{}", dump(&history));
}

/// The events, the gateway's logs and the stand-in's, for an assertion's message.
pub fn dump(gateway: &Gateway, standin: &ModelStandin, events: &[Value]) -> String {
    format!(
        "{}\nchatgate log:\n{}\nstand-in log:\n{}",
        serde_json::to_string_pretty(events).unwrap_or_default(),
        gateway.logs(),
        read(&standin.log)
    )
}

/// A turn whose model answers HTTP 400: the run fails, the API error shows once as `expected`,
/// and never as an assistant reply. Returns the turn's events.
pub async fn api_error_turn(
    gateway: &Gateway,
    standin: &ModelStandin,
    ws: &mut Ws,
    session: &str,
    options: Value,
    approvals: Approvals,
    expected: &str,
) -> Vec<Value> {
    let events = turn(gateway, standin, ws, session, "fail with http 400", options, approvals).await;
    let dump = || dump(gateway, standin, &events);
    assert_eq!(events.last().unwrap()["success"], false, "{}", dump());
    assert_eq!(errors(&events), vec![expected], "the API error once: {}", dump());
    assert_eq!(assistant_texts(&events), Vec::<String>::new(), "no assistant reply: {}", dump());
    events
}

/// A turn aborted while the model thinks (`hang`): the CLI is seen running in the gateway's
/// root, the run ends aborted, and no process is left. Returns the turn's events.
pub async fn abort_while_thinking(
    gateway: &Gateway,
    standin: &ModelStandin,
    ws: &mut Ws,
    session: &str,
    options: Value,
    approvals: Approvals,
) -> Vec<Value> {
    ws.send(json!({ "type": "chat.send", "sessionId": session, "content": "hang", "options": options })).await;
    wait_for_request(standin, "\"hang\"", TURN_TIMEOUT).await;
    assert!(!processes_in(&gateway.root).is_empty(), "the CLI is not seen running in its project");
    ws.send(json!({ "type": "chat.abort", "sessionId": session })).await;
    let events = collect(gateway, standin, ws, session, approvals).await;
    assert_eq!(events.last().unwrap()["aborted"], true, "{}", dump(gateway, standin, &events));
    assert_no_process_in(&gateway.root).await;
    events
}
