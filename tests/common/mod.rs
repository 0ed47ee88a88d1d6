//! Test harness: in-process gateway nodes on real SQLite/PostgreSQL, and a
//! WebSocket client over real sockets (tokio-tungstenite).
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use chatgate::{config::Config, node::Node};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest},
};

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

/// The PostgreSQL URL of the test database.
pub fn pg_url() -> String {
    std::env::var("CHATGATE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
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

    /// A socket as upstream's client opens it (no `hello=1`: no `connected` frame) and the
    /// `X-Chatgate-Node` header of its upgrade response.
    pub async fn connect_upstream(&self, token: &str) -> (Ws, Option<String>) {
        let url = format!("{}?token={token}", self.ws_url);
        let (stream, response) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        let node = response.headers().get("x-chatgate-node").and_then(|v| v.to_str().ok()).map(str::to_string);
        (Ws { stream, node_id: String::new() }, node)
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

/// `url` asking for chatgate's additions (`hello=1`: the `connected` frame first).
pub fn with_hello(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}hello=1")
}

/// A WebSocket test client.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The node serving this socket (from its `connected` frame).
    pub node_id: String,
}

/// How long a test waits for one frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

impl Ws {
    /// Connects with `hello=1` and reads the `connected {nodeId}` frame that opts in to.
    pub async fn connect(url: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(with_hello(url)).await.expect("websocket connects");
        let mut ws = Ws { stream, node_id: String::new() };
        let hello = ws.recv().await;
        assert_eq!(hello["kind"], "connected", "first frame: {hello}");
        ws.node_id = hello["nodeId"].as_str().unwrap_or_default().to_string();
        ws
    }

    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
        let mut request = with_hello(url).into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                tungstenite::http::HeaderValue::from_str(value).unwrap(),
            );
        }
        let (stream, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Ws { stream, node_id: String::new() })
    }

    /// Waits for the socket to close; the close code (`None`: no close frame). Panics on timeout.
    pub async fn closed(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv(left).await {
                Some(Ok(_)) => continue,
                Some(Err(code)) => return code,
                None => panic!("socket still open after {wait:?}"),
            }
        }
    }

    /// The next frame that is not a `session_upserted` notice.
    pub async fn recv_reply(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["kind"] != "session_upserted" {
                return frame;
            }
        }
    }

    pub async fn send(&mut self, value: Value) {
        self.stream.send(Message::Text(value.to_string().into())).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::Text(text.to_string().into())).await.unwrap();
    }

    /// The next JSON frame; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        match self.try_recv(FRAME_TIMEOUT).await {
            Some(Ok(v)) => v,
            Some(Err(close)) => panic!("socket closed: {close:?}"),
            None => panic!("no frame within {FRAME_TIMEOUT:?}"),
        }
    }

    /// The next JSON frame, `Err(close code)` when the socket closes, `None` on timeout.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Result<Value, Option<u16>>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await.ok()?;
            match next {
                Some(Ok(Message::Text(text))) => return Some(Ok(serde_json::from_str(&text).unwrap())),
                Some(Ok(Message::Close(frame))) => return Some(Err(frame.map(|f| u16::from(f.code)))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Some(Err(None)),
            }
        }
    }

    /// Frames until one matches `pred` (returned last).
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.recv().await;
            let done = pred(&frame);
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Frames of `session` until its `complete` (inclusive), other frames skipped.
    pub async fn run_events(&mut self, session: &str) -> Vec<Value> {
        let frames = self.recv_until(|v| v["kind"] == "complete" && v["sessionId"] == session).await;
        frames.into_iter().filter(|v| v["sessionId"] == session && v.get("seq").is_some()).collect()
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(frame) = self.try_recv(wait).await {
            panic!("unexpected frame: {frame:?}");
        }
    }

    pub async fn send_chat(&mut self, session: &str, content: &str) {
        self.send(json!({ "type": "chat.send", "sessionId": session, "content": content })).await;
    }

    pub async fn subscribe(&mut self, session: &str, last_seq: u64) {
        self.send(json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": session, "lastSeq": last_seq }] }))
            .await;
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

/// The first of `count` consecutive free ports, below the kernel's ephemeral range: the
/// processes' own outgoing connections (to Redis, PostgreSQL, each other) take ports from that
/// range, and one could take a listener's port between this check and the listener's bind.
pub fn free_ports(count: u16) -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(10_000), low.saturating_sub(count));
    for _ in 0..200 {
        let base = rand::random_range(from..to);
        if (base..base + count).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return base;
        }
    }
    panic!("no {count} consecutive free ports between {from} and {to}");
}

/// A free port for a listener (see [`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The shared Redis of the test machine.
pub fn redis_url() -> String {
    std::env::var("CHATGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A private `redis-server` on a free port, killed on drop (for tests that stop Redis).
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = free_port();
        let mut redis = PrivateRedis { port, child: None };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) an empty server on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("private redis-server did not start");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The workspaces root every cluster node of the tests shares, as the nodes of
/// a real cluster share one volume: a run may start on any node.
pub fn cluster_workspaces() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-workspaces");
    std::fs::create_dir_all(root.join("proj")).unwrap();
    root
}

/// Starts a cluster-mode node on PostgreSQL and the given Redis.
pub async fn cluster_node(redis: &str, node_id: &str, tweak: impl FnOnce(&mut Config)) -> TestNode {
    let redis = redis.to_string();
    let node_id = node_id.to_string();
    TestNode::start_with(Db::Postgres, move |c| {
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
    chatgate::auth::Auth::new(SECRET.as_bytes()).mint(user, ttl).unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// HS256 token with arbitrary claims signed with `secret`.
pub fn signed(secret: &[u8], claims: Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// A well-formed token signed with the wrong secret.
pub fn forged_token(user: &str) -> String {
    signed(b"not-the-secret", json!({ "userId": user, "exp": unix_now() + 3600 }))
}

/// `{"alg":"none"}` with a valid-looking payload and no signature.
pub fn alg_none_token(user: &str) -> String {
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(json!({ "userId": user, "exp": unix_now() + 3600 }).to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// A correctly signed token that expired a minute ago.
pub fn expired_token(user: &str) -> String {
    signed(SECRET.as_bytes(), json!({ "userId": user, "iat": unix_now() - 120, "exp": unix_now() - 60 }))
}

/// Base64url without padding.
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
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

/// A cluster node run as a child process of the real binary (so it can get
/// real signals: SIGTERM, SIGKILL). Killed on drop if still running.
pub struct NodeProcess {
    pub child: std::process::Child,
    pub base: String,
    pub ws_url: String,
    /// Where its stderr goes, when started by [`NodeProcess::start_env`].
    pub stderr_log: Option<PathBuf>,
}

impl NodeProcess {
    /// Starts `chatgate serve` on a free port against `redis` and the test
    /// PostgreSQL, with `extra` flags appended (e.g. `--drain-grace 2s`).
    pub fn spawn(redis: &str, node_id: &str, workspaces: &std::path::Path, extra: &[&str]) -> NodeProcess {
        let cluster = ["--node-id", node_id, "--redis-url", redis];
        NodeProcess::start(&pg_url(), workspaces, &[&cluster[..], extra].concat())
    }

    /// Starts `chatgate serve` on a free port on `database_url`, with `args` appended.
    pub fn start(database_url: &str, workspaces: &std::path::Path, args: &[&str]) -> NodeProcess {
        let port = free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", database_url, "--jwt-secret", SECRET])
            .arg("--workspaces-root")
            .arg(workspaces)
            // The harness's sessions name one shared project ("proj") for every user.
            .args(["--workspace-layout", "shared", "--homes-root"])
            .arg(workspaces.parent().unwrap_or(workspaces).join("chatgate-homes"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chatgate binary starts");
        NodeProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            ws_url: format!("ws://127.0.0.1:{port}/ws"),
            stderr_log: None,
        }
    }

    /// Starts `chatgate serve --listen <free port>` with exactly `args` after it (no
    /// database, secret or workspaces flag is added), in an environment holding none
    /// of this process's `CHATGATE_*`, `DATABASE_URL*` and `REDIS_URL*` variables plus
    /// `env`; stderr goes to `<log_dir>/chatgate-<port>.stderr` ([`NodeProcess::stderr`]).
    pub fn start_env(args: &[std::ffi::OsString], env: &[(String, String)], log_dir: &Path) -> NodeProcess {
        let port = free_port();
        let log = log_dir.join(format!("chatgate-{port}.stderr"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"));
        command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]).args(args);
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("CHATGATE_") || text.starts_with("DATABASE_URL") || text.starts_with("REDIS_URL") {
                command.env_remove(&name);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("stderr log file"))
            .spawn()
            .expect("chatgate binary starts");
        NodeProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            ws_url: format!("ws://127.0.0.1:{port}/ws"),
            stderr_log: Some(log),
        }
    }

    /// What the process wrote on stderr so far (empty when not captured).
    pub fn stderr(&self) -> String {
        self.stderr_log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200; panics with the captured stderr when the
    /// process exits first or after 15 s.
    pub async fn wait_ready_or_exit(&mut self) {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("chatgate exited before it was ready ({status}); stderr:\n{}", self.stderr());
            }
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.base)).await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} not ready after 15 s; stderr:\n{}", self.base, self.stderr());
    }

    /// Waits until `/readyz` answers 200; panics after 10 s.
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.base)).await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} not ready", self.base);
    }

    pub async fn connect(&self, token: &str) -> Ws {
        Ws::connect(&format!("{}?token={token}", self.ws_url)).await
    }

    /// Sends SIGTERM (the drain signal).
    pub fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// The exit status once the process ended; panics after `wait`.
    pub async fn exited(&mut self, wait: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "process still running after {wait:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
