//! Draining proven through the load balancer (issue 5, item 5): the local stack of
//! `deploy/local` (three nodes of the debug binary behind nginx, round robin, no stickiness)
//! on the shared Redis and PostgreSQL, in its own state directory and on free ports.
//!
//! Twelve clients, each with its own session, connect through nginx (so their runs land on
//! every node) and keep paced `script` runs going. One node gets SIGTERM
//! (`restart-node.sh`), then all three restart one after the other. Checked for every client
//! and run: a socket is only ever closed with 1012, the client reconnects through nginx,
//! re-subscribes with its last seq and sees every seq of its session exactly once, in order;
//! each run ends with exactly one `complete` — a normal one or the drain's
//! `{exitCode: 1, aborted: true, error: "node draining"}`; no run starts on a node while it
//! drains (`GET /api/providers/sessions/running` gives each run's node and start time); the
//! history in PostgreSQL holds every run's `complete`. A run that ends while its client is
//! reconnecting is not replayed (protocol: a subscribe to an idle session gets only the ack);
//! that client reads the missing events from history over REST, as a real client would, and
//! the summary line counts how often that happened.
//!
//! A second test fires `chat.send`s at one node at the moment it gets SIGTERM: every run that
//! starts must still end with a `complete` from that node and every socket must get 1012.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use common::Ws;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// One stack at a time: the machine has two cores, and the timings assume them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CLIENTS: usize = 12;
const NODES: usize = 3;
/// `--drain-grace` of every node (a long run outlives it).
const GRACE: Duration = Duration::from_secs(5);
/// A run grace longer than every run (issue 19: runs outlive a rollout).
const LONG_GRACE: Duration = Duration::from_secs(20);
/// Pause before each `stream_delta` of a run.
const INTERVAL_MS: u64 = 20;
/// Run lengths in events (× `INTERVAL_MS`): a short run fits in the drain grace, a long one
/// does not.
const SHORT: u64 = 100;
const FIRST_SHORT: u64 = 150;
const LONG: u64 = 400;
const FIRST_LONG: u64 = 500;
/// How long a client waits for its next frame before it counts as a stall.
const FRAME_WAIT: Duration = Duration::from_secs(15);
/// A `chat.send` the node was already handling when its drain began may still start its run
/// (which then gets the grace); a run that starts later than this after the drain is visible
/// is a new run on a draining node.
const IN_FLIGHT: Duration = Duration::from_millis(250);
/// How long a client keeps trying to reconnect through nginx.
const RECONNECT_FOR: Duration = Duration::from_secs(20);

/// Events of client `client`'s run number `run`: the first runs alternate short and long by
/// groups of three sockets (round robin puts both kinds on every node); later runs are mostly
/// short, every third one long, so drains meet runs of both kinds.
fn planned_events(client: usize, run: usize) -> u64 {
    match run {
        0 if (client / NODES).is_multiple_of(2) => FIRST_SHORT,
        0 => FIRST_LONG,
        _ if (client + run).is_multiple_of(3) => LONG,
        _ => SHORT,
    }
}

fn node_id(index: usize) -> String {
    format!("local-{index}")
}

// --- the local stack ----------------------------------------------------------------------

/// The nodes and nginx of `deploy/local/up.sh`, stopped (`down.sh`) on drop.
struct Stack {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    lb_port: u16,
    node_ports: Vec<u16>,
    secret: String,
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local")
}

fn nginx_installed() -> bool {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("nginx").is_file()));
    on_path || Path::new("/usr/sbin/nginx").is_file()
}

impl Stack {
    /// Starts the stack; `extra` settings reach every node.
    async fn up(extra: &[(&str, &str)]) -> Stack {
        let uid = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout).unwrap_or_default();
        let root_user = String::from_utf8_lossy(&uid).trim() == "0";
        assert!(
            nginx_installed() || root_user,
            "the drain test needs nginx as the load balancer: it is not installed and this user \
             cannot install it (as root: apt-get install nginx)"
        );
        let dir = tempfile::tempdir().unwrap();
        // nginx's workers run as another user when the master is root: let them traverse it.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let workspaces = dir.path().join("workspaces");
        std::fs::create_dir_all(workspaces.join("proj")).unwrap();
        let lb_port = chatgate_testkit::ports::free_ports(NODES as u16 + 1).unwrap()[0];
        let mut env = vec![
            ("CHATGATE_BIN".to_string(), env!("CARGO_BIN_EXE_chatgate").to_string()),
            ("CHATGATE_LOCAL_STATE".to_string(), dir.path().join("state").display().to_string()),
            ("CHATGATE_LB_PORT".to_string(), lb_port.to_string()),
            ("CHATGATE_LOCAL_BASE_PORT".to_string(), (lb_port + 1).to_string()),
            ("CHATGATE_LB_WORKER_CONNECTIONS".to_string(), "1024".to_string()),
            ("REDIS_URL".to_string(), common::redis_url()),
            ("DATABASE_URL".to_string(), common::pg_url()),
            ("CHATGATE_PROVIDERS".to_string(), "script".to_string()),
            ("CHATGATE_WORKSPACES_ROOT".to_string(), workspaces.display().to_string()),
            ("CHATGATE_DRAIN_GRACE".to_string(), format!("{}s", GRACE.as_secs())),
            // One user drives every client and racer: far above the default --max-sends-per-minute.
            ("CHATGATE_MAX_SENDS_PER_MINUTE".to_string(), "1000000".to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut stack = Stack { dir, env, lb_port, node_ports: Vec::new(), secret: String::new() };
        let out = stack.run("up.sh", &[&NODES.to_string()]).await;
        assert!(
            out.status.success(),
            "deploy/local/up.sh {NODES} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let state = stack.state();
        stack.node_ports = (1..=NODES)
            .map(|i| std::fs::read_to_string(state.join(format!("node-{i}.port"))).unwrap().trim().parse().unwrap())
            .collect();
        stack.secret = std::fs::read_to_string(state.join("jwt-secret")).unwrap().trim().to_string();
        stack
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn lb_http(&self) -> String {
        format!("http://127.0.0.1:{}", self.lb_port)
    }

    fn lb_ws(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.lb_port)
    }

    /// A `deploy/local` script with the stack's environment only (no inherited CHATGATE_*).
    fn command(&self, script: &str, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(scripts_dir().join(script));
        command.args(args).stdin(std::process::Stdio::null());
        for (name, _) in std::env::vars() {
            if name.starts_with("CHATGATE_") || name == "REDIS_URL" || name == "DATABASE_URL" {
                command.env_remove(name);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    async fn run(&self, script: &str, args: &[&str]) -> std::process::Output {
        tokio::process::Command::from(self.command(script, args)).output().await.unwrap()
    }

    fn token(&self, user: &str) -> String {
        chatgate::auth::Auth::new(self.secret.as_bytes()).mint(user, Duration::from_secs(3600)).unwrap()
    }

    /// The last lines of every log of the stack, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<String> = (1..=NODES).map(|i| format!("node-{i}.log")).collect();
        names.push("nginx-error.log".to_string());
        for name in names {
            let text = std::fs::read_to_string(self.state().join(&name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {name} (last lines)\n"));
            for line in &lines[lines.len().saturating_sub(25)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = self.command("down.sh", &["--purge"]).output();
    }
}

// --- what the clients saw -------------------------------------------------------------------

struct RunLog {
    planned: u64,
    run_id: String,
    seqs: Vec<u64>,
    /// The run's streamed text: its deltas, or its merged history text when it ended unseen.
    text: String,
    complete: Value,
    completed_at: SystemTime,
}

struct CloseLog {
    at: SystemTime,
    code: Option<u16>,
    /// From the close to the `chat_subscribed` ack on the new socket.
    resumed_in: Duration,
    /// Connection attempts through nginx that failed before one worked.
    failed_attempts: Vec<String>,
}

struct ClientLog {
    index: usize,
    session: String,
    /// Every seq of the session this client received, in order, across sockets and runs.
    seqs: Vec<u64>,
    runs: Vec<RunLog>,
    closes: Vec<CloseLog>,
    /// `BACKEND_UNAVAILABLE` answers (nothing was started or subscribed; the client retried).
    unavailable: usize,
    /// Seqs of runs that ended while the client was reconnecting, read back from history.
    from_history: u64,
    problems: Vec<String>,
}

impl ClientLog {
    fn problem(&mut self, text: String) {
        self.problems.push(format!("client {} (session {}): {text}", self.index, self.session));
    }

    fn last_seq(&self) -> u64 {
        self.seqs.last().copied().unwrap_or(0)
    }
}

/// How a client reaches the cluster: nginx, for the socket and for REST.
struct Lb {
    ws_url: String,
    http_url: String,
    token: String,
    http: reqwest::Client,
}

/// Sends a frame; false when the socket is already gone (its close is read next).
async fn send(ws: &mut Ws, value: Value) -> bool {
    ws.stream.send(Message::Text(value.to_string().into())).await.is_ok()
}

/// Connects through nginx, retrying with a small backoff; also the failed attempts' errors.
async fn connect(url: &str) -> Result<(Ws, Vec<String>), String> {
    let deadline = Instant::now() + RECONNECT_FOR;
    let mut delay = Duration::from_millis(25);
    let mut errors = Vec::new();
    loop {
        let error = match tokio::time::timeout(Duration::from_secs(5), Ws::try_connect(url, &[])).await {
            Ok(Ok(ws)) => return Ok((ws, errors)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "handshake timed out".to_string(),
        };
        errors.push(error);
        if Instant::now() > deadline {
            return Err(format!("no connection through nginx after {} attempts: {errors:?}", errors.len()));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// What a client does after its socket closed: reconnect, re-subscribe with its last seq.
enum Resumed {
    /// The run goes on (its events after our last seq are replayed, then live).
    Following,
    /// The session is idle at our last seq: the `chat.send` started nothing; send it again.
    SendAgain,
    /// The run ended while the client was away, at seq `top`: as the protocol says, events of a
    /// run that is over are not replayed; the client reads them from history over REST.
    EndedAway { top: u64 },
}

/// One client: its own session, runs until `stop`, following each to its `complete` across
/// closes and reconnects.
async fn client(index: usize, lb: Arc<Lb>, session: String, stop: Arc<AtomicBool>) -> ClientLog {
    let mut log = ClientLog {
        index,
        session: session.clone(),
        seqs: Vec::new(),
        runs: Vec::new(),
        closes: Vec::new(),
        unavailable: 0,
        from_history: 0,
        problems: Vec::new(),
    };
    let mut ws = match connect(&lb.ws_url).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            log.problem(e);
            return log;
        }
    };
    let mut run = 0;
    while run == 0 || !stop.load(Ordering::SeqCst) {
        match follow_run(ws, &lb, &mut log, planned_events(index, run)).await {
            Some(next) => ws = next,
            None => return log,
        }
        run += 1;
    }
    // Exactly one `complete` per run: nothing more arrives for the session.
    match ws.try_recv(Duration::from_millis(500)).await {
        None => {}
        Some(Ok(frame)) if frame["sessionId"] != session.as_str() || frame.get("seq").is_none() => {}
        Some(Ok(frame)) => log.problem(format!("a frame after the last run's complete: {frame}")),
        Some(Err(code)) => log.problem(format!("socket closed ({code:?}) after the last run")),
    }
    log
}

/// Sends one run and follows it to its `complete` across closes; returns the socket in use
/// then (None after a failure that ends the client).
async fn follow_run(mut ws: Ws, lb: &Lb, log: &mut ClientLog, events: u64) -> Option<Ws> {
    let session = log.session.clone();
    let content = json!({ "events": events, "intervalMs": INTERVAL_MS }).to_string();
    let chat_send = json!({ "type": "chat.send", "sessionId": session, "content": content });
    let mut run_id: Option<String> = None;
    let mut seqs = Vec::new();
    let mut deltas = Vec::new();
    send(&mut ws, chat_send.clone()).await;
    // After a BACKEND_UNAVAILABLE: when to send again if the socket is not closed meanwhile.
    let mut send_again_at: Option<Instant> = None;
    loop {
        let wait = send_again_at.map_or(FRAME_WAIT, |at| at.saturating_duration_since(Instant::now()));
        let frame = match ws.try_recv(wait).await {
            None if send_again_at.is_some() => {
                send_again_at = None;
                send(&mut ws, chat_send.clone()).await;
                continue;
            }
            None => {
                log.problem(format!("no frame for {FRAME_WAIT:?} while following a run (last seq {})", log.last_seq()));
                return None;
            }
            Some(Err(code)) => {
                send_again_at = None;
                let closed_at = SystemTime::now();
                let started = Instant::now();
                let last = log.last_seq();
                let resumed = resume(&lb.ws_url, log).await;
                let (mut fresh, resumed, failed_attempts) = match resumed {
                    Some(resumed) => resumed,
                    None => {
                        log.closes.push(CloseLog {
                            at: closed_at,
                            code,
                            resumed_in: started.elapsed(),
                            failed_attempts: Vec::new(),
                        });
                        return None;
                    }
                };
                log.closes.push(CloseLog { at: closed_at, code, resumed_in: started.elapsed(), failed_attempts });
                match resumed {
                    Resumed::Following => {}
                    Resumed::SendAgain if run_id.is_none() => {
                        send(&mut fresh, chat_send.clone()).await;
                    }
                    Resumed::SendAgain => {
                        log.problem(format!("run {run_id:?} is over at seq {last} but its complete never arrived"));
                        return None;
                    }
                    Resumed::EndedAway { top } => {
                        let (complete, text) = read_back(lb, log, last, top).await?;
                        let recovered: Vec<u64> = (last + 1..=top).collect();
                        log.from_history += recovered.len() as u64;
                        log.seqs.extend(&recovered);
                        seqs.extend(&recovered);
                        let complete_run = complete["runId"].as_str().unwrap_or_default().to_string();
                        if run_id.as_ref().is_some_and(|id| *id != complete_run) {
                            log.problem(format!(
                                "history's complete at {top} is of run {complete_run}, not {run_id:?}"
                            ));
                        }
                        let text = text.unwrap_or_else(|| deltas.concat());
                        log.runs.push(RunLog {
                            planned: events,
                            run_id: complete_run,
                            seqs,
                            text,
                            complete,
                            completed_at: SystemTime::now(),
                        });
                        return Some(fresh);
                    }
                }
                ws = fresh;
                continue;
            }
            Some(Ok(frame)) => frame,
        };
        let kind = frame["kind"].as_str().unwrap_or_default().to_string();
        if frame["sessionId"] != session.as_str() {
            continue;
        }
        if let Some(seq) = frame["seq"].as_u64() {
            if seq != log.last_seq() + 1 {
                log.problem(format!("got seq {seq} after {} ({kind})", log.last_seq()));
            }
            log.seqs.push(seq);
            let frame_run = frame["runId"].as_str().unwrap_or_default().to_string();
            match &run_id {
                None => run_id = Some(frame_run),
                Some(id) if *id != frame_run => {
                    log.problem(format!("seq {seq} belongs to run {frame_run}, expected run {id}"));
                }
                Some(_) => {}
            }
            seqs.push(seq);
            if kind == "stream_delta" {
                deltas.push(frame["content"].as_str().unwrap_or_default().to_string());
            }
            if kind == "complete" {
                log.runs.push(RunLog {
                    planned: events,
                    run_id: run_id.unwrap_or_default(),
                    seqs,
                    text: deltas.concat(),
                    complete: frame,
                    completed_at: SystemTime::now(),
                });
                return Some(ws);
            }
            continue;
        }
        match kind.as_str() {
            "protocol_error" if frame["code"] == "BACKEND_UNAVAILABLE" && run_id.is_none() => {
                // Nothing was started: the node began draining as the send arrived (its close
                // follows, and the send is repeated on the new socket), or it could not reach
                // the database or Redis just then (the send is repeated shortly).
                log.unavailable += 1;
                send_again_at = Some(Instant::now() + Duration::from_millis(300));
            }
            "chat_subscribed" if frame["replayTruncated"] == true => {
                log.problem(format!("told replayTruncated while live: {frame}"));
            }
            "chat_subscribed" | "session_upserted" => {}
            _ => log.problem(format!("unexpected frame: {frame}")),
        }
    }
}

/// Reconnects through nginx and re-subscribes with the client's last seq.
async fn resume(url: &str, log: &mut ClientLog) -> Option<(Ws, Resumed, Vec<String>)> {
    let (mut ws, failed_attempts) = match connect(url).await {
        Ok(connected) => connected,
        Err(e) => {
            log.problem(e);
            return None;
        }
    };
    let last = log.last_seq();
    let subscribe = json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": log.session, "lastSeq": last }] });
    if !send(&mut ws, subscribe.clone()).await {
        log.problem("the new socket closed before the subscribe was sent".to_string());
        return None;
    }
    let mut unavailable = 0;
    loop {
        let ack = match ws.try_recv(FRAME_WAIT).await {
            Some(Ok(frame)) => frame,
            other => {
                log.problem(format!("no chat_subscribed ack on the new socket: {other:?}"));
                return None;
            }
        };
        if ack["kind"] == "protocol_error" && ack["code"] == "BACKEND_UNAVAILABLE" && unavailable < 30 {
            // The node could not reach the database or Redis for the subscribe: try again.
            unavailable += 1;
            log.unavailable += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            send(&mut ws, subscribe.clone()).await;
            continue;
        }
        if ack["kind"] != "chat_subscribed" || ack["sessionId"] != log.session.as_str() {
            if ack.get("seq").is_some() || ack["kind"] == "protocol_error" {
                log.problem(format!("a frame before the ack: {ack}"));
            }
            continue;
        }
        if ack["replayTruncated"] != false {
            log.problem(format!("resubscribe with lastSeq {last} was told replayTruncated: {ack}"));
        }
        let top = ack["lastSeq"].as_u64().unwrap_or(0);
        let resumed = match ack["isProcessing"].as_bool() {
            Some(true) => Resumed::Following,
            Some(false) if top == last => Resumed::SendAgain,
            Some(false) if top > last => Resumed::EndedAway { top },
            _ => {
                log.problem(format!("resubscribed with lastSeq {last}: {ack}"));
                return None;
            }
        };
        return Some((ws, resumed, failed_attempts));
    }
}

/// A run that ended while its client was away, from history: its events after `last` must
/// end with exactly one `complete`, at `top`. Returns that `complete` and the run's merged
/// assistant text when it is among them (deltas are stored merged, under their `stream_end`'s seq).
async fn read_back(lb: &Lb, log: &mut ClientLog, last: u64, top: u64) -> Option<(Value, Option<String>)> {
    let url = format!("{}/api/providers/sessions/{}/messages?kinds=all", lb.http_url, log.session);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, history) = get(&lb.http, &url, &lb.token).await;
        let after: Vec<Value> = history["data"]["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["seq"].as_u64().is_some_and(|seq| seq > last))
            .cloned()
            .collect();
        if after.last().is_some_and(|m| m["kind"] == "complete" && m["seq"] == top) {
            let stored: Vec<u64> = after.iter().filter_map(|m| m["seq"].as_u64()).collect();
            let completes = after.iter().filter(|m| m["kind"] == "complete").count();
            if completes != 1 || !stored.windows(2).all(|w| w[0] < w[1]) || stored.iter().any(|s| *s > top) {
                log.problem(format!("history after seq {last} is not one run ending at {top}: {after:?}"));
            }
            let text = after
                .iter()
                .find(|m| m["kind"] == "text" && m["role"] == "assistant")
                .and_then(|m| m["content"].as_str())
                .map(str::to_string);
            return after.last().cloned().map(|complete| (complete, text));
        }
        if Instant::now() > deadline {
            log.problem(format!("history never showed the complete at {top} (after seq {last}): {after:?}"));
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- who owns which run, and when nodes drained ------------------------------------------------

#[derive(Clone, Debug)]
struct SeenRun {
    session: String,
    node: String,
    started_at: SystemTime,
}

type Seen = Arc<Mutex<HashMap<String, SeenRun>>>;

/// Polls `GET /api/providers/sessions/running` through nginx until `stop`.
async fn monitor(lb: String, token: String, seen: Seen, stop: Arc<AtomicBool>) -> usize {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    let mut failures = 0;
    while !stop.load(Ordering::SeqCst) {
        let answer = http.get(format!("{lb}/api/providers/sessions/running")).bearer_auth(&token).send().await;
        let body: Option<Value> = match answer {
            Ok(response) if response.status().is_success() => response.json().await.ok(),
            _ => None,
        };
        let Some(body) = body else {
            failures += 1;
            continue;
        };
        record_running(&seen, &body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    failures
}

fn record_running(seen: &Seen, body: &Value) {
    let mut seen = seen.lock().unwrap();
    for run in body["data"]["sessions"].as_array().into_iter().flatten() {
        let (Some(run_id), Some(node), Some(started)) =
            (run["runId"].as_str(), run["nodeId"].as_str(), run["startedAt"].as_str())
        else {
            continue;
        };
        seen.entry(run_id.to_string()).or_insert_with(|| SeenRun {
            session: run["sessionId"].as_str().unwrap_or_default().to_string(),
            node: node.to_string(),
            started_at: humantime::parse_rfc3339(started).unwrap(),
        });
    }
}

/// One node's restart as seen on its own port.
#[derive(Clone, Debug)]
struct DrainWindow {
    node: String,
    /// The first 503 from /readyz: draining by then.
    unready_at: Option<SystemTime>,
    /// The first refused connection: the old process is gone by then.
    down_at: Option<SystemTime>,
    ready_at: Option<SystemTime>,
}

impl DrainWindow {
    /// Whether a run started at `at` on this node would be a new run on a draining node: after
    /// its first 503 (plus the time a send already in hand may still take) and before the old
    /// process was gone.
    fn draining_at(&self, at: SystemTime) -> bool {
        match (self.unready_at, self.down_at) {
            (Some(from), Some(to)) => from + IN_FLIGHT <= at && at <= to,
            _ => false,
        }
    }
}

async fn watch_node(node: String, port: u16) -> DrainWindow {
    let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let mut window = DrainWindow { node, unready_at: None, down_at: None, ready_at: None };
    let deadline = Instant::now() + Duration::from_secs(60);
    while window.ready_at.is_none() && Instant::now() < deadline {
        let answer = http.get(format!("http://127.0.0.1:{port}/readyz")).send().await;
        let now = SystemTime::now();
        match answer {
            Ok(r) if r.status() == 200 && window.down_at.is_some() => window.ready_at = Some(now),
            Ok(r) if r.status() == 503 && window.down_at.is_none() && window.unready_at.is_none() => {
                window.unready_at = Some(now);
            }
            Err(e) if e.is_connect() && window.down_at.is_none() => window.down_at = Some(now),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    window
}

/// Restarts node `index` with `deploy/local/restart-node.sh` and watches its port meanwhile.
async fn restart_node(stack: &Stack, index: usize) -> DrainWindow {
    let watcher = tokio::spawn(watch_node(node_id(index), stack.node_ports[index - 1]));
    tokio::time::sleep(Duration::from_millis(60)).await;
    let out = stack.run("restart-node.sh", &[&index.to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains("restarted"),
        "restart-node.sh {index} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let window = watcher.await.unwrap();
    assert!(window.ready_at.is_some(), "node {index} was not seen ready again: {window:?}");
    eprintln!("[lb_drain] {}", stdout.trim());
    window
}

// --- the test ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_rolling_restart_through_nginx_lose_nothing() {
    rolling_restart_through_nginx(GRACE).await;
}

/// With a run grace longer than every run, a full rolling restart ends no run: sockets move
/// at once (1012), each draining node keeps its runs until they finish normally, then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_long_run_grace_every_run_outlives_a_rolling_restart() {
    rolling_restart_through_nginx(LONG_GRACE).await;
}

async fn rolling_restart_through_nginx(grace: Duration) {
    let began = Instant::now();
    let _serial = SERIAL.lock().await;
    let grace_setting = format!("{}s", grace.as_secs());
    let stack = Stack::up(&[("CHATGATE_DRAIN_GRACE", grace_setting.as_str())]).await;
    // Whether the longest run ends within the grace (then no drain may end a run).
    let runs_fit = grace >= Duration::from_millis(FIRST_LONG * INTERVAL_MS) + Duration::from_secs(5);
    let user = common::user();
    let token = stack.token(&user);
    let http = reqwest::Client::new();
    let lb = stack.lb_http();

    let mut sessions = Vec::new();
    for _ in 0..CLIENTS {
        let (_, created) = post_session(&http, &lb, &token).await;
        sessions.push(created["data"]["sessionId"].as_str().expect("session created through nginx").to_string());
    }
    let client_of: HashMap<String, usize> = sessions.iter().cloned().enumerate().map(|(i, s)| (s, i)).collect();

    let seen: Seen = Arc::default();
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor_task = tokio::spawn(monitor(lb.clone(), token.clone(), seen.clone(), monitor_stop.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let lb_client = Arc::new(Lb {
        ws_url: format!("{}?token={token}", stack.lb_ws()),
        http_url: lb.clone(),
        token: token.clone(),
        http: http.clone(),
    });
    for (index, session) in sessions.iter().enumerate() {
        clients.push(tokio::spawn(client(index, lb_client.clone(), session.clone(), stop.clone())));
        // One socket after the other, so nginx's round robin spreads them over the nodes.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }

    // The first runs, one per session, and the node each landed on.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_runs: BTreeMap<usize, SeenRun> = loop {
        let runs: BTreeMap<usize, SeenRun> =
            seen.lock().unwrap().values().map(|run| (client_of[&run.session], run.clone())).collect();
        if runs.len() == CLIENTS {
            break runs;
        }
        assert!(Instant::now() < deadline, "only {} of {CLIENTS} first runs listed as running: {runs:?}", runs.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut per_node: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (client, run) in &first_runs {
        per_node.entry(run.node.clone()).or_default().push(*client);
    }
    assert_eq!(per_node.len(), NODES, "nginx did not spread the runs over every node: {per_node:?}");
    // The node to drain first holds both a run that fits in the grace and one that does not.
    let (drained, drained_clients) = per_node
        .iter()
        .find(|(_, clients)| {
            clients.iter().any(|c| planned_events(*c, 0) == FIRST_SHORT)
                && clients.iter().any(|c| planned_events(*c, 0) == FIRST_LONG)
        })
        .map(|(node, clients)| (node.clone(), clients.clone()))
        .unwrap_or_else(|| panic!("no node holds both a short and a long first run: {per_node:?}"));
    let drained_index: usize = drained.trim_start_matches("local-").parse().unwrap();

    // Phase 1: SIGTERM one node while every node streams runs.
    let phase1 = restart_node(&stack, drained_index).await;
    let phase1_end = SystemTime::now();

    // Phase 2: a rolling restart of all three nodes under the same load, the drained one last.
    let mut windows = vec![phase1.clone()];
    for index in (1..=NODES).map(|i| (drained_index + i - 1) % NODES + 1) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        windows.push(restart_node(&stack, index).await);
    }
    let phase2_end = SystemTime::now();
    stop.store(true, Ordering::SeqCst);
    let mut logs = Vec::new();
    for task in clients {
        logs.push(task.await.unwrap());
    }
    monitor_stop.store(true, Ordering::SeqCst);
    let monitor_failures = monitor_task.await.unwrap();
    let seen = seen.lock().unwrap().clone();

    let mut failures: Vec<String> = logs.iter().flat_map(|log| log.problems.clone()).collect();

    // Phase 1: the drained node's clients got 1012 and came back; the others were left alone.
    let phase1_unready = phase1.unready_at.expect("the drained node answered /readyz 503 while draining");
    let phase1_down = phase1.down_at.expect("the drained node's port went down");
    let drain_took = phase1_down.duration_since(phase1_unready).unwrap_or_default();
    if !runs_fit && drain_took < grace - Duration::from_millis(500) {
        failures.push(format!("{drained} stopped {drain_took:?} after draining began, before its long runs' grace"));
    }
    if runs_fit && drain_took >= grace {
        failures.push(format!("{drained} took its whole grace ({drain_took:?}) though every run fits in it"));
    }
    for log in &logs {
        let closed_in_phase1: Vec<&CloseLog> = log.closes.iter().filter(|c| c.at <= phase1_end).collect();
        let on_drained = drained_clients.contains(&log.index);
        match (on_drained, closed_in_phase1.is_empty()) {
            (true, true) => failures.push(format!("client {} on {drained} was not disconnected", log.index)),
            (false, false) => {
                failures.push(format!("client {} not on {drained} was disconnected in phase 1", log.index))
            }
            _ => {}
        }
        // The first run of a client on the drained node: short ones finish in the grace, long
        // ones are ended by the drain — unless the grace is longer than every run.
        if on_drained && let Some(first) = log.runs.first() {
            let complete = &first.complete;
            if first.planned == FIRST_SHORT || runs_fit {
                if complete["exitCode"] != 0 || complete["aborted"] != false {
                    failures.push(format!("client {}: short run on {drained} did not finish: {complete}", log.index));
                }
                if first.completed_at < phase1_unready {
                    failures.push(format!("client {}: short run on {drained} ended before the drain", log.index));
                }
            } else if complete["error"] != "node draining" {
                failures
                    .push(format!("client {}: long run on {drained} not ended by the drain: {complete}", log.index));
            }
        }
    }

    // Phase 2: every client was disconnected by the rolling restart at least once.
    for log in &logs {
        if !log.closes.iter().any(|c| c.at > phase1_end && c.at <= phase2_end) {
            failures.push(format!("client {} was never disconnected by the rolling restart", log.index));
        }
    }

    // Every close was a drain's 1012.
    for log in &logs {
        for close in &log.closes {
            if close.code != Some(1012) {
                failures.push(format!("client {}: socket closed with {:?}, not 1012", log.index, close.code));
            }
        }
    }

    // Every run: contiguous, one complete, normal or ended by a drain of its node; every seq of
    // every session seen once, in order.
    let mut drain_aborted = 0;
    for log in &logs {
        let want: Vec<u64> = (1..=log.seqs.len() as u64).collect();
        if log.seqs != want {
            failures.push(format!(
                "client {}: session seqs not 1..={} once each: {:?}",
                log.index,
                want.len(),
                log.seqs
            ));
        }
        for run in &log.runs {
            let Some(owner) = seen.get(&run.run_id) else {
                failures.push(format!("client {}: run {} never listed as running", log.index, run.run_id));
                continue;
            };
            let complete = &run.complete;
            if !run.seqs.windows(2).all(|w| w[1] == w[0] + 1) {
                failures.push(format!("client {}: run {} seqs {:?}", log.index, run.run_id, run.seqs));
            }
            if complete["success"] == true {
                let text: String = (1..=run.planned).map(|i| format!("chunk {i}")).collect();
                if run.seqs.len() as u64 != run.planned + 2 || run.text != text || complete["exitCode"] != 0 {
                    failures.push(format!(
                        "client {}: run {} on {} succeeded with {} events for {} planned",
                        log.index,
                        run.run_id,
                        owner.node,
                        run.seqs.len(),
                        run.planned
                    ));
                }
            } else if complete["exitCode"] == 1 && complete["aborted"] == true && complete["error"] == "node draining" {
                drain_aborted += 1;
                if runs_fit {
                    failures.push(format!(
                        "client {}: run {} on {} ended by a drain though the grace outlasts every run: {complete}",
                        log.index, run.run_id, owner.node
                    ));
                }
                let drained_then = windows
                    .iter()
                    .any(|w| w.node == owner.node && w.unready_at.is_some_and(|at| at <= run.completed_at));
                if !drained_then {
                    failures.push(format!(
                        "client {}: run on {} ended by a drain it never had: {complete}",
                        log.index, owner.node
                    ));
                }
            } else {
                failures
                    .push(format!("client {}: run {} on {} ended with {complete}", log.index, run.run_id, owner.node));
            }
        }
    }

    for log in &logs {
        let ids: BTreeSet<&str> = log.runs.iter().map(|r| r.run_id.as_str()).collect();
        if ids.len() != log.runs.len() {
            failures.push(format!(
                "client {}: {} completes for {} distinct runs",
                log.index,
                log.runs.len(),
                ids.len()
            ));
        }
    }

    // No run started on a node while it drained.
    let mut started_while_draining = 0;
    for (run_id, run) in &seen {
        for window in &windows {
            if window.node == run.node && window.draining_at(run.started_at) {
                failures.push(format!(
                    "run {run_id} (session {}) started on {} at {:?}, while it drained ({window:?})",
                    run.session, run.node, run.started_at
                ));
            }
            if window.node != run.node && window.draining_at(run.started_at) {
                started_while_draining += 1;
            }
        }
    }
    if started_while_draining == 0 {
        failures.push("no run started anywhere while a node drained: the check above proved nothing".to_string());
    }

    // Afterwards: nothing runs, and history holds every run's complete.
    let (status, running) = get(&http, &format!("{lb}/api/providers/sessions/running"), &token).await;
    if status != 200 || running["data"]["sessions"] != json!([]) {
        failures.push(format!("runs still listed after every client finished: {status} {running}"));
    }
    for log in &logs {
        let want: BTreeSet<u64> = log.runs.iter().filter_map(|r| r.complete["seq"].as_u64()).collect();
        let path = format!("{lb}/api/providers/sessions/{}/messages?kinds=all", log.session);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, history) = get(&http, &path, &token).await;
            let stored: BTreeSet<u64> = history["data"]["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["kind"] == "complete")
                .filter_map(|m| m["seq"].as_u64())
                .collect();
            if stored == want {
                break;
            }
            if Instant::now() > deadline {
                failures.push(format!("client {}: history completes {stored:?}, streamed {want:?}", log.index));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, shown) = get(&http, &format!("{lb}/api/providers/sessions/{}", log.session), &token).await;
        if shown["data"]["lastSeq"] != log.last_seq() || shown["data"]["isProcessing"] != false {
            failures.push(format!("client {}: session shows {shown} after seq {}", log.index, log.last_seq()));
        }
    }

    let runs: usize = logs.iter().map(|l| l.runs.len()).sum();
    let closes: usize = logs.iter().map(|l| l.closes.len()).sum();
    let refused: usize = logs.iter().map(|l| l.unavailable).sum();
    let from_history: u64 = logs.iter().map(|l| l.from_history).sum();
    let slowest = logs.iter().flat_map(|l| &l.closes).max_by_key(|c| c.resumed_in);
    eprintln!(
        "[lb_drain] grace {grace:?}: {runs} runs ({drain_aborted} ended by a drain), {closes} closes, slowest resume {:?} \
         (failed attempts first: {:?}), {refused} BACKEND_UNAVAILABLE answers retried, {from_history} seqs of runs \
         that ended during a reconnect read from history, {started_while_draining} runs started elsewhere \
         during drains, {monitor_failures} failed /running polls, {:?} in all",
        slowest.map(|c| c.resumed_in),
        slowest.map(|c| &c.failed_attempts),
        began.elapsed()
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// `chat.send`s race a SIGTERM on one node: a send that arrives before the drain starts a run
/// that gets the grace and ends with a `complete` from that node; one that arrives after is
/// refused (or its socket is already closed). Every socket of the node gets 1012, no run starts
/// well after the drain began, and no run is left behind when the node exits: each ends with a
/// normal `complete` or the drain's, never "run owner lost" after the lease.
///
/// The node holds no run when the burst of sends arrives (the sharpest case: nothing else keeps
/// its drain waiting). Rounds repeat, with the SIGTERM a little earlier or later, until one
/// falls inside the burst: some sends started runs and some did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_racing_a_sigterm_start_no_run_the_drain_leaves_behind() {
    let _serial = SERIAL.lock().await;
    let lease = format!("{}s", RACE_LEASE.as_secs());
    let stack = Stack::up(&[("CHATGATE_RUN_LEASE", lease.as_str())]).await;
    let token = stack.token(&common::user());

    let mut failures = Vec::new();
    let mut hit = false;
    // SIGTERM offsets tried in turn until one lands inside the burst of sends.
    let offsets = [0u64, 1, 2, 3, 5, 0, 1, 2, 3, 5];
    for (round, offset) in offsets.iter().enumerate().map(|(i, o)| (i + 1, *o)) {
        let delay = Duration::from_millis(offset);
        let outcome = race_round(&stack, &token, delay).await;
        eprintln!(
            "[lb_drain] racing sends, round {round} (SIGTERM after {delay:?}): {} runs started, {} sends \
             started none ({} refused), {} runs started on local-1 after its first 1012",
            outcome.runs, outcome.without_run, outcome.refused, outcome.started_late
        );
        failures.extend(outcome.failures.iter().map(|f| format!("round {round}: {f}")));
        if outcome.runs > 0 && outcome.without_run > 0 {
            hit = true;
            break;
        }
    }
    if !hit {
        // Every round still checked that no run outlived the drain; only the exact
        // interleaving this test hunts for was not produced on this machine.
        eprintln!("[lb_drain] no round's SIGTERM fell inside the burst of sends (every round still passed its checks)");
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

const RACERS: usize = 40;
/// `--run-lease` of the racing test's nodes: a run its owner abandoned ends this long after.
const RACE_LEASE: Duration = Duration::from_secs(3);

struct RaceRound {
    runs: usize,
    without_run: usize,
    refused: usize,
    started_late: usize,
    failures: Vec<String>,
}

/// One burst of sends on fresh sockets of node 1 with its SIGTERM `delay` after the burst
/// began, watched from node 2; node 1 is restarted afterwards.
async fn race_round(stack: &Stack, token: &str, delay: Duration) -> RaceRound {
    let http = reqwest::Client::new();
    let lb = stack.lb_http();
    let mut sessions = Vec::new();
    for _ in 0..RACERS {
        let (status, created) = post_session(&http, &lb, token).await;
        assert_eq!(status, 201, "{created}");
        sessions.push(created["data"]["sessionId"].as_str().unwrap().to_string());
    }
    // The racers sit on node 1 (its own port); the watcher on node 2 follows every session.
    let direct = |port: u16| format!("ws://127.0.0.1:{port}/ws?token={token}");
    let mut racers = Vec::new();
    for _ in 0..RACERS {
        racers.push(Ws::connect(&direct(stack.node_ports[0])).await);
    }
    let mut watcher = Ws::connect(&direct(stack.node_ports[1])).await;
    let targets: Vec<Value> = sessions.iter().map(|s| json!({ "sessionId": s, "lastSeq": 0 })).collect();
    watcher.send(json!({ "type": "chat.subscribe", "sessions": targets })).await;
    for _ in 0..RACERS {
        assert_eq!(watcher.recv_reply().await["kind"], "chat_subscribed");
    }
    let seen: Seen = Arc::default();
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor_task = tokio::spawn(monitor(lb.clone(), token.to_string(), seen.clone(), monitor_stop.clone()));

    let pid: i32 = std::fs::read_to_string(stack.state().join("node-1.pid")).unwrap().trim().parse().unwrap();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    });
    let script = json!({ "events": 50, "intervalMs": INTERVAL_MS }).to_string();
    for (ws, session) in racers.iter_mut().zip(&sessions) {
        send(ws, json!({ "type": "chat.send", "sessionId": session, "content": script })).await;
    }
    killer.await.unwrap();
    let killed = Instant::now();

    // Each racer's socket: refused sends, then the drain's 1012.
    let mut readers = Vec::new();
    for mut ws in racers {
        readers.push(tokio::spawn(async move {
            let mut refused = 0;
            loop {
                match ws.try_recv(Duration::from_secs(10)).await {
                    Some(Ok(frame)) if frame["code"] == "BACKEND_UNAVAILABLE" => refused += 1,
                    Some(Ok(_)) => {}
                    Some(Err(code)) => return (refused, code, SystemTime::now()),
                    None => return (refused, None, SystemTime::now() + Duration::from_secs(3600)),
                }
            }
        }));
    }
    let mut refused = 0;
    let mut first_close = None::<SystemTime>;
    let mut failures = Vec::new();
    for reader in readers {
        let (n, code, at) = reader.await.unwrap();
        refused += n;
        if code != Some(1012) {
            failures.push(format!("a socket on local-1 ended with {code:?}, not 1012"));
        }
        first_close = Some(first_close.map_or(at, |t| t.min(at)));
    }
    let first_close = first_close.unwrap();

    // Every run of a racing session ends with one `complete`, seen by the watcher.
    let deadline = killed + GRACE + RACE_LEASE + Duration::from_secs(5);
    let mut events: HashMap<String, Vec<Value>> = HashMap::new();
    while Instant::now() < deadline {
        match watcher.try_recv(Duration::from_millis(200)).await {
            Some(Ok(frame)) if frame.get("seq").is_some() => {
                events.entry(frame["runId"].as_str().unwrap_or_default().to_string()).or_default().push(frame);
            }
            Some(Ok(_)) | None => {}
            Some(Err(code)) => panic!("the watcher on local-2 was closed ({code:?})"),
        }
        let listed = seen.lock().unwrap().clone();
        let runs: BTreeSet<&String> = listed.keys().chain(events.keys()).collect();
        let all_ended = runs
            .iter()
            .all(|run| events.get(*run).is_some_and(|frames| frames.iter().any(|f| f["kind"] == "complete")));
        if all_ended && (!runs.is_empty() || killed.elapsed() > Duration::from_secs(2)) {
            break;
        }
    }
    monitor_stop.store(true, Ordering::SeqCst);
    monitor_task.await.unwrap();
    let listed = seen.lock().unwrap().clone();
    let mut started_late = 0;
    for (run_id, run) in &listed {
        if run.node == "local-1" && run.started_at > first_close {
            started_late += 1;
            if run.started_at > first_close + IN_FLIGHT {
                failures.push(format!(
                    "run {run_id} started on local-1 at {}, well after it had closed a socket with 1012 at {}",
                    humantime::format_rfc3339_millis(run.started_at),
                    humantime::format_rfc3339_millis(first_close)
                ));
            }
        }
    }
    let run_ids: BTreeSet<&String> = listed.keys().chain(events.keys()).collect();
    let mut with_run = BTreeSet::new();
    for run_id in &run_ids {
        let frames = events.get(*run_id).map(Vec::as_slice).unwrap_or_default();
        if let Some(session) = listed.get(*run_id).map(|r| r.session.clone()) {
            with_run.insert(session);
        }
        with_run.extend(frames.iter().filter_map(|f| f["sessionId"].as_str().map(str::to_string)));
        let completes: Vec<&Value> = frames.iter().filter(|f| f["kind"] == "complete").collect();
        let owner = listed.get(*run_id).map_or("?", |r| r.node.as_str());
        match completes.as_slice() {
            [complete] if complete["success"] == true || complete["error"] == "node draining" => {}
            [complete] => failures.push(format!(
                "run {run_id} on {owner}: expected a normal complete or {{error: \"node draining\"}}, got {complete}"
            )),
            [] => failures.push(format!("run {run_id} on {owner}: no complete after {} events", frames.len())),
            many => failures.push(format!("run {run_id} on {owner}: {} completes", many.len())),
        }
    }
    let out = stack.run("restart-node.sh", &["1"]).await;
    assert!(out.status.success(), "restart-node.sh 1 failed: {}", String::from_utf8_lossy(&out.stderr));
    RaceRound { runs: run_ids.len(), without_run: RACERS - with_run.len(), refused, started_late, failures }
}

async fn post_session(http: &reqwest::Client, lb: &str, token: &str) -> (u16, Value) {
    let response = http
        .post(format!("{lb}/api/providers/sessions"))
        .bearer_auth(token)
        .json(&json!({ "provider": "script", "projectPath": "proj" }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(http: &reqwest::Client, url: &str, token: &str) -> (u16, Value) {
    match http.get(url).bearer_auth(token).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}
