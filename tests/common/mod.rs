//! Test harness: in-process gateway nodes on real SQLite/PostgreSQL, the test settings
//! (secret, databases, workspaces) for nodes started by the shared kit
//! (`crates/chatgate-testkit`: child processes of the real binary, private Redis, the
//! WebSocket client, tokens), and assertions.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use chatgate::{config::Config, node::Node};
// Each test crate uses some of these.
#[allow(unused_imports)]
pub use chatgate_testkit::{
    node::{NodeCommand, NodeProcess},
    postgres::pg_url,
    redis::PrivateRedis,
    token::{alg_none as alg_none_token, forged as forged_token, signed},
    ws::{FRAME_TIMEOUT, Ws, with_hello},
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

/// Generates, for each named `async fn name(db: Db)`, one test per database:
/// `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! db_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Db::Postgres).await
                }
            )*
        }
    };
}

pub const SECRET: &str = "test-secret";

/// Which database a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A running node plus what tests need to talk to it.
pub struct TestNode {
    pub node: Option<Node>,
    pub base: String,
    pub ws_url: String,
    pub workspaces: PathBuf,
    pub http: reqwest::Client,
    pub config: Config,
    pub db: Db,
    pub dir: tempfile::TempDir,
}

/// A fresh random user id, so tests never see each other's sessions.
pub fn user() -> String {
    format!("u-{}", uuid::Uuid::new_v4().simple())
}

/// A config for a test node on `db` (SQLite in a temp dir, or the shared PostgreSQL).
pub fn config(db: Db, dir: &tempfile::TempDir) -> Config {
    let mut config = Config::for_tests();
    config.jwt_secret = Some(SECRET.into());
    config.database_url = match db {
        Db::Sqlite => format!("sqlite://{}?mode=rwc", dir.path().join("chatgate.db").display()),
        Db::Postgres => pg_url(),
    };
    let workspaces = dir.path().join("workspaces");
    std::fs::create_dir_all(workspaces.join("proj")).unwrap();
    config.workspaces_root = Some(workspaces);
    // The harness's sessions name one shared project ("proj") for every user.
    config.workspace_layout = chatgate::gateway::WorkspaceLayout::Shared;
    config.homes_root = Some(dir.path().join("homes"));
    config
}

impl TestNode {
    pub async fn start(db: Db) -> TestNode {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: Db, tweak: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(db, &dir);
        tweak(&mut config);
        Self::start_config(config, dir).await
    }

    pub async fn start_config(config: Config, dir: tempfile::TempDir) -> TestNode {
        // `CHATGATE_TEST_LOG=chatgate=debug` shows the nodes' logs while debugging a test.
        if let Ok(filter) = std::env::var("CHATGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let db = if config.database_url.starts_with("sqlite:") { Db::Sqlite } else { Db::Postgres };
        let workspaces = std::fs::canonicalize(config.workspaces_root.clone().unwrap()).unwrap();
        let node = Node::start(&config, SECRET).await.expect("node starts");
        let base = format!("http://{}", node.addr);
        let ws_url = format!("ws://{}/ws", node.addr);
        TestNode { node: Some(node), base, ws_url, workspaces, http: reqwest::Client::new(), config, db, dir }
    }

    /// Drains this node (if still running) and starts a fresh one on the same
    /// database and workspaces (a new port, a new in-process registry).
    pub async fn restart(&mut self) {
        self.drain().await;
        let node = Node::start(&self.config, SECRET).await.expect("node restarts");
        self.base = format!("http://{}", node.addr);
        self.ws_url = format!("ws://{}/ws", node.addr);
        self.node = Some(node);
    }

    /// The running node.
    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("node is running")
    }

    pub fn token(&self, user: &str) -> String {
        mint(user, Duration::from_secs(3600))
    }

    /// A direct store handle on this node's database.
    pub async fn store(&self) -> chatgate::store::Store {
        chatgate::store::Store::connect(&self.config.database_url).await.expect("store connects")
    }

    /// A REST call with full control: optional bearer token, raw body, extra headers.
    pub async fn request_raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, bytes)) = body {
            request = request.header("content-type", content_type).body(bytes);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A plain GET without auth; status and body text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self.http.get(format!("{}{}", self.base, path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// `GET …/messages?kinds=all` (every stored event, `complete` included; no limit), `data` of the envelope.
    pub async fn history(&self, token: &str, session: &str) -> Value {
        let (status, body) =
            self.request("GET", &format!("/api/providers/sessions/{session}/messages?kinds=all"), token, None).await;
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }

    /// History once it satisfies `pred` (it is written off the hot path); panics after 10 s.
    pub async fn history_until(&self, token: &str, session: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let data = self.history(token, session).await;
            let messages = data["messages"].as_array().cloned().unwrap_or_default();
            if pred(&messages) {
                return messages;
            }
            assert!(tokio::time::Instant::now() < deadline, "history never matched: {messages:#?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// History once its last message is the `complete` with seq `last` (or any complete when None).
    pub async fn history_complete(&self, token: &str, session: &str, last: Option<u64>) -> Vec<Value> {
        self.history_until(token, session, |m| {
            m.last().is_some_and(|v| v["kind"] == "complete" && last.is_none_or(|s| v["seq"] == s))
        })
        .await
    }

    /// Creates a session of `provider` in the workspace's `proj` directory.
    pub async fn create_session(&self, token: &str, provider: &str) -> String {
        let body = json!({ "provider": provider, "projectPath": self.workspaces.join("proj") });
        let (status, value) = self.request("POST", "/api/providers/sessions", token, Some(body)).await;
        assert_eq!(status, 201, "{value}");
        value["data"]["sessionId"].as_str().unwrap().to_string()
    }

    /// A REST call; returns status and JSON body.
    pub async fn request(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        rest(&self.http, &self.base, method, path, token, body).await
    }

    pub async fn connect(&self, token: &str) -> Ws {
        Ws::connect(&format!("{}?token={token}", self.ws_url)).await
    }

    /// A socket whose TCP receive buffer is small and fixed ([`Ws::connect_small_receive_buffer`]).
    pub async fn connect_small_receive_buffer(&self, token: &str) -> Ws {
        Ws::connect_small_receive_buffer(&format!("{}?token={token}", self.ws_url)).await
    }

    /// A socket as upstream's client opens it (no `hello=1`: no `connected` frame) and the
    /// `X-Chatgate-Node` header of its upgrade response.
    pub async fn connect_upstream(&self, token: &str) -> (Ws, Option<String>) {
        Ws::connect_upstream(&format!("{}?token={token}", self.ws_url)).await
    }

    /// An upgrade with extra headers (and the token in the query when given).
    pub async fn try_connect(&self, token: Option<&str>, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
        let url = match token {
            Some(token) => format!("{}?token={token}", self.ws_url),
            None => self.ws_url.clone(),
        };
        Ws::try_connect(&url, headers).await
    }

    /// Drains the node (SIGTERM behaviour).
    pub async fn drain(&mut self) {
        if let Some(node) = self.node.take() {
            node.drain().await;
        }
    }
}

/// The seqs of events.
pub fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|v| v["seq"].as_u64()).collect()
}

/// Asserts seqs are `from..=from+n-1` without gap or duplicate.
pub fn assert_contiguous(events: &[Value], from: u64) {
    let got = seqs(events);
    let want: Vec<u64> = (from..from + got.len() as u64).collect();
    assert_eq!(got, want, "seqs not contiguous from {from}");
}

/// Every key name in a Redis (SCAN through the redis crate's iterator), sorted, once each.
pub async fn key_names(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    use redis::AsyncCommands;
    let mut iter: redis::AsyncIter<String> = conn.scan().await.unwrap();
    let mut names = Vec::new();
    while let Some(name) = iter.next_item().await {
        names.push(name.unwrap());
    }
    drop(iter);
    names.sort();
    names.dedup();
    names
}

/// The shared Redis of the test machine.
pub fn redis_url() -> String {
    std::env::var("CHATGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The workspaces root every cluster node of the tests shares, as the nodes of
/// a real cluster share one volume: a run may start on any node.
pub fn cluster_workspaces() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-workspaces");
    std::fs::create_dir_all(root.join("proj")).unwrap();
    root
}

/// The seed list (`redis://…,redis://…`) of the test process's shared Redis Cluster
/// (3 primaries, 1 replica each; started on first use, gone with the process).
pub async fn shared_redis_cluster() -> String {
    let cluster = tokio::task::spawn_blocking(chatgate_testkit::redis_cluster::PrivateRedisCluster::shared)
        .await
        .expect("the shared cluster's start")
        .expect("a Redis Cluster");
    cluster.seed_urls().join(",")
}

/// `--redis-mode` for a `--redis-url` of the tests: a seed list is a Redis Cluster.
fn redis_mode_of(redis: &str) -> &'static str {
    if redis.contains(',') { "cluster" } else { "standalone" }
}

/// Starts a cluster-mode node on PostgreSQL and the given Redis (a comma list:
/// a Redis Cluster's seed nodes, with `--redis-mode cluster`).
pub async fn cluster_node(redis: &str, node_id: &str, tweak: impl FnOnce(&mut Config)) -> TestNode {
    let redis = redis.to_string();
    let node_id = node_id.to_string();
    TestNode::start_with(Db::Postgres, move |c| {
        c.redis_mode = chatgate::runs::redis::Topology::parse(redis_mode_of(&redis)).expect("a Redis mode");
        c.redis_url = Some(redis);
        c.node_id = Some(node_id);
        c.workspaces_root = Some(cluster_workspaces());
        tweak(c);
    })
    .await
}

/// A REST call with a bearer token to `base`; returns status and JSON body
/// (the raw text as a JSON string when the body is not JSON).
pub async fn rest(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = http.request(method, format!("{base}{path}")).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A token for `user` signed with the test secret.
pub fn mint(user: &str, ttl: Duration) -> String {
    chatgate_testkit::token::mint(SECRET, user, ttl).expect("token minted")
}

/// A correctly signed token that expired a minute ago.
pub fn expired_token(user: &str) -> String {
    chatgate_testkit::token::expired(SECRET, user)
}

/// The `kind`s of frames.
pub fn kinds(events: &[Value]) -> Vec<String> {
    events.iter().map(|v| v["kind"].as_str().unwrap_or("?").to_string()).collect()
}

/// Asserts a frame is a `protocol_error` with `code` (and returns it).
#[track_caller]
pub fn assert_protocol_error(frame: &Value, code: &str) {
    assert_eq!(frame["kind"], "protocol_error", "{frame}");
    assert_eq!(frame["code"], code, "{frame}");
    assert!(frame["error"].as_str().is_some_and(|e| !e.is_empty()), "{frame}");
    assert!(frame["timestamp"].is_string(), "{frame}");
}

/// The history a run should leave: what streamed, with each stretch of
/// `stream_delta`s (and its `stream_end`) merged into one assistant `text`.
/// Merged texts are compared by role, kind and content only.
pub fn merged_stream(events: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut text: Option<String> = None;
    for event in events {
        match event["kind"].as_str() {
            Some("stream_delta") => text.get_or_insert_with(String::new).push_str(event["content"].as_str().unwrap()),
            Some("stream_end") => {
                if let Some(t) = text.take() {
                    out.push(json!({ "kind": "text", "role": "assistant", "content": t }));
                }
            }
            _ => {
                if let Some(t) = text.take() {
                    out.push(json!({ "kind": "text", "role": "assistant", "content": t }));
                }
                out.push(event.clone());
            }
        }
    }
    if let Some(t) = text.take() {
        out.push(json!({ "kind": "text", "role": "assistant", "content": t }));
    }
    out
}

/// Asserts stored history `stored` (one run's messages, prompt first) equals
/// the prompt plus `merged_stream(streamed)`.
#[track_caller]
pub fn assert_history_matches(stored: &[Value], prompt: &str, streamed: &[Value]) {
    let want = merged_stream(streamed);
    assert_eq!(stored.len(), want.len() + 1, "stored {stored:#?}\nwant prompt + {want:#?}");
    let first = &stored[0];
    assert_eq!((first["kind"].as_str(), first["role"].as_str()), (Some("text"), Some("user")), "{first}");
    assert_eq!(first["content"], prompt, "{first}");
    assert!(first.get("seq").is_some_and(Value::is_null), "prompt must carry seq: null: {first}");
    for (got, want) in stored[1..].iter().zip(&want) {
        if want.get("seq").is_some() {
            assert_eq!(got, want, "stored event differs from the streamed one");
        } else {
            assert_eq!(got["kind"], "text", "{got}");
            assert_eq!(got["role"], "assistant", "{got}");
            assert_eq!(got["content"], want["content"], "{got}");
            assert!(got["seq"].is_u64(), "merged text must carry a seq: {got}");
        }
    }
    let seqs: Vec<u64> = stored[1..].iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "history seqs not increasing: {seqs:?}");
}

/// Resident set size of this process in KiB (Linux).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A node of this crate's `chatgate` binary (see `chatgate_testkit::node`).
pub fn node_command() -> NodeCommand {
    NodeCommand::new(env!("CARGO_BIN_EXE_chatgate"))
}

/// Spawns `chatgate serve` (not waiting for it) on a free port against `redis` and the test
/// PostgreSQL, with `extra` flags appended (e.g. `--drain-grace 2s`).
pub fn spawn_node(redis: &str, node_id: &str, workspaces: &Path, extra: &[&str]) -> NodeProcess {
    let cluster = ["--node-id", node_id, "--redis-url", redis, "--redis-mode", redis_mode_of(redis)];
    spawn_node_on(&pg_url(), workspaces, &[&cluster[..], extra].concat())
}

/// Spawns `chatgate serve` (not waiting for it) on a free port on `database_url`, with the
/// test secret and `args` appended.
pub fn spawn_node_on(database_url: &str, workspaces: &Path, args: &[&str]) -> NodeProcess {
    node_command()
        .database_url(database_url)
        .jwt_secret(SECRET)
        .workspaces(workspaces)
        // The harness's sessions name one shared project ("proj") for every user.
        .args(["--workspace-layout", "shared"])
        .homes(&workspaces.parent().unwrap_or(workspaces).join("chatgate-homes"))
        .args(args)
        .spawn()
        .expect("chatgate binary starts")
}

/// Spawns `chatgate serve --listen <free port>` (not waiting for it) with exactly `args`
/// after it (no database, secret or workspaces flag is added), in an environment holding
/// none of this process's `CHATGATE_*`, `DATABASE_URL*` and `REDIS_URL*` variables plus
/// `env`; stderr goes to `<log_dir>/chatgate-<port>.stderr` ([`NodeProcess::stderr`]).
pub fn spawn_node_env(args: &[std::ffi::OsString], env: &[(String, String)], log_dir: &Path) -> NodeProcess {
    node_command()
        .args(args)
        .clean_env()
        .envs(env.iter().cloned())
        .stderr_in(log_dir)
        .spawn()
        .expect("chatgate binary starts")
}
