//! The load generator's client side: nodes (spawned single-node or in cluster
//! mode), tokens, sessions over REST, and WebSocket connections bound to
//! chosen source addresses.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use chatgate::auth::Auth;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    net::{TcpSocket, TcpStream},
    process::{Child, Command},
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

pub type Socket = WebSocketStream<TcpStream>;

/// The secret every spawned node signs tokens with.
pub const SECRET: &str = "chatgate-bench-secret";

/// Where a spawned node keeps sessions and coordinates runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Single node: its own SQLite file, runs coordinated in process.
    Sqlite,
    /// Cluster mode: the shared Redis and PostgreSQL, under a unique node id,
    /// with the workspaces root every node of the cluster shares.
    Cluster { redis_url: String, database_url: String, node_id: String, workspaces: PathBuf },
}

/// A gateway node the bench talks to.
pub struct Node {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    /// Starts `chatgate serve` on a free port (only the `script` provider enabled).
    pub async fn spawn(
        bin: &Path,
        backend: &Backend,
        extra: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Node> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let own_workspaces = dir.path().join("workspaces");
        std::fs::create_dir_all(&own_workspaces)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--jwt-secret")
            .arg(SECRET)
            .arg("--providers")
            .arg("script")
            .arg("--workspaces-root")
            .arg(match backend {
                Backend::Cluster { workspaces, .. } => workspaces.as_path(),
                Backend::Sqlite => own_workspaces.as_path(),
            });
        match backend {
            Backend::Sqlite => {
                cmd.arg("--database-url").arg(format!("sqlite://{}?mode=rwc", dir.path().join("bench.db").display()));
            }
            Backend::Cluster { redis_url, database_url, node_id, .. } => {
                cmd.arg("--database-url")
                    .arg(database_url)
                    .arg("--redis-url")
                    .arg(redis_url)
                    .arg("--node-id")
                    .arg(node_id);
            }
        }
        cmd.args(extra)
            .env("RUST_LOG", "warn")
            // The bench stands for many clients with few users and 250 loopback addresses:
            // the per-user and per-address abuse limits would refuse it, not measure it
            // (a scenario's `--node-env` or extra flags still override these).
            .env("CHATGATE_MAX_SOCKETS_PER_USER", "1000000")
            .env("CHATGATE_MAX_SENDS_PER_MINUTE", "1000000")
            .env("CHATGATE_CONN_RATE_PER_IP", "1000000")
            .env("CHATGATE_CONN_BURST_PER_IP", "1000000")
            .env("CHATGATE_MAX_RUNS", "1000000")
            .env("CHATGATE_HOMES_ROOT", dir.path().join("homes"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let node = Node { addr, pid, child: Some(child), _dir: Some(dir) };
        node.wait_ready().await?;
        Ok(node)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for _ in 0..400 {
            if let Ok(r) = client.get(format!("http://{}/readyz", self.addr)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("node {} did not become ready", self.addr)
    }

    /// The node's resident set size in bytes (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_of(self.pid?)
    }

    pub async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(pid) = child.id() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(40), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

/// A process's resident set size in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Mints tokens and creates sessions.
#[derive(Clone)]
pub struct Api {
    pub auth: Auth,
    http: reqwest::Client,
}

impl Api {
    pub fn new() -> Self {
        Api { auth: Auth::new(SECRET.as_bytes()), http: reqwest::Client::new() }
    }

    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        Ok(self.auth.mint(user, Duration::from_secs(24 * 3600))?)
    }

    /// Creates a `script` session for the token's user.
    pub async fn create_session(&self, addr: SocketAddr, token: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("http://{addr}/api/providers/sessions"))
            .bearer_auth(token)
            .json(&json!({ "provider": "script", "projectPath": "." }))
            .send()
            .await?;
        let body: Value = response.json().await?;
        body["data"]["sessionId"].as_str().map(str::to_string).ok_or_else(|| anyhow!("create session: {body}"))
    }

    /// The node's Prometheus text.
    pub async fn metrics(&self, addr: SocketAddr) -> anyhow::Result<String> {
        Ok(self.http.get(format!("http://{addr}/metrics")).send().await?.text().await?)
    }
}

/// Opens a WebSocket to `addr`, from `source` when given (to spread over 127.0.0.x).
pub async fn connect(addr: SocketAddr, token: &str, source: Option<IpAddr>) -> anyhow::Result<Socket> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}/ws?token={token}&hello=1");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    // Every socket opens with `connected {nodeId}`.
    let hello = recv(&mut ws, Duration::from_secs(10)).await?;
    if hello["kind"] != "connected" {
        bail!("expected the connected frame, got {hello}");
    }
    Ok(ws)
}

/// The i-th client source address: 127.0.0.2 to 127.0.0.251, so one source
/// address never runs out of ports.
pub fn source_address(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 2 + (i % 250) as u8])
}

pub async fn send(ws: &mut Socket, value: Value) -> anyhow::Result<()> {
    ws.send(Message::Text(value.to_string().into())).await?;
    Ok(())
}

/// The next text frame (pings skipped).
pub async fn recv_text(ws: &mut Socket, wait: Duration) -> anyhow::Result<tokio_tungstenite::tungstenite::Utf8Bytes> {
    loop {
        let frame = tokio::time::timeout(wait, ws.next()).await.context("timed out waiting for a frame")?;
        match frame {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Close(frame))) => bail!("socket closed: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket ended"),
        }
    }
}

/// The next JSON frame (pings skipped).
pub async fn recv(ws: &mut Socket, wait: Duration) -> anyhow::Result<Value> {
    let text = recv_text(ws, wait).await?;
    Ok(serde_json::from_str(&text)?)
}

/// Subscribes to `session` after `last_seq`; returns the ack.
pub async fn subscribe(ws: &mut Socket, session: &str, last_seq: u64) -> anyhow::Result<Value> {
    send(ws, json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": session, "lastSeq": last_seq }] })).await?;
    loop {
        let frame = recv(ws, Duration::from_secs(60)).await?;
        match frame["kind"].as_str() {
            Some("chat_subscribed") if frame["sessionId"] == session => return Ok(frame),
            Some("session_upserted") => continue,
            _ => bail!("expected chat_subscribed, got {frame}"),
        }
    }
}

/// Raises the open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            getrlimit(Resource::RLIMIT_NOFILE).map(|(soft, _)| soft).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// Kernel TCP memory in bytes (`/proc/net/sockstat`, pages).
pub fn kernel_tcp_bytes() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            return words.next()?.parse::<u64>().ok().map(|pages| pages * 4096);
        }
    }
    None
}

/// Parses `KEY=VALUE`.
pub fn parse_env(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{raw}: expected KEY=VALUE"))
}

/// The chatgate binary: `--chatgate-bin`, else next to this one.
pub fn chatgate_bin(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(bin) => Ok(bin.clone()),
        None => Ok(std::env::current_exe()?.with_file_name("chatgate")),
    }
}
