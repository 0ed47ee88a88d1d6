//! Test harness: in-process gateway nodes on real SQLite/PostgreSQL, and a
//! WebSocket client over real sockets (tokio-tungstenite).
#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use chatgate::{config::Config, node::Node};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

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
    _dir: tempfile::TempDir,
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
        let workspaces = std::fs::canonicalize(config.workspaces_root.clone().unwrap()).unwrap();
        let node = Node::start(&config, SECRET).await.expect("node starts");
        let base = format!("http://{}", node.addr);
        let ws_url = format!("ws://{}/ws", node.addr);
        TestNode { node: Some(node), base, ws_url, workspaces, http: reqwest::Client::new(), _dir: dir }
    }

    pub fn token(&self, user: &str) -> String {
        self.node.as_ref().unwrap().auth.mint(user, Duration::from_secs(3600)).unwrap()
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
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn connect(&self, token: &str) -> Ws {
        Ws::connect(&format!("{}?token={token}", self.ws_url)).await
    }

    /// Drains the node (SIGTERM behaviour).
    pub async fn drain(&mut self) {
        if let Some(node) = self.node.take() {
            node.drain().await;
        }
    }
}

/// A WebSocket test client.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How long a test waits for one frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        Ws { stream }
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
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
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

/// Starts a cluster-mode node on PostgreSQL and the given Redis.
pub async fn cluster_node(redis: &str, node_id: &str, tweak: impl FnOnce(&mut Config)) -> TestNode {
    let redis = redis.to_string();
    let node_id = node_id.to_string();
    TestNode::start_with(Db::Postgres, move |c| {
        c.redis_url = Some(redis);
        c.node_id = Some(node_id);
        tweak(c);
    })
    .await
}
